"""Checkpoints that survive interruptions: a checkpoint of the current step at ``SIGTERM``/``Ctrl+C``, and checkpoint
files that are never half-written.

:class:`PreemptionCheckpoint` saves ``last.ckpt`` (in the ``ModelCheckpoint``'s folder) when Lightning stops the
fit for a termination signal (Lightning turns ``SIGTERM`` into ``SIGTERMException``; ``SIGINT`` is a
``KeyboardInterrupt``), so ``--ckpt_path last`` resumes from the step the signal arrived at, not from the last
periodic save. It also marks the W&B run as preempting (``wandb.Run.mark_preempting``). Unlike Lightning's
``OnExceptionCheckpoint`` it saves on interruptions only: a crash (a NaN, an OOM, bad data) must not replace the last
good checkpoint with the state that crashed, and an error before training began must not write a checkpoint at all.

:class:`AtomicCheckpointIO` writes each checkpoint to a temporary name in the same folder and renames it into place
(``os.replace``, atomic on POSIX): a kill or a full disk during the write leaves the previous file intact. Lightning's
``TorchCheckpointIO`` serializes to memory first but then writes the target file in place, so a kill during that
write truncates the previous good checkpoint.

SLURM: Lightning's ``SLURMEnvironment`` handles ``SIGUSR1`` (saves ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` and
requeues the job); the requeued job resumes it by itself. ``SIGTERM`` under SLURM's auto-requeue is bypassed by
Lightning, so no second checkpoint is written then.

Example::

    trainer = Trainer(callbacks=[ModelCheckpoint(save_last=True), PreemptionCheckpoint()],
                      plugins=[AtomicCheckpointIO()])
    try:
        trainer.fit(model)
    except SIGTERMException:  # lightning.pytorch.utilities.exceptions; a SystemExit with exit status 0
        sys.exit(143)         # tell the scheduler the job was preempted, not finished
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "PreemptionCheckpoint"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file of that name is intact."""


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` at the current step when the fit is interrupted by ``SIGTERM`` or ``Ctrl+C``, and at the
    end of the fit when the periodic saves are behind it.

    Args:
        dirpath: Where to save when the Trainer has no ``ModelCheckpoint`` (default: ``default_root_dir/checkpoints``).
            With one, its ``dirpath`` and its ``last`` file name are used, so ``ckpt_path="last"`` finds the file.
        on_keyboard_interrupt: Also save on ``Ctrl+C`` (single process only: under DDP the ranks see the interrupt at
            different points, and a collective save could hang).

    Attributes:
        saved: ``(step, path)`` of the checkpoint saved at the interruption, or None.
        reason: ``"SIGTERM"`` or ``"KeyboardInterrupt"`` once interrupted, else None.
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, on_keyboard_interrupt: bool = True) -> None:
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.on_keyboard_interrupt = on_keyboard_interrupt
        self.saved: tuple[int, str] | None = None
        self.reason: str | None = None
        self._trainer: pl.Trainer | None = None
        self._resume_step: int | None = None

    def _target(self, trainer: pl.Trainer) -> tuple[ModelCheckpoint | None, str]:
        # The ModelCheckpoint that keeps `last` (else the first): its folder and its name for the newest state.
        keeping = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        for cb in sorted(keeping, key=lambda cb: not cb.save_last):
            if cb.dirpath:
                return cb, os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        return None, os.path.join(dirpath, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.reason = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt) and self.on_keyboard_interrupt and trainer.world_size == 1:
            self.reason = "KeyboardInterrupt"
        else:
            return
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return  # interrupted before training began: there is nothing to keep
        if self._save_last(trainer) and self.saved is not None:
            step, path = self.saved
            rank_zero_info(f"{self.reason}: saved {path} at step {step}; resume with ckpt_path='last'")
        for logger in trainer.loggers:
            experiment = getattr(logger, "_experiment", None)  # WandbLogger's run, without starting one
            if experiment is not None and hasattr(experiment, "mark_preempting"):
                try:
                    experiment.mark_preempting()
                except Exception:  # noqa: BLE001, S110 (W&B is a copy of the record; the checkpoint matters)
                    pass

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The periodic save may be steps behind the end (every 50 steps, the run stopped at 120): a later
        # `--trainer.max_steps 240 --ckpt_path last` must continue from 120, not redo 100..120.
        checkpoint_cb, _ = self._target(trainer)
        newest = getattr(checkpoint_cb, "_last_global_step_saved", None) if checkpoint_cb is not None else None
        if trainer.global_step > 0 and newest != trainer.global_step:
            self._save_last(trainer)

    def _save_last(self, trainer: pl.Trainer) -> bool:
        checkpoint_cb, path = self._target(trainer)
        previous = None
        if checkpoint_cb is not None:
            # Set before the save, so the callback state inside the file owns it: a resumed ModelCheckpoint then
            # keeps writing `last.ckpt` instead of versioning a stranger's file to `last-v1.ckpt`. ckpt_path="last"
            # picks the newest of the callbacks' last files.
            previous = (checkpoint_cb.last_model_path, checkpoint_cb._last_global_step_saved)  # noqa: SLF001
            checkpoint_cb.last_model_path = path
            checkpoint_cb._last_global_step_saved = trainer.global_step  # noqa: SLF001 (read by _compat.last_save)
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # noqa: BLE001 (the run is ending either way; say why it kept nothing)
            rank_zero_warn(f"could not save {path} at step {trainer.global_step} ({err})")
            if checkpoint_cb is not None and previous is not None:
                checkpoint_cb.last_model_path, checkpoint_cb._last_global_step_saved = previous  # noqa: SLF001
            return False
        self.saved = (trainer.global_step, path)
        if checkpoint_cb is not None:
            checkpoint_cb._last_checkpoint_saved = path  # noqa: SLF001
            for logger in trainer.loggers:  # loggers hear of this save as of any other
                logger.after_save_checkpoint(checkpoint_cb)
        return True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning (2.6.6, training_epoch_loop.reset) rebuilds its logging step from the checkpoint with a +1 that
        # depends on where the save happened (after a batch, inside validation, at the end of the fit), and some of
        # those places (the ones this callback saves at) come out one off. The step is the number of batches that
        # stepped, known exactly at the save: set it once, before the first batch after a resume logs anything.
        if self._resume_step is not None:
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_batches_that_stepped"):
                loop._batches_that_stepped = self._resume_step  # noqa: SLF001
            self._resume_step = None

    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        step = None
        if trainer is not None:
            step = trainer.global_step // max(1, len(trainer.optimizers))  # optimizer steps -> batches that stepped
        return {"saved": list(self.saved) if self.saved else None, "batches_that_stepped": step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("saved")
        self.saved = (int(saved[0]), str(saved[1])) if saved else None
        step = state_dict.get("batches_that_stepped")
        self._resume_step = int(step) if step is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file in the target's folder, then renames it into place."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(os.fspath(path))
        if "://" in str(path):  # remote filesystems (fsspec): no rename there; Lightning's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        except BaseException as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # its folder is not there either
            if isinstance(err, OSError):
                raise CheckpointWriteError(
                    f"could not write checkpoint {target} ({err.strerror or err}); the previous file there is intact: "
                    "free space or fix the folder's permissions, then resume with --ckpt_path last"
                ) from err
            raise
