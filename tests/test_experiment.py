"""The seed's ``logging:`` block, W&B's environment variables, run names and directories, ``--no-wandb`` and the
fallback when W&B cannot start (``lightning_cs336/experiment.py`` through the real ``cs336 fit``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_cs336.cli import main
from lightning_cs336.experiment import LoggingConfig, expand_fit_config, render_name
from lightning_cs336.record import read_record

ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIG = ROOT / "configs" / "config_with_wandb.yaml"
TINY = ["--model.d_model", "32", "--model.num_layers", "2", "--model.num_heads", "2", "--model.d_ff", "64"]
TINY += ["--model.context_length", "32", "--data.batch_size", "4", "--data.val_windows", "4"]


def run_main(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def expanded(args: list[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """The config ``--print_config`` shows (what the block expanded into)."""
    assert run_main(["fit", *args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def classes(entries: list[dict[str, Any]]) -> list[str]:
    return [e["class_path"].rsplit(".", 1)[-1] for e in entries]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS", "WANDB_NOTES", "WANDB_RUN_GROUP", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


# ------------------------------------------------------------------------------------------------ the block's keys


def test_block_has_exactly_the_seeds_keys() -> None:
    seed = yaml.safe_load(SEED_CONFIG.read_text())["logging"]
    assert set(seed) == set(vars(LoggingConfig())) == {
        "project_name", "experiment_name", "tags", "notes", "entity", "log_model", "log_code", "log_artifacts",
        "log_training_every", "log_validation_every", "log_gradient_norms", "log_learning_rate", "log_memory_usage",
        "log_compute_time",
    }  # fmt: skip


def test_each_key_maps_onto_lightning(offline: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = expanded(["--config", str(SEED_CONFIG)], capsys)
    trainer = cfg["trainer"]
    wandb_args = trainer["logger"][0]["init_args"]
    record_args = trainer["logger"][1]["init_args"]
    assert classes(trainer["logger"]) == ["WandbLogger", "RunRecord"]
    assert wandb_args["project"] == record_args["project"] == "cs336-basics"  # project_name
    assert wandb_args["name"] == record_args["name"] == "transformer-4L-128D-lr0.003-bs16"  # experiment_name default
    assert wandb_args["tags"] == ["transformer", "language-model", "cs336"] == record_args["tags"]  # tags
    assert wandb_args["notes"].startswith("Training transformer")  # notes
    assert trainer["log_every_n_steps"] == 10  # log_training_every
    assert trainer["val_check_interval"] == 100 and trainer["check_val_every_n_epoch"] is None  # log_validation_every
    names = classes(trainer["callbacks"])
    for name in ("GradientNormMonitor", "LearningRateMonitor", "MemoryMonitor", "SpeedMonitor",
                 "CheckpointArtifactLogger", "TextSampleLogger", "HistogramLogger", "RunInfoLogger"):  # fmt: skip
        assert name in names
    ckpt = next(cb for cb in trainer["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))
    assert ckpt["init_args"]["dirpath"] == "runs/cs336-basics/transformer-4L-128D-lr0.003-bs16/checkpoints"
    assert not (offline / "runs").exists()  # --print_config writes nothing


@pytest.mark.parametrize(
    ("key", "gone"),
    [
        ("log_gradient_norms", "GradientNormMonitor"),
        ("log_learning_rate", "LearningRateMonitor"),
        ("log_memory_usage", "MemoryMonitor"),
        ("log_compute_time", "SpeedMonitor"),
        ("log_model", "CheckpointArtifactLogger"),
        ("log_artifacts", "TextSampleLogger"),
    ],
)
def test_switches_remove_their_callback(key: str, gone: str, offline: Path, capsys: pytest.CaptureFixture) -> None:
    block = offline / "b.yaml"
    seed = yaml.safe_load(SEED_CONFIG.read_text())
    seed["logging"][key] = False
    block.write_text(yaml.safe_dump(seed))
    names = classes(expanded(["--config", str(block)], capsys)["trainer"]["callbacks"])
    assert gone not in names and "RunInfoLogger" in names


def test_block_and_plain_config_disagreeing_is_an_error(offline: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", str(ROOT / "configs/debug.yaml"), "--logging.project_name", "other"]
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "logging.project_name='other' disagrees with trainer.logger WandbLogger project='cs336-debug'" in err
    args = ["fit", "--config", str(ROOT / "configs/debug.yaml"), "--logging.log_training_every", "3"]
    assert run_main(args) == 2
    assert "logging.log_training_every=3 disagrees with trainer.log_every_n_steps=5" in capsys.readouterr().err


def test_plain_lightning_config_keeps_working(offline: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = expanded(["--config", str(ROOT / "configs/debug.yaml")], capsys)
    loggers = cfg["trainer"]["logger"]
    assert classes(loggers) == ["WandbLogger", "RunRecord"]
    assert loggers[0]["init_args"]["project"] == "cs336-debug"  # the config's own choices are kept
    assert loggers[0]["init_args"]["save_dir"] == "runs/cs336-debug/debug"  # "." (unset) is the run's directory
    assert cfg["trainer"]["log_every_n_steps"] == 5
    assert cfg["trainer"]["default_root_dir"] == "runs/cs336-debug/debug"
    assert "PreemptionCheckpoint" in classes(cfg["trainer"]["callbacks"])
    assert classes(cfg["trainer"]["plugins"]) == ["AtomicCheckpointIO"]


# ------------------------------------------------------------------------------------------------ environment


def test_environment_variables(offline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    monkeypatch.setenv("WANDB_TAGS", "x,y")
    monkeypatch.setenv("WANDB_RUN_GROUP", "g1")
    plain = offline / "plain.yaml"
    plain.write_text("logging:\n  tags: [a]\n")
    cfg = expanded(["--config", str(SEED_CONFIG), "--config", str(plain), "--logging.project_name", "null"], capsys)
    wandb_args = cfg["trainer"]["logger"][0]["init_args"]
    assert wandb_args["project"] == "env-project" and wandb_args["entity"] == "env-team"
    assert wandb_args["tags"] == ["a", "x", "y"] and wandb_args["group"] == "g1"
    # The config wins over the environment.
    cfg = expanded(["--config", str(SEED_CONFIG), "--logging.entity", "cfg-team"], capsys)
    assert cfg["trainer"]["logger"][0]["init_args"]["project"] == "cs336-basics"
    assert cfg["trainer"]["logger"][0]["init_args"]["entity"] == "cfg-team"


@pytest.mark.parametrize(
    ("env", "flag"),
    [({"WANDB_DISABLED": "true"}, []), ({"WANDB_MODE": "disabled"}, []), ({}, ["--no-wandb"]), ({}, ["null"])],
    ids=["WANDB_DISABLED", "WANDB_MODE=disabled", "--no-wandb", "logging-null"],
)
def test_wandb_off_keeps_local_loggers_and_callbacks(
    env: dict[str, str], flag: list[str], offline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ["--config", str(SEED_CONFIG)]
    if flag == ["null"]:
        (offline / "null.yaml").write_text("logging: null\n")
        args += ["--config", str(offline / "null.yaml")]
    else:
        args += flag
    cfg = expanded(args, capsys)
    assert classes(cfg["trainer"]["logger"]) == ["RunRecord", "CSVLogger"]
    assert "GradientNormMonitor" in classes(cfg["trainer"]["callbacks"])


# ------------------------------------------------------------------------------------------------ names


def test_run_names_from_template_and_unique(offline: Path) -> None:
    values = {"num_layers": 4, "d_model": 128, "max_lr": 0.003, "batch_size": 16}
    assert render_name("transformer-{num_layers}L-{d_model}D-lr{max_lr}-bs{batch_size}", values) == (
        "transformer-4L-128D-lr0.003-bs16"
    )
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nope'\]"):
        render_name("x-{nope}", values)
    cfg = {"model": {"num_layers": 2, "d_model": 32, "max_lr": 0.1}, "data": {"batch_size": 4}, "trainer": {}}
    (offline / "runs/cs336/transformer-2L-32D-lr0.1-bs4").mkdir(parents=True)
    _, info = expand_fit_config(cfg, {"project_name": None}, no_wandb=True)
    assert info["run_name"] == "transformer-2L-32D-lr0.1-bs4-2"
    _, info = expand_fit_config(cfg, {"experiment_name": "lr{max_lr}"}, no_wandb=True)
    assert info["run_name"] == "lr0.1"


def test_unwritable_root_is_one_clear_error(offline: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = offline / "a-file"
    blocker.write_text("")  # a file where a directory must go: unwritable even for root
    code = run_main(["fit", "--config", str(SEED_CONFIG), "--trainer.default_root_dir", str(blocker / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and "--trainer.default_root_dir" in err
    assert not (offline / "runs").exists() and blocker.read_text() == ""  # nothing written


# ------------------------------------------------------------------------------------------------ real runs


def _fit(work: Path, tiny_data: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_cs336", "fit", "--config", str(SEED_CONFIG), "--data.data_dir",
           str(tiny_data), "--trainer.max_steps", "4", "--logging.log_validation_every", "2",
           "--logging.log_training_every", "2", "--validate_first", "false", "--trainer.enable_progress_bar",
           "false", *TINY, *extra]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    base.update({"WANDB_SILENT": "true", "WANDB_DATA_DIR": str(work / "wd"), "WANDB_CONFIG_DIR": str(work / "wc"),
                 "WANDB_CACHE_DIR": str(work / "wcache"), "NETRC": str(work / "no-netrc")})  # fmt: skip
    return subprocess.run(cmd, cwd=work, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_no_wandb_run_leaves_record_and_csv(tmp_path: Path, tiny_data: Path) -> None:
    proc = _fit(tmp_path, tiny_data, "--no-wandb")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs/cs336-basics/transformer-2L-32D-lr0.003-bs4"
    run = read_record(run_dir)
    assert run.state == "finished" and run.history("train/loss") and run.history("val/loss")
    assert (run_dir / "csv/metrics.csv").is_file() and not (run_dir / "wandb").exists()
    assert (run_dir / "checkpoints/last.ckpt").is_file() and (run_dir / "code.zip").is_file()
    assert run.meta["config"]["model"]["d_model"] == 32
    assert "W&B is off (--no-wandb)" in proc.stderr
    assert "W&B run:" not in proc.stdout  # the report points at no W&B directory that does not exist


@pytest.mark.slow
def test_fallback_with_a_key_and_no_network_starts_within_seconds(tmp_path: Path, tiny_data: Path) -> None:
    # A closed port on this machine stands for "no network": the connection is refused at once, as it would time
    # out within the probe's 3 s on a real outage.
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    start = time.monotonic()
    proc = _fit(tmp_path, tiny_data, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "unreachable" in line]
    assert len(lines) == 1 and "logging W&B offline instead" in lines[0] and "wandb sync" in lines[0]
    assert elapsed < 60  # the whole run (start-up, 4 steps, report); training itself starts in a few seconds
    run = read_record(tmp_path / "runs/cs336-basics/transformer-2L-32D-lr0.003-bs4")
    assert run.state == "finished" and run.meta["wandb_run_id"]
    assert list((tmp_path / "runs/cs336-basics/transformer-2L-32D-lr0.003-bs4/wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_online_without_key_falls_back_offline(tmp_path: Path, tiny_data: Path) -> None:
    proc = _fit(tmp_path, tiny_data, env={"WANDB_MODE": "online"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no W&B API key" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_wandb_dir_falls_back_to_local_logging(
    offline: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    blocker = offline / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "wandb"))
    cfg = expanded(["--config", str(SEED_CONFIG)], capsys)
    assert classes(cfg["trainer"]["logger"]) == ["RunRecord", "CSVLogger"]
