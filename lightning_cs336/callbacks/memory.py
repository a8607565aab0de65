r"""
Memory Monitor
==============

Logs accelerator and host memory on logging steps only, without synchronising the device.

"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import psutil
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_cs336.callbacks._base import TelemetryCallback, distributed_ready

__all__ = [
    "MemoryMonitor",
    "available_memory_bytes",
    "cuda_memory_metrics",
    "rss_bytes",
    "total_memory_bytes",
]

_GIB = float(1 << 30)

# The ``torch.cuda.memory_stats()`` entries the CUDA metrics are computed from.
_ALLOCATED = "allocated_bytes.all.current"
_RESERVED = "reserved_bytes.all.current"
_PEAK_ALLOCATED = "allocated_bytes.all.peak"
_PEAK_RESERVED = "reserved_bytes.all.peak"
_RETRIES = "num_alloc_retries"
_OOMS = "num_ooms"
_COUNTERS = (_RETRIES, _OOMS)


def cuda_memory_metrics(stats: Mapping[str, Any], previous: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Turn one ``torch.cuda.memory_stats()`` reading into the CUDA metrics of :class:`MemoryMonitor`.

    A pure function, so the CUDA arithmetic can be tested on any machine.

    Args:
        stats: A ``torch.cuda.memory_stats(device)`` dict. Missing entries count as 0 (the dict is empty until the
            caching allocator has been used on that device).
        previous: The same dict (or just its ``num_alloc_retries``/``num_ooms`` entries) from the previous log, to
            turn the cumulative counters into "since the last log". ``None`` counts from zero.

    Returns:
        ``allocated_gib``, ``reserved_gib``, ``peak_allocated_gib``, ``peak_reserved_gib`` (GiB, peaks since the last
        ``torch.cuda.reset_peak_memory_stats``), ``alloc_retries`` and ``ooms`` (events since ``previous``).
    """

    def delta(key: str) -> float:
        now = int(stats.get(key, 0))
        before = int(previous.get(key, 0)) if previous is not None else 0
        # A counter below its previous value means someone called torch.cuda.reset_accumulated_memory_stats():
        # everything counted since that reset is new.
        return float(now - before if now >= before else now)

    return {
        "allocated_gib": stats.get(_ALLOCATED, 0) / _GIB,
        "reserved_gib": stats.get(_RESERVED, 0) / _GIB,
        "peak_allocated_gib": stats.get(_PEAK_ALLOCATED, 0) / _GIB,
        "peak_reserved_gib": stats.get(_PEAK_RESERVED, 0) / _GIB,
        "alloc_retries": delta(_RETRIES),
        "ooms": delta(_OOMS),
    }


# --------------------------------------------------------------------------------------------------------------
# Host memory, from psutil (a dependency of this package; ~75 us per reading, on logging steps only).


_PROCESS: Any = None


def rss_bytes() -> int:
    """The resident memory of this process in bytes (psutil)."""
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():  # a forked worker must not report its parent
        _PROCESS = psutil.Process()
    return int(_PROCESS.memory_info().rss)


def available_memory_bytes() -> int:
    """Memory the system can still give to processes without swapping, in bytes (psutil)."""
    return int(psutil.virtual_memory().available)


def total_memory_bytes() -> int:
    """The system's physical memory in bytes (psutil)."""
    return int(psutil.virtual_memory().total)


