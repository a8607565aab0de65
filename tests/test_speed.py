"""Tests for SpeedMonitor: real Trainer runs with real offline W&B, CSV and TensorBoard loggers read back from disk.

Most runs swap the callback module's ``time`` for a fake clock that only moves when the test model "sleeps" on it
(in the DataLoader, the training step, validation, the checkpoint hook). The timed intervals are then exact whatever
the load on the machine, so the attribution (data wait vs. step vs. validation vs. checkpoint) is asserted exactly.
"""

from __future__ import annotations

import csv
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from callback_helpers import RandomTokens, TinyLM, finish_and_read, make_loggers, make_trainer
from callback_helpers import csv_rows as _csv_rows
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

import lightning_cs336.callbacks.speed as speed
from lightning_cs336.callbacks._base import first_tensor
from lightning_cs336.callbacks.speed import (
    PEAK_FLOPS,
    SpeedMonitor,
    lookup_peak_flops,
    precision_dtype,
    tf32_enabled,
)

TOKENS = 8 * 16  # TinyLM batches: 8 samples x 16 tokens
FETCH, STEP = 0.05, 0.01  # fake seconds per batch fetch and per training step
FAMILIES = ("time/", "throughput/")


class FakeTime:
    """Stands in for the ``time`` module inside ``speed``: ``perf_counter`` only advances through ``sleep``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(speed, "time", fake)
    return fake


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The CI machine has 2 cores shared with other test processes: oversubscribed intra-op threads make tiny steps
    # erratic. Restore the setting for other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TimedLM(TinyLM):
    """TinyLM whose fetch, step, validation step and checkpoint hook each "take" a set time on a FakeTime clock.

    Configure through attributes after construction (constructor arguments would land in the hyperparameters)."""

    clock: FakeTime | None = None
    fetch_sec = FETCH
    step_sec = STEP
    val_batch_sec = 0.0
    ckpt_sec = 0.0

    def _sleep(self, seconds: float) -> None:
        if self.clock is not None and seconds:
            self.clock.sleep(seconds)

    def train_dataloader(self) -> DataLoader:
        def collate(items: list) -> Any:
            self._sleep(self.fetch_sec)
            return default_collate(items)

        data = RandomTokens(64, self.hparams.seq_len, self.hparams.vocab_size)
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=collate)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._sleep(self.step_sec)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._sleep(self.val_batch_sec)
        super().validation_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._sleep(self.ckpt_sec)


def timed_lm(clock: FakeTime | None, with_hooks: bool = True, **times: float) -> TimedLM:
    model = TimedLM(with_hooks=with_hooks)
    model.clock = clock
    for name, value in times.items():
        setattr(model, name, value)
    return model


def _series(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _all(series: dict[int, float], expected: float) -> bool:
    """Every logged value equals ``expected`` (and there is at least one)."""
    return bool(series) and all(v == pytest.approx(expected) for v in series.values())


def _our_keys(keys: set[str], prefix: str = "") -> set[str]:
    return {k for k in keys if k.startswith(tuple(prefix + f for f in FAMILIES))}


def _speed_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in records if str(w.message).startswith("SpeedMonitor")]


def _fit(tmp_path: Path, callback: SpeedMonitor, model: L.LightningModule, kinds=("csv",), **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
    trainer = make_trainer(
        tmp_path, [callback, *kwargs.pop("extra_callbacks", [])], make_loggers(tmp_path, kinds), **kwargs
    )
    trainer.fit(model)
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# Documentation, construction, the peak table


def test_every_key_is_documented() -> None:
    doc = SpeedMonitor.__doc__
    table_keys = set(re.findall(r"^\s*``((?:time|throughput)/[a-z_/]+)``\s", doc, flags=re.MULTILINE))
    assert table_keys == set(SpeedMonitor.METRIC_KEYS)
    assert len(SpeedMonitor.METRIC_KEYS) == len(set(SpeedMonitor.METRIC_KEYS))
    for needle in ("Args:", "Example::", "class_path: lightning_cs336.callbacks.speed.SpeedMonitor"):
        assert needle in doc


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"peak_flops": 0}, r"peak_flops .* got 0"),
        ({"peak_flops": -1e12}, r"peak_flops .* got -1000000000000.0"),
        ({"peak_flops": "989e12"}, r"peak_flops .* got '989e12'"),
        ({"peak_flops": True}, r"peak_flops .* got True"),
        ({"peak_flops": math.inf}, r"peak_flops .* got inf"),
        ({"peak_flops_table": [1, 2]}, r"peak_flops_table .* got \[1, 2\]"),
        ({"peak_flops_table": {"h100": 989e12}}, r"peak_flops_table entry 'h100'"),
        ({"peak_flops_table": {"h100": {"bfloat16": 1e12}}}, r"dtype 'bfloat16'"),
        ({"peak_flops_table": {"h100": {"bf16": -5}}}, r"\['h100'\]\['bf16'\] .* got -5"),
        ({"peak_flops_table": {"--": {"bf16": 1e12}}}, r"entry '--'"),
        ({"batch_size_fn": 8}, r"batch_size_fn .* got 8"),
        ({"tokens_fn": "numel"}, r"tokens_fn .* got 'numel'"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps .* got 0"),
        ({"prefix": 3}, r"prefix .* got 3"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpeedMonitor(**kwargs)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),  # SXM5
        ("NVIDIA H100 80GB HBM3", "fp8", 1978.9e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H200 NVL", "fp16", 835.5e12),
        ("NVIDIA GH200 480GB", "bf16", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),  # not the A10 row
        ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
        ("NVIDIA A10G", "bf16", 125e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "fp8", 733e12),  # not the L4 or L40 row
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
        ("Tesla V100-PCIE-32GB", "fp16", 112e12),
        ("Tesla V100-SXM2-16GB", "tf32", 15.7e12),  # no TF32 cores: falls back to the FP32 rate
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
        ("Tesla T4", "fp16", 65e12),
        ("NVIDIA GeForce RTX 3090", "bf16", 71e12),
        ("NVIDIA GeForce RTX 3090 Ti", "bf16", 80e12),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
        ("AMD Instinct MI300X", "bf16", 1307.4e12),
        ("NVIDIA H100 80GB HBM3", None, None),
        ("Some Future Accelerator", "bf16", None),
        ("cpu", "fp32", None),
    ],
)
def test_peak_table_lookup(name: str, dtype: str | None, expected: float | None) -> None:
    got = lookup_peak_flops(name, dtype)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_peak_table_is_dense_and_well_formed() -> None:
    for key, row in PEAK_FLOPS.items():
        assert set(row) <= set(speed.DTYPES), key
        assert all(1e12 <= v <= 1e16 for v in row.values()), key
        # Low precision is never slower than fp32 where both are listed.
        assert all(row[d] >= row["fp32"] for d in ("tf32", "bf16", "fp16", "fp8") if d in row and "fp32" in row), key


def test_user_table_wins_and_falls_back() -> None:
    table = {"a10g": {"bf16": 70e12}, "my chip": {"fp8": 5e15}}
    assert lookup_peak_flops("NVIDIA A10G", "bf16", table) == 70e12
    assert lookup_peak_flops("NVIDIA A10G", "fp32", table) == 31.2e12  # dtype missing in the user row: built-in
    assert lookup_peak_flops("ACME My Chip v2", "fp8", table) == 5e15
    # A user row wins over a more specific built-in row.
    assert lookup_peak_flops("NVIDIA H100 PCIe", "bf16", {"h100": {"bf16": 1e15}}) == 1e15


@pytest.mark.parametrize(
    ("precision", "tf32", "expected"),
    [
        ("bf16-mixed", False, "bf16"),
        ("bf16-true", False, "bf16"),
        ("16-mixed", False, "fp16"),
        ("16-true", False, "fp16"),
        ("32-true", False, "fp32"),
        ("32-true", True, "tf32"),
        ("64-true", False, "fp64"),
        ("transformer-engine", False, "fp8"),
        ("transformer-engine-float16", False, "fp8"),
        ("nf4", False, None),
    ],
)
def test_precision_dtype(precision: str, tf32: bool, expected: str | None) -> None:
    assert precision_dtype(precision, tf32=tf32) == expected


def test_tf32_detection_follows_matmul_precision() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tf32_enabled() is False
        torch.set_float32_matmul_precision("high")
        assert tf32_enabled() is True
    finally:
        torch.set_float32_matmul_precision(before)


def test_yaml_config_instantiates() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    cfg = parser.parse_object(
        {
            "callbacks": [
                {
                    "class_path": "lightning_cs336.callbacks.speed.SpeedMonitor",
                    "init_args": {
                        "log_every_n_steps": 5,
                        "peak_flops": 989.4e12,
                        "peak_flops_table": {"a10g": {"bf16": 70e12}},
                    },
                }
            ]
        }
    )
    (callback,) = parser.instantiate_classes(cfg).callbacks
    assert isinstance(callback, SpeedMonitor)
    assert callback.peak_flops == 989.4e12 and callback.peak_flops_table == {"a10g": {"bf16": 70e12}}


def test_first_tensor_of_nested_batches() -> None:
    x = torch.zeros(4, 7)
    assert first_tensor({"meta": ["a"], "input_ids": x, "labels": torch.ones(2)}) is x
    assert first_tensor([("s", [x])]) is x
    assert first_tensor({"a": "no tensors"}) is None


# ---------------------------------------------------------------------------------------------------------------
# Logged keys and values


def test_keys_match_documentation_on_every_logger(tmp_path: Path, wandb_env: Path, clock: FakeTime) -> None:
    """Every documented key shows up in W&B, CSV and TensorBoard when everything is measurable, and nothing else."""
    model = timed_lm(clock, ckpt_sec=0.3, val_batch_sec=0.2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = _fit(
        tmp_path,
        SpeedMonitor(peak_flops=1e12),
        model,
        kinds=("wandb", "csv", "tensorboard"),
        enable_checkpointing=True,
        extra_callbacks=[ckpt],
        limit_val_batches=2,
        val_check_interval=4,
    )
    run = finish_and_read(tmp_path)
    # throughput/mfu_error only replaces throughput/mfu when the MFU would exceed 100% (its own test below).
    documented = set(SpeedMonitor.METRIC_KEYS) - {"throughput/mfu_error"}
    assert _our_keys(run.keys()) == documented
    assert _our_keys(set(_csv_rows(trainer)[0])) == documented

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.loggers[2].log_dir))
    events.Reload()
    assert _our_keys(set(events.Tags()["scalars"])) == documented

    assert [s for s, _ in run.history_of("throughput/tokens_per_sec")] == [1, 3, 5]
    assert [v for _, v in run.history_of("throughput/tokens_total")] == [2 * TOKENS, 4 * TOKENS, 6 * TOKENS]
    assert [v for _, v in run.history_of("time/val_sec")] == pytest.approx([0.4])
    assert len(run.history_of("throughput/peak_tflops")) == 1


def test_window_averages_and_consistency(tmp_path: Path, clock: FakeTime) -> None:
    trainer = _fit(tmp_path, SpeedMonitor(), timed_lm(clock), max_steps=6, log_every_n_steps=2)
    rows = _csv_rows(trainer)
    step_ms, wait_ms = _series(rows, "time/step_ms"), _series(rows, "time/data_wait_ms")
    assert sorted(step_ms) == [1, 3, 5]  # logging steps only, on Lightning's own step axis
    assert set(_series(rows, "train/loss")) == set(step_ms)
    assert all(v == pytest.approx(1e3 * STEP) for v in step_ms.values())
    assert all(v == pytest.approx(1e3 * FETCH) for v in wait_ms.values())
    tokens = _series(rows, "throughput/tokens_per_sec")
    for step in step_ms:
        per_step_sec = (step_ms[step] + wait_ms[step]) / 1e3
        assert tokens[step] == pytest.approx(TOKENS / per_step_sec)
        assert _series(rows, "throughput/samples_per_sec")[step] == pytest.approx(8 / per_step_sec)
        assert _series(rows, "throughput/device/tokens_per_sec")[step] == pytest.approx(tokens[step])  # 1 device
    assert _series(rows, "throughput/tokens_total") == {1: 2 * TOKENS, 3: 4 * TOKENS, 5: 6 * TOKENS}
    assert _series(rows, "throughput/samples_total") == {1: 16, 3: 32, 5: 48}
    assert _series(rows, "time/train_total_min")[5] == pytest.approx(6 * (STEP + FETCH) / 60)


def test_real_clock_values_are_plausible(tmp_path: Path) -> None:
    """Without the fake clock: positive values, the same identities, and a real sleep in the DataLoader lands in
    the data wait (a sleep always lasts at least as long as asked)."""
    trainer = _fit(tmp_path, SpeedMonitor(log_every_n_steps=3), timed_lm(None), max_steps=6)
    rows = _csv_rows(trainer)
    step_ms, wait_ms = _series(rows, "time/step_ms"), _series(rows, "time/data_wait_ms")
    assert sorted(step_ms) == [2, 5] and all(v > 0 for v in step_ms.values())
    tokens = _series(rows, "throughput/tokens_per_sec")
    for step in step_ms:
        assert tokens[step] == pytest.approx(TOKENS * 1e3 / (step_ms[step] + wait_ms[step]))

    class SleepyLoader(TimedLM):
        def train_dataloader(self) -> DataLoader:
            def collate(items: list) -> Any:
                time.sleep(0.03)
                return default_collate(items)

            return DataLoader(RandomTokens(64, 16, 96), batch_size=8, collate_fn=collate)

    trainer = _fit(tmp_path / "sleepy", SpeedMonitor(log_every_n_steps=3), SleepyLoader(), max_steps=6)
    assert all(v >= 30 for v in _series(_csv_rows(trainer), "time/data_wait_ms").values())


def test_slow_dataloader_is_data_wait_not_step_time(tmp_path: Path, clock: FakeTime) -> None:
    trainer = _fit(tmp_path, SpeedMonitor(), timed_lm(clock, fetch_sec=0.5), max_steps=4)
    rows = _csv_rows(trainer)
    assert _all(_series(rows, "time/data_wait_ms"), 500.0)
    assert _all(_series(rows, "time/step_ms"), 1e3 * STEP)
    # Throughput counts the stall: the pipeline is the bottleneck.
    assert _series(rows, "throughput/tokens_per_sec")[3] == pytest.approx(TOKENS / (0.5 + STEP))


def test_validation_is_excluded_and_timed(tmp_path: Path, clock: FakeTime) -> None:
    fast = _fit(tmp_path / "noval", SpeedMonitor(), timed_lm(clock), max_steps=8)
    slow = _fit(
        tmp_path / "val",
        SpeedMonitor(),
        timed_lm(clock, val_batch_sec=1.0),
        max_steps=8,
        limit_val_batches=2,
        val_check_interval=2,
    )
    rows = _csv_rows(slow)
    assert _series(rows, "time/val_sec") == {
        1: pytest.approx(2.0),
        3: pytest.approx(2.0),
        5: pytest.approx(2.0),
        7: pytest.approx(2.0),
    }
    for key in ("throughput/tokens_per_sec", "time/step_ms", "time/data_wait_ms"):
        assert _series(rows, key) == pytest.approx(_series(_csv_rows(fast), key)), key
    # ETA = remaining steps x (train time per step + validation time so far per step).
    eta = _series(rows, "time/eta_min")
    # At step 3 (the 4th batch) one validation (2 s) has run: 0.5 s per step so far.
    assert eta[3] == pytest.approx(4 * (STEP + FETCH + 2.0 / 4) / 60)
    assert eta[7] == 0


def test_sanity_check_and_validate_are_not_timed(tmp_path: Path, clock: FakeTime) -> None:
    model = timed_lm(clock, val_batch_sec=1.0)
    trainer = _fit(
        tmp_path,
        SpeedMonitor(),
        model,
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        val_check_interval=2,
    )
    trainer.validate(model, verbose=False)
    # Only the validation inside fit (after the 2nd batch) is timed: not the sanity check, not trainer.validate.
    rows = _csv_rows(trainer)
    assert _series(rows, "time/val_sec") == {1: pytest.approx(1.0)}
    assert _all(_series(rows, "time/data_wait_ms"), 1e3 * FETCH)


def test_checkpoint_time_is_separated(tmp_path: Path, clock: FakeTime) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = _fit(
        tmp_path,
        SpeedMonitor(),
        timed_lm(clock, ckpt_sec=0.3),
        max_steps=6,
        enable_checkpointing=True,
        extra_callbacks=[ckpt],
    )
    rows = _csv_rows(trainer)
    # Saves after steps 2, 4 and 6 (global_step); each is reported at the next batch (steps 2, 4) or at train end.
    ckpt_sec = _series(rows, "time/checkpoint_sec")
    assert sorted(ckpt_sec) == [2, 4, 6] and _all(ckpt_sec, 0.3)
    # The fetch that shares the gap with the save stays data wait; step time and throughput are untouched.
    assert _all(_series(rows, "time/data_wait_ms"), 1e3 * FETCH)
    assert _all(_series(rows, "throughput/tokens_per_sec"), TOKENS / (STEP + FETCH))


def test_weights_only_checkpoint_is_noticed(tmp_path: Path, clock: FakeTime) -> None:
    # save_weights_only skips every callback's state_dict/on_save_checkpoint: ModelCheckpoint's record tells.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_weights_only=True, save_top_k=-1)
    trainer = _fit(
        tmp_path,
        SpeedMonitor(),
        timed_lm(clock, ckpt_sec=0.3),
        max_steps=4,
        enable_checkpointing=True,
        extra_callbacks=[ckpt],
    )
    rows = _csv_rows(trainer)
    assert _all(_series(rows, "time/checkpoint_sec"), 0.3)
    assert _all(_series(rows, "time/data_wait_ms"), 1e3 * FETCH)


def test_eta_decreases_to_zero(tmp_path: Path, clock: FakeTime) -> None:
    trainer = _fit(tmp_path, SpeedMonitor(), timed_lm(clock), max_steps=8)
    eta = _series(_csv_rows(trainer), "time/eta_min")
    assert sorted(eta) == [1, 3, 5, 7]
    assert list(eta.values()) == pytest.approx([(8 - s - 1) * (STEP + FETCH) / 60 for s in sorted(eta)])
    assert eta[7] == 0


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path, clock: FakeTime) -> None:
    trainer = _fit(tmp_path, SpeedMonitor(), timed_lm(clock), max_steps=4, accumulate_grad_batches=2)
    rows = _csv_rows(trainer)
    assert sorted(_series(rows, "time/step_ms")) == [1, 3]  # once per logging step, like train/loss
    assert _all(_series(rows, "time/step_ms"), 2e3 * STEP)  # two micro-batches
    assert _all(_series(rows, "time/data_wait_ms"), 2e3 * FETCH)
    assert _series(rows, "throughput/tokens_total") == {1: 4 * TOKENS, 3: 8 * TOKENS}
    assert _all(_series(rows, "throughput/tokens_per_sec"), TOKENS / (STEP + FETCH))


def test_custom_batch_counters(tmp_path: Path, clock: FakeTime) -> None:
    cb = SpeedMonitor(batch_size_fn=lambda batch: 3, tokens_fn=lambda batch: 100)
    rows = _csv_rows(_fit(tmp_path, cb, timed_lm(clock), max_steps=2))
    assert _series(rows, "throughput/tokens_total") == {1: 200}
    assert _series(rows, "throughput/samples_total") == {1: 6}
    assert _series(rows, "throughput/tokens_per_sec")[1] == pytest.approx(100 / (STEP + FETCH))


def test_prefix_and_interval(tmp_path: Path, clock: FakeTime) -> None:
    rows = _csv_rows(_fit(tmp_path, SpeedMonitor(log_every_n_steps=3, prefix="ft/"), timed_lm(clock), max_steps=6))
    keys = {k for r in rows for k, v in r.items() if v}
    assert _our_keys(keys) == set()
    assert _our_keys(keys, "ft/") == {
        "ft/" + k
        for k in SpeedMonitor.METRIC_KEYS
        if "mfu" not in k and "peak" not in k and "val" not in k and "checkpoint" not in k
    }
    assert sorted(_series(rows, "ft/time/step_ms")) == [2, 5]
    assert _series(rows, "ft/time/step_ms")[5] == pytest.approx(1e3 * STEP)


def test_no_logger_warns_once_and_does_not_time(tmp_path: Path) -> None:
    cb = SpeedMonitor()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [cb], loggers=False, max_steps=3)
        trainer.fit(timed_lm(None))
    messages = _speed_warnings(records)
    assert len(messages) == 1 and "no logger" in messages[0]
    assert cb.tokens_total == 3 * TOKENS and cb.train_sec_total == 0.0


class FakeEvent:
    """A ``torch.cuda.Event`` stand-in on the fake clock: ``record`` stamps the time, ``synchronize`` is counted."""

    def __init__(self, owner: EventTimedMonitor) -> None:
        self.owner, self.stamp = owner, None

    def record(self) -> None:
        self.stamp = self.owner.clock.now

    def synchronize(self) -> None:
        self.owner.syncs.append(self.stamp)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.stamp is not None and end.stamp is not None, "elapsed_time on an unrecorded event"
        assert self.owner.syncs and end.stamp <= self.owner.syncs[-1], "read before the window's sync"
        return (end.stamp - self.stamp) * 1e3


class EventTimedMonitor(SpeedMonitor):
    """SpeedMonitor taking its CUDA code path on CPU, with FakeEvents instead of CUDA events."""

    def __init__(self, clock: FakeTime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.syncs, self.events = clock, [], 0

    def _uses_device_events(self, trainer: L.Trainer) -> bool:
        return True

    def _new_event(self) -> FakeEvent:
        self.events += 1
        return FakeEvent(self)


def test_device_event_path_syncs_once_per_log(tmp_path: Path, clock: FakeTime) -> None:
    """The CUDA code path: one synchronize per logging step (on the window's last event), and the same numbers as
    the host clock, validation and checkpoints included."""
    cb = EventTimedMonitor(clock)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    model = timed_lm(clock, ckpt_sec=0.3, val_batch_sec=0.5)
    rows = _csv_rows(
        _fit(
            tmp_path,
            cb,
            model,
            max_steps=6,
            limit_val_batches=2,
            val_check_interval=2,
            enable_checkpointing=True,
            extra_callbacks=[ckpt],
        )
    )
    assert len(cb.syncs) == 3  # logging steps 1, 3, 5 only
    assert cb.events == 2 * 6  # one event per step start and end; none for validation or checkpoints
    assert _all(_series(rows, "time/step_ms"), 1e3 * STEP)
    assert _all(_series(rows, "time/data_wait_ms"), 1e3 * FETCH)
    assert _all(_series(rows, "time/val_sec"), 1.0)
    assert _all(_series(rows, "time/checkpoint_sec"), 0.3)
    assert _all(_series(rows, "throughput/tokens_per_sec"), TOKENS / (STEP + FETCH))


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU


def test_mfu_with_peak_flops_on_cpu(tmp_path: Path, clock: FakeTime) -> None:
    model = timed_lm(clock)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rows = _csv_rows(_fit(tmp_path, SpeedMonitor(peak_flops=2e12), model, max_steps=4))
    assert _speed_warnings(records) == []
    tflops = _series(rows, "throughput/device/tflops")
    expected = model.flops_per_token * TOKENS / (STEP + FETCH) / 1e12
    assert _all(tflops, expected)
    assert _series(rows, "throughput/mfu") == {1: pytest.approx(expected / 2), 3: pytest.approx(expected / 2)}
    assert _series(rows, "throughput/peak_tflops") == {1: 2.0}  # first log only


@pytest.mark.parametrize("accumulate", [1, 4])
def test_mfu_hand_count_with_gradient_accumulation(tmp_path: Path, clock: FakeTime, accumulate: int) -> None:
    """By hand: an optimizer step is ``accumulate`` micro-batches of 8 x 16 tokens, each fetched in FETCH and run in
    STEP fake seconds, so it does ``accumulate * 128 * flops_per_token`` FLOPs in ``accumulate * (STEP + FETCH)``
    seconds; the MFU is the same for any accumulation (nanoGPT issue 619, Lightning issue 19461)."""
    model = timed_lm(clock)
    peak = 1e9
    trainer = _fit(tmp_path, SpeedMonitor(peak_flops=peak), model, max_steps=4, accumulate_grad_batches=accumulate)
    rows = _csv_rows(trainer)
    flops_per_step = accumulate * TOKENS * model.flops_per_token
    seconds_per_step = accumulate * (STEP + FETCH)
    mfu = _series(rows, "throughput/mfu")
    assert sorted(mfu) == [1, 3]
    # The first window's first fetch happens before the fit's first batch (not timed): step 1 is the clean one.
    assert mfu[3] == pytest.approx(2 * flops_per_step / (2 * seconds_per_step) / peak)
    assert _series(rows, "throughput/tokens_total")[3] == 4 * accumulate * TOKENS


def test_mfu_above_one_is_an_error_not_a_value(tmp_path: Path, clock: FakeTime) -> None:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rows = _csv_rows(_fit(tmp_path, SpeedMonitor(peak_flops=1e6), timed_lm(clock), max_steps=4))
    keys = {k for r in rows for k, v in r.items() if v}
    assert "throughput/mfu" not in keys
    errors = _series(rows, "throughput/mfu_error")
    assert sorted(errors) == [1, 3] and all(v > 1 for v in errors.values())
    messages = [m for m in _speed_warnings(records) if "above 100%" in m]
    assert len(messages) == 1 and "peak_flops" in messages[0] and "flops_per_token" in messages[0]


def test_no_mfu_without_peak_one_warning(tmp_path: Path, clock: FakeTime) -> None:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rows = _csv_rows(_fit(tmp_path, SpeedMonitor(), timed_lm(clock), max_steps=6))
    messages = _speed_warnings(records)
    assert len(messages) == 1 and "no peak FLOP/s" in messages[0] and "peak_flops" in messages[0]
    keys = {k for r in rows for k, v in r.items() if v}
    assert "throughput/device/tflops" in keys
    assert "throughput/mfu" not in keys and "throughput/peak_tflops" not in keys


def test_no_flops_hooks_one_warning(tmp_path: Path, clock: FakeTime) -> None:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rows = _csv_rows(_fit(tmp_path, SpeedMonitor(peak_flops=1e12), timed_lm(clock, with_hooks=False), max_steps=4))
    messages = _speed_warnings(records)
    assert len(messages) == 1 and "flops_per_token" in messages[0]
    keys = {k for r in rows for k, v in r.items() if v}
    assert "throughput/device/tflops" not in keys and "throughput/mfu" not in keys
    assert "throughput/tokens_per_sec" in keys


@pytest.mark.parametrize("form", ["number", "callable", "tensor"])
def test_flops_per_batch_matches_flops_per_token(tmp_path: Path, clock: FakeTime, form: str) -> None:
    by_token = _series(
        _csv_rows(_fit(tmp_path / "tok", SpeedMonitor(), timed_lm(clock), max_steps=4)), "throughput/device/tflops"
    )
    model = timed_lm(clock)
    per_batch = model.flops_per_token * TOKENS
    model.flops_per_batch = {
        "number": per_batch,
        "callable": lambda batch: model.flops_per_token * batch[0].numel(),
        # A device value: summed on the device, read only at logging steps.
        "tensor": lambda batch: torch.tensor(float(model.flops_per_token * batch[0].numel())),
    }[form]
    by_batch = _series(
        _csv_rows(_fit(tmp_path / "batch", SpeedMonitor(), model, max_steps=4)), "throughput/device/tflops"
    )
    assert by_batch == pytest.approx(by_token)
    # flops_per_batch wins over flops_per_token.
    model = timed_lm(clock)
    model.flops_per_batch = 2 * model.flops_per_token * TOKENS
    doubled = _series(
        _csv_rows(_fit(tmp_path / "both", SpeedMonitor(), model, max_steps=4)), "throughput/device/tflops"
    )
    assert doubled == pytest.approx({s: 2 * v for s, v in by_token.items()})


def test_flops_per_token_callable(tmp_path: Path, clock: FakeTime) -> None:
    model = timed_lm(clock, with_hooks=False)
    model.flops_per_token = lambda: 1e6
    tflops = _series(_csv_rows(_fit(tmp_path, SpeedMonitor(), model, max_steps=2)), "throughput/device/tflops")
    assert tflops == {1: pytest.approx(1e6 * TOKENS / (STEP + FETCH) / 1e12)}


def test_broken_flops_callable_warns_and_training_goes_on(tmp_path: Path, clock: FakeTime) -> None:
    model = timed_lm(clock)
    model.flops_per_batch = lambda: 1.0  # wrong signature: takes no batch
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rows = _csv_rows(_fit(tmp_path, SpeedMonitor(), model, max_steps=4))
    assert any("flops_per_batch(batch)" in m for m in _speed_warnings(records))
    assert "throughput/device/tflops" not in {k for r in rows for k, v in r.items() if v}
    assert len(_series(rows, "throughput/tokens_per_sec")) == 2


# ---------------------------------------------------------------------------------------------------------------
# State and resume


def test_state_dict_round_trip() -> None:
    cb = SpeedMonitor()
    cb.samples_total, cb.tokens_total, cb.train_sec_total = 40, 640, 12.5
    cb.val_sec_total, cb.checkpoint_sec_total, cb.steps_total = 3.0, 1.5, 5
    fresh = SpeedMonitor()
    fresh.load_state_dict(cb.state_dict())
    assert fresh.state_dict() == cb.state_dict()
    assert isinstance(fresh.tokens_total, int) and isinstance(fresh.train_sec_total, float)
    # Empty, older or foreign dicts keep the defaults for what they lack.
    empty = SpeedMonitor()
    empty.load_state_dict({})
    assert empty.state_dict() == SpeedMonitor().state_dict()
    older = SpeedMonitor()
    older.load_state_dict({"tokens_total": 99, "something_else": "x", "train_sec_total": None})
    assert older.tokens_total == 99 and older.train_sec_total == 0.0


def test_state_key_depends_on_prefix() -> None:
    assert SpeedMonitor(prefix="a/").state_key != SpeedMonitor(prefix="b/").state_key
    assert SpeedMonitor(log_every_n_steps=5).state_key == SpeedMonitor().state_key  # the interval may change


def test_resume_continues_totals(tmp_path: Path, clock: FakeTime) -> None:
    first = _fit(tmp_path / "a", SpeedMonitor(), timed_lm(clock), max_steps=4)
    path = tmp_path / "a.ckpt"
    first.save_checkpoint(path)
    cb = SpeedMonitor()
    trainer = make_trainer(
        tmp_path / "b", [cb], make_loggers(tmp_path / "b", ("csv",)), max_steps=8, limit_val_batches=0
    )
    trainer.fit(timed_lm(clock), ckpt_path=path)
    rows = _csv_rows(trainer)
    assert _series(rows, "throughput/tokens_total") == {5: 6 * TOKENS, 7: 8 * TOKENS}
    assert _series(rows, "throughput/samples_total") == {5: 48, 7: 64}
    assert _series(rows, "time/train_total_min")[7] == pytest.approx(8 * (STEP + FETCH) / 60)
    assert _series(rows, "time/eta_min")[5] == pytest.approx(2 * (STEP + FETCH) / 60)
    assert cb.steps_total == 8


# ---------------------------------------------------------------------------------------------------------------
# Data parallel


@pytest.mark.slow
def test_ddp_totals_are_per_device_times_world_size(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("csv",))
    trainer = make_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        log_every_n_steps=2,
        loggers=loggers,
        callbacks=[SpeedMonitor(peak_flops=1e12)],
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(TinyLM())
    # Read the file rank zero wrote (the parent's logger would pick a new version directory).
    (path,) = (tmp_path / "test").glob("version_*/metrics.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    device, total = _series(rows, "throughput/device/tokens_per_sec"), _series(rows, "throughput/tokens_per_sec")
    assert sorted(total) == [1, 3]
    assert total == pytest.approx({s: 2 * v for s, v in device.items()})
    assert _series(rows, "throughput/tokens_total") == {1: 2 * 2 * TOKENS, 3: 2 * 4 * TOKENS}
    # MFU is per device, by hand: flops_per_token x this device's tokens/s over one device's peak (1 TFLOP/s here);
    # the world size cancels.
    mfu, tflops = _series(rows, "throughput/mfu"), _series(rows, "throughput/device/tflops")
    assert mfu == pytest.approx(tflops)
    per_token = TinyLM().flops_per_token
    assert mfu == pytest.approx({s: per_token * v / 1e12 for s, v in device.items()})
    assert mfu == pytest.approx({s: per_token * (v / 2) / 1e12 for s, v in total.items()})
