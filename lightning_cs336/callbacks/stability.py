"""Stability guard: loss and gradient-norm spikes (and NaN/inf) detected on the device, with a policy per rule:
log them, skip the optimizer step on every rank, stop the run keeping the last good checkpoint, or roll back to it.

Why not Lightning's ``SpikeDetection``? It watches the loss only, raises instead of logging, decides on rank zero's
loss and crashes on resume (Lightning PR 21752). llm-foundry's ``KillLossSpike`` is rank-zero only; OLMo-core's
``StabilityMonitor``/``SkipStepOptimizer`` are tied to its trainer. This one is a plain Lightning callback.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_cs336.callbacks import _compat
from lightning_cs336.callbacks._base import TelemetryCallback, check_positive_int, distributed_ready
from lightning_cs336.callbacks._sinks import log_table
from lightning_cs336.callbacks.grad_norm import GradientNormMonitor

__all__ = ["StabilityMonitor"]

Policy = Literal["log", "skip", "stop", "rollback"]
_POLICIES = ("log", "skip", "stop", "rollback")
_LEVEL = {p: i for i, p in enumerate(_POLICIES)}  # the strongest action of a step wins
_RULES = ("loss", "grad_norm")
_SOURCE_KEY = {"loss": "train/loss", "grad_norm": "grad/norm_total"}
#: Columns of the ``stability/spikes`` table (one row per rule that fired at a step).
SPIKE_COLUMNS = ("step", "epoch", "batch_idx", "rule", "value", "threshold", "score", "action")


class _Window:
    """A rule's running statistic on the device: the last ``size`` finite values (newest last) and their count."""

    def __init__(self, size: int, device: torch.device, values: list[float] | None = None) -> None:
        self.size = size
        self.buf = torch.zeros(size, device=device)
        self.n = torch.zeros((), dtype=torch.long, device=device)
        self.positions = torch.arange(size, device=device)
        if values:
            values = values[-size:]
            self.buf[size - len(values) :] = torch.tensor(values, dtype=torch.float32, device=device)
            self.n.fill_(len(values))

    def stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, standard deviation and count of the window, on the device."""
        mask = (self.positions >= self.size - self.n).float()
        count = mask.sum()
        mean = (self.buf * mask).sum() / count.clamp(min=1.0)
        var = (((self.buf - mean) * mask) ** 2).sum() / (count - 1.0).clamp(min=1.0)
        return mean, var.sqrt(), count

    def push(self, value: Tensor) -> None:
        """Append ``value`` if it is finite (a non-finite value never enters the statistic)."""
        finite = torch.isfinite(value)
        shifted = torch.cat([self.buf[1:], torch.where(finite, value, 0.0).reshape(1)])
        self.buf = torch.where(finite, shifted, self.buf)
        self.n = (self.n + finite.long()).clamp(max=self.size)

    def values(self) -> list[float]:
        n = int(self.n)
        return self.buf[self.size - n :].tolist() if n else []


class StabilityMonitor(TelemetryCallback):
    r"""Detect loss and gradient-norm spikes on the device and act on them: log, skip the step, stop, or roll back.

    **Rules.** Two rules, each with its own running window of the last ``window`` finite values: ``loss`` (the
    training loss of the optimizer step, the sum of the losses handed to backward over its micro-batches, i.e. their
    mean under Lightning's accumulation; averaged over data-parallel ranks) and ``grad_norm`` (the total gradient L2
    norm before clipping, taken from a :class:`GradientNormMonitor` in the same Trainer so it is not computed twice,
    else computed here with the same fused, FSDP-correct pass). After ``warmup_steps`` values a value is a *spike*
    when it exceeds ``mean + sigma * std`` of the window (``rule="sigma"``, OLMo-core's rule) or ``ratio * mean``
    (``rule="ratio"``). A NaN or inf value is always a spike, warm-up or not. Every finite value, spikes included,
    enters the window, so a lasting change of level stops firing once the window has seen it.

    **Policies**, per rule (``loss_policy``, ``grad_norm_policy``; ``None`` turns a rule off; ``nonfinite_policy``
    overrides both for NaN/inf values), the strongest of a step's wins:

    - ``"log"`` (default): counted and logged in the ``stability/*`` keys and the ``stability/spikes`` table. Nothing
      crosses to the host and no collective runs except at logging steps, where the window's values of all ranks are
      reduced once and checked in one pass.
    - ``"skip"``: the optimizer step is skipped on every rank (every gradient of the optimizer set to ``None``, so
      torch optimizers leave weights, moments and step counts untouched); the decision is taken on values
      all-reduced over ranks, so it is the same everywhere. The LR schedule still advances.
    - ``"stop"``: the step is skipped, ``trainer.should_stop`` is set, and from then on no ``ModelCheckpoint`` writes
      anything, so its newest file (``last.ckpt``) stays the last good state. :attr:`stopped_reason` says why
      (``"loss spike at step 37: train/loss=nan ..."``) and is warned and logged; ``cs336 fit`` exits non-zero.
    - ``"rollback"``: the step is skipped and the weights and optimizer states are reloaded from the newest file a
      ``ModelCheckpoint`` wrote (every rank reads the same file: single device or DDP, not sharded strategies).
      Training continues with the next batches, so the batches since that checkpoint, the offending one included,
      are not trained on again; the step counter and LR schedule go on. After ``max_rollbacks`` rollbacks (or with
      no checkpoint yet) the policy falls back to ``"stop"``.

    Any policy other than ``"log"`` costs, per optimizer step, one small ``all_reduce`` (several ranks) and one scalar
    read on the host (the decision); nothing else.

    **Where the bad batches are.** Each spike adds a row to the table ``stability/spikes`` (columns
    ``step, epoch, batch_idx, rule, value, threshold, score, action``; ``batch_idx`` lists the micro-batches of the
    step within the epoch) through every logger's table support, so the run record keeps it.

    **Resume.** The windows, counters, pending values and the spike table are in ``state_dict``.

    Args:
        loss_policy: Policy of the loss rule, or ``None`` to turn it off.
        grad_norm_policy: Policy of the gradient-norm rule, or ``None`` to turn it off.
        nonfinite_policy: Policy for NaN/inf values of either rule; ``None`` (default) uses the rule's own policy.
        rule: ``"sigma"`` (``value > mean + sigma * std``) or ``"ratio"`` (``value > ratio * mean``).
        sigma: Standard deviations above the mean that make a spike (``rule="sigma"``).
        ratio: Multiple of the mean that makes a spike (``rule="ratio"``).
        window: Number of recent finite values the statistic is taken over.
        warmup_steps: Values seen before finite values are checked at all.
        max_rollbacks: Rollbacks allowed in a run before ``"rollback"`` stops instead.
        log_every_n_steps: Log every this many optimizer steps. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        prefix: Prepended to every key.

    Raises:
        ValueError: If a policy, the rule or a number is invalid (the message repeats the value).

    Logged keys (``window`` below = the optimizer steps since the previous logging step):

    ===================================  ===============  =====================================================
    key                                  unit             when
    ===================================  ===============  =====================================================
    ``stability/loss_score``             std devs/ratio   logging steps: the logged step's loss score
    ``stability/grad_norm_score``        std devs/ratio   logging steps: the logged step's grad-norm score
    ``stability/spikes_count``           optimizer steps  logging steps: steps in the window with a spike
    ``stability/spikes_total``           optimizer steps  logging steps: the same since the start of training
    ``stability/nonfinite_total``        optimizer steps  logging steps: steps with a NaN/inf loss or grad norm
    ``stability/last_spike_step``        step             logging steps, after the first spike
    ``stability/skipped_total``          optimizer steps  logging steps: steps skipped by any policy
    ``stability/rollbacks_total``        rollbacks        logging steps: rollbacks so far
    ``stability/stopped``                1                the step a ``"stop"`` ended the run
    ===================================  ===============  =====================================================

    The score is ``(value - mean) / std`` for ``rule="sigma"`` and ``value / mean`` for ``rule="ratio"`` (0 during
    warm-up). Table: ``stability/spikes``, a row per spike, logged at the next logging step.

    Duck typing: nothing is required from the LightningModule.

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks import GradientNormMonitor, StabilityMonitor

        guard = StabilityMonitor(loss_policy="skip", nonfinite_policy="stop")
        trainer = Trainer(callbacks=[GradientNormMonitor(), guard])

    LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.stability.StabilityMonitor
              init_args:
                loss_policy: skip
                grad_norm_policy: log
                nonfinite_policy: stop
                sigma: 6.0
                window: 128
    """

    METRIC_KEYS: tuple[str, ...] = (
        "stability/loss_score",
        "stability/grad_norm_score",
        "stability/spikes_count",
        "stability/spikes_total",
        "stability/nonfinite_total",
        "stability/last_spike_step",
        "stability/skipped_total",
        "stability/rollbacks_total",
        "stability/stopped",
    )
    TABLE_KEY = "stability/spikes"

    def __init__(
        self,
        loss_policy: Policy | None = "log",
        grad_norm_policy: Policy | None = "log",
        nonfinite_policy: Policy | None = None,
        rule: Literal["sigma", "ratio"] = "sigma",
        sigma: float = 6.0,
        ratio: float = 3.0,
        window: int = 128,
        warmup_steps: int = 32,
        max_rollbacks: int = 3,
        log_every_n_steps: int | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        for name, value in (("loss_policy", loss_policy), ("grad_norm_policy", grad_norm_policy)):
            if value is not None and value not in _POLICIES:
                raise ValueError(f"{name} must be one of {_POLICIES} or None, got {value!r}")
        if nonfinite_policy is not None and nonfinite_policy not in _POLICIES:
            raise ValueError(f"nonfinite_policy must be one of {_POLICIES} or None, got {nonfinite_policy!r}")
        if rule not in ("sigma", "ratio"):
            raise ValueError(f"rule must be 'sigma' or 'ratio', got {rule!r}")
        for name, value in (("sigma", sigma), ("ratio", ratio)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if not ok:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        check_positive_int("window", window)
        if window < 2:
            raise ValueError(f"window must be at least 2 (a standard deviation needs two values), got {window!r}")
        check_positive_int("warmup_steps", warmup_steps, zero=True)
        check_positive_int("max_rollbacks", max_rollbacks, zero=True)
        self.policies: dict[str, str] = {}
        if loss_policy is not None:
            self.policies["loss"] = loss_policy
        if grad_norm_policy is not None:
            self.policies["grad_norm"] = grad_norm_policy
        self.nonfinite_policy = nonfinite_policy
        self.rule, self.sigma, self.ratio = rule, float(sigma), float(ratio)
        self.window, self.warmup_steps, self.max_rollbacks = window, warmup_steps, max_rollbacks
        # Per step on the device only when some policy acts; else checked in one pass at logging steps.
        levels = [_LEVEL[p] for p in self.policies.values()]
        if nonfinite_policy is not None and self.policies:
            levels.append(_LEVEL[nonfinite_policy])
        self._acts = bool(levels) and max(levels) > 0
        #: Why the run was stopped (``"loss spike at step 37: train/loss=nan ..."``), or None.
        self.stopped_reason: str | None = None

        # Survive a resume (state_dict).
        self.spikes_total = 0
        self.nonfinite_total = 0
        self.skipped_total = 0
        self.rollbacks_total = 0
        self.last_spike_step: int | None = None
        self._rows: list[list[Any]] = []  # the spike table, every row so far
        self._restored: dict[str, list[float]] = {}
        self._restored_pending: list[tuple[int, int, str, list[float]]] = []
        self._restored_checked: list[tuple[int, int, str, list[list[float]]]] = []
        # Per fit.
        self._windows: dict[str, _Window] = {}
        self._flags: dict[tuple[bool, bool], Tensor] = {}
        self._gnm: GradientNormMonitor | None = None
        self._own_gnm: GradientNormMonitor | None = None
        self._reset_step()
        # Steps not yet checked ("log" only): (step, epoch, batches, raw [loss, sq. norm, sharded, has loss], local).
        self._pending: list[tuple[int, int, str, Tensor]] = []
        # Checked steps not yet logged: (step, epoch, batches, [per rule: value, threshold, score, spike, action]).
        self._checked: list[tuple[int, int, str, Tensor]] = []
        self._unhold: list[Any] = []

    def _reset_step(self) -> None:
        self._loss: Tensor | None = None
        self._batches: list[int] = []

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._gnm = next((cb for cb in trainer.callbacks if isinstance(cb, GradientNormMonitor)), None)
        if "grad_norm" in self.policies and getattr(trainer.precision_plugin, "scaler", None) is not None:
            self.warn_once(
                "scaler",
                "with a GradScaler (precision='16-mixed') inf gradients are expected while it calibrates (it skips"
                " those steps itself); they count as non-finite grad-norm spikes here. Set grad_norm_policy=None or"
                " use bf16-mixed.",
            )
        if self._gnm is None and "grad_norm" in self.policies:
            # The same fused, FSDP-correct measurement; this private instance never logs.
            self._own_gnm = GradientNormMonitor()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        self._windows = {r: _Window(self.window, device, self._restored.get(r)) for r in self.policies}
        self._flags: dict[tuple[bool, bool], Tensor] = {}
        self._restored = {}
        self._pending = [
            (s, e, b, torch.tensor(v, dtype=torch.float32, device=device)) for s, e, b, v in self._restored_pending
        ]
        self._checked = [
            (s, e, b, torch.tensor(v, dtype=torch.float32, device=device)) for s, e, b, v in self._restored_checked
        ]
        self._restored_pending = []
        self._restored_checked = []

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._own_gnm is not None:
            self._own_gnm.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batches.append(batch_idx)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # The loss handed to backward is already divided by accumulate_grad_batches: the sum is the step's mean.
        value = loss.detach().float().reshape(())
        self._loss = value if self._loss is None else self._loss + value

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if not self.policies:
            return
        home = pl_module.device
        has_loss = self._loss is not None
        if not has_loss and "loss" in self.policies:
            self.warn_once(
                "no-loss",
                "no loss reached backward through Lightning (on_before_backward) for an optimizer step; the loss rule"
                " skips such steps.",
            )
        loss = self._loss if has_loss else torch.zeros((), device=home)
        sq, sharded = torch.zeros((), device=home), False
        if "grad_norm" in self.policies:
            gnm = self._gnm or self._own_gnm
            sq, sharded = gnm.norm_sq(trainer, pl_module, optimizer)
        flags = self._flags.get((sharded, has_loss))
        if flags is None:  # built once per combination: no host-to-device copy on a steady-state step
            flags = self._flags[(sharded, has_loss)] = torch.tensor([float(sharded), float(has_loss)], device=home)
        raw = torch.cat([torch.stack([loss.to(home), sq.to(home)]), flags])
        step, epoch, batches = self.step(trainer), trainer.current_epoch, _span(self._batches)
        self._reset_step()
        if not self._acts:
            self._pending.append((step, epoch, batches, raw))
            return
        (checked,) = self._check(trainer, raw.reshape(1, 4))
        self._checked.append((step, epoch, batches, checked))
        # The one host read of the step: the strongest action any rule asks for.
        level = int(checked[:, 4].max())
        if level > 0:
            self._act(trainer, pl_module, optimizer, _POLICIES[level], step, epoch, batches, checked)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._clock.steps_optimizer(trainer):
            self._reset_step()
            if self.is_logging_step(trainer):
                self._flush(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for unhold in self._unhold:
            unhold()
        self._unhold = []
        self._own_gnm = self._gnm = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # Unchecked ("log") and checked-but-unlogged steps both travel, so a resumed run logs them in its first window.
        # (Under DDP the unchecked values are rank zero's: they are reduced after the resume, against copies.)
        pending = [(s, e, b, raw.tolist()) for s, e, b, raw in self._pending]
        checked = [(s, e, b, c.tolist()) for s, e, b, c in self._checked]
        return {
            "checked": checked or list(self._restored_checked),
            "windows": {r: w.values() for r, w in self._windows.items()} or dict(self._restored),
            "pending": pending or list(self._restored_pending),
            "spikes_total": self.spikes_total,
            "nonfinite_total": self.nonfinite_total,
            "skipped_total": self.skipped_total,
            "rollbacks_total": self.rollbacks_total,
            "last_spike_step": self.last_spike_step,
            "rows": [list(r) for r in self._rows],
            "stopped_reason": self.stopped_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict or {}
        self._restored = {str(k): [float(x) for x in v] for k, v in (state.get("windows") or {}).items()}
        pending = state.get("pending", [])
        self._restored_pending = [(int(s), int(e), str(b), list(v)) for s, e, b, v in pending if len(v) == 4]
        self._restored_checked = [(int(s), int(e), str(b), list(v)) for s, e, b, v in state.get("checked", [])]
        for key in ("spikes_total", "nonfinite_total", "skipped_total", "rollbacks_total"):
            setattr(self, key, int(state.get(key, 0) or 0))
        last = state.get("last_spike_step")
        self.last_spike_step = int(last) if last is not None else None
        self._rows = [list(r) for r in state.get("rows", [])]
        self.stopped_reason = state.get("stopped_reason")

    # ------------------------------------------------------------------------------------------------ internals
    def _check(self, trainer: Trainer, raw: Tensor) -> list[Tensor]:
        """Reduce ``raw`` rows ``[loss, squared norm, sharded, has loss]`` over ranks (one collective) and run the
        rules step by step. Returns per step a ``(rules, 5)`` tensor: value, threshold, score, spike, action level."""
        if distributed_ready(trainer):
            world = float(trainer.world_size)
            reduced = raw[:, :2].contiguous()
            torch.distributed.all_reduce(reduced)
            loss = reduced[:, 0] / world
            # Sharded: the sum of the ranks' shares is the global square; otherwise every rank holds it already.
            sq = torch.where(raw[:, 2] > 0, reduced[:, 1], reduced[:, 1] / world)
        else:
            loss, sq = raw[:, 0], raw[:, 1]
        values = {"loss": loss, "grad_norm": sq.sqrt()}
        present = {"loss": raw[:, 3] > 0, "grad_norm": torch.ones_like(raw[:, 3], dtype=torch.bool)}
        out = []
        for i in range(raw.shape[0]):
            per_rule = []
            for rule, policy in self.policies.items():
                window = self._windows[rule]
                v = values[rule][i]
                mean, std, count = window.stats()
                ready = count >= max(self.warmup_steps, 2 if self.rule == "sigma" else 1)
                if self.rule == "sigma":
                    threshold = mean + self.sigma * std
                    score = torch.where(ready, (v - mean) / std.clamp(min=1e-12), 0.0)
                else:
                    threshold = self.ratio * mean
                    score = torch.where(ready, v / mean.clamp(min=1e-12), 0.0)
                finite = torch.isfinite(v)
                spike = (~finite | (ready & (v > threshold))) & present[rule][i]
                nonfinite_level = _LEVEL[self.nonfinite_policy or policy]
                level = torch.where(finite, float(_LEVEL[policy]), float(nonfinite_level)) * spike.float()
                per_rule.append(torch.stack([v, threshold, score, spike.float(), level]))
                window.push(torch.where(present[rule][i], v, math.nan))  # a missing loss never enters
            out.append(torch.stack(per_rule))
        return out

    def _act(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        optimizer: Optimizer,
        action: str,
        step: int,
        epoch: int,
        batches: str,
        checked: Tensor,
    ) -> None:
        """Carry out ``action`` (skip/stop/rollback) for this step, on every rank (the decision is global)."""
        rows = checked.tolist()
        fired = [(rule, row) for rule, row in zip(self.policies, rows, strict=True) if row[3] > 0]
        what = "; ".join(f"{_SOURCE_KEY[r]}={row[0]:.6g}" + _why(row, self.rule) for r, row in fired)
        kinds = " and ".join(
            ("non-finite " if not math.isfinite(row[0]) else "") + r.replace("_", " ") for r, row in fired
        )
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            param.grad = None  # every policy here skips the step (see GradientNormMonitor._skip for why None)
        self.skipped_total += 1
        if action == "rollback":
            path = self._newest_checkpoint(trainer)
            if path is not None and self.rollbacks_total < self.max_rollbacks:
                self._rollback(trainer, pl_module, path)
                self.rollbacks_total += 1
                self.warn_once(
                    f"rollback-{self.rollbacks_total}",
                    f"{kinds} spike at step {step} (batch {batches} of epoch {epoch}): {what}. Rolled back to"
                    f" {path} ({self.rollbacks_total} of {self.max_rollbacks} rollbacks); training goes on with the"
                    " next batches.",
                )
                return
            action = "stop"
            why = "no checkpoint to roll back to" if path is None else f"after {self.max_rollbacks} rollbacks"
            what += f" ({why})"
        if action == "stop":
            kept = self._newest_checkpoint(trainer)
            self.stopped_reason = (
                f"{kinds} spike at step {step} (batch {batches} of epoch {epoch}): {what}. Training stopped before"
                " that optimizer step; "
                + (f"the last good checkpoint is kept: {kept}" if kept else "no checkpoint had been written yet")
            )
            trainer.should_stop = True
            # From now on nothing may replace the last good checkpoint with the state of a diverging run.
            self._unhold += [_compat.hold_checkpoint_saves(cb, lambda: True) for cb in trainer.checkpoint_callbacks]
            rank_zero_warn(f"{type(self).__name__}: {self.stopped_reason}")
            self._flush(trainer, stopped=True)
            return
        self.warn_once(
            "skip",
            f"{kinds} spike at step {step} (batch {batches} of epoch {epoch}): {what}; skipping that optimizer step"
            " (warned once; see stability/skipped_total and the stability/spikes table).",
        )

    @staticmethod
    def _newest_checkpoint(trainer: Trainer) -> str | None:
        saves = [s for cb in trainer.checkpoint_callbacks if (s := _compat.last_save(cb)) is not None]
        return max(saves)[1] if saves else None

    @staticmethod
    def _rollback(trainer: Trainer, pl_module: LightningModule, path: str) -> None:
        # Weights and optimizer states only: the data stream, step counter and LR schedule go on, so the batches that
        # led to the spike are not replayed.
        checkpoint = torch.load(path, map_location=pl_module.device, weights_only=False)
        pl_module.load_state_dict(checkpoint["state_dict"])
        for optimizer, state in zip(trainer.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            optimizer.load_state_dict(state)

    def _flush(self, trainer: Trainer, stopped: bool = False) -> None:
        """Check the pending steps ("log"), bring the window's results to the host in one transfer, and log."""
        if self._pending:
            raw = torch.stack([r for *_, r in self._pending])
            checked = self._check(trainer, raw)
            self._checked += [(s, e, b, c) for (s, e, b, _), c in zip(self._pending, checked, strict=True)]
            self._pending = []
        if not self._checked:
            return
        host = torch.stack([c for *_, c in self._checked]).cpu().tolist()  # the one transfer of the window
        new_rows: list[list[Any]] = []
        spikes_in_window = 0
        for (step, epoch, batches, _), per_rule in zip(self._checked, host, strict=True):
            fired = [(rule, row) for rule, row in zip(self.policies, per_rule, strict=True) if row[3] > 0]
            if not fired:
                continue
            spikes_in_window += 1
            self.last_spike_step = step
            if any(not math.isfinite(row[0]) for _, row in fired):
                self.nonfinite_total += 1
            for rule, row in fired:
                action = _POLICIES[int(row[4])]
                if action == "rollback" and stopped and step == self._checked[-1][0]:
                    action = "stop"
                value, threshold, score = (float(x) for x in row[:3])
                new_rows.append([step, epoch, batches, rule, value, threshold, score, action])
        self.spikes_total += spikes_in_window
        last_step = self._checked[-1][0]
        last = host[-1]
        self._checked = []
        metrics: dict[str, Any] = {
            "stability/spikes_count": float(spikes_in_window),
            "stability/spikes_total": float(self.spikes_total),
            "stability/nonfinite_total": float(self.nonfinite_total),
            "stability/skipped_total": float(self.skipped_total),
            "stability/rollbacks_total": float(self.rollbacks_total),
        }
        for rule, row in zip(self.policies, last, strict=True):
            metrics[f"stability/{rule}_score"] = row[2]
        if self.last_spike_step is not None:
            metrics["stability/last_spike_step"] = float(self.last_spike_step)
        if stopped:
            metrics["stability/stopped"] = 1.0
        self.log_metrics(trainer, metrics, step=last_step)
        if new_rows:
            self._rows += new_rows
            log_table(trainer, self.prefix + self.TABLE_KEY, SPIKE_COLUMNS, new_rows, last_step, all_rows=self._rows)


def _span(batches: list[int]) -> str:
    """Micro-batch indices of one optimizer step: ``"12"`` or ``"12-15"``."""
    if not batches:
        return ""
    return str(batches[0]) if len(batches) == 1 else f"{batches[0]}-{batches[-1]}"


def _why(row: list[float], rule: str) -> str:
    if not math.isfinite(row[0]):
        return ""
    return f" > {row[1]:.6g} ({'mean + sigma std' if rule == 'sigma' else 'ratio x mean'}, score {row[2]:.3g})"
