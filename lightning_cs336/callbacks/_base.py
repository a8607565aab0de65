"""Shared plumbing for the telemetry callbacks: one cheap path from device values to every attached logger.

Why not ``pl_module.log``? Measured on CPU, each ``self.log`` call costs ~0.2 ms whatever the value (most of it in
``_ResultMetric.to(device)``), so logging tens of keys per step that way costs several percent of throughput. These
helpers instead gather all of a callback's values, move the tensors to the host in ONE transfer, and hand the whole
dict to each logger's ``log_metrics`` in one call, on logging steps only.

This module imports only torch and lightning (wandb lazily), so the callbacks stay reusable in any Lightning project.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

__all__ = [
    "TelemetryCallback",
    "clean_param_name",
    "first_tensor",
    "git_state",
    "find_logger",
    "log_rows",
    "log_scalars",
    "logger_dir",
    "to_host",
]


def _is_wandb(logger: Logger) -> bool:
    return type(logger).__name__ == "WandbLogger"


def _is_tensorboard(logger: Logger) -> bool:
    return type(logger).__name__ == "TensorBoardLogger"


def find_logger(trainer: Trainer, kind: str) -> Logger | None:
    """Return the first attached logger of ``kind`` (``"wandb"``, ``"tensorboard"``, ``"csv"``), or None.

    Matching is by class name so that importing a logger class (and its optional dependency) is never needed.
    """
    names = {"wandb": "WandbLogger", "tensorboard": "TensorBoardLogger", "csv": "CSVLogger"}
    wanted = names.get(kind, kind)
    for logger in trainer.loggers:
        if type(logger).__name__ == wanted:
            return logger
    return None


def logger_dir(trainer: Trainer, logger: Logger | None = None) -> Path:
    """A directory to write file-based fallbacks into: the logger's ``log_dir``, else the trainer's."""
    for candidate in ([logger] if logger is not None else []) + list(trainer.loggers):
        path = getattr(candidate, "log_dir", None)
        if path is None and _is_wandb(candidate):
            path = getattr(candidate, "save_dir", None)
        if path:
            return Path(path)
    return Path(trainer.log_dir or trainer.default_root_dir)


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert a dict of numbers and scalar tensors to Python floats with one host-device transfer per device.

    Tensors on the same device are stacked and copied together: N metrics cost one sync, not N.
    Non-numeric values (strings, dicts) are passed through unchanged.
    """
    out: dict[str, Any] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append((key, value.detach().reshape(()).float()))
        elif isinstance(value, bool):
            out[key] = float(value)
        else:
            out[key] = value
    for items in by_device.values():
        host = torch.stack([v for _, v in items]).cpu().tolist()
        out.update({key: val for (key, _), val in zip(items, host, strict=True)})
    return out


def log_scalars(trainer: Trainer, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Hand ``metrics`` to every logger of ``trainer`` in one ``log_metrics`` call each. Rank zero only.

    Returns the host values that were logged (empty on other ranks or with no logger).
    """
    if trainer.global_rank != 0 or not trainer.loggers or not metrics:
        return {}
    values = to_host(metrics)
    step = TelemetryCallback.step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    return values


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def log_rows(
    trainer: Trainer,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int | None = None,
    wandb_rows: Sequence[Sequence[Any]] | None = None,
) -> None:
    """Log a table of rows to every logger, with an equivalent for loggers that have no tables. Rank zero only.

    - W&B: a ``wandb.Table`` under ``key`` (built from ``wandb_rows`` when given, e.g. the full history of rows,
      since W&B tables cannot be appended to).
    - TensorBoard: the new rows as a markdown table via ``add_text``.
    - Any other logger (CSV, ...): the new rows appended as JSON lines to ``<log_dir>/<key with / as _>.jsonl``.
    """
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    step = TelemetryCallback.step(trainer) if step is None else step
    columns = list(columns)
    for logger in trainer.loggers:
        if _is_wandb(logger):
            import wandb

            table = wandb.Table(
                columns=columns, data=[list(r) for r in (wandb_rows if wandb_rows is not None else rows)]
            )
            logger.experiment.log({key: table, "trainer/global_step": step})
        elif _is_tensorboard(logger):
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join(
                "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>") for c in row) + " |\n"
                for row in rows
            )
            logger.experiment.add_text(key, header + body, global_step=step)
        else:
            path = logger_dir(trainer, logger) / (key.replace("/", "_") + ".jsonl")
            os.makedirs(path.parent, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                for row in rows:
                    record = {"step": step, **{c: _jsonable(v) for c, v in zip(columns, row, strict=False)}}
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")


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


class TelemetryCallback(Callback):
    """Base class: argument checks, the logging interval, key prefixing and the no-logger warning.

    Args:
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key this callback logs (e.g. ``"ft/"`` gives ``ft/time/step_ms``).
    """

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "") -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive integer or None, got {log_every_n_steps!r}")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self._warned: set[str] = set()

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

    def interval(self, trainer: Trainer) -> int:
        """The logging interval in optimizer steps."""
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    @staticmethod
    def step(trainer: Trainer) -> int:
        """The step axis Lightning itself logs on (``self.log``, ``LearningRateMonitor``): optimizer steps taken
        before the current batch. Inside the training-batch hooks it equals ``global_step`` before the optimizer
        steps, so values a callback measures for a batch land on the same row as that batch's ``train/loss``."""
        return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))

    def is_logging_step(self, trainer: Trainer) -> bool:
        """Whether the current training batch logs: the same rule as Lightning's own ``log_every_n_steps``
        (``(step + 1) % n == 0``), or the trainer is about to stop. Never during the sanity check."""
        if trainer.sanity_checking:
            return False
        return (self.step(trainer) + 1) % self.interval(trainer) == 0 or trainer.should_stop

    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Prefix the keys and hand them to every logger in one call (see :func:`log_scalars`)."""
        if self.prefix:
            metrics = {self.prefix + k: v for k, v in metrics.items()}
        return log_scalars(trainer, metrics, step)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers:
            self.warn_once("no-logger", "the Trainer has no logger, so nothing this callback measures is recorded.")
