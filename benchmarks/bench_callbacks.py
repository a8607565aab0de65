"""What does telemetry cost? Training tokens/s of the quickstart model under three callback sets.

Configurations, all with the same logger (W&B offline) and the same model, data and Trainer settings:

- ``logger-only``: no callbacks (only ``train/loss`` logged by the module itself).
- ``suite``: lightning-cs336's full suite as in ``configs/callbacks/telemetry.yaml`` (gradient norms, memory, speed,
  run info, text samples, histograms, checkpoint artifacts) plus Lightning's ``LearningRateMonitor``.
- ``builtin``: Lightning's built-in set — ``LearningRateMonitor``, ``DeviceStatsMonitor(cpu_stats=True)``,
  ``ThroughputMonitor`` and per-parameter ``grad_norm`` logged with ``self.log_dict`` every step (Lightning's
  documented recipe).

The configurations run interleaved over several rounds (so drift of the machine hits all of them alike); each run
times steps ``warmup..max_steps`` with its own clock, independent of the callbacks under test. Results: medians and
ratios to ``logger-only`` measured in the same invocation.

    python benchmarks/bench_callbacks.py --rounds 6 --steps 120   # or: make bench
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ThroughputMonitor  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from lightning_cs336.callbacks import (  # noqa: E402
    CheckpointArtifactLogger,
    GradientNormMonitor,
    HistogramLogger,
    MemoryMonitor,
    RunInfoLogger,
    SpeedMonitor,
    TextSampleLogger,
)
from lightning_cs336.module import LanguageModel  # noqa: E402

QUICKSTART = dict(vocab_size=2048, context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=344)


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
    """Wall time of training steps ``warmup..end`` (validation is off, so nothing else runs in between)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps, self.end = warmup, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps = batch_idx - self.warmup + 1
            self.end = time.perf_counter()


def suite_callbacks() -> list[L.Callback]:
    """The suite with the settings of configs/callbacks/telemetry.yaml."""
    return [
        LearningRateMonitor(logging_interval="step"),
        GradientNormMonitor(per_layer_depth=3),
        MemoryMonitor(),
        SpeedMonitor(),
        RunInfoLogger(),
        TextSampleLogger(log_every_n_steps=500, prompts=["def "], max_new_tokens=32),
        HistogramLogger(log_every_n_steps=100),
        CheckpointArtifactLogger(),
    ]


def builtin_callbacks(batch_size: int, context_length: int) -> list[L.Callback]:
    return [
        LearningRateMonitor(logging_interval="step"),
        DeviceStatsMonitor(cpu_stats=True),
        ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0], length_fn=lambda b: b[0].numel()),
    ]


def run_once(config: str, args: argparse.Namespace, root: Path, profiler=None) -> float:
    torch.manual_seed(0)
    cls = BuiltinGradNormLM if config == "builtin" else LanguageModel
    module = cls(**QUICKSTART, warmup_steps=10)
    module.tokenizer = Tokenizer()
    callbacks: list[L.Callback] = {
        "logger-only": [],
        "suite": suite_callbacks(),
        "builtin": builtin_callbacks(args.batch_size, QUICKSTART["context_length"]),
    }[config]
    clock = Clock(args.warmup)
    logger = WandbLogger(save_dir=str(root), project="bench", name=config)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        log_every_n_steps=args.log_every_n_steps,
        logger=logger,
        callbacks=[*callbacks, clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(root),
        profiler=profiler,
    )
    loader = DataLoader(
        RandomWindows(QUICKSTART["vocab_size"], QUICKSTART["context_length"]), batch_size=args.batch_size
    )
    trainer.fit(module, loader)
    logger.experiment.finish()
    return clock.steps * args.batch_size * QUICKSTART["context_length"] / (clock.end - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-every-n-steps", type=int, default=10)
    parser.add_argument("--configs", default="logger-only,suite,builtin")
    args = parser.parse_args()
    configs = args.configs.split(",")
    results: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        os.environ.setdefault("WANDB_DATA_DIR", os.path.join(tmp, "data"))
        os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(tmp, "cache"))
        for r in range(args.rounds):
            # Rotate the order each round so no configuration always runs first (or after the same one).
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                tps = run_once(config, args, Path(tmp) / f"{config}-{r}")
                results[config].append(tps)
                print(f"round {r + 1}/{args.rounds}  {config:12s} {tps:10.0f} tokens/s", file=sys.stderr, flush=True)
    # Where the suite's time goes, independent of machine noise: Lightning's SimpleProfiler times every callback hook.
    from lightning.pytorch.profilers import SimpleProfiler

    hook_ms: dict[str, float] = {}  # per-step hooks: ms per training step
    once_s: dict[str, float] = {}  # setup / fit start / train end / validation hooks: seconds per run
    step_ms = float("nan")
    per_step_hooks = (
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_optimizer_step",
        "on_before_backward",
        "on_after_backward",
        "on_before_zero_grad",
    )
    if "suite" in configs:
        with tempfile.TemporaryDirectory() as tmp:
            profiler = SimpleProfiler()
            run_once("suite", args, Path(tmp), profiler=profiler)
            durations = profiler.recorded_durations
            step_ms = 1e3 * statistics.fmean(durations["run_training_batch"])
            for key, values in durations.items():
                if key.startswith("[Callback]") and "Clock" not in key:
                    name, _, hook = key.removeprefix("[Callback]").partition(".")
                    name = name.split("{")[0]
                    if hook in per_step_hooks:
                        hook_ms[name] = hook_ms.get(name, 0.0) + 1e3 * sum(values) / args.steps
                    else:
                        once_s[name] = once_s.get(name, 0.0) + sum(values)
    base = statistics.median(results[configs[0]])
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), lightning {L.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"Model: quickstart LM {QUICKSTART}, batch {args.batch_size} x {QUICKSTART['context_length']} tokens, "
        f"{args.steps} steps ({args.warmup} untimed), log_every_n_steps={args.log_every_n_steps}, "
        f"{args.rounds} interleaved rounds\n"
    )
    print("| configuration | median tokens/s | min | max | median / logger-only | median of per-round ratios |")
    print("|---|---:|---:|---:|---:|---:|")
    for config in configs:
        values = results[config]
        med = statistics.median(values)
        paired = statistics.median(v / b for v, b in zip(values, results[configs[0]], strict=True))
        print(
            f"| {config} | {med:,.0f} | {min(values):,.0f} | {max(values):,.0f} | "
            f"{med / base:.3f} ({(med / base - 1) * 100:+.1f}%) | {paired:.3f} ({(paired - 1) * 100:+.1f}%) |"
        )
    if hook_ms:
        total = sum(hook_ms.values())
        print(
            f"\nSuite hook time per training step (SimpleProfiler, one run of {args.steps} steps; mean training "
            f"batch {step_ms:.1f} ms):\n"
        )
        print("| callback | per-step hooks, ms per step | % of a training batch | other hooks, s per run |")
        print("|---|---:|---:|---:|")
        for name, ms in sorted(hook_ms.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {ms:.3f} | {100 * ms / step_ms:.2f}% | {once_s.get(name, 0.0):.3f} |")
        print(f"| **all** | {total:.3f} | {100 * total / step_ms:.2f}% | {sum(once_s.values()):.3f} |")


if __name__ == "__main__":
    main()
