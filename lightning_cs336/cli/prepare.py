"""``cs336 prepare``: tokenize text sources into a data directory for ``TokenDataModule``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from lightning_cs336.data import load_meta, prepare


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad option in one line, ``cs336: error: ... (see `PROG --help`)``, exit status 2.

    argparse's default prints the usage block first; the ``cs336`` commands all answer bad input with one line.
    """

    def error(self, message: str) -> NoReturn:
        print(f"cs336: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _parse_size(text: str) -> int:
    """Parse ``12345``, ``500K``, ``8M`` or ``1G`` (powers of 1000) into bytes, for ``--max-bytes``."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    s = text.strip().upper().removesuffix("B")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use a byte count like 8000000 or 8M") from None


def prepare_main(argv: list[str] | None = None) -> int:
    """Command line for ``cs336 prepare``: tokenize sources into a data directory.

    Args:
        argv: Arguments after ``prepare`` (defaults to ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a user error (the message is printed to stderr as one ``cs336: error: ...`` line).
    """
    parser = OneLineParser(
        prog="cs336 prepare",
        description="Tokenize text into train.bin/val.bin/tokenizer.json/meta.json for TokenDataModule.",
        epilog="examples:  cs336 prepare stdlib --out data/quickstart\n"
        "           cs336 prepare 'books/**/*.txt' notes/ --out data/books --vocab-size 8192",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="file, directory, glob pattern, 'stdlib', or 'hf:OWNER/NAME'"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe", help="tokenizer kind (default: bpe)")
    parser.add_argument("--vocab-size", type=int, default=2048, metavar="N", help="BPE vocabulary size (default: 2048)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.05, metavar="F", help="fraction of documents for val (default: 0.05)"
    )
    parser.add_argument(
        "--max-bytes", type=_parse_size, default=None, metavar="N", help="cap on text read, e.g. 8M (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad flags (2, usage already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        out = prepare(
            args.sources,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            max_bytes=args.max_bytes,
            seed=args.seed,
            show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"cs336: error: {e}", file=sys.stderr)
        return 2
    meta = load_meta(out)
    print(f"prepared {out} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {meta['dtype']})")
    print(f"  train: {meta['train_tokens']:>12,} tokens  {out / 'train.bin'}")
    print(f"  val:   {meta['val_tokens']:>12,} tokens  {out / 'val.bin'}")
    print(f"  tokenizer: {out / 'tokenizer.json'}")
    return 0
