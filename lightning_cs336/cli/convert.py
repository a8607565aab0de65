"""``cs336 export-cs336`` / ``cs336 import-cs336``: convert between Lightning and CS336 checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cs336 export-cs336", description="Lightning .ckpt -> CS336 checkpoint.")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from lightning_cs336.cs336_format import export_cs336_checkpoint

    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
    print(export_cs336_checkpoint(args.ckpt, args.out))
    return 0


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cs336 import-cs336", description="CS336 checkpoint -> Lightning .ckpt.")
    parser.add_argument("--src", required=True, help="a torch.save'd {'model','optimizer','iteration'} file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-heads", type=int, required=True, help="not recoverable from shapes")
    parser.add_argument("--context-length", type=int, required=True)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    args = parser.parse_args(argv)
    from lightning_cs336.cs336_format import import_cs336_checkpoint

    if not Path(args.src).is_file():
        raise FileNotFoundError(f"CS336 checkpoint {args.src} does not exist")
    print(import_cs336_checkpoint(args.src, args.out, args.num_heads, args.context_length, args.rope_theta))
    return 0
