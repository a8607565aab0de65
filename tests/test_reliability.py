"""Faults injected for real against ``cs336 fit``: SIGTERM, SIGINT and SIGKILL sent to a training process, resume
compared with an uninterrupted run, two runs started at once, a failed checkpoint write, a model that differs from
its checkpoint, and a two-process DDP run of the quickstart config with the whole suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_cs336.record import read_record
from lightning_cs336.wandb_reader import load_runs

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        WANDB_CONFIG_DIR=str(work / ".wandb-config"),
        WANDB_CACHE_DIR=str(work / ".wandb-cache"),
        WANDB_DATA_DIR=str(work / ".wandb-data"),
        OMP_NUM_THREADS="1",
    )
    env.pop("CS336_RUN_NAME", None)
    return env


def _fit_args(data: Path, name: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(DEBUG),
        "--data.data_dir",
        str(data),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.name",
        name,
        *extra,
    ]


def _spawn(work: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_cs336", *args],
        cwd=work,
        env=_env(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _fit(work: Path, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_cs336", *args],
        cwd=work,
        env=_env(work),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    """Until the run record holds ``steps`` train/loss rows (the process is training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if (run_dir / "metrics.jsonl").is_file():
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            if sum("train/loss" in r for r in rows) >= steps:
                return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {steps} logged steps in {run_dir} after {timeout}s")


def _train_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in read_record(run_dir).history("train/loss")]


def _wandb_runs(run_dir: Path) -> list[Any]:
    return load_runs(run_dir / "wandb", wait_s=30)


