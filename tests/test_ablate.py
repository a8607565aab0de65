"""``cs336 ablate`` (lightning_cs336.ablate): the grid, ``--vary`` parsing, bad input, and a real ablation of tiny
runs with one failing variant, re-run to check that finished runs are skipped."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_cs336 import ablate
from lightning_cs336.ablate import RunResult, Variant

REPO = Path(__file__).resolve().parents[1]


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from lightning_cs336.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


@pytest.fixture
def base_config(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """configs/debug.yaml, shrunk to 4 steps, with its runs under tmp_path/runs (and the working directory in tmp)."""
    cfg = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text(encoding="utf-8"))
    trainer = cfg["trainer"]
    trainer.update(
        default_root_dir=str(tmp_path / "runs"),
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
    )
    # Each run's W&B files and checkpoints in its own directory (the shipped config fixes neither).
    assert "save_dir" not in trainer["logger"]["init_args"] and "dirpath" not in trainer["callbacks"][0]["init_args"]
    cfg["model"]["warmup_steps"] = 2
    cfg["data"]["data_dir"] = str(tiny_data)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("CS336_TRACEBACK", raising=False)
    return path


# ------------------------------------------------------------------------------------------------ parsing, grid


def test_split_values_respects_brackets_and_quotes() -> None:
    assert ablate.split_values("1e-3, 3e-3") == ["1e-3", "3e-3"]
    assert ablate.split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert ablate.split_values('"a,b",c') == ['"a,b"', "c"]
    with pytest.raises(ValueError, match="unbalanced"):
        ablate.split_values("[a,b")


def test_parse_value_is_yaml_with_yaml12_floats() -> None:
    assert ablate.parse_value("1e-3") == 1e-3 and isinstance(ablate.parse_value("1e-3"), float)
    assert ablate.parse_value("5E4") == 5e4
    assert ablate.parse_value("8") == 8 and isinstance(ablate.parse_value("8"), int)
    assert ablate.parse_value("true") is True
    assert ablate.parse_value("null") is None
    assert ablate.parse_value("[1, 2]") == [1, 2]
    assert ablate.parse_value('"8"') == "8"
    assert ablate.parse_value("adamw") == "adamw"


@pytest.mark.parametrize("value", [1e-3, 3e-3, 1e-20, 2.5e20, 0.5, -1.0, 3, True, None, "abc", "8", "a,b", [1, 2]])
def test_cli_value_parses_back(value: Any) -> None:
    text = ablate.cli_value(value)
    assert ablate.parse_value(text) == value
    assert yaml.safe_load(text) == value  # jsonargparse reads overrides with PyYAML: no YAML 1.2 floats there


def test_parse_vary() -> None:
    assert ablate.parse_vary("model.num_heads=4,8,16") == ("model.num_heads", [4, 8, 16])
    assert ablate.parse_vary("--model.max_lr=1e-3,3e-3") == ("model.max_lr", [1e-3, 3e-3])
    assert ablate.parse_vary("logging.tags=[a,b],[c]") == ("logging.tags", [["a", "b"], ["c"]])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("model.num_heads", "expected KEY=V1"),
        ("model.num_heads=", "expected KEY=V1"),
        ("=4,8", "not a dotted config key"),
        ("model num_heads=4", "not a dotted config key"),
        ("model.num_heads=4,,8", "empty value"),
        ("model.num_heads=4,4", "given twice"),
        ("model.num_heads=[4,8", "unbalanced"),
        ("trainer.default_root_dir=a,b", "sets trainer.default_root_dir itself"),
        ("logging.experiment_name=a,b", "itself"),
    ],
)
def test_parse_vary_rejects(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ablate.parse_vary(spec)


def test_parse_seeds() -> None:
    assert ablate.parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="integers"):
        ablate.parse_seeds("0,x")
    with pytest.raises(ValueError, match="twice"):
        ablate.parse_seeds("1,1")


def test_expand_grid_baseline_first_then_the_product() -> None:
    grid = ablate.expand_grid([("model.num_heads", [4, 8, 16]), ("model.max_lr", [1e-3, 3e-3])])
    assert len(grid) == 1 + 6
    assert grid[0] == Variant() and grid[0].label == "baseline" and grid[0].args() == []
    assert grid[1].overrides == (("model.num_heads", 4), ("model.max_lr", 1e-3))
    assert grid[2].overrides == (("model.num_heads", 4), ("model.max_lr", 3e-3))  # the first key varies slowest
    assert grid[-1].label == "model.num_heads=16 model.max_lr=0.003"
    assert grid[-1].args() == ["--model.num_heads=16", "--model.max_lr=0.003"]
    with pytest.raises(ValueError, match="given twice"):
        ablate.expand_grid([("model.d_ff", [1]), ("model.d_ff", [2])])
    with pytest.raises(ValueError, match="nothing to ablate"):
        ablate.expand_grid([])


def test_names() -> None:
    keys = ["model.num_heads", "model.max_lr"]
    assert ablate.default_name("configs/quickstart.yaml", keys) == "quickstart-num_heads+max_lr"
    variant = Variant((("model.num_heads", 4), ("model.max_lr", 1e-3)))
    assert ablate.run_name("abl", variant, 1, keys) == "abl.num_heads=4.max_lr=0.001-s1"
    assert ablate.run_name("abl", Variant(), 0, keys) == "abl.baseline-s0"
    assert ablate.run_name("abl", Variant(), None, keys) == "abl.baseline"
    odd = Variant((("data.data_dir", "data/a b"),))
    assert "/" not in ablate.run_name("abl", odd, 0) and " " not in ablate.run_name("abl", odd, 0)
    # Two keys with one last part keep their full names.
    assert ablate.default_name("b.yaml", ["model.context_length", "data.context_length"]) == (
        "b-model.context_length+data.context_length"
    )


def test_name_args_follow_where_the_config_keeps_its_name() -> None:
    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"name": "x", "save_dir": "w"}}
    assert ablate._name_args({"trainer": {"logger": wandb}}, "n", Path("r")) == ["--trainer.logger.init_args.name=n"]
    bare = {"class_path": "lightning.pytorch.loggers.WandbLogger"}
    assert ablate._name_args({"trainer": {"logger": bare}}, "n", Path("r")) == [
        "--trainer.logger.init_args.name=n",
        "--trainer.logger.init_args.save_dir=r",
    ]
    assert ablate._name_args({"logging": {"project_name": "p"}}, "n", Path("r")) == ["--logging.experiment_name=n"]
    assert ablate._name_args({}, "n", Path("r"))[0] == "--trainer.logger=lightning.pytorch.loggers.WandbLogger"
    with pytest.raises(ValueError, match="list"):
        ablate._name_args({"trainer": {"logger": [wandb]}}, "n", Path("r"))


def test_error_of() -> None:
    text = "Seed set to 0\ncs336: error: need 0 <= min_lr <= max_lr\n"
    assert ablate._error_of(text, 2) == "cs336: error: need 0 <= min_lr <= max_lr"
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\n    boom()\nRuntimeError: CUDA out of memory\n'
    assert ablate._error_of(trace + "wandb: done\n", 1) == "RuntimeError: CUDA out of memory"
    parser = "tip: see --help\nerror: Parser key \"model.num_heads\":\n  Expected a <class 'int'>. Got value: abc\n"
    assert "Expected a <class 'int'>" in ablate._error_of(parser, 2)
    assert ablate._error_of("", -9) == "killed by signal 9"


# ------------------------------------------------------------------------------------------------ the table


def _run(variant: str, seed: int, state: str, final: float | None, best: float | None = None) -> RunResult:
    return RunResult(variant, seed, f"{variant}-s{seed}", state=state, final=final, best=best or final)


def test_summarize_and_format() -> None:
    groups = [
        ("baseline", [_run("b", 0, "finished", 2.0), _run("b", 1, "finished", 4.0)]),
        ("model.d_ff=128", [_run("v", 0, "finished", 1.0, 0.5), _run("v", 1, "failed", None)]),
        ("model.d_ff=-1", [_run("f", 0, "failed", None), _run("f", 1, "failed", None)]),
    ]
    columns, rows, details = ablate.summarize(groups)
    assert columns == list(ablate.COLUMNS)
    base, variant, failed = (dict(zip(columns, row, strict=True)) for row in rows)
    assert (base["n"], base["failed"], base["final_mean"]) == (2, 0, 3.0)
    assert math.isclose(base["final_std"], math.sqrt(2.0))
    assert base["delta_final"] == 0.0
    assert (variant["n"], variant["failed"], variant["final_mean"], variant["final_std"]) == (1, 1, 1.0, None)
    assert variant["delta_final"] == -2.0 and variant["delta_best"] == 0.5 - 3.0
    assert (failed["n"], failed["failed"], failed["final_mean"], failed["delta_final"]) == (0, 2, None, None)
    assert details[0]["finals"] == [2.0, 4.0]
    text = ablate.format_table(columns, rows)
    lines = text.splitlines()
    assert lines[0].split() == columns
    assert len({len(line) for line in lines[:2]}) == 1  # aligned
    assert "3.0000" in lines[1] and "-2.0000" in lines[2] and lines[3].split()[3] == "-"
    md = ablate.format_markdown(columns, rows)
    assert md.splitlines()[0].startswith("| variant | n |") and "| model.d_ff=-1 | 0 | 2 |" in md


def test_find_record_takes_the_newest(tmp_path: Path) -> None:
    from lightning_cs336.record import RunRecord

    assert ablate.find_record(tmp_path / "none", "a") is None
    for name, status in (("a.x-s0", "failed"), ("a.x-s0-2", "failed"), ("a.x-s0-10", "success"), ("a.x-s00", "x")):
        record = RunRecord(tmp_path, name=name)
        record.set_state("running")
        record.finalize(status)
    (tmp_path / "a.x-s0-11").mkdir()  # no run.json: not a record
    assert ablate.find_record(tmp_path, "a.x-s0") == tmp_path / "a.x-s0-10"
    assert ablate._next_name(tmp_path, "a.x-s0") == "a.x-s0-3"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_and_exit_2(
    base_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--config", str(tmp_path / "missing.yaml"), "--vary", "model.d_ff=1,2"], "does not exist"),
        (["--config", str(base_config), "--vary", "model.d_ff"], "expected KEY=V1"),
        (["--config", str(base_config)], "--vary"),
        (["--config", str(base_config), "--vary", "model.d_ff=1", "--seeds", "a"], "integers"),
        (["--config", str(base_config), "--vary", "model.d_ff=1", "--jobs", "0"], "at least 1"),
        (["--config", str(base_config), "--vary", "model.d_ff=1", "--", "--logging.experiment_name=x"], "names"),
    ]
    for argv, match in cases:
        code, _, err = _main(["ablate", *argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("cs336: error: ") and match in lines[0], (argv, err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_unknown_key_and_bad_value_fail_before_any_run(
    base_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One value per key: one parse for the baseline and one for both keys, side by side.
    argv = ["ablate", "--config", str(base_config), "--vary", "model.num_head=2", "--vary", "model.d_ff=x"]
    code, _, err = _main([*argv, "--jobs", "2"], capsys)
    error = [line for line in err.splitlines() if line.startswith("cs336: error:")]
    assert code == 2 and len(error) == 1, err
    assert "model.num_head" in error[0]
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ a real ablation


def _run_dirs(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir() if p.is_dir() and p.name != "ablations"}


@pytest.mark.slow
def test_ablation_with_a_failing_variant_then_rerun_skips_finished(
    base_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_cs336.record import read_record

    # Two variants x two seeds, and max_lr=-1 fails at set-up (min_lr > max_lr), before it writes any record.
    argv = ["ablate", "--config", str(base_config), "--vary", "model.max_lr=1e-2,-1", "--seeds", "0,1"]
    argv += ["--jobs", "2", "--name", "lr"]
    start = time.monotonic()
    code, out, err = _main(argv, capsys)
    first_seconds = time.monotonic() - start
    assert code == 1, out + err
    parent = tmp_path / "runs" / "cs336-debug"
    out_dir = parent / "ablations"

    # The table: baseline and both variants, the failure with its error.
    assert "baseline" in out and "model.max_lr=0.01" in out and "model.max_lr=-1" in out
    assert "lr.max_lr=-1-s0 (failed): cs336: error: need 0 <= min_lr <= max_lr" in out
    data = json.loads((out_dir / "lr.json").read_text(encoding="utf-8"))
    assert data["columns"] == list(ablate.COLUMNS)
    rows = {row[0]: dict(zip(data["columns"], row, strict=True)) for row in data["rows"]}
    assert list(rows) == ["baseline", "model.max_lr=0.01", "model.max_lr=-1"]
    base, good, bad = rows.values()
    assert (base["n"], base["failed"], good["n"], good["failed"], bad["n"], bad["failed"]) == (2, 0, 2, 0, 0, 2)
    for row in (base, good):
        assert all(isinstance(row[k], float) for k in ("final_mean", "final_std", "best_mean", "best_std"))
    assert base["delta_final"] == 0.0
    assert math.isclose(good["delta_final"], good["final_mean"] - base["final_mean"])
    assert good["final_mean"] < base["final_mean"]  # ten times the learning rate, after 4 steps
    assert bad["final_mean"] is None and bad["delta_final"] is None
    failed = [r for r in data["runs"] if r["state"] != "finished"]
    assert sorted(r["name"] for r in failed) == ["lr.max_lr=-1-s0", "lr.max_lr=-1-s1"]
    assert all("min_lr <= max_lr" in r["error"] and Path(r["log"]).is_file() for r in failed)
    assert "| baseline | 2 | 0 |" in (out_dir / "lr.md").read_text(encoding="utf-8")

    # Each run is an ordinary cs336 fit run: its own directory, group and tags, W&B files and checkpoints inside.
    names = {"lr.baseline-s0", "lr.baseline-s1", "lr.max_lr=0.01-s0", "lr.max_lr=0.01-s1"}
    assert _run_dirs(parent) == names
    for name in names:
        meta = read_record(parent / name).meta
        assert meta["state"] == "finished" and meta["group"] == "lr" and "ablation" in meta["tags"]
        assert (parent / name / "wandb").is_dir() and (parent / name / "checkpoints" / "last.ckpt").is_file()
    assert read_record(parent / "lr.max_lr=0.01-s1").meta["config"]["model"]["max_lr"] == 0.01
    assert read_record(parent / "lr.max_lr=0.01-s1").meta["config"]["seed_everything"] == 1
    assert not list(Path.cwd().iterdir())  # nothing landed in the working directory

    # The summary: a run record of its own (and an offline W&B run in the same folder), an HTML report.
    summary = read_record(out_dir / "lr")
    assert summary.meta["state"] == "finished" and summary.meta["tags"] == ["ablation-summary"]
    assert summary.meta["group"] == "lr"
    columns, table = summary.table("ablation/table")
    assert columns == list(ablate.COLUMNS) and [r[0] for r in table] == list(rows)
    assert summary.meta["summary"]["best_variant"] == "model.max_lr=0.01"
    assert summary.meta["summary"]["runs_failed"] == 2
    assert list((out_dir / "lr" / "wandb").glob("offline-run-*"))
    try:
        import lightning_cs336.report  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out_dir / "lr.html").is_file()

    # Re-run: the finished runs are skipped; the failed ones (and one whose record says failed) run again.
    run_json = parent / "lr.baseline-s1" / "run.json"
    meta = json.loads(run_json.read_text(encoding="utf-8"))
    run_json.write_text(json.dumps({**meta, "state": "failed"}), encoding="utf-8")
    start = time.monotonic()
    code, out, err = _main(argv, capsys)
    rerun_seconds = time.monotonic() - start
    assert code == 1, out + err
    assert "3 already finished (skipped), 3 to run" in err
    assert _run_dirs(parent) == names | {"lr.baseline-s1-2"}  # only the re-run that got past set-up adds one
    data = json.loads((out_dir / "lr.json").read_text(encoding="utf-8"))
    by_name = {r["name"]: r for r in data["runs"]}
    assert by_name["lr.baseline-s1-2"]["state"] == "finished" and not by_name["lr.baseline-s1-2"]["skipped"]
    assert all(by_name[n]["skipped"] for n in names - {"lr.baseline-s1"})
    assert data["rows"][0][1] == 2  # the baseline again has two seeds: s0 and the newest s1
    assert len(read_record(out_dir / "lr").table("ablation/table")[1]) == 3  # the summary was replaced, not appended
    print(f"ablation: first {first_seconds:.1f}s, re-run {rerun_seconds:.1f}s")
