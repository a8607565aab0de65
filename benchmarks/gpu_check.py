"""The GPU check: one command, one table, under 8 minutes on one GPU.

For the CS336 17M config (``configs/tinystories-17m.yaml``: 4 layers, d_model 512, context 256, vocab 10,000, batch
256) and a GPT-2-small-sized config (12 layers, d_model 768, 12 heads, d_ff 2048, vocab 50,257, context 1024, batch
16; 124M parameters without the token-embedding table, whose lookup does no FLOPs), each trained in ``bf16-mixed``
with ``torch.compile`` and attention through ``F.scaled_dot_product_attention`` (flash kernel), on random tokens
already in pinned memory:

- tokens/s and MFU without the suite (the run record as the only logger) and with it (every callback class in
  ``lightning_cs336.callbacks.__all__`` plus ``LearningRateMonitor``), interleaved over ``--rounds`` rounds on the
  same compiled model, and the suite's overhead (median of the per-round ratios);
- host-device synchronisations on the steps that do not log, with the whole suite on: the steps run under
  ``torch.cuda.set_sync_debug_mode("warn")`` from the first ``on_train_batch_start`` hook to the module's
  ``on_train_batch_end``, and every "called a synchronizing CUDA operation" warning counts. Target: zero;
- the GPU smoke test (``tests/test_gpu_smoke.py``) as a last row.

Targets: MFU >= 40% for the 124M config on an H100/H200, suite overhead <= 1%, zero syncs.

Without CUDA it prints one line saying it skipped and exits 0.

    python benchmarks/gpu_check.py            # or: bash benchmarks/gpu_check.sh
    python benchmarks/gpu_check.py --quick    # a few steps per run (a check of the script, not a measurement)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The two configs measured: model fields (vocab and context included) and the batch size.
CONFIGS: dict[str, dict] = {
    "cs336-17m": {"model_file": "tinystories-17m.yaml", "overrides": {"vocab_size": 10_000}, "batch": 256},
    "gpt2-small-124m": {
        "model": dict(vocab_size=50_257, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=2048),
        "batch": 16,
    },
}
MFU_TARGET = 0.40
OVERHEAD_TARGET = 0.01


@dataclass
class Measurement:
    """What one config gives: tokens/s per round without and with the suite, and the sync count."""

    name: str
    params_m: float
    flops_per_token: float
    tokens_per_step: int
    without: list[float] = field(default_factory=list)
    with_suite: list[float] = field(default_factory=list)
    syncs: int | None = None
    quiet_steps: int = 0
    syncs_without: int | None = None  # the same count without the suite: what Lightning and the model do alone


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak; None without a known peak."""
    if not peak_flops:
        return None
    return tokens_per_sec * flops_per_token / peak_flops


