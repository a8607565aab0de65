"""Tests for GradientNormMonitor: real Trainer, real offline W&B / CSV / TensorBoard loggers read back from disk."""

from __future__ import annotations

import csv
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TinyLM, finish_and_read, make_loggers, make_trainer, run_script

from lightning_cs336.callbacks import grad_norm as grad_norm_module
from lightning_cs336.callbacks._base import clean_param_name
from lightning_cs336.callbacks.grad_norm import GradientNormMonitor

BASE_KEYS = {"grad/norm_total", "grad/nonfinite_count", "grad/nonfinite_total"}
CLIP_KEYS = set(GradientNormMonitor.CLIP_KEYS)
# Keys Lightning itself (TinyLM's self.log, WandbLogger) puts in the same run.
LIGHTNING_KEYS = {"train/loss", "val/loss", "epoch", "step", "hp_metric"}
LIGHTNING_KEYS |= {"trainer/global_step", "_step", "_runtime", "_timestamp"}
GROUPS_DEPTH2 = {"embed", "layers.0", "layers.1", "head"}


def _step_of(module: L.LightningModule) -> int:
    return int(module.trainer.fit_loop.epoch_loop._batches_that_stepped)


def _total_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.nn.utils.get_total_norm([t for t in tensors if t is not None]))


