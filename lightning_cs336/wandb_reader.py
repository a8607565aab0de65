"""Read W&B runs back from their local files, offline, without the W&B server or a subprocess.

Size note (~680 lines): one file format (the block/chunk scanner, record replay into history, summary, config,
tables and artifacts) and its run-directory discovery; they change together when wandb changes the format.

With ``WANDB_MODE=offline`` (wandb 0.31) a run is written to ``<WANDB_DIR>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>/``
holding ``run-<id>.wandb``, ``files/`` and ``logs/``. There is no ``wandb-summary.json``, ``config.yaml`` or
``wandb-metadata.json`` offline: the binary transaction log ``run-<id>.wandb`` is the only complete record, so this
module parses it directly.

File format (written by wandb-core, the Go service):

* a 7-byte header: ``b":W&B"``, the magic ``0xBEE1`` as little-endian uint16, and a version byte ``0``;
* then LevelDB-log records in 32 KiB blocks counted from the start of the file (the header sits inside the first
  block). Each chunk has a 7-byte header: CRC-32 (IEEE, ``zlib.crc32``) of the type byte followed by the payload,
  as uint32 LE; the payload length as uint16 LE; the chunk type (1 full, 2 first, 3 middle, 4 last). A block tail
  shorter than 7 bytes is zero padding;
* each reassembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Nothing reaches the file until a 32 KiB block fills or the run finishes, so a crashed run's log may end mid-record.
Reading stops at the first short, malformed or CRC-failing chunk and reports ``truncated`` instead of raising; a run
that never finished also has ``exit_code is None``. Even a clean ``run.finish()`` returns before wandb-core has
written the last block and the exit record (tens of ms later), so readers in the same process should use
``OfflineRun.load(..., wait_s=...)`` or call ``wandb.teardown()`` first.

What wandb 0.31 writes, and how this module presents it:

* **History**: one ``history`` record per ``run.log`` step. Every item carries ``nested_key`` (never ``key``), one
  element per level of dict nesting: ``"train/loss"`` is stored as the single element ``["train/loss"]`` (slashes
  are not split), ``{"nest": {"x": 1}}`` as ``["nest", "x"]``. Rows are rebuilt as dicts with the logged nesting
  (``row["nest"] == {"x": 1}``). Each row holds ``_step``, ``_runtime`` and ``_timestamp``; Lightning's
  ``WandbLogger`` also logs ``trainer/global_step`` (a plain top-level key) and ``epoch`` in every row. Values are
  JSON-decoded: a float that is integral (``0.0``, ``1.0``) reads back as ``int``; NaN and +-inf read back as the
  floats ``nan``/``inf`` (JSON ``NaN``/``Infinity``). When the run used ``x_history_value_encoding="json,typed"``
  the typed value wins, which keeps ``1.0`` a float.
* **Tables**: the history value of a logged ``wandb.Table`` is a dict ``{"_type": "table-file", "path":
  "media/table/<key>_<step>_<hash>.table.json", "sha256", "size", "nrows", "ncols", "artifact_path",
  "_latest_artifact_path", "log_mode"}``; ``path`` is relative to the run's ``files/`` dir, whose JSON holds
  ``{"columns": [...], "data": [[...], ...]}``. Logging a table also writes a ``run_table`` artifact record named
  ``run-<id>-<key>``.
* **Config**: the run record holds ``wandb.init(config=...)`` (top-level keys, nested values as JSON, plus an
  internal ``_wandb`` key); later ``config`` records hold ``run.config.update(...)`` and e.g. Lightning's
  ``log_hyperparams`` (the ``save_hyperparameters()`` dict, top-level keys). The internal ``_wandb`` entry is kept
  out of :attr:`OfflineRun.config` and exposed as :attr:`OfflineRun.wandb_config`.
* **Summary**: ``summary`` records are partial updates (one before each history row, plus explicit
  ``run.summary[...]`` writes) and are merged in order. The internal ``_wandb`` entry is dropped; ``_step``,
  ``_runtime`` and ``_timestamp`` are kept. ``define_metric(summary="min")`` aggregates are *not* in the file.
* **Artifacts**: ``artifact`` records give name, type, digest, ``metadata`` (a JSON string), ``aliases`` (wandb
  appends ``"latest"``) and a manifest whose entries have ``path`` (name inside the artifact) and ``local_path``
  (the staged copy under ``WANDB_DATA_DIR/artifacts/staging/``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

__all__ = [
    "CorruptLogError",
    "OfflineRun",
    "find_runs",
    "iter_records",
    "latest_run",
    "load_runs",
    "read_records",
]

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
HEADER_LEN = 7
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_LEN = 7

_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CHUNK_HEADER = struct.Struct("<IHB")
_FILE_HEADER = struct.Struct("<4sHB")
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}

_RUN_DIR_RE = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")
_TABLE_TYPE_SUFFIX = "table-file"


class CorruptLogError(ValueError):
    """Raised by :func:`iter_records` with ``strict=True`` when the log is truncated or corrupt."""


class _ScanState:
    """Mutable outcome of a scan: whether it stopped early, and why."""

    def __init__(self) -> None:
        self.truncated = False
        self.reason: str | None = None
        self.offset = 0


def _scan(data: bytes, state: _ScanState) -> Iterator[bytes]:
    """Yield record payloads from the bytes of a ``.wandb`` file, stopping (not raising) at a bad tail.

    Args:
        data: The whole file.
        state: Receives ``truncated``/``reason``/``offset`` when the scan stops early.

    Yields:
        The serialized ``Record`` payloads, in file order.

    Raises:
        CorruptLogError: If a complete header is present but is not a W&B log header.
    """

    def stop(reason: str, offset: int) -> None:
        state.truncated = True
        state.reason = reason
        state.offset = offset

    size = len(data)
    if size < HEADER_LEN:
        stop(f"file shorter than the {HEADER_LEN}-byte header", 0)
        return
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise CorruptLogError(f"not a W&B transaction log (header {data[:HEADER_LEN]!r})")
    if version != HEADER_VERSION:
        raise CorruptLogError(f"unsupported W&B log version {version}")

    off = HEADER_LEN
    pending: list[bytes] | None = None  # fragments of a record split across blocks
    while off < size:
        left_in_block = BLOCK_SIZE - off % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_LEN:
            off += left_in_block  # zero padding at a block's tail
            continue
        if off + CHUNK_HEADER_LEN > size:
            stop("short chunk header at end of file", off)
            return
        crc, length, ctype = _CHUNK_HEADER.unpack_from(data, off)
        start = off + CHUNK_HEADER_LEN
        end = start + length
        if ctype not in _TYPE_CRC or length > left_in_block - CHUNK_HEADER_LEN:
            stop(f"malformed chunk header (type {ctype}, length {length})", off)
            return
        if end > size:
            stop("chunk runs past end of file", off)
            return
        payload = data[start:end]
        if zlib.crc32(payload, _TYPE_CRC[ctype]) != crc:
            stop("CRC mismatch", off)
            return
        if ctype == _FULL or ctype == _FIRST:
            if pending is not None:
                stop("new record inside an unfinished multi-block record", off)
                return
            if ctype == _FULL:
                yield payload
            else:
                pending = [payload]
        else:
            if pending is None:
                stop("continuation chunk without a first chunk", off)
                return
            pending.append(payload)
            if ctype == _LAST:
                yield b"".join(pending)
                pending = None
        off = end
    if pending is not None:
        stop("file ends inside a multi-block record", size)


def iter_records(path: str | os.PathLike[str], *, strict: bool = False) -> Iterator[Record]:
    """Iterate over the records of a ``.wandb`` transaction log.

    Args:
        path: The ``run-<id>.wandb`` file.
        strict: Raise :class:`CorruptLogError` at a truncated/corrupt tail instead of stopping quietly.

    Yields:
        ``wandb.proto.wandb_internal_pb2.Record`` messages in file order (use
        ``record.WhichOneof("record_type")``).

    Raises:
        CorruptLogError: If the file is not a W&B log, or (``strict=True``) its tail is truncated or corrupt.
    """
    state = _ScanState()
    yield from _parse(Path(path).read_bytes(), state)
    if strict and state.truncated:
        raise CorruptLogError(f"{path}: {state.reason} at byte {state.offset}")


def read_records(path: str | os.PathLike[str]) -> tuple[list[Record], bool]:
    """Read every intact record of a ``.wandb`` log.

    Args:
        path: The ``run-<id>.wandb`` file.

    Returns:
        ``(records, truncated)``: the records before the first bad chunk, and whether the scan stopped early.
    """
    state = _ScanState()
    records = list(_parse(Path(path).read_bytes(), state))
    return records, state.truncated


def _parse(data: bytes, state: _ScanState) -> Iterator[Record]:
    """Decode the payloads from :func:`_scan` into ``Record`` messages; an undecodable one ends the scan."""
    from google.protobuf.message import DecodeError
    from wandb.proto.wandb_internal_pb2 import Record

    for payload in _scan(data, state):
        record = Record()
        try:
            record.ParseFromString(payload)
        except DecodeError:
            state.truncated = True
            state.reason = "undecodable record"
            return
        yield record


# --------------------------------------------------------------------------------------------------------------
# value decoding and nested-dict helpers


def _loads(text: str) -> Any:
    """Decode a wandb ``value_json`` string (which may spell NaN/Infinity bare); undecodable text stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _item_path(item: Any) -> list[str]:
    """The key path of a config/summary/history item: ``nested_key`` if set, else ``[key]``."""
    return list(item.nested_key) if item.nested_key else [item.key]


