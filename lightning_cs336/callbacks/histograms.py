r"""
Histogram Logger
================

Log per-parameter histograms of the weights (and optionally the gradients) every N steps, computed on the device
and moved to the host in one transfer.

"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.optim import Optimizer
from typing_extensions import override

from lightning_cs336.callbacks._base import TelemetryCallback, clean_param_name, local_tensor
from lightning_cs336.callbacks._sinks import log_histograms, to_host_rows

__all__ = ["HistogramLogger"]

# Elements per chunk of the on-device histogram: bounds the temporary memory (an int64 bin index and a float32
# copy per element) for very large parameters such as embeddings.
_CHUNK = 1 << 22
# Layout of the per-tensor summary vector, followed by the ``bins`` counts.
_FIELDS = ("num", "nonfinite_count", "mean", "std", "min", "max", "sum", "sum_squares", "lo", "hi")
_STATS = ("mean", "std", "min", "max", "nonfinite_count")


class HistogramLogger(TelemetryCallback):
    r"""Log a histogram of every parameter's weights, and optionally of its gradients, every N steps.

    At each logging step (the same rule as Lightning's ``log_every_n_steps``)
    the callback summarizes each parameter of the optimizer being stepped, in ``on_before_optimizer_step``: the
    weights are the ones this batch's loss was computed with, and the gradients are read there because it is the
    one point where they exist, accumulated over micro-batches and unscaled by mixed precision, before clipping and
    before they are zeroed. The values land on the same step as that batch's ``train/loss``. Parameters that no
    optimizer holds (frozen ones) are not logged; with several optimizers, each covers its own parameters.

    Everything is computed on the device with no host synchronisation: per tensor, the count, mean, std
    (unbiased, as ``torch.std``), min, max, sum and sum of squares of its finite values and ``bins`` equal-width bin
    counts between its own finite min and max (a ``scatter_add`` of bin indices, which, unlike ``torch.histc``,
    needs no host-side range and no per-tensor ``.item()``). NaN and inf elements are left out of every statistic
    and counted in ``nonfinite_count``; a constant tensor gets one unit-wide range centred on its value. All
    summaries are stacked and copied to the host in ONE transfer per logging step. Steps that do not log cost
    nothing.

    Per logger:

    - W&B: one ``wandb.Histogram`` per tensor, all in one ``experiment.log`` call with ``trainer/global_step``
      (together with the scalar statistics when ``log_stats``).
    - TensorBoard: ``add_histogram_raw`` per tensor (min, max, num, sum, sum of squares, bucket limits and counts),
      plus the scalar statistics when ``log_stats``.
    - Any other logger (CSV, ...): the scalar statistics, always, since it cannot show histograms.

    Only global rank zero computes and logs; nothing runs on other ranks and no collective is needed. Under DDP the
    gradients seen there are already all-reduced and the weights are replicated, so the histograms describe the
    whole model. Under FSDP (or any sharded strategy) the histograms are of rank zero's LOCAL SHARD of each
    parameter (DTensors via ``to_local()``); a parameter with an empty shard on rank zero is skipped. Gathering
    full parameters every N steps would cost an all-gather of the model, so it is deliberately not done.

    Logged keys (``<name>`` is the parameter name from ``named_parameters()`` with FSDP/checkpoint/compile wrapper
    parts removed, e.g. ``layers.0.attn.q_proj.weight``; ``prefix`` prepended to each):

    ==================================== ========== ===============================================================
    key                                  unit       when
    ==================================== ========== ===============================================================
    ``weights/<name>``                   histogram  every ``log_every_n_steps`` steps (W&B, TensorBoard)
    ``weights/<name>/mean``              param unit every ``log_every_n_steps`` steps (CSV and other loggers; W&B and
                                                    TensorBoard too when ``log_stats``)
    ``weights/<name>/std``               param unit as ``weights/<name>/mean`` (unbiased, as ``torch.std``)
    ``weights/<name>/min``               param unit as ``weights/<name>/mean``
    ``weights/<name>/max``               param unit as ``weights/<name>/mean``
    ``weights/<name>/nonfinite_count``   elements   as ``weights/<name>/mean`` (NaN/inf elements, left out of the rest)
    ``gradients/<name>``                 histogram  as ``weights/<name>``, when ``log_gradients`` and the parameter
                                                    has a gradient
    ``gradients/<name>/mean``            grad unit  as ``weights/<name>/mean``, when ``log_gradients``
    ``gradients/<name>/std``             grad unit  as ``gradients/<name>/mean``
    ``gradients/<name>/min``             grad unit  as ``gradients/<name>/mean``
    ``gradients/<name>/max``             grad unit  as ``gradients/<name>/mean``
    ``gradients/<name>/nonfinite_count`` elements   as ``gradients/<name>/mean``
    ==================================== ========== ===============================================================

    A tensor with no finite element gets NaN statistics and no histogram.

    Args:
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        bins: Number of equal-width bins per histogram, 1 to 512 (W&B's limit).
        log_weights: Log the weights.
        log_gradients: Log the gradients (parameters without a gradient at that step are skipped).
        log_stats: Also log the scalar statistics to W&B and TensorBoard (they always go to the other loggers).
        prefix: Prepended to every logged key.
        **deprecated: ``every_n_steps``, the old name of ``log_every_n_steps``.

    Raises:
        ValueError: If an argument is out of range, or neither weights nor gradients are logged.

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks.histograms import HistogramLogger

        trainer = Trainer(callbacks=[HistogramLogger(log_every_n_steps=200, log_gradients=True)])

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.histograms.HistogramLogger
              init_args:
                log_every_n_steps: 200
                bins: 64
                log_gradients: true
    """

    METRIC_KEYS: tuple[str, ...] = (
        "weights/<name>",
        "weights/<name>/mean",
        "weights/<name>/std",
        "weights/<name>/min",
        "weights/<name>/max",
        "weights/<name>/nonfinite_count",
        "gradients/<name>",
        "gradients/<name>/mean",
        "gradients/<name>/std",
        "gradients/<name>/min",
        "gradients/<name>/max",
        "gradients/<name>/nonfinite_count",
    )
    STATS: tuple[str, ...] = _STATS

    def __init__(
        self,
        log_every_n_steps: int | None = 100,
        bins: int = 64,
        log_weights: bool = True,
        log_gradients: bool = False,
        log_stats: bool = True,
        prefix: str = "",
        **deprecated: Any,
    ) -> None:
        if "every_n_steps" in deprecated:
            log_every_n_steps = self._deprecated_interval(deprecated.pop("every_n_steps"), none_means=None)
        if deprecated:
            raise TypeError(f"HistogramLogger got unexpected keyword arguments {sorted(deprecated)}")
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 512:
            raise ValueError(f"bins must be an integer in [1, 512], got {bins!r}")
        for name, value in (("log_weights", log_weights), ("log_gradients", log_gradients), ("log_stats", log_stats)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if not (log_weights or log_gradients):
            raise ValueError(
                f"at least one of log_weights ({log_weights!r}) and log_gradients ({log_gradients!r}) must be True"
            )
        self.bins = bins
        self.log_weights = log_weights
        self.log_gradients = log_gradients
        self.log_stats = log_stats
        # Parameters already summarized at the current step: with several optimizers stepping in one batch, each
        # call covers its own parameters once.
        self._step_seen: tuple[int, set[int]] = (-1, set())

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # No collective is involved, so ranks other than zero can skip the work entirely.
        if trainer.global_rank != 0 or not trainer.loggers or not self.is_logging_step(trainer):
            return
        step = self.step(trainer)
        if self._step_seen[0] != step:
            self._step_seen = (step, set())
        seen = self._step_seen[1]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}

        tensors: list[tuple[str, torch.Tensor]] = []
        for name, param in pl_module.named_parameters():
            if id(param) not in in_optimizer or id(param) in seen:
                continue
            seen.add(id(param))
            name = clean_param_name(name)
            if self.log_weights:
                tensors.append((f"weights/{name}", param))
            if self.log_gradients and param.grad is not None:
                tensors.append((f"gradients/{name}", param.grad))
        self._log(trainer, tensors, step)

    def _log(self, trainer: Trainer, tensors: list[tuple[str, torch.Tensor]], step: int) -> None:
        """Summarize ``tensors`` on the device, copy everything to the host at once and hand it to the loggers."""
        summaries: dict[str, torch.Tensor] = {}
        for key, tensor in tensors:
            local = local_tensor(tensor)
            if local.numel() == 0:  # e.g. an empty FSDP shard on this rank
                continue
            summaries[self.prefix + key] = _summarize(local, self.bins)
        if not summaries:
            return
        host = to_host_rows(summaries)

        stats: dict[str, float] = {}
        histograms: dict[str, tuple[dict[str, float], list[float], list[float]]] = {}
        for key, row in host.items():
            fields = dict(zip(_FIELDS, row[: len(_FIELDS)], strict=True))
            counts = row[len(_FIELDS) :]
            if fields["num"] == 0:  # nothing finite: NaN statistics, no histogram
                fields.update(mean=math.nan, std=math.nan, min=math.nan, max=math.nan)
            else:
                lo, hi = fields["lo"], fields["hi"]
                edges = [lo + (hi - lo) * i / self.bins for i in range(self.bins + 1)]
                histograms[key] = (fields, counts, edges)
            stats.update({f"{key}/{stat}": fields[stat] for stat in _STATS})

        log_histograms(trainer, histograms, stats, step, stats_everywhere=self.log_stats)


def _summarize(tensor: torch.Tensor, bins: int) -> torch.Tensor:
    """A vector ``[*_FIELDS, *counts]`` for ``tensor``, computed on its device without any host synchronisation.

    Statistics are over the finite elements only. Element-wise work and per-chunk sums are in float32 (float64 for
    float64 tensors; torch's reductions are pairwise/tree-shaped, so they stay accurate); chunk results accumulate
    in float64 (float32 on MPS, which lacks it), and the counts are int64, exact for tensors of any size.
    The std is computed from centred values in a second pass, not from the sum of squares.
    """
    device = tensor.device
    acc = torch.float32 if device.type == "mps" else torch.float64
    flat = tensor.reshape(-1)
    work = torch.float64 if flat.dtype == torch.float64 else torch.float32
    chunks = [flat[i : i + _CHUNK] for i in range(0, flat.numel(), _CHUNK)]
    # With one chunk (most parameters), keep the converted values and the mask for the second pass.
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    num = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=acc, device=device)
    total_sq = torch.zeros((), dtype=acc, device=device)
    low = torch.full((), math.inf, dtype=work, device=device)
    high = torch.full((), -math.inf, dtype=work, device=device)
    for chunk in chunks:
        x = chunk.to(work)
        finite = torch.isfinite(x)
        if len(chunks) == 1:
            cache.append((x, finite))
        num += finite.sum()
        zeroed = torch.where(finite, x, 0)
        total += zeroed.sum().to(acc)
        total_sq += (zeroed * zeroed).sum().to(acc)
        low = torch.minimum(low, torch.where(finite, x, math.inf).amin())
        high = torch.maximum(high, torch.where(finite, x, -math.inf).amax())

    any_finite = num > 0
    low = torch.where(any_finite, low, 0)
    high = torch.where(any_finite, high, 0)
    mean = total / num  # NaN when nothing is finite
    # A constant tensor has no width to divide: give it a unit-wide range centred on its value.
    pad = torch.where(high > low, 0.0, 0.5).to(work)
    lo, hi = low - pad, high + pad
    scale = bins / (hi - lo)
    mean_work = mean.to(work)

    centred_sq = torch.zeros((), dtype=acc, device=device)
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=device)
    ones = torch.ones(1, dtype=torch.int64, device=device)
    for x, finite in cache or ((chunk.to(work), torch.isfinite(chunk)) for chunk in chunks):
        centred = torch.where(finite, x - mean_work, 0)
        centred_sq += (centred * centred).sum().to(acc)
        # The value equal to the max falls in the last bin (as histc); non-finite elements go to an extra bin that
        # is dropped, so the scatter needs no per-element weights.
        index = torch.where(finite, ((x - lo) * scale).floor_().clamp_(0, bins - 1), bins).long()
        counts.scatter_add_(0, index, ones.expand(index.numel()))
    std = (centred_sq / (num - 1)).sqrt()  # unbiased, as torch.std; NaN for a single element

    fields = torch.stack(
        [num.to(acc), (flat.numel() - num).to(acc), mean, std, low.to(acc), high.to(acc), total, total_sq]
        + [lo.to(acc), hi.to(acc)]
    )
    return torch.cat([fields, counts[:bins].to(acc)])
