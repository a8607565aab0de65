"""Token data for the CS336 language model: tokenizers, corpus preparation, memmapped splits and a LightningDataModule.

The on-disk format written by :func:`prepare` (``format_version`` 1) is a directory holding

* ``train.bin`` / ``val.bin``: raw numpy token arrays (``uint16`` when the vocabulary fits, else ``uint32``), documents
  joined by ``<|endoftext|>`` with no header, so ``np.memmap`` reads them with zero parsing;
* ``tokenizer.json``: the Hugging Face ``tokenizers`` serialization of the tokenizer that produced them;
* ``meta.json``: vocabulary size, dtype, end-of-text id, token counts, tokenizer kind and sources.

Reading side: :func:`load_meta`, :func:`load_tokens`, :func:`get_batch` (CS336 semantics), the two datasets and
:class:`TokenDataModule`.
"""

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

import lightning as L
import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = [
    "EOT",
    "FORMAT_VERSION",
    "FixedWindowDataset",
    "RandomWindowDataset",
    "STDLIB_DEFAULT_MAX_BYTES",
    "TokenDataModule",
    "Tokenizer",
    "get_batch",
    "load_meta",
    "load_tokens",
    "prepare",
]

EOT = "<|endoftext|>"
"""The special token placed between documents."""

FORMAT_VERSION = 1
"""Version of the ``meta.json`` / ``.bin`` layout written by :func:`prepare`."""

STDLIB_DEFAULT_MAX_BYTES = 8_000_000
"""Cap on the ``stdlib`` source when ``max_bytes`` is not given: ~2M BPE tokens, enough for a CPU quickstart run."""

_META_KEYS = ("vocab_size", "dtype", "eot_id", "train_tokens", "val_tokens", "tokenizer", "sources", "format_version")
_DTYPES = ("uint16", "uint32")
# Directories never worth training on: caches, VCS metadata, and the stdlib's own test suites (huge, repetitive).
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_STDLIB_SKIP_DIRS = _SKIP_DIRS | {"test", "tests", "idle_test"}
_GLOB_CHARS = frozenset("*?[")
# Encode in batches of about this much text: big enough for encode_batch's thread pool, small enough for a smooth bar.
_ENCODE_BATCH_CHARS = 1 << 20
_ENCODE_BATCH_DOCS = 512


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table, the alphabet HF's ByteLevel pre-tokenizer emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_components(tok: HFTokenizer) -> HFTokenizer:
    # add_prefix_space=False is what makes decode(encode(t)) == t exact; the GPT-2 regex keeps pre-tokens short.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A byte-level tokenizer with an ``<|endoftext|>`` special token, wrapping a Hugging Face ``tokenizers.Tokenizer``.

    Build one with :meth:`byte_level` (256 byte ids + EOT) or :meth:`train_bpe`; both encode any text and round-trip
    it exactly (``decode(encode(t)) == t``). A literal ``<|endoftext|>`` in the text is encoded as the special token.

    Args:
        hf_tokenizer: The underlying Hugging Face tokenizer; it must contain the ``<|endoftext|>`` token.

    Raises:
        ValueError: If ``hf_tokenizer`` has no ``<|endoftext|>`` token.
    """

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        eot_id = hf_tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(
                f"tokenizer has no {EOT} token; build it with Tokenizer.byte_level() or Tokenizer.train_bpe()"
            )
        self._tok = hf_tokenizer
        self.eot_id: int = int(eot_id)

    # ---- constructors ----

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Return the 257-token byte tokenizer: id ``b`` is byte ``b`` (0..255), and ``<|endoftext|>`` is 256."""
        table = _bytes_to_unicode()
        vocab = {table[b]: b for b in range(256)}
        vocab[EOT] = 256
        tok = _byte_level_components(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return cls(tok)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE tokenizer with Hugging Face ``tokenizers``.

        The initial alphabet is all 256 bytes, so any text encodes even if its bytes never occur in ``texts``.

        Args:
            texts: Training documents.
            vocab_size: Target vocabulary size including the 256 bytes and ``<|endoftext|>``; a small corpus may
                yield fewer tokens (no pair left to merge), so read :attr:`vocab_size` afterwards.

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: If ``vocab_size`` < 257.
        """
        if vocab_size < 257:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least 257 "
                f"(256 bytes + {EOT}); use a vocab_size of 257 or more, e.g. 2048"
            )
        tok = _byte_level_components(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # prepare() draws its own rich progress; HF's bar would interleave with it
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> Tokenizer:
        """Load a tokenizer from the JSON string produced by :meth:`to_str`."""
        return cls(HFTokenizer.from_str(s))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer from a ``tokenizer.json`` file written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; run `cs336 prepare ... --out {path.parent}`")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer file ({e}); re-run `cs336 prepare`") from e
        return cls(hf)

    # ---- serialization ----

    def to_str(self) -> str:
        """Serialize to the Hugging Face ``tokenizer.json`` format."""
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        """Write the tokenizer to ``path`` in the Hugging Face ``tokenizer.json`` format."""
        self._tok.save(str(path))

    # ---- encoding ----

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (every id is < vocab_size)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def hf(self) -> HFTokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to token ids."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts at once, in parallel on the tokenizers thread pool."""
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking, which we never use.
        fast = getattr(self._tok, "encode_batch_fast", None)
        encodings = fast(list(texts)) if fast is not None else self._tok.encode_batch(list(texts))
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids to text; invalid UTF-8 byte sequences become U+FFFD instead of raising."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


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


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def _prepare_hint(data_dir: Path) -> str:
    return f"run `cs336 prepare SOURCES... --out {data_dir}` first (e.g. `cs336 prepare stdlib --out {data_dir}`)"


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a directory written by :func:`prepare`.

    Raises:
        FileNotFoundError: The directory or its ``meta.json`` is missing.
        ValueError: ``meta.json`` is malformed or from an unsupported format version.
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
    return meta


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
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; re-run `cs336 prepare ... --out {d}` to write the {split} split")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty; re-run `cs336 prepare` with more text")
    if size % dtype.itemsize:
        raise ValueError(
            f"{path} is {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}): it is truncated or corrupt; "
            f"re-run `cs336 prepare ... --out {d}`"
        )
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


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class _SplitTokens:
    """Lazily memory-maps one split; the memmap is dropped on pickling so each DataLoader worker opens its own.

    Pickling an open ``np.memmap`` would copy the whole array into every worker (and every spawn), so only the path
    travels.
    """

    def __init__(self, data_dir: str | Path, split: str, context_length: int) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.context_length = context_length
        self._meta = load_meta(self.data_dir)
        self.num_tokens = len(load_tokens(self.data_dir, split, meta=self._meta))
        _check_length(self.num_tokens, context_length, f"the {split} split of {self.data_dir}")
        self._tokens: np.memmap | None = None

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = load_tokens(self.data_dir, self.split, meta=self._meta)
        return self._tokens

    def window(self, start: int) -> tuple[Tensor, Tensor]:
        w = torch.from_numpy(np.asarray(self.tokens[start : start + self.context_length + 1], dtype=np.int64))
        return w[:-1], w[1:]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state


