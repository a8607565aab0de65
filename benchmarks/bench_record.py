"""Cost of the local run record (``RunRecord``): time per ``log_metrics`` call and per logging step, measured in
the logger itself (a noise-free figure next to the suite's throughput benchmark).

    python benchmarks/bench_record.py [--keys 40] [--calls 2000]

A logging step of the whole suite makes about 5 ``log_metrics`` calls (Lightning's own ``self.log`` values, then one
per callback) with ~40 keys in all; the record writes and flushes one JSON line per call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from lightning_cs336.record import RunRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=40, help="metrics per logging step")
    parser.add_argument("--calls", type=int, default=2000, help="log_metrics calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per_call = max(args.keys // 5, 1)
    rows = [{f"family{c}/metric{i}": float(i) * 1.5 for i in range(per_call)} for c in range(5)]
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            record = RunRecord(tmp, name=f"bench{r}")
            record.log_metrics({"warm": 0.0}, step=0)
            start = time.perf_counter()
            for call in range(args.calls):
                record.log_metrics(rows[call % 5], step=call // 5)
            timings.append((time.perf_counter() - start) / args.calls)
            record.finalize("success")
    med = statistics.median(timings)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    print(
        f"RunRecord.log_metrics: median {med * 1e6:.1f} us per call ({per_call} keys), "
        f"spread {min(timings) * 1e6:.1f}-{max(timings) * 1e6:.1f} us over {args.rounds} rounds"
    )
    print(f"per logging step (5 calls, {args.keys} keys): {5 * med * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
