"""``lightning_cs336.runs`` and ``cs336 runs``: real runs written by a real Trainer to a run record, an offline
W&B run and a CSVLogger, read back, deduplicated, queried, compared and plotted (only ``wandb.Api`` is faked: there
is no W&B server here)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from callback_helpers import TinyLM, make_trainer
from conftest import _WANDB_QUIET, _teardown_wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

import lightning_cs336.callbacks as suite
from lightning_cs336 import runs as lib
from lightning_cs336.cli import main
from lightning_cs336.record import RunRecord

LRS = (0.01, 0.5)


def _fit(root: Path, name: str, lr: float, with_wandb: bool = True, max_steps: int = 6) -> RunRecord:
    record = RunRecord(root, name=name, project="p", group="sweep", tags=["sweep", name])
    loggers: list[Any] = [record, CSVLogger(save_dir=str(root), name=name)]
    if with_wandb:
        wandb_logger = WandbLogger(save_dir=str(root), project="p", name=name, offline=True, tags=["sweep", name])
        record.update_identity(wandb_run_id=wandb_logger.experiment.id)  # what `cs336 fit` does
        loggers.append(wandb_logger)
    callbacks = [suite.SpeedMonitor(), suite.RunInfoLogger()]
    trainer = make_trainer(root, callbacks, loggers, max_steps=max_steps, log_every_n_steps=1, val_check_interval=3)
    trainer.fit(TinyLM(lr=lr))
    if with_wandb:
        import wandb

        wandb.finish()
    return record


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/`` holding two finished sweep runs (record + offline W&B + CSV each, lr 0.01 and 0.5) and a record
    whose process died (``run.json`` still says running, its pid is gone)."""
    base = tmp_path_factory.mktemp("runs")
    root = base / "runs"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _WANDB_QUIET.items():
            mp.setenv(key, value)
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            (base / var).mkdir()
            mp.setenv(var, str(base / var))
        mp.delenv("WANDB_API_KEY", raising=False)
        for lr in LRS:
            _fit(root, f"lr{lr}", lr)
        _fit(root, "crashed", 0.1, with_wandb=False, max_steps=3)
        _teardown_wandb()  # flushes the offline logs' last block and exit record
    run_file = root / "crashed" / "run.json"
    meta = json.loads(run_file.read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    meta.update(state="running", pid=int(dead.stdout), ended_at=None)
    run_file.write_text(json.dumps(meta))
    return root


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["runs", *argv])
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0), out, err


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Two histories have the same steps and (to float precision) the same values."""
    return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b])


def _by_name(runs: list[lib.Run]) -> dict[str, lib.Run]:
    return {r.name: r for r in runs}


# ------------------------------------------------------------------------------------------------------- loading


def test_discover_returns_each_run_once_preferring_the_record(runs_root: Path) -> None:
    runs = lib.discover_runs([runs_root, runs_root / "lr0.01"])  # overlapping paths find a run once
    assert [r.name for r in runs] == ["lr0.01", "lr0.5", "crashed"]  # oldest first
    assert {r.source for r in runs} == {"record"}
    named = _by_name(runs)
    for name in ("lr0.01", "lr0.5"):
        run = named[name]
        assert run.state == "finished" and run.group == "sweep" and run.tags == ["sweep", name]
        assert [p.parent.name for p in run.also] == ["wandb"]  # its offline W&B dir, folded in
        assert len(run.history["val/loss"]) == 2  # validation every 3 steps
        assert lib.steps(run) == 6 and lib.tokens_seen(run) == 6 * 8 * 16
    assert named["crashed"].state == "killed" and named["crashed"].also == []

    # The same runs read from each other source agree with the record.
    offline = lib.discover_runs([runs_root / "wandb"])
    assert [(r.name, r.source, r.state) for r in offline] == [
        ("lr0.01", "wandb-offline", "finished"),
        ("lr0.5", "wandb-offline", "finished"),
    ]
    for run in offline:
        record = named[run.name]
        assert run.run_id == record.run_id and run.config["lr"] == record.config["lr"]
        assert _same(run.history["val/loss"], record.history["val/loss"])
        assert lib.tokens_seen(run) == lib.tokens_seen(record)
    csv_run = lib.load_run(runs_root / "lr0.5" / "version_0")
    assert (csv_run.source, csv_run.name, csv_run.state) == ("csv", "lr0.5/version_0", "unknown")
    assert csv_run.config["lr"] == 0.5 and _same(csv_run.history["val/loss"], named["lr0.5"].history["val/loss"])
    assert lib.steps(csv_run) == 6 and lib.tokens_seen(csv_run) == 768


def test_record_without_wandb_id_still_folds_its_wandb_dir(runs_root: Path, tmp_path: Path) -> None:
    record = _by_name(lib.discover_runs([runs_root]))["lr0.5"]
    copy = tmp_path / "copy"
    shutil.copytree(record.path, copy / "lr0.5")
    shutil.copytree(record.also[0], copy / "wandb" / record.also[0].name)
    meta = json.loads((copy / "lr0.5" / "run.json").read_text())
    meta["wandb_run_id"] = None  # a plain Trainer with RunRecord + WandbLogger: nobody set it
    (copy / "lr0.5" / "run.json").write_text(json.dumps(meta))
    [run] = lib.discover_runs([copy])
    assert run.source == "record" and run.also == [(copy / "wandb" / record.also[0].name).resolve()]


def test_truncated_wandb_run_reads_as_killed_and_segments_merge(runs_root: Path, tmp_path: Path) -> None:
    src = lib.discover_runs([runs_root / "wandb"])[0].path
    assert src is not None
    cut = tmp_path / "cut" / src.name
    shutil.copytree(src, cut)
    log = next(cut.glob("*.wandb"))
    log.write_bytes(log.read_bytes()[: log.stat().st_size // 3])
    run = lib.load_run(cut)
    assert run.source == "wandb-offline" and run.state == "killed"

    # Two offline dirs with one run id (a resumed offline run): one run, the older dir in `also`.
    twice = tmp_path / "twice"
    shutil.copytree(src, twice / src.name)
    shutil.copytree(src, twice / f"offline-run-20991231_235959-{lib.load_run(src).run_id}")
    merged = lib.discover_runs([twice])
    assert len(merged) == 1 and len(merged[0].also) == 1
    assert len(merged[0].history["val/loss"]) == 2 * len(lib.load_run(src).history["val/loss"])


def test_queries(runs_root: Path) -> None:
    runs = lib.discover_runs([runs_root])
    named = _by_name(runs)
    assert [r.name for r in lib.filter_runs(runs, tags=["sweep"], state="finished")] == ["lr0.01", "lr0.5"]
    assert [r.name for r in lib.filter_runs(runs, tags=["sweep", "lr0.5"])] == ["lr0.5"]
    assert [r.name for r in lib.filter_runs(runs, state=["killed", "failed"])] == ["crashed"]
    assert lib.filter_runs(runs, group="nope") == []

    run = named["lr0.5"]
    values = [v for _, v in run.history["val/loss"]]
    assert lib.final(run, "val/loss") == values[-1]
    assert lib.best(run, "val/loss", "min") == lib.Point(*min(run.history["val/loss"], key=lambda p: p[1]))
    assert lib.best(run, "val/loss", "max").value == max(values)
    assert lib.final(run, "nope") is None and lib.best(run, "nope") is None
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        lib.best(run, "val/loss", "lowest")

    expected = min(runs, key=lambda r: lib.best(r, "val/loss").value)
    assert lib.best_run(runs, "val/loss", "min") is expected
    assert lib.best_run(runs, "val/loss", "max") is max(runs, key=lambda r: lib.best(r, "val/loss", "max").value)
    with pytest.raises(ValueError, match="no run logged metric 'val/acc'"):
        lib.best_run(runs, "val/acc")

    # Only lr differs; the volatile run_info keys (host, cwd, command line) are left out, the rest is equal.
    sweep = [named["lr0.01"], named["lr0.5"]]
    assert lib.config_diff(sweep) == {"lr": [0.01, 0.5]}
    assert "run_info.environment.cwd" in lib.flatten_config(sweep[0].config)
    assert set(lib.config_diff(sweep, ignore=())) >= {"lr"}
    assert lib.config_diff([sweep[0], sweep[0]]) == {}


def test_ema_matches_wandb_smoothing() -> None:
    assert lib.ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert lib.ema([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])  # debiased: no start at zero
    smoothed = lib.ema([0.0, 10.0, float("nan"), 10.0], 0.5)
    assert smoothed[0] == 0.0 and smoothed[1] == pytest.approx(5.0 / 0.75) and math.isnan(smoothed[2])
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\)"):
        lib.ema([1.0], 1.0)


def test_make_figure_has_one_line_per_run(runs_root: Path) -> None:
    runs = lib.discover_runs([runs_root])
    fig = lib.make_figure(runs, ["train/loss", "val/loss"], smoothing=0.6, x="tokens")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["train/loss (EMA 0.6)", "val/loss (EMA 0.6)"]
    assert [len(ax.get_lines()) for ax in axes] == [3, 3]
    assert [line.get_label() for line in axes[1].get_lines()] == ["lr0.01", "lr0.5", "crashed"]
    # x: the token count logged at each validation's step (8 x 16 tokens a step).
    run = runs[0]
    counted = dict(run.history["throughput/tokens_total"])
    assert list(axes[1].get_lines()[0].get_xdata()) == [counted[s] for s, _ in run.history["val/loss"]]
    assert lib._tokens_at(run, [0, 100]) == [128.0, 128.0 * 101]  # past the last point: at the last rate
    with pytest.raises(ValueError, match="x must be 'step' or 'tokens'"):
        lib.make_figure(runs, ["val/loss"], x="time")


def test_load_project_fails_fast_offline_and_maps_the_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="WANDB_MODE=offline"):
        lib.load_project("p")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ValueError, match="no W&B API key"):
        lib.load_project("p")

    # No W&B server here: a stand-in for wandb.Api with the public API's attributes.
    class FakeRun:
        name, id, state, tags, group, notes = "r", "abc", "crashed", ["t"], "", None
        created_at = "2024-01-02T03:04:05Z"
        config = {"lr": 0.1, "_wandb": {}}
        summary_metrics = {"val/loss": 1.5, "_step": 4}

        def scan_history(self) -> list[dict[str, Any]]:
            return [{"_step": 0, "trainer/global_step": 2, "val/loss": 2.0}, {"_step": 1, "val/loss": 1.5}]

    calls: list[tuple[str, Any]] = []

    class FakeApi:
        def __init__(self, timeout: int) -> None:
            pass

        def runs(self, path: str, filters: Any = None) -> list[FakeRun]:
            calls.append((path, filters))
            return [FakeRun()]

    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb, "Api", FakeApi)
    [run] = lib.load_project("p", entity="me", filters={"tags": "t"})
    assert calls == [("me/p", {"tags": "t"})]
    assert (run.name, run.source, run.state, run.run_id, run.group) == ("r", "wandb-api", "killed", "abc", None)
    assert run.config == {"lr": 0.1} and run.summary == {"val/loss": 1.5}
    assert run.history == {"val/loss": [(2, 2.0), (1, 1.5)]} and run.created_at == 1704164645.0


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_list(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "list", str(runs_root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["name", "source", "state", "steps", "final"]
    assert [line.split()[0] for line in lines[1:]] == ["lr0.01", "lr0.5", "crashed"]
    crashed = lines[3].split()
    assert crashed[1:4] == ["record", "killed", "3"]
    lr5 = _by_name(lib.discover_runs([runs_root]))["lr0.5"]
    assert f"{lib.final(lr5, 'val/loss'):.4f}" in lines[2] and "768" in lines[2] and "sweep,lr0.5" in lines[2]

    code, out, _ = _cli(capsys, "list", str(runs_root), "--json", "--tag", "sweep", "--state", "finished")
    data = json.loads(out)
    assert code == 0 and [d["name"] for d in data] == ["lr0.01", "lr0.5"]
    assert data[1]["final"] == lib.final(lr5, "val/loss") and data[1]["tokens_seen"] == 768
    assert data[1]["config"]["lr"] == 0.5 and data[1]["also"]

    code, out, _ = _cli(capsys, "list", str(runs_root), "--group", "sweep", "--tag", "lr0.01")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["lr0.01"]


def test_cli_best(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = lib.discover_runs([runs_root])
    finished = lib.filter_runs(runs, state="finished")
    winner = min(finished, key=lambda r: lib.best(r, "val/loss").value)
    point = lib.best(winner, "val/loss")
    code, out, _ = _cli(capsys, "best", str(runs_root), "--state", "finished")
    assert code == 0
    assert f": {winner.name}  [record, finished]" in out.splitlines()[0]
    assert f"val/loss = {point.value:.4f} at step {point.step}" in out
    assert f"lr: {winner.config['lr']}" in out and "config:" in out

    code, out, _ = _cli(capsys, "best", str(runs_root), "--metric", "val/loss", "--mode", "max", "--json")
    data = json.loads(out)
    loser = max(runs, key=lambda r: lib.best(r, "val/loss", "max").value)
    assert code == 0 and data["run"]["name"] == loser.name and data["mode"] == "max"
    assert data["value"] == lib.best(loser, "val/loss", "max").value and data["run"]["config"]["lr"]


def test_cli_compare(runs_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(runs_root.parent)  # run names are looked up under runs/
    code, out, _ = _cli(capsys, "compare", "lr0.01", str(runs_root / "lr0.5"))
    assert code == 0
    diff_part, metrics_part = out.split("metrics:")
    assert "config differences (1 key):" in diff_part
    assert [line.split() for line in diff_part.splitlines()[2:]] == [["lr", "0.01", "0.5"]]
    named = _by_name(lib.discover_runs([runs_root]))
    for metric in ("val/loss", "train/loss"):
        row = next(line for line in metrics_part.splitlines() if line.split()[:2] == [metric, "final"])
        assert row.split()[2:] == [f"{lib.final(named[n], metric):.4f}" for n in ("lr0.01", "lr0.5")]
    assert any(line.split()[:2] == ["val/loss", "best"] for line in metrics_part.splitlines())

    code, out, _ = _cli(capsys, "compare", "lr0.01", "lr0.5", "--metric", "val/loss", "--json")
    data = json.loads(out)
    assert code == 0 and data["config_diff"] == {"lr": [0.01, 0.5]} and list(data["metrics"]) == ["val/loss"]


def test_cli_plot(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "plots" / "curves.png"
    code, out, _ = _cli(
        capsys, "plot", str(runs_root), "--metric", "train/loss", "val/loss", "--out", str(out_file),
        "--smoothing", "0.6", "--x", "tokens",
    )  # fmt: skip
    assert code == 0 and f"wrote {out_file}" in out
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_file.stat().st_size > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out_file).shape[0] > 500  # two subplots tall


def test_cli_help_and_report_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "--help")
    assert code == 0 and "list" in out and "compare" in out and "plot" in out
    # `report` is listed exactly when lightning_cs336/report.py (its implementation) exists.
    has_report = importlib.util.find_spec("lightning_cs336.report") is not None
    assert ("report" in out) == has_report


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "{root}/missing"], "does not exist"),
        (["list", "{empty}"], "no runs found under"),
        (["list", "{root}", "--tag", "nope"], "no run matches --tag nope"),
        (["list", "{root}", "--metric", "val/acc"], "no run logged metric 'val/acc'"),
        (["best", "{root}", "--metric", "val/acc"], "no run logged metric 'val/acc'"),
        (["best", "{root}", "--mode", "lowest"], "invalid choice: 'lowest'"),
        (["plot", "{root}", "--metric", "val/acc", "--out", "{empty}/x.png"], "no run logged metric 'val/acc'"),
        (["plot", "{root}", "--smoothing", "1.5", "--out", "{empty}/x.png"], "smoothing must be in [0, 1)"),
        (["compare", "{root}/lr0.01"], "compare needs at least two runs"),
        (["compare", "{root}/lr0.01", "nosuchrun", "--root", "{root}"], "neither a path nor a run name"),
        (["compare", "{root}/lr0.01", "{root}/lr0.5", "--metric", "val/acc"], "no run logged metric 'val/acc'"),
        ([], "choose a command"),
    ],
)
def test_cli_errors_are_one_line(
    runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _cli(capsys, *(a.format(root=runs_root, empty=empty) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("cs336: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