def _history_value(item: Any) -> Any:
    """Decode a history item, preferring the typed form (written with ``x_history_value_encoding`` "typed")."""
    kind = item.WhichOneof("value")
    if kind is None:
        return _loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return _loads(item.json)
    return getattr(item, kind)


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``target[p0][p1]...[pn] = value``, creating (or replacing non-dict) intermediate levels."""
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    """Delete ``target[p0]...[pn]`` if present."""
    node: Any = target
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _apply_updates(target: dict[str, Any], record: Any) -> None:
    """Apply a ``ConfigRecord``/``SummaryRecord`` (``update`` then ``remove`` items) to ``target`` in place."""
    for item in record.update:
        path = _item_path(item)
        if path and path[0]:
            _set_path(target, path, _loads(item.value_json) if item.value_json else None)
    for item in record.remove:
        path = _item_path(item)
        if path and path[0]:
            _del_path(target, path)


def _flatten(value: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted_key, leaf)`` pairs of a nested dict; a table-file dict counts as a leaf."""
    for key, val in value.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict) and val and "_type" not in val:
            yield from _flatten(val, f"{name}.")
        else:
            yield name, val


def _is_table_ref(value: Any) -> bool:
    """Whether a history value is a reference to a table JSON file (``_type`` "table-file" and a ``path``)."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("_type"), str)
        and value["_type"].endswith(_TABLE_TYPE_SUFFIX)
        and isinstance(value.get("path"), str)
    )


# --------------------------------------------------------------------------------------------------------------
# OfflineRun


@dataclass
class OfflineRun:
    """Everything a local W&B run directory records, decoded from its ``.wandb`` log.

    Build one with :meth:`OfflineRun.load`. String fields that wandb left empty (``name`` when no name was set,
    ``entity`` offline) are ``None``.

    Attributes:
        path: The run directory (``.../wandb/offline-run-<time>-<id>``).
        wandb_file: The ``run-<id>.wandb`` log that was read.
        run_id: The run id.
        name: The display name, or ``None``.
        project: The project, or ``None``.
        entity: The entity, or ``None`` (always ``None`` offline unless set explicitly).
        group: The run group, or ``None``.
        job_type: The job type, or ``None``.
        tags: The run tags.
        notes: The run notes, or ``None``.
        start_time: Start time as POSIX seconds, or ``None``.
        config: The final config: init config plus every config record's updates/removals in order, nested values
            decoded from JSON. The internal ``_wandb`` key is excluded (see ``wandb_config``).
        wandb_config: The internal ``_wandb`` config entry (usually ``{}`` offline).
        history: One dict per ``history`` record, in order, keys as logged (``"train/loss"`` stays one key; dict
            values keep their nesting), plus ``_step``/``_runtime``/``_timestamp``.
        summary: The final summary (merged ``summary`` records without the internal ``_wandb`` entry); if the log
            has no summary record, the last value of each history key.
        tables: Logged table key (nested keys joined with ``"."``) to ``{"columns", "data", "path", "step"}`` for
            the latest logging of that key; ``path`` is the absolute ``.table.json`` path; ``columns``/``data``
            are ``None`` if that file is missing or unreadable.
        artifacts: One dict per ``artifact`` record: ``name``, ``type``, ``aliases``, ``metadata`` (decoded),
            ``digest``, ``description``, ``entries`` (``path``, ``local_path``, ``digest``, ``size``, ``ref``).
        files: Paths (relative to ``files/``) named by ``files`` records, de-duplicated, in order.
        exit_code: The exit record's code, or ``None`` if the run never finished (or the log is cut before it).
        truncated: Whether the log ended in a truncated/corrupt chunk (everything before it was read).
    """

    path: Path
    wandb_file: Path
    run_id: str
    name: str | None = None
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    start_time: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    wandb_config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None
    truncated: bool = False

    @property
    def finished(self) -> bool:
        """Whether the log holds the run's exit record."""
        return self.exit_code is not None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, wait_s: float = 0.0) -> OfflineRun:
        """Load a run from its directory or its ``.wandb`` file.

        ``run.finish()`` returns *before* wandb-core has flushed the log's last block and exit record to disk
        (measured: ~50 ms later on an idle machine, longer under load; ``wandb.teardown()`` does wait). To read a
        run straight after finishing it in the same process, pass ``wait_s`` or call ``wandb.teardown()`` first.

        Args:
            path: A run directory (containing ``run-<id>.wandb``) or the ``.wandb`` file itself.
            wait_s: If positive, re-read the log (every 20 ms) until it holds the exit record, for at most this
                many seconds; then return whatever was read (check :attr:`finished`). 0 reads once.

        Returns:
            The decoded run. A truncated or corrupt log is read up to the damage and flagged ``truncated``.

        Raises:
            FileNotFoundError: If ``path`` does not exist or a directory holds no ``.wandb`` file.
            CorruptLogError: If the file is not a W&B transaction log at all.
        """
        deadline = time.monotonic() + wait_s
        wandb_file = _resolve_wandb_file(Path(path))
        run, last_size = None, -1
        while True:
            size = wandb_file.stat().st_size
            if run is None or size != last_size:  # re-parse only when the log has grown
                run, last_size = cls._load_once(wandb_file), size
            if run.finished or time.monotonic() >= deadline:
                return run
            time.sleep(0.02)

    @classmethod
    def _load_once(cls, path: Path) -> OfflineRun:
        """Read and decode the log once."""
        wandb_file = _resolve_wandb_file(path)
        run_dir = wandb_file.parent
        records, truncated = read_records(wandb_file)
        stem = wandb_file.stem
        run = cls(path=run_dir, wandb_file=wandb_file, run_id=stem[4:] if stem.startswith("run-") else stem)
        run.truncated = truncated
        run._ingest(records)
        return run

    def _ingest(self, records: list[Record]) -> None:
        """Fold the records into this object's fields."""
        config: dict[str, Any] = {}
        summary: dict[str, Any] = {}
        saw_summary = False
        seen_files: set[str] = set()
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self._add_history(record.history)
            elif kind == "summary":
                saw_summary = True
                _apply_updates(summary, record.summary)
            elif kind == "config":
                _apply_updates(config, record.config)
            elif kind == "run":
                self._apply_run(record.run, config)
            elif kind == "artifact":
                self.artifacts.append(_artifact_dict(record.artifact))
            elif kind == "files":
                for item in record.files.files:
                    if item.path not in seen_files:
                        seen_files.add(item.path)
                        self.files.append(item.path)
            elif kind == "exit":
                self.exit_code = int(record.exit.exit_code)
        wandb_config = config.pop("_wandb", {})
        self.wandb_config = wandb_config if isinstance(wandb_config, dict) else {"value": wandb_config}
        self.config = config
        if saw_summary:
            summary.pop("_wandb", None)
        else:
            for row in self.history:
                summary.update(row)
        self.summary = summary

    def _apply_run(self, run: Any, config: dict[str, Any]) -> None:
        """Take identity fields (non-empty ones override) and initial config from a ``RunRecord``."""
        if run.run_id:
            self.run_id = run.run_id
        for attr, proto_attr in (
            ("name", "display_name"),
            ("project", "project"),
            ("entity", "entity"),
            ("group", "run_group"),
            ("job_type", "job_type"),
            ("notes", "notes"),
        ):
            value = getattr(run, proto_attr)
            if value:
                setattr(self, attr, value)
        if run.tags:
            self.tags = list(run.tags)
        if run.HasField("start_time"):
            self.start_time = run.start_time.seconds + run.start_time.nanos / 1e9
        _apply_updates(config, run.config)

    def _add_history(self, history: Any) -> None:
        """Append one history row, and register any table it references."""
        row: dict[str, Any] = {}
        for item in history.item:
            path = _item_path(item)
            if path and path[0]:
                _set_path(row, path, _history_value(item))
        if "_step" not in row and history.HasField("step"):
            row["_step"] = history.step.num
        self.history.append(row)
        for key, value in _flatten(row):
            if _is_table_ref(value):
                self.tables[key] = self._read_table(value, row.get("_step"))

    def _read_table(self, ref: dict[str, Any], step: Any) -> dict[str, Any]:
        """Load the ``.table.json`` a table-file history value points to (``None`` columns/data if unreadable)."""
        table_path = self.path / "files" / ref["path"]
        columns = data = None
        try:
            content = json.loads(table_path.read_text(encoding="utf-8"))
            columns, data = content.get("columns"), content.get("data")
        except (OSError, ValueError, AttributeError):
            pass
        return {"columns": columns, "data": data, "path": str(table_path), "step": step}

    def keys(self) -> set[str]:
        """All top-level history keys (including ``_step``, ``_runtime``, ``_timestamp``)."""
        return {key for row in self.history for key in row}

    def history_of(self, key: str) -> list[tuple[int, Any]]:
        """The ``(step, value)`` pairs of one history key, in logging order.

        Args:
            key: A top-level history key as logged (e.g. ``"train/loss"``). If no row has it as a top-level key,
                a ``"."``-separated path into logged dicts is tried (``"nest.x"`` for ``{"nest": {"x": 1}}``).

        Returns:
            One pair per row containing the key; the step is the row's ``trainer/global_step`` when present
            (Lightning's WandbLogger), else its ``_step``.
        """
        out: list[tuple[int, Any]] = []
        for row in self.history:
            if key in row:
                value = row[key]
            else:
                found, value = _lookup_dotted(row, key)
                if not found:
                    continue
            step = row.get("trainer/global_step", row.get("_step"))
            if isinstance(step, float) and not math.isnan(step) and step.is_integer():
                step = int(step)
            out.append((step, value))
        return out


