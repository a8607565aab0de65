"""Step-time breakdown and stragglers: the data-loading share of step time, step-time jitter (p50/p95/max) per
logging window, and under several ranks each rank's step time, data wait and memory, gathered once per logging step,
with a one-line warning when the run is input-bound or one rank is persistently the slowest.

It sits beside :class:`~lightning_cs336.callbacks.speed.SpeedMonitor` rather than inside it: ``SpeedMonitor``
measures on rank zero only (ranks run in lockstep, so its throughput needs no collective), while a straggler can
only be found by measuring on every rank.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_cs336.callbacks._base import TelemetryCallback, check_positive_int, distributed_ready
from lightning_cs336.callbacks.memory import rss_bytes

__all__ = ["StepTimeMonitor"]

_GIB = 1024**3
# Columns of one rank's gathered row.
_STEP, _DATA, _FWD, _ARRIVAL, _MEM = range(5)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list (no interpolation: every reported value is a measured step)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class StepTimeMonitor(TelemetryCallback):
    r"""Log where step time goes: the data-loading share, step-time jitter within each logging window, and under
    several ranks the spread across ranks and which rank is slowest.

    **What is timed, on every rank.** A *step* is one optimizer step: its micro-batches from ``on_train_batch_start``
    to ``on_train_batch_end``; its *data wait* is the time between the end of the previous batch and the start of
    each of its micro-batches (fetching and moving the next batch); its *forward* part is the time from each
    micro-batch's start to ``on_before_backward``. Validation runs and checkpoint saves between batches are not data
    wait (the gap they fall in is not counted). On CPU the host clock is read; on CUDA events are recorded on the
    current stream and read at logging steps (the only synchronisation), so steps that do not log add no sync.

    **Why forward time finds the straggler.** Under DDP a slow rank makes every *other* rank wait inside backward
    (the gradient all-reduce), so all ranks show the same step time. What differs is how late each rank *arrives*
    at that collective: its data wait plus its forward. ``time/rank/slowest`` is the rank with the largest
    ``data wait + forward`` in the window; ``time/rank/slowest_step`` and ``time/rank/slowest_data_wait`` are the
    ranks with the largest step time and data wait, as measured.

    **Warnings** (one line, once per fit each): *input-bound* when every step of a window spent more than
    ``input_bound_pct`` percent of its time waiting for data; *straggler* when the same rank was the slowest (arrival
    at least ``straggler_margin`` above the ranks' median) for ``straggler_windows`` logging windows in a row.

    **Distributed.** One ``all_gather`` of a 5-number row per rank per logging step, on every rank; rank zero logs.

    **Resume.** The window's steps measured so far and the straggler streak are in ``state_dict``.

    Args:
        input_bound_pct: Data-wait share (percent of step + data wait) above which a step is input-bound.
        straggler_windows: Consecutive logging windows one rank must be slowest before the straggler warning.
        straggler_margin: How far above the ranks' median arrival time (as a fraction) the slowest must be.
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key.

    Raises:
        ValueError: If a number is out of range (the message repeats it), or the base class arguments are invalid.

    Logged keys (``window`` = the optimizer steps since the previous logging step; ``time/rank/*`` and
    ``memory/rank/*`` only with several ranks):

    ================================  =======  ==============================================================
    key                               unit     when
    ================================  =======  ==============================================================
    ``time/data_wait_pct``            %        logging steps: data wait / (step time + data wait), window
    ``time/step_ms_p50``              ms       logging steps: median step time of the window
    ``time/step_ms_p95``              ms       logging steps: 95th percentile (nearest rank) of the window
    ``time/step_ms_max``              ms       logging steps: slowest step of the window
    ``time/input_bound``              0/1      logging steps: every step of the window was input-bound
    ``time/rank/step_ms_min``         ms       logging steps: lowest per-rank mean step time
    ``time/rank/step_ms_max``         ms       logging steps: highest per-rank mean step time
    ``time/rank/data_wait_ms_min``    ms       logging steps: lowest per-rank mean data wait
    ``time/rank/data_wait_ms_max``    ms       logging steps: highest per-rank mean data wait
    ``time/rank/forward_ms_min``      ms       logging steps: lowest per-rank mean forward time
    ``time/rank/forward_ms_max``      ms       logging steps: highest per-rank mean forward time
    ``time/rank/slowest``             rank     logging steps: latest arrival (data wait + forward)
    ``time/rank/slowest_step``        rank     logging steps: largest mean step time
    ``time/rank/slowest_data_wait``   rank     logging steps: largest mean data wait
    ``memory/rank/min_gib``           GiB      logging steps: lowest per-rank memory (CUDA reserved, else RSS)
    ``memory/rank/max_gib``           GiB      logging steps: highest per-rank memory
    ``memory/rank/largest``           rank     logging steps: the rank using the most memory
    ================================  =======  ==============================================================

    Duck typing: nothing is required from the LightningModule.

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks import StepTimeMonitor

        trainer = Trainer(devices=8, strategy="ddp", callbacks=[StepTimeMonitor(input_bound_pct=30)])

    LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.step_time.StepTimeMonitor
              init_args:
                input_bound_pct: 50.0
                straggler_windows: 3
    """

    METRIC_KEYS: tuple[str, ...] = (
        "time/data_wait_pct",
        "time/step_ms_p50",
        "time/step_ms_p95",
        "time/step_ms_max",
        "time/input_bound",
        "time/rank/step_ms_min",
        "time/rank/step_ms_max",
        "time/rank/data_wait_ms_min",
        "time/rank/data_wait_ms_max",
        "time/rank/forward_ms_min",
        "time/rank/forward_ms_max",
        "time/rank/slowest",
        "time/rank/slowest_step",
        "time/rank/slowest_data_wait",
        "memory/rank/min_gib",
        "memory/rank/max_gib",
        "memory/rank/largest",
    )

    def __init__(
        self,
        input_bound_pct: float = 50.0,
        straggler_windows: int = 3,
        straggler_margin: float = 0.2,
        log_every_n_steps: int | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        if isinstance(input_bound_pct, bool) or not isinstance(input_bound_pct, (int, float)):
            raise ValueError(f"input_bound_pct must be a number in (0, 100), got {input_bound_pct!r}")
        if not 0 < input_bound_pct < 100:
            raise ValueError(f"input_bound_pct must be a number in (0, 100), got {input_bound_pct!r}")
        check_positive_int("straggler_windows", straggler_windows)
        ok = isinstance(straggler_margin, (int, float)) and not isinstance(straggler_margin, bool)
        if not ok or not 0 <= straggler_margin < math.inf:
            raise ValueError(f"straggler_margin must be a non-negative number, got {straggler_margin!r}")
        self.input_bound_pct = float(input_bound_pct)
        self.straggler_windows = straggler_windows
        self.straggler_margin = float(straggler_margin)
        # Survive a resume.
        self._restored: list[list[float]] = []
        self.straggler_rank: int | None = None
        self.straggler_streak = 0
        self._reset_fit()

    def _reset_fit(self) -> None:
        self._cuda = False
        self._prev_end: Any = None  # the mark that opened the current gap, or None (gap not counted)
        self._start: Any = None
        self._fwd_end: Any = None
        # Marks of the micro-batches of the open step and of the window's finished steps.
        self._open_marks: list[tuple[Any, Any, Any, Any]] = []
        self._window: list[list[tuple[Any, Any, Any, Any]]] = []

    # ------------------------------------------------------------------------------------------------ clock
    def _mark(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # asynchronous: a marker on the stream
            return event
        return time.perf_counter()

    def _elapsed(self, a: Any, b: Any) -> float:
        if a is None or b is None:
            return 0.0
        return a.elapsed_time(b) / 1e3 if self._cuda else b - a

    def _resolve(self) -> list[list[float]]:
        """The window's steps as ``[step, data wait, forward]`` seconds and whether every gap of the step was timed
        (not after validation, a checkpoint or the fit's start). CUDA: waits for the window's last event."""
        if self._cuda and self._window and self._window[-1]:
            self._window[-1][-1][3].synchronize()
        rows = []
        for marks in self._window:
            step = sum(self._elapsed(s, e) for _, s, _, e in marks)
            data = sum(self._elapsed(g, s) for g, s, _, _ in marks)
            fwd = sum(self._elapsed(s, f) for _, s, f, _ in marks)
            measured = all(g is not None for g, _, _, _ in marks)
            rows.append([step, data, fwd, float(measured)])
        return rows

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_fit()
        device = trainer.strategy.root_device
        self._cuda = device.type == "cuda" and torch.cuda.is_available()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = self._mark()
        self._fwd_end = None

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._start is not None and self._fwd_end is None:
            self._fwd_end = self._mark()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        end = self._mark()
        self._open_marks.append((self._prev_end, self._start, self._fwd_end, end))
        self._start = None
        self._prev_end = end
        if self._clock.steps_optimizer(trainer):
            self._window.append(self._open_marks)
            self._open_marks = []
            if self.is_logging_step(trainer):
                self._flush(trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prev_end = None  # the gap that holds validation is not data wait

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._prev_end = None  # nor is the gap that holds a checkpoint save

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": self._restored + self._resolve(),
            "straggler_rank": self.straggler_rank,
            "straggler_streak": self.straggler_streak,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict or {}
        self._restored = [[float(x) for x in row] for row in state.get("pending", []) if len(row) == 4]
        rank = state.get("straggler_rank")
        self.straggler_rank = int(rank) if rank is not None else None
        self.straggler_streak = int(state.get("straggler_streak", 0) or 0)

    # ------------------------------------------------------------------------------------------------ logging
    def _memory_gib(self, trainer: Trainer) -> float:
        if self._cuda:
            return torch.cuda.memory_reserved(trainer.strategy.root_device) / _GIB
        return rss_bytes() / _GIB

    def _flush(self, trainer: Trainer) -> None:
        rows = self._restored + self._resolve()
        self._restored, self._window = [], []
        if not rows:
            return
        n = len(rows)
        step_sec = sum(r[0] for r in rows)
        data_sec = sum(r[1] for r in rows)
        fwd_sec = sum(r[2] for r in rows)
        steps_ms = sorted(1e3 * r[0] for r in rows)
        total = step_sec + data_sec
        # Only steps whose data wait was timed can say whether they waited.
        shares = [100.0 * r[1] / (r[0] + r[1]) if r[0] + r[1] > 0 else 0.0 for r in rows if r[3]]
        input_bound = bool(shares) and all(s > self.input_bound_pct for s in shares)
        metrics: dict[str, float] = {
            "time/data_wait_pct": 100.0 * data_sec / total if total > 0 else 0.0,
            "time/step_ms_p50": _quantile(steps_ms, 0.5),
            "time/step_ms_p95": _quantile(steps_ms, 0.95),
            "time/step_ms_max": steps_ms[-1],
            "time/input_bound": float(input_bound),
        }
        if input_bound:
            self.warn_once(
                "input-bound",
                f"input-bound: every step of the window ending at step {self.step(trainer)} waited for data more than"
                f" {self.input_bound_pct:g}% of its time ({metrics['time/data_wait_pct']:.0f}% overall). Use more"
                " DataLoader workers, pin_memory, or prefetching (warned once; see time/data_wait_pct).",
            )
        if distributed_ready(trainer):
            metrics.update(self._gather(trainer, step_sec / n, data_sec / n, fwd_sec / n))
        self.log_metrics(trainer, metrics)

    def _gather(self, trainer: Trainer, step: float, data: float, fwd: float) -> dict[str, float]:
        """One all_gather of every rank's row, on every rank; the spread and the slowest ranks."""
        device = trainer.strategy.root_device
        mine = torch.tensor([[step, data, fwd, data + fwd, self._memory_gib(trainer)]], device=device)
        world = int(trainer.world_size)
        parts = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(parts, mine)  # list form: every backend (gloo too) has it
        ranks = torch.cat(parts).cpu().tolist()  # the one transfer
        col = list(zip(*ranks, strict=True))

        def argmax(values: tuple[float, ...]) -> int:
            return max(range(len(values)), key=lambda i: values[i])

        slowest = argmax(col[_ARRIVAL])
        arrivals = sorted(col[_ARRIVAL])
        median = arrivals[(len(arrivals) - 1) // 2]
        clear = col[_ARRIVAL][slowest] > (1.0 + self.straggler_margin) * median
        if clear and slowest == self.straggler_rank:
            self.straggler_streak += 1
        else:
            self.straggler_rank, self.straggler_streak = (slowest, 1) if clear else (None, 0)
        if self.straggler_streak >= self.straggler_windows:
            self.warn_once(
                f"straggler-{slowest}",
                f"rank {slowest} was the slowest for {self.straggler_streak} logging windows in a row (data wait +"
                f" forward {1e3 * col[_ARRIVAL][slowest]:.1f} ms vs a median of {1e3 * median:.1f} ms per step): the"
                " other ranks wait for it in every collective (warned once; see time/rank/slowest).",
            )
        return {
            "time/rank/step_ms_min": 1e3 * min(col[_STEP]),
            "time/rank/step_ms_max": 1e3 * max(col[_STEP]),
            "time/rank/data_wait_ms_min": 1e3 * min(col[_DATA]),
            "time/rank/data_wait_ms_max": 1e3 * max(col[_DATA]),
            "time/rank/forward_ms_min": 1e3 * min(col[_FWD]),
            "time/rank/forward_ms_max": 1e3 * max(col[_FWD]),
            "time/rank/slowest": float(slowest),
            "time/rank/slowest_step": float(argmax(col[_STEP])),
            "time/rank/slowest_data_wait": float(argmax(col[_DATA])),
            "memory/rank/min_gib": min(col[_MEM]),
            "memory/rank/max_gib": max(col[_MEM]),
            "memory/rank/largest": float(argmax(col[_MEM])),
        }
