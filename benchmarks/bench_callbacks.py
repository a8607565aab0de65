"""What does telemetry cost? Training tokens/s under three callback sets, on the quickstart model and a deep narrow
one, plus where the suite's per-step time goes (hook by hook: microseconds, tensor ops, host reads).

Configurations, all with the same W&B offline logger and the same model, data and Trainer settings:

- ``logger-only``: no callbacks (only ``train/loss`` logged by the module itself).
- ``suite``: every callback class exported by ``lightning_cs336.callbacks`` (so callbacks added later are included)
  with the settings of ``configs/callbacks/telemetry.yaml`` (histograms every 100 steps so that one falls inside the
  timed steps; one text prompt of 32 tokens every 500 steps), Lightning's ``LearningRateMonitor``, and the run record
  (``RunRecord``) as a second logger.
- ``builtin``: Lightning's built-in set — ``LearningRateMonitor``, ``DeviceStatsMonitor(cpu_stats=True)``,
  ``ThroughputMonitor`` and per-parameter ``grad_norm`` logged with ``self.log_dict`` every step (Lightning's
  documented recipe).

Each run times steps ``warmup..steps`` with its own clock (independent of the callbacks under test). After the
interleaved rounds, one more suite run measures every per-step hook with ``perf_counter`` (``HookMeter``), and a
short one counts the aten ops and host reads inside each hook (noise-free). Last, the gradient-norm pass is timed
against the gradient clipping the Trainer already does.

    python benchmarks/bench_callbacks.py --models quickstart --rounds 3 --steps 100   # or: make bench
    python benchmarks/bench_callbacks.py --models deep --rounds 3 --steps 100
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning as L  # noqa: E402
import torch  # noqa: E402
from _common import (
    MODELS,
    CpuClock,
    HookMeter,
    add_threads_arg,
    apply_threads,
    column,
    command_line,
    interleaved,
    machine_line,
    ratio_table,
)  # noqa: E402
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ThroughputMonitor  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

import lightning_cs336.callbacks as suite  # noqa: E402
from lightning_cs336.module import LanguageModel  # noqa: E402
from lightning_cs336.record import RunRecord  # noqa: E402


class RandomWindows(IterableDataset):
    """Endless random token windows: the data path costs the same in every configuration."""

    def __init__(self, vocab_size: int, context_length: int) -> None:
        self.vocab_size, self.context_length = vocab_size, context_length

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randint(0, self.vocab_size, (self.context_length + 1,), generator=g)
            yield x[:-1], x[1:]


class Tokenizer:
    """Enough of a tokenizer for TextSampleLogger (ids as text)."""

    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(c) % 2000) for c in text]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


class BuiltinGradNormLM(LanguageModel):
    """Lightning's documented recipe: per-parameter norms with ``self.log_dict`` in ``on_before_optimizer_step``."""

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


class Clock(L.Callback):
    """Wall and CPU time of training steps ``warmup..end`` (validation is off, so nothing else runs in between)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.clock = warmup, 0, CpuClock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps = batch_idx - self.warmup + 1
            self.clock.stop()


# Settings of configs/callbacks/telemetry.yaml, with the periodic ones moved so one falls inside the timed steps.
SUITE_KWARGS = {
    "GradientNormMonitor": dict(per_layer_depth=3),
    "TextSampleLogger": dict(log_every_n_steps=500, prompts=["def "], max_new_tokens=32),
    "HistogramLogger": dict(log_every_n_steps=100),
}


def suite_callbacks() -> list[L.Callback]:
    """Every callback class in ``lightning_cs336.callbacks.__all__`` plus Lightning's LearningRateMonitor."""
    out: list[L.Callback] = [LearningRateMonitor(logging_interval="step")]
    for name in suite.__all__:
        cls = getattr(suite, name)
        if inspect.isclass(cls) and issubclass(cls, L.Callback) and cls is not suite.TelemetryCallback:
            out.append(cls(**SUITE_KWARGS.get(name, {})))
    return out


