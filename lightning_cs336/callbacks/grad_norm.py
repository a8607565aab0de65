"""Gradient norm monitor: the global L2 norm of the gradients before and after clipping, how often clipping fired,
optional per-layer norms, and non-finite gradients (count them, skip the step, or stop) — in one fused pass.

Why not ``lightning.pytorch.utilities.grad_norm``? It computes one norm per parameter and copies each to the host, and
under FSDP every rank sees only its own shard, so the "total" it reports is wrong. This callback reads the gradients
in ``on_before_optimizer_step`` (Lightning calls it after the precision plugin has unscaled them and after gradient
accumulation, once per optimizer step, before clipping), reduces them with ``torch._foreach_norm`` to one squared
norm per step on the device, and only brings values to the host on logging steps.

Size note (~580 lines): the fused norm, its replica weights for DDP/FSDP1/FSDP2/HSDP, clipping and the non-finite
policies are one computation on one cached parameter layout; the class docstring (~100 lines) is the key table.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

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
    is_dtensor,
    local_tensor,
)
from lightning_cs336.callbacks._sinks import to_host

__all__ = ["GradientNormMonitor"]

# torch.nn.utils.clip_grad_norm_ scales by max_norm / (total_norm + eps) with this eps.
_CLIP_EPS = 1e-6
_ON_NONFINITE = ("count", "skip", "stop")
# Row layout of the per-step window: [squared norm, non-finite parameter count, value-clip exceed count].
_SQ, _NONFINITE, _EXCEED = 0, 1, 2


def _group_of(name: str, depth: int) -> str:
    """The first ``depth`` components of the module path that owns parameter ``name``.

    ``layers.3.attn.q_proj.weight`` at depth 3 -> ``layers.3.attn``; ``head.bias`` at any depth -> ``head``; a
    parameter registered directly on the root module (``pos_emb``) is its own group.
    """
    parts = name.split(".")
    module_parts = parts[:-1] or parts
    return ".".join(module_parts[:depth])


def _replicas(param: Tensor, plain_replicas: int) -> int:
    """How many ranks hold an identical copy of this parameter's local gradient.

    A DTensor is copied once per mesh rank along each ``Replicate`` dimension (1 for FSDP2's ``Shard(0)``, the
    replicate-group size for HSDP). A plain tensor is replicated ``plain_replicas`` times (the strategy decides).
    """
    if not is_dtensor(param):
        return plain_replicas
    copies = 1
    for dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            copies *= param.device_mesh.size(dim)
    return copies


def _plain_replicas(trainer: Trainer) -> int:
    """Copies of a plain (non-DTensor) parameter's gradient across the world."""
    world = max(int(trainer.world_size), 1)
    strategy = trainer.strategy
    if "FSDP" not in type(strategy).__name__:
        # DDP & co: gradients are all-reduced in backward, every rank holds the same full gradient.
        return world
    sharding = getattr(strategy, "sharding_strategy", None)
    name = str(getattr(sharding, "name", sharding) or "FULL_SHARD").upper()
    if name == "NO_SHARD":
        return world
    if "HYBRID" in name:
        # Sharded within a node, replicated across nodes.
        return max(int(trainer.num_nodes), 1)
    # FSDP1 FULL_SHARD / SHARD_GRAD_OP: each rank owns a disjoint slice of every flat parameter.
    return 1


