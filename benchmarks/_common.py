"""Shared pieces of the benchmarks: quiet offline W&B, the machine line, interleaved rounds, medians and spreads,
the models measured, and a per-hook meter (time, tensor ops and host reads inside each callback hook).

Every comparison in ``benchmarks/`` is a ratio measured in one invocation: configurations run interleaved (the order
rotates each round, so drift of a shared machine hits all of them alike), and the tables show the median, the
spread (min-max) and the median of per-round ratios.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

QUIET_WANDB = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_X_DISABLE_STATS": "true",
    "WANDB_X_DISABLE_META": "true",
    "WANDB_X_SAVE_REQUIREMENTS": "false",
    "WANDB_ERROR_REPORTING": "false",
}
for _key, _value in QUIET_WANDB.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

#: The quickstart model (configs/quickstart.yaml) and a deep narrow one where per-layer keys multiply.
MODELS: dict[str, dict[str, int]] = {
    "quickstart": dict(vocab_size=2048, context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=344),
    "deep": dict(vocab_size=2048, context_length=128, d_model=64, num_layers=24, num_heads=4, d_ff=176),
    "tiny": dict(vocab_size=257, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64),  # --quick only
}


def add_threads_arg(parser: Any) -> None:
    """``--threads N``: torch's intra-op threads (default: torch's own choice). On a machine shared with other
    work, 1 thread avoids the stalls of a parallel region waiting for a descheduled thread."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def apply_threads(args: Any) -> None:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def machine_line() -> str:
    """Machine, load and versions, for the header of every result."""
    import lightning

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {os.cpu_count()} cores, load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
        + f"; python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads),"
        + f" lightning {lightning.__version__}"
        + ("" if not torch.cuda.is_available() else f", {torch.cuda.get_device_name()}")
    )


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def interleaved(
    configs: Sequence[str], rounds: int, run: Callable[[str, int], Any], label: str = "", unit: str = ""
) -> dict[str, list[Any]]:
    """Run every configuration once per round, rotating the order each round; returns the values per config (what
    ``run`` returns: a number, or a tuple of numbers whose first is printed)."""
    results: dict[str, list[Any]] = {c: [] for c in configs}
    for r in range(rounds):
        order = list(configs[r % len(configs) :]) + list(configs[: r % len(configs)])
        for config in order:
            value = run(config, r)
            results[config].append(value)
            shown = value[0] if isinstance(value, tuple) else value
            print(f"  round {r + 1}/{rounds} {label} {config:14s} {shown:12,.1f} {unit}", file=sys.stderr, flush=True)
    return results


def column(results: dict[str, list[tuple]], i: int) -> dict[str, list[float]]:
    """The ``i``-th member of every tuple result, per configuration."""
    return {c: [v[i] for v in values] for c, values in results.items()}


class CpuClock:
    """Wall time and CPU time of this process (all its threads) between ``start()`` and ``stop()``. On a loaded
    machine CPU time is the steadier measure: time spent descheduled does not count."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._w = self._c = 0.0

    def start(self) -> None:
        self._w, self._c = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def ratio_table(results: dict[str, list[float]], base: str, unit: str, higher_is_better: bool = True) -> str:
    """Markdown: median, min, max per configuration, and its ratio to ``base`` (of medians, and median of the
    per-round ratios)."""
    lines = [
        f"| configuration | median {unit} | min | max | median / {base} | median of per-round ratios | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    b = statistics.median(results[base])
    for config, values in results.items():
        med = statistics.median(values)
        paired = statistics.median(v / w for v, w in zip(values, results[base], strict=True))
        lines.append(
            f"| {config} | {med:,.1f} | {min(values):,.1f} | {max(values):,.1f} | {med / b:.3f} "
            f"({(med / b - 1) * 100:+.1f}%) | {paired:.3f} ({(paired - 1) * 100:+.1f}%) | {len(values)} |"
        )
    return "\n".join(lines)


def spread(values: Iterable[float]) -> str:
    values = list(values)
    return f"{statistics.median(values):,.2f} ({min(values):,.2f}-{max(values):,.2f})"


# ------------------------------------------------------------------------------------------------------------------
# Counting what happens inside hooks


class OpCounter:
    """Counts aten ops (each one kernel launch on a GPU, or more) and host reads (``aten._local_scalar_dense``:
    item/float/int/bool) while active. A ``TorchDispatchMode``, entered around single hook calls only."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.reads += 1
                return func(*args, **(kwargs or {}))

        self.ops = 0
        self.reads = 0
        self._mode_cls = _Mode

    def mode(self) -> Any:
        return self._mode_cls()


PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class HookMeter:
    """Wraps every per-step hook of the given callbacks; per (callback, hook, logging step or not) it records calls,
    seconds inside the hook and, with ``count_ops``, aten ops and host reads. Seconds are this thread's CPU time
    (``time.thread_time``), not wall time, so that time spent descheduled on a shared machine does not count (with
    ``--threads 1`` torch's work runs in this thread).

    Logging steps are told apart with the suite's own clock (``StepClock`` at the Trainer's interval)."""

    def __init__(self, callbacks: Sequence[Any], count_ops: bool = False) -> None:
        from lightning_cs336.callbacks import StepClock

        self.clock = StepClock(None)
        self.count_ops = count_ops
        # (callback, hook, logging) -> [calls, seconds, ops, reads]
        self.stats: dict[tuple[str, str, bool], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
        for cb in callbacks:
            name = type(cb).__name__
            for hook in PER_STEP_HOOKS:
                method = getattr(cb, hook, None)
                if method is None or getattr(type(cb), hook, None) is getattr(
                    __import__("lightning").pytorch.Callback, hook
                ):
                    continue  # not overridden: Lightning's no-op
                setattr(cb, hook, self._wrap(name, hook, method))

    def _wrap(self, name: str, hook: str, method: Callable) -> Callable:
        params = list(inspect.signature(method).parameters)
        trainer_pos = params.index("trainer") if "trainer" in params else 0

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            trainer = kwargs.get("trainer", args[trainer_pos] if len(args) > trainer_pos else None)
            logging = bool(trainer is not None and self.clock.is_logging_step(trainer))
            row = self.stats[(name, hook, logging)]
            counter = OpCounter() if self.count_ops else None
            start = time.thread_time()
            if counter is not None:
                with counter.mode():
                    out = method(*args, **kwargs)
            else:
                out = method(*args, **kwargs)
            row[1] += time.thread_time() - start
            row[0] += 1
            if counter is not None:
                row[2] += counter.ops
                row[3] += counter.reads
            return out

        return wrapper
