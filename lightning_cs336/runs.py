"""Run queries: load finished (or running, or killed) runs from whatever they left on disk, and ask questions of them.

Size note (~840 lines): four sources read into one ``Run`` (with their de-duplication), the queries and the curve
plot; split, every part would import the same private value helpers. The CLI front end is ``cli/runs.py``.

Sources, each read into one :class:`Run`:

- ``record``: a local run record (``run.json`` + ``metrics.jsonl`` + ``events.jsonl``, see :mod:`.record`);
- ``wandb-offline``: an offline W&B run directory (read with :mod:`.wandb_reader`, no server);
- ``csv``: a ``CSVLogger`` version directory (``metrics.csv`` + ``hparams.yaml``);
- ``wandb-api``: runs of a W&B project through ``wandb.Api`` (online only; thin, on W&B's public API).

One training run often leaves several of these (``cs336 fit`` writes ``runs/<project>/<name>/`` with the record,
``wandb/offline-run-*`` and, with W&B off, ``csv/`` inside it). :func:`discover_runs` returns it once, preferring
the record: it is flushed line by line, while an offline W&B log reaches disk in 32 KiB blocks and a killed run's log
is cut short.

Example::

    from lightning_cs336.runs import best_run, config_diff, discover_runs, plot_runs

    runs = discover_runs(["runs"])
    print(best_run(runs, "val/loss").name, config_diff(runs))
    plot_runs(runs, ["train/loss", "val/loss"], "curves.png", smoothing=0.6)
"""

from __future__ import annotations

import csv
import fnmatch
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_cs336.record import RecordedRun
    from lightning_cs336.wandb_reader import OfflineRun

__all__ = [
    "VOLATILE_CONFIG_KEYS",
    "Point",
    "Run",
    "best",
    "best_run",
    "config_diff",
    "discover_runs",
    "ema",
    "filter_runs",
    "final",
    "flatten_config",
    "load_project",
    "load_run",
    "make_figure",
    "plot_runs",
    "steps",
    "tokens_seen",
]

Source = Literal["record", "wandb-offline", "csv", "wandb-api"]

#: Config keys (``fnmatch`` patterns over dotted keys) that :func:`config_diff` leaves out by default: they differ
#: between any two runs without saying anything about the experiment (where, when, by which process, into which
#: directory). Software versions, ``git_commit`` and ``git_dirty`` are kept: they can explain a difference.
VOLATILE_CONFIG_KEYS: tuple[str, ...] = (
    "run_info.environment.hostname",
    "run_info.environment.cwd",
    "run_info.environment.command",
    "*pid",
    "*timestamp",
    "*created_at",
    "*save_dir",
    "*dirpath",
    "*default_root_dir",
    "*ckpt_path",
    "trainer.logger*",  # the logger list holds the run's name and directories
    "_wandb*",
)

_WANDB_RUN_DIR = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-.+$")
_CSV_FILE, _HPARAMS_FILE = "metrics.csv", "hparams.yaml"
# Keys in every row of a source that are bookkeeping, not metrics.
_NOT_METRICS = {"step", "time", "trainer/global_step"}


class Point(NamedTuple):
    """One logged value: the step it was logged at and the value."""

    step: int
    value: float


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
        project: The project, if known.
        also: Other directories that recorded this same run and were folded into it (an offline W&B directory
            next to its record, earlier segments of a resumed W&B run).
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
    project: str | None = None
    also: list[Path] = field(default_factory=list)

    def metrics(self) -> list[str]:
        """The metric keys this run logged, sorted."""
        return sorted(self.history)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary of the run (identity, state, config, final/best losses; not the full history)."""
        return {
            "name": self.name,
            "source": self.source,
            "path": str(self.path) if self.path else None,
            "state": self.state,
            "run_id": self.run_id,
            "project": self.project,
            "group": self.group,
            "tags": list(self.tags),
            "notes": self.notes,
            "created_at": self.created_at,
            "steps": steps(self),
            "tokens_seen": tokens_seen(self),
            "metrics": self.metrics(),
            "summary": self.summary,
            "config": self.config,
            "also": [str(p) for p in self.also],
        }


# --------------------------------------------------------------------------------------------------------- values


def _number(value: Any) -> float | None:
    """A metric value as a float: numbers and bools as they are, ``"nan"``/``"inf"`` strings (the record's spelling
    of non-finite values) as floats; anything else (text, tables, dicts) is not a metric value."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value.strip().lower().replace("infinity", "inf"))
    return None