class MemoryMonitor(TelemetryCallback):
    r"""Log CUDA allocator memory (peaks per logging window) and host memory, on logging steps only.

    On a CUDA device it reads ``torch.cuda.memory_stats()`` once per logging step: current allocated/reserved memory,
    the peaks since the previous log (it calls ``torch.cuda.reset_peak_memory_stats`` after each reading, so each
    value is the peak of its own window, validation included when it ran in that window), and how many allocator
    retries (``cudaMalloc`` failed, the cache was flushed and the call retried: a sign of fragmentation or memory
    pressure) and out-of-memory errors happened since the previous log. On every device it reads the process's
    resident memory and the system's available memory. None of these calls synchronises the device, and steps that
    do not log do nothing but one integer comparison.

    Note that resetting the peak statistics affects anything else in the process that reads
    ``torch.cuda.max_memory_allocated()``. The monitor keeps no state across a resume: the allocator's counters
    restart with the process, and so does its first window.

    Args:
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key (e.g. ``"ft/"`` gives ``ft/memory/rss_gib``).
        cross_rank_max: Under DDP/FSDP, log the maximum over all ranks instead of rank zero's own values (and the
            *minimum* of ``memory/system_available_gib``, the tightest node). Costs one ``all_reduce`` of a small
            tensor per logging step, run on every rank.

    Raises:
        ValueError: If ``log_every_n_steps`` is not a positive integer or None, ``prefix`` not a string, or
            ``cross_rank_max`` not a bool.

    Logged keys (all rank zero's values unless ``cross_rank_max``):

    ==================================  ======  ==================================================================
    key                                 unit    when
    ==================================  ======  ==================================================================
    ``memory/allocated_gib``            GiB     logging steps, CUDA only: memory held by tensors now
    ``memory/reserved_gib``             GiB     logging steps, CUDA only: memory held by the caching allocator now
    ``memory/peak_allocated_gib``       GiB     logging steps, CUDA only: peak tensor memory since the last log
    ``memory/peak_reserved_gib``        GiB     logging steps, CUDA only: peak allocator memory since the last log
    ``memory/alloc_retries``            count   logging steps, CUDA only: allocator retries since the last log
    ``memory/ooms``                     count   logging steps, CUDA only: out-of-memory errors since the last log
    ``memory/rss_gib``                  GiB     logging steps, every device: resident memory of this process
    ``memory/system_available_gib``     GiB     logging steps, every device: memory available on this machine
    ==================================  ======  ==================================================================

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks.memory import MemoryMonitor

        trainer = Trainer(callbacks=[MemoryMonitor(log_every_n_steps=50, cross_rank_max=True)])

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.memory.MemoryMonitor
              init_args:
                log_every_n_steps: 50
                cross_rank_max: true
    """

    #: Every key this callback can log (before ``prefix``); the first six only on CUDA.
    METRIC_KEYS: tuple[str, ...] = (
        "memory/allocated_gib",
        "memory/reserved_gib",
        "memory/peak_allocated_gib",
        "memory/peak_reserved_gib",
        "memory/alloc_retries",
        "memory/ooms",
        "memory/rss_gib",
        "memory/system_available_gib",
    )
    #: The keys logged on every device.
    HOST_KEYS: tuple[str, ...] = ("memory/rss_gib", "memory/system_available_gib")
    #: The keys logged on CUDA devices only.
    CUDA_KEYS: tuple[str, ...] = METRIC_KEYS[:6]

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "", cross_rank_max: bool = False) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        if not isinstance(cross_rank_max, bool):
            raise ValueError(f"cross_rank_max must be a bool, got {cross_rank_max!r}")
        self.cross_rank_max = cross_rank_max
        self._cuda_device: torch.device | None = None
        self._previous: dict[str, int] = {}  # the cumulative CUDA counters at the previous reading
        self._last_logged_step = -1

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        self._cuda_device = device if device.type == "cuda" and torch.cuda.is_available() else None

    def _reads(self, trainer: Trainer) -> bool:
        """Whether this rank reads memory: rank zero when a logger will record it, every rank for the reduction."""
        if not trainer.loggers:  # the same on every rank, so skipping keeps the collective matched
            return False
        return trainer.global_rank == 0 or self._reduces(trainer)

    def _reduces(self, trainer: Trainer) -> bool:
        return self.cross_rank_max and distributed_ready(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The first window starts with training, not with whatever setup allocated (or a previous fit) left behind.
        self._last_logged_step = -1
        if self._cuda_device is not None and self._reads(trainer):
            torch.cuda.reset_peak_memory_stats(self._cuda_device)
            stats = torch.cuda.memory_stats(self._cuda_device)
            self._previous = {key: int(stats.get(key, 0)) for key in _COUNTERS}

    def measure(self) -> dict[str, float]:
        """Read memory now (unprefixed keys, GiB and counts) and start a new peak/counter window on CUDA."""
        metrics: dict[str, float] = {}
        if self._cuda_device is not None:
            stats = torch.cuda.memory_stats(self._cuda_device)
            metrics.update({"memory/" + k: v for k, v in cuda_memory_metrics(stats, self._previous).items()})
            self._previous = {key: int(stats.get(key, 0)) for key in _COUNTERS}
            torch.cuda.reset_peak_memory_stats(self._cuda_device)
        metrics["memory/rss_gib"] = rss_bytes() / _GIB
        metrics["memory/system_available_gib"] = available_memory_bytes() / _GIB
        return metrics

    def _reduce_max(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float]:
        """One ``all_reduce(MAX)`` over every key; available memory is negated so that MAX yields the minimum."""
        keys = self.METRIC_KEYS if self._cuda_device is not None else self.HOST_KEYS
        # A value a rank could not read enters as -inf, the identity of MAX; every rank sends the same layout.
        values = [metrics.get(key, -math.inf) for key in keys]
        negate = [key == "memory/system_available_gib" for key in keys]
        values = [-v if neg and v != -math.inf else v for v, neg in zip(values, negate, strict=True)]
        tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        out: dict[str, float] = {}
        for key, value, neg in zip(keys, tensor.tolist(), negate, strict=True):  # logging step: one sync is fine
            if value != -math.inf:
                out[key] = -value if neg else value
        return out

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The clock answers only on the batch that steps the optimizer: under gradient accumulation the window's
        # peak then includes every micro-batch of the step.
        if not self.is_logging_step(trainer) or not self._reads(trainer):
            return
        step = self.step(trainer)
        self._last_logged_step = step
        metrics = self.measure()
        if self._reduces(trainer):
            metrics = self._reduce_max(trainer, metrics)
        self.log_metrics(trainer, metrics, step=step)