class RandomWindowDataset(IterableDataset):
    """Infinite stream of random ``(x, y)`` training windows, each ``(T,)`` int64, sampled as in :func:`get_batch`.

    Every DDP rank and every DataLoader worker draws from its own stream, seeded by ``(seed, rank, worker_id)``, so
    no two processes duplicate each other's batches. Each further ``iter()`` in the same process (a new epoch)
    appends an iteration counter to the seed so epochs differ too.

    Args:
        data_dir: Directory written by :func:`prepare`.
        split: Which ``.bin`` to sample.
        context_length: Window length T.
        seed: Base seed.
        rank: Global rank; if None, read from ``torch.distributed`` at construction (0 when not initialized). It is
            fixed at construction because spawned DataLoader workers do not see the process group.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        context_length: int = 128,
        seed: int = 0,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self._data = _SplitTokens(data_dir, split, context_length)
        self.context_length = context_length
        self.seed = seed
        self.rank = _dist_rank() if rank is None else rank
        self._iterations = 0

    def rng_seed(self, worker_id: int = 0) -> list[int]:
        """The seed sequence of this rank's stream in DataLoader worker ``worker_id`` (first iteration)."""
        return [self.seed, self.rank, worker_id]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        seed = self.rng_seed(info.id if info is not None else 0)
        if self._iterations:
            seed.append(self._iterations)
        self._iterations += 1
        rng = np.random.default_rng(seed)
        high = self._data.num_tokens - self.context_length  # exclusive bound: last valid start is included
        while True:
            # Draw starts in blocks: one numpy call per 1024 windows instead of per window.
            for start in rng.integers(0, high, size=1024).tolist():
                yield self._data.window(start)


class FixedWindowDataset(Dataset):
    """A fixed, deterministic set of ``num_windows`` ``(x, y)`` windows evenly spaced over a split, for validation.

    Map-style so Lightning's ``DistributedSampler`` shards the windows across ranks. The first window starts at 0 and
    the last ends at the split's last token. If the split has fewer distinct starts than ``num_windows``, each start is
    used once.

    Args:
        data_dir: Directory written by :func:`prepare`.
        split: Which ``.bin`` to read.
        context_length: Window length T.
        num_windows: Number of windows wanted.
    """

    def __init__(
        self, data_dir: str | Path, split: str = "val", context_length: int = 128, num_windows: int = 256
    ) -> None:
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        self._data = _SplitTokens(data_dir, split, context_length)
        n_starts = self._data.num_tokens - context_length
        # Spacing is >= 1 when num <= n_starts, so rounding keeps the starts distinct.
        self.starts = np.linspace(0, n_starts - 1, min(num_windows, n_starts)).round().astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._data.window(int(self.starts[index]))