def _step(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _add(history: dict[str, list[tuple[int, float]]], key: str, step: int, value: Any) -> None:
    number = _number(value)
    if number is not None:
        history.setdefault(key, []).append((step, number))


# -------------------------------------------------------------------------------------------------------- loading


def _from_record(rec: RecordedRun) -> Run:
    meta = rec.meta
    history: dict[str, list[tuple[int, float]]] = {}
    for row in rec.metrics:
        step = _step(row.get("step"))
        if step is None:
            continue
        for key, value in row.items():
            if key not in _NOT_METRICS:
                _add(history, key, step, value)
    # ``config`` is what ``cs336 fit`` resolved (nested); a plain Trainer leaves it empty and only ``hparams``
    # (the module's and datamodule's, flat) is there. RunInfoLogger's ``run_info`` facts arrive as hparams.
    hparams = meta.get("hparams") or {}
    config = dict(meta.get("config") or {}) or dict(hparams)
    if "run_info" in hparams and "run_info" not in config:
        config["run_info"] = hparams["run_info"]
    keys = dict.fromkeys(e.get("key") for e in rec.events_of("table") if isinstance(e.get("key"), str))
    checkpoints = [
        {k: e.get(k) for k in ("step", "path", "best_path", "monitor", "score")} for e in rec.events_of("checkpoint")
    ]
    return Run(
        name=str(meta.get("name") or rec.path.name),
        source="record",
        path=rec.path,
        state=rec.state,
        config=config,
        tags=list(meta.get("tags") or []),
        group=meta.get("group"),
        notes=meta.get("notes"),
        run_id=meta.get("wandb_run_id") or meta.get("id"),
        created_at=_number(meta.get("created_at")),
        history=history,
        summary=dict(meta.get("summary") or {}),
        tables={key: rec.table(key) for key in keys if key},
        checkpoints=checkpoints,
        project=meta.get("project"),
    )


def _wandb_state(run: OfflineRun) -> str:
    if run.exit_code is None:
        # No exit record: killed, or still running (an offline log cannot tell; it reaches disk in blocks).
        return "killed"
    return "finished" if run.exit_code == 0 else "failed"


def _from_offline(run: OfflineRun) -> Run:
    history: dict[str, list[tuple[int, float]]] = {}
    for row in run.history:
        step = _step(row.get("trainer/global_step", row.get("_step")))
        if step is None:
            continue
        for key, value in row.items():
            if not key.startswith("_") and key not in _NOT_METRICS:
                _add(history, key, step, value)
    checkpoints = []
    for artifact in run.artifacts:
        if artifact.get("type") != "model":
            continue
        metadata = artifact.get("metadata") if isinstance(artifact.get("metadata"), dict) else {}
        # Lightning's WandbLogger puts the ModelCheckpoint's settings (monitor, mode...) into the metadata.
        settings = metadata.get("ModelCheckpoint") if isinstance(metadata.get("ModelCheckpoint"), dict) else {}
        entries = artifact.get("entries") or [{}]
        checkpoints.append(
            {
                "step": metadata.get("step"),
                "path": entries[0].get("local_path") or entries[0].get("path"),
                "monitor": settings.get("monitor"),
                "score": metadata.get("score"),
                "aliases": artifact.get("aliases", []),
            }
        )
    return Run(
        name=run.name or run.run_id,
        source="wandb-offline",
        path=run.path,
        state=_wandb_state(run),
        config=dict(run.config),
        tags=list(run.tags),
        group=run.group,
        notes=run.notes,
        run_id=run.run_id,
        created_at=run.start_time,
        history=history,
        summary={k: v for k, v in run.summary.items() if not k.startswith("_")},
        tables={k: (t["columns"] or [], t["data"] or []) for k, t in run.tables.items() if t.get("columns")},
        checkpoints=checkpoints,
        project=run.project,
    )


def _read_hparams(path: Path) -> dict[str, Any]:
    """``hparams.yaml`` as a dict; Python-specific tags (Lightning may write ``!!python/tuple``) read as plain
    values instead of constructing objects from a file on disk."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def python_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        return loader.construct_scalar(node)  # type: ignore[arg-type]

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", python_tag)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_csv(path: Path) -> Run:
    history: dict[str, list[tuple[int, float]]] = {}
    summary: dict[str, Any] = {}
    with open(path / _CSV_FILE, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            step = _step(_csv_value(row.get("step")))
            if step is None:
                continue
            for key, text in row.items():
                if key is None or key in _NOT_METRICS or text in (None, ""):
                    continue
                value = _csv_value(text)
                _add(history, key, step, value)
                if key.startswith("summary/"):  # summaries reach a CSVLogger as one last metrics row
                    summary[key] = value
    hparams = path / _HPARAMS_FILE
    files = [p for p in (hparams, path / _CSV_FILE) if p.is_file()]
    parent = path.parent.name
    return Run(
        name=f"{parent}/{path.name}" if parent else path.name,
        source="csv",
        path=path,
        state="unknown",
        config=_read_hparams(hparams) if hparams.is_file() else {},
        created_at=min(p.stat().st_mtime for p in files),
        history=history,
        summary=summary,
    )


def _csv_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _kind(path: Path) -> str | None:
    """Which source a directory is, if any: ``record``, ``wandb-offline`` or ``csv``."""
    from lightning_cs336.record import RUN_FILE

    if (path / RUN_FILE).is_file():
        return "record"
    if _WANDB_RUN_DIR.match(path.name) and any(path.glob("*.wandb")):
        return "wandb-offline"
    if (path / _CSV_FILE).is_file():
        return "csv"
    return None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Load the one run in directory ``path`` (a run record, an offline W&B run dir, or a CSVLogger version dir).

    Args:
        path: The run's directory.

    Returns:
        The run.

    Raises:
        FileNotFoundError: If ``path`` does not exist or is not a run directory.
        ValueError: If its files are not readable as a run (a corrupt ``run.json``, a file that is no W&B log).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory (or a directory of runs, e.g. runs/)")
    kind = _kind(path)
    if kind == "record":
        from lightning_cs336.record import read_record

        return _from_record(read_record(path))
    if kind == "wandb-offline":
        from lightning_cs336.wandb_reader import OfflineRun

        return _from_offline(OfflineRun.load(path))
    if kind == "csv":
        return _from_csv(path)
    raise FileNotFoundError(
        f"{path} is not a run directory (no run.json, no offline-run-*/*.wandb, no metrics.csv): "
        "pass a run directory, or use discover_runs to search a tree"
    )


def _find_dirs(root: Path) -> list[Path]:
    """Run directories under ``root`` (itself included), without descending into a run directory (what is inside
    one belongs to that run) and without following symlinks (``wandb/latest-run``) or entering hidden directories."""
    if _kind(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        keep = []
        for name in sorted(dirnames):
            child = Path(dirpath) / name
            if name.startswith(".") or child.is_symlink():
                continue
            if _kind(child):
                found.append(child)
            else:
                keep.append(name)
        dirnames[:] = keep
    return found


def _merge_segments(segments: list[Run]) -> Run:
    """One W&B run from the offline directories of its segments (a resumed offline run writes a new directory with
    the same id each time): histories concatenated, config and summary updated in order, the last one's state."""
    segments = sorted(segments, key=lambda r: (r.created_at or 0.0, str(r.path)))
    run = segments[-1]
    merged = Run(**{**run.__dict__, "history": {}, "config": {}, "summary": {}, "tables": {}, "checkpoints": []})
    merged.created_at = segments[0].created_at
    merged.also = [s.path for s in segments[:-1] if s.path]
    for seg in segments:
        for key, points in seg.history.items():
            merged.history.setdefault(key, []).extend(points)
        merged.config.update(seg.config)
        merged.summary.update(seg.summary)
        merged.tables.update(seg.tables)
        merged.checkpoints.extend(seg.checkpoints)
    return merged


def _same_run(run: Run, records: Sequence[Run], within_s: float = 120.0) -> Run | None:
    """The record a W&B run belongs to when the record does not name its W&B run id (a plain Trainer with
    ``RunRecord`` and ``WandbLogger``, no ``cs336 fit``): same name and project, started within ``within_s``."""
    for record in records:
        if (
            record.source == "record"
            and (record.name, record.project) == (run.name, run.project)
            and record.created_at is not None
            and run.created_at is not None
            and abs(record.created_at - run.created_at) <= within_s
        ):
            return record
    return None


def discover_runs(
    paths: Iterable[str | os.PathLike[str]], *, skipped: list[tuple[Path, str]] | None = None
) -> list[Run]:
    """Every run under ``paths``, each once, oldest first.

    Each path may be a run directory or any directory above run directories; they are searched recursively for run
    records (``run.json``), offline W&B run directories (``offline-run-*``/``run-*`` holding a ``.wandb`` file)
    and CSVLogger version directories (``metrics.csv``). A directory found is not searched further: the W&B and CSV
    files inside a record's directory are the same run. A W&B directory whose run id is a record's ``wandb_run_id``
    (``cs336 fit`` sets it) is that record's run too and is left out (listed in the record's ``also``), as is one
    with the record's name and project that started within two minutes of it (a record that names no W&B run id).
    Several W&B directories with one id (the segments of a resumed offline run) are merged. A CSV directory outside
    any record's directory stays a run of its own (it carries no id to match).

    Args:
        paths: Directories to search.
        skipped: If given, receives ``(directory, reason)`` for each run directory that could not be read (a corrupt
            ``run.json``...); those are skipped. Without it, the first unreadable one raises.

    Returns:
        The runs, sorted by creation time (unknown last), then name.

    Raises:
        FileNotFoundError: If a path does not exist.
        ValueError: If a run directory is unreadable and ``skipped`` is None.
    """
    from lightning_cs336.wandb_reader import CorruptLogError

    dirs: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: pass a run directory or a directory of runs (`cs336 fit` writes runs/)"
            )
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a directory: pass a run directory or a directory of runs")
        dirs.update(dict.fromkeys(d.resolve() for d in _find_dirs(path)))  # overlapping paths find a run twice
    runs: list[Run] = []
    for directory in dirs:
        try:
            runs.append(load_run(directory))
        except (ValueError, OSError, CorruptLogError) as err:
            if skipped is None:
                raise
            skipped.append((directory, str(err)))
    records = [r for r in runs if r.source != "wandb-offline"]
    by_id: dict[str, Run] = {r.run_id: r for r in records if r.source == "record" and r.run_id}
    wandb: dict[str, list[Run]] = {}
    for run in runs:
        if run.source == "wandb-offline":
            wandb.setdefault(run.run_id or str(run.path), []).append(run)
    for run_id, segments in wandb.items():
        owner = by_id.get(run_id) or _same_run(segments[0], records)
        if owner is not None:
            owner.also.extend(s.path for s in segments if s.path)
        else:
            records.append(_merge_segments(segments))
    return sorted(records, key=lambda r: (r.created_at is None, r.created_at or 0.0, r.name))


