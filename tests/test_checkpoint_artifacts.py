"""CheckpointArtifactLogger with real Trainers, real offline W&B runs read back from disk, CSV and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TinyLM, finish_and_read, make_loggers, make_trainer
from callback_helpers import csv_rows as _csv_rows
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from lightning_cs336.callbacks.checkpoint_artifacts import (
    MANIFEST_NAME,
    ArtifactUnavailableError,
    CheckpointArtifactLogger,
    resolve_checkpoint,
    select_versions_to_delete,
)

# The val/loss each validation reports, by global step: the best is step 4, and with save_top_k=2 the step-2 file is
# deleted by ModelCheckpoint at step 6 (after it was logged).
SCRIPTED_VAL = {2: 3.0, 4: 1.0, 6: 2.0}


class ScriptedVal(TinyLM):
    """TinyLM whose val/loss follows SCRIPTED_VAL, so which checkpoint is best is known in advance."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        scripted = SCRIPTED_VAL.get(self.global_step)
        self.log("val/loss", torch.tensor(scripted) if scripted is not None else loss)


class SlowIO(TorchCheckpointIO):
    """A real TorchCheckpointIO that takes ``delay`` seconds before writing: under AsyncCheckpointIO the file appears
    well after ModelCheckpoint (and WandbLogger's scan) think it was saved (Lightning #17915)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        time.sleep(self.delay)
        super().save_checkpoint(checkpoint, path, storage_options)


class VanishingIO(TorchCheckpointIO):
    """Writes each checkpoint, then deletes the files of ``vanish_step`` at once (a file removed before upload)."""

    def __init__(self, vanish_step: int) -> None:
        super().__init__()
        self.vanish_step = vanish_step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if checkpoint["global_step"] == self.vanish_step:
            Path(path).unlink()


def _fit(tmp_path: Path, callbacks: list, loggers: Any, model: TinyLM | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("max_steps", 6)
    kwargs.setdefault("val_check_interval", 2)
    trainer = make_trainer(tmp_path, callbacks, loggers, enable_checkpointing=True, **kwargs)
    trainer.fit(model or ScriptedVal())
    return trainer


def _manifest(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / MANIFEST_NAME).read_text().splitlines()]


def _step_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_documented_keys() -> None:
    doc = CheckpointArtifactLogger.__doc__
    for key in CheckpointArtifactLogger.METRIC_KEYS + CheckpointArtifactLogger.METADATA_KEYS:
        assert f"``{key}``" in doc, key
    assert "Example::" in doc and "class_path: lightning_cs336.callbacks.checkpoint_artifacts" in doc


def test_one_version_per_save_with_aliases_metadata_and_files(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("wandb", "csv"))
    ckpt_dir = tmp_path / "ckpt"
    mc = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/loss", save_top_k=2, save_last=True)
    callback = CheckpointArtifactLogger()
    trainer = _fit(tmp_path, [callback, mc], loggers)
    run_id = loggers[0].experiment.id
    run = finish_and_read(tmp_path)

    # One artifact version per save step (top-k file and last.ckpt of a step hold the same weights).
    arts = [a for a in run.artifacts if a["type"] == "model"]
    assert [a["metadata"]["step"] for a in arts] == [2, 4, 6]
    assert {a["name"] for a in arts} == {f"model-{run_id}"}
    for art in arts:
        step = art["metadata"]["step"]
        assert {"latest", f"step-{step}"} <= set(art["aliases"])
        meta = art["metadata"]
        assert set(meta) == set(CheckpointArtifactLogger.METADATA_KEYS)
        assert meta["monitor"] == "val/loss" and meta["mode"] == "min" and meta["epoch"] == 0
        assert meta["value"] == pytest.approx(SCRIPTED_VAL[step])
        assert meta["metrics"]["val/loss"] == pytest.approx(SCRIPTED_VAL[step])
        assert "train/loss" in meta["metrics"]
        assert meta["config"] == dict(trainer.lightning_module.hparams)
        assert meta["filename"] == f"epoch=0-step={step}.ckpt"
        assert meta["files"] == [str(ckpt_dir / f"epoch=0-step={step}.ckpt"), str(ckpt_dir / "last.ckpt")]
        assert art["entries"][0]["path"] == "model.ckpt"
        staged = art["entries"][0]["local_path"]
        assert _step_of(staged) == step  # the staged copy is the checkpoint of that step
        on_disk = ckpt_dir / meta["filename"]
        if on_disk.exists():  # step 2 was deleted by save_top_k=2 at step 6, after being logged
            assert Path(staged).read_bytes() == on_disk.read_bytes()
    assert not (ckpt_dir / "epoch=0-step=2.ckpt").exists()

    # "best" moves to the newest version that gets it: its last holder is the minimum of val/loss.
    best_holders = [a["metadata"]["step"] for a in arts if "best" in a["aliases"]]
    assert best_holders[-1] == min(SCRIPTED_VAL, key=SCRIPTED_VAL.get) == 4
    assert "best" not in arts[-1]["aliases"]

    # Scalars: exactly the documented keys, only at the save steps, on W&B and CSV.
    keys = set(CheckpointArtifactLogger.METRIC_KEYS)
    assert keys <= run.keys()
    for key in keys:
        assert [s for s, _ in run.history_of(key)] == [2, 4, 6]
    size = dict(run.history_of("checkpoint/size_mib"))
    assert size[4] == pytest.approx((ckpt_dir / "epoch=0-step=4.ckpt").stat().st_size / 2**20)
    csv_dir = Path(loggers[1].log_dir)
    rows = _csv_rows(csv_dir)
    logged = {k for row in rows for k, v in row.items() if v and k.startswith("checkpoint/")}
    assert logged == keys
    assert sorted(int(r["step"]) for r in rows if r.get("checkpoint/log_ms")) == [2, 4, 6]

    # The CSV logger also gets the manifest, naming the artifact.
    lines = _manifest(csv_dir)
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert {line["artifact"] for line in lines} == {f"model-{run_id}"}
    assert [line["index"] for line in lines] == [1, 2, 3]


def test_async_checkpoint_io_uploads_complete_files(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("wandb",))
    ckpt_dir = tmp_path / "ckpt"
    # save_top_k=2: ModelCheckpoint deletes the step-2 file right after queueing the step-6 write.
    mc = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/loss", save_top_k=2, save_last=True)
    callback = CheckpointArtifactLogger(artifact_name="ckpt-{run_id}", keep_last_k=1)
    with pytest.warns(UserWarning, match="keep_last_k deletes old artifact versions on the W&B server only"):
        _fit(tmp_path, [callback, mc], loggers, plugins=[AsyncCheckpointIO(SlowIO(0.3))])
    run_id = loggers[0].experiment.id
    run = finish_and_read(tmp_path)

    arts = [a for a in run.artifacts if a["type"] == "model"]
    assert [a["metadata"]["step"] for a in arts] == [2, 4, 6]
    assert {a["name"] for a in arts} == {f"ckpt-{run_id}"}
    for art in arts:
        # Complete, and the file of the right step, although each appeared 0.3 s after ModelCheckpoint "saved" it.
        assert _step_of(art["entries"][0]["local_path"]) == art["metadata"]["step"]
    assert [a["metadata"]["step"] for a in arts if "best" in a["aliases"]][-1] == 4
    # keep_last_k=1 cannot delete anything offline: every version stays for `wandb sync`.


def test_log_model_true_warns_and_does_not_duplicate(tmp_path: Path) -> None:
    logger = WandbLogger(save_dir=str(tmp_path), project="cs336-tests", log_model=True)
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=2)
    with pytest.warns(UserWarning, match=r"log_model=True.*no W&B uploads of its own"):
        _fit(tmp_path, [CheckpointArtifactLogger(), mc], [logger])
    run = finish_and_read(tmp_path)

    arts = [a for a in run.artifacts if a["type"] == "model"]
    assert arts, "WandbLogger(log_model=True) logs the top-k files at the end"
    # Only WandbLogger's own versions (its metadata), none from this callback.
    assert all("original_filename" in a["metadata"] and "git_commit" not in a["metadata"] for a in arts)
    # The save-time metadata is kept next to the W&B files instead.
    lines = _manifest(tmp_path)
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert all(line["artifact"] is None and line["metadata"]["monitor"] == "val/loss" for line in lines)


def test_csv_and_tensorboard_get_one_manifest_and_prefixed_scalars(tmp_path: Path) -> None:
    # CSV and TensorBoard loggers sharing one log dir: one manifest line per checkpoint, not two.
    loggers = [CSVLogger(tmp_path, name="test", version=0), TensorBoardLogger(tmp_path, name="test", version=0)]
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=2)
    _fit(tmp_path, [CheckpointArtifactLogger(prefix="ft/"), mc], loggers)

    log_dir = Path(loggers[0].log_dir)
    assert Path(loggers[1].log_dir) == log_dir
    lines = _manifest(log_dir)
    assert [line["step"] for line in lines] == [2, 4, 6]
    for line in lines:
        assert set(line) == {"path", "step", "aliases", "artifact", "index", "metadata"}
        assert line["artifact"] is None
        assert Path(line["path"]).name == f"epoch=0-step={line['step']}.ckpt"
        assert line["metadata"]["value"] == pytest.approx(SCRIPTED_VAL[line["step"]])
        assert f"step-{line['step']}" in line["aliases"]
    rows = _csv_rows(log_dir)
    logged = {k for row in rows for k, v in row.items() if v and "checkpoint/" in k}
    assert logged == {"ft/" + k for k in CheckpointArtifactLogger.METRIC_KEYS}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"ft/" + k for k in CheckpointArtifactLogger.METRIC_KEYS} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("ft/checkpoint/size_mib")] == [2, 4, 6]


def test_no_logger_warns_and_still_writes_manifest(tmp_path: Path) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=2)
    with pytest.warns(UserWarning, match="no logger"):
        trainer = _fit(tmp_path, [CheckpointArtifactLogger(), mc], False)
    lines = _manifest(Path(trainer.log_dir))
    assert [line["step"] for line in lines] == [2, 4, 6]


def test_deleted_file_warns_and_training_continues(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("wandb", "csv"))
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=-1)
    with pytest.warns(UserWarning, match="step 4 .* no longer exists"):
        _fit(tmp_path, [CheckpointArtifactLogger(), mc], loggers, plugins=[VanishingIO(vanish_step=4)])
    run = finish_and_read(tmp_path)
    assert [a["metadata"]["step"] for a in run.artifacts if a["type"] == "model"] == [2, 6]
    lines = _manifest(Path(loggers[1].log_dir))
    assert [(line["step"], line["path"] is None) for line in lines] == [(2, False), (4, True), (6, False)]
    assert lines[1]["metadata"]["value"] == pytest.approx(SCRIPTED_VAL[4])  # the metadata is not lost


@pytest.mark.filterwarnings("ignore:.*exists and is not empty", "ignore:.*resuming from a checkpoint that ended")
def test_resume_does_not_relog(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"

    def callbacks() -> list:
        # No monitor: every 2 steps a step file (top-1) and last.ckpt; no "best" alias.
        mc = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=1, save_last=True)
        return [CheckpointArtifactLogger(), mc]

    first = make_loggers(tmp_path / "a", ("wandb", "csv"))
    _fit(tmp_path, callbacks(), first, max_steps=4, limit_val_batches=0)
    run_a = finish_and_read(tmp_path / "a")
    assert [a["metadata"]["step"] for a in run_a.artifacts] == [2, 4]
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("CheckpointArtifactLogger"))
    assert state["logged_steps"] == [2, 4] and state["count"] == 2  # the step being saved counts as logged

    second = make_loggers(tmp_path / "b", ("wandb", "csv"))
    resumed = CheckpointArtifactLogger()
    trainer = make_trainer(
        tmp_path,
        [resumed, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=1, save_last=True)],
        second,
        max_steps=8,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(ScriptedVal(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    run_b = finish_and_read(tmp_path / "b")
    arts = run_b.artifacts
    assert [a["metadata"]["step"] for a in arts] == [6, 8]
    assert all("best" not in a["aliases"] for a in arts)
    assert [a["metadata"]["filename"] for a in arts] == ["epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt"]
    # The counter continues across the resume; steps 2 and 4 stay logged.
    assert [line["index"] for line in _manifest(Path(second[1].log_dir))] == [3, 4]
    assert resumed.state_dict()["logged_steps"] == [2, 4, 6, 8]


def test_state_dict_round_trip_and_old_dicts() -> None:
    callback = CheckpointArtifactLogger()
    state = {
        "logged_steps": [2, 4],
        "logged": [{"step": 2, "path": "a.ckpt", "aliases": ["latest", "step-2"], "artifact": "m", "index": 1}],
        "count": 2,
    }
    callback.load_state_dict(state)
    assert callback.state_dict() == state
    fresh = CheckpointArtifactLogger()
    fresh.load_state_dict(callback.state_dict())
    assert fresh.state_dict() == state
    for old in ({}, {"count": 3}, {"logged_steps": [1]}):
        other = CheckpointArtifactLogger()
        other.load_state_dict(old)
        assert set(other.state_dict()) == {"logged_steps", "logged", "count"}


def test_select_versions_to_delete() -> None:
    versions = [
        ("v0", ["step-2"]),
        ("v1", ["step-4", "best"]),
        ("v2", ["step-6"]),
        ("v3", ["step-8"]),
        ("v4", ["step-10", "latest"]),
    ]
    assert select_versions_to_delete(versions, 2) == ["v0", "v2"]
    assert select_versions_to_delete(versions, 5) == []
    assert select_versions_to_delete(versions, 1) == ["v0", "v2", "v3"]
    assert select_versions_to_delete(versions, 1, protected=()) == ["v0", "v1", "v2", "v3"]
    assert select_versions_to_delete([], 3) == []
    with pytest.raises(ValueError, match="keep_last_k must be a positive integer, got 0"):
        select_versions_to_delete(versions, 0)


def test_resolve_checkpoint_local_and_keywords(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    assert resolve_checkpoint(ckpt) == ckpt
    assert resolve_checkpoint(str(ckpt)) == ckpt
    for keyword in ("last", "best", "hpc", "registry:my-model:v1"):
        assert resolve_checkpoint(keyword) == keyword
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a W&B artifact"):
        resolve_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("offline", [True, False])
def test_resolve_checkpoint_artifact_fails_fast(offline: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with credentials either
    if not offline:
        monkeypatch.delenv("WANDB_MODE")
    start = time.monotonic()
    for ref in ("my-team/cs336/model-abc123:best", "wandb:model-abc123:v3"):
        with pytest.raises(ArtifactUnavailableError, match="cannot fetch artifact") as err:
            resolve_checkpoint(ref)
        message = str(err.value)
        assert "set WANDB_API_KEY and network, or pass a local checkpoint path" in message
        assert ("offline mode" if offline else "no W&B API key") in message
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"artifact_name": "bad name"}, "artifact_name .* got 'bad name'"),
        ({"artifact_name": "a/b"}, "got 'a/b'"),
        ({"artifact_type": ""}, "artifact_type .* got ''"),
        ({"keep_last_k": 0}, "keep_last_k must be a positive integer or None, got 0"),
        ({"keep_last_k": True}, "got True"),
        ({"wait_timeout_s": 0}, "wait_timeout_s must be a positive number of seconds, got 0"),
        ({"wait_timeout_s": float("nan")}, "got nan"),
        ({"prefix": 3}, "prefix must be a string, got 3"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CheckpointArtifactLogger(**kwargs)


@pytest.mark.slow
def test_ddp_logs_once_from_rank_zero(tmp_path: Path) -> None:
    # Two CPU processes (gloo): every rank runs the hooks, only rank zero records, and no collective is needed.
    loggers = [CSVLogger(tmp_path, name="test", version=0)]
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=2)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=6,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=[CheckpointArtifactLogger(), mc],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ScriptedVal())
    lines = _manifest(tmp_path / "test" / "version_0")
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert all(Path(line["path"]).name.endswith(f"-step={line['step']}.ckpt") for line in lines)
