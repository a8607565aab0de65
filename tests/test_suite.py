"""The callback suite as a whole: every exported callback trains and round-trips its state, the quickstart config
logs every family of keys to a real offline W&B run, and a resumed run continues every callback's state."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch
import yaml
from callback_helpers import TinyLM, finish_and_read, make_loggers, make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_cs336.callbacks as suite
from lightning_cs336.cli import main
from lightning_cs336.wandb_reader import load_runs

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = [
    obj
    for name in suite.__all__
    if inspect.isclass(obj := getattr(suite, name)) and issubclass(obj, Callback) and obj is not suite.TelemetryCallback
]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_suite_exports_all_ten() -> None:
    names = {c.__name__ for c in CALLBACKS}
    assert names == {
        "GradientNormMonitor",
        "MemoryMonitor",
        "SpeedMonitor",
        "TextSampleLogger",
        "CheckpointArtifactLogger",
        "RunInfoLogger",
        "HistogramLogger",
        "StabilityMonitor",
        "OptimizerMonitor",
        "StepTimeMonitor",
    }


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_callback_constructs_trains_and_round_trips_state(cls, tmp_path: Path) -> None:
    callback = cls()
    for key in getattr(cls, "METRIC_KEYS", ()):
        assert key in cls.__doc__, f"{key} missing from {cls.__name__}'s docstring table"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(
        tmp_path, [callback, ckpt], make_loggers(tmp_path, ("csv",)), max_steps=4, enable_checkpointing=True
    )
    trainer.fit(TinyLM())
    state = callback.state_dict()
    fresh = cls()
    fresh.load_state_dict(state)
    assert _same(fresh.state_dict(), state)
    fresh.load_state_dict({})  # an older checkpoint without this callback's state must load too


def test_telemetry_fragment_matches_quickstart() -> None:
    fragment = yaml.safe_load((ROOT / "configs/callbacks/telemetry.yaml").read_text())["trainer"]["callbacks+"]
    quickstart = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())["trainer"]["callbacks"]
    assert [c for c in quickstart if c in fragment] == fragment, "quickstart.yaml must carry the whole suite"


def test_telemetry_fragment_appends_to_any_config(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/debug.yaml"),
                "--config",
                str(ROOT / "configs/callbacks/telemetry.yaml"),
                "--print_config",
            ]
        )
    assert exit_.value.code in (0, None)
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    paths = [c["class_path"] for c in callbacks]
    assert paths[0] == "lightning.pytorch.callbacks.ModelCheckpoint"  # the config's own callback is kept
    assert {f"lightning_cs336.callbacks.{c.__name__}" for c in CALLBACKS} <= set(paths)


@pytest.mark.slow
def test_quickstart_config_logs_every_family(tmp_path: Path, tiny_data: Path, monkeypatch) -> None:
    """`cs336 fit --config configs/quickstart.yaml`, shrunk to a tiny model and corpus, holds every family of keys."""
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--data.data_dir",
        str(tiny_data),
        "--model.context_length",
        "32",
        "--model.d_model",
        "32",
        "--model.num_layers",
        "2",
        "--model.num_heads",
        "2",
        "--model.d_ff",
        "64",
        "--trainer.max_steps",
        "250",
        "--trainer.val_check_interval",
        "125",
        "--trainer.limit_val_batches",
        "2",
        "--data.batch_size",
        "4",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    try:
        main(args)
    except SystemExit as exit_:
        assert not exit_.code

    run = finish_and_read(tmp_path / "runs/cs336-quickstart/quickstart")
    assert run.finished
    keys = run.keys()
    for family in ("grad/", "memory/", "time/", "throughput/", "samples/", "weights/", "checkpoint/"):
        assert any(k.startswith(family) for k in keys), f"no {family} keys in {sorted(keys)}"
    assert {
        "train/loss",
        "val/loss",
        "val/ppl",
        "lr-AdamW/decay",
        "grad/norm_total",
        "grad/clip_fraction",
        "memory/rss_gib",
        "time/step_ms",
        "throughput/tokens_per_sec",
        "samples/generation_sec",
    } <= keys
    assert any(k.startswith("grad/norm/model.layers.") for k in keys)
    table = run.tables["samples/generations"]
    assert table["columns"][:3] == ["step", "prompt", "generation"]
    assert {row[1] for row in table["data"]} == {"def ", "import os\n", "class "}
    assert {"hardware", "software", "environment", "model"} <= set(run.config["run_info"])
    assert run.config["d_model"] == 32 and run.config["data_dir"] == str(tiny_data)
    assert {"summary/tokens_seen", "summary/best_val_loss"} <= set(run.summary)
    assert run.summary["summary/tokens_seen"] == 250 * 4 * 32
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert models and any("best" in a["aliases"] for a in models)
    assert (tmp_path / "runs/cs336-quickstart/quickstart/checkpoints/last.ckpt").is_file()


def test_resume_continues_every_callbacks_state(tmp_path: Path, wandb_env: Path) -> None:
    """Stop after 6 steps, resume from the checkpoint to 12: no window, table, total or best tracking resets."""

    def callbacks() -> list[Callback]:
        return [
            suite.GradientNormMonitor(),
            suite.SpeedMonitor(),
            suite.RunInfoLogger(),
            suite.TextSampleLogger(every_n_steps=3, prompts=["ab"], max_new_tokens=4, sample_at_end=False),
            suite.HistogramLogger(every_n_steps=3),
            suite.CheckpointArtifactLogger(),
            suite.StabilityMonitor(),
            suite.OptimizerMonitor(),
            suite.StepTimeMonitor(),
            ModelCheckpoint(
                dirpath=tmp_path / "ckpt",
                monitor="val/loss",
                every_n_train_steps=3,
                save_top_k=-1,
                filename="step{step}",
                auto_insert_metric_name=False,
            ),
        ]

    kw = dict(log_every_n_steps=3, val_check_interval=3, enable_checkpointing=True, gradient_clip_val=0.05)
    first = make_trainer(tmp_path, callbacks(), make_loggers(tmp_path, ("wandb",), name="a"), max_steps=6, **kw)
    first.fit(TinyLM())
    import wandb

    wandb.finish()
    ckpt = tmp_path / "ckpt" / "step6.ckpt"
    assert ckpt.is_file()
    second = make_trainer(tmp_path, callbacks(), make_loggers(tmp_path, ("wandb",), name="b"), max_steps=12, **kw)
    second.fit(TinyLM(), ckpt_path=str(ckpt))
    wandb.finish()
    runs = load_runs(tmp_path, wait_s=30)
    assert len(runs) == 2
    a, b = sorted(runs, key=lambda r: r.name)
    # Text samples: the resumed run's table still holds the first run's rows.
    assert [row[0] for row in b.tables["samples/generations"]["data"]] == [3, 6, 9, 12]
    # Speed: cumulative tokens continue rather than restart.
    tokens_a = [v for _, v in a.history_of("throughput/tokens_total")]
    tokens_b = [v for _, v in b.history_of("throughput/tokens_total")]
    assert tokens_b[0] == tokens_a[-1] + 3 * 8 * 16
    # The health callbacks log in both segments.
    assert {"stability/spikes_total", "optim/update_ratio", "time/data_wait_pct"} <= a.keys() & b.keys()
    # Gradient clipping totals continue (every step clips at this tiny threshold).
    assert [v for _, v in b.history_of("grad/clipped_total")][-1] == 12
    # Run info: tokens seen over both segments.
    assert b.summary["summary/tokens_seen"] == 12 * 8 * 16
    best_a = a.summary["summary/best_val_loss"]
    assert b.summary["summary/best_val_loss"] <= best_a
    # Checkpoint artifacts: the resumed run does not log step 3 and 6 again, and "best" follows ModelCheckpoint.
    logged_b = [x["metadata"] for x in b.artifacts if x["type"] == "model"]
    assert logged_b and all(m["step"] > 6 for m in logged_b)
    assert all(m["filename"] == f"step{m['step']}.ckpt" for m in logged_b)
    best_path = Path(second.checkpoint_callback.best_model_path).name
    best_aliases = [x["metadata"]["filename"] for x in b.artifacts if x["type"] == "model" and "best" in x["aliases"]]
    if best_path in ("step3.ckpt", "step6.ckpt"):
        assert not best_aliases  # the best is still a checkpoint from before the resume
    else:
        assert best_aliases[-1] == best_path
    assert os.path.exists(tmp_path / "ckpt" / best_path)
