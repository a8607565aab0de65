r"""
Checkpoint Artifacts
====================

Turns every checkpoint written by ``ModelCheckpoint`` into a W&B model artifact with save-time metadata, waits for
the file to be complete (asynchronous checkpoint IO included). Artifact references, credentials and version pruning
live in ``wandb_access.py`` (shared with the ``cs336`` command).

Size note (~700 lines): one callback whose stages (pushed save detection, waiting for asynchronous writes, upload,
manifest for other loggers, resume bookkeeping) share one queue of pending saves; ~130 lines are its docstring.

"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from typing_extensions import override

from lightning_cs336.callbacks import _compat
from lightning_cs336.callbacks._base import TelemetryCallback, check_positive_int, git_state
from lightning_cs336.callbacks._sinks import find_logger, json_safe, logger_dir, to_host
from lightning_cs336.callbacks.wandb_access import (  # noqa: F401  (re-exported: they used to live here)
    PROTECTED_ALIASES,
    ArtifactUnavailableError,
    load_from_artifact,
    prune_artifact_versions,
    resolve_checkpoint,
    select_versions_to_delete,
)

__all__ = [
    "ArtifactUnavailableError",
    "CheckpointArtifactLogger",
    "MANIFEST_NAME",
    "load_from_artifact",
    "prune_artifact_versions",
    "resolve_checkpoint",
    "select_versions_to_delete",
]

#: File name of the manifest written next to non-W&B logs (one JSON line per checkpoint).
MANIFEST_NAME = "checkpoints.jsonl"


_ARTIFACT_NAME = re.compile(r"^[\w.-]+$")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_ZIP_END_MAGIC = b"PK\x05\x06"
# The end-of-central-directory record is 22 bytes plus a comment of at most 64 KiB.
_ZIP_TAIL = 22 + 65535


# --------------------------------------------------------------------------------------------------------------
# Pure helpers


def _zip_complete(path: str) -> bool:
    """Whether a file is complete as far as its format tells: ``torch.save`` writes a zip archive whose
    end-of-central-directory record comes last, so a zip without it is still being written. Other formats pass."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != _ZIP_LOCAL_MAGIC:
                return True
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(size - _ZIP_TAIL, 0))
            return _ZIP_END_MAGIC in fh.read()
    except OSError:
        return False


def _file_size(path: str) -> int | None:
    """Size in bytes of a file, or the total of a directory's files (sharded checkpoints); None if it is gone."""
    try:
        if os.path.isdir(path):
            return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        return os.path.getsize(path)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------------
# The callback


@dataclass
class _Pending:
    """A detected save whose file(s) may not be complete yet."""

    step: int
    paths: list[str]
    aliases: list[str]
    metadata: dict[str, Any]
    detected_at: float  # time.monotonic() at detection
    io_kind: str  # "sync" (the save returned with the file written), "async" (drain future), "unknown" (poll)
    drain: Future | None = None  # completes once every write queued before it has finished (AsyncCheckpointIO)
    sizes: dict[str, int] = field(default_factory=dict)  # last size seen per path ("unknown" IO: stability check)


@dataclass
class _Marker:
    """What a ModelCheckpoint looked like at the previous scan, to tell which files it wrote since."""

    saved: tuple[int, str]  # (_last_global_step_saved, _last_checkpoint_saved)
    score: Any  # the current_score object (identity changes on every top-k save)
    best_path: str


_READY, _WAIT, _MISSING = "ready", "wait", "missing"