def load_project(
    project: str, entity: str | None = None, *, filters: dict[str, Any] | None = None, timeout: int = 30
) -> list[Run]:
    """The runs of a W&B project through ``wandb.Api`` (online).

    Untested against a real server (none is reachable where this suite runs): the mapping follows wandb 0.31's
    public API (``Run.name/id/state/config/tags/group/notes/created_at/summary_metrics/scan_history``), and reading
    the full history of many runs is slow. W&B's ``crashed`` state reads as ``killed``.

    Args:
        project: The project name.
        entity: The entity (user or team); None: your default entity.
        filters: A MongoDB-style filter passed to ``wandb.Api().runs`` (e.g. ``{"tags": {"$in": ["sweep"]}}``).
        timeout: Seconds wandb waits on each request.

    Returns:
        The runs, oldest first.

    Raises:
        ValueError: Before any network call, if ``WANDB_MODE`` is offline/disabled or no credentials exist
            (``WANDB_API_KEY`` or a ``~/.netrc`` entry).
    """
    from lightning_cs336.callbacks.wandb_access import has_wandb_credentials

    mode = os.environ.get("WANDB_MODE", "online").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise ValueError(
            f"cannot query W&B project {project!r}: WANDB_MODE={mode}; unset it to query the server, or read local "
            "runs with discover_runs (cs336 runs list runs/)"
        )
    if not has_wandb_credentials():
        raise ValueError(
            f"cannot query W&B project {project!r}: no W&B API key (WANDB_API_KEY unset, no ~/.netrc entry); "
            "run `wandb login`, or read local runs with discover_runs (cs336 runs list runs/)"
        )
    import wandb

    api = wandb.Api(timeout=timeout)
    runs = []
    for remote in api.runs(f"{entity}/{project}" if entity else project, filters=filters):
        history: dict[str, list[tuple[int, float]]] = {}
        for row in remote.scan_history():
            step = _step(row.get("trainer/global_step", row.get("_step")))
            if step is not None:
                for key, value in row.items():
                    if not key.startswith("_") and key not in _NOT_METRICS:
                        _add(history, key, step, value)
        created = remote.created_at
        if isinstance(created, str):
            created = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        state = str(remote.state)
        runs.append(
            Run(
                name=remote.name or remote.id,
                source="wandb-api",
                state={"crashed": "killed", "preempting": "running"}.get(state, state),
                config={k: v for k, v in dict(remote.config).items() if not k.startswith("_")},
                tags=list(remote.tags or []),
                group=remote.group or None,
                notes=remote.notes or None,
                run_id=remote.id,
                created_at=created,
                history=history,
                summary={k: v for k, v in dict(remote.summary_metrics).items() if not k.startswith("_")},
                project=project,
            )
        )
    return runs


