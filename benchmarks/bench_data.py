"""Data: ``cs336 prepare`` throughput (MB of text per second) and peak memory for the byte-level and BPE tokenizers
on corpora of 10 MB and 100 MB, and ``TokenDataModule`` batches per second against what the quickstart model
consumes.

The corpora are the Python standard library's ``.py`` sources (what ``cs336 prepare stdlib`` reads), repeated
until the size is reached, written as files of about 1 MB into a directory (each source file one document,
separated by ``<|endoftext|>``). Each ``cs336 prepare DIR`` runs as its
own process (the real command); its wall time and its peak resident memory (``ru_maxrss`` of that child, from
``os.wait4``) are measured. Peak memory should not grow with the corpus size.

The DataModule: the quickstart's batches (16 x 128 tokens, ``num_workers=0``) drawn from the prepared 10 MB BPE data
for a few seconds, against the training steps per second of the quickstart model (``--model-steps-per-sec``, or
measured here over a few steps of a plain loop).

    python benchmarks/bench_data.py --sizes 10,100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from _common import MODELS, command_line, machine_line  # noqa: E402

MB = 1_000_000
CS336 = [sys.executable, "-m", "lightning_cs336"]


def build_corpus(out: Path, size_mb: float) -> int:
    """Write the stdlib's .py sources, repeated, into ``out`` as ~1 MB files; returns bytes written."""
    from lightning_cs336.data.preparation import _stdlib_files
    from lightning_cs336.data.tokenizer import EOT

    texts = []
    for path in _stdlib_files():
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    out.mkdir(parents=True, exist_ok=True)
    target, written, part, buf, n = int(size_mb * MB), 0, 0, [], 0
    while written < target:
        for text in texts:
            data = text.encode("utf-8")
            buf.append(text + EOT)  # one document per source file, as `cs336 prepare stdlib` makes them
            n += len(data)
            written += len(data)
            if n >= MB or written >= target:
                (out / f"part{part:05d}.py").write_text("".join(buf), encoding="utf-8")
                part, buf, n = part + 1, [], 0
            if written >= target:
                break
    return written


def run_prepare(corpus: Path, out: Path, tokenizer: str, vocab_size: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one ``cs336 prepare`` process."""
    cmd = [*CS336, "prepare", str(corpus), "--out", str(out), "--tokenizer", tokenizer]
    if tokenizer == "bpe":
        cmd += ["--vocab-size", str(vocab_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_data: error: {' '.join(cmd)} failed: {proc.stderr.read().decode()[-500:]}")
    return elapsed, usage.ru_maxrss / 1024  # Linux: kilobytes


def startup_seconds() -> float:
    """Wall time of ``cs336 prepare --help``: the fixed cost of starting the command (imports), in every row."""
    start = time.perf_counter()
    subprocess.run([*CS336, "prepare", "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def loader_batches_per_sec(data_dir: Path, seconds: float) -> float:
    from lightning_cs336.data import TokenDataModule

    dm = TokenDataModule(data_dir=str(data_dir), batch_size=16, context_length=128, num_workers=0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    return n / (time.perf_counter() - start)


def model_steps_per_sec(steps: int = 8) -> float:
    """Training steps/s of the quickstart model in a plain loop (forward, backward, AdamW), random data."""
    from lightning_cs336.module import LanguageModel

    torch.manual_seed(0)
    shape = MODELS["quickstart"]
    model = LanguageModel(**shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, shape["vocab_size"], (16, 128))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return 1.0 / times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100", help="corpus sizes in MB")
    parser.add_argument("--tokenizers", default="byte,bpe")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a 1 MB corpus, byte-level only")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.tokenizers, args.loader_seconds = "1", "byte", 0.5
    print(machine_line())
    print(f"command: {command_line()}\n")
    startup = startup_seconds()
    print(f"start-up of the command (`cs336 prepare --help`): {startup:.1f} s, included in wall s\n")
    print("| tokenizer | corpus | wall s | MB/s | MB/s without start-up | peak RSS MiB | tokens (train + val) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    peaks: dict[str, list[tuple[float, float]]] = {}
    prepared: Path | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(float, args.sizes.split(",")):
            corpus = Path(tmp) / f"corpus{size:g}"
            nbytes = build_corpus(corpus, size)
            for tokenizer in args.tokenizers.split(","):
                out = Path(tmp) / f"out-{tokenizer}-{size:g}"
                seconds, peak = run_prepare(corpus, out, tokenizer, args.vocab_size)
                meta = json.loads((out / "meta.json").read_text())
                tokens = meta["train_tokens"] + meta["val_tokens"]
                peaks.setdefault(tokenizer, []).append((nbytes / MB, peak))
                print(
                    f"| {tokenizer} | {nbytes / MB:,.0f} MB | {seconds:,.1f} | {nbytes / MB / seconds:,.2f} |"
                    f" {nbytes / MB / max(seconds - startup, 1e-3):,.2f} | {peak:,.0f} | {tokens:,} |",
                    flush=True,
                )
                if prepared is None or tokenizer == "bpe":
                    prepared = out
            shutil.rmtree(corpus)
        for tokenizer, rows in peaks.items():
            if len(rows) > 1:
                (s0, p0), (s1, p1) = rows[0], rows[-1]
                print(
                    f"\n{tokenizer}: peak RSS {p0:,.0f} -> {p1:,.0f} MiB for {s0:,.0f} -> {s1:,.0f} MB of text "
                    f"(+{(p1 - p0) / (s1 - s0):.2f} MiB per MB)"
                )
        assert prepared is not None
        bps = loader_batches_per_sec(prepared, args.loader_seconds)
        sps = model_steps_per_sec(4 if args.quick else 8)
        print(
            f"\nTokenDataModule ({prepared.name}, batch 16 x 128, num_workers=0): {bps:,.0f} batches/s; the quickstart"
            f" model trains at {sps:,.1f} steps/s here, so the loader could feed it {bps / sps:,.0f}x over "
            f"(loading is {100 * sps / bps:.2f}% of a step)."
        )


if __name__ == "__main__":
    main()
