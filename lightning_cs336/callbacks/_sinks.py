"""Sinks: the one place where the suite's values reach the attached loggers.

Every kind of object the callbacks record goes through one function here, and each function dispatches on the
logger's class (``isinstance``, so subclasses of ``WandbLogger`` are W&B loggers too):

| function         | W&B                                  | TensorBoard                      | other loggers         |
|------------------|--------------------------------------|----------------------------------|-----------------------|
| ``log_scalars``  | ``log_metrics``                      | ``log_metrics``                  | ``log_metrics``       |
| ``log_table``    | ``WandbLogger.log_table`` (all rows) | markdown ``add_text`` (new rows) | ``<key>.jsonl``       |
| ``log_histograms`` | ``wandb.Histogram`` + stats        | ``add_histogram_raw`` + stats    | stats as metrics      |
| ``log_summary``  | ``experiment.summary``               | last row + JSON file             | last row + JSON file  |
| ``logger_dir``   | the run's save dir                   | ``log_dir``                      | ``log_dir``           |

A logger may also implement the method of the same name itself (``log_table``, ``log_histograms``, ``log_summary``):
then it gets the call as is. That is how new kinds of sink (a local run record) plug in without touching the
callbacks.

Why not ``pl_module.log``? Measured on CPU, each ``self.log`` call costs ~0.2 ms whatever the value (most of it in
``_ResultMetric.to(device)``), so logging tens of keys per step that way costs several percent of throughput. These
functions gather all of a callback's values, move the tensors to the host in ONE transfer, and hand the whole dict to
each logger in one call, on logging steps only. Everything here runs on global rank zero only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

__all__ = [
    "find_logger",
    "json_safe",
    "log_histograms",
    "log_scalars",
    "log_summary",
    "log_table",
    "logger_dir",
    "to_host",
    "to_host_rows",
]

#: Histogram data handed to :func:`log_histograms`: key -> (fields, bucket counts, bucket edges). ``fields`` holds at
#: least ``min``, ``max``, ``num``, ``sum`` and ``sum_squares``.
Histograms = Mapping[str, tuple[Mapping[str, float], Sequence[float], Sequence[float]]]


def find_logger(trainer: Trainer, kind: type[Logger]) -> Logger | None:
    """The first attached logger that is an instance of ``kind``, or None."""
    return next((logger for logger in trainer.loggers if isinstance(logger, kind)), None)


def logger_dir(trainer: Trainer, logger: Logger | None = None) -> Path:
    """A directory to write file-based fallbacks into: the logger's ``log_dir`` (W&B: its ``save_dir``), else the
    first logger's that has one, else the trainer's."""
    for candidate in ([logger] if logger is not None else []) + list(trainer.loggers):
        path = getattr(candidate, "log_dir", None)
        if path is None and isinstance(candidate, WandbLogger):
            path = candidate.save_dir
        if path:
            return Path(path)
    return Path(trainer.log_dir or trainer.default_root_dir)


def json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy of ``value``: containers recurse, tensors and paths become plain values, non-finite
    floats become strings (W&B metadata and JSON lines reject NaN), anything else its ``repr``."""
    if depth > 8:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        return json_safe(value.item() if value.numel() == 1 else value.tolist(), depth + 1)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, depth + 1) for v in value]
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return json_safe(vars(value), depth + 1)
    return repr(value)


