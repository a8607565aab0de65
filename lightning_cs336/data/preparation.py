"""``prepare``: tokenize files, directories, globs, the Python standard library or a Hugging Face dataset into a data
directory, atomically (a temporary directory renamed into place, ``meta.json`` last)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cs336.data.format import FORMAT_VERSION
from lightning_cs336.data.tokenizer import EOT, Tokenizer

STDLIB_DEFAULT_MAX_BYTES = 8_000_000
"""Cap on the ``stdlib`` source when ``max_bytes`` is not given: ~2M BPE tokens, enough for a CPU quickstart run."""

# Directories never worth training on: caches, VCS metadata, and the stdlib's own test suites (huge, repetitive).
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_STDLIB_SKIP_DIRS = _SKIP_DIRS | {"test", "tests", "idle_test"}
_GLOB_CHARS = frozenset("*?[")
# Encode in batches of about this much text: big enough for encode_batch's thread pool, small enough for a smooth bar.
_ENCODE_BATCH_CHARS = 1 << 20
_ENCODE_BATCH_DOCS = 512


# --------------------------------------------------------------------------------------------------------------------
# prepare: sources -> documents -> train.bin / val.bin
# --------------------------------------------------------------------------------------------------------------------


def _walk_dir(root: Path, skip: frozenset[str] = _SKIP_DIRS, suffix: str | None = None) -> list[Path]:
    """Files under ``root`` in sorted order, skipping hidden entries and ``skip`` directories (never descended into)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into hidden dirs (.git, .venv), caches or test suites.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        files.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and (suffix is None or f.endswith(suffix))
        )
    return files


def _stdlib_files() -> list[Path]:
    # Sorted so the corpus, and thus the max_bytes cut, is identical on every run.
    return sorted(_walk_dir(Path(sysconfig.get_paths()["stdlib"]), _STDLIB_SKIP_DIRS, suffix=".py"))


class _Source:
    """One resolved ``sources`` entry: the files it names (read strictly or not), or a Hugging Face dataset."""

    def __init__(self, name: str, files: list[Path], strict: bool, cap: int | None = None, hf: str | None = None):
        self.name, self.files, self.strict, self.cap, self.hf = name, files, strict, cap, hf


def _resolve_source(source: str, max_bytes: int | None) -> _Source:
    if source == "stdlib":
        return _Source(
            source, _stdlib_files(), strict=False, cap=STDLIB_DEFAULT_MAX_BYTES if max_bytes is None else None
        )
    if source.startswith("hf:"):
        name = source[3:]
        if not name:
            raise ValueError(
                f"source {source!r} names no dataset; write it as hf:OWNER/NAME, e.g. hf:roneneldan/TinyStories"
            )
        try:
            import datasets  # noqa: F401  (optional dependency, only needed for hf: sources)
        except ImportError:
            raise ValueError(
                f"source {source!r} needs the `datasets` package, which is not installed; "
                "download the dataset's text files and pass their local paths instead (or `pip install datasets`)"
            ) from None
        return _Source(source, [], strict=False, hf=name)
    if _GLOB_CHARS.intersection(source):
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True))
        if not matches:
            raise FileNotFoundError(
                f"no files match the pattern {source!r}; check the pattern (quote it so your shell leaves it alone)"
            )
        files = []
        for match in matches:
            files.extend(_walk_dir(match) if match.is_dir() else [match])
        return _Source(source, files, strict=False)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"source {source!r} does not exist; pass an existing file, directory, glob pattern, 'stdlib' or 'hf:NAME'"
        )
    if path.is_dir():
        return _Source(source, _walk_dir(path), strict=False)
    return _Source(source, [path], strict=True)  # a file named explicitly must be text: skipping it would hide a typo


