"""Tests for StabilityMonitor: a poisoned batch under each policy with a real Trainer and real offline W&B runs read
back from disk, resume in the middle of a window, and skip under two-process DDP (both ranks skip the same step)."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from callback_helpers import TinyLM, finish_and_read, make_loggers, make_trainer, run_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_cs336.callbacks.stability as stability_module
from lightning_cs336.callbacks import GradientNormMonitor, StabilityMonitor

POISON_STEP = 5


class PoisonLM(TinyLM):
    """TinyLM whose batch at optimizer step ``POISON_STEP`` is poisoned: its loss is multiplied by ``factor`` (a
    loss and gradient spike) or made NaN. Configure through attributes (constructor arguments go to hparams)."""

    poison: str = "spike"  # "spike" | "nan"
    poison_step: int = POISON_STEP

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.poison_step:
            loss = loss * 50.0 if self.poison == "spike" else loss * float("nan")
        return loss


class WeightsAround(Callback):
    """Copies of the weights before and after each optimizer step, by step."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])


def _series(run, key: str) -> dict[int, float]:
    return {int(step): float(value) for step, value in run.history_of(key)}


def _guard(**kwargs: Any) -> StabilityMonitor:
    kwargs.setdefault("warmup_steps", 3)
    kwargs.setdefault("window", 16)
    return StabilityMonitor(**kwargs)


def _fit(tmp_path: Path, callbacks: list, model: TinyLM | None = None, **kwargs: Any):
    kwargs.setdefault("max_steps", 8)
    kwargs.setdefault("log_every_n_steps", 2)
    trainer = make_trainer(tmp_path, callbacks, make_loggers(tmp_path), limit_val_batches=0, **kwargs)
    trainer.fit(model or PoisonLM())
    return trainer, finish_and_read(tmp_path)


def _spike_rows(run) -> list[dict[str, Any]]:
    table = run.tables[StabilityMonitor.TABLE_KEY]
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


