"""Tests for RunInfoLogger: run facts and config at the start, run summary at the end, resume continuity."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from callback_helpers import RandomTokens, TinyLM, finish_and_read, make_loggers, make_trainer
from callback_helpers import csv_rows as _csv_rows
from callback_helpers import instantiate_docstring_callbacks as _instantiate_callbacks
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_cs336.callbacks._base import first_tensor as _first_tensor
from lightning_cs336.callbacks._base import git_state
from lightning_cs336.callbacks.run_info import (
    RunInfoLogger,
    count_parameters,
)

# TinyLM(vocab_size=96, d_model=32), counted by hand:
#   embed  nn.Embedding(96, 32)           96 * 32       = 3072   (embedding)
#   layers 2 x nn.Linear(32, 32)          2 * (32*32+32) = 2112
#   head   nn.Linear(32, 96)              32 * 96 + 96   = 3168
PARAMS_TOTAL = 3072 + 2112 + 3168  # 8352
PARAMS_NON_EMBEDDING = 2112 + 3168  # 5280
BATCH, SEQ = 8, 16  # TinyLM defaults: each training batch has 8 x 16 tokens


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _no_git_above(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path, and make sure git does not find a repository in a parent directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


# ---------------------------------------------------------------------------------------------------------------
# Documentation and construction


def test_every_key_is_documented() -> None:
    doc = RunInfoLogger.__doc__
    for key in RunInfoLogger.METRIC_KEYS + RunInfoLogger.CONFIG_KEYS:
        assert f"``{key}``" in doc, key
    # The tables hold nothing else: every ``family.key`` / ``summary/key`` row is in the tuples.
    documented = set(
        re.findall(r"^\s+``((?:summary/|hardware\.|software\.|environment\.|trainer\.|model\.)\S+)``", doc, re.M)
    )
    assert documented == set(RunInfoLogger.METRIC_KEYS) | set(RunInfoLogger.CONFIG_KEYS)
    assert "Example::" in doc and "class_path: lightning_cs336.callbacks.run_info.RunInfoLogger" in doc


def test_yaml_example_builds_through_jsonargparse() -> None:
    (info,) = _instantiate_callbacks(RunInfoLogger.__doc__)
    assert isinstance(info, RunInfoLogger)
    assert info.train_loss_key == "train/loss" and info.val_loss_key == "val/loss"
    assert info.config == {"data": {"tokenizer": "gpt2"}}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": [1, 2]}, r"config must be a dict or None, got \[1, 2\]"),
        ({"train_loss_key": ""}, "train_loss_key must be a non-empty string, got ''"),
        ({"val_loss_key": 3}, "val_loss_key must be a non-empty string, got 3"),
        ({"git_timeout": 0}, "git_timeout must be a positive number of seconds, got 0"),
        ({"git_timeout": True}, "git_timeout must be a positive number of seconds, got True"),
        ({"prefix": None}, "prefix must be a string, got None"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunInfoLogger(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def test_count_parameters_embedding_tied_and_frozen() -> None:
    model = TinyLM()
    assert count_parameters(model) == {
        "total": PARAMS_TOTAL,
        "trainable": PARAMS_TOTAL,
        "non_embedding": PARAMS_NON_EMBEDDING,
    }

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(50, 8)  # 400
            self.pos = nn.Embedding(10, 8)  # 80
            self.block = nn.Linear(8, 8)  # 72, frozen below
            self.norm = nn.LayerNorm(8)  # 16
            self.head = nn.Linear(8, 50, bias=False)
            self.head.weight = self.tok.weight  # tied: counted once, as embedding

    tied = Tied()
    tied.block.requires_grad_(False)
    assert count_parameters(tied) == {"total": 400 + 80 + 72 + 16, "trainable": 400 + 80 + 16, "non_embedding": 88}


def test_first_tensor_of_batch() -> None:
    x, y = torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long)
    assert _first_tensor((x, y)) is x
    assert _first_tensor({"input_ids": x, "labels": y}) is x
    assert _first_tensor([{"meta": "a"}, (x, y)]) is x
    assert _first_tensor({"text": ["a", "b"]}) is None


def test_git_state_outside_and_inside_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_git_above(tmp_path, monkeypatch)
    assert git_state(tmp_path) == (None, None)
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "a.txt").write_text("one\n")
    subprocess.run([*git, "add", "a.txt"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert git_state(repo) == (head, False)
    (repo / "untracked.log").write_text("ignored for dirtiness\n")
    assert git_state(repo) == (head, False)
    (repo / "a.txt").write_text("two\n")
    assert git_state(repo) == (head, True)


# ---------------------------------------------------------------------------------------------------------------
# Real runs


def test_config_and_summary_with_all_loggers(tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_git_above(tmp_path, monkeypatch)
    loggers = make_loggers(tmp_path, ("wandb", "csv", "tensorboard"))
    info = RunInfoLogger(config={"optimizer": {"name": "sgd", "betas": [0.9, 0.95]}, "lr": 0.01})
    trainer = make_trainer(tmp_path, [info], loggers, max_steps=6, log_every_n_steps=2, val_check_interval=3)
    trainer.fit(TinyLM())
    import wandb

    # --- W&B config: module hparams and the config argument at the top, facts nested under run_info.
    run = finish_and_read(tmp_path)
    config = run.config
    assert config["d_model"] == 32 and config["seq_len"] == SEQ and config["batch_size"] == BATCH
    assert config["optimizer"] == {"name": "sgd", "betas": [0.9, 0.95]}
    facts = _flatten(config["run_info"])
    assert set(facts) == set(RunInfoLogger.CONFIG_KEYS)  # exactly the documented keys
    assert facts["model.class_name"] == "TinyLM"
    assert facts["model.params_total"] == PARAMS_TOTAL
    assert facts["model.params_trainable"] == PARAMS_TOTAL
    assert facts["model.params_non_embedding"] == PARAMS_NON_EMBEDDING
    assert facts["software.torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert facts["software.lightning"] == L.__version__
    assert facts["software.wandb"] == wandb.__version__
    assert facts["software.python"] == ".".join(map(str, sys.version_info[:3]))
    assert facts["hardware.cpu_count_logical"] >= 1 and facts["hardware.ram_total_gib"] > 0
    assert facts["hardware.gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert facts["environment.cwd"] == str(tmp_path)
    assert facts["environment.git_commit"] is None and facts["environment.git_dirty"] is None
    assert facts["trainer.world_size"] == 1 and facts["trainer.strategy"] == "SingleDeviceStrategy"
    assert info.run_info == config["run_info"]

    # --- W&B summary: every documented key, plausible values.
    expected_tokens = 6 * BATCH * SEQ
    summary = {k: v for k, v in run.summary.items() if k.startswith("summary/")}
    assert set(summary) == set(RunInfoLogger.METRIC_KEYS)
    assert summary["summary/tokens_seen"] == expected_tokens
    assert summary["summary/global_step"] == 6
    vals = [v for _, v in run.history_of("val/loss")]
    assert len(vals) == 2
    assert summary["summary/best_val_loss"] == pytest.approx(min(vals))
    assert summary["summary/final_val_loss"] == pytest.approx(vals[-1])
    assert summary["summary/best_val_loss"] <= summary["summary/final_val_loss"]
    assert summary["summary/final_train_loss"] == pytest.approx(run.history_of("train/loss")[-1][1])
    assert 0 < summary["summary/total_time_sec"] < 120
    assert not any(k.startswith("summary/") for k in run.keys())  # summary only, not history rows

    # --- CSV: hparams.yaml holds the same nested config; the summary is the last row, plus run_summary.json.
    csv_logger = loggers[1]
    hparams = yaml.safe_load((Path(csv_logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["optimizer"]["betas"] == [0.9, 0.95]
    assert hparams["run_info"]["model"]["params_non_embedding"] == PARAMS_NON_EMBEDDING
    assert set(_flatten(hparams["run_info"])) == set(RunInfoLogger.CONFIG_KEYS)
    last = _csv_rows(csv_logger)[-1]
    assert int(last["step"]) == 6
    assert {k for k, v in last.items() if v and k.startswith("summary/")} == set(RunInfoLogger.METRIC_KEYS)
    assert float(last["summary/tokens_seen"]) == expected_tokens
    record = json.loads((Path(csv_logger.log_dir) / "run_summary.json").read_text())
    assert record["summary"]["summary/tokens_seen"] == expected_tokens
    assert record["run_info"]["model"]["params_total"] == PARAMS_TOTAL

    # --- TensorBoard: the last hparams record is ours (a superset of the Trainer's), summary scalars at step 6.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(loggers[2].log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    tb_hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert tb_hparams["run_info/model/params_total"].number_value == PARAMS_TOTAL
    assert tb_hparams["d_model"].number_value == 32
    assert tb_hparams["optimizer/name"].string_value == "sgd"
    for key in RunInfoLogger.METRIC_KEYS:
        assert [e.step for e in acc.Scalars(key)] == [6]
    assert acc.Scalars("summary/tokens_seen")[0].value == expected_tokens
    tb_yaml = yaml.safe_load((Path(loggers[2].log_dir) / "hparams.yaml").read_text())
    assert tb_yaml["run_info"]["model"]["params_total"] == PARAMS_TOTAL


class _Data(L.LightningDataModule):
    def __init__(self, data_path: str = "tokens.bin", seq_len: int = SEQ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(64, self.hparams.seq_len), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(16, self.hparams.seq_len, seed=1), batch_size=BATCH)


def test_prefix_datamodule_hparams_and_git_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    _no_git_above(tmp_path, monkeypatch)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "train.py").write_text("print('hi')\n")
    subprocess.run([*git, "add", "train.py"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    loggers = make_loggers(tmp_path / "logs", ("csv",))
    info = RunInfoLogger(prefix="ft/", config={"data": {"tokenizer": "gpt2"}})
    trainer = make_trainer(tmp_path, [info], loggers, max_steps=4, log_every_n_steps=1, val_check_interval=2)
    trainer.fit(TinyLM(), datamodule=_Data())

    hparams = yaml.safe_load((Path(loggers[0].log_dir) / "hparams.yaml").read_text())
    assert "run_info" not in hparams
    facts = hparams["ft/run_info"]
    assert facts["environment"]["git_commit"] == head
    assert facts["environment"]["git_dirty"] is False  # the logs are untracked
    assert hparams["data_path"] == "tokens.bin" and hparams["d_model"] == 32  # datamodule + module hparams
    assert hparams["data"] == {"tokenizer": "gpt2"}
    last = _csv_rows(loggers[0])[-1]
    assert {k for k, v in last.items() if v and "summary/" in k} == {"ft/" + k for k in RunInfoLogger.METRIC_KEYS}
    assert float(last["ft/summary/tokens_seen"]) == 4 * BATCH * SEQ


def test_no_logger_warns_and_still_summarises(tmp_path: Path) -> None:
    info = RunInfoLogger(train_loss_key="nope/loss")
    trainer = make_trainer(tmp_path, [info], False, max_steps=3, log_every_n_steps=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="RunInfoLogger: the Trainer has no logger") as record:
        trainer.fit(TinyLM())
    messages = [str(w.message) for w in record]
    assert sum("no logger" in m for m in messages) == 1
    assert any("'nope/loss' was never logged" in m for m in messages)
    assert info.run_info == {}  # nothing gathered for nobody
    assert info.summary["summary/tokens_seen"] == 3 * BATCH * SEQ
    assert "summary/final_train_loss" not in info.summary and "summary/best_val_loss" not in info.summary


def test_state_dict_round_trip() -> None:
    info = RunInfoLogger()
    info.load_state_dict(
        {"tokens_seen": 4096, "total_time_sec": 12.5, "best_val_loss": 3.25, "best_val_step": 99, "final_val_loss": 3.5}
    )
    state = info.state_dict()
    assert state == {
        "tokens_seen": 4096,
        "total_time_sec": 12.5,
        "best_val_loss": 3.25,
        "best_val_step": 99,
        "final_val_loss": 3.5,
    }
    fresh = RunInfoLogger()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    # An empty or older checkpoint entry starts from zero instead of crashing.
    fresh.load_state_dict({})
    assert fresh.state_dict() == {
        "tokens_seen": 0,
        "total_time_sec": 0.0,
        "best_val_loss": None,
        "best_val_step": None,
        "final_val_loss": None,
    }
    fresh.load_state_dict({"tokens_seen": 7})
    assert fresh.tokens_seen() == 7


def test_resume_continues_tokens_time_and_best_val(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"

    def fit(max_steps: int, ckpt_path: str | None) -> tuple[RunInfoLogger, list[dict[str, str]]]:
        info = RunInfoLogger()
        loggers = make_loggers(tmp_path / f"logs{max_steps}", ("csv",))
        trainer = make_trainer(
            tmp_path,
            [info, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)],
            loggers,
            max_steps=max_steps,
            log_every_n_steps=1,
            val_check_interval=2,
            enable_checkpointing=True,
        )
        trainer.fit(TinyLM(), ckpt_path=ckpt_path)
        return info, _csv_rows(loggers[0])

    first, rows1 = fit(4, None)
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)["callbacks"][RunInfoLogger().state_key]
    assert saved["tokens_seen"] == 4 * BATCH * SEQ  # the checkpoint after the step-4 validation
    assert saved["best_val_loss"] == first.summary["summary/best_val_loss"]

    second, rows2 = fit(8, str(ckpt_dir / "last.ckpt"))
    summary = second.summary
    assert summary["summary/tokens_seen"] == 8 * BATCH * SEQ  # 4 steps before the resume + 4 after, exactly
    assert summary["summary/global_step"] == 8
    all_vals = [float(r["val/loss"]) for r in rows1 + rows2 if r.get("val/loss")]
    assert len(all_vals) == 4
    assert summary["summary/best_val_loss"] == pytest.approx(min(all_vals))
    assert summary["summary/final_val_loss"] == pytest.approx(all_vals[-1])
    assert summary["summary/best_val_loss"] <= first.summary["summary/best_val_loss"]
    # Time adds up over the segments: at least what the checkpoint carried, plus this segment's.
    assert summary["summary/total_time_sec"] > saved["total_time_sec"] > 0


@pytest.mark.slow
def test_tokens_summed_over_ddp_ranks(tmp_path: Path) -> None:
    loggers = make_loggers(tmp_path, ("csv",))
    trainer = make_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        log_every_n_steps=1,
        loggers=loggers,
        callbacks=[RunInfoLogger()],
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=3,
    )
    trainer.fit(TinyLM())
    (summary_file,) = tmp_path.rglob("run_summary.json")  # written by the spawned rank 0
    record = json.loads(summary_file.read_text())
    assert record["summary"]["summary/tokens_seen"] == 2 * 3 * BATCH * SEQ  # both ranks' batches
    assert record["run_info"]["trainer"]["world_size"] == 2
    assert record["run_info"]["model"]["params_total"] == PARAMS_TOTAL