# -------------------------------------------------------------------------------------------------------- queries


def filter_runs(
    runs: Iterable[Run],
    tags: Sequence[str] = (),
    state: str | Sequence[str] | None = None,
    group: str | None = None,
) -> list[Run]:
    """The runs that have every tag in ``tags``, one of the states ``state``, and the group ``group``.

    Args:
        runs: The runs.
        tags: Tags a run must all have (none: no condition).
        state: A state or several (None: any).
        group: The group (None: any).

    Returns:
        The matching runs, in their order.
    """
    states = None if state is None else {state} if isinstance(state, str) else set(state)
    return [
        r
        for r in runs
        if set(tags) <= set(r.tags) and (states is None or r.state in states) and (group is None or r.group == group)
    ]


def final(run: Run, key: str) -> float | None:
    """The last logged value of metric ``key`` (else its summary value), or None if the run has neither."""
    points = run.history.get(key)
    if points:
        return points[-1][1]
    return _number(run.summary.get(key))


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def best(run: Run, key: str, mode: str = "min") -> Point | None:
    """The lowest (``mode="min"``) or highest (``"max"``) logged value of ``key``, ignoring NaN; the first such
    point on a tie. None if the run logged no finite-or-infinite number for ``key``."""
    _check_mode(mode)
    points = [p for p in run.history.get(key, []) if not math.isnan(p[1])]
    if not points:
        return None
    pick = min if mode == "min" else max
    step, value = pick(points, key=lambda p: p[1])
    return Point(step, value)