def overhead(without: list[float], with_suite: list[float]) -> float:
    """The suite's cost as a fraction of throughput: 1 - median of the per-round ratios (with / without)."""
    return 1.0 - statistics.median(w / b for w, b in zip(with_suite, without, strict=True))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def build_table(rows: list[Measurement], peak_flops: float | None, device: str, smoke: str | None = None) -> str:
    """The one table (markdown), plus a verdict per target."""
    out = [
        f"GPU check on {device} (peak bf16 {peak_flops / 1e12:,.0f} TFLOP/s)"
        if peak_flops
        else f"GPU check on {device}",
        "",
        "| config | params | tokens/step | tokens/s without suite | MFU | tokens/s with suite | MFU | suite overhead"
        " | syncs on non-logging steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for m in rows:
        b, s = statistics.median(m.without), statistics.median(m.with_suite)
        ov = overhead(m.without, m.with_suite)
        mfu_b, mfu_s = mfu(b, m.flops_per_token, peak_flops), mfu(s, m.flops_per_token, peak_flops)
        syncs = "n/a" if m.syncs is None else f"{m.syncs} in {m.quiet_steps} steps"
        if m.syncs_without is not None:
            syncs += f" (without the suite: {m.syncs_without})"
        out.append(
            f"| {m.name} | {m.params_m:.1f}M | {m.tokens_per_step:,} | {b:,.0f} | {_pct(mfu_b)} | {s:,.0f} |"
            f" {_pct(mfu_s)} | {100 * ov:+.2f}% | {syncs} |"
        )
        verdicts.append(
            f"{m.name}: suite overhead {100 * ov:.2f}% ({'ok' if ov <= OVERHEAD_TARGET else 'MISSED'}"
            f" <= {100 * OVERHEAD_TARGET:.0f}%)"
        )
        if m.syncs is not None:
            verdicts.append(
                f"{m.name}: {m.syncs} syncs on non-logging steps ({'ok' if m.syncs == 0 else 'MISSED'} = 0)"
            )
        if "124m" in m.name and mfu_b is not None:
            verdicts.append(f"{m.name}: MFU {_pct(mfu_b)} ({'ok' if mfu_b >= MFU_TARGET else 'MISSED'} >= 40%)")
    if smoke is not None:
        out.append(f"| GPU smoke (tests/test_gpu_smoke.py) | {smoke} | | | | | | | |")
    return "\n".join(out + [""] + verdicts)


# ----------------------------------------------------------------------------------------------------------------------
# On the GPU


def _measure(name: str, spec: dict, args: argparse.Namespace) -> Measurement:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor
    from torch.utils.data import DataLoader, IterableDataset

    import lightning_cs336.callbacks as suite
    from lightning_cs336.callbacks import StepClock
    from lightning_cs336.model import ModelConfig
    from lightning_cs336.module import LanguageModel
    from lightning_cs336.record import RunRecord

    if "model_file" in spec:
        config = ModelConfig.from_config_file(ROOT / "configs" / spec["model_file"], **spec["overrides"])
    else:
        config = ModelConfig(**spec["model"])
    batch = spec["batch"]
    T = config.context_length

    class Batches(IterableDataset):
        """A pool of random batches in pinned memory, cycled: loading costs nothing measurable."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.pool = [
                torch.randint(0, config.vocab_size, (batch, T + 1), generator=g).pin_memory() for _ in range(8)
            ]

        def __iter__(self):
            i = 0
            while True:
                w = self.pool[i % len(self.pool)]
                i += 1
                yield w[:, :-1], w[:, 1:]

    class Window(Callback):
        """First callback: opens sync counting on non-logging steps (the module's on_train_batch_end closes it)."""

        def __init__(self) -> None:
            self.clock, self.counting, self.quiet_steps = StepClock(None), False, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                torch.cuda.synchronize()  # our clock's one sync, outside the counted window
                pl_module.t0 = time.perf_counter()
            self.counting = batch_idx >= args.warmup and not self.clock.is_logging_step(trainer)
            if self.counting:
                self.quiet_steps += 1
                torch.cuda.set_sync_debug_mode("warn")

    class TimedLM(LanguageModel):
        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode(0)
            if batch_idx + 1 == self.trainer.max_steps:
                torch.cuda.synchronize()
                self.t1 = time.perf_counter()

    torch.manual_seed(0)
    model = TimedLM(warmup_steps=10, compile=True, **config.to_dict())
    n_params = model.model.num_parameters(non_embedding=True)
    m = Measurement(name, n_params / 1e6, model.flops_per_token, batch * T)
    loader = DataLoader(Batches(), batch_size=None)
    steps = args.warmup + args.steps
    for r in range(args.rounds):
        for variant in ("without", "with") if r % 2 == 0 else ("with", "without"):
            callbacks: list = [Window()]
            if variant == "with":
                callbacks += [LearningRateMonitor(logging_interval="step")]
                for cls_name in suite.__all__:
                    cls = getattr(suite, cls_name)
                    if isinstance(cls, type) and issubclass(cls, Callback) and cls is not suite.TelemetryCallback:
                        callbacks.append(cls())
            trainer = L.Trainer(
                accelerator="gpu",
                devices=1,
                precision="bf16-mixed",
                max_steps=steps,
                log_every_n_steps=20,
                gradient_clip_val=1.0,
                logger=RunRecord(args.out, name=f"{name}-{variant}-{r}"),
                callbacks=callbacks,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.fit(model, loader)
            tps = args.steps * batch * T / (model.t1 - model.t0)
            (m.with_suite if variant == "with" else m.without).append(tps)
            found = [w for w in caught if "synchroniz" in str(w.message)]
            for w in found:
                print(f"  sync ({variant} suite): {w.filename}:{w.lineno}: {str(w.message)[:120]}", file=sys.stderr)
            if variant == "with":
                m.syncs = (m.syncs or 0) + len(found)
                m.quiet_steps += callbacks[0].quiet_steps
            else:
                m.syncs_without = (m.syncs_without or 0) + len(found)
            print(f"  {name} round {r + 1} {variant} suite: {tps:,.0f} tokens/s", file=sys.stderr, flush=True)
    return m


def _smoke() -> str:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu_smoke.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return f"{'passed' if proc.returncode == 0 else 'FAILED'}: {last} ({time.perf_counter() - start:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps per run (compilation, first logs)")
    parser.add_argument("--out", default=None, help="where the run records go (default: a temporary directory)")
    parser.add_argument("--no-smoke", action="store_true", help="skip tests/test_gpu_smoke.py")
    parser.add_argument("--quick", action="store_true", help="a few steps per run: checks the script, not the GPU")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        print(f"gpu_check: error: unknown config(s) {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine")
        return 0
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 5, 3
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.backends.cuda.matmul.allow_tf32 = True
    import tempfile

    from lightning_cs336.callbacks.peak_flops import lookup_peak_flops

    device = torch.cuda.get_device_name()
    peak = lookup_peak_flops(device, "bf16")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.out = args.out or tmp
        rows = [_measure(name, CONFIGS[name], args) for name in args.configs.split(",")]
    smoke = None if args.no_smoke else _smoke()
    print(build_table(rows, peak, device, smoke))
    print(f"\n(gpu_check took {time.perf_counter() - start:.0f} s; torch {torch.__version__})")
    failed = any(m.syncs for m in rows) or (smoke is not None and not smoke.startswith("passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
