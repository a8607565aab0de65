"""Every Lightning internal the suite reads (``callbacks/_compat.py``) still exists in the installed Lightning.

When one of these fails after a Lightning upgrade, ``_compat.py`` is the one file to update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import pytest
from callback_helpers import TinyLM, make_trainer
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_cs336.callbacks import _compat


def test_checked_version_is_documented() -> None:
    major_minor = ".".join(lightning.__version__.split(".")[:2])
    assert f"lightning {major_minor}" in (_compat.__doc__ or ""), "re-check _compat.py against this Lightning"


def test_private_attributes_exist(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [], max_steps=1)
    loop = trainer.fit_loop.epoch_loop
    assert isinstance(loop._batches_that_stepped, int)
    assert callable(loop._should_accumulate)
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    assert hasattr(checkpoint, "_last_global_step_saved") and hasattr(checkpoint, "_last_checkpoint_saved")
    assert callable(checkpoint._save_checkpoint)
    assert hasattr(trainer.strategy, "_checkpoint_io")


def test_reads_during_training(tmp_path: Path) -> None:
    seen: list[tuple[int, bool, int]] = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            seen.append((_compat.batches_that_stepped(trainer), _compat.batch_steps_optimizer(trainer), 0))

    make_trainer(tmp_path, [Probe()], max_steps=2, accumulate_grad_batches=2).fit(TinyLM())
    assert [(s, stepping) for s, stepping, _ in seen] == [(0, False), (0, True), (1, False), (1, True)]


@pytest.mark.parametrize("weights_only", [False, True])
def test_every_save_is_pushed(tmp_path: Path, weights_only: bool) -> None:
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True, save_weights_only=weights_only
    )
    heard: list[tuple[int, str]] = []
    stop = _compat.on_checkpoint_saved(ckpt, lambda trainer, cb, path: heard.append((trainer.global_step, path)))
    make_trainer(tmp_path, [ckpt], max_steps=4, enable_checkpointing=True).fit(TinyLM())
    names = [(step, Path(path).name) for step, path in heard]
    assert names == [
        (2, "epoch=0-step=2.ckpt"),
        (2, "last.ckpt"),
        (4, "epoch=0-step=4.ckpt"),
        (4, "last.ckpt"),
    ]
    assert _compat.last_save(ckpt) == (4, str(tmp_path / "ckpt" / "last.ckpt"))
    stop()
    heard.clear()
    make_trainer(tmp_path, [ckpt], max_steps=2, enable_checkpointing=True).fit(TinyLM())
    assert heard == []  # removed listeners hear nothing


def test_non_checkpoint_callbacks_are_left_alone() -> None:
    other = Callback()
    stop = _compat.on_checkpoint_saved(other, lambda *a: None)
    stop()
    assert not hasattr(other, "_save_checkpoint") and _compat.last_save(other) is None
