"""The suite's base: the step clock, the callback base class, and the small helpers every callback shares.

Where values go (loggers and their fallbacks) lives in :mod:`~lightning_cs336.callbacks._sinks`; reads of Lightning
internals in :mod:`~lightning_cs336.callbacks._compat`. This module imports only torch and lightning, so the callbacks
stay reusable in any Lightning project.

**The logging interval, once for the whole suite.** Every callback takes ``log_every_n_steps``:

- a positive integer: log every that many *optimizer* steps, on the steps where ``(step + 1) % n == 0`` (the rule of
  Lightning's own ``Trainer(log_every_n_steps=...)``, so the callbacks' rows land on the rows of ``self.log``), and
  on the last step when the trainer stops;
- ``None``: follow ``Trainer(log_every_n_steps=...)``;
- ``0``: never during training, for callbacks that also record at the end (``TextSampleLogger``); the others reject it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn
from typing_extensions import override

from lightning_cs336.callbacks import _compat

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None
from lightning_cs336.callbacks._sinks import log_scalars

__all__ = [
    "StepClock",
    "TelemetryCallback",
    "check_positive_int",
    "clean_param_name",
    "count_batch",
    "distributed_ready",
    "first_tensor",
    "git_state",
    "is_dtensor",
    "local_tensor",
]


def check_positive_int(name: str, value: Any, optional: bool = False, zero: bool = False) -> Any:
    """Return ``value`` if it is a positive int (or None when ``optional``, or 0 when ``zero``), else raise a
    ValueError that repeats it. ``bool`` is rejected although it is an int: a stray ``True`` must not mean 1."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or (zero and value == 0))
    if not ok and not (optional and value is None):
        allowed = "a positive integer" + (" or 0" if zero else "") + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def distributed_ready(trainer: Trainer) -> bool:
    """Whether collectives can run: several processes and an initialised default process group."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallel) holding only this rank's shard."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), else the tensor itself; detached."""
    return (tensor.to_local() if is_dtensor(tensor) else tensor).detach()