def _foreach_norms(tensors: list[Tensor], ord: float, home: torch.device) -> Tensor:
    """Per-tensor norms as one float32 vector on ``home``: one ``_foreach_norm`` launch per (device, precision).

    Low-precision gradients are accumulated in float32 (no overflow of the squares in bf16/fp16); float64 ones keep
    their precision and are cast after.
    """
    if not tensors:
        return torch.zeros(0, device=home)
    buckets: dict[tuple[torch.device, bool], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype == torch.float64), []).append(i)
    parts: list[tuple[list[int], Tensor]] = []
    for (_device, is_f64), ids in buckets.items():
        group = [tensors[i] for i in ids]
        dtype = None if is_f64 else torch.float32
        try:
            norms = torch._foreach_norm(group, ord, dtype=dtype)
        except (AttributeError, RuntimeError, TypeError):  # old torch or an unsupported tensor type
            norms = [torch.linalg.vector_norm(t, ord, dtype=dtype) for t in group]
        parts.append((ids, torch.stack(norms).to(device=home, dtype=torch.float32, non_blocking=True)))
    if len(parts) == 1:
        return parts[0][1]
    order = [i for ids, _ in parts for i in ids]
    stacked = torch.cat([p for _, p in parts])
    # Back to the input order (a host-built permutation; only reached with grads on several devices, e.g. offload).
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return stacked[inverse.to(home)]


def _local(grad: Tensor) -> Tensor:
    grad = local_tensor(grad)
    if grad.is_sparse:
        grad = grad.coalesce().values()
    return grad


