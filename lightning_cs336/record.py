"""The local run record: every run's metrics, tables, checkpoints, identity, config and state, on local disk, as it
happens, whatever other loggers are attached (W&B online, offline, disabled, or failing).

Why not only W&B offline? Its binary log reaches disk only when a 32 KiB block fills or the run ends, so a killed
offline run keeps almost none of its history; ``WANDB_MODE=disabled`` keeps nothing. And why not ``CSVLogger``? It
buffers rows in memory and rewrites the file (its header grows with every new key), keeps no tables, checkpoints,
identity or state. This record appends and flushes one line per call, so a ``SIGKILL`` loses at most the values of
the logging step in flight.

Format (a directory; every file is UTF-8 text a person can read):

``run.json``
    The run's identity and state, rewritten atomically (temporary file + rename) when they change: ``name``,
    ``id``, ``project``, ``group``, ``tags``, ``notes``, ``wandb_run_id``, ``git_commit``, ``host``, ``pid``,
    ``state`` (``running``, ``finished``, ``failed``, ``killed``, ``preempted``), ``created_at``/``ended_at``
    (Unix seconds), ``config`` (the resolved configuration, set by ``cs336 fit``), ``hparams`` (what Lightning passed
    to ``log_hyperparams``: the module's and datamodule's hyperparameters), ``summary`` (final values),
    ``format_version``.
``metrics.jsonl``
    One JSON object per ``log_metrics`` call: ``{"step": int, "time": unix seconds, "<key>": value, ...}``.
    ``pandas.read_json(path, lines=True)`` loads it as a table (one column per key).
``events.jsonl``
    One JSON object per event, ``{"event": kind, "step": int, "time": float, ...}``: ``hparams`` (``params``),
    ``table`` (``key``, ``columns``, ``rows``: the rows added at this step), ``checkpoint`` (``path``, ``best_path``,
    ``monitor``, ``score``), ``summary`` (``values``), ``state`` (``state``, ``reason``).

Both ``.jsonl`` files are append-only; a torn last line (the process died mid-write) is skipped by the reader. A run
whose ``run.json`` still says ``running`` but whose process is gone (same host, pid not alive) reads as ``killed``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["FORMAT_VERSION", "RecordedRun", "RunRecord", "STATES", "read_jsonl", "read_record"]

FORMAT_VERSION = 1
RUN_FILE, METRICS_FILE, EVENTS_FILE = "run.json", "metrics.jsonl", "events.jsonl"
#: Every state a run can be in. ``killed``: the process ended without saying so (SIGKILL, OOM, power loss);
#: ``preempted``: stopped by a signal it handled (SIGTERM, SIGINT/Ctrl+C, SLURM's requeue signal), resumable;
#: ``pruned``: stopped early on purpose by a hyperparameter search (``cs336 sweep``), which set it.
STATES = ("running", "finished", "failed", "killed", "preempted", "pruned")


def _json_value(value: Any) -> Any:
    """A JSON-safe copy: tensors and numpy scalars become numbers, non-finite floats strings (JSON has no NaN)."""
    if hasattr(value, "tolist") and callable(value.tolist):  # torch.Tensor, numpy array or scalar
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return _json_value(vars(value))
    return repr(value)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_json_value(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old or the new file, never half of one


def _state_from_exception() -> tuple[str, str | None]:
    """Lightning calls ``finalize("failed")`` for every exception, from inside its ``except`` block: tell a
    termination signal or a keyboard interrupt from a crash by the exception being handled."""
    err = sys.exc_info()[1]
    if err is None:
        return "failed", None
    name = type(err).__name__
    if name == "SIGTERMException":  # Lightning raises it after SIGTERM (lightning.pytorch.utilities.exceptions)
        return "preempted", "SIGTERM"
    if isinstance(err, KeyboardInterrupt):  # SIGINT (Ctrl+C): stopped on purpose, resumable like a preemption
        return "preempted", "SIGINT"
    return "failed", f"{name}: {err}"[:500]


class RunRecord(Logger):
    """A Lightning logger that keeps the local run record (see the module docstring for the format).

    Add it next to any other logger: ``Trainer(logger=[WandbLogger(...), RunRecord("runs", name="my-run")])``.
    The telemetry callbacks' tables, summaries and histogram statistics reach it through the suite's sinks;
    checkpoint saves through Lightning's ``after_save_checkpoint``. Rank zero writes; other ranks do nothing.

    Args:
        save_dir: The parent directory; the record is ``save_dir/name`` (which the ``save_dir``/``log_dir``
            properties return).
        name: The run's name (the directory name). ``None``: ``run-<time>-<random>``.
        project: Project name, for grouping runs (e.g. the W&B project).
        group: Group name (an ablation, a sweep).
        tags: Tags for filtering.
        notes: Free text.
        run_id: A stable id (kept across resumes); ``None`` draws one.
        resume: Append to an existing record of the same name instead of refusing to overwrite it.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] = "runs",
        name: str | None = None,
        project: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        notes: str | None = None,
        run_id: str | None = None,
        resume: bool = False,
    ) -> None:
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise ValueError(f"name must be a non-empty directory name without '/', got {name!r}")
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"tags must be a list of strings, got {tags!r}")
        self._save_dir = Path(save_dir)
        self._name = name or time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        self._resume = resume
        self._resumed_at: int | None = None  # metrics.jsonl lines before this segment, until its first step
        self._last_reason: str | None = None
        self._meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self._name,
            "id": run_id or secrets.token_hex(4),
            "project": project,
            "group": group,
            "tags": list(tags),
            "notes": notes,
            "wandb_run_id": None,
            "git_commit": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": "running",
            "created_at": time.time(),
            "ended_at": None,
            "config": {},
            "hparams": {},
            "summary": {},
        }
        self._files: dict[str, Any] = {}
        self._started = False
        self._last_step = 0

    # ---------------------------------------------------------------------------------------------- Logger API
    @property
    @override
    def name(self) -> str:
        return self._name

    @property
    @override
    def version(self) -> str:
        return str(self._meta["id"])

    @property
    @override
    def save_dir(self) -> str:
        """The record's directory, like :attr:`log_dir`: Lightning writes a first logger's files (LightningCLI's
        ``config.yaml``) into ``save_dir``, and they belong with the run, not in the parent of every run."""
        return self.log_dir

    @property
    @override
    def log_dir(self) -> str:
        """The record's directory: ``save_dir/name``."""
        return str(self._save_dir / self._name)

    @property
    @override
    def experiment(self) -> RunRecord:
        return self

    @property
    def meta(self) -> dict[str, Any]:
        """The current contents of ``run.json``."""
        return self._meta

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = _json_value(params if isinstance(params, Mapping) else vars(params))
        self._start()
        self._meta["hparams"] = {**self._meta["hparams"], **params}
        self._event("hparams", params=params)
        self._write_meta()

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._start()
        step = self._last_step if step is None else int(step)
        self._last_step = step
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _json_value(v) for k, v in metrics.items() if k not in ("step", "time")})
        if self._resumed_at is not None:
            # The first step logged after a resume: rows the interrupted segment logged at this step or later (between
            # its last checkpoint and its end) are superseded; readers drop them, so each step appears once.
            self._event("resume", step=step, metrics_line=self._resumed_at)
            self._resumed_at = None
        self._append(METRICS_FILE, row)

    @rank_zero_only
    def log_table(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        """The rows a table gained at ``step`` (the suite's sinks call this with the new rows only)."""
        self._event("table", step=step, key=key, columns=list(columns), rows=_json_value(data))

    @rank_zero_only
    def log_histograms(
        self, histograms: Mapping[str, Any], stats: Mapping[str, float], step: int | None = None
    ) -> None:
        """Histogram statistics as metrics (the bucket counts stay with the loggers that draw them)."""
        self.log_metrics(dict(stats), step=step)

    @rank_zero_only
    def log_summary(self, summary: Mapping[str, Any], step: int | None = None) -> None:
        """The run's final values: into ``run.json`` and as a ``summary`` event."""
        values = _json_value(dict(summary))
        self._meta["summary"] = {**self._meta["summary"], **values}
        self._event("summary", step=step, values=values)
        self._write_meta()

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # Pushed by ModelCheckpoint after every file it writes (lightning 2.6: ModelCheckpoint._save_checkpoint).
        from lightning_cs336.callbacks._compat import last_save

        saved = last_save(checkpoint_callback)
        score = getattr(checkpoint_callback, "current_score", None)
        self._event(
            "checkpoint",
            step=saved[0] if saved else self._last_step,
            path=os.path.abspath(saved[1]) if saved else getattr(checkpoint_callback, "last_model_path", None),
            best_path=getattr(checkpoint_callback, "best_model_path", None) or None,
            monitor=getattr(checkpoint_callback, "monitor", None),
            score=_json_value(score),
        )

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self._started:
            return
        if status == "success" and self._meta.get("state") == "pruned":
            state, reason = "pruned", self._last_reason  # a sweep stopped it; the fit itself ended normally
        elif status == "success":
            state, reason = "finished", None
        elif status == "finished":  # Lightning's SLURM requeue handler (SIGUSR1) finalizes with "finished"
            state, reason = "preempted", "SLURM requeue signal"
        else:
            state, reason = _state_from_exception()
        self.set_state(state, reason)
        for fh in self._files.values():
            fh.close()
        self._files = {}

    # ---------------------------------------------------------------------------------------------- our API
    @rank_zero_only
    def update_identity(self, **fields: Any) -> None:
        """Set identity fields of ``run.json`` (``wandb_run_id``, ``git_commit``, ``tags``, ``config``...)."""
        unknown = set(fields) - set(self._meta)
        if unknown:
            raise ValueError(f"unknown run.json fields {sorted(unknown)}; known: {sorted(self._meta)}")
        self._meta.update(_json_value(fields))
        if self._started:
            self._write_meta()

    @rank_zero_only
    def set_state(self, state: str, reason: str | None = None) -> None:
        """Record the run's state (one of :data:`STATES`)."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self._start()
        self._meta["state"] = state
        self._last_reason = reason
        self._meta["ended_at"] = None if state == "running" else time.time()
        self._event("state", state=state, reason=reason)
        self._write_meta()

    # ---------------------------------------------------------------------------------------------- writing
    def _start(self) -> None:
        if self._started:
            return
        directory = Path(self.log_dir)
        existing = directory / RUN_FILE
        if existing.exists() and not self._resume:
            raise FileExistsError(f"a run record already exists at {directory}: choose another run name, or resume it")
        directory.mkdir(parents=True, exist_ok=True)
        if existing.exists():  # resume: keep the identity, created_at and config; the run is running again
            old = json.loads(existing.read_text(encoding="utf-8"))
            keep = ("id", "created_at", "config", "hparams", "summary", "wandb_run_id")
            self._meta.update({k: old[k] for k in keep if k in old})
            self._meta.update(state="running", ended_at=None, pid=os.getpid(), host=socket.gethostname())
            metrics = directory / METRICS_FILE
            self._resumed_at = sum(1 for _ in read_jsonl(metrics)) if metrics.exists() else 0
        self._started = True
        self._write_meta()

    def _append(self, file_name: str, record: Mapping[str, Any]) -> None:
        fh = self._files.get(file_name)
        if fh is None:
            fh = self._files[file_name] = open(Path(self.log_dir) / file_name, "a", encoding="utf-8")  # noqa: SIM115
        # One write and one flush per line: the line reaches the kernel now, so it survives the process being
        # killed (not a power loss: that would need an fsync per line, ~1 ms on most disks).
        fh.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        fh.flush()

    def _event(self, kind: str, step: int | None = None, **fields: Any) -> None:
        self._start()
        step = self._last_step if step is None else int(step)
        self._append(EVENTS_FILE, {"event": kind, "step": step, "time": round(time.time(), 3), **fields})

    def _write_meta(self) -> None:
        _write_json_atomic(Path(self.log_dir) / RUN_FILE, self._meta)

    def __getstate__(self) -> dict[str, Any]:  # open files do not pickle (ddp_spawn pickles the loggers)
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


# -------------------------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, skipping a torn last line (and any line that is not an object)."""
    try:
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            if not line.endswith("\n"):
                return  # the writer died mid-line: the rest of this line never came
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                yield value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass
class RecordedRun:
    """A run record read back from disk."""

    path: Path
    meta: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        """``run.json``'s state, except that a ``running`` run whose process is gone (same host) is ``killed``."""
        state = self.meta.get("state", "running")
        if state == "running" and self.meta.get("host") == socket.gethostname():
            pid = self.meta.get("pid")
            if isinstance(pid, int) and not _pid_alive(pid):
                return "killed"
        return state

    def history(self, key: str) -> list[tuple[int, Any]]:
        """``[(step, value), ...]`` of one metric, in logging order."""
        return [(row["step"], row[key]) for row in self.metrics if key in row]

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def table(self, key: str) -> tuple[list[str], list[list[Any]]]:
        """Every row a table gained, oldest first, with its columns."""
        columns: list[str] = []
        rows: list[list[Any]] = []
        for event in self.events_of("table"):
            if event.get("key") == key:
                columns = event.get("columns", columns)
                rows.extend(event.get("rows", []))
        return columns, rows


def read_record(path: str | os.PathLike[str]) -> RecordedRun:
    """Read the record in directory ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: If ``path`` holds no ``run.json``.
        ValueError: If ``run.json`` is not a run record.
    """
    path = Path(path)
    run_file = path / RUN_FILE
    if not run_file.is_file():
        raise FileNotFoundError(f"{path} is not a run record (no {RUN_FILE}): pass a directory written by RunRecord")
    try:
        meta = json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{run_file} is corrupt ({err}); its metrics.jsonl and events.jsonl are still readable"
        ) from err
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ValueError(f"{run_file} is not a run record (no format_version)")
    events = list(read_jsonl(path / EVENTS_FILE))
    return RecordedRun(path, meta, _resumed_history(list(read_jsonl(path / METRICS_FILE)), events), events)


def _resumed_history(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metric rows with each resume applied: a resumed segment that starts logging at step ``s`` supersedes the
    rows of the earlier segments at ``s`` and later (logged after the checkpoint it resumed from)."""
    kept: list[dict[str, Any]] = []
    done = 0
    for event in events:
        if event.get("event") != "resume" or not isinstance(event.get("metrics_line"), int):
            continue
        line, step = event["metrics_line"], event.get("step")
        kept.extend(rows[done:line])
        kept = [r for r in kept if not (isinstance(step, int) and r.get("step", -1) >= step)]
        done = max(done, line)
    return kept + rows[done:]
