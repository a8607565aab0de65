r"""
Speed Monitor
=============

Step time, time waiting for data, samples/s and tokens/s, achieved TFLOP/s and MFU, an ETA, and the time spent in
validation and checkpointing, measured without synchronising the device on steps that do not log.

Size note (~580 lines): one accounting object (the step/gap interval machine with its CUDA-event and host-clock
paths) plus a docstring of ~150 lines that states what each key measures; split, the two halves of the interval
machine would have to share private state. The peak table lives in ``peak_flops.py``.

"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_cs336.callbacks import _compat
from lightning_cs336.callbacks._base import TelemetryCallback, count_batch
from lightning_cs336.callbacks.peak_flops import (  # noqa: F401  (DTYPES, PEAK_FLOPS: re-exported)
    DTYPES,
    PEAK_FLOPS,
    _tokens,
    lookup_peak_flops,
    precision_dtype,
    tf32_enabled,
)

__all__ = ["SpeedMonitor"]


def _number(value: Any) -> float | None:
    """``value`` as a positive finite float, or None (bools and non-numbers are not FLOP counts)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # only at logging steps: per-step tensor FLOPs are summed on the device first
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    return None


class SpeedMonitor(TelemetryCallback):
    r"""Log step time, data wait, samples/s, tokens/s, TFLOP/s, MFU and an ETA, as averages over each logging window,
    plus the time each validation run and checkpoint save took, kept out of the training throughput.

    **What is timed.** Training is cut into *steps* (``on_train_batch_start`` to ``on_train_batch_end``: forward,
    backward, optimizer) and the *gaps* between them (the end of one batch to the start of the next: fetching and
    transferring the next batch, plus the loop's own work between batches such as logging). Validation runs and
    checkpoint saves that happen in a gap are taken out of it and reported on their own. Every value on a logging step
    is an average over the *window*, the optimizer steps since the previous log: ``time/step_ms`` and
    ``time/data_wait_ms`` are per optimizer step (all micro-batches of a gradient-accumulation step together), and the
    rates divide the window's samples, tokens and FLOPs by the window's step time plus data wait, so a stalled input
    pipeline lowers throughput and MFU (and shows up in ``time/data_wait_ms``, not in ``time/step_ms``).

    **No device synchronisation on non-logging steps.** On CUDA, each step start and end records a
    ``torch.cuda.Event``; on a logging step the callback waits for the window's *last* event (the only sync, and
    Lightning's own logging syncs there anyway) and reads the elapsed times of the whole window. Step time is then
    device time, and the data wait of a plain gap is the time the device sat idle between two steps (zero when the
    input pipeline keeps ahead). Everything else (all of it on CPU; on CUDA the first gap of a fit, gaps at epoch
    boundaries and gaps that held validation or a checkpoint) is ``time.perf_counter()`` on the host. Only global
    rank zero measures and logs: data-parallel ranks run in lockstep, and no collective is needed.

    **Samples and tokens** per batch are taken from the first tensor in the batch (depth first through tuples, lists
    and dict values): samples = ``shape[0]``, tokens = ``numel()`` (for ``(input_ids, targets)`` batches of shape
    ``(B, T)`` that is ``B`` and ``B * T``). Pass ``batch_size_fn``/``tokens_fn`` (Python only) for other layouts.
    Totals are per device x ``trainer.world_size``, since each data-parallel rank processes its own batch of the same
    size; under tensor or pipeline parallelism, where ranks share a batch, read the ``device`` keys instead.

    **MFU.** The module may offer its *training* FLOPs (forward + backward, per device): ``flops_per_batch`` (a
    number, or a callable taking the batch, called on every batch: keep it to shape arithmetic) or
    ``flops_per_token`` (a number, property, or a callable taking no arguments, read at each log; e.g. ``6 * N`` for
    ``N`` matmul parameters, plus attention). ``flops_per_batch`` wins when both exist. Then
    ``throughput/device/tflops`` is logged, and ``throughput/mfu`` = achieved FLOP/s per device / peak FLOP/s per
    device when the peak is known: ``peak_flops`` if given, else :func:`lookup_peak_flops` for
    ``torch.cuda.get_device_name()`` (whole-word match against ``peak_flops_table``, then :data:`PEAK_FLOPS`: dense
    datasheet rates) and the dtype of ``trainer.precision`` (``bf16-mixed`` -> bf16, ``16-mixed`` -> fp16,
    ``32-true`` -> fp32, or tf32 when TF32 matmuls are enabled, ``transformer-engine`` -> fp8). The peak used is
    printed once at the start of training and logged as ``throughput/peak_tflops`` in the first log. An MFU above
    100% is impossible (a wrong peak or FLOP count): it is logged as ``throughput/mfu_error``, never as
    ``throughput/mfu``, with a one-line warning. Without FLOPs, or without a peak (CPU, an unknown GPU, fp64), a
    warning says once what is missing and the keys are not logged. Accounting, by construction: the FLOPs are those of
    every micro-batch this device ran in the window (``flops_per_token`` x the tokens of each batch actually seen,
    all ``accumulate_grad_batches`` micro-batches of each optimizer step), over the window's wall time on this
    device, against one device's peak; the world size cancels (each rank runs its own batches at the same rate),
    so neither gradient accumulation nor data parallelism can inflate or deflate it (nanoGPT issue 619, Lightning
    issue 19461).

    **Validation and checkpoints.** ``time/val_sec`` is the host time from ``on_validation_start`` to
    ``on_validation_end`` of each validation run during ``fit`` (not the sanity check). A checkpoint is noticed by this
    callback's ``on_save_checkpoint`` (every full checkpoint) or pushed by a ``ModelCheckpoint`` right after each file
    it writes (weights-only checkpoints too; see ``_compat.on_checkpoint_saved``). ``ModelCheckpoint`` runs after every
    other callback's hook, so a save starts where this callback's ``on_train_batch_end``/
    ``on_validation_end``/``on_train_epoch_end`` returns and nothing but the next batch's fetch follows it before the
    next ``on_train_batch_start``. ``time/checkpoint_sec`` is therefore the host time of the gap holding the save, minus
    (when the gap ends at a training batch) the median data wait of the recent plain gaps as the estimate of the fetch
    that shares the gap. It covers gathering the state dicts, writing the file with a synchronous ``CheckpointIO`` and
    the other callbacks' end-of-batch work in that gap; an asynchronous ``CheckpointIO`` shows only the part that blocks
    training. A checkpoint saved *inside* a training step (``trainer.save_checkpoint`` in ``training_step``) stays in
    that step's time.

    **ETA.** ``time/eta_min`` = (``trainer.estimated_stepping_batches`` - ``trainer.global_step``) x (the window's
    mean time per optimizer step + the validation and checkpoint time so far per step). Not logged when the number of
    steps is unknown (an iterable dataset without ``max_steps``).

    **Resume.** ``state_dict`` holds the cumulative samples, tokens, training/validation/checkpoint time and step
    count, so ``throughput/tokens_total`` and ``time/train_total_min`` continue after ``ckpt_path=``.

    Args:
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key (e.g. ``"ft/"`` gives ``ft/time/step_ms``).
        peak_flops: Peak FLOP/s of ONE device for the precision you train in; overrides the table lookup. Needed for
            MFU on devices the table does not know (e.g. CPU).
        peak_flops_table: Extra or corrected table rows, ``{device name words: {dtype: FLOP/s}}`` with dtypes among
            ``fp64, fp32, tf32, bf16, fp16, fp8``, e.g. ``{"h100": {"bf16": 989.4e12}}``; searched before the built-in
            table.
        batch_size_fn: Python only: ``batch -> samples in it`` (default ``shape[0]`` of the first tensor). Must not
            synchronise the device (use shapes, not values).
        tokens_fn: Python only: ``batch -> tokens in it`` (default ``numel()`` of the first tensor), e.g. to count
            only non-padding tokens from a length list kept on the host.

    Raises:
        ValueError: If ``log_every_n_steps`` is not a positive integer or None, ``prefix`` not a string,
            ``peak_flops`` not a positive number, ``peak_flops_table`` malformed, or ``batch_size_fn``/``tokens_fn``
            not callable.

    Logged keys (rank zero's measurements):

    =======================================  =========  =============================================================
    key                                      unit       when
    =======================================  =========  =============================================================
    ``time/step_ms``                         ms         logging steps: mean time per optimizer step in the window
    ``time/data_wait_ms``                    ms         logging steps: mean time between steps per optimizer step
    ``throughput/device/samples_per_sec``    samples/s  logging steps: this device's samples / (step + data wait)
    ``throughput/device/tokens_per_sec``     tokens/s   logging steps: this device's tokens / (step + data wait)
    ``throughput/samples_per_sec``           samples/s  logging steps: per device x world size
    ``throughput/tokens_per_sec``            tokens/s   logging steps: per device x world size
    ``throughput/samples_total``             samples    logging steps: samples trained on so far, all devices
    ``throughput/tokens_total``              tokens     logging steps: tokens trained on so far, all devices
    ``throughput/device/tflops``             TFLOP/s    logging steps, when the module gives its FLOPs: achieved
    ``throughput/mfu``                       fraction   logging steps, when FLOPs and the peak are known (0-1)
    ``throughput/mfu_error``                 fraction   instead of ``throughput/mfu`` when it would exceed 1 (+ warning)
    ``throughput/peak_tflops``               TFLOP/s    first log of each fit, when the peak is known
    ``time/eta_min``                         min        logging steps, when the total number of steps is known
    ``time/train_total_min``                 min        logging steps: step + data-wait time so far (no val/ckpt)
    ``time/val_sec``                         s          end of each validation run during fit
    ``time/checkpoint_sec``                  s          first training batch after a checkpoint save, or train end
    =======================================  =========  =============================================================

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks.speed import SpeedMonitor

        # model.flops_per_token = 6 * n_matmul_params (+ attention); on an H100 with bf16-mixed the peak is looked up
        trainer = Trainer(precision="bf16-mixed", callbacks=[SpeedMonitor(log_every_n_steps=50)])

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.speed.SpeedMonitor
              init_args:
                log_every_n_steps: 50
                peak_flops: null            # or e.g. 989.4e12 to force a peak
                peak_flops_table:
                  a10g: {bf16: 70.0e12}     # correct or add rows
    """

    #: Every key this callback can log (before ``prefix``).
    METRIC_KEYS: tuple[str, ...] = (
        "time/step_ms",
        "time/data_wait_ms",
        "throughput/device/samples_per_sec",
        "throughput/device/tokens_per_sec",
        "throughput/samples_per_sec",
        "throughput/tokens_per_sec",
        "throughput/samples_total",
        "throughput/tokens_total",
        "throughput/device/tflops",
        "throughput/mfu",
        "throughput/mfu_error",
        "throughput/peak_tflops",
        "time/eta_min",
        "time/train_total_min",
        "time/val_sec",
        "time/checkpoint_sec",
    )

    _STATE_KEYS: tuple[str, ...] = (
        "samples_total",
        "tokens_total",
        "train_sec_total",
        "val_sec_total",
        "checkpoint_sec_total",
        "steps_total",
    )

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        prefix: str = "",
        peak_flops: float | None = None,
        peak_flops_table: dict[str, dict[str, float]] | None = None,
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        tokens_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        if peak_flops is not None and _number(peak_flops) is None:
            raise ValueError(f"peak_flops must be a positive number of FLOP/s or None, got {peak_flops!r}")
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.peak_flops_table = self._check_table(peak_flops_table)
        for name, fn in (("batch_size_fn", batch_size_fn), ("tokens_fn", tokens_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a callable taking the batch, or None, got {fn!r}")
        self.batch_size_fn = batch_size_fn
        self.tokens_fn = tokens_fn

        # Cumulative, saved in checkpoints.
        self.samples_total = 0
        self.tokens_total = 0
        self.train_sec_total = 0.0
        self.val_sec_total = 0.0
        self.checkpoint_sec_total = 0.0
        self.steps_total = 0

        # Resolved at on_train_start.
        self._timing = False
        self._cuda = False
        self._world_size = 1
        self._peak: float | None = None
        self._flops_source: str | None = None
        self._total_steps: float | None = None
        self._stop_listening: list[Callable[[], None]] = []
        self._reset_fit_state()

    @staticmethod
    def _check_table(table: Any) -> dict[str, dict[str, float]]:
        if table is None:
            return {}
        if not isinstance(table, Mapping):
            raise ValueError(f"peak_flops_table must be a dict of {{device name: {{dtype: FLOP/s}}}}, got {table!r}")
        out: dict[str, dict[str, float]] = {}
        for name, row in table.items():
            if not isinstance(name, str) or not _tokens(name) or not isinstance(row, Mapping):
                raise ValueError(f"peak_flops_table entry {name!r}: {row!r} is not `device name: {{dtype: FLOP/s}}`")
            checked: dict[str, float] = {}
            for dtype, value in row.items():
                if dtype not in DTYPES:
                    raise ValueError(f"peak_flops_table[{name!r}] has dtype {dtype!r}; expected one of {DTYPES}")
                if _number(value) is None:
                    raise ValueError(f"peak_flops_table[{name!r}][{dtype!r}] must be a positive number, got {value!r}")
                checked[dtype] = float(value)
            out[name] = checked
        return out

    def _reset_fit_state(self) -> None:
        """Forget everything measured in the current fit that is not a cumulative total."""
        # The open interval: "step" (inside a training batch), "gap" (between batches), "val", or None.
        self._open: str | None = None
        self._open_t = 0.0
        self._open_event: Any = None  # the CUDA event that opened a step, or a gap that a step end opened
        self._gap_plain = False  # the open gap was opened by a step end and may be timed with CUDA events
        self._gap_checkpoint = False
        self._pending_checkpoint_sec = 0.0
        self._recent_gaps: deque[float] = deque(maxlen=16)  # host seconds of recent plain gaps: the fetch estimate
        self._logged_peak = False
        self._reset_window()

    def _reset_window(self) -> None:
        self._win_steps = 0
        self._win_batches = 0
        self._win_samples = 0
        self._win_tokens = 0
        self._win_flops = 0.0  # from flops_per_batch callables/numbers; flops_per_token is applied at the log
        self._win_step_sec = 0.0
        self._win_data_sec = 0.0
        self._win_step_events: list[tuple[Any, Any]] = []
        self._win_gap_events: list[tuple[Any, Any]] = []

    # ------------------------------------------------------------------------------------------------ measuring
    def _uses_device_events(self, trainer: Trainer) -> bool:
        """Whether steps are timed with device events (CUDA) rather than the host clock."""
        device = trainer.strategy.root_device
        return device.type == "cuda" and torch.cuda.is_available()

    def _new_event(self) -> Any:
        return torch.cuda.Event(enable_timing=True)

    def _mark(self) -> tuple[float, Any]:
        """Now on the host, plus a CUDA event recorded on the current stream when timing a CUDA device."""
        event = None
        if self._cuda:
            event = self._new_event()
            event.record()  # asynchronous: it only enqueues a marker on the stream
        return time.perf_counter(), event

    def _open_gap(self, t: float, event: Any = None, plain: bool = False) -> None:
        """Start a gap at ``t``. ``plain``: opened by a training batch's end, so it may hold only the next fetch."""
        self._open, self._open_t, self._open_event = "gap", t, event
        self._gap_plain = plain
        self._gap_checkpoint = False

    def _saved(self, trainer: Trainer, checkpoint_callback: Any, filepath: str) -> None:
        # Pushed by every ModelCheckpoint right after each file it writes (weights-only ones too, which skip
        # on_save_checkpoint): ModelCheckpoint's hooks run after ours, so the save sits in the gap we just opened.
        if self._open == "gap":
            self._gap_checkpoint = True

    def _close_gap(self, t: float, closer: str, event: Any = None, saved: bool | None = None) -> None:
        """Account the open interval, which ended at ``t`` with ``closer`` ("step", "val", "end"). ``saved``: whether
        the gap held a checkpoint save, when the caller already knows."""
        if self._open == "step":
            # A batch whose end hook never ran (on_train_batch_start returned -1): count it as time between steps.
            self._win_data_sec += t - self._open_t
            return
        if self._open != "gap":
            return
        host = t - self._open_t
        if saved if saved is not None else self._gap_checkpoint:
            # Only a gap that ends at a training batch holds a fetch besides the save: estimate it from recent gaps.
            fetch = statistics.median(self._recent_gaps) if closer == "step" and self._recent_gaps else 0.0
            saving = max(host - fetch, 0.0)
            self._pending_checkpoint_sec += saving
            self.checkpoint_sec_total += saving
            self._win_data_sec += host - saving
        elif self._gap_plain and closer == "step":
            self._recent_gaps.append(host)
            if self._cuda and self._open_event is not None and event is not None:
                self._win_gap_events.append((self._open_event, event))
            else:
                self._win_data_sec += host
        else:
            self._win_data_sec += host
        self._open = None

    def _count(self, pl_module: LightningModule, batch: Any) -> None:
        """Add the batch's samples, tokens and (per-batch) FLOPs. Shapes only: nothing here touches device values."""
        counted = (0, 0)
        if self.batch_size_fn is None or self.tokens_fn is None:
            found = count_batch(batch)
            if found is not None:
                counted = found
            else:
                self.warn_once("no-tensor", "found no tensor in the batch; pass batch_size_fn/tokens_fn to count it.")
        samples = int(self.batch_size_fn(batch)) if self.batch_size_fn is not None else counted[0]
        tokens = int(self.tokens_fn(batch)) if self.tokens_fn is not None else counted[1]
        self._win_batches += 1
        self._win_samples += samples
        self._win_tokens += tokens
        self.samples_total += samples * self._world_size
        self.tokens_total += tokens * self._world_size
        if self._flops_source == "flops_per_batch":
            value = getattr(pl_module, "flops_per_batch", None)
            if callable(value):
                try:
                    value = value(batch)
                except Exception as err:  # a wrong signature must not kill training: drop MFU instead
                    self.warn_once("flops-call", f"`flops_per_batch(batch)` failed ({err!r}); no TFLOP/s or MFU.")
                    self._flops_source = None
                    return
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                # A device value: add it on the device (no sync); it is read once, at the logging step.
                self._win_flops = self._win_flops + value.detach().double()
                return
            flops = _number(value)
            if flops is not None:
                self._win_flops += flops

    def _window_flops(self, pl_module: LightningModule) -> float | None:
        if self._flops_source == "flops_per_batch":
            return _number(self._win_flops)
        if self._flops_source == "flops_per_token":
            value = getattr(pl_module, "flops_per_token", None)
            if callable(value):
                try:
                    value = value()
                except Exception as err:
                    self.warn_once("flops-call", f"`flops_per_token()` failed ({err!r}); no TFLOP/s or MFU.")
                    self._flops_source = None
                    return None
            per_token = _number(value)
            return per_token * self._win_tokens if per_token is not None else None
        return None

    # ------------------------------------------------------------------------------------------------ set-up
    def _listen(self, trainer: Trainer) -> None:
        self._unlisten()
        if self._timing:
            self._stop_listening = [_compat.on_checkpoint_saved(cb, self._saved) for cb in trainer.checkpoint_callbacks]

    def _unlisten(self) -> None:
        for stop in self._stop_listening:
            stop()
        self._stop_listening = []

    def _resolve_flops(self, pl_module: LightningModule) -> None:
        self._flops_source = None
        for name in ("flops_per_batch", "flops_per_token"):
            value = getattr(pl_module, name, None)
            if value is not None and (callable(value) or _number(value) is not None):
                self._flops_source = name
                return

    def _resolve_peak(self, trainer: Trainer) -> tuple[float | None, str]:
        """The peak FLOP/s per device and a description of where it came from."""
        device = trainer.strategy.root_device
        dtype = precision_dtype(trainer.precision, tf32=device.type == "cuda" and tf32_enabled())
        if self.peak_flops is not None:
            return self.peak_flops, "the peak_flops argument"
        if device.type != "cuda" or not torch.cuda.is_available():
            return None, f"device {device.type!r}"
        name = torch.cuda.get_device_name(device)
        peak = lookup_peak_flops(name, dtype, self.peak_flops_table)
        return peak, f"{name!r} at {dtype or trainer.precision}"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_fit_state()
        self._world_size = max(int(trainer.world_size), 1)
        # Only rank zero logs, so only rank zero measures (and records CUDA events); every rank counts samples so
        # that the totals are right whichever rank's state a checkpoint keeps.
        self._timing = trainer.global_rank == 0 and bool(trainer.loggers)
        self._cuda = self._timing and self._uses_device_events(trainer)
        self._listen(trainer)
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:
            total = math.inf
        self._total_steps = total if math.isfinite(total) else None
        self._resolve_flops(pl_module)
        self._peak, source = self._resolve_peak(trainer)
        if self._timing:
            if self._flops_source is None:
                self.warn_once(
                    "no-flops",
                    "the LightningModule has no `flops_per_batch` or `flops_per_token` (training FLOPs, forward + "
                    "backward, per device), so throughput/device/tflops and throughput/mfu are not logged.",
                )
            elif self._peak is None:
                self.warn_once(
                    "no-peak",
                    f"no peak FLOP/s is known for {source}, so throughput/mfu is not logged. Pass "
                    "SpeedMonitor(peak_flops=<FLOP/s of one device>) or a peak_flops_table row.",
                )
            else:
                peak_tflops = self._peak / 1e12
                rank_zero_info(
                    f"SpeedMonitor: MFU is computed against {peak_tflops:.1f} TFLOP/s per device ({source})."
                )
        if self._timing:
            self._open_gap(time.perf_counter())  # not plain: the first gap holds the loop's start-up, not just a fetch

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._timing:
            saved = self._open == "gap" and self._gap_checkpoint
            if saved or self._pending_checkpoint_sec > 0:
                # A gap that held a save is timed on the host; report the save before this step starts.
                self._close_gap(time.perf_counter(), "step", saved=saved)
                self.log_metrics(trainer, {"time/checkpoint_sec": self._pending_checkpoint_sec})
                self._pending_checkpoint_sec = 0.0
            t, event = self._mark()
            self._close_gap(t, "step", event, saved=False)  # a no-op when closed above
            self._open, self._open_t, self._open_event = "step", t, event
        self._count(pl_module, batch)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Under gradient accumulation only the last micro-batch steps the optimizer (the suite's step clock).
        stepped = self._clock.steps_optimizer(trainer)
        self._win_steps += int(stepped)
        self.steps_total += int(stepped)
        if not self._timing or self._open != "step":
            return
        t, event = self._mark()
        if self._cuda:
            self._win_step_events.append((self._open_event, event))
        else:
            self._win_step_sec += t - self._open_t
        self._open_gap(t, event, plain=True)
        if stepped and self._win_steps > 0 and self.is_logging_step(trainer):
            self._flush(trainer, pl_module, event)

    def _flush(self, trainer: Trainer, pl_module: LightningModule, last_event: Any) -> None:
        """Turn the window into metrics and log them. On CUDA, the one synchronisation of the window."""
        step_sec, data_sec = self._win_step_sec, self._win_data_sec
        if self._cuda and last_event is not None:
            last_event.synchronize()  # every earlier event of the window is on the same stream, so done too
            step_sec += sum(s.elapsed_time(e) for s, e in self._win_step_events) / 1e3
            data_sec += sum(s.elapsed_time(e) for s, e in self._win_gap_events) / 1e3
        window_sec = step_sec + data_sec
        steps = self._win_steps
        self.train_sec_total += window_sec
        metrics: dict[str, float] = {
            "time/step_ms": 1e3 * step_sec / steps,
            "time/data_wait_ms": 1e3 * data_sec / steps,
            "throughput/samples_total": float(self.samples_total),
            "throughput/tokens_total": float(self.tokens_total),
            "time/train_total_min": self.train_sec_total / 60.0,
        }
        if window_sec > 0:
            samples_rate, tokens_rate = self._win_samples / window_sec, self._win_tokens / window_sec
            metrics["throughput/device/samples_per_sec"] = samples_rate
            metrics["throughput/device/tokens_per_sec"] = tokens_rate
            metrics["throughput/samples_per_sec"] = samples_rate * self._world_size
            metrics["throughput/tokens_per_sec"] = tokens_rate * self._world_size
            flops = self._window_flops(pl_module)
            if flops is not None and flops > 0:
                metrics["throughput/device/tflops"] = flops / window_sec / 1e12
                if self._peak is not None:
                    mfu = flops / window_sec / self._peak
                    if mfu <= 1.0:
                        metrics["throughput/mfu"] = mfu
                    else:
                        # Impossible by definition: the peak or the FLOP count is wrong. Never logged as an MFU.
                        metrics["throughput/mfu_error"] = mfu
                        self.warn_once(
                            "mfu-above-peak",
                            f"error: MFU {100 * mfu:.0f}% at step {self.step(trainer)} is above 100%, so the peak"
                            f" ({self._peak / 1e12:.4g} TFLOP/s per device) or the module's FLOP count is wrong;"
                            " logged as throughput/mfu_error instead of throughput/mfu. Fix peak_flops /"
                            " peak_flops_table or flops_per_token.",
                        )
        if self._peak is not None and not self._logged_peak:
            metrics["throughput/peak_tflops"] = self._peak / 1e12
            self._logged_peak = True
        if self._total_steps is not None and self.steps_total > 0:
            remaining = max(self._total_steps - trainer.global_step, 0.0)
            overhead = (self.val_sec_total + self.checkpoint_sec_total) / self.steps_total
            metrics["time/eta_min"] = remaining * (window_sec / steps + overhead) / 60.0
        self.log_metrics(trainer, metrics)
        self._reset_window()

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._timing or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        t = time.perf_counter()
        self._close_gap(t, "val")
        self._open, self._open_t, self._open_event = "val", t, None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._timing or self._open != "val":
            return
        t = time.perf_counter()
        seconds = t - self._open_t
        self.val_sec_total += seconds
        self.log_metrics(trainer, {"time/val_sec": seconds})
        self._open_gap(time.perf_counter())  # a save on validation end starts here; the log above is not data wait

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._open == "gap":
            self._gap_checkpoint = True

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._timing:
            return
        # The epoch's last gap holds no fetch; the next one holds the new epoch's iterator set-up and first fetch.
        t = time.perf_counter()
        self._close_gap(t, "end")
        self._open_gap(t)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unlisten()
        if not self._timing:
            return
        self._close_gap(time.perf_counter(), "end")
        if self._pending_checkpoint_sec > 0:
            self.log_metrics(trainer, {"time/checkpoint_sec": self._pending_checkpoint_sec})
        self._reset_fit_state()  # drop the CUDA events

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._STATE_KEYS}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Older or foreign checkpoints may lack some entries: keep the defaults for those.
        for key in self._STATE_KEYS:
            value = (state_dict or {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                default = getattr(self, key)
                setattr(self, key, type(default)(value))
