"""Tests for lightning_cs336.wandb_reader against real offline W&B runs written by wandb itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_cs336.wandb_reader import (
    CorruptLogError,
    OfflineRun,
    find_runs,
    iter_records,
    latest_run,
    load_runs,
    read_records,
)


def _run_dir(run: Any) -> Path:
    """The ``offline-run-*`` directory of a live wandb run (``run.dir`` is its ``files/`` subdir)."""
    return Path(run.dir).parent


def test_plain_run_round_trip(wandb_env: Path, tmp_path: Path) -> None:
    import wandb

    run = wandb.init(project="p", config={"a": 1, "nested": {"b": 2.5}}, tags=["t1", "t2"], notes="some notes")
    losses = [1.5, 0.25, 0.0]
    for i, loss in enumerate(losses):
        run.log({"train/loss": loss, "nan_metric": float("nan"), "label": f"s{i}", "block": {"depth": i}})
    table = wandb.Table(columns=["prompt", "score"], data=[["hi", 1], ["yo", 2.5]])
    run.log({"samples": table})
    run.summary["best"] = 0.25
    run.summary["scratch"] = 1
    del run.summary["scratch"]
    run.config.update({"extra": [1, 2], "deep": {"x": None, "y": "z"}})
    weights = tmp_path / "weights.txt"
    weights.write_text("hello")
    artifact = wandb.Artifact("weights", type="model", metadata={"k": 1, "tag": "v"})
    artifact.add_file(str(weights))
    run.log_artifact(artifact, aliases=["best", "candidate"])
    run_id, run_dir = run.id, _run_dir(run)
    run.finish()

    assert find_runs(wandb_env) == [run_dir]
    assert find_runs(wandb_env / "wandb") == [run_dir]
    assert find_runs(run_dir) == [run_dir]
    loaded = latest_run(wandb_env, wait_s=30)  # finish() returns before wandb-core flushes the log's tail
    assert [r.run_id for r in load_runs(wandb_env)] == [run_id]
    assert OfflineRun.load(loaded.wandb_file).history == loaded.history

    assert loaded.path == run_dir and loaded.wandb_file == run_dir / f"run-{run_id}.wandb"
    assert (loaded.run_id, loaded.project, loaded.entity, loaded.name) == (run_id, "p", None, None)
    assert loaded.tags == ["t1", "t2"] and loaded.notes == "some notes"
    assert loaded.exit_code == 0 and loaded.finished and not loaded.truncated
    assert loaded.start_time is not None and loaded.start_time > 1e9

    assert loaded.config == {"a": 1, "nested": {"b": 2.5}, "extra": [1, 2], "deep": {"x": None, "y": "z"}}
    assert "_wandb" not in loaded.config and isinstance(loaded.wandb_config, dict)

    # History: one row per log call; "train/loss" stays one key, dicts keep their nesting; 0.0 reads back as int 0.
    assert len(loaded.history) == 4
    assert [row["_step"] for row in loaded.history] == [0, 1, 2, 3]
    assert loaded.history_of("train/loss") == [(0, 1.5), (1, 0.25), (2, 0)]
    assert all(math.isnan(v) for _, v in loaded.history_of("nan_metric"))
    assert loaded.history_of("label") == [(0, "s0"), (1, "s1"), (2, "s2")]
    assert [row["block"] for row in loaded.history[:3]] == [{"depth": 0}, {"depth": 1}, {"depth": 2}]
    assert loaded.history_of("block.depth") == [(0, 0), (1, 1), (2, 2)]
    assert {"train/loss", "nan_metric", "label", "block", "samples", "_step", "_runtime", "_timestamp"} == (
        loaded.keys()
    )

    # Tables: the history value is a table-file reference; the reader loads the JSON it points to.
    ref = loaded.history[3]["samples"]
    assert ref["_type"] == "table-file" and ref["path"].startswith("media/table/samples_")
    assert ref["nrows"] == 2 and ref["ncols"] == 2
    tab = loaded.tables["samples"]
    assert tab["columns"] == ["prompt", "score"] and tab["data"] == [["hi", 1], ["yo", 2.5]]
    assert tab["path"] == str(run_dir / "files" / ref["path"]) and tab["step"] == 3
    assert ref["path"] in loaded.files

    # Summary: merged updates, explicit writes and deletions; internal _wandb dropped.
    assert loaded.summary["best"] == 0.25 and "scratch" not in loaded.summary
    assert loaded.summary["train/loss"] == 0 and loaded.summary["label"] == "s2"
    assert loaded.summary["block"] == {"depth": 2} and loaded.summary["_step"] == 3
    assert "_wandb" not in loaded.summary

    # Artifacts: the logged one, plus the run_table artifact wandb creates for the logged table.
    by_name = {a["name"]: a for a in loaded.artifacts}
    assert by_name[f"run-{run_id}-samples"]["type"] == "run_table"
    art = by_name["weights"]
    assert art["type"] == "model" and art["metadata"] == {"k": 1, "tag": "v"}
    assert sorted(art["aliases"]) == ["best", "candidate", "latest"] and len(art["digest"]) == 32
    assert [e["path"] for e in art["entries"]] == ["weights.txt"] and art["entries"][0]["size"] == 5
    assert Path(art["entries"][0]["local_path"]).read_text() == "hello"


def test_lightning_wandb_logger(wandb_env: Path, tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import WandbLogger

    class LoggingModel(BoringModel):
        def __init__(self, lr: float = 0.1, width: int = 32) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.seen: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            self.seen.append(float(out["loss"].detach()))
            self.log("train_loss", out["loss"])
            return out

    save_dir = tmp_path / "save"
    logger = WandbLogger(save_dir=str(save_dir), project="lp", name="boring", tags=["lt"])
    model = LoggingModel()
    trainer = pl.Trainer(
        max_steps=5,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        logger=logger,
    )
    trainer.fit(model)
    run_id = logger.experiment.id
    logger.experiment.finish()

    runs = find_runs(save_dir)
    assert len(runs) == 1 and runs[0].parent == save_dir / "wandb"
    loaded = latest_run(save_dir, wait_s=30)
    assert (loaded.run_id, loaded.name, loaded.project, loaded.tags) == (run_id, "boring", "lp", ["lt"])
    assert loaded.config == {"lr": 0.1, "width": 32}
    assert loaded.exit_code == 0 and not loaded.truncated
    assert loaded.history_of("train_loss") == list(enumerate(model.seen))
    assert [row["trainer/global_step"] for row in loaded.history] == [0, 1, 2, 3, 4]
    assert {"train_loss", "trainer/global_step", "epoch"} <= loaded.keys()
    assert loaded.summary["train_loss"] == model.seen[-1]


def _make_long_run(exit_code: int = 0) -> tuple[Path, list[float]]:
    """A finished offline run spanning several 32 KiB blocks, with one record split across blocks."""
    import wandb

    run = wandb.init(project="trunc", config={"lr": 0.5})
    values = [i * 0.5 for i in range(400)]
    for value in values[:200]:
        run.log({"metric_q": value, "group": {"inner": value}})
    run.log({"bigtext": "z" * 70_000})  # ~70 KB record: split into first/middle/last chunks
    for value in values[200:]:
        run.log({"metric_q": value, "group": {"inner": value}})
    run_dir = _run_dir(run)
    run.finish(exit_code=exit_code)
    return run_dir, values


def test_truncated_and_corrupt_logs(wandb_env: Path, tmp_path: Path) -> None:
    run_dir, values = _make_long_run(exit_code=3)
    full = OfflineRun.load(run_dir, wait_s=30)
    data = full.wandb_file.read_bytes()
    assert len(data) > 3 * 32 * 1024
    assert full.exit_code == 3 and not full.truncated
    assert [v for _, v in full.history_of("metric_q")] == values
    assert full.history_of("group.inner") == full.history_of("metric_q")
    assert len(full.history[200]["bigtext"]) == 70_000
    records, truncated = read_records(full.wandb_file)
    assert not truncated and records[-1].WhichOneof("record_type") == "exit"
    assert len(list(iter_records(full.wandb_file, strict=True))) == len(records)

    def load_variant(name: str, content: bytes) -> OfflineRun:
        variant = tmp_path / name / run_dir.name
        variant.mkdir(parents=True)
        (variant / full.wandb_file.name).write_bytes(content)
        return OfflineRun.load(variant)

    # Cut points strictly inside record payloads (so never on a record boundary), in increasing order.
    big = data.find(b"z" * 100)
    cuts = [3, data.find(b"metric_q", 2000) + 3, big + 10, big + 40_000, data.rfind(b"metric_q") + 4, len(data) - 1]
    assert cuts == sorted(cuts) and big > 0
    previous = -1
    for cut in cuts:
        part = load_variant(f"cut{cut}", data[:cut])
        assert part.truncated and part.exit_code is None and not part.finished
        assert part.run_id == full.run_id
        assert part.history == full.history[: len(part.history)]
        assert len(part.history) >= previous
        previous = len(part.history)
        with pytest.raises(CorruptLogError):
            list(iter_records(part.wandb_file, strict=True))
    assert previous >= 399  # the last cut drops only the tail records, no history row

    cut_in_big = load_variant("bigcut", data[: big + 40_000])
    assert len(cut_in_big.history) == 200 and cut_in_big.config == {"lr": 0.5}

    middle = data.find(b"metric_q", len(data) // 2) + 2
    corrupt = bytearray(data)
    corrupt[middle] ^= 0xFF
    damaged = load_variant("corrupt", bytes(corrupt))
    assert damaged.truncated and damaged.exit_code is None
    assert 0 < len(damaged.history) < len(full.history)
    assert damaged.history == full.history[: len(damaged.history)]

    empty = load_variant("empty", b"")
    assert empty.truncated and empty.history == [] and empty.run_id == full.run_id
    with pytest.raises(CorruptLogError):
        load_variant("garbage", b"not a wandb log at all")


def _leet_flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with "." and spell non-finite floats the way `wandb leet inspect --json` does."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, val in value.items():
            out.update(_leet_flat(val, f"{prefix}{key}."))
        return out
    if isinstance(value, float) and not math.isfinite(value):
        value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return {prefix[:-1]: value}


def test_history_matches_wandb_leet_inspect(wandb_env: Path) -> None:
    import wandb

    run = wandb.init(project="leet", config={"a": {"b": [1, 2]}})
    for i in range(5):
        run.log({"train/loss": 1 / (i + 1), "acc": 0.0, "nan": float("nan"), "inf": float("inf"), "d": {"x": i}})
    run.log({"tab": wandb.Table(columns=["c"], data=[[1], [2]])})
    run.config.update({"later": "yes"})
    run_dir = _run_dir(run)
    run.finish()
    loaded = OfflineRun.load(run_dir, wait_s=30)
    assert loaded.finished

    wandb_cli = Path(sys.executable).with_name("wandb")
    cmd = [str(wandb_cli)] if wandb_cli.exists() else [sys.executable, "-m", "wandb"]
    proc = subprocess.run([*cmd, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "No such command" in proc.stdout + proc.stderr:
        pytest.skip(f"`wandb leet inspect` is not available in wandb {wandb.__version__}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dumped = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    leet_history = [rec["history"] for rec in dumped if rec["type"] == "history"]
    assert len(leet_history) == len(loaded.history) == 6
    for leet_row, row in zip(leet_history, loaded.history, strict=True):
        assert _leet_flat(row) == leet_row["item"]
        assert row["_step"] == leet_row.get("step", {}).get("num", 0)

    leet_config: dict[str, Any] = {}
    for rec in dumped:
        if rec["type"] == "run":
            leet_config.update(rec["run"].get("config", {}).get("update", {}))
        elif rec["type"] == "config":
            leet_config.update(rec["config"].get("update", {}))
    leet_config.pop("_wandb", None)
    assert leet_config == loaded.config == {"a": {"b": [1, 2]}, "later": "yes"}
    assert len(dumped) == len(read_records(loaded.wandb_file)[0])


def test_config_remove_and_nested_updates(wandb_env: Path) -> None:
    """update/remove semantics, on a log written by hand with wandb's own protobuf messages."""
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    run = pb.Record()
    run.run.run_id = "handmade"
    for key, value in (("a", 1), ("b", {"c": 2, "d": 3}), ("_wandb", {})):
        item = run.run.config.update.add()
        item.key, item.value_json = key, json.dumps(value)
    records.append(run)
    config = pb.Record()
    config.config.remove.add().key = "a"
    config.config.remove.add().nested_key.extend(["b", "d"])
    nested = config.config.update.add()
    nested.nested_key.extend(["b", "e"])
    nested.value_json = "[4]"
    records.append(config)
    history = pb.Record()
    history.history.step.num = 7
    item = history.history.item.add()
    item.key, item.value_json = "loss", "NaN"
    records.append(history)

    body = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for record in records:
        payload = record.SerializeToString()
        body += struct.pack("<IHB", zlib.crc32(payload, zlib.crc32(b"\x01")), len(payload), 1) + payload
    run_dir = wandb_env / "wandb" / "offline-run-20240101_000000-handmade"
    run_dir.mkdir(parents=True)
    (run_dir / "run-handmade.wandb").write_bytes(bytes(body))

    loaded = latest_run(wandb_env)
    assert loaded.config == {"b": {"c": 2, "e": [4]}} and loaded.wandb_config == {}
    assert loaded.history_of("loss")[0][0] == 7 and math.isnan(loaded.history_of("loss")[0][1])
    assert math.isnan(loaded.summary["loss"])  # no summary record: falls back to the last history values
    assert loaded.exit_code is None and not loaded.truncated


def test_latest_run_errors(tmp_path: Path) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "wandb" / "offline-run-20240101_000000-abc").mkdir(parents=True)  # a run dir without a .wandb log
    assert find_runs(empty) == [] and load_runs(empty) == []
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        latest_run(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        latest_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        OfflineRun.load(empty)
