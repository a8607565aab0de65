"""HistogramLogger: real Trainer runs with real offline W&B, CSV and TensorBoard loggers, read back from disk."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from callback_helpers import TinyLM, finish_and_read, make_loggers, make_trainer, run_script
from callback_helpers import csv_rows as _csv_rows
from lightning.pytorch import Callback

from lightning_cs336.callbacks.histograms import _FIELDS, HistogramLogger, _summarize
from lightning_cs336.wandb_reader import latest_run

LIGHTNING_KEYS = {"train/loss", "val/loss", "epoch", "trainer/global_step", "step", "_step", "_runtime", "_timestamp"}
PARAM_NAMES = [name for name, _ in TinyLM().named_parameters()]
NUMEL = {name: p.numel() for name, p in TinyLM().named_parameters()}


def _expected_keys(kinds: tuple[str, ...], with_histograms: bool, with_stats: bool, prefix: str = "") -> set[str]:
    keys = set()
    for pattern in HistogramLogger.METRIC_KEYS:
        is_histogram = pattern.endswith("<name>")
        if (is_histogram and not with_histograms) or (not is_histogram and not with_stats):
            continue
        if pattern.split("/")[0] in kinds:
            keys |= {prefix + pattern.replace("<name>", name) for name in PARAM_NAMES}
    return keys


class Snapshot(Callback):
    """Copies every weight and gradient at each on_before_optimizer_step (after the HistogramLogger ran)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        snap = {f"weights/{n}": p.detach().clone() for n, p in pl_module.named_parameters()}
        snap.update({f"gradients/{n}": p.grad.detach().clone() for n, p in pl_module.named_parameters()})
        self.by_step[step] = snap


def test_lightningcli_yaml_example_instantiates() -> None:
    """The YAML example in the docstring parses with jsonargparse (what LightningCLI uses) into a working callback."""
    import textwrap

    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback as _Callback

    config = yaml.safe_load(textwrap.dedent(HistogramLogger.__doc__.split("In a LightningCLI config::")[1]))
    parser = ArgumentParser()
    parser.add_argument("--trainer.callbacks", type=list[_Callback])
    (callback,) = parser.instantiate(parser.parse_object(config)).trainer.callbacks
    assert isinstance(callback, HistogramLogger)
    assert callback.every_n_steps == 200 and callback.log_gradients is True and callback.bins == 64


def test_metric_keys_documented() -> None:
    doc = HistogramLogger.__doc__
    for key in HistogramLogger.METRIC_KEYS:
        assert f"``{key}``" in doc
    assert "Example::" in doc and "class_path: lightning_cs336.callbacks.histograms.HistogramLogger" in doc


def test_histograms_on_wandb_tensorboard_and_stats_on_csv(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bins = 8
    snapshot = Snapshot()
    callback = HistogramLogger(every_n_steps=2, bins=bins, log_gradients=True)
    loggers = make_loggers(tmp_path, ("wandb", "csv", "tensorboard"))
    trainer = make_trainer(tmp_path, [callback, snapshot], loggers, max_steps=5, log_every_n_steps=1)
    trainer.fit(TinyLM())
    run = finish_and_read(tmp_path)
    logged_steps = [1, 3]  # Lightning's rule: (step + 1) % every_n_steps == 0

    # W&B: one histogram per parameter and kind, at the logging steps only; counts cover every element.
    assert run.keys() - LIGHTNING_KEYS == _expected_keys(("weights", "gradients"), True, True)
    for kind in ("weights", "gradients"):
        for name in PARAM_NAMES:
            history = run.history_of(f"{kind}/{name}")
            assert [step for step, _ in history] == logged_steps
            for step, value in history:
                assert value["_type"] == "histogram"
                assert len(value["values"]) == bins and len(value["bins"]) == bins + 1
                assert sum(value["values"]) == NUMEL[name]
                tensor = snapshot.by_step[step][f"{kind}/{name}"]
                assert value["bins"][0] == pytest.approx(tensor.min().item(), rel=1e-5, abs=1e-7)
                assert value["bins"][-1] == pytest.approx(tensor.max().item(), rel=1e-5, abs=1e-7)
                # Same counts as torch.histc over the same range (up to a rounding at a bin boundary).
                ref = torch.histc(tensor.double(), bins=bins, min=value["bins"][0], max=value["bins"][-1]).tolist()
                assert sum(abs(a - b) for a, b in zip(ref, value["values"], strict=True)) <= 2
            mean_history = run.history_of(f"{kind}/{name}/mean")
            assert [step for step, _ in mean_history] == logged_steps
    # The histograms and their statistics are one W&B row per logging step.
    rows = [row for row in run.history if "weights/head.weight" in row]
    assert len(rows) == 2 and all("gradients/head.weight/std" in row for row in rows)

    # CSV: the statistics, equal to torch's over the weights/gradients of that step.
    csv_logger, tb_logger = loggers[1], loggers[2]
    rows = _csv_rows(csv_logger.log_dir)
    stat_rows = [r for r in rows if r.get("weights/head.weight/mean")]
    assert [int(r["step"]) for r in stat_rows] == logged_steps
    assert {k for r in rows for k, v in r.items() if v} - LIGHTNING_KEYS == _expected_keys(
        ("weights", "gradients"), False, True
    )
    for row in stat_rows:
        snap = snapshot.by_step[int(row["step"])]
        for key, tensor in snap.items():
            assert float(row[f"{key}/mean"]) == pytest.approx(tensor.mean().item(), rel=1e-4, abs=1e-7)
            assert float(row[f"{key}/std"]) == pytest.approx(tensor.std().item(), rel=1e-4)
            assert float(row[f"{key}/min"]) == pytest.approx(tensor.min().item(), rel=1e-6)
            assert float(row[f"{key}/max"]) == pytest.approx(tensor.max().item(), rel=1e-6)
            assert float(row[f"{key}/nonfinite_count"]) == 0

    # TensorBoard: a histogram event per tensor at each logging step, with every element counted.
    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["histograms"])
    assert tags == {f"{kind}/{name}" for kind in ("weights", "gradients") for name in PARAM_NAMES}
    for tag in tags:
        events = acc.Histograms(tag)
        assert [e.step for e in events] == logged_steps
        for event in events:
            tensor = snapshot.by_step[event.step][tag]
            assert event.histogram_value.num == tensor.numel()
            assert sum(event.histogram_value.bucket) == tensor.numel()
            assert event.histogram_value.min == pytest.approx(tensor.min().item(), rel=1e-6)
            assert event.histogram_value.sum == pytest.approx(tensor.double().sum().item(), rel=1e-4, abs=1e-6)


