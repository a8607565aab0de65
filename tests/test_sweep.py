"""``cs336 sweep`` (lightning_cs336.sweep): the space, samplers and pruners by name, bad input, the W&B sweep config,
and real studies in real SQLite files: six trials of the debug model run by two concurrent worker processes with a
pruner (pruned at validations inside the one epoch of the token stream), the report of the study, a driver killed
with SIGKILL and resumed, and a trial on two DDP processes on CPU."""

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
import yaml

from lightning_cs336 import sweep
from lightning_cs336.sweep import Param

REPO = Path(__file__).resolve().parents[1]
STUDY = "lm"
MAX_STEPS, VAL_EVERY = 6, 2
SPACE = {
    "model.max_lr": {"type": "float", "low": "1e-5", "high": 5.0e-2, "log": True},
    "model.d_ff": {"type": "categorical", "choices": [32, 64]},
}
PRUNER = "successive-halving:min_resource=2,reduction_factor=2"


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from lightning_cs336.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def _write_base(root: Path, data_dir: Path) -> Path:
    """The debug model (configs/debug.yaml's model) for 6 steps with a validation every 2, its runs under root/runs,
    a W&B logger (offline) and a checkpoint at every validation."""
    debug = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text(encoding="utf-8"))
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(root / "runs"),
            "max_steps": MAX_STEPS,
            "val_check_interval": VAL_EVERY,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "cs336-debug", "name": "debug"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/loss", "save_last": True},
                }
            ],
        },  # fmt: skip
        "model": {**debug["model"], "warmup_steps": 2, "min_lr": 1.0e-7},
        "data": {**debug["data"], "data_dir": str(data_dir)},
    }
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CS336_TRACEBACK"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _driver(root: Path, trials: int, *extra: str, log: str = "driver.log") -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lightning_cs336", "sweep", "--config", str(root / "base.yaml"), "--space",
               str(root / "space.yaml"), "--trials", str(trials), "--study", STUDY, "--seed", "0", "--pruner",
               PRUNER, *extra]  # fmt: skip
    fh = open(root / log, "wb")  # noqa: SIM115 (closed with the process, below)
    proc = subprocess.Popen(command, cwd=root / "work", stdout=fh, stderr=subprocess.STDOUT, env=_env())
    proc.log_file = fh  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen[bytes], timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.log_file.close()  # type: ignore[attr-defined]


def _study(root: Path) -> Any:
    import optuna

    url = sweep.default_storage(root / "runs" / "cs336-debug", STUDY)
    return optuna.load_study(study_name=STUDY, storage=url)


# ------------------------------------------------------------------------------------------------ the space


