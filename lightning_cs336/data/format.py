"""The on-disk format of a prepared data directory (``format_version`` 1), and reading it.

* ``train.bin`` / ``val.bin``: raw numpy token arrays (``uint16`` when the vocabulary fits, else ``uint32``), documents
  joined by ``<|endoftext|>`` with no header, so ``np.memmap`` reads them with zero parsing;
* ``tokenizer.json``: the Hugging Face ``tokenizers`` serialization of the tokenizer that produced them;
* ``meta.json``: vocabulary size, dtype, end-of-text id, token counts, tokenizer kind and sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT_VERSION = 1
"""Version of the ``meta.json`` / ``.bin`` layout written by :func:`prepare`."""

_META_KEYS = ("vocab_size", "dtype", "eot_id", "train_tokens", "val_tokens", "tokenizer", "sources", "format_version")
_DTYPES = ("uint16", "uint32")


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def _prepare_hint(data_dir: Path) -> str:
    return f"run `cs336 prepare SOURCES... --out {data_dir}` first (e.g. `cs336 prepare stdlib --out {data_dir}`)"


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a directory written by :func:`prepare`.

    Also checks that ``train.bin`` and ``val.bin`` exist and hold the number of tokens ``meta.json`` records (a
    ``stat`` each), so a broken directory is reported before anything is built on it.

    Raises:
        FileNotFoundError: The directory, its ``meta.json`` or a split's ``.bin`` is missing.
        ValueError: ``meta.json`` is malformed, inconsistent or from an unsupported format version, or a ``.bin`` is
            empty, truncated or of another length than recorded.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {d} does not exist; {_prepare_hint(d)}")
    path = d / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {_prepare_hint(d)}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `cs336 prepare ... --out {d}`") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object; re-run `cs336 prepare ... --out {d}`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}; "
            f"re-run `cs336 prepare ... --out {d}`"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks keys {missing}; re-run `cs336 prepare ... --out {d}`")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{path} has dtype {meta['dtype']!r}, expected one of {_DTYPES}; re-run `cs336 prepare`")
    _check_meta_values(meta, path, d)
    # The splits prepare() wrote must be whole: checked here (a stat each) so that a missing, empty or cut-short
    # .bin is found when the datamodule is built, before any Trainer, logger or run directory exists.
    for split in ("train", "val"):
        _check_bin(d / f"{split}.bin", np.dtype(meta["dtype"]), d, split, expected=meta[f"{split}_tokens"])
    return meta


def _check_meta_values(meta: dict[str, Any], path: Path, d: Path) -> None:
    """Types and consistency of meta.json's numbers (an edited or mixed-up file, not only a malformed one)."""
    redo = f"re-run `cs336 prepare ... --out {d}`"
    for key in ("vocab_size", "eot_id", "train_tokens", "val_tokens"):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path} has {key}={value!r}, expected a non-negative integer; {redo}")
    if meta["vocab_size"] < 1 or meta["eot_id"] >= meta["vocab_size"]:
        raise ValueError(
            f"{path} has eot_id={meta['eot_id']} but vocab_size={meta['vocab_size']}: every token id must be below "
            f"vocab_size, so the file does not belong to this data; {redo}"
        )
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 65536:
        raise ValueError(f"{path} has vocab_size={meta['vocab_size']}, too large for dtype uint16; {redo}")


def _check_bin(path: Path, dtype: np.dtype, d: Path, split: str, expected: int | None = None) -> None:
    """``path`` exists, is non-empty, a whole number of tokens, and (``expected``) as long as meta.json says."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; re-run `cs336 prepare ... --out {d}` to write the {split} split")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty; re-run `cs336 prepare` with more text")
    if size % dtype.itemsize:
        raise ValueError(
            f"{path} is {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}): it is truncated or corrupt; "
            f"re-run `cs336 prepare ... --out {d}`"
        )
    if expected is not None and size // dtype.itemsize != expected:
        raise ValueError(
            f"{path} holds {size // dtype.itemsize} tokens but {d / 'meta.json'} records {expected}: it is truncated "
            f"or from another `cs336 prepare`; re-run `cs336 prepare ... --out {d}`"
        )


def load_tokens(data_dir: str | Path, split: str, *, meta: dict[str, Any] | None = None) -> np.memmap:
    """Memory-map ``{split}.bin`` of a prepared directory, read-only.

    Args:
        data_dir: Directory written by :func:`prepare`.
        split: ``"train"`` or ``"val"`` (or any other ``.bin`` name in the directory).
        meta: Already loaded ``meta.json`` contents, to skip re-reading it.

    Raises:
        FileNotFoundError: The directory, ``meta.json`` or the ``.bin`` file is missing.
        ValueError: The ``.bin`` file is empty or its size is not a multiple of the dtype size.
    """
    d = Path(data_dir)
    meta = load_meta(d) if meta is None else meta
    path = d / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    _check_bin(path, dtype, d, split)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_length(n_tokens: int, context_length: int, what: str) -> None:
    if n_tokens < context_length + 1:
        raise ValueError(
            f"{what} has {n_tokens} tokens but context_length={context_length} needs at least {context_length + 1}; "
            "use a smaller context_length or prepare more text"
        )


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: np.random.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``batch_size`` random windows (CS336 semantics).

    Starts are uniform over ``[0, len(tokens) - context_length - 1]`` inclusive, so every position, the last one
    included, can appear in ``y``.

    Args:
        tokens: 1-D token array (a memmap is fine: only the sampled windows are read).
        batch_size: Number of windows B.
        context_length: Window length T.
        device: Device of the returned tensors.
        generator: Random source; a fresh unseeded one if None.

    Returns:
        ``(x, y)``, both ``(B, T)`` int64, with ``y[:, t] == tokens[start + t + 1]`` (x shifted by one).

    Raises:
        ValueError: ``tokens`` is not 1-D, a size is < 1, or ``tokens`` is shorter than ``context_length + 1``.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}; pass a flat token array")
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size and context_length must be >= 1, got {batch_size} and {context_length}")
    _check_length(len(tokens), context_length, "the token array")
    rng = generator if generator is not None else np.random.default_rng()
    starts = rng.integers(0, len(tokens) - context_length, size=batch_size)  # high is exclusive: last start included
    windows = np.asarray(tokens[starts[:, None] + np.arange(context_length + 1)], dtype=np.int64)
    batch = torch.from_numpy(windows)
    device = torch.device(device)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)  # pinned source lets the copy overlap compute
    else:
        batch = batch.to(device)
    # contiguous: callers .view() these, and a strided slice of (B, T+1) would make that fail.
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