def builtin_callbacks() -> list[L.Callback]:
    return [
        LearningRateMonitor(logging_interval="step"),
        DeviceStatsMonitor(cpu_stats=True),
        ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0], length_fn=lambda b: b[0].numel()),
    ]


def run_once(
    config: str, model: str, args: argparse.Namespace, root: Path, steps: int | None = None, meter: str = ""
) -> tuple[tuple[float, float], HookMeter | None, L.LightningModule]:
    """One fit; returns ((tokens per wall second, tokens per CPU second) over the timed steps, the hook meter if
    asked for, the module)."""
    torch.manual_seed(0)
    shape = MODELS[model]
    cls = BuiltinGradNormLM if config == "builtin" else LanguageModel
    module = cls(**shape, warmup_steps=10)
    module.tokenizer = Tokenizer()
    callbacks = {"logger-only": [], "suite": suite_callbacks(), "builtin": builtin_callbacks()}[config]
    hook_meter = HookMeter(callbacks, count_ops=meter == "ops") if meter else None
    clock = Clock(args.warmup)
    loggers: list = [WandbLogger(save_dir=str(root), project="bench", name=config)]
    if config == "suite":
        loggers.append(RunRecord(root, name=config))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps or args.steps,
        log_every_n_steps=args.log_every_n_steps,
        logger=loggers,
        callbacks=[*callbacks, clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(root),
    )
    loader = DataLoader(RandomWindows(shape["vocab_size"], shape["context_length"]), batch_size=args.batch_size)
    trainer.fit(module, loader)
    loggers[0].experiment.finish()
    tokens = clock.steps * args.batch_size * shape["context_length"]
    return (tokens / clock.clock.wall, tokens / clock.clock.cpu), hook_meter, module