# --------------------------------------------------------------------------------------------------------------------
# LightningDataModule
# --------------------------------------------------------------------------------------------------------------------


class TokenDataModule(L.LightningDataModule):
    """Serves a directory written by :func:`prepare`: random training windows, fixed validation windows.

    ``meta.json`` is read in ``__init__`` so ``vocab_size`` is known before the model is built (LightningCLI links
    ``data.vocab_size`` into the model at instantiation).

    Args:
        data_dir: Directory written by ``cs336 prepare``.
        batch_size: Windows per batch (per device).
        context_length: Window length T.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_windows: Number of fixed validation windows (across all ranks).
        seed: Base seed of the training streams.
        pin_memory: Pin batches in page-locked memory (for GPU training).

    Raises:
        FileNotFoundError: ``data_dir`` or its ``meta.json`` is missing.
        ValueError: A size argument is out of range or ``meta.json`` is malformed.
    """

    def __init__(
        self,
        data_dir: str = "data/quickstart",
        batch_size: int = 16,
        context_length: int = 128,
        num_workers: int = 0,
        val_windows: int = 256,
        seed: int = 1234,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("context_length", context_length, 1),
            ("num_workers", num_workers, 0),
            ("val_windows", val_windows, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.context_length = context_length
        self.num_workers = num_workers
        self.val_windows = val_windows
        self.seed = seed
        self.pin_memory = pin_memory
        self.meta: dict[str, Any] = load_meta(self.data_dir)
        self._tokenizer: Tokenizer | None = None
        self._checked: set[str] = set()
        self._train_ds: RandomWindowDataset | None = None
        self._val_ds: FixedWindowDataset | None = None
        self._test_ds: FixedWindowDataset | None = None

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the prepared data (every token id is below it)."""
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``."""
        return int(self.meta["eot_id"])

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer that produced the data, loaded from ``tokenizer.json`` on first access."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.data_dir / "tokenizer.json")
        return self._tokenizer

    def _check_split(self, split: str) -> None:
        """Validate once per split: long enough for one window, and no id outside the vocabulary."""
        if split in self._checked:
            return
        tokens = load_tokens(self.data_dir, split, meta=self.meta)
        _check_length(len(tokens), self.context_length, f"the {split} split of {self.data_dir}")
        max_id = int(tokens.max())  # one sequential pass; cheap at prepare's scales and catches a mismatched meta.json
        if max_id >= self.vocab_size:
            raise ValueError(
                f"{self.data_dir / (split + '.bin')} contains token id {max_id} but vocab_size is {self.vocab_size}; "
                f"the files are inconsistent, re-run `cs336 prepare ... --out {self.data_dir}`"
            )
        self._checked.add(split)

    def _test_split(self) -> str:
        return "test" if (self.data_dir / "test.bin").is_file() else "val"

    def setup(self, stage: str | None = None) -> None:
        """Validate the splits the stage needs and build their datasets."""
        # Rank comes from the trainer when attached: setup runs after the process group exists, on every rank.
        rank = self.trainer.global_rank if self.trainer is not None else _dist_rank()
        if stage in (None, "fit"):
            self._check_split("train")
            self._train_ds = RandomWindowDataset(self.data_dir, "train", self.context_length, seed=self.seed, rank=rank)
        if stage in (None, "fit", "validate"):
            self._check_split("val")
            self._val_ds = FixedWindowDataset(self.data_dir, "val", self.context_length, self.val_windows)
        if stage in (None, "test"):
            split = self._test_split()
            self._check_split(split)
            self._test_ds = FixedWindowDataset(self.data_dir, split, self.context_length, self.val_windows)

    def _loader(self, dataset: Dataset, shuffle: bool | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,  # re-forking workers every validation run costs seconds
        )

    def train_dataloader(self) -> DataLoader:
        """Infinite loader of random windows; bound training with ``max_steps``."""
        if self._train_ds is None:
            self.setup("fit")
        return self._loader(self._train_ds)

    def val_dataloader(self) -> DataLoader:
        """Loader over the fixed validation windows."""
        if self._val_ds is None:
            self.setup("validate")
        return self._loader(self._val_ds, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over fixed windows of ``test.bin`` if present, else ``val.bin``."""
        if self._test_ds is None:
            self.setup("test")
        return self._loader(self._test_ds, shuffle=False)