def _read_text(path: Path, strict: bool) -> str | None:
    """Read ``path`` as UTF-8; None for a binary file found by a directory walk, an error for one named explicitly."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(
            f"cannot read {path}: {e.strerror or e}; fix its permissions or leave it out of the sources"
        ) from e
    text: str | None = None
    if b"\x00" not in data:  # NUL bytes mean binary even when they happen to decode
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if text is None and strict:
        raise ValueError(f"{path} is not UTF-8 text; convert it to UTF-8 or leave it out of the sources")
    return text


def _hf_texts(source: str, name: str) -> Iterator[str]:
    import datasets

    def fail(e: Exception) -> ValueError:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ValueError(
            f"could not load {source!r} from the Hugging Face hub ({reason}); "
            "download the dataset's text files and pass their local paths instead"
        )

    try:
        # Streaming: reading stops at max_bytes instead of downloading a multi-GB dataset first.
        rows = iter(datasets.load_dataset(name, split="train", streaming=True))
    except Exception as e:  # network, auth, missing dataset: all end in the same advice
        raise fail(e) from e
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise fail(e) from e
        if "text" not in row:
            raise ValueError(
                f"{source!r} has no 'text' column (columns: {sorted(row)}); use a dataset with a text column"
            )
        yield row["text"]


def _room(max_bytes: int | None, total: int, cap: int | None, src_total: int) -> int | None:
    """Bytes still allowed by the global and per-source caps; None when neither applies."""
    limits = [lim for lim in (max_bytes and max_bytes - total, cap and cap - src_total) if lim is not None]
    return min(limits) if limits else None


def _resolve_sources(sources: list[str], max_bytes: int | None) -> list[_Source]:
    resolved = [_resolve_source(s, max_bytes) for s in sources]
    if not any(r.files or r.hf for r in resolved):
        empty_dirs = [r.name for r in resolved if Path(r.name).is_dir()]
        if empty_dirs:
            raise FileNotFoundError(
                f"directory {empty_dirs[0]!r} is empty (hidden files and caches are skipped): put text files in it, "
                "or pass text files or glob patterns"
            )
        raise FileNotFoundError(
            f"no source files found in {sources}; pass text files, directories containing them, or glob patterns"
        )
    return resolved


def _collect_documents(
    resolved: list[_Source], max_bytes: int | None, on_bytes: Callable[[int], Any] | None = None
) -> tuple[list[str], int]:
    """Read every source into documents (split on ``<|endoftext|>``), honouring byte caps. Returns (docs, bytes)."""
    docs: list[str] = []
    total = 0
    for src in resolved:
        src_total = 0
        texts: Iterable[str | None] = (
            _hf_texts(src.name, src.hf) if src.hf else (_read_text(p, src.strict) for p in src.files)
        )
        for text in texts:  # lazy: files past the cap are never read, a hub stream stops downloading
            room = _room(max_bytes, total, src.cap, src_total)
            if room is not None and room <= 0:
                break
            for doc in (text or "").split(EOT):
                room = _room(max_bytes, total, src.cap, src_total)
                if room is not None and room <= 0:
                    break
                data = doc.encode("utf-8")
                if room is not None and len(data) > room:
                    # errors="ignore" drops a multi-byte character split by the cut.
                    data = data[:room]
                    doc = data.decode("utf-8", errors="ignore")
                if not doc.strip():
                    continue  # whitespace-only documents would only add stray EOTs
                docs.append(doc)
                total += len(data)
                src_total += len(data)
                if on_bytes is not None:
                    on_bytes(len(data))
    return docs, total


def _split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    n = len(docs)
    if n < 2:
        raise ValueError(
            f"the corpus has {n} document, too few to split into train and val; add more text "
            f"(more files, or documents separated by {EOT})"
        )
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} documents leaves no training documents; "
            "lower val_fraction or add more text"
        )
    # A seeded permutation picks which documents go to val; each split keeps source order so runs are reproducible.
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _doc_batches(docs: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _ENCODE_BATCH_CHARS or len(batch) >= _ENCODE_BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_split(tok: Tokenizer, docs: list[str], path: Path, dtype: np.dtype, advance: Callable[[int], Any]) -> int:
    """Tokenize ``docs`` into ``path`` with EOT between documents; returns the number of tokens written."""
    eot = np.array([tok.eot_id], dtype=dtype)
    count = 0
    with open(path, "wb") as f:
        for batch in _doc_batches(docs):
            chunks = []
            for ids in tok.encode_batch(batch):
                if count or chunks:
                    chunks.append(eot)
                chunks.append(np.asarray(ids, dtype=dtype))
            arr = np.concatenate(chunks)
            arr.tofile(f)
            count += len(arr)
            advance(sum(len(d.encode("utf-8")) for d in batch))
    return count


def prepare(
    sources: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    tokenizer: str = "bpe",
    vocab_size: int = 2048,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    *,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Tokenize a text corpus into ``train.bin``, ``val.bin``, ``tokenizer.json`` and ``meta.json`` in ``out_dir``.

    Each source is a file, a directory (walked recursively; hidden entries, caches and non-UTF-8 files skipped), a glob
    pattern, ``stdlib`` (the running Python's standard-library ``.py`` files, sorted, tests excluded, capped at
    :data:`STDLIB_DEFAULT_MAX_BYTES` unless ``max_bytes`` is given) or ``hf:OWNER/NAME`` (a Hugging Face dataset's
    ``train`` split ``text`` column, needs ``datasets`` and network). Every file, and every ``<|endoftext|>``-separated
    part of a file, is one document. Documents are split into train/val by a seeded permutation, the BPE tokenizer is
    trained on the train documents only, and documents are joined by ``<|endoftext|>`` in each ``.bin``.

    Outputs are written to a temporary directory inside ``out_dir`` and renamed into place at the end (``meta.json``
    last), so a failure never leaves partial files and never clobbers a previous good output.

    Args:
        sources: Files, directories, glob patterns, ``stdlib`` or ``hf:NAME`` entries (a single one may be passed
            bare). ``stdlib`` and ``hf:`` take precedence over a local path of the same name.
        out_dir: Output directory (created if missing).
        tokenizer: ``"bpe"`` (byte-level BPE trained on the corpus) or ``"byte"`` (257 tokens, no training).
        vocab_size: Target BPE vocabulary size (>= 257); ignored for ``"byte"``. The recorded ``vocab_size`` is the
            trained tokenizer's actual size, which a small corpus may leave below the target.
        val_fraction: Fraction of documents held out for ``val.bin``, in (0, 1); at least one document is.
        max_bytes: Cap on the total UTF-8 bytes read across all sources (the last document is cut to fit).
        seed: Seed of the train/val document split.
        show_progress: Draw a rich progress bar on stderr.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileNotFoundError: A source does not exist or a pattern matches nothing.
        ValueError: Any other bad input: unreadable or non-UTF-8 file, empty corpus, too few documents or tokens for
            a split, bad tokenizer / vocab_size / val_fraction / max_bytes, output path is a file.
    """
    # A bare string would otherwise be iterated character by character.
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    if tokenizer not in ("bpe", "byte"):
        raise ValueError(f"tokenizer must be 'bpe' or 'byte', got {tokenizer!r}; pass --tokenizer bpe or byte")
    if tokenizer == "bpe" and vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least 257 "
            f"(256 bytes + {EOT}); use a vocab_size of 257 or more, e.g. 2048"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; e.g. 0.05")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}; omit it to read all text")
    if not sources:
        raise ValueError("no sources given; pass files, directories, glob patterns, 'stdlib' or 'hf:NAME'")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory; choose another --out")

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class SizeColumn(DownloadColumn):
        # Only byte-counting tasks get a size readout: "1/1 bytes" next to the BPE-training spinner would be noise.
        def render(self, task: Any) -> Text:
            return super().render(task) if task.fields.get("sized", True) else Text("")

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        SizeColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    # Resolve every source before reading any: a typo in the last one should fail at once, with no progress bar.
    resolved = _resolve_sources(sources, max_bytes)
    with progress:
        task = progress.add_task("reading sources", total=None)
        docs, total_bytes = _collect_documents(resolved, max_bytes, lambda n: progress.advance(task, n))
        if total_bytes == 0:
            raise ValueError(f"the corpus is empty: {sources} contained no text; add non-empty UTF-8 text files")
        train_docs, val_docs = _split_documents(docs, val_fraction, seed)
        del docs
        progress.update(task, description=f"read {len(train_docs) + len(val_docs)} documents", total=total_bytes)

        if tokenizer == "byte":
            tok = Tokenizer.byte_level()
        else:
            task = progress.add_task(f"training BPE (vocab {vocab_size})", total=None, sized=False)
            tok = Tokenizer.train_bpe(train_docs, vocab_size)
            progress.update(task, total=1, completed=1)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)

        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
        except OSError as e:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise ValueError(f"cannot create output directory {out}: {e.strerror or e}; choose a writable --out") from e
        ok = False
        try:
            counts = {}
            for split, split_docs in (("train", train_docs), ("val", val_docs)):
                task = progress.add_task(f"tokenizing {split}", total=sum(len(d.encode("utf-8")) for d in split_docs))
                counts[split] = _write_split(
                    tok, split_docs, tmp / f"{split}.bin", dtype, lambda n, t=task: progress.advance(t, n)
                )
            for split, n in counts.items():
                # One token can't form an (x, y) pair; training needs at least context_length + 1 anyway.
                if n < 2:
                    raise ValueError(
                        f"the {split} split has only {n} token; add more text"
                        + (" or raise val_fraction" if split == "val" else " or lower val_fraction")
                    )
            tok.save(tmp / "tokenizer.json")
            meta = {
                "vocab_size": tok.vocab_size,
                "dtype": dtype.name,
                "eot_id": tok.eot_id,
                "train_tokens": counts["train"],
                "val_tokens": counts["val"],
                "tokenizer": tokenizer,
                "sources": sources,
                "format_version": FORMAT_VERSION,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            # meta.json last: its presence marks a complete dataset for load_meta.
            for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
                os.replace(tmp / name, out / name)
            ok = True
        except OSError as e:  # disk full, quota, permissions changed mid-run
            raise ValueError(
                f"cannot write to {out}: {e.strerror or e}; free some disk space or choose another --out"
            ) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if not ok and created:
                shutil.rmtree(out, ignore_errors=True)  # we made it and it holds nothing of value
    return out