def hook_table(timed: HookMeter, ops: HookMeter, step_ms: float, steps: int, log_every: int) -> str:
    """Per callback and hook: us per call on steps that do not log, ms per call on logging steps, ops and host
    reads per call (non-logging), and the per-step total against the step time."""
    lines = [
        "| callback | hook | non-logging: CPU-us per call | logging step: CPU-ms per call | ops per call (non-logging)"
        " | host reads per call (non-logging) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(c, h) for c, h, _ in timed.stats}, key=lambda k: -timed.stats.get((*k, False), [1, 0])[1])
    per_step_quiet = 0.0
    per_step_logging = 0.0
    per_cb: dict[str, float] = {}
    for cb, hook in keys:
        q = timed.stats.get((cb, hook, False), [0, 0.0, 0, 0])
        lg = timed.stats.get((cb, hook, True), [0, 0.0, 0, 0])
        oq = ops.stats.get((cb, hook, False), [0, 0.0, 0, 0])
        us = 1e6 * q[1] / q[0] if q[0] else 0.0
        ms = 1e3 * lg[1] / lg[0] if lg[0] else 0.0
        per_step_quiet += us * (q[0] / max(steps - steps // log_every, 1))
        per_step_logging += 1e3 * ms * (lg[0] / max(steps // log_every, 1))
        per_cb[cb] = per_cb.get(cb, 0.0) + us * (q[0] / max(steps - steps // log_every, 1))
        n_ops = oq[2] / oq[0] if oq[0] else 0.0
        reads = oq[3] / oq[0] if oq[0] else 0.0
        lines.append(f"| {cb} | {hook} | {us:,.1f} | {ms:,.2f} | {n_ops:,.0f} | {reads:.1f} |")
    amortised = per_step_quiet * (1 - 1 / log_every) + per_step_logging / log_every
    lines.append(
        f"\nPer-step hook time on a step that does not log: **{per_step_quiet / 1e3:.3f} ms** "
        f"({100 * per_step_quiet / 1e3 / step_ms:.2f}% of a {step_ms:.1f} CPU-ms step); on a logging step "
        f"{per_step_logging / 1e3:.2f} ms; amortised over log_every_n_steps={log_every}: "
        f"{amortised / 1e3:.3f} ms per step ({100 * amortised / 1e3 / step_ms:.2f}%)."
    )
    lines.append(
        "By callback (non-logging steps, us per step): "
        + ", ".join(f"{cb} {us:,.0f}" for cb, us in sorted(per_cb.items(), key=lambda kv: -kv[1]))
    )
    return "\n".join(lines)


def grad_norm_vs_clipping(module: LanguageModel, batch_size: int, repeats: int = 30) -> str:
    """Time the suite's gradient-norm pass (``torch._foreach_norm`` over every gradient, then the sum of squares)
    against the clipping the Trainer already does (``clip_grad_norm_``, which computes the same total norm)."""
    shape = module.config
    x = torch.randint(0, shape.vocab_size, (batch_size, shape.context_length))
    module.train()
    loss = torch.nn.functional.cross_entropy(module(x).flatten(0, 1), x.flatten())
    loss.backward()
    params = [p for p in module.parameters() if p.grad is not None]
    grads = [p.grad for p in params]

    def norm_pass() -> None:  # what GradientNormMonitor.on_before_optimizer_step does on every step
        torch.stack(torch._foreach_norm(grads, 2.0)).square().sum()

    def clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1e9)  # a huge max: measures the norm + (no-op) scale, not changing grads

    out = {}
    for name, fn in (("norm pass", norm_pass), ("clip_grad_norm_", clip)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        out[name] = 1e6 * statistics.median(times)
    n = sum(g.numel() for g in grads)
    return (
        f"Gradient-norm pass vs the Trainer's clipping, {len(grads)} gradients, {n / 1e6:.2f}M values (median of"
        f" {repeats}, CPU time): the suite's norm pass {out['norm pass']:,.0f} us,"
        f" `clip_grad_norm_` {out['clip_grad_norm_']:,.0f} us per step."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="quickstart", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-every-n-steps", type=int, default=10)
    parser.add_argument("--configs", default="logger-only,suite,builtin")
    parser.add_argument("--ops-steps", type=int, default=30, help="steps of the op-counting run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 12 steps, tiny profile")
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args)
    if args.quick:  # seconds: the tiny model, one round, a few steps (a smoke test of the script, not a measurement)
        args.models, args.batch_size = "tiny", 4
        args.rounds, args.steps, args.warmup, args.ops_steps, args.log_every_n_steps = 1, 8, 2, 4, 4
    configs = args.configs.split(",")
    print(machine_line())
    print(f"command: {command_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        os.environ.setdefault("WANDB_DATA_DIR", os.path.join(tmp, "data"))
        os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(tmp, "cache"))
        for model in args.models.split(","):
            results = interleaved(
                configs,
                args.rounds,
                lambda c, r, m=model: run_once(c, m, args, Path(tmp) / f"{m}-{c}-{r}")[0],
                label=model,
                unit="tokens/s",
            )
            print(
                f"\n### {model}: {MODELS[model]}, batch {args.batch_size} x {MODELS[model]['context_length']}, "
                f"{args.steps} steps ({args.warmup} untimed), log_every_n_steps={args.log_every_n_steps}, "
                f"{args.rounds} interleaved rounds\n"
            )
            print(ratio_table(column(results, 0), configs[0], "tokens/s"))
            print("\nThe same runs in tokens per CPU-second of the training process (descheduled time excluded):\n")
            print(ratio_table(column(results, 1), configs[0], "tokens/CPU-s"))
            if "suite" not in configs:
                continue
            (_, tps), timed, module = run_once("suite", model, args, Path(tmp) / f"{model}-timed", meter="time")
            _, ops, _ = run_once("suite", model, args, Path(tmp) / f"{model}-ops", steps=args.ops_steps, meter="ops")
            step_ms = 1e3 * args.batch_size * MODELS[model]["context_length"] / tps
            print(f"\nSuite hooks, one run of {args.steps} steps (times) and one of {args.ops_steps} (op counts):\n")
            print(hook_table(timed, ops, step_ms, args.steps, args.log_every_n_steps))
            print("\n" + grad_norm_vs_clipping(module, args.batch_size, repeats=5 if args.quick else 30))
            print(f"\nparameters: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M")


if __name__ == "__main__":
    main()