def _unknown_metric(runs: Sequence[Run], metric: str) -> ValueError:
    known = sorted({k for r in runs for k in r.history})
    shown = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
    return ValueError(f"no run logged metric {metric!r}; metrics logged: {shown or 'none'}")


def best_run(runs: Sequence[Run], metric: str = "val/loss", mode: str = "min") -> Run:
    """The run whose best value of ``metric`` is lowest (``mode="min"``) or highest (``"max"``).

    Raises:
        ValueError: If ``mode`` is not min/max, there are no runs, or no run logged ``metric``.
    """
    _check_mode(mode)
    if not runs:
        raise ValueError("no runs to choose from")
    scored = [(point.value, i, run) for i, run in enumerate(runs) if (point := best(run, metric, mode)) is not None]
    if not scored:
        raise _unknown_metric(runs, metric)
    # Ties go to the earlier run (the index breaks them, so Run objects are never compared).
    return (min(scored) if mode == "min" else max(scored, key=lambda s: (s[0], -s[1])))[2]


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 128}}`` as ``{"model.d_model": 128}``. A list of LightningCLI class entries (e.g.
    ``trainer.callbacks``) flattens by class name: ``trainer.callbacks.ModelCheckpoint.monitor`` (``#2`` for a second
    entry of one class), so two runs differing in one callback argument differ in one key; other lists and empty
    dicts stay leaves."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
            seen: dict[str, int] = {}
            for entry in value:
                cls = str(entry["class_path"]).rsplit(".", 1)[-1]
                seen[cls] = seen.get(cls, 0) + 1
                label = cls if seen[cls] == 1 else f"{cls}#{seen[cls]}"
                out.update(
                    flatten_config(entry.get("init_args") or {"class_path": entry["class_path"]}, f"{name}.{label}.")
                )
        else:
            out[name] = value
    return out