def test_weights_only_prefix_and_no_stats_on_wandb(tmp_path: Path) -> None:
    callback = HistogramLogger(every_n_steps=3, bins=4, log_stats=False, prefix="h/")
    loggers = make_loggers(tmp_path, ("wandb", "csv"))
    trainer = make_trainer(tmp_path, [callback], loggers, max_steps=3)
    trainer.fit(TinyLM())
    run = finish_and_read(tmp_path)
    # W&B gets the histograms only; CSV still gets the statistics (it cannot show histograms).
    assert run.keys() - LIGHTNING_KEYS == _expected_keys(("weights",), True, False, prefix="h/")
    assert [s for s, _ in run.history_of("h/weights/head.weight")] == [2]
    rows = _csv_rows(loggers[1].log_dir)
    assert {k for r in rows for k, v in r.items() if v} - LIGHTNING_KEYS == _expected_keys(
        ("weights",), False, True, prefix="h/"
    )


def test_every_n_steps_none_follows_trainer_interval(tmp_path: Path) -> None:
    callback = HistogramLogger(every_n_steps=None, bins=4)
    loggers = make_loggers(tmp_path, ("csv",))
    trainer = make_trainer(tmp_path, [callback], loggers, max_steps=6, log_every_n_steps=2)
    trainer.fit(TinyLM())
    rows = [r for r in _csv_rows(loggers[0].log_dir) if r.get("weights/head.bias/mean")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]


def test_no_logger_warns_once_and_trains(tmp_path: Path) -> None:
    callback = HistogramLogger(every_n_steps=1)
    trainer = make_trainer(tmp_path, [callback], False, max_steps=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(TinyLM())
    messages = [str(w.message) for w in records if str(w.message).startswith("HistogramLogger")]
    assert len(messages) == 1 and "no logger" in messages[0]
    assert trainer.global_step == 2


def _fields(vector: torch.Tensor, bins: int) -> tuple[dict[str, float], list[float]]:
    values = vector.tolist()
    return dict(zip(_FIELDS, values[: len(_FIELDS)], strict=True)), values[len(_FIELDS) :]


def test_summary_skips_non_finite_values() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0, -float("inf"), 4.0])
    fields, counts = _fields(_summarize(x, 3), 3)
    finite = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert fields["num"] == 4 and fields["nonfinite_count"] == 3
    assert fields["mean"] == pytest.approx(finite.mean().item())
    assert fields["std"] == pytest.approx(finite.std().item())
    assert (fields["min"], fields["max"]) == (1.0, 4.0)
    assert fields["sum"] == 10.0 and fields["sum_squares"] == 30.0
    assert counts == [1, 1, 2] == torch.histc(finite, 3, 1.0, 4.0).tolist()

    # Nothing finite: no counts, NaN mean.
    fields, counts = _fields(_summarize(torch.full((5,), float("nan")), 4), 4)
    assert fields["num"] == 0 and fields["nonfinite_count"] == 5 and sum(counts) == 0 and math.isnan(fields["mean"])

    # A constant tensor: a unit-wide range centred on the value, every element in the middle bin.
    fields, counts = _fields(_summarize(torch.full((6,), 2.0), 3), 3)
    assert (fields["lo"], fields["hi"]) == (1.5, 2.5) and counts == [0, 6, 0] and fields["std"] == 0


