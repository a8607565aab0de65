"""A tiny, self-contained language model and data for testing the callbacks.

It deliberately does NOT import lightning_cs336's model, module or data: the callbacks must work in any Lightning
project that offers the documented duck-typed hooks (``flops_per_token``, ``generate``, ``tokenizer``).
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset


class CharTokenizer:
    """Printable-ASCII tokenizer: id = ord(c) - 32 for c in ' '..'~', plus an end-of-text id."""

    vocab_size = 96
    eot_id = 95

    def encode(self, text: str) -> list[int]:
        return [min(max(ord(c) - 32, 0), 94) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids if 0 <= i < 95)


class RandomTokens(Dataset):
    """Deterministic random token windows: (x, y) with y = x shifted by one."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab_size: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (n, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


class TinyLM(L.LightningModule):
    """Embedding -> 2 Linear layers -> logits. Offers every duck-typed hook the callbacks look for."""

    def __init__(
        self,
        vocab_size: int = 96,
        d_model: int = 32,
        seq_len: int = 16,
        batch_size: int = 8,
        lr: float = 1e-2,
        with_hooks: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(2)])
        self.head = nn.Linear(d_model, vocab_size)
        if with_hooks:
            self.tokenizer = CharTokenizer()
            # Training FLOPs per token: 6 x matmul parameters.
            self.flops_per_token = 6.0 * sum(
                p.numel() for n, p in self.named_parameters() if "weight" in n and "embed" not in n
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, C)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h)  # (B, T, V)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("val/loss", loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            RandomTokens(64, self.hparams.seq_len, self.hparams.vocab_size), batch_size=self.hparams.batch_size
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            RandomTokens(16, self.hparams.seq_len, self.hparams.vocab_size, seed=1), batch_size=self.hparams.batch_size
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Sample new tokens for each prompt (no KV cache: it is a test model). Returns the new ids per row."""
        rows = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else [list(r) for r in prompt_ids]
        out: list[list[int]] = []
        for row in rows:
            ids = torch.tensor([row], device=self.device)
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = self(ids)[0, -1]
                if temperature <= 0:
                    nxt = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / temperature, -1).cpu()
                    nxt = int(torch.multinomial(probs, 1, generator=generator))
                if eos_id is not None and nxt == eos_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=self.device)], dim=1)
            out.append(new)
        return out


def make_loggers(save_dir: Path, kinds: tuple[str, ...] = ("wandb",), name: str = "test") -> list[Logger]:
    """Real loggers writing under ``save_dir``: ``wandb`` (offline), ``csv``, ``tensorboard``."""
    loggers: list[Logger] = []
    for kind in kinds:
        if kind == "wandb":
            loggers.append(WandbLogger(save_dir=str(save_dir), project="cs336-tests", name=name, offline=True))
        elif kind == "csv":
            loggers.append(CSVLogger(save_dir=str(save_dir), name=name))
        elif kind == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(save_dir), name=name))
        else:
            raise ValueError(kind)
    return loggers


def make_trainer(
    tmp_path: Path,
    callbacks: list,
    loggers: list[Logger] | bool = False,
    max_steps: int = 6,
    log_every_n_steps: int = 2,
    **kwargs: Any,
) -> L.Trainer:
    """A small CPU Trainer with the settings every callback test wants."""
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 2)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("devices", 1)
    return L.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def csv_rows(source: Any) -> list[dict[str, str]]:
    """The rows of a CSVLogger's ``metrics.csv``: ``source`` is its log directory, the logger, or a Trainer."""
    if isinstance(source, L.Trainer):
        source = next(lg for lg in source.loggers if isinstance(lg, CSVLogger))
    log_dir = Path(source.log_dir) if hasattr(source, "log_dir") else Path(source)
    with open(log_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def docstring_yaml(doc: str) -> dict:
    """The LightningCLI YAML block of a docstring (the indented text after ``YAML config::``), parsed."""
    block = doc.split("YAML config::", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith(" " * 8):
            break
        lines.append(line)
    return yaml.safe_load(textwrap.dedent("\n".join(lines)))


def instantiate_docstring_callbacks(doc: str) -> list:
    """Build the callbacks of a docstring's YAML example the way LightningCLI does (jsonargparse)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    config = parser.parse_object({"callbacks": docstring_yaml(doc)["trainer"]["callbacks"]})
    return parser.instantiate(config).callbacks


class FullyShardLayers:
    """Mixin for a TinyLM: FSDP2 ``fully_shard`` of each of ``self.layers``, then of the root module.

    Lightning's FSDPStrategy needs CUDA; ``ModelParallelStrategy`` with ``fully_shard`` runs on CPU with gloo.
    """

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def two_process_strategy(kind: str) -> Any:
    """The Trainer strategy of a two-process CPU test: ``"ddp"``, or ``"fsdp2"`` (ModelParallelStrategy, 2-way DP)."""
    if kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return kind


def finish_and_read(root: Path, wait_s: float = 60.0) -> Any:
    """Finish the active W&B run and read the newest offline run under ``root`` back from disk.

    WandbLogger never finishes its run itself, and nothing reaches the ``.wandb`` file until it does; and in wandb
    0.31 offline ``wandb.finish()`` returns before wandb-core has written the history and exit record (seen on a
    loaded machine: a 7-byte file right after ``finish``), so wait up to ``wait_s`` for the run's exit record.
    """
    import wandb

    from lightning_cs336.wandb_reader import latest_run

    if wandb.run is not None:
        wandb.finish()
    deadline = time.monotonic() + wait_s
    while True:
        run = latest_run(root, wait_s=min(wait_s, 10.0))
        if run.finished or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(tmp_path: Path, source: str, timeout: float = 240, args: tuple[str, ...] = ()) -> Any:
    """Write ``source`` (dedented) to ``tmp_path/script.py`` and run it in a fresh Python process: ``tests/`` on its
    path, a free ``MASTER_PORT`` on 127.0.0.1 for torch.distributed, no inherited rank variables (so Lightning's
    ``ddp`` launcher starts the other ranks itself), one OpenMP thread per process. Asserts a zero exit."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