def config_diff(runs: Sequence[Run], ignore: Sequence[str] = VOLATILE_CONFIG_KEYS) -> dict[str, list[Any]]:
    """The configuration keys whose values differ between runs.

    Args:
        runs: The runs to compare.
        ignore: ``fnmatch`` patterns of dotted keys to leave out (default :data:`VOLATILE_CONFIG_KEYS`: hosts,
            directories, times, pids; pass ``()`` to compare everything).

    Returns:
        ``dotted key -> [value in each run]`` (None where a run lacks the key), keys sorted; only keys whose values
        are not all equal.
    """
    flat = [flatten_config(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f if not any(fnmatch.fnmatchcase(k, p) for p in ignore)})
    diff = {}
    for key in keys:
        values = [f.get(key) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diff[key] = values
    return diff


def tokens_seen(run: Run) -> int | None:
    """Training tokens seen: ``summary/tokens_seen`` (RunInfoLogger, complete at the end of training), else the
    last ``throughput/tokens_total`` (SpeedMonitor), else None."""
    value = final(run, "summary/tokens_seen")
    if value is None or not math.isfinite(value):
        value = final(run, "throughput/tokens_total")
    return int(value) if value is not None and math.isfinite(value) else None


def steps(run: Run) -> int | None:
    """Optimizer steps taken: ``summary/global_step`` when recorded, else the largest step any metric was logged
    at, else None."""
    value = final(run, "summary/global_step")
    if value is not None and math.isfinite(value):
        return int(value)
    last = [points[-1][0] for points in run.history.values() if points]
    return max(last) if last else None


# ------------------------------------------------------------------------------------------------------- plotting


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """W&B's (and TensorBoard's) exponential moving average, debiased so the curve does not start at zero.

    Args:
        values: The series.
        smoothing: The weight of the past, in ``[0, 1)``; 0 returns the values unchanged.

    Returns:
        The smoothed series; a NaN stays NaN and does not disturb the average.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, last, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        n += 1
        last = last * smoothing + (1.0 - smoothing) * value
        out.append(last / (1.0 - smoothing**n) if smoothing else value)
    return out


def _tokens_at(run: Run, step_values: Sequence[int]) -> list[float]:
    """Steps mapped to training tokens by interpolating ``throughput/tokens_total`` (from (0, 0) when it starts
    later; past its last point at its last rate)."""
    import numpy as np

    points = sorted((s, v) for s, v in run.history.get("throughput/tokens_total", []) if math.isfinite(v))
    if not points:
        raise ValueError(
            f"run {run.name!r} logged no throughput/tokens_total (add SpeedMonitor), so it has no token axis; "
            "use x='step' (--x step)"
        )
    xs: list[float] = []
    ys: list[float] = []
    for s, v in points:
        if not xs or s > xs[-1]:  # a resumed run may log a step twice: keep the first
            xs.append(float(s))
            ys.append(v)
    if xs[0] > 0:
        xs.insert(0, 0.0)
        ys.insert(0, 0.0)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[-1] / max(xs[-1], 1.0)
    inside = np.interp(step_values, xs, ys)
    return [
        float(y if s <= xs[-1] else ys[-1] + (s - xs[-1]) * slope) for s, y in zip(step_values, inside, strict=True)
    ]


def make_figure(runs: Sequence[Run], metrics: Sequence[str], smoothing: float = 0.0, x: str = "step") -> Figure:
    """The figure :func:`plot_runs` saves: one subplot per metric, one line per run that logged it.

    Raises:
        ValueError: If there are no runs or metrics, ``x`` is not step/tokens, a metric is logged by no run, or
            ``x="tokens"`` and a run has no token count.
    """
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to plot")
    if not metrics:
        raise ValueError("no metrics to plot: name at least one (e.g. val/loss)")
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    ema([], smoothing)  # validates smoothing before any drawing
    for metric in metrics:
        if not any(run.history.get(metric) for run in runs):
            raise _unknown_metric(runs, metric)
    # Figure() directly, not pyplot: no global state, no GUI backend (the Agg canvas comes with savefig).
    fig = Figure(figsize=(6.4, 3.6 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    names = [r.name for r in runs]
    for ax, metric in zip(axes, metrics, strict=True):
        for run in runs:
            points = run.history.get(metric)
            if not points:
                continue
            xs: list[float] = [float(s) for s, _ in points]
            if x == "tokens":
                xs = _tokens_at(run, [s for s, _ in points])
            label = run.name if names.count(run.name) == 1 else f"{run.name} ({run.source})"
            ax.plot(xs, ema([v for _, v in points], smoothing), label=label)
        ax.set_title(metric + (f" (EMA {smoothing:g})" if smoothing else ""))
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_runs(
    runs: Sequence[Run],
    metrics: Sequence[str],
    out: str | os.PathLike[str],
    smoothing: float = 0.0,
    x: str = "step",
) -> Path:
    """Plot ``metrics`` of ``runs`` into an image file (PNG, SVG, PDF by the suffix of ``out``).

    Args:
        runs: The runs, one line each.
        metrics: The metric keys, one subplot each.
        out: The image file to write (its directory is created).
        smoothing: EMA weight in ``[0, 1)``, as W&B's smoothing slider (0: raw values).
        x: ``"step"`` or ``"tokens"`` (steps mapped through ``throughput/tokens_total``).

    Returns:
        The path written.

    Raises:
        ValueError: See :func:`make_figure`.
    """
    fig = make_figure(runs, metrics, smoothing=smoothing, x=x)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
