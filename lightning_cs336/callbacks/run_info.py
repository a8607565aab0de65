r"""
Run Info Logger
===============

Records what a run ran on and with (hardware, software, environment, model size, the resolved config) once at the
start of fit, and a run summary (final and best losses, time, tokens seen) at the end.

Size note (~520 lines): over half is the class docstring's key table (every ``run_info`` key documented and
tested against what is logged) and the hardware/software probes it documents.

"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import psutil
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_cs336.callbacks._base import TelemetryCallback, count_batch, distributed_ready, git_state
from lightning_cs336.callbacks._sinks import log_summary
from lightning_cs336.callbacks.memory import total_memory_bytes

__all__ = ["RunInfoLogger", "count_parameters", "hardware_info", "software_info"]

_GIB = float(1 << 30)


# --------------------------------------------------------------------------------------------------------------
# Facts. Each helper returns None for what it cannot find out instead of raising: a missing fact must never stop a
# training run.


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Model", "cpu model"):
                    return value.strip() or None
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _physical_cores() -> int | None:
    return psutil.cpu_count(logical=False) or None  # None where psutil cannot tell


def hardware_info() -> dict[str, Any]:
    """CPU model, core counts, RAM, and the CUDA GPUs visible to this process (``gpu_*`` empty without CUDA)."""
    ram = total_memory_bytes()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": _physical_cores(),
        "ram_total_gib": round(ram / _GIB, 3) if ram is not None else None,
        "gpu_count": 0,
        "gpu_names": [],
        "gpu_memory_gib": [],
    }
    try:
        if torch.cuda.is_available():
            props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
            info["gpu_count"] = len(props)
            info["gpu_names"] = [p.name for p in props]
            info["gpu_memory_gib"] = [round(p.total_memory / _GIB, 3) for p in props]
    except Exception:  # a broken driver must not stop the run
        pass
    return info


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def software_info() -> dict[str, Any]:
    """Versions of Python and the stack (``None`` for what is not installed or not built in)."""
    cudnn = nccl = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        pass
    try:
        if torch.cuda.is_available():
            nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
    except Exception:  # a build without NCCL
        pass
    return {
        "python": platform.python_version(),
        "torch": _version("torch") or torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": nccl,
        "lightning": _version("lightning", "pytorch-lightning"),
        "wandb": _version("wandb"),
        "numpy": _version("numpy"),
        "lightning_cs336": _version("lightning-cs336"),
    }


def environment_info(git_timeout: float = 5.0) -> dict[str, Any]:
    """Host, platform, working directory, git commit and dirty flag, and the command line."""
    cwd = os.getcwd()
    commit, dirty = git_state(cwd, git_timeout)
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cwd": cwd,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": shlex.join(sys.argv),
    }


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Parameter counts of ``module``: ``total``, ``trainable`` (``requires_grad``) and ``non_embedding``.

    ``non_embedding`` leaves out the parameters of every ``nn.Embedding``/``nn.EmbeddingBag`` and of any other
    module whose class name ends in ``Embedding`` (hand-written embedding tables, as in CS336; token and learned
    position tables), the convention of the scaling-law literature. A head tied to the token embedding shares its
    tensor, so it is excluded too; each shared tensor counts once everywhere. A DTensor (FSDP2, tensor parallel)
    counts its global size; an uninitialized lazy parameter counts 0.
    """
    embedding_ids = {
        id(p)
        for m in module.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or type(m).__name__.endswith("Embedding")
        for p in m.parameters()
    }
    total = trainable = non_embedding = 0
    for p in module.parameters():  # parameters() yields each shared tensor once
        if isinstance(p, nn.parameter.UninitializedParameter):
            continue  # a lazy module before its first forward has no size yet
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        non_embedding += 0 if id(p) in embedding_ids else n
    return {"total": total, "trainable": trainable, "non_embedding": non_embedding}


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _is_fsdp1(trainer: Trainer) -> bool:
    """Whether the model is wrapped by FSDP1, whose parameters each rank holds only a shard of."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    model = getattr(trainer.strategy, "model", None)
    return model is not None and any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


class RunInfoLogger(TelemetryCallback):
    r"""Record the run's hardware, software, environment, model size and resolved config when fit starts, and a run
    summary when training ends.

    **At the start of fit** (``on_fit_start``, rank zero) it calls ``log_hyperparams`` of every logger with one
    nested dict: the LightningModule's ``hparams``, the datamodule's ``hparams`` and ``config`` merged (in that
    order, recursively), plus the facts below under a ``run_info`` key (``<prefix>run_info``), so they never clobber
    user hyperparameters. W&B stores it nested in the run config, CSV in ``hparams.yaml``, TensorBoard in its
    hparams plugin (flattened with ``/``) and ``hparams.yaml``. The Trainer logs the module's hparams on its own
    right after ``on_fit_start``; loggers merge the two (TensorBoard keeps the first, this superset).

    **During training** it counts tokens as the ``numel`` of the first tensor of each training batch (``x`` of
    ``(x, y)``, the first value of a dict): a shape property, so it never synchronises the device. It reads the
    validation loss after each validation (one host read per validation, not per step) to track the best one.

    **At the end of training** (``on_train_end``) it writes the summary: into the W&B run summary
    (``experiment.summary``) for a ``WandbLogger``, and for every other logger as metrics at the final step plus a
    ``run_summary.json`` (summary and run info) in its log directory. Tokens, time and best validation loss survive
    a resume through the checkpoint (``state_dict``), so the summary covers the whole run.

    Under DDP/FSDP each rank counts its own tokens; the end-of-training summary sums them with one ``all_reduce``
    run on every rank (a checkpoint's count assumes equally sized batches on every rank). Under FSDP1 the parameter
    counts are summed over ranks the same way, once, at the start of fit (parameters need ``use_orig_params=True``
    for the embedding split to be exact).

    Duck typing: nothing is required from the LightningModule beyond being an ``nn.Module``; the losses are read
    from ``trainer.callback_metrics`` under ``train_loss_key``/``val_loss_key`` (as logged with ``self.log``).

    Args:
        config: Extra (nested) configuration to record with the hyperparameters, e.g. the resolved LightningCLI
            config. Merged over the module's and datamodule's ``hparams``.
        train_loss_key: The logged key of the training loss (``"train/loss"``); also tried with ``_step``/``_epoch``.
        val_loss_key: The logged key of the validation loss (``"val/loss"``); also tried with ``_epoch``.
        prefix: Prepended to the summary keys and to the ``run_info`` config key.
        git_timeout: Seconds to wait for each ``git`` call before recording the commit as unknown.

    Raises:
        ValueError: If ``config`` is not a dict or None, a loss key is not a non-empty string, ``prefix`` is not a
            string, or ``git_timeout`` is not a positive number.

    Config keys (under ``<prefix>run_info``, logged once at the start of fit):

    ========================================  =======  =================================================================
    key                                       unit     meaning
    ========================================  =======  =================================================================
    ``hardware.cpu_model``                    text     CPU model (``/proc/cpuinfo``, else ``platform.processor()``)
    ``hardware.cpu_count_logical``            count    logical CPUs
    ``hardware.cpu_count_physical``           count    physical cores
    ``hardware.ram_total_gib``                GiB      physical memory of the machine
    ``hardware.gpu_count``                    count    CUDA devices visible (0 without CUDA)
    ``hardware.gpu_names``                    list     their names
    ``hardware.gpu_memory_gib``               GiB      their memory, one per device
    ``software.python``                       version  Python
    ``software.torch``                        version  PyTorch
    ``software.cuda``                         version  CUDA PyTorch was built with (None for CPU builds)
    ``software.cudnn``                        version  cuDNN (None if not available)
    ``software.nccl``                         version  NCCL (None if not available)
    ``software.lightning``                    version  Lightning
    ``software.wandb``                        version  wandb (None if not installed)
    ``software.numpy``                        version  NumPy (None if not installed)
    ``software.lightning_cs336``              version  this callback package (None if not installed)
    ``environment.hostname``                  text     host name (rank zero's)
    ``environment.platform``                  text     ``platform.platform()``
    ``environment.cwd``                       path     working directory
    ``environment.git_commit``                text     ``git rev-parse HEAD`` in the cwd (None outside a repository)
    ``environment.git_dirty``                 bool     tracked files modified (None outside a repository)
    ``environment.command``                   text     the command line (``sys.argv``, shell-quoted)
    ``trainer.strategy``                      text     strategy class name
    ``trainer.precision``                     text     precision plugin setting
    ``trainer.world_size``                    count    processes
    ``trainer.num_nodes``                     count    nodes
    ``trainer.accumulate_grad_batches``       count    micro-batches per optimizer step
    ``model.class_name``                      text     the LightningModule's class
    ``model.params_total``                    count    parameters
    ``model.params_trainable``                count    parameters with ``requires_grad``
    ``model.params_non_embedding``            count    parameters outside embedding tables
    ========================================  =======  =================================================================

    Summary keys (written once at the end of training; a key whose value is unknown is left out):

    ================================  ======  ================================================================
    key                               unit    when
    ================================  ======  ================================================================
    ``summary/final_train_loss``      loss    end of training: last ``train_loss_key`` value
    ``summary/final_val_loss``        loss    end of training: last validation's ``val_loss_key`` value
    ``summary/best_val_loss``         loss    end of training: lowest validation loss over the whole run
    ``summary/best_val_step``         step    end of training: the logging step of that validation
    ``summary/total_time_sec``        s       end of training: fit wall time, summed over resumed segments
    ``summary/tokens_seen``           tokens  end of training: training tokens over all ranks and segments
    ``summary/global_step``           step    end of training: optimizer steps taken
    ================================  ======  ================================================================

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks.run_info import RunInfoLogger

        trainer = Trainer(callbacks=[RunInfoLogger(config={"data": {"path": "owt.bin"}}, val_loss_key="val/loss")])

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.run_info.RunInfoLogger
              init_args:
                train_loss_key: train/loss
                val_loss_key: val/loss
                config:
                  data:
                    tokenizer: gpt2
    """

    #: Every summary key (before ``prefix``).
    METRIC_KEYS: tuple[str, ...] = (
        "summary/final_train_loss",
        "summary/final_val_loss",
        "summary/best_val_loss",
        "summary/best_val_step",
        "summary/total_time_sec",
        "summary/tokens_seen",
        "summary/global_step",
    )
    #: Every config key under ``run_info`` (dotted paths).
    CONFIG_KEYS: tuple[str, ...] = (
        "hardware.cpu_model",
        "hardware.cpu_count_logical",
        "hardware.cpu_count_physical",
        "hardware.ram_total_gib",
        "hardware.gpu_count",
        "hardware.gpu_names",
        "hardware.gpu_memory_gib",
        "software.python",
        "software.torch",
        "software.cuda",
        "software.cudnn",
        "software.nccl",
        "software.lightning",
        "software.wandb",
        "software.numpy",
        "software.lightning_cs336",
        "environment.hostname",
        "environment.platform",
        "environment.cwd",
        "environment.git_commit",
        "environment.git_dirty",
        "environment.command",
        "trainer.strategy",
        "trainer.precision",
        "trainer.world_size",
        "trainer.num_nodes",
        "trainer.accumulate_grad_batches",
        "model.class_name",
        "model.params_total",
        "model.params_trainable",
        "model.params_non_embedding",
    )
    SUMMARY_FILE = "run_summary.json"

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        train_loss_key: str = "train/loss",
        val_loss_key: str = "val/loss",
        prefix: str = "",
        git_timeout: float = 5.0,
    ) -> None:
        super().__init__(log_every_n_steps=None, prefix=prefix)
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict or None, got {config!r}")
        for name, value in (("train_loss_key", train_loss_key), ("val_loss_key", val_loss_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if isinstance(git_timeout, bool) or not isinstance(git_timeout, (int, float)) or not git_timeout > 0:
            raise ValueError(f"git_timeout must be a positive number of seconds, got {git_timeout!r}")
        self.config = dict(config) if config is not None else {}
        self.train_loss_key = train_loss_key
        self.val_loss_key = val_loss_key
        self.git_timeout = float(git_timeout)
        #: The facts logged under ``run_info`` at the last fit start (rank zero), for inspection.
        self.run_info: dict[str, Any] = {}
        #: The summary written at the last end of training (keys with ``prefix``), for inspection.
        self.summary: dict[str, Any] = {}
        # Carried across resumes through state_dict():
        self._tokens_before = 0  # tokens of earlier fit segments (all ranks)
        self._time_before = 0.0  # seconds of earlier fit segments
        self._best_val: float | None = None
        self._best_val_step: int | None = None
        self._final_val: float | None = None
        # This segment:
        self._tokens_local = 0  # tokens this rank has seen since fit start
        self._start: float | None = None
        self._world_size = 1

    # -- state -----------------------------------------------------------------------------------------------------

    def tokens_seen(self) -> int:
        """Training tokens so far, all ranks (this segment's count extrapolated from this rank's)."""
        return self._tokens_before + self._tokens_local * self._world_size

    def elapsed(self) -> float:
        """Fit wall time so far in seconds, all segments."""
        return self._time_before + (time.monotonic() - self._start if self._start is not None else 0.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen(),
            "total_time_sec": self.elapsed(),
            "best_val_loss": self._best_val,
            "best_val_step": self._best_val_step,
            "final_val_loss": self._final_val,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Older or empty checkpoints simply lack keys: start those from zero.
        self._tokens_before = int(state_dict.get("tokens_seen", 0) or 0)
        self._time_before = float(state_dict.get("total_time_sec", 0.0) or 0.0)
        self._best_val = state_dict.get("best_val_loss")
        self._best_val_step = state_dict.get("best_val_step")
        self._final_val = state_dict.get("final_val_loss")
        self._tokens_local = 0
        self._start = None

    # -- start of fit ----------------------------------------------------------------------------------------------

    def _model_info(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        counts = count_parameters(pl_module)
        if _is_fsdp1(trainer) and distributed_ready(trainer):
            # FSDP1 leaves each rank a shard: the sum over ranks is the model. Every rank runs this collective.
            tensor = torch.tensor(
                [counts["total"], counts["trainable"], counts["non_embedding"]],
                dtype=torch.int64,
                device=trainer.strategy.root_device,
            )
            torch.distributed.all_reduce(tensor)
            counts = dict(zip(("total", "trainable", "non_embedding"), tensor.tolist(), strict=True))
        return {
            "class_name": type(pl_module).__name__,
            "params_total": int(counts["total"]),
            "params_trainable": int(counts["trainable"]),
            "params_non_embedding": int(counts["non_embedding"]),
        }

    def collect(self, trainer: Trainer, pl_module: LightningModule, model: dict[str, Any] | None = None) -> dict:
        """Gather the ``run_info`` facts (see the config key table). Runs ``git``: call it on one rank only."""
        return {
            "hardware": hardware_info(),
            "software": software_info(),
            "environment": environment_info(self.git_timeout),
            "trainer": {
                "strategy": type(trainer.strategy).__name__,
                "precision": str(trainer.precision),
                "world_size": int(trainer.world_size),
                "num_nodes": int(trainer.num_nodes),
                "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            },
            "model": model if model is not None else self._model_info(trainer, pl_module),
        }

    def hyperparameters(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The user configuration: module ``hparams``, then datamodule ``hparams``, then ``config``, merged."""
        merged: dict[str, Any] = {}
        sources: list[Any] = [getattr(pl_module, "hparams", None)]
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            sources.append(getattr(datamodule, "hparams", None))
        sources.append(self.config)
        for source in sources:
            if isinstance(source, Mapping):
                # LightningCLI's internal class path is not a hyperparameter (Lightning drops it too).
                merged = _deep_merge(merged, {k: v for k, v in source.items() if k != "_class_path"})
        return merged

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.monotonic()
        self._tokens_local = 0
        self._world_size = max(int(trainer.world_size), 1)
        model = self._model_info(trainer, pl_module)  # on every rank: it may hold a collective
        if trainer.global_rank != 0 or not trainer.loggers:
            return
        # This runs just before the Trainer logs the module's hparams itself. Being first matters for TensorBoard,
        # which keeps the first hparams record of a run: ours is the superset.
        self.run_info = self.collect(trainer, pl_module, model)
        params = self.hyperparameters(trainer, pl_module)
        params[self.prefix + "run_info"] = self.run_info
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    # -- during fit ------------------------------------------------------------------------------------------------

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The suite's one token count (``count_batch``, as SpeedMonitor's ``throughput/tokens_total``): every batch,
        # micro-batches included, from shapes only (no device sync).
        counted = count_batch(batch)
        if counted is None:
            self.warn_once("tokens", "no tensor found in the training batch, so tokens are not counted.")
            return
        self._tokens_local += counted[1]

    def _metric(self, trainer: Trainer, *keys: str) -> float | None:
        for source in (trainer.callback_metrics, trainer.logged_metrics):
            for key in keys:
                value = source.get(key)
                if value is not None:
                    return float(value.item() if isinstance(value, torch.Tensor) else value)
        return None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # One host read per validation (validation already syncs), on every rank so checkpoints agree.
        value = self._metric(trainer, self.val_loss_key, self.val_loss_key + "_epoch")
        if value is None:
            self.warn_once("val", f"{self.val_loss_key!r} is not in trainer.callback_metrics after validation.")
            return
        self._final_val = value
        if value == value and (self._best_val is None or value < self._best_val):  # value == value: not NaN
            self._best_val = value
            self._best_val_step = self.step(trainer)

    # -- end of fit ------------------------------------------------------------------------------------------------

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tokens = self.tokens_seen()
        if distributed_ready(trainer):
            # Exact total over ranks (their batches may differ in size). Every rank runs this collective.
            tensor = torch.tensor([self._tokens_local], dtype=torch.int64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(tensor)
            tokens = self._tokens_before + int(tensor.item())
        train_loss = self._metric(trainer, self.train_loss_key, self.train_loss_key + "_step")
        if train_loss is None:
            self.warn_once("train", f"{self.train_loss_key!r} was never logged, so the final train loss is unknown.")
        values: dict[str, Any] = {
            "summary/final_train_loss": train_loss,
            "summary/final_val_loss": self._final_val,
            "summary/best_val_loss": self._best_val,
            "summary/best_val_step": self._best_val_step,
            "summary/total_time_sec": self.elapsed(),
            "summary/tokens_seen": tokens,
            "summary/global_step": int(trainer.global_step),
        }
        self.summary = {self.prefix + k: v for k, v in values.items() if v is not None}
        log_summary(trainer, self.summary, self.step(trainer), self.SUMMARY_FILE, extra={"run_info": self.run_info})
