"""The local run record (``lightning_cs336/record.py``): written by a real Trainer with the whole suite, read back,
durable under a real SIGKILL, and honest about how a run ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from callback_helpers import TinyLM, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_cs336.callbacks as suite
from lightning_cs336.record import RunRecord, read_jsonl, read_record

TESTS = Path(__file__).resolve().parent


def _suite() -> list[Callback]:
    return [
        suite.GradientNormMonitor(),
        suite.MemoryMonitor(),
        suite.SpeedMonitor(),
        suite.RunInfoLogger(),
        suite.TextSampleLogger(log_every_n_steps=3, prompts=["ab"], max_new_tokens=3),
        suite.HistogramLogger(log_every_n_steps=3),
    ]


def test_record_holds_metrics_tables_checkpoints_summary_and_state(tmp_path: Path) -> None:
    record = RunRecord(tmp_path / "runs", name="r1", project="p", tags=["a", "b"], notes="n")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path, [*_suite(), ckpt], [record], max_steps=6, enable_checkpointing=True).fit(TinyLM())
    run = read_record(tmp_path / "runs" / "r1")
    assert run.state == "finished" and run.meta["tags"] == ["a", "b"] and run.meta["project"] == "p"
    assert [s for s, _ in run.history("train/loss")] == [1, 3, 5]
    assert [s for s, _ in run.history("grad/norm_total")] == [1, 3, 5]
    assert run.history("time/step_ms") and run.history("memory/rss_gib")
    assert run.history("weights/layers.0.weight/mean")  # histogram statistics
    columns, rows = run.table("samples/generations")
    assert columns[0] == "step" and [r[0] for r in rows] == [3, 6, 6][: len(rows)] and len(rows) >= 2
    checkpoints = run.events_of("checkpoint")
    assert [e["step"] for e in checkpoints] == [3, 6] and all(Path(e["path"]).is_file() for e in checkpoints)
    assert run.meta["summary"]["summary/global_step"] == 6
    assert run.meta["hparams"]["lr"] == 1e-2  # the module's hyperparameters
    # pandas can load the metrics as they are
    import pandas as pd

    frame = pd.read_json(tmp_path / "runs" / "r1" / "metrics.jsonl", lines=True)
    assert {"step", "time", "train/loss"} <= set(frame.columns)


def test_failed_run_is_failed_and_keeps_its_rows(tmp_path: Path) -> None:
    class Boom(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            if trainer.global_step == 4:
                raise RuntimeError("boom")

    record = RunRecord(tmp_path, name="bad")
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [Boom()], [record], max_steps=10).fit(TinyLM())
    run = read_record(tmp_path / "bad")
    assert run.state == "failed" and [s for s, _ in run.history("train/loss")] == [1, 3]
    assert run.events_of("state")[-1]["reason"] == "RuntimeError: boom"


def test_keyboard_interrupt_is_preempted_not_finished(tmp_path: Path) -> None:
    class CtrlC(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    record = RunRecord(tmp_path, name="ctrl-c")
    with pytest.raises(SystemExit):
        make_trainer(tmp_path, [CtrlC()], [record], max_steps=10).fit(TinyLM())
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl+C after the first
    assert read_record(tmp_path / "ctrl-c").state == "preempted"


def test_refuses_to_overwrite_and_resumes(tmp_path: Path) -> None:
    make_trainer(tmp_path, [], [RunRecord(tmp_path, name="same")], max_steps=2).fit(TinyLM())
    run_id = read_record(tmp_path / "same").meta["id"]
    with pytest.raises(FileExistsError, match="already exists"):
        make_trainer(tmp_path, [], [RunRecord(tmp_path, name="same")], max_steps=2).fit(TinyLM())
    make_trainer(tmp_path, [], [RunRecord(tmp_path, name="same", resume=True)], max_steps=4).fit(TinyLM())
    again = read_record(tmp_path / "same")
    assert again.meta["id"] == run_id and again.state == "finished"


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert [row["step"] for row in read_jsonl(path)] == [1, 2]


def test_bad_arguments_and_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name must be a non-empty directory name"):
        RunRecord(tmp_path, name="a/b")
    with pytest.raises(ValueError, match="tags must be a list of strings"):
        RunRecord(tmp_path, tags="abc")
    with pytest.raises(FileNotFoundError, match="is not a run record"):
        read_record(tmp_path)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt"):
        read_record(tmp_path)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from callback_helpers import TinyLM, make_trainer
    from lightning.pytorch import Callback
    from lightning_cs336.record import RunRecord

    class Announce(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            print("STEP", trainer.global_step, flush=True)
            time.sleep(0.05)

    record = RunRecord(sys.argv[1], name="killed")
    make_trainer(sys.argv[1], [Announce()], [record], max_steps=100000, log_every_n_steps=2).fit(TinyLM())
    """
)


def test_sigkill_loses_at_most_one_logging_interval(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "STEP 12" or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run = read_record(tmp_path / "killed")
    steps = [s for s, _ in run.history("train/loss")]
    # Steps 0..11 had finished when step 12 began; logging steps are 1, 3, ..., 11. At most one interval is lost.
    assert steps[:5] == [1, 3, 5, 7, 9] and steps[-1] >= 9
    assert run.state == "killed"  # run.json still says running, but its process is gone
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["state"] == "running"