def _host_groups(values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Copy tensors of one shape to the host, one ``stack().cpu()`` per (device, dtype): N values cost one sync."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, tensor in values.items():
        groups.setdefault((tensor.device, tensor.dtype), []).append(key)
    out: dict[str, Any] = {}
    for keys in groups.values():
        host = torch.stack([values[k] for k in keys]).cpu().tolist()
        out.update(zip(keys, host, strict=True))
    return out


def to_host(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars (numbers and one-element tensors) as Python floats, with one host-device transfer per device.

    Non-numeric values (strings, dicts) are passed through unchanged; bools become floats.
    """
    out: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().reshape(()).float()
        elif isinstance(value, bool):
            out[key] = float(value)
        else:
            out[key] = value
    out.update(_host_groups(tensors))
    return out


def to_host_rows(vectors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """1-D tensors of equal length per dtype (e.g. histogram summaries) as lists, one transfer per device."""
    return _host_groups({k: v.detach() for k, v in vectors.items()})


def log_scalars(trainer: Trainer, metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Hand ``metrics`` to every logger in one ``log_metrics`` call each. Rank zero only.

    Returns:
        The host values that were logged (empty on other ranks or with no logger).
    """
    if trainer.global_rank != 0 or not trainer.loggers or not metrics:
        return {}
    values = to_host(metrics)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    return values


def log_table(
    trainer: Trainer,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int,
    all_rows: Sequence[Sequence[Any]] | None = None,
) -> None:
    """Log the new ``rows`` of a table to every logger, with an equivalent for loggers that have no tables.

    Args:
        trainer: The trainer whose loggers receive the table (rank zero only).
        key: The table's key, e.g. ``samples/generations``.
        columns: Column names.
        rows: The rows added since the last call.
        step: The step the rows belong to.
        all_rows: Every row so far, for loggers that can only replace a table (W&B tables cannot be appended to).
    """
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    columns = list(columns)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            data = [list(r) for r in (all_rows if all_rows is not None else rows)]
            logger.log_table(key, columns=columns, data=data, step=step)
        elif callable(getattr(logger, "log_table", None)):
            logger.log_table(key, columns=columns, data=[list(r) for r in rows], step=step)
        elif isinstance(logger, TensorBoardLogger):
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
                    record = {"step": step, **{c: json_safe(v) for c, v in zip(columns, row, strict=False)}}
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def log_histograms(
    trainer: Trainer, histograms: Histograms, stats: Mapping[str, float], step: int, stats_everywhere: bool = True
) -> None:
    """Histograms to loggers that draw them (W&B, TensorBoard); their statistics (``stats``) to every logger.

    Args:
        trainer: The trainer whose loggers receive them (rank zero only).
        histograms: ``key -> (fields, counts, edges)``; see :data:`Histograms`.
        stats: Scalar statistics of the same tensors (``<key>/mean``, ...).
        step: The step they belong to.
        stats_everywhere: Also give ``stats`` to the loggers that draw the histograms (the others always get them).
    """
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            payload: dict[str, Any] = {
                key: wandb.Histogram(np_histogram=([int(c) for c in counts], list(edges)))
                for key, (_, counts, edges) in histograms.items()
            }
            if stats_everywhere:
                payload.update(stats)
            payload["trainer/global_step"] = step
            logger.experiment.log(payload)
        elif callable(getattr(logger, "log_histograms", None)):
            logger.log_histograms(histograms, stats, step=step)
        elif isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for key, (fields, counts, edges) in histograms.items():
                writer.add_histogram_raw(
                    key,
                    min=fields["min"],
                    max=fields["max"],
                    num=int(fields["num"]),
                    sum=fields["sum"],
                    sum_squares=fields["sum_squares"],
                    bucket_limits=list(edges[1:]),
                    bucket_counts=list(counts),
                    global_step=step,
                )
            if stats_everywhere:
                logger.log_metrics(dict(stats), step=step)
        else:
            logger.log_metrics(dict(stats), step=step)


def log_summary(
    trainer: Trainer, summary: Mapping[str, Any], step: int, file_name: str, extra: Mapping[str, Any] | None = None
) -> None:
    """The run's final values: W&B's run summary; elsewhere one last metrics row plus ``file_name`` (JSON, holding
    ``{"summary": ..., **extra}``) in the logger's directory, written once per directory."""
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    written: set[Path] = set()
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(dict(summary))
            continue
        if callable(getattr(logger, "log_summary", None)):
            logger.log_summary(dict(summary), step=step)
            continue
        logger.log_metrics({k: float(v) for k, v in summary.items()}, step=step)
        path = logger_dir(trainer, logger) / file_name
        if path not in written:
            written.add(path)
            os.makedirs(path.parent, exist_ok=True)
            record = {"summary": dict(summary), **(extra or {})}
            path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
