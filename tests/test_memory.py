"""Tests for MemoryMonitor: real Trainer runs on CPU (host keys) and the CUDA arithmetic as a pure function."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
from callback_helpers import TinyLM, make_loggers, make_trainer
from callback_helpers import csv_rows as _csv_rows
from callback_helpers import instantiate_docstring_callbacks as _instantiate_callbacks

from lightning_cs336.callbacks.memory import (
    MemoryMonitor,
    available_memory_bytes,
    cuda_memory_metrics,
    rss_bytes,
    total_memory_bytes,
)
from lightning_cs336.wandb_reader import latest_run

GIB = float(1 << 30)

# The shape of torch.cuda.memory_stats(device) on a GPU mid-training (a subset of its ~80 entries, same names).
CUDA_STATS = {
    "active.all.current": 412,
    "active.all.peak": 655,
    "active_bytes.all.current": 9 * (1 << 30),
    "active_bytes.all.peak": 14 * (1 << 30),
    "allocated_bytes.all.allocated": 1_234_567_890_123,
    "allocated_bytes.all.current": 9 * (1 << 30),
    "allocated_bytes.all.freed": 1_224_904_013_771,
    "allocated_bytes.all.peak": 14 * (1 << 30),
    "allocated_bytes.large_pool.current": 8 * (1 << 30),
    "allocated_bytes.small_pool.current": 1 << 30,
    "inactive_split_bytes.all.current": 300 << 20,
    "max_split_size": -1,
    "num_alloc_retries": 3,
    "num_device_alloc": 118,
    "num_device_free": 2,
    "num_ooms": 1,
    "num_sync_all_streams": 0,
    "oversize_allocations.current": 0,
    "requested_bytes.all.current": 9 * (1 << 30) - 4096,
    "reserved_bytes.all.allocated": 20 * (1 << 30),
    "reserved_bytes.all.current": 16 * (1 << 30),
    "reserved_bytes.all.freed": 4 * (1 << 30),
    "reserved_bytes.all.peak": 18 * (1 << 30),
    "segment.all.current": 116,
}


def _rows_with(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# ---------------------------------------------------------------------------------------------------------------
# Documentation and construction


def test_every_key_is_documented() -> None:
    doc = MemoryMonitor.__doc__
    for key in MemoryMonitor.METRIC_KEYS:
        assert f"``{key}``" in doc, key
    for key in MemoryMonitor.CUDA_KEYS:
        line = next(line for line in doc.splitlines() if f"``{key}``" in line)
        assert "CUDA only" in line
    assert set(MemoryMonitor.CUDA_KEYS) | set(MemoryMonitor.HOST_KEYS) == set(MemoryMonitor.METRIC_KEYS)
    assert "Example::" in doc and "class_path: lightning_cs336.callbacks.memory.MemoryMonitor" in doc


def test_yaml_example_builds_through_jsonargparse() -> None:
    (monitor,) = _instantiate_callbacks(MemoryMonitor.__doc__)
    assert isinstance(monitor, MemoryMonitor)
    assert monitor.log_every_n_steps == 50 and monitor.cross_rank_max is True


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cross_rank_max": "yes"}, "cross_rank_max must be a bool, got 'yes'"),
        ({"cross_rank_max": 1}, "cross_rank_max must be a bool, got 1"),
        ({"log_every_n_steps": 0}, "log_every_n_steps must be a positive integer or None, got 0"),
        ({"prefix": 3}, "prefix must be a string, got 3"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryMonitor(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA path as a pure function of memory_stats()


def test_cuda_metrics_from_memory_stats() -> None:
    metrics = cuda_memory_metrics(CUDA_STATS, previous=None)
    assert metrics == {
        "allocated_gib": 9.0,
        "reserved_gib": 16.0,
        "peak_allocated_gib": 14.0,
        "peak_reserved_gib": 18.0,
        "alloc_retries": 3.0,  # no previous reading: everything since the process started
        "ooms": 1.0,
    }
    assert {"memory/" + k for k in metrics} == set(MemoryMonitor.CUDA_KEYS)


def test_cuda_counters_are_deltas_since_last_log() -> None:
    first = dict(CUDA_STATS)
    # The next window: two more retries, no new OOM, peaks reset and lower, allocation grew a little.
    second = {
        **CUDA_STATS,
        "num_alloc_retries": 5,
        "allocated_bytes.all.current": 10 * (1 << 30),
        "allocated_bytes.all.peak": 11 * (1 << 30),
        "reserved_bytes.all.peak": 16 * (1 << 30),
    }
    metrics = cuda_memory_metrics(second, previous=first)
    assert metrics["alloc_retries"] == 2.0
    assert metrics["ooms"] == 0.0
    assert metrics["allocated_gib"] == 10.0
    assert metrics["peak_allocated_gib"] == 11.0  # the window's own peak, not the all-time 14
    assert metrics["peak_reserved_gib"] == 16.0
    # Previous may be just the counters the monitor keeps.
    assert cuda_memory_metrics(second, {"num_alloc_retries": 3, "num_ooms": 1}) == metrics


def test_cuda_counter_reset_and_empty_stats() -> None:
    # torch.cuda.reset_accumulated_memory_stats() made the counters drop: what is there now is all new.
    metrics = cuda_memory_metrics({**CUDA_STATS, "num_alloc_retries": 1, "num_ooms": 0}, previous=CUDA_STATS)
    assert metrics["alloc_retries"] == 1.0 and metrics["ooms"] == 0.0
    # Before the caching allocator is first used, memory_stats() is an empty dict.
    assert cuda_memory_metrics({}, None) == dict.fromkeys(
        ("allocated_gib", "reserved_gib", "peak_allocated_gib", "peak_reserved_gib", "alloc_retries", "ooms"), 0.0
    )


# ---------------------------------------------------------------------------------------------------------------
# Host memory readers


def test_host_memory_readers_agree() -> None:
    rss, available, total = rss_bytes(), available_memory_bytes(), total_memory_bytes()
    assert rss is not None and available is not None and total is not None
    assert 0 < rss < total and 0 < available <= total


def test_measure_on_cpu_gives_host_keys_only() -> None:
    monitor = MemoryMonitor()
    metrics = monitor.measure()  # no setup: no CUDA device
    assert set(metrics) == set(MemoryMonitor.HOST_KEYS)
    assert metrics["memory/rss_gib"] > 0 and metrics["memory/system_available_gib"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Real runs


def test_logs_host_keys_on_logging_steps_to_all_loggers(tmp_path: Path, wandb_env: Path) -> None:
    loggers = make_loggers(tmp_path, ("wandb", "csv", "tensorboard"))
    trainer = make_trainer(tmp_path, [MemoryMonitor()], loggers, max_steps=6, log_every_n_steps=2)
    trainer.fit(TinyLM())
    import wandb

    wandb.finish()
    logging_steps = [1, 3, 5]  # the rows of train/loss with log_every_n_steps=2
    total_gib = total_memory_bytes() / GIB

    # W&B: exactly the documented CPU keys, only on the logging steps, with plausible values.
    run = latest_run(tmp_path, wait_s=30)  # finish() returns before wandb-core writes the log's tail
    memory_keys = {k for k in run.keys() if k.startswith("memory/")}
    assert memory_keys == set(MemoryMonitor.HOST_KEYS)
    assert not memory_keys & set(MemoryMonitor.CUDA_KEYS)
    for key in MemoryMonitor.HOST_KEYS:
        history = run.history_of(key)
        assert [step for step, _ in history] == logging_steps
        assert all(0 < value < total_gib for _, value in history)
    assert [s for s, _ in run.history_of("train/loss")] == logging_steps  # same rows as Lightning's own logging

    # CSV: the same keys and steps.
    rows = _csv_rows(loggers[1])
    for key in MemoryMonitor.HOST_KEYS:
        assert sorted(_rows_with(rows, key)) == logging_steps
    assert not any(k.startswith("memory/") and k not in MemoryMonitor.HOST_KEYS for k in rows[0])

    # TensorBoard: the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(loggers[2].log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = {t for t in acc.Tags()["scalars"] if t.startswith("memory/")}
    assert tags == set(MemoryMonitor.HOST_KEYS)
    for key in MemoryMonitor.HOST_KEYS:
        assert [e.step for e in acc.Scalars(key)] == logging_steps
        assert all(e.value > 0 for e in acc.Scalars(key))


def test_interval_and_prefix(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("csv",))
    monitor = MemoryMonitor(log_every_n_steps=3, prefix="ft/")
    trainer = make_trainer(tmp_path, [monitor], loggers, max_steps=7, log_every_n_steps=1)
    trainer.fit(TinyLM())
    rows = _csv_rows(loggers[0])
    # Every 3rd step ((step + 1) % 3 == 0), Lightning's own rule, whatever the Trainer's log_every_n_steps.
    assert sorted(_rows_with(rows, "ft/memory/rss_gib")) == [2, 5]
    assert sorted(_rows_with(rows, "ft/memory/system_available_gib")) == [2, 5]
    assert "memory/rss_gib" not in rows[0]


def test_gradient_accumulation_logs_once_per_step(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("csv",))
    trainer = make_trainer(
        tmp_path, [MemoryMonitor()], loggers, max_steps=3, log_every_n_steps=1, accumulate_grad_batches=2
    )
    trainer.fit(TinyLM())
    steps = [int(r["step"]) for r in _csv_rows(loggers[0]) if r.get("memory/rss_gib")]
    assert steps == [0, 1, 2]  # one row per optimizer step, not one per micro-batch


def test_no_logger_warns_once_and_reads_nothing(tmp_path: Path) -> None:
    monitor = MemoryMonitor()
    trainer = make_trainer(tmp_path, [monitor], False, max_steps=4, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="MemoryMonitor: the Trainer has no logger") as record:
        trainer.fit(TinyLM())
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert monitor._last_logged_step == -1  # nothing was measured


def test_cross_rank_max_single_process(tmp_path: Path) -> None:
    """Without a process group the flag is accepted and changes nothing; with one, a single MAX reduction keeps
    the values (one rank) and turns available memory into a minimum via negation."""
    loggers = make_loggers(tmp_path, ("csv",))
    monitor = MemoryMonitor(cross_rank_max=True)
    trainer = make_trainer(tmp_path, [monitor], loggers, max_steps=2, log_every_n_steps=1)
    trainer.fit(TinyLM())
    assert sorted(_rows_with(_csv_rows(loggers[0]), "memory/rss_gib")) == [0, 1]

    with socket.socket() as sock:  # a free port for a one-rank gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        reduced = monitor._reduce_max(trainer, {"memory/rss_gib": 1.5, "memory/system_available_gib": 7.25})
    finally:
        torch.distributed.destroy_process_group()
    assert reduced == {"memory/rss_gib": 1.5, "memory/system_available_gib": 7.25}


class _Ballast(TinyLM):
    """Rank 1 holds 1 GiB more resident memory than rank 0, so a cross-rank max is visible in rank 0's log.
    Rank 0 writes its own largest RSS to ``own_rss_file`` for comparison."""

    def __init__(self, own_rss_file: str) -> None:
        super().__init__()
        self.own_rss_file = own_rss_file
        self.own_rss = 0

    def on_train_start(self) -> None:
        if self.global_rank == 1:
            self.ballast = torch.ones(1 << 28)  # 1 GiB of float32, written so it is resident

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.own_rss = max(self.own_rss, rss_bytes())

    def on_train_end(self) -> None:
        if self.global_rank == 0:
            Path(self.own_rss_file).write_text(str(self.own_rss / GIB))


@pytest.mark.slow
def test_cross_rank_max_ddp(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("csv",))
    trainer = make_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        log_every_n_steps=2,
        loggers=loggers,
        callbacks=[MemoryMonitor(cross_rank_max=True)],
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    own_file = tmp_path / "rank0_rss.txt"
    trainer.fit(_Ballast(str(own_file)))
    # The spawned rank 0 chose the CSV version directory; this process's logger object never saw it.
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    rows = _csv_rows(metrics_file.parent)
    rss = _rows_with(rows, "memory/rss_gib")
    assert sorted(rss) == [1, 3]
    own = float(own_file.read_text())  # rank 0's own RSS: the logged values are rank 1's, 1 GiB larger
    assert all(value > own + 0.8 for value in rss.values()), (rss, own)
    available = _rows_with(rows, "memory/system_available_gib")
    assert all(0 < v <= total_memory_bytes() / GIB for v in available.values())
    assert not math.isinf(sum(available.values()))