# ---------------------------------------------------------------------------------------------------------------
# construction and documentation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_policy": "halt"}, "loss_policy must be one of .* got 'halt'"),
        ({"grad_norm_policy": 1}, "grad_norm_policy must be one of .* got 1"),
        ({"nonfinite_policy": "ignore"}, "nonfinite_policy must be one of .* got 'ignore'"),
        ({"rule": "zscore"}, "rule must be 'sigma' or 'ratio', got 'zscore'"),
        ({"sigma": -1.0}, "sigma must be a positive number, got -1.0"),
        ({"ratio": math.nan}, "ratio must be a positive number, got nan"),
        ({"window": 1}, "window must be at least 2 .* got 1"),
        ({"warmup_steps": -3}, "warmup_steps must be .* got -3"),
        ({"max_rollbacks": 1.5}, "max_rollbacks must be .* got 1.5"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StabilityMonitor(**kwargs)


def test_every_key_is_documented() -> None:
    for key in StabilityMonitor.METRIC_KEYS:
        assert f"``{key}``" in StabilityMonitor.__doc__


# ---------------------------------------------------------------------------------------------------------------
# the policies, each on a poisoned batch


def test_log_policy_records_the_spike_and_trains_on(tmp_path: Path) -> None:
    weights = WeightsAround()
    _, run = _fit(tmp_path, [_guard(), weights])
    assert _series(run, "stability/spikes_total") == {1: 0, 3: 0, 5: 1, 7: 1}
    assert _series(run, "stability/spikes_count") == {1: 0, 3: 0, 5: 1, 7: 0}
    assert _series(run, "stability/last_spike_step") == {5: POISON_STEP, 7: POISON_STEP}
    assert _series(run, "stability/skipped_total")[7] == 0
    assert _series(run, "stability/loss_score")[5] > 6.0
    # Both rules fired on the poisoned batch (x50 loss -> x50 gradients); rows name the step and the batch.
    rows = _spike_rows(run)
    assert {r["rule"] for r in rows} == {"loss", "grad_norm"}
    assert all(r["step"] == POISON_STEP and r["batch_idx"] == str(POISON_STEP) and r["action"] == "log" for r in rows)
    loss_row = next(r for r in rows if r["rule"] == "loss")
    assert loss_row["value"] > loss_row["threshold"] > 0
    assert not torch.equal(weights.before[POISON_STEP], weights.after[POISON_STEP])  # the step was taken


def test_skip_policy_skips_exactly_the_poisoned_step(tmp_path: Path) -> None:
    weights = WeightsAround()
    trainer, run = _fit(tmp_path, [_guard(loss_policy="skip"), weights])
    assert torch.equal(weights.before[POISON_STEP], weights.after[POISON_STEP])
    for step in (POISON_STEP - 1, POISON_STEP + 1):
        assert not torch.equal(weights.before[step], weights.after[step])
    assert trainer.global_step == 8  # the run goes on to max_steps
    assert _series(run, "stability/skipped_total") == {1: 0, 3: 0, 5: 1, 7: 1}
    actions = {r["rule"]: r["action"] for r in _spike_rows(run)}
    assert actions == {"loss": "skip", "grad_norm": "log"}


def test_nonfinite_policy_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    model = PoisonLM()
    model.poison = "nan"
    guard = _guard(nonfinite_policy="stop")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, run = _fit(tmp_path, [guard, ckpt], model, enable_checkpointing=True, max_steps=20)
    assert trainer.should_stop and trainer.global_step < 20
    reason = guard.stopped_reason
    assert reason is not None and reason.startswith(
        f"non-finite loss and non-finite grad norm spike at step {POISON_STEP}"
    )
    assert "train/loss=nan" in reason and "last good checkpoint is kept" in reason
    assert sum(reason in str(w.message) for w in record) == 1
    # last.ckpt is the step-4 state (saved before the NaN), nothing written after the stop.
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    assert _series(run, "stability/stopped") == {POISON_STEP: 1.0}
    assert _series(run, "stability/nonfinite_total")[POISON_STEP] == 1
    assert {r["action"] for r in _spike_rows(run)} == {"stop"}


def test_rollback_restores_the_checkpoint_and_goes_on(tmp_path: Path) -> None:
    weights = WeightsAround()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    guard = _guard(loss_policy="rollback")
    trainer, run = _fit(tmp_path, [guard, weights, ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"]
    restored = torch.cat([v.flatten() for v in saved.values()])
    # After step 5 the weights are those of the step-4 checkpoint (the state before steps 4 and 5).
    assert torch.equal(weights.after[POISON_STEP], restored)
    assert not torch.equal(weights.before[POISON_STEP], restored)
    assert trainer.global_step == 8 and guard.stopped_reason is None
    assert _series(run, "stability/rollbacks_total") == {1: 0, 3: 0, 5: 1, 7: 1}


def test_rollback_without_checkpoint_stops(tmp_path: Path) -> None:
    guard = _guard(loss_policy="rollback")
    trainer, _ = _fit(tmp_path, [guard], max_steps=20)
    assert trainer.global_step < 20
    assert "no checkpoint to roll back to" in guard.stopped_reason


# ---------------------------------------------------------------------------------------------------------------
# sharing the gradient norm, cost, resume


class CountingGNM(GradientNormMonitor):
    measured = 0

    def _measure(self, trainer, pl_module, optimizer):
        fresh = self._fresh
        m = super()._measure(trainer, pl_module, optimizer)
        if m is not fresh:
            CountingGNM.measured += 1
        return m


def test_gradient_norm_is_measured_once_with_either_order(tmp_path: Path) -> None:
    for i, order in enumerate(("guard first", "monitor first")):
        CountingGNM.measured = 0
        gnm, guard = CountingGNM(), _guard()
        callbacks = [guard, gnm] if order == "guard first" else [gnm, guard]
        _, run = _fit(tmp_path / str(i), callbacks)
        assert CountingGNM.measured == 8, order
        assert _series(run, "stability/spikes_total")[5] == 1
        # The shared value is the logged one.
        assert _series(run, "grad/norm_total")[POISON_STEP] == pytest.approx(_spike_rows(run)[-1]["value"], rel=1e-6)


def test_log_policy_reads_nothing_on_the_host_between_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    source = stability_module.__file__

    def spy(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == source:
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    make_trainer(tmp_path / "log", [_guard()], max_steps=6, log_every_n_steps=3).fit(PoisonLM())
    assert calls == ["cpu", "tolist"] * 2  # one transfer at each of the logging steps 2 and 5
    calls.clear()
    make_trainer(tmp_path / "skip", [_guard(loss_policy="skip")], max_steps=6, log_every_n_steps=3).fit(PoisonLM())
    # One scalar per step (the decision), the spike step's details, one transfer per logging step.
    assert calls.count("__int__") == 6 and calls.count("cpu") == 2


def test_resume_in_the_middle_of_a_window(tmp_path: Path) -> None:
    """The spike at step 5 is pending (logging steps 3, 7) when the checkpoint at step 6 is written: the resumed run
    logs it in its first window, and the windows continue from the checkpoint."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    first = make_trainer(tmp_path / "a", [_guard(), ckpt], make_loggers(tmp_path / "a", ("csv",)), max_steps=8,
                         log_every_n_steps=4, limit_val_batches=0, enable_checkpointing=True)  # fmt: skip
    first.fit(PoisonLM())
    path = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("StabilityMonitor")]
    assert [p[0] for p in saved["pending"]] == [4, 5] and len(saved["windows"]["loss"]) == 4  # step 3 checked

    guard = _guard()
    second = make_trainer(tmp_path / "b", [guard], make_loggers(tmp_path / "b"), max_steps=12, log_every_n_steps=4,
                          limit_val_batches=0)  # fmt: skip
    second.fit(PoisonLM(), ckpt_path=path)
    run = finish_and_read(tmp_path / "b")
    assert _series(run, "stability/spikes_count") == {7: 1, 11: 0}
    assert _series(run, "stability/spikes_total") == {7: 1, 11: 1}
    assert {r["step"] for r in _spike_rows(run)} == {POISON_STEP}
    assert len(guard.state_dict()["windows"]["loss"]) == 12  # 4 + 2 restored + 6 new (window 16)


def test_state_dict_round_trip() -> None:
    guard = _guard()
    guard.spikes_total, guard.skipped_total, guard.last_spike_step = 3, 2, 17
    guard._rows = [[17, 0, "3", "loss", 9.0, 5.0, 8.0, "skip"]]
    fresh = _guard()
    fresh.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert fresh.state_dict() == guard.state_dict()
    fresh.load_state_dict({})


# ---------------------------------------------------------------------------------------------------------------
# two processes: skip under DDP

_DDP_SCRIPT = """
import json, sys, time
import torch
import lightning as L
from callback_helpers import TinyLM, make_loggers
from lightning.pytorch.callbacks import Callback
from lightning_cs336.callbacks import StabilityMonitor, StepTimeMonitor

OUT = sys.argv[1]


class PoisonedSlowRankOne(TinyLM):
    # Only rank 1's batch at step 5 is poisoned: the decision must still be taken (and the same) on both ranks.
    # Rank 1 also computes slowly, so StepTimeMonitor must name it the straggler (one DDP launch for both checks).
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            time.sleep(0.1)
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == 5 and self.global_rank == 1:
            loss = loss * 50.0
        return loss


class Record(Callback):
    def __init__(self):
        self.changed = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.changed[trainer.global_step - 1] = not torch.equal(self.before, after)

    def on_train_end(self, trainer, pl_module):
        guard = next(c for c in trainer.callbacks if isinstance(c, StabilityMonitor))
        with open(f"{OUT}/rank{trainer.global_rank}.json", "w") as fh:
            json.dump({"changed": self.changed, "skipped": guard.skipped_total}, fh)


trainer = L.Trainer(
    default_root_dir=OUT, accelerator="cpu", devices=2, strategy="ddp", max_steps=8, log_every_n_steps=2,
    logger=make_loggers(OUT, ("wandb",)), enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False, limit_val_batches=0,
    callbacks=[
        StabilityMonitor(loss_policy="skip", grad_norm_policy="skip", warmup_steps=3, window=16),
        StepTimeMonitor(straggler_windows=2),
        Record(),
    ],
)
trainer.fit(PoisonedSlowRankOne(batch_size=4))
import wandb

if wandb.run is not None:
    wandb.finish()
"""


@pytest.mark.slow
def test_two_process_ddp_skip_and_straggler(tmp_path: Path) -> None:
    """Two DDP ranks, rank 1 poisoned at step 5 and slowed on every step: both ranks skip exactly step 5 (the same
    decision everywhere), and StepTimeMonitor names rank 1 the slowest and warns once."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(tmp_path, _DDP_SCRIPT, args=(str(out),))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["changed"] == {str(s): s != POISON_STEP for s in range(8)}
        assert rank["skipped"] == 1
    from lightning_cs336.wandb_reader import latest_run

    run = latest_run(out, wait_s=10)
    rows = _spike_rows(run)
    assert {r["rule"]: r["action"] for r in rows} == {"loss": "skip", "grad_norm": "skip"}
    assert _series(run, "stability/skipped_total")[7] == 1
    # The straggler: rank 1 arrives last at backward's all-reduce (its forward holds the 100 ms sleep). No absolute
    # times are asserted: the machine may be loaded.
    assert _series(run, "time/rank/slowest") == {1: 1.0, 3: 1.0, 5: 1.0, 7: 1.0}
    forward_max, forward_min = _series(run, "time/rank/forward_ms_max"), _series(run, "time/rank/forward_ms_min")
    assert all(forward_max[s] > forward_min[s] for s in forward_max)
    assert all(v > 0 for v in _series(run, "memory/rank/min_gib").values())
    assert set(_series(run, "memory/rank/largest").values()) <= {0.0, 1.0}
    lines = [line for line in proc.stderr.splitlines() if "StepTimeMonitor: rank 1 was the slowest" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