class _ParamCache:
    """What never changes between steps for one optimizer: its parameters, their groups and replica weights."""

    def __init__(
        self,
        optimizer: Optimizer,
        names: dict[int, str],
        sparse: set[int],
        depth: int | None,
        plain_replicas: int,
        world: int,
        home: torch.device,
    ) -> None:
        self.optimizer = optimizer
        self.params: list[Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        self.names = [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(self.params)]
        self.home = home
        # Only DTensor (sharded) or sparse gradients need unwrapping; skip the per-tensor checks otherwise.
        self.needs_local = any(is_dtensor(p) or id(p) in sparse for p in self.params)
        self.depth = depth
        self.groups: list[str] = []
        group_ids: list[int] = []
        if depth is not None:
            index: dict[str, int] = {}
            for name in self.names:
                group_ids.append(index.setdefault(_group_of(name, depth), len(index)))
            self.groups = list(index)
        self._group_ids = group_ids
        replicas = [_replicas(p, plain_replicas) for p in self.params]
        # A collective is needed only if some gradient is not already complete on every rank (sharded).
        self.needs_reduce = world > 1 and any(r < world for r in replicas)
        # Each rank's local squared norm is divided by its number of copies so that the SUM over ranks counts every
        # element exactly once (DTensor Replicate dims, HSDP, plain tensors next to sharded ones).
        self.weights = [1.0 / r for r in replicas] if self.needs_reduce and any(r != 1 for r in replicas) else None
        self._subsets: dict[tuple[int, ...], tuple[Tensor, Tensor | None, Tensor | None]] = {}

    def subset(self, present: tuple[int, ...]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Device tensors for the parameters that have a gradient this step: indices, weights, group ids.

        Built once per distinct set (usually one: all parameters), so steady-state steps copy nothing to the device.
        """
        cached = self._subsets.get(present)
        if cached is None:
            if len(self._subsets) > 16:  # a model whose unused parameters vary every step: don't grow unbounded
                self._subsets.clear()
            idx = torch.tensor(present, dtype=torch.long, device=self.home)
            weights = (
                torch.tensor([self.weights[i] for i in present], dtype=torch.float32, device=self.home)
                if self.weights is not None
                else None
            )
            groups = (
                torch.tensor([self._group_ids[i] for i in present], dtype=torch.long, device=self.home)
                if self.depth is not None
                else None
            )
            cached = self._subsets[present] = (idx, weights, groups)
        return cached


class _Measurement(NamedTuple):
    """One optimizer step's fused pass: the row ``[square, non-finite count, value-clip exceed count]`` (this rank's
    share when sharded), the present-parameter indices, the per-parameter non-finite flags and per-group squares."""

    optimizer: Optimizer
    serial: int
    cache: _ParamCache
    row: Tensor
    idx: Tensor | None
    bad: Tensor
    group_sq: Tensor | None


class GradientNormMonitor(TelemetryCallback):
    r"""Log the global gradient L2 norm before and after clipping, clipping frequency, per-layer norms, and
    non-finite gradients, measured once per optimizer step in one fused pass over the gradients.

    The gradients are read in ``on_before_optimizer_step``: after backward, after the precision plugin unscaled them
    (AMP), accumulated over ``accumulate_grad_batches``, before Lightning clips them. Every step adds one
    ``torch._foreach_norm`` launch and a few tiny kernels, all on the device; values reach the host only on logging
    steps, in one transfer. The *window* of a logging step is the optimizer steps since the previous logging step,
    including this one.

    Clipping (``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``):

    - ``"norm"``: the post-clip norm is derived on the device with torch's formula
      ``pre * min(1, clip / (pre + 1e-6))`` (no second pass); a step "clipped" when that factor is below 1.
    - ``"value"``: a step "clipped" when any gradient element exceeded ``clip`` in magnitude (a max-abs pass per
      step); the post-clip norm is measured with a second pass after the optimizer step, on logging steps only.
    - A custom ``configure_gradient_clipping`` is not visible to the callback: the clip keys describe the Trainer's
      ``gradient_clip_val`` and are logged only when it is set (> 0).

    Distributed: under DDP the gradients are already all-reduced after backward, so the norm is computed locally and no
    collective is issued. With sharded parameters (FSDP1 ``FULL_SHARD``/``SHARD_GRAD_OP`` flat or original params,
    FSDP2/``ModelParallelStrategy`` DTensors) each rank sums the squares of its LOCAL shard (replicated copies
    weighted down so each element counts once), and ONE ``all_reduce(SUM)`` of a small tensor ``[per-step rows of the
    window, per-layer squares, post-clip square]`` runs on every rank per logging step; then the square root. DeepSpeed
    keeps gradients in its own buffers and is not supported.

    Non-finite gradients (a parameter counts when the L2 norm of its gradient, accumulated in float32, is NaN or inf):

    - ``"count"``: counted on the device; logged per window and in total. No host sync.
    - ``"skip"``: the optimizer step is skipped by setting every gradient of the optimizer to ``None`` (torch
      optimizers skip parameters without a gradient: no update, no weight decay, no change to Adam moments or step
      counts). Deciding on the host costs ONE host-device sync per optimizer step (and, when sharded, one small
      ``all_reduce`` per step).
    - ``"stop"``: log the window, then raise ``RuntimeError`` naming the step and the offending layer groups (or
      parameters). Same per-step cost as ``"skip"``. With ``precision="16-mixed"`` the GradScaler already skips
      overflowing steps and lowers its scale; ``"stop"`` would stop on the first overflow (a warning says so).

    Args:
        per_layer_depth: Also log the pre-clip norm of each group of parameters that share the first
            ``per_layer_depth`` components of their module path (``2`` gives ``layers.3``; ``3`` gives
            ``layers.3.attn``). Wrapper names (``_fsdp_wrapped_module``, ``_orig_mod``, ...) are dropped first.
            ``None`` (default) logs only the totals.
        on_nonfinite: ``"count"`` (default), ``"skip"`` or ``"stop"``, see above.
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key (``"ft/"`` gives ``ft/grad/norm_total``).

    Raises:
        ValueError: If ``per_layer_depth`` is not a positive integer or None, or ``on_nonfinite`` is not one of
            ``"count"``, ``"skip"``, ``"stop"`` (or the base class arguments are invalid).

    Logged keys (``window`` = optimizer steps since the previous logging step, this one included):

    ============================== ================= ==========================================================
    Key                            Unit              When
    ============================== ================= ==========================================================
    ``grad/norm_total``            L2 norm           logging steps: the logged step's norm before clipping
    ``grad/nonfinite_count``       optimizer steps   logging steps: steps in the window with NaN/inf gradients
    ``grad/nonfinite_total``       optimizer steps   logging steps: the same since the start of training
    ``grad/norm_total_clipped``    L2 norm           logging steps, if ``gradient_clip_val > 0``: norm after
                                                     clipping (0 for a step skipped by ``"skip"``)
    ``grad/clipped``               0/1               logging steps, if ``gradient_clip_val > 0``: whether the
                                                     logged step was clipped
    ``grad/clip_fraction``         fraction (0-1)    logging steps, if ``gradient_clip_val > 0``: share of the
                                                     window's steps that were clipped
    ``grad/clipped_total``         optimizer steps   logging steps, if ``gradient_clip_val > 0``: clipped steps
                                                     since the start of training
    ``grad/norm/<group>``          L2 norm           logging steps, if ``per_layer_depth`` is set: the group's
                                                     norm before clipping (e.g. ``grad/norm/layers.3.attn``)
    ============================== ================= ==========================================================

    The totals (and, when they are rank-independent, the window's pending steps) are saved in checkpoints, so a
    resumed run continues them.

    Duck typing: nothing is required from the LightningModule; the parameters measured are those of the optimizer
    being stepped, named via ``pl_module.named_parameters()``. With manual optimization every ``optimizer.step()``
    counts as a step and the last one of the batch is the logged one.

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks.grad_norm import GradientNormMonitor

        trainer = Trainer(
            gradient_clip_val=1.0,
            callbacks=[GradientNormMonitor(per_layer_depth=2, on_nonfinite="skip")],
        )

    LightningCLI YAML::

        trainer:
          gradient_clip_val: 1.0
          callbacks:
            - class_path: lightning_cs336.callbacks.grad_norm.GradientNormMonitor
              init_args:
                per_layer_depth: 2
                on_nonfinite: skip
                log_every_n_steps: 10
    """

    #: Every fixed key this callback can log (without ``prefix``); per-layer keys are ``PER_LAYER_KEY`` + group.
    METRIC_KEYS: tuple[str, ...] = (
        "grad/norm_total",
        "grad/nonfinite_count",
        "grad/nonfinite_total",
        "grad/norm_total_clipped",
        "grad/clipped",
        "grad/clip_fraction",
        "grad/clipped_total",
    )
    #: The keys logged only when ``Trainer(gradient_clip_val)`` is set.
    CLIP_KEYS: tuple[str, ...] = METRIC_KEYS[3:]
    #: Per-layer keys are this plus the group name.
    PER_LAYER_KEY: str = "grad/norm/"

    def __init__(
        self,
        per_layer_depth: int | None = None,
        on_nonfinite: Literal["count", "skip", "stop"] = "count",
        log_every_n_steps: int | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        check_positive_int("per_layer_depth", per_layer_depth, optional=True)
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        self.per_layer_depth = per_layer_depth
        self.on_nonfinite = on_nonfinite
        # Survive a resume (see state_dict).
        self._clipped_total = 0.0
        self._nonfinite_total = 0.0
        self._restored_rows: list[list[float]] = []
        # Per-run scratch: one parameter cache per optimizer (manual optimization may alternate several).
        self._caches: dict[int, _ParamCache] = {}
        self._cache: _ParamCache | None = None
        self._window: list[Tensor] = []
        self._group_sq: Tensor | None = None
        self._measured_this_batch = False
        self._last_skipped = False
        # The current batch's measurement, shared with other callbacks (norm_sq) so it is computed once.
        self._serial = 0
        self._fresh: _Measurement | None = None
        self._last: _Measurement | None = None
        # Whether the window's rows are the same on every rank (not sharded, or all-reduced per step): only then can a
        # checkpoint carry them over to a resumed run.
        self._rows_global = True

    # ------------------------------------------------------------------------------------------------------------
    # hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if "DeepSpeed" in type(trainer.strategy).__name__:
            self.warn_once(
                "deepspeed",
                "DeepSpeed keeps gradients in its own partitioned buffers, not in `param.grad`; the norms logged"
                " will not be the true gradient norms.",
            )
        if self.on_nonfinite == "stop" and getattr(trainer.precision_plugin, "scaler", None) is not None:
            self.warn_once(
                "scaler-stop",
                "on_nonfinite='stop' with a GradScaler (precision='16-mixed'): the scaler produces inf gradients by"
                " design while it calibrates its scale (and skips those steps itself), so training will stop on the"
                " first overflow. Use 'count' to just record them.",
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._measured_this_batch = False
        self._serial += 1
        self._fresh = None

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        m = self._measure(trainer, pl_module, optimizer)
        self._fresh = None  # consumed: a StabilityMonitor asking later in this hook round gets self._last
        self._last = m
        cache, row, idx, bad = m.cache, m.row, m.idx, m.bad
        self._group_sq = m.group_sq
        self._last_skipped = False
        if self.on_nonfinite != "count":
            if cache.needs_reduce:
                # Out of place: the row handed to other callbacks (norm_sq) stays this rank's local value.
                row = row.clone()
                torch.distributed.all_reduce(row)
            # The documented cost of "skip"/"stop": one host sync per optimizer step. Every rank reaches the same
            # decision (gradients identical under DDP; the count all-reduced when sharded).
            if bool(row[_NONFINITE] > 0):
                if self.on_nonfinite == "stop":
                    self._window.append(row)
                    self._stop(trainer, cache, idx, bad)
                self._skip(trainer, cache)
        self._rows_global = not cache.needs_reduce or self.on_nonfinite != "count"
        self._window.append(row)
        self._measured_this_batch = True

    def norm_sq(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> tuple[Tensor, bool]:
        """This optimizer step's squared total gradient norm (before clipping), for other callbacks
        (:class:`~lightning_cs336.callbacks.stability.StabilityMonitor`), computed once per step whichever callback
        asks first. Call it from ``on_before_optimizer_step``.

        Returns:
            ``(square, sharded)``: a 0-d float32 device tensor, and whether it is this rank's share only (sharded
            gradients: an ``all_reduce(SUM)`` over ranks gives the global square; otherwise it is already global).
        """
        fresh = self._fresh
        if fresh is not None and fresh.optimizer is optimizer and fresh.serial == self._serial:
            m = fresh
        elif self._last is not None and self._last.optimizer is optimizer and self._last.serial == self._serial:
            m = self._last  # this callback's own hook already ran for this step
        else:
            m = self._fresh = self._measure(trainer, pl_module, optimizer)
        return m.row[_SQ], m.cache.needs_reduce

    def _measure(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> _Measurement:
        fresh = self._fresh
        if fresh is not None and fresh.optimizer is optimizer and fresh.serial == self._serial:
            return fresh  # another callback asked first (norm_sq): the same gradients, not measured twice
        cache = self._cache_for(trainer, pl_module, optimizer)
        logging_step = self.is_logging_step(trainer)
        with torch.no_grad():
            present = tuple(i for i, p in enumerate(cache.params) if p.grad is not None)
            grads = [cache.params[i].grad for i in present]
            if cache.needs_local:
                grads = [_local(g) for g in grads]
            norms = _foreach_norms(grads, 2.0, cache.home)
            sq = norms.square()
            if present:
                idx, weights, group_ids = cache.subset(present)
                if weights is not None:
                    sq = sq * weights
            else:
                idx = weights = group_ids = None
            bad = ~torch.isfinite(norms)
            exceed = torch.zeros((), device=cache.home)
            clip = self._clip_config(trainer)
            if clip is not None and clip[1] == "value" and grads:
                max_abs = _foreach_norms(grads, math.inf, cache.home)
                exceed = (max_abs > clip[0]).sum().float()
            row = torch.stack([sq.sum(), bad.sum().float(), exceed])
            # Per-layer squares only when this step is logged (or may be, for "stop"); never reduced here.
            need_groups = self.per_layer_depth is not None and (logging_step or self.on_nonfinite == "stop")
            group_sq = None
            if need_groups:
                group_sq = torch.zeros(len(cache.groups), device=cache.home)
                if group_ids is not None:
                    group_sq.index_add_(0, group_ids, sq)
        return _Measurement(optimizer, self._serial, cache, row, idx, bad, group_sq)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Flush after the optimizer step so that value-clipping's post-clip norm can be measured on the clipped grads.
        # Not "did the optimizer step" (the clock knows that) but "did on_before_optimizer_step run": a training_step
        # that returns None skips it, and then there is nothing new to log.
        if not self._measured_this_batch:
            return
        self._measured_this_batch = False
        if self.is_logging_step(trainer):
            self._flush(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Drop references to parameters and device tensors; the totals stay for state_dict.
        self._caches = {}
        self._cache = None
        self._group_sq = None
        self._fresh = self._last = None

    @override
    def state_dict(self) -> dict[str, Any]:
        rows: list[list[float]] = list(self._restored_rows)
        if self._window and self._rows_global:
            # Pending steps since the last logging step, so the next window after a resume still includes them. When
            # sharded in "count" mode the rows are rank-local partial sums and can't be restored on other ranks.
            rows += torch.stack(self._window).cpu().tolist()
        return {
            "clipped_total": self._clipped_total,
            "nonfinite_total": self._nonfinite_total,
            "pending_rows": rows,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tolerate checkpoints from older versions or without this callback's state.
        self._clipped_total = float(state_dict.get("clipped_total", 0.0))
        self._nonfinite_total = float(state_dict.get("nonfinite_total", 0.0))
        rows = state_dict.get("pending_rows", []) or []
        self._restored_rows = [[float(v) for v in row] for row in rows if len(row) == 3]
        self._window = []

    # ------------------------------------------------------------------------------------------------------------
    # internals

    @staticmethod
    def _clip_config(trainer: Trainer) -> tuple[float, str] | None:
        value = trainer.gradient_clip_val
        if value is None or value <= 0:
            return None
        algorithm = trainer.gradient_clip_algorithm
        algorithm = str(getattr(algorithm, "value", algorithm) or "norm").lower()
        return float(value), algorithm

    def _cache_for(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> _ParamCache:
        cache = self._caches.get(id(optimizer))
        if cache is None or cache.optimizer is not optimizer:
            names = {id(p): clean_param_name(n) for n, p in pl_module.named_parameters()}
            sparse = {
                id(m.weight)
                for m in pl_module.modules()
                if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.sparse
            }
            world = max(int(trainer.world_size), 1) if distributed_ready(trainer) else 1
            cache = self._caches[id(optimizer)] = _ParamCache(
                optimizer,
                names,
                sparse,
                self.per_layer_depth,
                _plain_replicas(trainer),
                world,
                trainer.strategy.root_device,
            )
            self._group_sq = None
        self._cache = cache
        return cache

    def _skip(self, trainer: Trainer, cache: _ParamCache) -> None:
        # p.grad = None makes torch optimizers skip the parameter entirely (zeroing would still apply weight decay and
        # decay Adam's moments); Lightning's clipping then sees no gradients, and the next zero_grad is a no-op.
        for p in cache.params:
            p.grad = None
        self._last_skipped = True
        self.warn_once(
            "skip",
            f"non-finite gradients at step {self.step(trainer)}: skipping that optimizer step (warned once; the"
            " count is logged as grad/nonfinite_count).",
        )

    def _stop(self, trainer: Trainer, cache: _ParamCache, idx: Tensor | None, bad: Tensor) -> None:
        flags = torch.zeros(len(cache.params), device=cache.home)
        if idx is not None:
            flags[idx] = bad.float()
        if cache.needs_reduce:
            # Every rank is here (the decision came from an all-reduced count), so this collective is matched.
            torch.distributed.all_reduce(flags)
        offending = [cache.names[i] for i, f in enumerate(flags.cpu().tolist()) if f > 0]
        if self.per_layer_depth is not None:
            offending = list(dict.fromkeys(_group_of(n, self.per_layer_depth) for n in offending))
        shown = ", ".join(offending[:20]) + (f" and {len(offending) - 20} more" if len(offending) > 20 else "")
        step = self.step(trainer)
        self._flush(trainer, final=True)
        raise RuntimeError(
            f"{type(self).__name__}(on_nonfinite='stop'): non-finite (NaN/inf) gradients at step {step} (global_step"
            f" {trainer.global_step}, epoch {trainer.current_epoch}) in: {shown or '<unknown>'}. Training stopped"
            " before the optimizer step."
        )

    def _flush(self, trainer: Trainer, final: bool = False) -> None:
        """Reduce the window (one collective when sharded), derive the logged values and hand them to the loggers."""
        cache = self._cache
        if cache is None or not self._window:
            return
        home = cache.home
        local = torch.stack(self._window)
        self._window = []
        group_sq, self._group_sq = self._group_sq, None
        clip = None if final else self._clip_config(trainer)
        post_sq: Tensor | None = None
        if clip is not None and clip[1] == "value":
            # The clipped gradients are still in .grad after the optimizer step (zero_grad runs in the next closure).
            with torch.no_grad():
                grads = [_local(p.grad) for p in cache.params if p.grad is not None]
                post = _foreach_norms(grads, 2.0, home).square()
                if cache.weights is not None and grads:
                    present = tuple(i for i, p in enumerate(cache.params) if p.grad is not None)
                    post = post * cache.subset(present)[1]
                post_sq = post.sum()

        if cache.needs_reduce:
            # ONE all_reduce on every rank per logging step: the window's local rows (unless already reduced per step
            # by "skip"/"stop"), the per-layer squares and the post-clip square, packed into one small tensor.
            reduce_rows = self.on_nonfinite == "count"
            parts = ([local.flatten()] if reduce_rows else []) + [
                t.reshape(-1) for t in (group_sq, post_sq) if t is not None
            ]
            if parts:
                packed = torch.cat(parts)
                torch.distributed.all_reduce(packed)
                offset = 0
                if reduce_rows:
                    local = packed[: local.numel()].view_as(local)
                    offset = local.numel()
                if group_sq is not None:
                    group_sq = packed[offset : offset + group_sq.numel()]
                    offset += group_sq.numel()
                if post_sq is not None:
                    post_sq = packed[offset]

        rows = local
        if self._restored_rows:
            rows = torch.cat([torch.tensor(self._restored_rows, dtype=local.dtype, device=home), local])
            self._restored_rows = []
        norms = rows[:, _SQ].sqrt()
        metrics: dict[str, Any] = {
            "grad/norm_total": norms[-1],
            "grad/nonfinite_count": (rows[:, _NONFINITE] > 0).sum(),
        }
        if clip is not None:
            clip_val, algorithm = clip
            if algorithm == "value":
                clipped = rows[:, _EXCEED] > 0
                post_norm = post_sq.sqrt() if post_sq is not None else torch.zeros((), device=home)
            else:
                factor = (clip_val / (norms + _CLIP_EPS)).clamp(max=1.0)
                # A non-finite step is not "clipped" (inf gives factor 0): it is counted in grad/nonfinite_count.
                clipped = (factor < 1.0) & torch.isfinite(norms)
                post_norm = norms[-1] * factor[-1]
            if self._last_skipped:
                post_norm = torch.zeros((), device=home)
            metrics["grad/norm_total_clipped"] = post_norm
            metrics["grad/clipped"] = clipped[-1]
            metrics["grad/clip_fraction"] = clipped.float().mean()
            metrics["_clipped_count"] = clipped.sum()
        if group_sq is not None:
            group_norms = group_sq.sqrt()
            for i, group in enumerate(cache.groups):
                metrics[self.PER_LAYER_KEY + group] = group_norms[i]

        # One device->host transfer, on every rank so the running totals (checkpointed) agree everywhere.
        host = to_host(metrics)
        self._nonfinite_total += host["grad/nonfinite_count"]
        host["grad/nonfinite_total"] = self._nonfinite_total
        if "_clipped_count" in host:
            self._clipped_total += host.pop("_clipped_count")
            host["grad/clipped_total"] = self._clipped_total
        self.log_metrics(trainer, host)