def test_parse_space_reads_types_and_yaml11_floats() -> None:
    import optuna

    space = sweep.parse_space(
        {
            "model.max_lr": {"type": "float", "low": "1e-4", "high": 1e-2, "log": True},
            "model.num_layers": {"type": "int", "low": 2, "high": 8, "step": 2},
            "model.d_ff": {"type": "categorical", "choices": [64, "128", "adamw"]},
        }
    )
    assert space["model.max_lr"] == Param("model.max_lr", "float", low=1e-4, high=1e-2, log=True)
    assert space["model.max_lr"].distribution() == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.num_layers"].distribution() == optuna.distributions.IntDistribution(2, 8, step=2)
    assert space["model.num_layers"].grid() == [2, 4, 6, 8] and space["model.num_layers"].ends() == (2, 8)
    assert space["model.d_ff"].choices == (64, 128, "adamw")
    with pytest.raises(ValueError, match="grid sampler needs every value of model.max_lr"):
        space["model.max_lr"].grid()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "must be a mapping"),
        ({"model max_lr": {"type": "float", "low": 0, "high": 1}}, "not a dotted config key"),
        ({"trainer.default_root_dir": {"type": "categorical", "choices": ["a"]}}, "sets trainer.default_root_dir"),
        ({"model.max_lr": 1e-3}, "expected a mapping"),
        ({"model.max_lr": {"type": "normal", "low": 0, "high": 1}}, "type must be one of"),
        ({"model.max_lr": {"type": "float", "low": 0, "hi": 1}}, "unknown field"),
        ({"model.max_lr": {"type": "float", "low": 1, "high": 1}}, "low < high"),
        ({"model.max_lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "needs low > 0"),
        ({"model.max_lr": {"type": "float", "low": 1e-4, "high": 1, "log": True, "step": 0.1}}, "step cannot"),
        ({"model.max_lr": {"type": "float", "low": "a", "high": 1}}, "low must be a number"),
        ({"model.num_layers": {"type": "int", "low": 1.5, "high": 4}}, "must be an integer"),
        ({"model.d_ff": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"model.d_ff": {"type": "categorical", "choices": [64, 64]}}, "given twice"),
        ({"model.d_ff": {"type": "categorical", "choices": [[1], [2]]}}, "must be scalars"),
    ],
)
def test_parse_space_rejects(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sweep.parse_space(data)


def test_samplers_and_pruners_by_name() -> None:
    import optuna

    space = sweep.parse_space({"model.d_ff": {"type": "categorical", "choices": [32, 64]}})
    assert isinstance(sweep.make_sampler("tpe", space, 0), optuna.samplers.TPESampler)
    assert isinstance(sweep.make_sampler("random", space), optuna.samplers.RandomSampler)
    assert isinstance(sweep.make_sampler("grid", space, 1), optuna.samplers.GridSampler)
    assert isinstance(sweep.make_sampler("tpe:n_startup_trials=3", space), optuna.samplers.TPESampler)
    pruner = sweep.make_pruner("median:n_startup_trials=2,n_warmup_steps=4")
    assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_startup_trials == 2
    assert isinstance(sweep.make_pruner(PRUNER), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(sweep.make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(sweep.make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="unknown sampler; choose one of tpe, random, grid"):
        sweep.make_sampler("cmaes", space)
    with pytest.raises(ValueError, match="MedianPruner takes no \\['patience'\\]"):
        sweep.make_pruner("median:patience=3")
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        sweep.make_pruner("median:3")


def test_merge_params_sets_dotted_keys() -> None:
    raw = {"model": {"d_ff": 64, "max_lr": 1e-3}, "trainer": {"callbacks": []}, "data": {"init_args": {"b": 1}}}
    merged = sweep.merge_params(raw, {"model.max_lr": 0.01, "data.batch_size": 4, "trainer.max_steps": 5})
    assert merged["model"] == {"d_ff": 64, "max_lr": 0.01}
    assert merged["data"] == {"init_args": {"b": 1, "batch_size": 4}} and merged["trainer"]["max_steps"] == 5
    assert raw["model"]["max_lr"] == 1e-3  # not modified


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def base(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = _write_base(tmp_path, tiny_data)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("CS336_TRACEBACK", raising=False)
    return path


def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model.max_lr: {type: float, low: [\n", encoding="utf-8")
    bad_dist = tmp_path / "dist.yaml"
    bad_dist.write_text("model.max_lr: {type: float, low: 1.0e-2, high: 1.0e-4}\n", encoding="utf-8")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model.max_l: {type: float, low: 1.0e-4, high: 1.0e-2}\n", encoding="utf-8")
    space = str(tmp_path / "space.yaml")
    cases = [
        (["--space", str(tmp_path / "missing.yaml")], "space file"),
        (["--space", str(bad_yaml)], "is not YAML"),
        (["--space", str(bad_dist)], "need low < high"),
        (["--space", space, "--sampler", "cmaes"], "unknown sampler"),
        (["--space", space, "--pruner", "median:patience=2"], "takes no"),
        (["--space", space, "--trials", "0"], "at least 1"),
        (["--space", space, "--", "--logging.experiment_name=x"], "names its trials"),
        (["--space", space, "--", "--model.max_lr=0.1"], "the sweep sets it"),
        (["--space", str(unknown)], "model.max_l"),  # parsed by cs336 fit: unrecognized argument
    ]
    for argv, match in cases:
        code, _, err = _main(["sweep", "--config", str(base), *argv], capsys)
        lines = err.strip().splitlines()
        errors = [line for line in lines if line.startswith("cs336: error: ")]
        assert code == 2 and len(errors) == 1 and match in errors[0], (argv, err)
        assert all(line.startswith("cs336: ") for line in lines), err  # progress lines at most; no traceback
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "work").iterdir())


def test_wandb_sweep_config_parses_and_its_args_parse_under_cs336_fit(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.yaml"
    argv = ["sweep", "--config", str(base), "--space", str(tmp_path / "space.yaml"), "--wandb", "--out", str(out)]
    code, _, err = _main([*argv, "--pruner", PRUNER, "--", "--trainer.max_steps=4"], capsys)
    assert code == 0, err
    config = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert config["method"] == "bayes" and config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert config["parameters"]["model.max_lr"] == {"distribution": "log_uniform_values", "min": 1e-5, "max": 0.05}
    assert config["parameters"]["model.d_ff"] == {"values": [32, 64]}
    assert config["early_terminate"] == {"type": "hyperband", "min_iter": 2}
    command = config["command"]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "lightning_cs336", "fit"]
    assert command[5:7] == ["--config", str(base)] and command[-2:] == ["--trainer.max_steps=4", "${args}"]
    # What a W&B agent runs: ${args} as --key=value with Python's str() of each sampled value.
    for values in ({"model.max_lr": 1e-05, "model.d_ff": 32}, {"model.max_lr": 0.05, "model.d_ff": 64}):
        args = [*command[7:-1], *sweep.wandb_args(values)]
        dump = sweep._print_config(base, args)
        assert dump["model"]["max_lr"] == values["model.max_lr"] and dump["model"]["d_ff"] == values["model.d_ff"]
        assert dump["trainer"]["max_steps"] == 4
    code, _, err = _main([*argv[:-2], "--sampler", "grid"], capsys)
    assert code == 2 and "grid sampler needs every value of model.max_lr" in err


# ------------------------------------------------------------------------------------------------ real studies


@pytest.fixture(scope="module")
def study6(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """Six trials on one SQLite study, run by two worker processes started together."""
    root = tmp_path_factory.mktemp("sweep")
    _write_base(root, tiny_data)
    (root / "work").mkdir()
    workers = [_driver(root, 6, log=f"worker{i}.log") for i in range(2)]
    codes = [_wait(w) for w in workers]
    logs = [(root / f"worker{i}.log").read_text(encoding="utf-8") for i in range(2)]
    assert codes == [0, 0], "\n\n".join(logs)
    return root


@pytest.mark.slow
def test_two_workers_six_trials_pruned_mid_epoch(study6: Path) -> None:
    from lightning_cs336.record import read_record
    from lightning_cs336.wandb_reader import latest_run

    root = study6
    parent = root / "runs" / "cs336-debug"
    study = _study(root)
    trials = study.get_trials()
    # No trial lost or run twice: numbers 0..5, each started by exactly one worker, each with its own run.
    assert [t.number for t in trials] == list(range(6))
    started = [[int(line.split()[2]) for line in (root / f"worker{i}.log").read_text().splitlines()
                if line.startswith("cs336: trial ") and "): " in line] for i in range(2)]  # fmt: skip
    assert sorted(started[0] + started[1]) == list(range(6)), started
    runs = {t.number: t.user_attrs["run"] for t in trials}
    assert runs == {n: f"{STUDY}.trial-{n}" for n in range(6)}
    assert {p.name for p in parent.iterdir() if p.is_dir() and p.name != "sweeps"} == set(runs.values())
    states = {t.number: t.state.name for t in trials}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"}, states
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert pruned and complete, states

    for t in complete:  # a report at every validation, keyed by the optimizer step, all inside epoch 0
        assert sorted(t.intermediate_values) == list(range(VAL_EVERY, MAX_STEPS + 1, VAL_EVERY)), t.number
        record = read_record(parent / runs[t.number])
        assert t.value == record.history("val/loss")[-1][1]
        assert record.meta["summary"]["sweep/state"] == "complete"
    for t in pruned:
        step = t.user_attrs[sweep.PRUNED_ATTR]
        assert step < MAX_STEPS and sorted(t.intermediate_values)[-1] == step
        record = read_record(parent / runs[t.number])
        assert record.meta["state"] == "pruned" and "pruned" in record.meta["tags"]
        assert record.meta["summary"]["sweep/state"] == "pruned" and record.meta["summary"]["sweep/pruned_step"] == step
        # The record holds exactly the validations reported (Lightning's loggers label the validation after N
        # optimizer steps N-1; Optuna's step is N, trainer.global_step), all inside epoch 0.
        reported = [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
        assert [v for _, v in record.history("val/loss")] == pytest.approx(reported)
        assert all(row.get("epoch", 0) == 0 for row in record.metrics)
        assert max(row["step"] for row in record.metrics) <= step + 1  # stopped right there
        assert (parent / runs[t.number] / "checkpoints" / "last.ckpt").is_file()  # the checkpoint is kept
        wandb_run = latest_run(parent / runs[t.number] / "wandb", wait_s=5)
        assert "pruned" in wandb_run.tags and wandb_run.summary["sweep/state"] == "pruned"
    for n, run in runs.items():  # each trial is a cs336 fit run grouped under the study, tagged with its number
        meta = read_record(parent / run).meta
        assert meta["group"] == STUDY and {"sweep", f"trial-{n}"} <= set(meta["tags"])
        assert meta["summary"]["sweep/params"] == trials[n].params
        assert meta["config"]["model"]["max_lr"] == trials[n].params["model.max_lr"]
    wandb_run = latest_run(parent / runs[complete[0].number] / "wandb", wait_s=5)
    assert wandb_run.group == STUDY and f"trial-{complete[0].number}" in wandb_run.tags

    # The end: best trial, its config ready for --config, importances, summary files.
    best = min(complete, key=lambda t: t.value)
    data = json.loads((parent / "sweeps" / f"{STUDY}.json").read_text(encoding="utf-8"))
    assert data["best"]["number"] == best.number and data["best"]["params"] == best.params
    assert len(data["trials"]) == 6 and {r["state"] for r in data["trials"]} <= {"complete", "pruned"}
    if len(complete) >= 2:
        assert set(data["importances"]) == set(SPACE) or data["importance_note"]
    best_yaml = parent / "sweeps" / f"{STUDY}.best.yaml"
    dump = sweep._print_config(best_yaml, [])
    assert dump["model"]["max_lr"] == best.params["model.max_lr"] and dump["model"]["d_ff"] == best.params["model.d_ff"]
    assert dump["trainer"]["max_steps"] == MAX_STEPS
    md = (parent / "sweeps" / f"{STUDY}.md").read_text(encoding="utf-8")
    assert f"Best: trial {best.number}" in md and "| trial | state | val/loss |" in md


@pytest.mark.slow
def test_report_of_the_study(study6: Path, tmp_path: Path) -> None:
    """``cs336 runs report`` on the project shows the trials' curves and the parameters against the metric."""
    import re

    from test_report import _chromium, _data

    from lightning_cs336.cli import main

    parent = study6 / "runs" / "cs336-debug"
    out = tmp_path / "study.html"
    runs = [str(p) for p in sorted(parent.glob(f"{STUDY}.trial-*"))]
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "report", *runs, "--out", str(out)])
    assert exit_info.value.code in (0, None)
    text = out.read_text(encoding="utf-8")
    data = _data(text)
    axes = {a["name"]: a for a in data["sweep"]["axes"]}
    assert set(axes) == set(SPACE)
    assert axes["model.max_lr"]["log"] is True and axes["model.d_ff"] == {"name": "model.d_ff", "kind": "number",
                                                                          "log": False}  # fmt: skip
    rows = data["sweep"]["rows"]
    assert (
        len(rows) == 6
        and {r["state"] for r in rows} <= {"complete", "pruned"}
        and "pruned" in {r["state"] for r in rows}
    )
    assert all(isinstance(r["value"], float) for r in rows)
    assert '<section id="sweep">' in text and text.count("trial-") >= 6
    dom = _chromium(tmp_path, "--window-size=1280,2400", "--dump-dom", out.as_uri()).stdout
    assert 'data-rendered="ok"' in dom and "data-js-error" not in dom, dom[-2000:]
    lines = re.findall(r'<path class="pc-line" d="M[\d.]+ [\d.]+(?:L[\d.]+ [\d.]+){2}"[^>]*data-state="(\w+)"', dom)
    assert len(lines) == 6 and lines.count("pruned") == sum(r["state"] == "pruned" for r in rows), lines
    assert dom.count('class="pc-axis"') == 3
    # The driver's own report has the same view.
    own = (parent / "sweeps" / f"{STUDY}.html").read_text(encoding="utf-8")
    assert len(_data(own)["sweep"]["rows"]) == 6


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(study6: Path) -> None:
    """SIGKILL the driver while a trial trains; its trial process goes with it; the same command continues."""
    from lightning_cs336.record import read_record

    root = study6
    parent = root / "runs" / "cs336-debug"
    earlier = [(t.number, t.state.name, t.params) for t in _study(root).get_trials()]
    before = len(earlier)
    target = before + 1
    # Long enough to be killed mid-training (this invocation only: the retry runs with the base config's steps).
    driver = _driver(root, target, "--", "--trainer.max_steps=2000", "--no-wandb", log="killed.log")
    run_json = parent / f"{STUDY}.trial-{before}" / "run.json"
    deadline = time.monotonic() + 300
    while not (run_json.is_file() and read_record(run_json.parent).metrics) and time.monotonic() < deadline:
        assert driver.poll() is None, (root / "killed.log").read_text()
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    assert _wait(driver) == -signal.SIGKILL
    time.sleep(1)
    trial = _study(root).trials[before]
    assert trial.state.name == "RUNNING"  # nobody told the study
    deadline = time.monotonic() + 60
    while read_record(run_json.parent).state == "running" and time.monotonic() < deadline:
        time.sleep(0.2)  # the trial process got SIGTERM when its driver died
    assert read_record(run_json.parent).state in ("preempted", "killed")

    again = _driver(root, target, "--", "--no-wandb", log="resumed.log")
    assert _wait(again) == 0, (root / "resumed.log").read_text()
    log = (root / "resumed.log").read_text()
    assert f"trial {before} was left running by a driver that is gone" in log
    trials = _study(root).get_trials()
    assert len(trials) == target + 1  # the interrupted trial and its retry; the finished ones were not run again
    old, retry = trials[before], trials[before + 1]
    assert old.state.name == "FAIL" and "interrupted" in old.user_attrs["error"]
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.params == old.params
    assert retry.user_attrs["retry_of"] == before
    assert [(t.number, t.state.name, t.params) for t in trials[:before]] == earlier
    data = json.loads((parent / "sweeps" / f"{STUDY}.json").read_text(encoding="utf-8"))
    assert len(data["trials"]) == target + 1 and data["trials"][before]["retried"] is True


@pytest.mark.slow
def test_ddp_trial_is_pruned_once_on_both_ranks(study6: Path) -> None:
    """A trial on two CPU processes (gloo): the pruning decision is rank zero's, broadcast, and both ranks stop at
    the same validation (a rank that trained on would hang the other at its next collective)."""
    from lightning_cs336.record import read_record

    root = study6
    parent = root / "runs" / "cs336-debug"
    study = _study(root)
    before = len(study.get_trials())
    counted = before - sum(1 for t in study.get_trials() if t.user_attrs.get("retry_of") is not None)
    # This worker's pruner stops any trial above a loss no model reaches: a certain prune at the first validation.
    ddp = ["--pruner", "threshold:upper=0.5", "--", "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.accelerator=cpu", "--trainer.max_steps=40", "--no-wandb"]  # fmt: skip
    driver = _driver(root, counted + 1, *ddp, log="ddp.log")
    assert _wait(driver) == 0, (root / "ddp.log").read_text()
    trial = _study(root).trials[before]
    assert trial.state.name == "PRUNED" and trial.user_attrs[sweep.PRUNED_ATTR] == VAL_EVERY
    record = read_record(parent / trial.user_attrs["run"])
    assert (
        str(record.meta["config"]["trainer"]["devices"]) == "2"
        and record.meta["config"]["trainer"]["strategy"] == "ddp"
    )
    assert record.meta["summary"]["sweep/state"] == "pruned"
    assert max(row["step"] for row in record.metrics) <= VAL_EVERY + 1
    log = (parent / "sweeps" / STUDY / "logs" / f"{trial.user_attrs['run']}.log").read_text(encoding="utf-8")
    assert "MEMBER: 2/2" in log and "Traceback" not in log, log[-3000:]


def test_storages_open_and_count_under_a_lock(tmp_path: Path) -> None:
    """SQLite and journal files open (their directories created), take a study, and have a lock file; a URL that
    cannot be opened is one line."""
    import optuna

    for url in (f"sqlite:///{tmp_path}/a/s.db", f"journal://{tmp_path}/b/s.log"):
        store = sweep.open_storage(url, retry=sweep._retry)
        study = optuna.create_study(storage=store, study_name="s")
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, 1.0)
        assert sweep._counts(study) == (1, 0)
        with sweep._study_lock(sweep._lock_path(url)):
            pass
        assert sweep._lock_path(url).is_file()
    assert sweep._lock_path("postgresql://u@h/db") is None
    with pytest.raises(ValueError, match="--storage nosuch://x: cannot open it"):
        sweep.open_storage("nosuch://x")
