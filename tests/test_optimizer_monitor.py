"""Tests for OptimizerMonitor: values logged to a real offline W&B run against a hand computation in plain PyTorch
(SGD: the update is exactly lr x gradient; AdamW: moments and step size from the definitions), per group and layer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TinyLM, finish_and_read, make_loggers, make_trainer, run_script

import lightning_cs336.callbacks.optimizer_monitor as optimizer_module
from lightning_cs336.callbacks import OptimizerMonitor

STEPS, LOGGED = 4, (1, 3)


def _groups(model: TinyLM) -> list[dict]:
    """Two named parameter groups: the embedding and head ("io"), the hidden layers ("body")."""
    io = [p for n, p in model.named_parameters() if not n.startswith("layers")]
    body = [p for n, p in model.named_parameters() if n.startswith("layers")]
    return [{"params": io, "name": "io"}, {"params": body, "name": "body"}]


def _optimizer(kind: str, model: TinyLM) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(_groups(model), lr=0.1, momentum=0.0)
    return torch.optim.AdamW(_groups(model), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


class WithOptimizer(TinyLM):
    kind = "sgd"

    def configure_optimizers(self):
        return _optimizer(self.kind, self)


def _norm(tensors) -> float:
    return float(torch.sqrt(sum(t.double().square().sum() for t in tensors)))


def _reference(kind: str) -> dict[int, dict[str, float]]:
    """Plain PyTorch, the same model, data and optimizer: the expected keys at the logged steps."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = _optimizer(kind, model)
    expected: dict[int, dict[str, float]] = {}
    for step, (x, y) in enumerate(model.train_dataloader()):
        if step == STEPS:
            break
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        before = {p: p.detach().clone() for p in model.parameters()}
        grads = {p: p.grad.detach().clone() for p in model.parameters()}
        opt.step()
        if step not in LOGGED:
            continue
        row: dict[str, float] = {}
        sets = {g["name"]: (g, g["params"]) for g in opt.param_groups}
        layer = {"layers.0": [model.layers[0].weight, model.layers[0].bias]}
        everything = list(model.parameters())
        for label, params in [("", everything)] + [(k, v[1]) for k, v in sets.items()] + list(layer.items()):
            suffix = f"/{label}" if label else ""
            pn = _norm(p.detach() for p in params)
            un = _norm(p.detach() - before[p] for p in params)
            row[f"optim/param_norm{suffix}"], row[f"optim/update_norm{suffix}"] = pn, un
            row[f"optim/update_ratio{suffix}"] = un / pn
            if kind == "sgd" and label:
                # SGD without momentum: the update is exactly -lr * grad.
                assert un == pytest.approx(0.1 * _norm(grads[p] for p in params), rel=1e-5)
            if kind == "adamw" and label:
                group = sets[label][0] if label in sets else opt.param_groups[1]
                b1, b2 = group["betas"]
                row[f"optim/exp_avg_norm{suffix}"] = _norm(opt.state[p]["exp_avg"] for p in params)
                row[f"optim/exp_avg_sq_norm{suffix}"] = _norm(opt.state[p]["exp_avg_sq"] for p in params)
                t = step + 1
                factors = [
                    group["lr"] / (1 - b1**t) / ((opt.state[p]["exp_avg_sq"] / (1 - b2**t)).sqrt() + group["eps"])
                    for p in params
                ]
                row[f"optim/effective_lr{suffix}"] = float(sum(f.double().sum() for f in factors)) / sum(
                    p.numel() for p in params
                )
        expected[step] = row
    return expected


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_values_match_a_hand_computation(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = WithOptimizer()
    model.kind = kind
    trainer = make_trainer(tmp_path, [OptimizerMonitor(per_layer_depth=2)], make_loggers(tmp_path), max_steps=STEPS,
                           limit_val_batches=0)  # fmt: skip
    trainer.fit(model)
    run = finish_and_read(tmp_path)
    expected = _reference(kind)
    for step in LOGGED:
        for key, value in expected[step].items():
            logged = dict(run.history_of(key))
            assert logged[step] == pytest.approx(value, rel=1e-4), (key, step)
    logged_steps = {int(s) for s, _ in run.history_of("optim/update_norm")}
    assert logged_steps == set(LOGGED)
    keys = {k for row in run.history for k in row}
    adam_keys = {k for k in keys if "exp_avg" in k or "effective_lr" in k}
    assert bool(adam_keys) == (kind == "adamw")
    assert "optim/param_norm/layers.1" in keys and "optim/param_norm/head" in keys


def test_nothing_happens_between_logging_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clones: list[int] = []
    original = torch.Tensor.clone
    source = optimizer_module.__file__

    def spy(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename == source:
            clones.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", spy)
    model = TinyLM()
    n_params = len(list(model.parameters()))
    make_trainer(tmp_path, [OptimizerMonitor(log_every_n_steps=3)], max_steps=6).fit(model)
    assert len(clones) == 2 * n_params  # the snapshots of logging steps 2 and 5 only


def test_invalid_arguments_and_docs() -> None:
    with pytest.raises(ValueError, match="per_layer_depth must be a positive integer or None, got 0"):
        OptimizerMonitor(per_layer_depth=0)
    for key in OptimizerMonitor.METRIC_KEYS:
        assert f"``{key}``" in OptimizerMonitor.__doc__


_FSDP2_SCRIPT = """
import torch
import lightning as L
from torch.utils.data import DataLoader, Subset
from callback_helpers import FullyShardLayers, RandomTokens, TinyLM, make_loggers, two_process_strategy
from lightning_cs336.callbacks import OptimizerMonitor
from test_optimizer_monitor import _optimizer


class Sharded(FullyShardLayers, TinyLM):
    def configure_optimizers(self):
        return _optimizer("adamw", self)

    def train_dataloader(self):
        # Rank r takes samples r, r+2, ...: the two rank batches of a step are the single-process batch of 8.
        data = RandomTokens(64, self.hparams.seq_len, self.hparams.vocab_size)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=self.hparams.batch_size)


torch.manual_seed(0)
trainer = L.Trainer(
    default_root_dir={root!r}, accelerator="cpu", devices=2, strategy=two_process_strategy("fsdp2"), max_steps=4,
    log_every_n_steps=2, logger=make_loggers({root!r}, ("wandb",)), enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, use_distributed_sampler=False,
    callbacks=[OptimizerMonitor(per_layer_depth=2)],
)
trainer.fit(Sharded(batch_size=4))
import wandb

if wandb.run is not None:
    wandb.finish()
"""


@pytest.mark.slow
def test_fsdp2_shards_are_reduced_once(tmp_path: Path) -> None:
    """Two processes, FSDP2 (DTensor shards of every layer and of the root): the logged values equal the
    single-process hand computation on the global batch, so each shard was counted exactly once."""
    root = tmp_path / "run"
    run_script(tmp_path, _FSDP2_SCRIPT.format(root=str(root)))
    from lightning_cs336.wandb_reader import latest_run

    run = latest_run(root, wait_s=10)
    expected = _reference("adamw")
    for step in LOGGED:
        for key, value in expected[step].items():
            assert dict(run.history_of(key))[step] == pytest.approx(value, rel=1e-4), (key, step)