def _lookup_dotted(row: dict[str, Any], key: str) -> tuple[bool, Any]:
    """Look up a ``"."``-separated path in nested dicts; returns ``(found, value)``."""
    if "." not in key:
        return False, None
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _artifact_dict(artifact: Any) -> dict[str, Any]:
    """Summarize an ``ArtifactRecord``."""
    metadata: Any = _loads(artifact.metadata) if artifact.metadata else {}
    return {
        "name": artifact.name,
        "type": artifact.type,
        "aliases": list(artifact.aliases),
        "metadata": metadata,
        "digest": artifact.digest,
        "description": artifact.description,
        "entries": [
            {
                "path": entry.path,
                "local_path": entry.local_path or None,
                "digest": entry.digest,
                "size": int(entry.size),
                "ref": entry.ref or None,
            }
            for entry in artifact.manifest.contents
        ],
    }


def _resolve_wandb_file(path: Path) -> Path:
    """Map a run directory or ``.wandb`` file to the ``.wandb`` file to read."""
    if not path.exists():
        raise FileNotFoundError(f"no such W&B run directory or .wandb file: {path}")
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.wandb"))
    if not candidates:
        raise FileNotFoundError(f"no .wandb transaction log in {path}")
    match = _RUN_DIR_RE.match(path.name)
    if match:
        preferred = path / f"run-{match.group(2)}.wandb"
        if preferred in candidates:
            return preferred
    return max(candidates, key=lambda p: p.stat().st_mtime)


