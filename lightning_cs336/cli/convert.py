"""``cs336 export-cs336`` / ``cs336 import-cs336``: convert between Lightning and CS336 checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_cs336.cli.prepare import OneLineParser


def export_main(argv: list[str]) -> int:
    """``cs336 export-cs336``: a Lightning ``.ckpt`` of ``cs336 fit`` -> a CS336 ``{model, optimizer, iteration}``."""
    parser = OneLineParser(prog="cs336 export-cs336", description="Lightning .ckpt -> CS336 checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a .ckpt written by `cs336 fit`")
    parser.add_argument(
        "--out", required=True, help="the CS336 file to write (torch.save of model/optimizer/iteration)"
    )
    args = parser.parse_args(argv)
    from lightning_cs336.cs336_format import export_cs336_checkpoint

    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist: pass a .ckpt written by `cs336 fit`")
    print(export_cs336_checkpoint(args.ckpt, args.out))
    return 0


def import_main(argv: list[str]) -> int:
    """``cs336 import-cs336``: a CS336 checkpoint (+ the tokenizer of its data) -> a Lightning ``.ckpt``."""
    parser = OneLineParser(
        prog="cs336 import-cs336",
        description="CS336 checkpoint -> Lightning .ckpt, usable by `cs336 generate --ckpt` and `cs336 export-cs336`. "
        "Pass the tokenizer of the model's training data (--tokenizer or --data-dir) to store it in the checkpoint; "
        "without one, `cs336 generate` needs --tokenizer each time.",
    )
    parser.add_argument("--src", required=True, help="a torch.save'd {'model','optimizer','iteration'} file")
    parser.add_argument("--out", required=True, help="the Lightning .ckpt to write")
    parser.add_argument("--num-heads", type=int, required=True, help="attention heads (not recoverable from shapes)")
    parser.add_argument("--context-length", type=int, required=True, help="the model's context length")
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base (default: 10000)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="the tokenizer to store: a tokenizer.json, or a data directory written by `cs336 prepare`",
    )
    source.add_argument("--data-dir", metavar="DIR", help="a data directory written by `cs336 prepare`: its tokenizer")
    args = parser.parse_args(argv)
    from lightning_cs336.cs336_format import import_cs336_checkpoint
    from lightning_cs336.data import Tokenizer

    if not Path(args.src).is_file():
        raise FileNotFoundError(f"CS336 checkpoint {args.src} does not exist")
    where = args.tokenizer or args.data_dir
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise NotADirectoryError(f"--data-dir {args.data_dir} is not a directory: pass one written by `cs336 prepare`")
    # Read before converting: a wrong tokenizer path must not cost a conversion, nor leave a checkpoint behind.
    tokenizer = Tokenizer.from_path(where) if where is not None else None
    out = import_cs336_checkpoint(
        args.src, args.out, args.num_heads, args.context_length, args.rope_theta, tokenizer=tokenizer
    )
    print(out)
    if tokenizer is None:
        print(
            f"cs336: note: {out} holds no tokenizer, so `cs336 generate` will need --tokenizer DATA_DIR; "
            "re-run import-cs336 with --tokenizer (or --data-dir) to store it",
            file=sys.stderr,
        )
    return 0
