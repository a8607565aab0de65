"""On a GPU: the debug CS336 model trains a few steps with the whole suite and the run record, in bf16-mixed, and
every key family reaches the record. Skipped without CUDA (this project's CI has none; run it on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

import lightning_cs336.callbacks as suite
from lightning_cs336.callbacks.peak_flops import lookup_peak_flops
from lightning_cs336.data import TokenDataModule
from lightning_cs336.model import ModelConfig
from lightning_cs336.module import LanguageModel
from lightning_cs336.record import RunRecord, read_record

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_debug_model_trains_with_the_whole_suite_on_gpu(tmp_path: Path, tiny_data: Path) -> None:
    config = ModelConfig.from_config_file(CONFIGS / "debug.yaml", vocab_size=257)
    model = LanguageModel(warmup_steps=2, **config.to_dict())
    data = TokenDataModule(data_dir=str(tiny_data), context_length=config.context_length, batch_size=8, val_windows=8)
    callbacks = [
        LearningRateMonitor(logging_interval="step"),
        suite.GradientNormMonitor(per_layer_depth=2),
        suite.MemoryMonitor(),
        suite.SpeedMonitor(),
        suite.RunInfoLogger(),
        suite.TextSampleLogger(log_every_n_steps=4, prompts=["def "], max_new_tokens=8),
        suite.HistogramLogger(log_every_n_steps=4),
        suite.CheckpointArtifactLogger(),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True),
    ]
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=8,
        log_every_n_steps=2,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=RunRecord(tmp_path, name="gpu"),
        callbacks=callbacks,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    run = read_record(tmp_path / "gpu")
    assert run.state == "finished"
    keys = {key for row in run.metrics for key in row}
    for family in ("train/", "val/", "grad/", "memory/", "time/", "throughput/", "lr-", "weights/"):
        assert any(k.startswith(family) for k in keys), family
    assert "memory/peak_allocated_gib" in keys  # a CUDA-only key
    if lookup_peak_flops(torch.cuda.get_device_name(), "bf16") is not None:
        assert "throughput/mfu" in keys and all(
            0 < r["throughput/mfu"] < 1 for r in run.metrics if "throughput/mfu" in r
        )
    assert run.table("samples/generations")[1]
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