# --------------------------------------------------------------------------------------------------------------
# discovery


def _is_run_dir(path: Path) -> bool:
    """Whether a directory is named like a W&B run dir and holds a ``.wandb`` file."""
    return _RUN_DIR_RE.match(path.name) is not None and any(path.glob("*.wandb"))


def _run_sort_key(run_dir: Path) -> tuple[float, float, str]:
    """Sort key: the start time in the dir name, then the log's mtime, then the name."""
    match = _RUN_DIR_RE.match(run_dir.name)
    started = 0.0
    if match:
        try:
            started = datetime.strptime(match.group(1), "%Y%m%d_%H%M%S").timestamp()
        except ValueError:
            started = 0.0
    try:
        mtime = max(p.stat().st_mtime for p in run_dir.glob("*.wandb"))
    except (OSError, ValueError):
        mtime = 0.0
    return started, mtime, run_dir.name


def find_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Find local W&B run directories under ``root``, oldest first.

    Args:
        root: A ``WANDB_DIR``, its ``wandb/`` subdirectory, a logger ``save_dir``, any directory above them, or a
            run directory itself. Searched recursively (symlinks such as ``wandb/latest-run`` are not followed);
            the inside of a found run directory is not searched further.

    Returns:
        Directories named ``offline-run-<time>-<id>`` or ``run-<time>-<id>`` that hold a ``.wandb`` file, sorted by
        the start time in their name (then the log's modification time). Empty if ``root`` does not exist.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        return []
    if _is_run_dir(root_path):
        return [root_path]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root_path, followlinks=False):
        keep = []
        for name in dirnames:
            child = Path(dirpath) / name
            if child.is_symlink():
                continue
            if _is_run_dir(child):
                found.append(child)
            else:
                keep.append(name)
        dirnames[:] = keep
    return sorted(found, key=_run_sort_key)


def load_runs(root: str | os.PathLike[str], *, wait_s: float = 0.0) -> list[OfflineRun]:
    """Load every run :func:`find_runs` finds under ``root``, oldest first.

    Args:
        root: See :func:`find_runs`.
        wait_s: Passed to :meth:`OfflineRun.load` for each run (a run that never finished costs the full wait).

    Returns:
        The decoded runs.
    """
    return [OfflineRun.load(run_dir, wait_s=wait_s) for run_dir in find_runs(root)]


def latest_run(root: str | os.PathLike[str], *, wait_s: float = 0.0) -> OfflineRun:
    """Load the most recent run under ``root``.

    Args:
        root: See :func:`find_runs`.
        wait_s: Passed to :meth:`OfflineRun.load`.

    Returns:
        The newest run.

    Raises:
        FileNotFoundError: If no run directory exists under ``root``.
    """
    runs = find_runs(root)
    if not runs:
        where = Path(root).resolve()
        state = "" if where.exists() else " (the path does not exist)"
        raise FileNotFoundError(
            f"no W&B run directory (offline-run-*/run-* holding a .wandb file) found under {where}{state}"
        )
    return OfflineRun.load(runs[-1], wait_s=wait_s)