def test_summary_matches_torch_on_large_low_precision_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several chunks, bfloat16: element-wise work in float32, chunk sums accumulated in float64, exact counts.
    import lightning_cs336.callbacks.histograms as histograms

    monkeypatch.setattr(histograms, "_CHUNK", 1000)
    x = torch.randn(3 * 1000 + 17, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[1500] = float("nan")  # in the second chunk
    fields, counts = _fields(_summarize(x, 16), 16)
    ref = x.double()[torch.isfinite(x)]
    assert fields["num"] == x.numel() - 1 == sum(counts) and fields["nonfinite_count"] == 1
    assert fields["mean"] == pytest.approx(ref.mean().item(), abs=1e-7)
    assert fields["std"] == pytest.approx(ref.std().item(), rel=1e-6)
    assert counts == torch.histc(ref, 16, fields["min"], fields["max"]).tolist()


def test_non_finite_parameters_do_not_break_logging(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = TinyLM()
    with torch.no_grad():
        model.head.bias[0] = float("nan")  # the loss, and so every gradient, is NaN from the first step
    callback = HistogramLogger(every_n_steps=1, bins=4, log_gradients=True)
    loggers = make_loggers(tmp_path, ("csv", "tensorboard"))
    trainer = make_trainer(tmp_path, [callback], loggers, max_steps=2, log_every_n_steps=1)
    trainer.fit(model)
    assert trainer.global_step == 2
    rows = [r for r in _csv_rows(loggers[0].log_dir) if r.get("weights/head.bias/mean")]
    assert len(rows) == 2
    numel = NUMEL["head.bias"]
    assert float(rows[0]["weights/head.bias/nonfinite_count"]) == 1
    assert math.isfinite(float(rows[0]["weights/head.bias/mean"]))
    assert float(rows[0]["gradients/head.weight/nonfinite_count"]) == NUMEL["head.weight"]
    assert math.isnan(float(rows[0]["gradients/head.weight/mean"]))
    acc = EventAccumulator(loggers[1].log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    # The finite part of a weight is still histogrammed; an all-NaN gradient has no histogram.
    assert acc.Histograms("weights/head.bias")[0].histogram_value.num == numel - 1
    assert "gradients/head.weight" not in acc.Tags()["histograms"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer or None, got 0"),
        ({"every_n_steps": 2.0}, "every_n_steps .* got 2.0"),
        ({"bins": 0}, r"bins must be an integer in \[1, 512\], got 0"),
        ({"bins": 513}, "got 513"),
        ({"log_gradients": "yes"}, "log_gradients must be a bool, got 'yes'"),
        ({"log_stats": None}, "log_stats must be a bool, got None"),
        ({"log_weights": False}, "at least one of log_weights .False. and log_gradients .False. must be True"),
        ({"prefix": 1}, "prefix must be a string, got 1"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HistogramLogger(**kwargs)


_DIST_SCRIPT = """
import sys

import lightning as L
import torch

from callback_helpers import FullyShardLayers, TinyLM, make_loggers, two_process_strategy
from lightning_cs336.callbacks.histograms import HistogramLogger

STRATEGY = {strategy!r}


class Sharded(FullyShardLayers, TinyLM):
    pass


torch.manual_seed(0)
model = (Sharded if STRATEGY == "fsdp2" else TinyLM)(batch_size=4)
strategy = two_process_strategy(STRATEGY)
trainer = L.Trainer(
    default_root_dir={root!r},
    accelerator="cpu",
    devices=2,
    strategy=strategy,
    max_steps=2,
    log_every_n_steps=1,
    logger=make_loggers({root!r}, ("wandb",)),
    callbacks=[HistogramLogger(every_n_steps=2, bins=4, log_gradients=True)],
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
    limit_val_batches=0,
)
trainer.fit(model)
import wandb

if wandb.run is not None:
    wandb.finish()
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process(tmp_path: Path, wandb_env: Path, strategy: str) -> None:
    """Rank zero alone logs (one W&B run). DDP: whole parameters; FSDP2: rank zero's local shards (half of each
    parameter here, sharded on dim 0 over 2 ranks), as documented."""

    root = tmp_path / "run"
    source = _DIST_SCRIPT.format(strategy=strategy, root=str(root))
    run_script(tmp_path, source)

    from lightning_cs336.wandb_reader import find_runs

    assert len(find_runs(tmp_path)) == 1
    run = latest_run(root, wait_s=30)
    share = 2 if strategy == "fsdp2" else 1
    for kind in ("weights", "gradients"):
        for name in PARAM_NAMES:
            (step, value), *rest = run.history_of(f"{kind}/{name}")
            assert step == 1 and not rest
            assert sum(value["values"]) == NUMEL[name] // share
