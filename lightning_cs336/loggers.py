"""Lightning's ``WandbLogger``, made so that a W&B failure in the middle of training never stops the training.

``cs336 fit`` uses it in place of ``lightning.pytorch.loggers.WandbLogger`` (same arguments; a config naming
Lightning's class gets this one). When a call into W&B raises once the run has started (wandb's service process
died, its disk filled, an upload failed), one line says what was lost and how to recover it, and every later W&B
call is a no-op: training, checkpoints and the local run record (``RunRecord``) go on. Failures while the run
*starts* are the CLI's fallback (``experiment.py``), decided before training.

Why not a try/except in each caller: W&B is reached from Lightning's own logger methods, from the suite's sinks
(tables, histograms) and from the checkpoint-artifact callback; guarding the run object they all go through covers
every caller, including ones added later.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from typing_extensions import override

__all__ = ["WandbLogger"]

_PLAIN = (str, bytes, int, float, bool, type(None), tuple, list, dict, set, frozenset)


class _Guarded:
    """A proxy whose calls (and those of the objects it hands out, e.g. ``run.summary``) report exceptions to
    ``on_error`` and return None instead of raising."""

    def __init__(self, target: Any, on_error: Callable[[BaseException], None]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_on_error", on_error)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (any failure of W&B: the caller must not see it)
            self._on_error(err)
            return None

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: self._call(value, *args, **kwargs)
        if isinstance(value, _PLAIN) or name.startswith("__"):
            return value
        return _Guarded(value, self._on_error)

    def __setattr__(self, name: str, value: Any) -> None:
        self._call(setattr, self._target, name, value)

    def __getitem__(self, key: Any) -> Any:
        return self._call(self._target.__getitem__, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call(self._target.__setitem__, key, value)

    def __bool__(self) -> bool:
        return True


def _quiet_wandb_teardown() -> None:
    """wandb's exit hook fails the same way once its service is gone; the one line above already said so."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if getattr(unraisable.object, "__module__", "").startswith("wandb"):
            return
        previous(unraisable)

    sys.unraisablehook = hook


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` that turns a W&B failure during training into one line and a no-op.

    Attributes:
        failure: The first exception W&B raised during the run (then W&B is off), or None.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failure: BaseException | None = None

    def _failed(self, err: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = err
        _quiet_wandb_teardown()
        where = self._save_dir or "."
        print(
            f"cs336: W&B stopped working ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
            "training goes on with W&B off. The local run record has every metric; the offline W&B files written "
            f"so far are under {where}/wandb (upload what is there with `wandb sync`).",
            file=sys.stderr,
        )

    @property  # type: ignore[override]
    @override
    def experiment(self) -> Any:
        if self.failure is not None:
            return DummyExperiment()
        try:
            run = super().experiment
        except Exception:
            if self._experiment is None:
                raise  # W&B could not start: the CLI's fallback decides that before training
            run = self._experiment
        if isinstance(run, DummyExperiment):  # other ranks
            return run
        return _Guarded(run, self._failed)

    @override
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if self.failure is None:
            self._guard(super().log_metrics, metrics, step)

    @override
    def log_hyperparams(self, params: Any) -> None:
        if self.failure is None:
            self._guard(super().log_hyperparams, params)

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if self.failure is None:
            self._guard(super().after_save_checkpoint, checkpoint_callback)

    @override
    def finalize(self, status: str) -> None:
        if self.failure is None:
            self._guard(super().finalize, status)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            if self._experiment is None:
                raise
            self._failed(err)