# Names that wrappers (Fabric, FSDP1, activation checkpointing, torch.compile) insert into parameter paths.
_WRAPPER_PARTS = frozenset({"_forward_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_param_name(name: str) -> str:
    """A parameter's name without wrapper components: ``_orig_mod.layers.0.w`` -> ``layers.0.w``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a (nested) batch, depth first through tuples, lists and dict values: ``x`` of ``(x, y)``,
    the first value of a dict. Its shape gives samples and tokens per batch without a host-device sync."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def git_state(cwd: str | os.PathLike[str] | None = None, timeout: float = 5.0) -> tuple[str | None, bool | None]:
    """The commit checked out in ``cwd`` and whether tracked files differ from it; ``(None, None)`` outside a git
    repository, without git, or when git does not answer within ``timeout`` seconds. Untracked files do not make a
    tree dirty (logs and checkpoints are usually untracked)."""
    # Do not take the index lock: another git process (an editor, a concurrent run) must not fail because of us.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    commit = head.stdout.strip() or None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return commit, dirty


def count_batch(batch: Any) -> tuple[int, int] | None:
    """``(samples, tokens)`` of one batch from its first tensor's shape (``shape[0]`` and ``numel()``: ``B`` and
    ``B * T`` for ``(input_ids, targets)`` of shape ``(B, T)``), or None without a tensor. No device sync."""
    tensor = first_tensor(batch)
    if tensor is None:
        return None
    return (int(tensor.shape[0]) if tensor.dim() > 0 else 0), tensor.numel()


class StepClock:
    """Where the current training batch sits on the optimizer-step axis: the suite's one answer to "does this batch
    step the optimizer", "is this a logging step" and "which step do values go on". Stateless reads of the fit loop
    (see :mod:`._compat`), so it needs no hooks of its own and survives a resume unchanged.

    Args:
        log_every_n_steps: The interval; see the module docstring.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps

    def interval(self, trainer: Trainer) -> int:
        """The logging interval in optimizer steps (0: never during training)."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return max(int(trainer.log_every_n_steps), 1)

    @staticmethod
    def step(trainer: Trainer) -> int:
        """The step axis Lightning itself logs on (``self.log``, ``LearningRateMonitor``): optimizer steps taken
        before the current batch. Inside the training-batch hooks it equals ``global_step`` before the optimizer
        steps, so values a callback measures for a batch land on the same row as that batch's ``train/loss``."""
        return _compat.batches_that_stepped(trainer)

    @staticmethod
    def steps_optimizer(trainer: Trainer) -> bool:
        """Whether the current training batch ends an optimizer step (it is not an accumulating micro-batch).
        Valid from ``on_train_batch_start`` through ``on_train_batch_end``."""
        return _compat.batch_steps_optimizer(trainer)

    def is_logging_step(self, trainer: Trainer) -> bool:
        """Whether the current training batch logs: it steps the optimizer and ``(step + 1) % n == 0`` (Lightning's
        own rule), or the trainer is about to stop. Never during the sanity check or with an interval of 0."""
        if trainer.sanity_checking or not self.steps_optimizer(trainer):
            return False
        n = self.interval(trainer)
        return n > 0 and ((self.step(trainer) + 1) % n == 0 or trainer.should_stop)


class TelemetryCallback(Callback):
    """Base class: argument checks, the step clock, key prefixing and the no-logger warning.

    Args:
        log_every_n_steps: The logging interval in optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``
            (see the module docstring).
        prefix: Prepended to every key this callback logs (e.g. ``"ft/"`` gives ``ft/time/step_ms``).
    """

    #: Whether ``log_every_n_steps=0`` (no periodic logging) makes sense for this callback.
    _ALLOWS_ZERO_INTERVAL = False

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "") -> None:
        check_positive_int("log_every_n_steps", log_every_n_steps, optional=True, zero=self._ALLOWS_ZERO_INTERVAL)
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        self._clock = StepClock(log_every_n_steps)
        self.prefix = prefix
        self._warned: set[str] = set()

    @property
    def log_every_n_steps(self) -> int | None:
        """The logging interval as given (``None``: the Trainer's)."""
        return self._clock.log_every_n_steps

    @property
    def every_n_steps(self) -> int | None:
        """Deprecated name of :attr:`log_every_n_steps` (``TextSampleLogger``, ``HistogramLogger`` before 0.2)."""
        return self._clock.log_every_n_steps

    @staticmethod
    def _deprecated_interval(every_n_steps: Any, none_means: int | None) -> Any:
        """Map the deprecated ``every_n_steps`` argument onto ``log_every_n_steps``.

        ``none_means``: what ``every_n_steps=None`` meant for this callback (``TextSampleLogger``: 0, only at the end).
        """
        check_positive_int("every_n_steps", every_n_steps, optional=True)
        rank_zero_deprecation("`every_n_steps` is deprecated: use `log_every_n_steps` (the suite's one name for it).")
        return none_means if every_n_steps is None else every_n_steps

    @property
    @override
    def state_key(self) -> str:
        # Two instances with different prefixes (e.g. pretraining and fine-tuning stages) keep separate checkpoint
        # states; Lightning would otherwise store both under the class name, one overwriting the other.
        return self._generate_state_key(prefix=self.prefix)

    def warn_once(self, key: str, message: str) -> None:
        """Emit ``message`` once per callback instance (rank zero only)."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{type(self).__name__}: {message}")

    # The clock's questions, asked through the callback so subclasses read naturally.
    def interval(self, trainer: Trainer) -> int:
        """The logging interval in optimizer steps."""
        return self._clock.interval(trainer)

    @staticmethod
    def step(trainer: Trainer) -> int:
        """See :meth:`StepClock.step`."""
        return StepClock.step(trainer)

    def is_logging_step(self, trainer: Trainer) -> bool:
        """See :meth:`StepClock.is_logging_step`."""
        return self._clock.is_logging_step(trainer)

    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Prefix the keys and hand them to every logger in one call (see :func:`._sinks.log_scalars`)."""
        if self.prefix:
            metrics = {self.prefix + k: v for k, v in metrics.items()}
        return log_scalars(trainer, metrics, self.step(trainer) if step is None else step)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers:
            self.warn_once("no-logger", "the Trainer has no logger, so nothing this callback measures is recorded.")
