"""Run queries: load finished (or running, or killed) runs from whatever they left on disk, and ask questions of them.

Sources, each read into one :class:`Run`:

- ``record``: a local run record (``run.json`` + ``metrics.jsonl`` + ``events.jsonl``, see :mod:`.record`);
- ``wandb-offline``: an offline W&B run directory (read with :mod:`.wandb_reader`, no server);
- ``csv``: a ``CSVLogger`` version directory (``metrics.csv`` + ``hparams.yaml``);
- ``wandb-api``: runs of a W&B project through ``wandb.Api`` (online only; thin, on W&B's public API).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Run"]

Source = Literal["record", "wandb-offline", "csv", "wandb-api"]


@dataclass
class Run:
    """One training run, whatever recorded it.

    Attributes:
        name: The run's name (W&B run name, record name, CSV logger name/version).
        source: What it was read from.
        path: The directory it was read from (None for ``wandb-api``).
        state: ``running``, ``finished``, ``failed``, ``killed`` or ``preempted`` (``unknown`` where the source
            cannot tell, e.g. CSV).
        config: The resolved configuration, nested as logged (``{"model": {"d_model": 128}, ...}`` or flat).
        tags: Tags.
        group: Group (an ablation, a sweep), if any.
        notes: Free text, if any.
        run_id: The W&B run id (or the record's id).
        created_at: Unix seconds, if known.
        history: ``metric key -> [(step, value), ...]`` in logging order; values are floats (NaN kept as nan).
        summary: Final values (``summary/*`` of RunInfoLogger, W&B's run summary).
        tables: ``table key -> (columns, rows)``, every row so far (e.g. ``samples/generations``).
        checkpoints: One dict per checkpoint event: ``step``, ``path``, and where known ``best_path``, ``monitor``,
            ``score``, ``aliases``.
    """

    name: str
    source: Source
    path: Path | None = None
    state: str = "unknown"
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    notes: str | None = None
    run_id: str | None = None
    created_at: float | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
