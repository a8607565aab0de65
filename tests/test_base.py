"""The step clock, the shared interval semantics and the small helpers of ``callbacks/_base.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from callback_helpers import TinyLM, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_cs336.callbacks import HistogramLogger, StepClock, TelemetryCallback, TextSampleLogger
from lightning_cs336.callbacks._base import check_positive_int, count_batch, local_tensor
from lightning_cs336.callbacks._sinks import json_safe


class ClockProbe(Callback):
    """Records, per training batch, what the suite's clock answers in each hook."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.clock = StepClock(log_every_n_steps)
        self.rows: list[tuple[int, bool, bool, int]] = []
        self.before_step: list[int] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        assert self.clock.steps_optimizer(trainer)  # by definition, in this hook
        self.before_step.append(self.clock.step(trainer))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.rows.append(
            (self.clock.step(trainer), self.clock.steps_optimizer(trainer), self.clock.is_logging_step(trainer),
             trainer.global_step)
        )  # fmt: skip


def test_clock_under_gradient_accumulation(tmp_path: Path) -> None:
    probe = ClockProbe(log_every_n_steps=2)
    make_trainer(tmp_path, [probe], max_steps=4, accumulate_grad_batches=3).fit(TinyLM())
    # 8 batches an epoch: steps after batches 3, 6, 8 (the epoch's last batch steps even mid-accumulation), 11.
    assert len(probe.rows) == 11
    assert [r[1] for r in probe.rows[:8]] == [False, False, True, False, False, True, False, True]
    stepping = [r for r in probe.rows if r[1]]
    assert [r[0] for r in stepping] == [0, 1, 2, 3]  # the step axis: steps taken before the batch
    assert [r[3] for r in stepping] == [1, 2, 3, 4]  # global_step has advanced by then
    assert all(not r[2] for r in probe.rows if not r[1])  # a micro-batch never logs
    assert [r[0] for r in probe.rows if r[2]] == [1, 3]  # (step + 1) % 2 == 0, Lightning's rule
    assert probe.before_step == [0, 1, 2, 3]


def test_clock_follows_the_trainer_and_zero_never_logs(tmp_path: Path) -> None:
    follow, never = ClockProbe(None), ClockProbe(0)
    make_trainer(tmp_path, [follow, never], max_steps=6, log_every_n_steps=3).fit(TinyLM())
    assert [r[0] for r in follow.rows if r[2]] == [2, 5]
    assert not any(r[2] for r in never.rows)
    assert follow.clock.interval(make_trainer(tmp_path, [], log_every_n_steps=7)) == 7


def test_clock_logs_on_the_step_the_trainer_stops(tmp_path: Path) -> None:
    class StopAt(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                trainer.should_stop = True

    probe = ClockProbe(log_every_n_steps=100)
    make_trainer(tmp_path, [StopAt(), probe], max_steps=10).fit(TinyLM())
    assert [r[0] for r in probe.rows if r[2]] == [2]


def test_one_interval_name_and_deprecated_alias() -> None:
    assert HistogramLogger(log_every_n_steps=7).log_every_n_steps == 7
    with pytest.deprecated_call(match="every_n_steps"):
        old = HistogramLogger(every_n_steps=7)
    assert old.log_every_n_steps == old.every_n_steps == 7
    with pytest.deprecated_call():
        end_only = TextSampleLogger(every_n_steps=None)  # the old "only at the end"
    assert end_only.log_every_n_steps == 0
    assert TextSampleLogger(log_every_n_steps=0).log_every_n_steps == 0
    assert TextSampleLogger(log_every_n_steps=None).log_every_n_steps is None  # follows the Trainer, as everywhere
    with pytest.raises(ValueError, match=r"log_every_n_steps must be a positive integer or None, got 0"):
        HistogramLogger(log_every_n_steps=0)  # 0 only where an end-of-training record exists
    with pytest.raises(ValueError, match=r"log_every_n_steps must be a positive integer or 0 or None, got -1"):
        TextSampleLogger(log_every_n_steps=-1)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['every_n_step'\\]"):
        TextSampleLogger(every_n_step=3)


def test_end_only_samples_once(tmp_path: Path) -> None:
    from callback_helpers import make_loggers

    sampler = TextSampleLogger(log_every_n_steps=0, prompts=["ab"], max_new_tokens=2)
    make_trainer(tmp_path, [sampler], make_loggers(tmp_path, ("csv",)), max_steps=4).fit(TinyLM())
    assert [row[0] for row in sampler.rows] == [4]


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "5"])
def test_check_positive_int_rejects_and_repeats_the_value(value: Any) -> None:
    with pytest.raises(ValueError, match=f"x must be a positive integer, got {value!r}"):
        check_positive_int("x", value)


def test_check_positive_int_accepts() -> None:
    assert check_positive_int("x", 3) == 3
    assert check_positive_int("x", None, optional=True) is None
    assert check_positive_int("x", 0, zero=True) == 0


def test_count_batch_and_json_safe_and_local_tensor() -> None:
    x = torch.zeros(4, 16, dtype=torch.long)
    assert count_batch((x, x)) == (4, 64)
    assert count_batch({"input_ids": x}) == (4, 64)
    assert count_batch(["no tensors"]) is None
    assert json_safe({"a": torch.tensor(2.5), "b": float("nan"), "c": (1, Path("p"))}) == {
        "a": 2.5,
        "b": "nan",
        "c": [1, "p"],
    }
    t = torch.ones(3, requires_grad=True)
    assert not local_tensor(t).requires_grad and torch.equal(local_tensor(t), t.detach())


def test_base_warns_without_logger(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="TelemetryCallback: the Trainer has no logger"):
        make_trainer(tmp_path, [TelemetryCallback()], max_steps=1).fit(TinyLM())