class CheckpointArtifactLogger(TelemetryCallback):
    r"""Log every checkpoint that ``ModelCheckpoint`` writes as a W&B model artifact with save-time metadata.

    **Detecting saves.** Lightning runs ``ModelCheckpoint`` callbacks last, so this callback looks at each
    ``ModelCheckpoint``'s state in its own next hook (training batch end, validation end, epoch end, train end, fit
    end): a change of ``_last_global_step_saved``/``_last_checkpoint_saved`` means files were written at that step
    (the last file, plus the new top-k file identified by its ``current_score``). Saves at the same global step hold
    the same weights (``last.ckpt`` and ``epoch=0-step=500.ckpt``, or two ``ModelCheckpoint``\ s), so they become ONE
    artifact version, which carries the aliases of all of them and lists every path in its metadata.

    **Save-time metadata.** ``on_save_checkpoint`` fires inside ``trainer.save_checkpoint``, before the file is
    written: the metadata is taken there (metrics converted to floats: checkpointing is already a sync point). With
    ``save_weights_only=True`` Lightning skips that hook, so the metadata is taken when the save is detected.

    **Complete files only.** The upload happens once the file is complete: at once with synchronous IO; with
    ``AsyncCheckpointIO`` after the write queued for it has finished (a no-op is queued behind it on the plugin's
    single writer thread and awaited; Lightning #17915); with an unknown IO plugin when the size is stable between
    two looks and a ``torch.save`` zip has its end record. Pending files are checked without blocking at each hook,
    and waited for (at most ``wait_timeout_s`` from detection, then a warning) before the next save, which could
    overwrite ``last.ckpt`` or delete a top-k file, and at the end of fit. A file that no longer exists (deleted by
    ``save_top_k``, moved) gives a warning, never an error. Saves made in ``ModelCheckpoint.on_exception`` are not
    logged (no hook runs after them).

    **Artifact.** Name ``model-<run id>`` (the collection ``WandbLogger(log_model=...)`` uses) or ``artifact_name``,
    type ``artifact_type``, one file entry ``model.ckpt`` (a directory for sharded checkpoints), aliases ``latest``,
    ``step-<global step>`` and ``best`` when one of the files is its ``ModelCheckpoint``'s ``best_model_path`` (W&B
    moves ``best`` to the newest version that gets it, so the latest holder is the best; ModelCheckpoints without a
    ``monitor`` give no ``best``). Metadata (``METADATA_KEYS``): ``step``, ``epoch``, ``monitor``, ``value`` (the
    monitored metric then), ``mode``, ``metrics`` (every ``trainer.callback_metrics`` value as a float), ``config``
    (``pl_module.hparams``, JSON-safe), ``git_commit`` (``git rev-parse HEAD`` of the working directory, or None),
    ``filename`` (the uploaded file's name), ``files`` (every path saved at that step), ``saved_at`` (UNIX time).

    **Other loggers.** For every attached logger that is not a ``WandbLogger`` (CSV, TensorBoard, ...) one JSON line
    per checkpoint is appended to ``<log_dir>/checkpoints.jsonl``: ``path`` (the file, None if it vanished),
    ``step``, ``aliases``, ``artifact`` (the W&B artifact name, or None), ``index`` (count of checkpoints logged),
    ``metadata``. It also goes to the W&B save dir when W&B got no artifact for a checkpoint (``log_model``, disabled
    mode, vanished file) and to the trainer's log dir when there is no logger at all: the metadata is never lost.

    **WandbLogger(log_model=...)** already uploads ``ModelCheckpoint`` files to the same collection. To avoid
    duplicate uploads this callback then warns once and makes NO W&B uploads of its own (its manifest is written to
    the W&B save dir instead): set ``WandbLogger(log_model=False)`` to get this callback's artifacts.

    **keep_last_k.** Online, after each upload (and at the end of fit), versions older than the newest
    ``keep_last_k`` that carry neither ``best`` nor ``latest`` are deleted with ``wandb.Api`` (only versions the
    server has committed are seen). Offline there is no server: every version is logged (so ``wandb sync`` uploads
    all of them) and nothing is deleted; call :func:`prune_artifact_versions` after syncing. Local checkpoint files
    are ``ModelCheckpoint``'s business and are never touched.

    **Resume.** ``state_dict`` holds the global steps already logged (the step being saved included: it is added to
    the checkpoint's copy in ``on_save_checkpoint``, since it is logged right after), the logged paths and the
    count, so a run resumed from a checkpoint never logs those again.

    Everything runs on global rank zero only and needs no collective, so DDP and FSDP need nothing special. What it
    needs from the LightningModule: ``hparams`` (optional, from ``save_hyperparameters()``).

    Args:
        artifact_name: Artifact (collection) name; ``{run_id}`` is replaced by the W&B run id. ``None`` gives
            ``model-<run id>``.
        artifact_type: W&B artifact type.
        keep_last_k: Keep only this many newest versions online (plus ``best``/``latest``); ``None`` keeps all.
        wait_timeout_s: Longest wait, in seconds from detection, for a checkpoint file to be complete.
        prefix: Prepended to every scalar key (e.g. ``"ft/"`` gives ``ft/checkpoint/size_mib``).

    Raises:
        ValueError: If an argument is invalid (the message repeats the value).

    Logged keys (scalars, in addition to the artifact and the manifest):

    ============================  ======  ===========================================================================
    key                           unit    when
    ============================  ======  ===========================================================================
    ``checkpoint/size_mib``       MiB     each logged checkpoint, at its save step: size of the file (or directory)
    ``checkpoint/log_ms``         ms      each logged checkpoint, at its save step: time this callback spent
                                          recording it (W&B staging copy, ``log_artifact``, manifest), waiting excluded
    ============================  ======  ===========================================================================

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.loggers import WandbLogger
        from lightning_cs336.callbacks.checkpoint_artifacts import CheckpointArtifactLogger, resolve_checkpoint

        trainer = Trainer(
            logger=WandbLogger(project="cs336"),  # log_model=False (the default)
            callbacks=[ModelCheckpoint(monitor="val/loss", save_top_k=2, save_last=True),
                       CheckpointArtifactLogger(keep_last_k=5)],
        )
        trainer.fit(model, ckpt_path=resolve_checkpoint("my-team/cs336/model-1a2b3c4d:best"))

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args:
                monitor: val/loss
                save_top_k: 2
                save_last: true
            - class_path: lightning_cs336.callbacks.checkpoint_artifacts.CheckpointArtifactLogger
              init_args:
                keep_last_k: 5
                wait_timeout_s: 600
    """

    #: Every scalar key this callback logs (before ``prefix``).
    METRIC_KEYS: tuple[str, ...] = ("checkpoint/size_mib", "checkpoint/log_ms")
    #: The keys of each artifact's metadata (and of the manifest's ``metadata``).
    METADATA_KEYS: tuple[str, ...] = (
        "step",
        "epoch",
        "monitor",
        "value",
        "mode",
        "metrics",
        "config",
        "git_commit",
        "filename",
        "files",
        "saved_at",
    )

    def __init__(
        self,
        artifact_name: str | None = None,
        artifact_type: str = "model",
        keep_last_k: int | None = None,
        wait_timeout_s: float = 300.0,
        prefix: str = "",
    ) -> None:
        super().__init__(prefix=prefix)
        if artifact_name is not None and (
            not isinstance(artifact_name, str) or not _ARTIFACT_NAME.match(artifact_name.replace("{run_id}", "x"))
        ):
            raise ValueError(
                f"artifact_name must be None or a string of letters, digits, '-', '_', '.' (and '{{run_id}}'),"
                f" got {artifact_name!r}"
            )
        if not isinstance(artifact_type, str) or not _ARTIFACT_NAME.match(artifact_type):
            raise ValueError(
                f"artifact_type must be a non-empty name (letters, digits, '-', '_', '.'), got {artifact_type!r}"
            )
        check_positive_int("keep_last_k", keep_last_k, optional=True)
        if (
            isinstance(wait_timeout_s, bool)
            or not isinstance(wait_timeout_s, (int, float))
            or not math.isfinite(wait_timeout_s)
            or wait_timeout_s <= 0
        ):
            raise ValueError(f"wait_timeout_s must be a positive number of seconds, got {wait_timeout_s!r}")
        self.artifact_name = artifact_name
        self.artifact_type = artifact_type
        self.keep_last_k = keep_last_k
        self.wait_timeout_s = float(wait_timeout_s)
        # Survives a resume (state_dict):
        self._logged_steps: set[int] = set()
        self._logged: list[dict[str, Any]] = []  # {"step", "path", "aliases", "artifact", "index"}
        self._count = 0
        # Per fit:
        self._markers: dict[int, _Marker] = {}
        self._snapshots: dict[int, dict[str, Any]] = {}
        self._pending: list[_Pending] = []
        self._git_commit: str | None = None
        self._last_artifact: Any = None
        self._stop_listening: list[Any] = []

    # ----------------------------------------------------------------------------------------------------------
    # hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not trainer.is_global_zero:
            return
        self._git_commit = git_state()[0]
        wandb_logger = find_logger(trainer, WandbLogger)
        if wandb_logger is not None and getattr(wandb_logger, "_log_model", False):
            self.warn_once(
                "log-model",
                f"WandbLogger(log_model={wandb_logger._log_model!r}) already uploads ModelCheckpoint files as"
                " artifacts, so this callback makes no W&B uploads of its own (to avoid duplicates); its save-time"
                f" metadata goes to {MANIFEST_NAME} in the W&B save dir. Set WandbLogger(log_model=False) to get"
                " this callback's artifacts instead.",
            )
        if not trainer.checkpoint_callbacks:
            self.warn_once("no-checkpoint", "the Trainer has no ModelCheckpoint callback, so there is nothing to log.")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Baseline after the checkpoint (if any) was restored: only saves made from now on count.
        self._markers = {}
        self._scan(trainer)
        self._unlisten()
        if trainer.is_global_zero:
            # Each ModelCheckpoint pushes every file it writes to us at the moment of writing (no polling).
            self._stop_listening = [_compat.on_checkpoint_saved(cb, self._saved) for cb in trainer.checkpoint_callbacks]

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Not save detection (saves are pushed): the upload of what the previous hook's saves queued. Here, because a
        # ModelCheckpoint may write several files in one hook (a top-k file, then last.ckpt) that belong to one
        # artifact version, and because asynchronous IO finishes files later.
        if self._pending and trainer.is_global_zero:
            self._finalize(trainer, block=False)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The strategy's teardown (which drains AsyncCheckpointIO) ran just before this hook.
        self._flush(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unlisten()
        if stage == "fit":
            self._flush(trainer)
        self._snapshots.clear()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Log what was already saved; never let a logging problem mask the original exception.
        try:
            self._flush(trainer)
        except Exception as err:  # pragma: no cover - defensive
            self.warn_once("exception-flush", f"could not log pending checkpoints after an exception: {err!r}")

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        # This save may overwrite last.ckpt or be followed by ModelCheckpoint deleting a top-k file: finish the
        # uploads of earlier steps first (with synchronous IO they are done already; this only waits on async IO).
        self._finalize(trainer, block=True, before_step=step)
        if step not in self._snapshots:
            self._snapshots[step] = self._snapshot(trainer, pl_module, step)
        # The checkpoint holds our state_dict from just before this hook: record in it that this step is logged
        # (it is, right after the save), so a run resumed from this very file neither logs it again nor miscounts.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, dict) and step not in state.get("logged_steps", []):
            state["logged_steps"] = sorted({*state.get("logged_steps", []), step})
            state["count"] = int(state.get("count", 0)) + 1

    @override
    def state_dict(self) -> dict[str, Any]:
        # Queued saves count as logged (they are, right after): a checkpoint holding this state must not relog them.
        queued = {p.step for p in self._pending} - self._logged_steps
        return {
            "logged_steps": sorted(self._logged_steps | queued),
            "logged": [dict(entry) for entry in self._logged],
            "count": self._count + len(queued),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged_steps = {int(s) for s in state_dict.get("logged_steps", [])}
        self._logged = [dict(e) for e in state_dict.get("logged", []) if isinstance(e, Mapping)]
        self._count = int(state_dict.get("count", len(self._logged)))

    # ----------------------------------------------------------------------------------------------------------
    # detection

    def _saved(self, trainer: Trainer, checkpoint_callback: Any, filepath: str) -> None:
        """Pushed right after ``checkpoint_callback`` wrote ``filepath``: queue it (uploaded at the next batch)."""
        self._scan_one(trainer, checkpoint_callback)

    def _unlisten(self) -> None:
        for stop in self._stop_listening:
            stop()
        self._stop_listening = []

    def _flush(self, trainer: Trainer) -> None:
        """Detect the last saves and upload everything pending, waiting for incomplete files (with a timeout)."""
        if not trainer.is_global_zero:
            return
        self._scan(trainer)
        self._finalize(trainer, block=True)
        if self.keep_last_k is not None and self._last_artifact is not None:
            self._prune_online(trainer, wait=True)

    def _scan(self, trainer: Trainer) -> None:
        """:meth:`_scan_one` for every checkpoint callback (at train start for the baseline, and at the end)."""
        for callback in trainer.checkpoint_callbacks:
            self._scan_one(trainer, callback)

    def _scan_one(self, trainer: Trainer, callback: Any) -> None:
        """Compare a ModelCheckpoint with its state at the previous scan and queue the files it wrote since."""
        saved = _compat.last_save(callback)
        if saved is None:
            if not hasattr(callback, "best_model_path"):
                return  # not a model-saving policy (e.g. OnExceptionCheckpoint): nothing to follow
            self.warn_once(
                f"unsupported-{type(callback).__name__}",
                f"{type(callback).__name__} does not expose ModelCheckpoint's save markers; its checkpoints are"
                " not logged.",
            )
            return
        saved_step, saved_path = saved
        score = getattr(callback, "current_score", None)
        best_path = str(getattr(callback, "best_model_path", "") or "")
        marker = _Marker((saved_step, saved_path), score, best_path)
        previous = self._markers.get(id(callback))
        self._markers[id(callback)] = marker
        if previous is None or marker.saved == previous.saved or not saved_path:
            return
        paths: list[str] = []
        monitor = getattr(callback, "monitor", None)
        top_k = getattr(callback, "save_top_k", 0)
        if monitor is not None and score is not None and score is not previous.score:
            # _update_best_and_save stores the same tensor object as current_score and in best_k_models.
            paths += [p for p, v in getattr(callback, "best_k_models", {}).items() if v is score][:1]
        elif monitor is None and top_k != 0 and best_path and self._fresh(best_path, previous, saved_step):
            paths.append(best_path)
        paths.append(saved_path)
        self._detected(trainer, callback, saved_step, list(dict.fromkeys(paths)))

    def _fresh(self, best_path: str, previous: _Marker, step: int) -> bool:
        """Whether a monitor-less ModelCheckpoint rewrote ``best_model_path`` at ``step`` (it may be a stale path
        restored from a checkpoint, or reuse a fixed name)."""
        if best_path != previous.best_path:
            return True
        snapshot = self._snapshots.get(step)
        try:
            return snapshot is not None and os.path.getmtime(best_path) >= snapshot["saved_at"] - 1.0
        except OSError:
            return False

    def _detected(self, trainer: Trainer, callback: Any, step: int, paths: list[str]) -> None:
        """Queue (or merge into the queued entry of the same step) the files one ModelCheckpoint wrote at ``step``."""
        if step in self._logged_steps:
            return  # logged before (this run, or the run this one resumed from)
        best = getattr(callback, "monitor", None) is not None and str(getattr(callback, "best_model_path", "")) in paths
        aliases = ["latest", f"step-{step}"] + (["best"] if best else [])
        entry = next((p for p in self._pending if p.step == step), None)
        if entry is None:
            snapshot = self._snapshots.get(step)
            metadata = dict(snapshot) if snapshot else self._snapshot(trainer, trainer.lightning_module, step)
            # Older snapshots belong to saves no ModelCheckpoint made (a manual trainer.save_checkpoint): drop them.
            self._snapshots = {s: snap for s, snap in self._snapshots.items() if s >= step}
            io_kind, drain = self._io_state(trainer)
            entry = _Pending(step, [], [], metadata, time.monotonic(), io_kind, drain)
            self._pending.append(entry)
            self._pending.sort(key=lambda p: p.step)
        entry.paths = list(dict.fromkeys(entry.paths + paths))
        entry.aliases = list(dict.fromkeys(entry.aliases + aliases))
        meta = entry.metadata
        monitor = getattr(callback, "monitor", None)
        if monitor is not None and meta.get("monitor") is None:
            meta["monitor"] = monitor
            meta["mode"] = getattr(callback, "mode", None)
            value = meta["metrics"].get(monitor)
            if value is None and getattr(callback, "current_score", None) is not None:
                value = json_safe(callback.current_score)
            meta["value"] = value
        meta["files"] = list(entry.paths)

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule | None, step: int) -> dict[str, Any]:
        """The metadata of a checkpoint, as of now (called at save time)."""
        scalars = {
            k: v
            for k, v in trainer.callback_metrics.items()
            if (isinstance(v, torch.Tensor) and v.numel() == 1) or isinstance(v, (int, float))
        }
        metrics = json_safe(to_host(scalars))  # one device-to-host transfer for all of them
        hparams = getattr(pl_module, "hparams", None) if pl_module is not None else None
        return {
            "step": step,
            "epoch": int(trainer.current_epoch),
            "monitor": None,
            "value": None,
            "mode": None,
            "metrics": metrics,
            "config": json_safe(dict(hparams)) if isinstance(hparams, Mapping) else {},
            "git_commit": self._git_commit,
            "filename": None,
            "files": [],
            "saved_at": time.time(),
        }

    @staticmethod
    def _io_state(trainer: Trainer) -> tuple[str, Future | None]:
        """How the strategy writes checkpoints: ``("async", drain future)`` for a plugin with a writer executor
        (AsyncCheckpointIO), ``("sync", None)`` for TorchCheckpointIO, ``("unknown", None)`` otherwise."""
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        io = _compat.checkpoint_io(trainer)
        if io is None:
            return "sync", None  # the strategy creates a TorchCheckpointIO lazily
        for _ in range(8):  # walk _WrappingCheckpointIO chains
            if hasattr(io, "_executor"):
                executor = io._executor
                if not isinstance(executor, Executor):
                    return "sync", None  # no executor: nothing queued (or torn down: everything written)
                try:
                    # One writer thread, FIFO: this no-op completes after every write queued before it.
                    return "async", executor.submit(lambda: None)
                except RuntimeError:  # shut down meanwhile: all writes finished
                    return "sync", None
            if isinstance(io, TorchCheckpointIO):
                return "sync", None
            inner = getattr(io, "checkpoint_io", None)
            if inner is None or inner is io:
                break
            io = inner
        return "unknown", None

    # ----------------------------------------------------------------------------------------------------------
    # completion and upload

    def _state_of(self, entry: _Pending, path: str) -> str:
        """Whether ``path`` of ``entry`` is complete (_READY), may still come (_WAIT) or is gone (_MISSING)."""
        if not _is_local_file_protocol(path):
            return _READY  # remote (fsspec) path: cannot be inspected locally; logged as a manifest entry
        written = entry.drain is None or entry.drain.done()
        if not os.path.exists(path):
            return _MISSING if written and entry.io_kind != "unknown" else _WAIT
        if not written:
            return _WAIT
        if os.path.isdir(path):
            return _READY
        if entry.io_kind == "unknown":
            size, previous = _file_size(path), entry.sizes.get(path)
            entry.sizes[path] = size if size is not None else -1
            if size is None or size != previous:
                return _WAIT
        return _READY if _zip_complete(path) else _WAIT

    def _resolve(self, entry: _Pending, block: bool) -> tuple[str | None, bool]:
        """Pick the file to upload for ``entry``: ``(path or None, done)``. ``done`` is False while waiting."""
        deadline = entry.detected_at + self.wait_timeout_s
        delay = 0.02
        while True:
            states = {path: self._state_of(entry, path) for path in entry.paths}
            ready = [p for p in entry.paths if states[p] == _READY]
            if ready:
                return ready[0], True
            if all(s == _MISSING for s in states.values()):
                self.warn_once(
                    f"missing-{entry.step}",
                    f"the checkpoint of step {entry.step} ({', '.join(entry.paths)}) no longer exists (deleted by"
                    " ModelCheckpoint(save_top_k=...) or moved before it could be logged); only its metadata is"
                    " recorded.",
                )
                return None, True
            if time.monotonic() >= deadline:
                self.warn_once(
                    f"timeout-{entry.step}",
                    f"the checkpoint of step {entry.step} ({', '.join(entry.paths)}) was not complete after"
                    f" {self.wait_timeout_s:g} s (wait_timeout_s); only its metadata is recorded.",
                )
                return None, True
            if not block:
                return None, False
            if entry.drain is not None and not entry.drain.done():
                try:
                    entry.drain.result(timeout=max(deadline - time.monotonic(), 0.0))
                except Exception:  # the future itself never fails; a timeout is handled by the deadline above
                    pass
                continue
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _finalize(self, trainer: Trainer, block: bool, before_step: int | None = None) -> None:
        """Upload the pending entries whose files are complete (all of them, waiting, when ``block``)."""
        remaining: list[_Pending] = []
        for entry in self._pending:
            if before_step is not None and entry.step >= before_step:
                remaining.append(entry)
                continue
            path, done = self._resolve(entry, block)
            if not done:
                remaining.append(entry)
                continue
            self._record(trainer, entry, path)
        self._pending = remaining

    def _record(self, trainer: Trainer, entry: _Pending, path: str | None) -> None:
        """Log one checkpoint: W&B artifact, manifest lines for the other loggers, size and cost scalars."""
        start = time.perf_counter()
        metadata = dict(entry.metadata)
        metadata["filename"] = os.path.basename(path) if path else None
        self._count += 1
        self._logged_steps.add(entry.step)

        wandb_logger = find_logger(trainer, WandbLogger)
        artifact_name = None
        manifest_loggers: list[Logger | None] = [lg for lg in trainer.loggers if lg is not wandb_logger]
        if wandb_logger is not None:
            # log_model: WandbLogger uploads these files itself. disabled: a no-op run would only copy the file.
            skip = bool(getattr(wandb_logger, "_log_model", False))
            skip = skip or getattr(wandb_logger.experiment, "disabled", False) is True
            if not skip and path is not None:
                artifact_name = self._log_artifact(wandb_logger, path, entry.aliases, metadata)
            if artifact_name is None:
                manifest_loggers.append(wandb_logger)  # W&B got nothing: keep the metadata next to its files
        if not trainer.loggers:
            manifest_loggers.append(None)  # the trainer's log dir

        record = {
            "path": os.path.abspath(path) if path and _is_local_file_protocol(path) else path,
            "step": entry.step,
            "aliases": list(entry.aliases),
            "artifact": artifact_name,
            "index": self._count,
            "metadata": metadata,
        }
        written: set[Path] = set()
        for logger in manifest_loggers:
            directory = logger_dir(trainer, logger) if logger is not None else logger_dir(trainer)
            target = (directory / MANIFEST_NAME).resolve()
            if target in written:  # e.g. CSV and TensorBoard loggers sharing one version dir
                continue
            written.add(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

        self._logged.append(
            {
                "step": entry.step,
                "path": path,
                "aliases": list(entry.aliases),
                "artifact": artifact_name,
                "index": self._count,
            }
        )
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        scalars: dict[str, float] = {"checkpoint/log_ms": elapsed_ms}
        size = _file_size(path) if path and _is_local_file_protocol(path) else None
        if size is not None:
            scalars["checkpoint/size_mib"] = size / float(1 << 20)
        self.log_metrics(trainer, scalars, step=entry.step)

    def _log_artifact(
        self, wandb_logger: Logger, path: str, aliases: list[str], metadata: dict[str, Any]
    ) -> str | None:
        """Stage ``path`` as ``model.ckpt`` of a new artifact version and log it. Returns the artifact name."""
        import wandb

        experiment = wandb_logger.experiment
        run_id = str(getattr(experiment, "id", "") or wandb_logger.version or "run")
        name = (self.artifact_name or "model-{run_id}").replace("{run_id}", run_id)
        try:
            artifact = wandb.Artifact(name=name, type=self.artifact_type, metadata=metadata)
            if not _is_local_file_protocol(path):
                artifact.add_reference(path, name="model.ckpt")
            elif os.path.isdir(path):
                artifact.add_dir(path, name="model.ckpt")
            else:
                # add_file copies the file into W&B's staging area now, so a later overwrite cannot corrupt it.
                artifact.add_file(path, name="model.ckpt")
            experiment.log_artifact(artifact, aliases=aliases)
        except (OSError, ValueError) as err:
            self.warn_once(f"artifact-{path}", f"could not log {path} as a W&B artifact ({type(err).__name__}: {err}).")
            return None
        self._last_artifact = artifact
        if self.keep_last_k is not None:
            self._prune_online(None, wait=False, experiment=experiment, name=name)
        return name

    def _prune_online(
        self, trainer: Trainer | None, wait: bool, experiment: Any = None, name: str | None = None
    ) -> None:
        """Apply ``keep_last_k`` on the W&B server (online runs only; see the class docstring)."""
        if experiment is None:
            wandb_logger = find_logger(trainer, WandbLogger) if trainer is not None else None
            if wandb_logger is None:
                return
            experiment = wandb_logger.experiment
        if getattr(experiment, "offline", True) is not False:
            self.warn_once(
                "keep-offline",
                "keep_last_k deletes old artifact versions on the W&B server only; this run is offline, so every"
                " version is kept (call prune_artifact_versions(...) after `wandb sync`).",
            )
            return
        artifact = self._last_artifact
        name = name or (artifact.name.split(":")[0] if artifact is not None else None)
        if not name:
            return
        try:
            if wait and artifact is not None:
                artifact.wait(timeout=int(self.wait_timeout_s))
            prune_artifact_versions(
                f"{experiment.entity}/{experiment.project}/{name}", self.keep_last_k, self.artifact_type
            )
        except Exception as err:  # network trouble must never stop training
            self.warn_once("keep-failed", f"could not prune old artifact versions ({type(err).__name__}: {err}).")