def _ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, tiny_data: Path) -> None:
    """N steps, stop, resume to 2N == 2N in one go: the same losses, one W&B run, each step once (record and W&B)."""
    common = ["--trainer.log_every_n_steps", "1", "--model.cosine_steps", "16", "--trainer.val_check_interval", "8"]
    full = _fit(tmp_path, _fit_args(tiny_data, "full", *common, "--trainer.max_steps", "16"))
    assert full.returncode == 0, full.stdout + full.stderr
    first = _fit(tmp_path, _fit_args(tiny_data, "split", *common, "--trainer.max_steps", "8"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _fit(tmp_path, _fit_args(tiny_data, "split", *common, "--trainer.max_steps", "16", "--ckpt_path", "last"))
    assert second.returncode == 0, second.stderr[-3000:]

    parent = tmp_path / "runs" / "cs336-debug"
    assert sorted(p.name for p in parent.iterdir()) == ["full", "split"]  # the resume continued its own directory
    whole, split = read_record(parent / "full"), read_record(parent / "split")
    assert split.state == "finished" and len(split.events_of("resume")) == 1
    assert _train_steps(parent / "split") == list(range(16))  # each step once
    # Same data stream position, LR schedule, optimizer state and RNG: the same losses.
    expected = dict(whole.history("train/loss"))
    for step, loss in split.history("train/loss"):
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert [s for s, _ in split.history("val/loss")] == [s for s, _ in whole.history("val/loss")]

    segments = _wandb_runs(parent / "split")
    assert len(segments) == 2 and len({r.run_id for r in segments}) == 1  # one W&B run, two offline segments
    assert segments[0].run_id == split.meta["wandb_run_id"]
    logged = [int(row["trainer/global_step"]) for r in segments for row in r.history if "train/loss" in row]
    assert sorted(logged) == list(range(16))


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
def test_sigterm_saves_the_current_step_marks_preempted_and_resumes(tmp_path: Path, tiny_data: Path) -> None:
    args = _fit_args(tiny_data, "term", "--trainer.max_steps", "100000", "--trainer.log_every_n_steps", "1")
    run_dir = tmp_path / "runs" / "cs336-debug" / "term"
    proc = _spawn(tmp_path, args)
    _wait_for_steps(run_dir, 7, proc)  # past the periodic checkpoint at step 5
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM, not 0: the scheduler sees a preemption
    assert "preempted" in out and "--ckpt_path last" in out
    record = read_record(run_dir)
    assert record.state == "preempted" and record.events_of("state")[-1]["reason"] == "SIGTERM"
    last_logged = _train_steps(run_dir)[-1]
    # The checkpoint is of the step the signal arrived at (global_step counts steps done; logging is 0-based).
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") >= last_logged + 1
    (segment,) = _wandb_runs(run_dir)
    assert segment.exit_code == 143

    stopped = _ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    resumed = _fit(tmp_path, [*args[:-4], "--trainer.max_steps", str(stopped + 3), "--ckpt_path", "last",
                              "--trainer.log_every_n_steps", "1"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_record(run_dir).state == "finished"
    steps = _train_steps(run_dir)
    assert steps == list(range(stopped + 3))  # each step once, continuing the count with no gap
    assert len({r.run_id for r in _wandb_runs(run_dir)}) == 1


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_non_zero(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "runs" / "cs336-debug" / "int"
    proc = _spawn(tmp_path, _fit_args(tiny_data, "int", "--trainer.max_steps", "100000"))
    _wait_for_steps(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out[-3000:]
    assert read_record(run_dir).state == "preempted"
    saved = read_record(run_dir).events_of("checkpoint")[-1]
    assert Path(saved["path"]).name == "last.ckpt" and _ckpt_step(Path(saved["path"])) == saved["step"]


@pytest.mark.slow
def test_sigkill_keeps_the_record_and_a_loadable_checkpoint(tmp_path: Path, tiny_data: Path) -> None:
    from lightning_cs336.cli.runs import runs_main

    run_dir = tmp_path / "runs" / "cs336-debug" / "kill"
    args = _fit_args(tiny_data, "kill", "--trainer.max_steps", "100000", "--trainer.log_every_n_steps", "2")
    proc = _spawn(tmp_path, args)
    _wait_for_steps(run_dir, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # Every logging step up to the kill is in the record (flushed per line): no gap, at most the interval lost.
    steps = _train_steps(run_dir)
    assert len(steps) >= 5 and steps == list(range(1, 2 * len(steps), 2))
    assert read_record(run_dir).state == "killed"
    ckpt = _ckpt_step(run_dir / "checkpoints" / "last.ckpt")  # complete and loadable (written then renamed)
    assert steps[-1] + 1 - 5 <= ckpt <= steps[-1] + 2  # the periodic checkpoint (every 5 steps) kept up
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert runs_main(["list", str(run_dir.parent), "--json"]) == 0

    # Resume: the steps logged after the checkpoint are superseded, so each step appears once.
    resumed = _fit(tmp_path, [*args[:-4], "--trainer.max_steps", str(steps[-1] + 5), "--ckpt_path", "last",
                              "--trainer.log_every_n_steps", "2"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = _train_steps(run_dir)
    assert steps == sorted(set(steps)) and read_record(run_dir).state == "finished"


# ------------------------------------------------------------------------------------------------ storage


def test_atomic_checkpoint_io_keeps_the_previous_file(tmp_path: Path) -> None:
    from lightning_cs336.callbacks.preemption import AtomicCheckpointIO, CheckpointWriteError

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("disk full half-way")  # fails in the middle of torch.save's write

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "bad": Unpicklable(), "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous checkpoint, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointWriteError, match="previous file there is intact"):
        io.save_checkpoint({"global_step": 3}, blocker / "sub" / "last.ckpt")


def test_unwritable_checkpoint_dir_is_found_before_training(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_cs336.cli import main

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = _fit_args(tiny_data, "x", "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={blocker}/c")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "ModelCheckpoint dirpath" in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "config.yaml").exists()  # nothing written


@pytest.mark.slow
def test_two_runs_started_at_once_get_their_own_directories(tmp_path: Path, tiny_data: Path) -> None:
    args = _fit_args(tiny_data, "same", "--trainer.max_steps", "6")
    procs = [_spawn(tmp_path, args) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    parent = tmp_path / "runs" / "cs336-debug"
    assert sorted(p.name for p in parent.iterdir()) == ["same", "same-2"]
    ids = set()
    for run_dir in parent.iterdir():
        assert read_record(run_dir).state == "finished"
        assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 6
        (segment,) = _wandb_runs(run_dir)
        ids.add(segment.run_id)
        assert (run_dir / "config.yaml").is_file()
    assert len(ids) == 2


# ------------------------------------------------------------------------------------------------ correctness


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("trained")
    done = _fit(work, _fit_args(tiny_data, "base", "--trainer.max_steps", "4"))
    assert done.returncode == 0, done.stderr[-3000:]
    return work, work / "runs" / "cs336-debug" / "base" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_a_model_that_differs_from_its_checkpoint_is_an_error(trained: tuple[Path, Path], tiny_data: Path) -> None:
    work, ckpt = trained
    before = sorted(p.name for p in ckpt.parent.iterdir())
    bad = _fit(work, _fit_args(tiny_data, "base", "--model.d_model", "64", "--ckpt_path", str(ckpt)))
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "model.d_model: config 64, checkpoint 32" in lines[-1] and "--ckpt_hparams checkpoint" in lines[-1]
    nothing_left = _fit(work, _fit_args(tiny_data, "base", "--trainer.max_steps", "4", "--ckpt_path", str(ckpt)))
    assert nothing_left.returncode == 2 and "nothing left to train" in nothing_left.stderr.strip().splitlines()[-1]
    taken = _fit(work, _fit_args(tiny_data, "base", "--model.d_model", "64", "--trainer.max_steps", "8",
                                 "--ckpt_path", str(ckpt), "--ckpt_hparams", "checkpoint"))  # fmt: skip
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["d_model"] == 32
    assert set(before) <= {p.name for p in ckpt.parent.iterdir()}  # no checkpoint lost along the way


# ------------------------------------------------------------------------------------------------ scale-out


@pytest.mark.slow
def test_two_process_ddp_quickstart_is_one_run(tmp_path: Path, tiny_data: Path) -> None:
    """The quickstart config, the whole suite and the record, on two CPU processes: one W&B run, one record."""
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.data_dir", str(tiny_data)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.log_every_n_steps", "2", "--model.context_length", "64", "--data.batch_size", "4"]
    args += ["--trainer.enable_progress_bar", "false", "--validate_first", "false"]
    env = _env(tmp_path)
    from callback_helpers import free_port

    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "lightning_cs336", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    parent = tmp_path / "runs" / "cs336-quickstart"
    (run_dir,) = list(parent.iterdir())  # one run directory (rank one took rank zero's name)
    record = read_record(run_dir)
    assert record.state == "finished" and str(record.meta["config"]["trainer"]["devices"]) == "2"
    (segment,) = _wandb_runs(run_dir)  # exactly one W&B run
    assert segment.run_id == record.meta["wandb_run_id"]
    rows = [r for r in record.metrics if "throughput/tokens_per_sec" in r]
    assert rows and all(
        r["throughput/tokens_per_sec"] == pytest.approx(2 * r["throughput/device/tokens_per_sec"]) for r in rows
    )
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 6
    assert not [
        p for p in tmp_path.iterdir() if p.name not in ("runs", "wandb_root") and not p.name.startswith(".wandb")
    ]


# ------------------------------------------------------------------------------------------------ W&B faults


@pytest.mark.slow
def test_wandb_dying_mid_run_does_not_stop_training(tmp_path: Path, tiny_data: Path) -> None:
    """wandb's service process is killed (SIGKILL) while training: one line, training and the record go on."""
    import psutil

    run_dir = tmp_path / "runs" / "cs336-debug" / "wb"
    proc = _spawn(tmp_path, _fit_args(tiny_data, "wb", "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "2"))
    _wait_for_steps(run_dir, 3, proc)
    services = [p for p in psutil.Process(proc.pid).children(recursive=True) if "wandb-core" in " ".join(p.cmdline())]
    assert services, "no wandb-core process to kill"
    for service in services:
        service.kill()
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert [line for line in out.splitlines() if "W&B stopped working" in line and "wandb sync" in line]
    assert "Traceback" not in out
    record = read_record(run_dir)
    assert record.state == "finished" and _train_steps(run_dir)[-1] == 39  # every logging step, to the end
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 40
