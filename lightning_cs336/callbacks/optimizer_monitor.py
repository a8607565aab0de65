"""Optimizer-state monitor: parameter norm, update norm, update/parameter ratio and, for Adam-family optimizers, the
moment norms and the effective step size, per parameter group and optionally per layer, for any ``torch.optim``
optimizer.

Why not Composer's ``OptimizerMonitor``? It reports moments and updates only for its own ``DecoupledAdamW``, which
records them inside its ``step``. Here the update is measured from outside, as the difference of the parameters
around the optimizer step, and the moments are read from ``optimizer.state`` (``exp_avg``/``exp_avg_sq``, the names
torch's Adam, AdamW, NAdam, RAdam and Adamax-style optimizers use), so any optimizer works.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_cs336.callbacks._base import (
    TelemetryCallback,
    check_positive_int,
    clean_param_name,
    distributed_ready,
    local_tensor,
)
from lightning_cs336.callbacks._sinks import to_host
from lightning_cs336.callbacks.grad_norm import _group_of, _plain_replicas, _replicas

__all__ = ["OptimizerMonitor"]

# Per-parameter sums: parameter square, update square, exp_avg square, exp_avg_sq square, effective-lr sum, elements.
_P, _U, _M, _V, _E, _N = range(6)


class OptimizerMonitor(TelemetryCallback):
    r"""Log, per parameter group (and optionally per layer), the parameter norm, the norm of the update the optimizer
    step made, their ratio, and for Adam-family optimizers the first- and second-moment norms and the effective step
    size.

    **Only on logging steps.** On a logging step ``on_before_optimizer_step`` copies the parameters of the optimizer
    (one transient copy of this rank's parameters or shards); ``on_train_batch_end``, after the step, measures
    ``update = p_after - p_before`` and reads ``optimizer.state``. Other steps pay nothing: no copy, no kernel, no
    sync. The values of one logging step reach the host in one transfer.

    **Distributed.** Under DDP every rank holds the same parameters and states: measured locally, no collective.
    With sharded parameters (FSDP2 / ``ModelParallelStrategy`` DTensors, FSDP1 flat parameters) each rank sums the
    squares of its local shard, replicated copies weighted down (as :class:`GradientNormMonitor` does), and ONE
    ``all_reduce(SUM)`` of all the sums runs on every rank per logging step.

    **Definitions**, for the parameters ``p`` of a group (L2 norms over all their elements):

    - ``param_norm`` = ``||p||`` after the step; ``update_norm`` = ``||p_after - p_before||``;
      ``update_ratio`` = ``update_norm / param_norm`` (the quantity learning rates are tuned by, ~1e-3 typical).
    - Adam family (``exp_avg`` and ``exp_avg_sq`` in the state): ``exp_avg_norm`` = ``||m||``, ``exp_avg_sq_norm`` =
      ``||v||``, and ``effective_lr`` = the mean over elements of ``lr / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) +
      eps)``: the factor the step multiplies ``m`` by (so ``update = -effective_lr * m`` elementwise, before weight
      decay), with ``lr``, ``betas``, ``eps`` of the group and ``t`` the parameter's step count.

    Args:
        per_layer_depth: Also log each group of parameters sharing the first ``per_layer_depth`` components of their
            module path (``2`` gives ``layers.3``), across parameter groups. ``None`` (default): groups only.
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key.

    Raises:
        ValueError: If ``per_layer_depth`` is not a positive integer or None (or the base class arguments are invalid).

    Logged keys (``<g>`` is the parameter group's ``"name"`` entry if it has one, else ``group<i>``; with
    ``per_layer_depth`` also each layer name, e.g. ``layers.0``):

    ==================================  ========  ================================================================
    key                                 unit      when
    ==================================  ========  ================================================================
    ``optim/param_norm``                L2 norm   logging steps: all parameters of the optimizer
    ``optim/update_norm``               L2 norm   logging steps: all parameters of the optimizer
    ``optim/update_ratio``              ratio     logging steps: ``update_norm / param_norm``
    ``optim/param_norm/<g>``            L2 norm   logging steps
    ``optim/update_norm/<g>``           L2 norm   logging steps
    ``optim/update_ratio/<g>``          ratio     logging steps
    ``optim/exp_avg_norm/<g>``          L2 norm   logging steps, Adam family: ``||m||``
    ``optim/exp_avg_sq_norm/<g>``       L2 norm   logging steps, Adam family: ``||v||``
    ``optim/effective_lr/<g>``          lr        logging steps, Adam family: mean factor applied to ``m``
    ==================================  ========  ================================================================

    Duck typing: nothing is required from the LightningModule; parameters are named via ``named_parameters()``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks import OptimizerMonitor

        trainer = Trainer(callbacks=[OptimizerMonitor(per_layer_depth=2, log_every_n_steps=50)])

    LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.optimizer_monitor.OptimizerMonitor
              init_args:
                per_layer_depth: 2
                log_every_n_steps: 50
    """

    METRIC_KEYS: tuple[str, ...] = (
        "optim/param_norm",
        "optim/update_norm",
        "optim/update_ratio",
        "optim/param_norm/<g>",
        "optim/update_norm/<g>",
        "optim/update_ratio/<g>",
        "optim/exp_avg_norm/<g>",
        "optim/exp_avg_sq_norm/<g>",
        "optim/effective_lr/<g>",
    )

    def __init__(
        self, per_layer_depth: int | None = None, log_every_n_steps: int | None = None, prefix: str = ""
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        check_positive_int("per_layer_depth", per_layer_depth, optional=True)
        self.per_layer_depth = per_layer_depth
        self._snapshots: list[tuple[Optimizer, list[Tensor], list[Tensor]]] = []
        self._names: dict[int, str] = {}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._names = {id(p): clean_param_name(n) for n, p in pl_module.named_parameters()}

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if not self.is_logging_step(trainer):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            self._snapshots.append((optimizer, params, [local_tensor(p).clone() for p in params]))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._snapshots:
            return
        snapshots, self._snapshots = self._snapshots, []
        metrics: dict[str, Tensor] = {}
        for i, (optimizer, params, before) in enumerate(snapshots):
            tag = "" if len(snapshots) == 1 else f"opt{i}/"
            metrics.update(self._measure(trainer, optimizer, params, before, tag))
        self.log_metrics(trainer, to_host(metrics))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._snapshots = []

    # ------------------------------------------------------------------------------------------------ internals
    def _measure(
        self, trainer: Trainer, optimizer: Optimizer, params: list[Tensor], before: list[Tensor], tag: str
    ) -> dict[str, Tensor]:
        home = trainer.strategy.root_device
        ready = distributed_ready(trainer)
        world = max(int(trainer.world_size), 1) if ready else 1
        plain = _plain_replicas(trainer)
        labels: dict[str, int] = {}
        rows: list[Tensor] = []
        row_labels: list[list[int]] = []
        adam = False
        weights: list[float] = []
        with torch.no_grad():
            k = 0
            for g, group in enumerate(optimizer.param_groups):
                glabel = labels.setdefault(str(group.get("name") or f"group{g}"), len(labels))
                lr = float(group.get("lr", 0.0))
                betas = group.get("betas", (0.9, 0.999))
                eps = float(group.get("eps", 1e-8))
                for p in group["params"]:
                    old = before[k]
                    k += 1
                    new = local_tensor(p)
                    stats = [new.float().square().sum(), (new.float() - old.float()).square().sum()]
                    state = optimizer.state.get(p, {})
                    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
                    if m is not None and v is not None:
                        adam = True
                        m, v = local_tensor(m).float(), local_tensor(v).float()
                        t = torch.as_tensor(state.get("step", 1), dtype=torch.float32, device=v.device)
                        bc1, bc2 = 1 - float(betas[0]) ** t, 1 - float(betas[1]) ** t
                        eff = (lr / bc1) / ((v / bc2).sqrt() + eps)
                        stats += [m.square().sum(), v.square().sum(), eff.sum()]
                    else:
                        stats += [torch.zeros((), device=new.device)] * 3
                    stats.append(torch.tensor(float(new.numel()), device=new.device))
                    rows.append(torch.stack([s.to(home) for s in stats]))
                    ids = [glabel]
                    if self.per_layer_depth is not None:
                        layer = _group_of(self._names.get(id(p), f"param{k - 1}"), self.per_layer_depth)
                        ids.append(labels.setdefault(layer, len(labels)))
                    row_labels.append(ids)
                    weights.append(1.0 / _replicas(p, plain))
            if not rows:
                return {}
            per_param = torch.stack(rows)  # (P, 6)
            sharded = world > 1 and any(w * world > 1.0 + 1e-9 for w in weights)
            if sharded:
                per_param = per_param * torch.tensor(weights, device=home).unsqueeze(1)
            sums = torch.zeros(len(labels) + 1, 6, device=home)
            sums[0] = per_param.sum(0)  # every parameter of the optimizer
            for column in range(len(row_labels[0])):  # the group, then (per_layer_depth) the layer
                index = torch.tensor([ids[column] + 1 for ids in row_labels], dtype=torch.long, device=home)
                sums.index_add_(0, index, per_param)
            if sharded:
                torch.distributed.all_reduce(sums)  # the one collective of the logging step
            norms = sums[:, :4].sqrt()
            ratio = norms[:, 1] / norms[:, 0].clamp(min=1e-30)
            eff = sums[:, _E] / sums[:, _N].clamp(min=1.0)
        out: dict[str, Tensor] = {
            f"optim/{tag}param_norm": norms[0, 0],
            f"optim/{tag}update_norm": norms[0, 1],
            f"optim/{tag}update_ratio": ratio[0],
        }
        for label, i in labels.items():
            j = i + 1
            out[f"optim/{tag}param_norm/{label}"] = norms[j, 0]
            out[f"optim/{tag}update_norm/{label}"] = norms[j, 1]
            out[f"optim/{tag}update_ratio/{label}"] = ratio[j]
            if adam:
                out[f"optim/{tag}exp_avg_norm/{label}"] = norms[j, 2]
                out[f"optim/{tag}exp_avg_sq_norm/{label}"] = norms[j, 3]
                out[f"optim/{tag}effective_lr/{label}"] = eff[j]
        return out
