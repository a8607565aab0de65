"""The framework floor: ``LanguageModel`` under the Lightning Trainer (no logger, no callbacks) against a plain PyTorch
loop of the same model, data, optimizer, schedule and gradient clipping.

Both sides build the model with the same seed, take the optimizer and the CS336 schedule from
``LanguageModel.configure_optimizers()`` (AdamW with the decay/no-decay groups, ``LambdaLR`` stepped every step),
clip the total gradient norm at 1.0 (``torch.nn.utils.clip_grad_norm_``, what the Trainer's ``gradient_clip_val``
calls) and read the same random windows (``RandomWindows``, batch 16 x 128) through a ``DataLoader``. They run
interleaved over several rounds; each times steps ``warmup..steps`` with ``perf_counter``.

The noise-free measure: aten ops per step on each side (a ``TorchDispatchMode`` over 5 steps, data loading
included on both sides; each op is at least one kernel launch on a GPU). Equal counts mean the Trainer adds only
Python bookkeeping, no tensor work.

    python benchmarks/bench_floor.py --rounds 5 --steps 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (
    MODELS,
    CpuClock,
    OpCounter,
    add_threads_arg,
    apply_threads,
    column,
    command_line,
    interleaved,
    machine_line,
    ratio_table,
)  # noqa: E402
from bench_callbacks import RandomWindows  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_cs336.module import LanguageModel  # noqa: E402


class _Clock(L.Callback):
    def __init__(self, warmup: int, counter: OpCounter | None = None) -> None:
        self.warmup, self.steps, self.clock = warmup, 0, CpuClock()
        self.counter, self._mode = counter, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.clock.start()
            if self.counter is not None:
                self._mode = self.counter.mode()
                self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps = batch_idx - self.warmup + 1
            self.clock.stop()
        if self._mode is not None and batch_idx + 1 >= trainer.max_steps:
            self._mode.__exit__(None, None, None)
            self._mode = None


def _module(shape: dict, steps: int) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(**shape, warmup_steps=min(10, steps), cosine_steps=steps)


def run_trainer(shape: dict, args: argparse.Namespace, counter: OpCounter | None = None) -> tuple[float, float]:
    module = _module(shape, args.steps)
    clock = _Clock(args.warmup, counter)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    loader = DataLoader(RandomWindows(shape["vocab_size"], shape["context_length"]), batch_size=args.batch_size)
    trainer.fit(module, loader)
    tokens = clock.steps * args.batch_size * shape["context_length"]
    return tokens / clock.clock.wall, tokens / clock.clock.cpu


def run_plain(shape: dict, args: argparse.Namespace, counter: OpCounter | None = None) -> tuple[float, float]:
    module = _module(shape, args.steps)
    # The same optimizer and schedule the Trainer gets (configure_optimizers reads no trainer state when
    # cosine_steps is given).
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    loader = DataLoader(RandomWindows(shape["vocab_size"], shape["context_length"]), batch_size=args.batch_size)
    module.train()
    params = list(module.parameters())
    clock = CpuClock()
    mode = None
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            clock.start()
            if counter is not None:
                mode = counter.mode()
                mode.__enter__()
        logits = module(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step + 1 >= args.steps:
            clock.stop()
            break
    if mode is not None:
        mode.__exit__(None, None, None)
    tokens = (args.steps - args.warmup) * args.batch_size * shape["context_length"]
    return tokens / clock.wall, tokens / clock.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="quickstart", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 1 round, a few steps")
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args)
    if args.quick:
        args.model, args.rounds, args.steps, args.warmup, args.batch_size = "tiny", 1, 6, 2, 4
    shape = MODELS[args.model]
    print(machine_line())
    print(f"command: {command_line()}")
    runs = {"plain loop": run_plain, "Trainer": run_trainer}
    results = interleaved(list(runs), args.rounds, lambda c, r: runs[c](shape, args), unit="tokens/s")
    print(
        f"\n{args.model}: {shape}, batch {args.batch_size} x {shape['context_length']}, AdamW + LambdaLR,"
        f" clip 1.0, {args.steps} steps ({args.warmup} untimed), {args.rounds} interleaved rounds\n"
    )
    print(ratio_table(column(results, 0), "plain loop", "tokens/s"))
    print("\nThe same runs in tokens per CPU-second of the process (descheduled time excluded):\n")
    print(ratio_table(column(results, 1), "plain loop", "tokens/CPU-s"))
    # Noise-free: aten ops per timed step on each side (short runs).
    count_args = argparse.Namespace(**{**vars(args), "steps": args.warmup + 5})
    ops = {}
    for name, fn in runs.items():
        counter = OpCounter()
        fn(shape, count_args, counter)
        ops[name] = counter.ops / 5
    print(
        f"\naten ops per training step (5 steps counted): plain loop {ops['plain loop']:,.0f}, Trainer"
        f" {ops['Trainer']:,.0f} ({ops['Trainer'] - ops['plain loop']:+,.0f}); host reads counted on either side:"
        " see tests/test_no_host_sync.py"
    )
    cpu = column(results, 1)
    step_ms = {k: 1e3 * args.batch_size * shape["context_length"] / statistics.median(v) for k, v in cpu.items()}
    print(
        f"median CPU time per step: plain loop {step_ms['plain loop']:.1f} ms, Trainer {step_ms['Trainer']:.1f} ms "
        f"(difference {step_ms['Trainer'] - step_ms['plain loop']:+.2f} ms)"
    )


if __name__ == "__main__":
    main()