class RecordingLM(TinyLM):
    """TinyLM that records torch's own gradient norms (independent reference) and can inject a NaN gradient."""

    def __init__(self, nan_at_step: int | None = None, adamw: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at_step = nan_at_step
        self.adamw = adamw
        self.pre: dict[int, float] = {}
        self.post: dict[int, float] = {}
        self.head_pre: dict[int, float] = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.adamw:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return super().configure_optimizers()

    def on_after_backward(self) -> None:
        if self.nan_at_step is not None and self.trainer.global_step == self.nan_at_step:
            self.layers[0].weight.grad[0, 0] = float("nan")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Module hooks run after callback hooks, before Lightning clips: the same gradients the callback saw.
        self.pre[_step_of(self)] = _total_norm([p.grad for p in self.parameters()])
        self.head_pre[_step_of(self)] = _total_norm([p.grad for p in self.head.parameters()])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.post[_step_of(self)] = _total_norm([p.grad for p in self.parameters()])


def _read_csv(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = list(tmp_path.rglob("metrics.csv"))
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _csv_series(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def _csv_keys(rows: list[dict[str, str]]) -> set[str]:
    return {k for r in rows for k, v in r.items() if v not in (None, "")}


def _wandb_series(run, key: str) -> dict[int, float]:
    return {int(step): float(value) for step, value in run.history_of(key)}


def _documented_keys() -> set[str]:
    return set(re.findall(r"^\s*``(grad/[^`]+)``\s", GradientNormMonitor.__doc__, flags=re.MULTILINE))


# ----------------------------------------------------------------------------------------------------------------
# construction & documentation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_layer_depth": 0}, "per_layer_depth.*0"),
        ({"per_layer_depth": -2}, "per_layer_depth.*-2"),
        ({"per_layer_depth": True}, "per_layer_depth.*True"),
        ({"per_layer_depth": "2"}, "per_layer_depth.*'2'"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite.*'ignore'"),
        ({"log_every_n_steps": 0}, "log_every_n_steps.*0"),
        ({"prefix": 3}, "prefix.*3"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNormMonitor(**kwargs)


def test_docstring_documents_every_key() -> None:
    doc = GradientNormMonitor.__doc__
    assert _documented_keys() == set(GradientNormMonitor.METRIC_KEYS) | {GradientNormMonitor.PER_LAYER_KEY + "<group>"}
    for section in ("Args:", "Example::", "LightningCLI YAML::", "class_path: lightning_cs336.callbacks"):
        assert section in doc


def test_lightning_cli_yaml_from_docstring() -> None:
    """The YAML example in the docstring instantiates through jsonargparse, as LightningCLI does."""
    yaml = pytest.importorskip("yaml")
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    block = textwrap.dedent(GradientNormMonitor.__doc__.split("LightningCLI YAML::", 1)[1].strip("\n"))
    config = yaml.safe_load(block)
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    parsed = parser.parse_object({"callbacks": config["trainer"]["callbacks"]})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    (cb,) = instantiate(parsed).callbacks
    assert isinstance(cb, GradientNormMonitor)
    assert (cb.per_layer_depth, cb.on_nonfinite, cb.log_every_n_steps) == (2, "skip", 10)


def test_group_names() -> None:
    clean, group = clean_param_name, grad_norm_module._group_of
    assert clean("layers.3._fsdp_wrapped_module._checkpoint_wrapped_module.attn._orig_mod.q.weight") == (
        "layers.3.attn.q.weight"
    )
    assert group("layers.3.attn.q_proj.weight", 3) == "layers.3.attn"
    assert group("layers.3.attn.q_proj.weight", 2) == "layers.3"
    assert group("layers.3.attn.q_proj.weight", 9) == "layers.3.attn.q_proj"
    assert group("head.bias", 3) == "head"
    assert group("pos_emb", 2) == "pos_emb"


# ----------------------------------------------------------------------------------------------------------------
# (a) + (c): keys, reference values, per-layer norms, logging steps only


def test_keys_and_values_match_torch(tmp_path: Path) -> None:
    model = RecordingLM()
    cb = GradientNormMonitor(per_layer_depth=2)
    trainer = make_trainer(tmp_path, [cb], make_loggers(tmp_path, ("wandb", "csv")), max_steps=6, log_every_n_steps=2)
    trainer.fit(model)
    run = finish_and_read(tmp_path)
    rows = _read_csv(tmp_path)

    expected = BASE_KEYS | {"grad/norm/" + g for g in GROUPS_DEPTH2}
    assert run.keys() - LIGHTNING_KEYS == expected
    assert _csv_keys(rows) - LIGHTNING_KEYS == expected
    assert expected - BASE_KEYS <= {k.replace("<group>", g) for k in _documented_keys() for g in GROUPS_DEPTH2}

    for series in (_wandb_series(run, "grad/norm_total"), _csv_series(rows, "grad/norm_total")):
        # Logging steps only: (step + 1) % 2 == 0, on the same rows as train/loss.
        assert sorted(series) == [1, 3, 5]
        for step, value in series.items():
            assert value == pytest.approx(model.pre[step], rel=1e-5)
    assert sorted(_wandb_series(run, "train/loss")) == [1, 3, 5]

    # (c) per-layer norms recombine to the total, and one group matches torch on that group alone.
    for step in (1, 3, 5):
        groups = {g: _wandb_series(run, "grad/norm/" + g)[step] for g in GROUPS_DEPTH2}
        assert math.sqrt(sum(v * v for v in groups.values())) == pytest.approx(model.pre[step], rel=1e-5)
        assert groups["head"] == pytest.approx(model.head_pre[step], rel=1e-5)
    assert all(v == 0 for v in _wandb_series(run, "grad/nonfinite_count").values())
    assert all(v == 0 for v in _wandb_series(run, "grad/nonfinite_total").values())


# ----------------------------------------------------------------------------------------------------------------
# (b): clipping


def test_norm_clipping_all_steps(tmp_path: Path) -> None:
    model = RecordingLM()
    cb = GradientNormMonitor()
    loggers = make_loggers(tmp_path, ("wandb", "tensorboard"))
    trainer = make_trainer(tmp_path, [cb], loggers, max_steps=6, log_every_n_steps=2, gradient_clip_val=1e-3)
    trainer.fit(model)
    run = finish_and_read(tmp_path)

    assert run.keys() - LIGHTNING_KEYS == BASE_KEYS | CLIP_KEYS
    post = _wandb_series(run, "grad/norm_total_clipped")
    assert sorted(post) == [1, 3, 5]
    for step, value in post.items():
        assert value == pytest.approx(1e-3, rel=1e-4)
        assert value == pytest.approx(model.post[step], rel=1e-5)  # what Lightning's clipping actually left
    assert set(_wandb_series(run, "grad/clipped").values()) == {1}
    assert set(_wandb_series(run, "grad/clip_fraction").values()) == {1}
    assert _wandb_series(run, "grad/clipped_total") == {1: 2, 3: 4, 5: 6}

    # TensorBoard gets the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(loggers[1].log_dir)))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) - LIGHTNING_KEYS == BASE_KEYS | CLIP_KEYS
    assert [e.step for e in acc.Scalars("grad/clip_fraction")] == [1, 3, 5]


def test_norm_clipping_some_steps(tmp_path: Path) -> None:
    # First find the unclipped norms, then clip at a threshold that only some steps exceed.
    probe = RecordingLM()
    make_trainer(tmp_path / "probe", [], max_steps=6).fit(probe)
    norms = [probe.pre[s] for s in range(6)]
    clip = sorted(norms)[2] + 1e-4  # 3 of 6 steps above
    torch.manual_seed(0)
    model = RecordingLM()
    cb = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [cb], make_loggers(tmp_path, ("csv",)), max_steps=6, gradient_clip_val=clip)
    trainer.fit(model)
    rows = _read_csv(tmp_path)
    # Clipping changes the trajectory slightly: the reference is torch's norm in this run.
    fired = [model.pre[s] + 1e-6 > clip for s in range(6)]
    assert 0 < sum(fired) < 6
    fraction = _csv_series(rows, "grad/clip_fraction")
    clipped = _csv_series(rows, "grad/clipped")
    post = _csv_series(rows, "grad/norm_total_clipped")
    pre = _csv_series(rows, "grad/norm_total")
    for step in (1, 3, 5):
        assert fraction[step] == pytest.approx((fired[step - 1] + fired[step]) / 2)
        assert clipped[step] == float(fired[step])
        assert post[step] == pytest.approx(model.post[step], rel=1e-5)
        assert post[step] == pytest.approx(min(pre[step], clip), rel=1e-5)
    assert _csv_series(rows, "grad/clipped_total")[5] == sum(fired)


def test_value_clipping(tmp_path: Path) -> None:
    model = RecordingLM()
    cb = GradientNormMonitor()
    trainer = make_trainer(
        tmp_path,
        [cb],
        make_loggers(tmp_path, ("csv",)),
        max_steps=4,
        log_every_n_steps=2,
        gradient_clip_val=1e-3,
        gradient_clip_algorithm="value",
    )
    trainer.fit(model)
    rows = _read_csv(tmp_path)
    assert _csv_keys(rows) - LIGHTNING_KEYS == BASE_KEYS | CLIP_KEYS
    post = _csv_series(rows, "grad/norm_total_clipped")
    for step in (1, 3):
        # Measured by a second pass over the clamped gradients after the optimizer step.
        assert post[step] == pytest.approx(model.post[step], rel=1e-5)
        assert post[step] < _csv_series(rows, "grad/norm_total")[step]
    assert set(_csv_series(rows, "grad/clip_fraction").values()) == {1.0}


# ----------------------------------------------------------------------------------------------------------------
# (d): non-finite gradients


def test_nonfinite_count(tmp_path: Path) -> None:
    # NaN in one gradient at step 3; plain SGD then spreads NaN into the weights, so steps 4 and 5 are NaN too.
    model = RecordingLM(nan_at_step=3)
    cb = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [cb], make_loggers(tmp_path, ("csv",)), max_steps=6, log_every_n_steps=2)
    trainer.fit(model)
    rows = _read_csv(tmp_path)
    assert _csv_series(rows, "grad/nonfinite_count") == {1: 0, 3: 1, 5: 2}
    assert _csv_series(rows, "grad/nonfinite_total") == {1: 0, 3: 1, 5: 3}
    assert math.isnan(_csv_series(rows, "grad/norm_total")[3])
    assert cb.state_dict()["nonfinite_total"] == 3


class _WeightProbe(L.Callback):
    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


def test_nonfinite_skip_leaves_weights_unchanged(tmp_path: Path) -> None:
    model = RecordingLM(nan_at_step=2, adamw=True)
    cb = GradientNormMonitor(on_nonfinite="skip")
    probe = _WeightProbe()
    trainer = make_trainer(tmp_path, [cb, probe], make_loggers(tmp_path, ("csv",)), max_steps=6, log_every_n_steps=2)
    with pytest.warns(UserWarning, match="non-finite gradients at step 2"):
        trainer.fit(model)

    for step in range(6):
        same = all(torch.equal(a, b) for a, b in zip(probe.before[step], probe.after[step], strict=True))
        assert same == (step == 2), step  # only the NaN step left AdamW (weights, decay, moments) untouched
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = trainer.optimizers[0].state[model.layers[0].weight]
    assert int(state["step"]) == 5  # AdamW skipped the step for every parameter
    rows = _read_csv(tmp_path)
    assert _csv_series(rows, "grad/nonfinite_count") == {1: 0, 3: 1, 5: 0}
    assert _csv_series(rows, "grad/nonfinite_total") == {1: 0, 3: 1, 5: 1}


def test_nonfinite_stop_names_step_and_layer(tmp_path: Path) -> None:
    model = RecordingLM(nan_at_step=3)
    cb = GradientNormMonitor(on_nonfinite="stop", per_layer_depth=2)
    probe = _WeightProbe()
    trainer = make_trainer(tmp_path, [cb, probe], make_loggers(tmp_path, ("csv",)), max_steps=6, log_every_n_steps=2)
    with pytest.raises(RuntimeError, match=r"non-finite.* at step 3 .*in: layers\.0\. Training stopped"):
        trainer.fit(model)
    assert 3 not in probe.after  # the optimizer never stepped on the NaN gradient
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_stop_names_parameters_without_depth(tmp_path: Path) -> None:
    model = RecordingLM(nan_at_step=1)
    trainer = make_trainer(tmp_path, [GradientNormMonitor(on_nonfinite="stop")], max_steps=4)
    with pytest.raises(RuntimeError, match=r"at step 1 .*in: layers\.0\.weight\."):
        trainer.fit(model)


# ----------------------------------------------------------------------------------------------------------------
# (e): gradient accumulation


def test_gradient_accumulation(tmp_path: Path) -> None:
    model = RecordingLM()
    cb = GradientNormMonitor(log_every_n_steps=1)
    trainer = make_trainer(
        tmp_path, [cb], make_loggers(tmp_path, ("csv",)), max_steps=4, log_every_n_steps=50, accumulate_grad_batches=2
    )
    trainer.fit(model)
    # One measurement per optimizer step (not per micro-batch), equal to torch's norm of the accumulated gradient.
    assert sorted(model.pre) == [0, 1, 2, 3]
    series = _csv_series(_read_csv(tmp_path), "grad/norm_total")
    assert sorted(series) == [0, 1, 2, 3]
    for step, value in series.items():
        assert value == pytest.approx(model.pre[step], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# (f): state


def test_state_dict_round_trip() -> None:
    cb = GradientNormMonitor()
    cb._clipped_total, cb._nonfinite_total = 7.0, 2.0
    cb._window = [torch.tensor([4.0, 0.0, 0.0]), torch.tensor([9.0, 1.0, 0.0])]
    state = cb.state_dict()
    fresh = GradientNormMonitor()
    fresh.load_state_dict(state)
    assert (
        fresh.state_dict()
        == state
        == {
            "clipped_total": 7.0,
            "nonfinite_total": 2.0,
            "pending_rows": [[4.0, 0.0, 0.0], [9.0, 1.0, 0.0]],
        }
    )
    # An empty (older) state loads without error and means "nothing yet".
    older = GradientNormMonitor()
    older.load_state_dict({})
    assert older.state_dict() == {"clipped_total": 0.0, "nonfinite_total": 0.0, "pending_rows": []}


def test_resume_continues_totals_and_window(tmp_path: Path) -> None:
    ckpt = tmp_path / "mid.ckpt"
    first = make_trainer(
        tmp_path / "a",
        [GradientNormMonitor()],
        make_loggers(tmp_path / "a", ("csv",)),
        max_steps=3,
        gradient_clip_val=1e-3,
    )
    first.fit(RecordingLM())
    first.save_checkpoint(ckpt)  # step 2 is not a logging step: it is still pending in the window
    rows_a = _read_csv(tmp_path / "a")
    assert _csv_series(rows_a, "grad/clipped_total") == {1: 2}

    torch.manual_seed(0)
    cb = GradientNormMonitor()
    second = make_trainer(
        tmp_path / "b", [cb], make_loggers(tmp_path / "b", ("csv",)), max_steps=6, gradient_clip_val=1e-3
    )
    second.fit(RecordingLM(nan_at_step=5), ckpt_path=str(ckpt))
    rows_b = _read_csv(tmp_path / "b")
    # Steps 3..5 ran here; the step-3 window also holds step 2 from before the checkpoint.
    assert _csv_series(rows_b, "grad/clipped_total") == {3: 4, 5: 5}  # step 5 is NaN: not clipped
    assert _csv_series(rows_b, "grad/clip_fraction") == {3: 1.0, 5: 0.5}
    assert _csv_series(rows_b, "grad/nonfinite_total") == {3: 0, 5: 1}


# ----------------------------------------------------------------------------------------------------------------
# loggers, prefix, no logger, no host sync


def test_prefix(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, [GradientNormMonitor(prefix="ft/")], make_loggers(tmp_path, ("csv",)), gradient_clip_val=1.0
    )
    trainer.fit(TinyLM(with_hooks=False))
    keys = _csv_keys(_read_csv(tmp_path)) - LIGHTNING_KEYS
    assert keys == {"ft/" + k for k in BASE_KEYS | CLIP_KEYS}


def test_no_logger_warns_once(tmp_path: Path) -> None:
    cb = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [cb], False, max_steps=4)
    with pytest.warns(UserWarning, match="GradientNormMonitor: the Trainer has no logger") as record:
        trainer.fit(TinyLM())
    assert sum("GradientNormMonitor" in str(w.message) for w in record) == 1
    assert cb.state_dict()["nonfinite_total"] == 0  # still measured (totals survive for checkpoints)


def test_no_host_sync_in_count_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Count mode never reads a device value on the host from the callback's own code (the one transfer per logging
    step happens in ``to_host``); skip mode reads exactly one value per optimizer step."""
    calls: list[str] = []
    source = grad_norm_module.__file__

    def spy(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == source:
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    to_host_calls: list[int] = []
    original_to_host = grad_norm_module.to_host

    def counting_to_host(metrics):
        to_host_calls.append(1)
        return original_to_host(metrics)

    monkeypatch.setattr(grad_norm_module, "to_host", counting_to_host)

    make_trainer(tmp_path / "count", [GradientNormMonitor(per_layer_depth=2)], max_steps=6, log_every_n_steps=3).fit(
        TinyLM()
    )
    assert calls == []
    assert len(to_host_calls) == 2  # logging steps 2 and 5 only

    calls.clear()
    make_trainer(tmp_path / "skip", [GradientNormMonitor(on_nonfinite="skip")], max_steps=6, log_every_n_steps=3).fit(
        TinyLM()
    )
    assert calls == ["__bool__"] * 6


# ----------------------------------------------------------------------------------------------------------------
# (g): two processes, DDP and FSDP2 (ModelParallelStrategy) on CPU with gloo

_DIST_SCRIPT = """
import sys
import torch
import lightning as L

from callback_helpers import FullyShardLayers, TinyLM, make_loggers, two_process_strategy
from lightning_cs336.callbacks.grad_norm import GradientNormMonitor

STRATEGY = {strategy!r}
ON_NONFINITE = {on_nonfinite!r}
NAN_AT_STEP = 2  # with "skip": a NaN in rank 1's LOCAL shard of one gradient only


class PerRankData(TinyLM):
    # Lightning's automatic DistributedSampler always shuffles training data; instead rank r takes samples r, r+2, ...
    # in order, so each step's two rank batches together are exactly the single-process batch of 8.
    def train_dataloader(self):
        from torch.utils.data import DataLoader, Subset
        from callback_helpers import RandomTokens

        data = RandomTokens(64, self.hparams.seq_len, self.hparams.vocab_size)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=self.hparams.batch_size)


class Sharded(FullyShardLayers, PerRankData):
    def on_after_backward(self):
        if ON_NONFINITE == "skip" and self.trainer.global_step == NAN_AT_STEP and self.global_rank == 1:
            grad = self.layers[0].weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")


torch.manual_seed(0)
model = (Sharded if STRATEGY == "fsdp2" else PerRankData)(batch_size=4)  # per rank: 2 x 4 = the global batch of 8
strategy = two_process_strategy(STRATEGY)
trainer = L.Trainer(
    default_root_dir={root!r},
    accelerator="cpu",
    devices=2,
    strategy=strategy,
    max_steps=4,
    log_every_n_steps=1,
    logger=make_loggers({root!r}, ("wandb",)),
    callbacks=[GradientNormMonitor(per_layer_depth=2, log_every_n_steps=2, on_nonfinite=ON_NONFINITE)],
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
    limit_val_batches=0,
    use_distributed_sampler=False,
    gradient_clip_val=0.6,
)
trainer.fit(model)
import wandb

if wandb.run is not None:
    wandb.finish()
"""


def _single_process_reference(
    steps: int, clip: float, skip_step: int | None = None
) -> tuple[list[float], list[dict[str, float]]]:
    """Plain PyTorch on the GLOBAL batch (both ranks' samples): total and per-group norms before clipping."""
    torch.manual_seed(0)
    model = TinyLM(batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=model.hparams.lr)
    totals, groups = [], []
    for step, (x, y) in enumerate(model.train_dataloader()):
        if step == steps:
            break
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        totals.append(_total_norm([p.grad for p in model.parameters()]))
        by_group: dict[str, list[torch.Tensor]] = {}
        for name, p in model.named_parameters():
            by_group.setdefault(grad_norm_module._group_of(name, 2), []).append(p.grad)
        groups.append({g: _total_norm(gs) for g, gs in by_group.items()})
        if step != skip_step:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return totals, groups


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "on_nonfinite"), [("ddp", "count"), ("fsdp2", "count"), ("fsdp2", "skip")])
def test_two_process(tmp_path: Path, wandb_env: Path, strategy: str, on_nonfinite: str) -> None:
    """The logged norms equal single-process norms on the global batch: DDP (no collective: gradients are already
    all-reduced) and FSDP2 (local shard squares + one all_reduce); with "skip", a NaN in ONE rank's shard skips the
    step on every rank."""
    root = tmp_path / "run"
    source = _DIST_SCRIPT.format(strategy=strategy, root=str(root), on_nonfinite=on_nonfinite)
    run_script(tmp_path, source)

    from lightning_cs336.wandb_reader import find_runs, latest_run

    # Exactly one W&B run for the whole job (rank 0 only), wherever it could have been written.
    assert len(find_runs(tmp_path)) == 1
    run = latest_run(root, wait_s=10)
    skip_step = 2 if on_nonfinite == "skip" else None
    totals, groups = _single_process_reference(steps=4, clip=0.6, skip_step=skip_step)
    logged = _wandb_series(run, "grad/norm_total")
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(totals[step], rel=1e-5)
        for group in GROUPS_DEPTH2:
            assert _wandb_series(run, "grad/norm/" + group)[step] == pytest.approx(groups[step][group], rel=1e-5)
        fired = [totals[s] + 1e-6 > 0.6 and s != skip_step for s in (step - 1, step)]
        assert _wandb_series(run, "grad/clip_fraction")[step] == pytest.approx(sum(fired) / 2)
        assert _wandb_series(run, "grad/norm_total_clipped")[step] == pytest.approx(min(totals[step], 0.6), rel=1e-5)
    expected_nonfinite = {1: 0, 3: 1} if on_nonfinite == "skip" else {1: 0, 3: 0}
    assert _wandb_series(run, "grad/nonfinite_count") == expected_nonfinite
