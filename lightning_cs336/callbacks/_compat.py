"""Every read of Lightning internals the suite makes, in one place, so that a Lightning upgrade is one file to check.

Each function names the private attribute it reads and the Lightning version it was checked against. When a newer
Lightning renames one, the fallback keeps the suite running (with the documented, less exact behaviour) and the
tests in ``tests/test_compat.py`` fail, pointing here.

Checked against: lightning 2.6.6 (``lightning/pytorch/loops/training_epoch_loop.py``,
``lightning/pytorch/callbacks/model_checkpoint.py``, ``lightning/pytorch/strategies/strategy.py``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer

__all__ = [
    "batches_that_stepped",
    "batch_steps_optimizer",
    "checkpoint_io",
    "hold_checkpoint_saves",
    "last_save",
    "on_checkpoint_saved",
]


def batches_that_stepped(trainer: Trainer) -> int:
    """The step axis Lightning logs on: ``fit_loop.epoch_loop._batches_that_stepped`` (2.6.6).

    Lightning increments it in ``on_advance_end``, after ``on_train_batch_end``, once per batch that does not
    accumulate (automatic and manual optimization alike). Fallback: ``trainer.global_step``.
    """
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def batch_steps_optimizer(trainer: Trainer) -> bool:
    """Whether the current training batch ends an optimizer step (it does not accumulate gradients).

    ``fit_loop.epoch_loop._should_accumulate()`` (2.6.6) is the rule Lightning itself uses to advance its logging
    step and step-interval schedulers; its batch counter is incremented before ``on_train_batch_start``, so the answer
    holds from that hook through ``on_train_batch_end``. Under manual optimization ``accumulate_grad_batches`` is 1, so
    every batch steps. Fallback: every batch steps.
    """
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return not (callable(should_accumulate) and should_accumulate())


def last_save(checkpoint_callback: Any) -> tuple[int, str] | None:
    """``(step, path)`` of a ``ModelCheckpoint``'s newest save: ``_last_global_step_saved`` and
    ``_last_checkpoint_saved`` (2.6.6), set right after each write; None for callbacks without them."""
    step = getattr(checkpoint_callback, "_last_global_step_saved", None)
    path = getattr(checkpoint_callback, "_last_checkpoint_saved", None)
    if isinstance(step, int) and isinstance(path, str):
        return step, path
    return None


def checkpoint_io(trainer: Trainer) -> Any:
    """The strategy's checkpoint IO plugin as set, without creating the default one: ``strategy._checkpoint_io``
    (2.6.6; the public ``strategy.checkpoint_io`` property instantiates a ``TorchCheckpointIO`` when unset)."""
    return getattr(trainer.strategy, "_checkpoint_io", None)


SaveListener = Callable[[Trainer, Any, str], None]
_LISTENERS = "_cs336_save_listeners"


def on_checkpoint_saved(checkpoint_callback: Any, listener: SaveListener) -> Callable[[], None]:
    """Call ``listener(trainer, checkpoint_callback, filepath)`` after every file ``checkpoint_callback`` writes.

    Lightning pushes each save to *loggers* (``Logger.after_save_checkpoint``, from ``ModelCheckpoint._save_checkpoint``
    in 2.6.6), not to callbacks; callbacks otherwise have to poll the save markers in several hooks. This wraps that
    method on the one instance (subclasses' overrides included), so every listener hears of every save, weights-only
    ones too, at the moment it happens. Callbacks without ``_save_checkpoint`` (not a ModelCheckpoint) are left alone.

    Returns:
        A function that removes the listener again (call it at teardown).
    """
    original = getattr(checkpoint_callback, "_save_checkpoint", None)
    if not callable(original):
        return lambda: None
    listeners: list[SaveListener] | None = checkpoint_callback.__dict__.get(_LISTENERS)
    if listeners is None:
        listeners = []
        owner = weakref.ref(checkpoint_callback)

        @functools.wraps(original)
        def _save_checkpoint(trainer: Trainer, filepath: str) -> None:
            original(trainer, filepath)
            callback = owner()
            for fn in list(getattr(callback, _LISTENERS, ())):
                fn(trainer, callback, filepath)

        checkpoint_callback.__dict__[_LISTENERS] = listeners
        checkpoint_callback._save_checkpoint = _save_checkpoint
    listeners.append(listener)

    def remove() -> None:
        if listener in listeners:
            listeners.remove(listener)

    return remove


_HOLD = "_cs336_save_holds"


def hold_checkpoint_saves(checkpoint_callback: Any, held: Callable[[], bool]) -> Callable[[], None]:
    """Make a ``ModelCheckpoint`` write nothing while ``held()`` is true, so the files it already wrote stay the
    newest (e.g. ``last.ckpt`` after a run stopped on a NaN must not be replaced by the NaN state).

    Wraps, on the one instance, ``_should_skip_saving_checkpoint`` (2.6.6: checked first by the save triggers of
    ``on_train_batch_end``, ``on_train_epoch_end`` and ``on_validation_end``, before any top-k bookkeeping that could
    delete an older file) and ``_save_checkpoint`` (the one writer, also reached from ``on_train_end`` and
    ``on_exception``). Callbacks without them are left alone.

    Returns:
        A function that removes the hold again.
    """
    skip = getattr(checkpoint_callback, "_should_skip_saving_checkpoint", None)
    save = getattr(checkpoint_callback, "_save_checkpoint", None)
    if not callable(skip) or not callable(save):
        return lambda: None
    holds: list[Callable[[], bool]] | None = checkpoint_callback.__dict__.get(_HOLD)
    if holds is None:
        holds = []
        checkpoint_callback.__dict__[_HOLD] = holds

        def is_held() -> bool:
            return any(h() for h in holds)

        @functools.wraps(skip)
        def _should_skip_saving_checkpoint(trainer: Trainer) -> bool:
            return is_held() or skip(trainer)

        @functools.wraps(save)
        def _save_checkpoint(trainer: Trainer, filepath: str) -> None:
            if not is_held():
                save(trainer, filepath)

        checkpoint_callback._should_skip_saving_checkpoint = _should_skip_saving_checkpoint
        checkpoint_callback._save_checkpoint = _save_checkpoint
    holds.append(held)

    def remove() -> None:
        if held in holds:
            holds.remove(held)

    return remove
