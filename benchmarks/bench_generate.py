"""Generation: KV-cache sampling against re-running the whole prefix each token (``TransformerLM.generate`` with
``use_cache=True`` / ``False``), new tokens per second at 64, 256 and the full context, batch 1 and 8.

The model is the quickstart architecture (4 layers, d_model 128, vocab 2048) built with ``context_length=512`` so
that 256 new tokens fit (the quickstart trains at 128; the context length changes no parameter, only the RoPE table
and the window); ``--context`` changes it. Weights are the random initialisation (speed does not depend on them),
prompts are 1 token, sampling at temperature 0.8 and top-p 0.95 as ``TextSampleLogger`` does, no EOS, so every row
generates exactly the requested tokens. The two modes run interleaved per length, several rounds.

Noise-free measure: positions computed by the transformer. With the cache every forward computes only the new
position (``prompt + new`` positions in all); without it, step ``t`` recomputes all ``prompt + t`` positions
(``sum_t (prompt + t)``), so the work ratio is about ``(n + 1) / 2`` at ``n`` new tokens. The wall-clock ratio falls
short of it where per-token fixed costs (Python, sampling, small-matrix kernels) dominate a one-position forward.

    python benchmarks/bench_generate.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from _common import MODELS, add_threads_arg, apply_threads, command_line, machine_line  # noqa: E402

from lightning_cs336.model import ModelConfig, TransformerLM  # noqa: E402


def tokens_per_sec(model: TransformerLM, batch: int, new: int, use_cache: bool, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.ones(batch, 1, dtype=torch.long)
    start = time.perf_counter()
    out = model.generate(prompt, new, temperature=0.8, top_p=0.95, generator=g, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    assert all(len(row) == new for row in out), "a row stopped early"
    return batch * new / elapsed


def positions(new: int, prompt: int = 1, use_cache: bool = True) -> int:
    """Transformer positions computed to generate ``new`` tokens after a ``prompt``-token prompt."""
    return prompt + new - 1 if use_cache else sum(prompt + t for t in range(new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--lengths", default="64,256,full", help="new tokens; 'full' = context - 1 (1-token prompt)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, short lengths, 1 round")
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args)
    shape = dict(MODELS["quickstart"])
    if args.quick:
        shape, args.context, args.lengths, args.batches, args.rounds = dict(MODELS["tiny"]), 32, "8,full", "1,2", 1
    shape["context_length"] = args.context
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**shape)).eval()
    print(machine_line())
    print(f"command: {command_line()}")
    print(f"\nmodel: {shape} ({model.num_parameters() / 1e6:.2f}M parameters), 1-token prompt, T=0.8, top-p 0.95\n")
    print(
        "| new tokens | batch | KV cache, tokens/s | re-run prefix, tokens/s | speed-up (median of rounds, min-max)"
        " | positions computed: cache / re-run | work ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    tokens_per_sec(model, 1, 4, True, 0)  # warm-up
    for length in args.lengths.split(","):
        new = args.context - 1 if length == "full" else int(length)
        for batch in map(int, args.batches.split(",")):
            cached, rerun, ratios = [], [], []
            for r in range(args.rounds):
                pair = []
                # Alternate which mode goes first, so drift of a shared machine does not favour one.
                for use_cache in (True, False) if r % 2 == 0 else (False, True):
                    pair.append((use_cache, tokens_per_sec(model, batch, new, use_cache, seed=r)))
                c = dict(pair)[True]
                n = dict(pair)[False]
                cached.append(c)
                rerun.append(n)
                ratios.append(c / n)
                print(f"  {new} tokens, batch {batch}, round {r + 1}: {c:,.0f} vs {n:,.0f}", file=sys.stderr)
            pc, pn = positions(new), positions(new, use_cache=False)
            print(
                f"| {new}{' (full)' if length == 'full' else ''} | {batch} | {statistics.median(cached):,.0f} | "
                f"{statistics.median(rerun):,.0f} | **{statistics.median(ratios):.1f}x** "
                f"({min(ratios):.1f}-{max(ratios):.1f}) | {pc:,} / {pn:,} | {pn / pc:.0f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
