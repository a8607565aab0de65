"""Tests for StepTimeMonitor: a slow data loader (the input-bound warning fires), step-time jitter, a resume in the
middle of a window. Two DDP ranks with one slowed (the slowest rank reported and warned about) share one DDP launch
with the stability guard's skip test: ``tests/test_stability.py::test_two_process_ddp_skip_and_straggler``.

Single-process runs swap the module's ``time`` for a fake clock that only moves when the test model "sleeps" on it
(in the DataLoader's collate and in the training step), so the attribution is exact whatever the machine's load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from callback_helpers import RandomTokens, TinyLM, finish_and_read, make_loggers, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

import lightning_cs336.callbacks.step_time as step_time
from lightning_cs336.callbacks import StepTimeMonitor


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(step_time, "time", fake)
    return fake


class TimedLM(TinyLM):
    """Each fetch takes ``fetch_sec`` fake seconds; step ``i`` takes ``step_secs[i % len]`` (inside forward)."""

    clock: FakeTime
    fetch_sec = 0.001
    step_secs = (0.01,)

    def train_dataloader(self) -> DataLoader:
        def collate(items: list) -> Any:
            self.clock.sleep(self.fetch_sec)
            return default_collate(items)

        data = RandomTokens(64, self.hparams.seq_len, self.hparams.vocab_size)
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=collate)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.clock.sleep(self.step_secs[self.trainer.global_step % len(self.step_secs)])
        return super().training_step(batch, batch_idx)


def _model(clock: FakeTime, **attrs: Any) -> TimedLM:
    model = TimedLM()
    model.clock = clock
    for k, v in attrs.items():
        setattr(model, k, v)
    return model


def _series(run, key: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in run.history_of(key)}


def _messages(records) -> list[str]:
    return [str(w.message) for w in records if str(w.message).startswith("StepTimeMonitor")]


def _fit(tmp_path: Path, callback: StepTimeMonitor, model: TinyLM, **kwargs: Any):
    kwargs.setdefault("max_steps", 7)
    kwargs.setdefault("log_every_n_steps", 3)
    trainer = make_trainer(tmp_path, [callback], make_loggers(tmp_path), limit_val_batches=0, **kwargs)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model)
    return finish_and_read(tmp_path), _messages(records)


def test_slow_data_loader_is_input_bound(tmp_path: Path, clock: FakeTime) -> None:
    run, messages = _fit(tmp_path, StepTimeMonitor(), _model(clock, fetch_sec=0.05))
    # Logging steps 2 and 5. The fit's first fetch precedes the first batch: not in a gap.
    assert _series(run, "time/data_wait_pct") == {2: pytest.approx(100 * 0.1 / 0.13), 5: pytest.approx(100 * 5 / 6)}
    assert _series(run, "time/input_bound") == {2: 1.0, 5: 1.0}
    assert len(messages) == 1 and "input-bound" in messages[0] and "waited for data more than 50%" in messages[0]


def test_fast_data_loader_is_not_input_bound(tmp_path: Path, clock: FakeTime) -> None:
    run, messages = _fit(tmp_path, StepTimeMonitor(), _model(clock, fetch_sec=0.002))
    assert _series(run, "time/input_bound") == {2: 0.0, 5: 0.0}
    assert messages == []
    # Window 0-2: two timed gaps of 2 ms over 3 steps of 10 ms; window 3-5: three gaps.
    assert _series(run, "time/data_wait_pct") == {2: pytest.approx(100 * 0.004 / 0.034),
                                                  5: pytest.approx(100 * 0.006 / 0.036)}  # fmt: skip
    keys = {k for row in run.history for k in row}
    assert not any(k.startswith(("time/rank/", "memory/rank/")) for k in keys)  # one rank: nothing to compare


def test_jitter_percentiles(tmp_path: Path, clock: FakeTime) -> None:
    steps = (0.010, 0.020, 0.030, 0.040, 0.100)
    run, _ = _fit(tmp_path, StepTimeMonitor(), _model(clock, step_secs=steps), max_steps=5, log_every_n_steps=5)
    assert _series(run, "time/step_ms_p50") == {4: pytest.approx(30.0)}
    assert _series(run, "time/step_ms_p95") == {4: pytest.approx(100.0)}
    assert _series(run, "time/step_ms_max") == {4: pytest.approx(100.0)}


def test_resume_in_the_middle_of_a_window(tmp_path: Path, clock: FakeTime) -> None:
    """Steps 0-4 take 30 ms, the checkpoint is written after step 4 (logging steps 3, 7), the resumed steps take
    10 ms: the resumed run's first window (steps 4-7) holds the restored 30 ms step."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first = make_trainer(tmp_path / "a", [StepTimeMonitor(), ckpt], max_steps=6, log_every_n_steps=4,
                         limit_val_batches=0, enable_checkpointing=True)  # fmt: skip
    first.fit(_model(clock, step_secs=(0.03,)))
    path = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    (state,) = [v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "StepTime" in k]
    assert [row[0] for row in state["pending"]] == [pytest.approx(0.03)]
    trainer = make_trainer(tmp_path / "b", [StepTimeMonitor()], make_loggers(tmp_path / "b"), max_steps=8,
                           log_every_n_steps=4, limit_val_batches=0)  # fmt: skip
    trainer.fit(_model(clock, step_secs=(0.01,)), ckpt_path=path)
    run = finish_and_read(tmp_path / "b")
    assert _series(run, "time/step_ms_max") == {7: pytest.approx(30.0)}
    assert _series(run, "time/step_ms_p50") == {7: pytest.approx(10.0)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_bound_pct": 0}, r"input_bound_pct must be a number in \(0, 100\), got 0"),
        ({"input_bound_pct": "50"}, r"input_bound_pct must be a number in \(0, 100\), got '50'"),
        ({"straggler_windows": 0}, "straggler_windows must be a positive integer, got 0"),
        ({"straggler_margin": -0.1}, "straggler_margin must be a non-negative number, got -0.1"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StepTimeMonitor(**kwargs)


def test_every_key_is_documented() -> None:
    for key in StepTimeMonitor.METRIC_KEYS:
        assert f"``{key}``" in StepTimeMonitor.__doc__
