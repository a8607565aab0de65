"""Tests for lightning_cs336.data: tokenizers, prepare, reading, datasets and the DataModule."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_cs336 import data as data_mod
from lightning_cs336.cli.prepare import _parse_size, prepare_main
from lightning_cs336.data import (
    EOT,
    FixedWindowDataset,
    RandomWindowDataset,
    TokenDataModule,
    Tokenizer,
    get_batch,
    load_meta,
    load_tokens,
    preparation,
    prepare,
)

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "unicode: héllo wörld, 日本語のテキスト, Ελληνικά, עברית",
    "emoji: 🎉🚀👩‍👩‍👧 and a flag 🇺🇸 and combining é",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    f"an embedded {EOT} special token",
    "",
]

DOCS = [
    f"Document number {i}: the quick brown fox jumps over the lazy dog. Ünïcödé {i} 🎉\n" * (1 + i % 3)
    for i in range(20)
]


def _write_docs(root: Path, docs: list[str] = DOCS, suffix: str = ".txt") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = root / f"doc{i:03d}{suffix}"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


def _make_data_dir(root: Path, train: np.ndarray, val: np.ndarray, vocab_size: int = 65536, **meta_overrides) -> Path:
    """Write a prepared-looking directory directly (no tokenization), for fast reading-side tests."""
    root.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    np.asarray(train, dtype=dtype).tofile(root / "train.bin")
    np.asarray(val, dtype=dtype).tofile(root / "val.bin")
    Tokenizer.byte_level().save(root / "tokenizer.json")
    meta = {
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
        "eot_id": 256,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "tokenizer": "byte",
        "sources": ["synthetic"],
        "format_version": 1,
    }
    meta.update(meta_overrides)
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _decode_split(out: Path, split: str) -> str:
    tok = Tokenizer.from_file(out / "tokenizer.json")
    return tok.decode(load_tokens(out, split).tolist())


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids_are_bytes_and_round_trip() -> None:
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 257
    assert tok.eot_id == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        if EOT not in text:
            assert ids == list(text.encode("utf-8"))
    assert tok.encode(f"a{EOT}b") == [97, 256, 98]


def test_byte_tokenizer_decodes_invalid_utf8_without_crashing() -> None:
    tok = Tokenizer.byte_level()
    text = tok.decode([0xFF, 0xE2, 0x82, 65])  # a lone 0xFF and a truncated 3-byte sequence
    assert "\ufffd" in text
    assert text.endswith("A")
    emoji = list("🎉".encode())
    assert tok.decode(emoji[:2]) != ""  # half an emoji still decodes to replacement chars


def test_bpe_round_trips_including_unseen_characters() -> None:
    tok = Tokenizer.train_bpe(DOCS * 3, vocab_size=320)
    assert 257 < tok.vocab_size <= 320
    assert tok.encode(EOT) == [tok.eot_id]
    for text in [*TEXTS, "never seen: 中文 ∑∫ 🦀 \x00\x01 control"]:
        assert tok.decode(tok.encode(text)) == text
    # merges learned: common text is shorter than its bytes
    assert len(tok.encode(DOCS[0])) < len(DOCS[0].encode())
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]


def test_tokenizer_serialization(tmp_path: Path) -> None:
    tok = Tokenizer.train_bpe(DOCS, vocab_size=300)
    again = Tokenizer.from_str(tok.to_str())
    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.from_file(tmp_path / "tok.json")
    for other in (again, loaded):
        assert other.vocab_size == tok.vocab_size and other.eot_id == tok.eot_id
        assert other.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    with pytest.raises(FileNotFoundError, match="not found; run `cs336 prepare"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a valid tokenizer file"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_bpe_training_is_deterministic() -> None:
    assert Tokenizer.train_bpe(DOCS, 300).to_str() == Tokenizer.train_bpe(DOCS, 300).to_str()


def test_tokenizer_errors() -> None:
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*at least 257"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    with pytest.raises(ValueError, match="has no <\\|endoftext\\|> token; build it with"):
        Tokenizer(HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])))


# --------------------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_round_trips_all_text(tmp_path: Path, kind: str) -> None:
    _write_docs(tmp_path / "corpus")
    out = prepare([str(tmp_path / "corpus")], tmp_path / "out", tokenizer=kind, vocab_size=300, show_progress=False)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    meta = load_meta(out)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == kind and meta["format_version"] == 1
    assert meta["sources"] == [str(tmp_path / "corpus")]
    tok = Tokenizer.from_file(out / "tokenizer.json")
    assert meta["vocab_size"] == tok.vocab_size and meta["eot_id"] == tok.eot_id
    if kind == "byte":
        assert meta["vocab_size"] == 257
    for split in ("train", "val"):
        assert (out / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"]
        assert load_tokens(out, split).dtype == np.uint16
    train, val = _decode_split(out, "train"), _decode_split(out, "val")
    for doc in DOCS:
        assert doc in train or doc in val
    train_docs, val_docs = train.split(EOT), val.split(EOT)
    assert len(val_docs) == 1  # 5% of 20 documents
    assert sorted(train_docs + val_docs) == sorted(DOCS)  # EOT between documents, none at the ends
    assert not load_tokens(out, "train")[0] == tok.eot_id


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    _write_docs(tmp_path / "corpus")
    a = prepare([str(tmp_path / "corpus")], tmp_path / "a", vocab_size=300, show_progress=False)
    b = prepare([str(tmp_path / "corpus")], tmp_path / "b", vocab_size=300, show_progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_prepare_walks_directories_and_skips_hidden_and_binary(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _write_docs(corpus / "sub" / "deeper", DOCS[:4])
    _write_docs(corpus, DOCS[4:8], suffix=".md")
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD").write_text("SECRET-GIT-CONTENT")
    (corpus / ".hidden.txt").write_text("SECRET-HIDDEN-CONTENT")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = prepare([str(corpus)], tmp_path / "out", tokenizer="byte", val_fraction=0.2, show_progress=False)
    text = _decode_split(out, "train") + _decode_split(out, "val")
    for doc in DOCS[:8]:
        assert doc in text
    assert "SECRET" not in text and "PNG" not in text and "caf" not in text
    meta = load_meta(out)
    assert meta["train_tokens"] + meta["val_tokens"] == len(text.encode()) - text.count(EOT) * (len(EOT) - 1)


def test_prepare_glob_pattern(tmp_path: Path) -> None:
    _write_docs(tmp_path / "a", DOCS[:5])
    _write_docs(tmp_path / "b", DOCS[5:10], suffix=".md")
    out = prepare([str(tmp_path / "**" / "*.txt")], tmp_path / "out", tokenizer="byte", show_progress=False)
    text = _decode_split(out, "train") + _decode_split(out, "val")
    assert all(doc in text for doc in DOCS[:5])
    assert not any(doc in text for doc in DOCS[5:10])


def test_prepare_splits_files_on_eot_and_caps_bytes(tmp_path: Path) -> None:
    big = tmp_path / "stories.txt"
    big.write_text(EOT.join(f"story {i} " + "x" * 100 for i in range(50)))
    out = prepare([str(big)], tmp_path / "out", tokenizer="byte", val_fraction=0.1, show_progress=False)
    assert len(_decode_split(out, "val").split(EOT)) == 5
    capped = prepare([str(big)], tmp_path / "capped", tokenizer="byte", max_bytes=1000, show_progress=False)
    meta = load_meta(capped)
    n_docs = len(_decode_split(capped, "train").split(EOT)) + len(_decode_split(capped, "val").split(EOT))
    assert meta["train_tokens"] + meta["val_tokens"] - (n_docs - 2) == 1000  # bytes + EOTs between docs


def test_prepare_stdlib_source(tmp_path: Path) -> None:
    out = prepare(["stdlib"], tmp_path / "out", tokenizer="byte", max_bytes=60_000, show_progress=False)
    meta = load_meta(out)
    assert meta["sources"] == ["stdlib"]
    assert 59_000 < meta["train_tokens"] + meta["val_tokens"] < 61_000
    text = _decode_split(out, "train") + _decode_split(out, "val")
    assert "import" in text and "def " in text


def test_stdlib_files_are_sorted_and_skip_tests() -> None:
    files = data_mod._stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any({"test", "tests", "site-packages", "__pycache__"} & set(p.parts) for p in files)


def test_prepare_hf_source_without_datasets_gives_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="needs the `datasets` package.*pass their local paths"):
        prepare(["hf:roneneldan/TinyStories"], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


class _FakeDatasets:
    """Stands in for the `datasets` package: hub access without network."""

    def __init__(self, rows: list[dict] | None = None, error: Exception | None = None) -> None:
        self.rows, self.error, self.calls = rows, error, []

    def load_dataset(self, name: str, split: str, streaming: bool):
        self.calls.append((name, split, streaming))
        if self.error is not None:
            raise self.error
        return iter(self.rows)


def test_prepare_hf_source_streams_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeDatasets(rows=[{"text": doc} for doc in DOCS])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out = prepare("hf:someone/stories", tmp_path / "out", tokenizer="byte", max_bytes=300, show_progress=False)
    assert fake.calls == [("someone/stories", "train", True)]
    assert load_meta(out)["sources"] == ["hf:someone/stories"]
    text = _decode_split(out, "train") + _decode_split(out, "val")
    assert DOCS[0] in text and DOCS[5] not in text  # streaming stopped at max_bytes


def test_prepare_hf_source_offline_gives_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeDatasets(error=ConnectionError("Couldn't reach huggingface.co\nmore detail"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"could not load 'hf:a/b' .*\(Couldn't reach huggingface.co\); download"):
        prepare(["hf:a/b"], tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="names no dataset; write it as hf:OWNER/NAME"):
        prepare(["hf:"], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tokenizer": "wordpiece"}, ValueError, "tokenizer must be 'bpe' or 'byte', got 'wordpiece'"),
        ({"vocab_size": 256}, ValueError, r"vocab_size=256 is too small.*use a vocab_size of 257 or more"),
        ({"val_fraction": 0.0}, ValueError, "val_fraction must be between 0 and 1.*e.g. 0.05"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction must be between 0 and 1"),
        ({"val_fraction": 0.99}, ValueError, "leaves no training documents; lower val_fraction or add more text"),
        ({"max_bytes": 0}, ValueError, "max_bytes must be positive"),
    ],
)
def test_prepare_rejects_bad_arguments(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    _write_docs(tmp_path / "corpus", DOCS[:3])
    with pytest.raises(error, match=match):
        prepare([str(tmp_path / "corpus")], tmp_path / "out", show_progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_prepare_source_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist; pass an existing file, directory, glob pattern"):
        prepare([str(tmp_path / "nope.txt")], out, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no files match the pattern.*check the pattern"):
        prepare([str(tmp_path / "*.nothing")], out, show_progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir' is empty.*put text files in it"):
        prepare([str(tmp_path / "empty_dir")], out, show_progress=False)
    _write_docs(tmp_path / "blank", ["", "  \n\n ", "\t"])
    with pytest.raises(ValueError, match="the corpus is empty.*add non-empty UTF-8 text files"):
        prepare([str(tmp_path / "blank")], out, show_progress=False)
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(ValueError, match="has 1 document, too few to split into train and val; add more text"):
        prepare([str(tmp_path / "one.txt")], out, show_progress=False)
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="is not UTF-8 text; convert it to UTF-8 or leave it out"):
        prepare([str(tmp_path / "bin.dat")], out, show_progress=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory; choose another --out"):
        prepare([str(tmp_path / "one.txt")], tmp_path / "a_file", show_progress=False)
    assert not out.exists()


def test_prepare_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_docs(tmp_path / "corpus", DOCS[:3])
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == paths[1]:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(ValueError, match=r"cannot read .*doc001.txt: Permission denied; fix its permissions"):
        prepare([str(tmp_path / "corpus")], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_val_split_too_small_leaves_no_partial_files(tmp_path: Path) -> None:
    # Three one-character documents: val gets one of them, a single token, which cannot form an (x, y) pair.
    _write_docs(tmp_path / "corpus", ["a", "b", "c"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("pre-existing")
    with pytest.raises(ValueError, match="the val split has only 1 token; add more text or raise val_fraction"):
        prepare([str(tmp_path / "corpus")], out, tokenizer="byte", val_fraction=0.3, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # no .bin, no meta.json, no .prepare-* temp dir


def test_prepare_failure_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_docs(tmp_path / "corpus")
    out = prepare([str(tmp_path / "corpus")], tmp_path / "out", tokenizer="byte", show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = preparation._write_split

    def fail_on_val(tok, docs, path, dtype, advance):
        real_write(tok, docs, path, dtype, advance)
        if path.name == "val.bin":
            raise KeyboardInterrupt  # e.g. Ctrl-C after train.bin was written
        return len(docs)

    monkeypatch.setattr(preparation, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "corpus")], out, vocab_size=300, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --------------------------------------------------------------------------------------------------------------------
# prepare_main (CLI)
# --------------------------------------------------------------------------------------------------------------------


def test_prepare_main_success(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_docs(tmp_path / "corpus")
    out = tmp_path / "out"
    rc = prepare_main([str(tmp_path / "corpus"), "--out", str(out), "--tokenizer", "byte", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "train:" in captured.out and "val:" in captured.out and "vocab 257" in captured.out
    assert str(out / "train.bin") in captured.out
    assert load_meta(out)["tokenizer"] == "byte"


def test_prepare_main_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc = prepare_main([str(tmp_path / "missing"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("cs336: error: ") and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

    out.mkdir()
    _write_docs(tmp_path / "corpus", DOCS[:3])
    assert prepare_main([str(tmp_path / "corpus"), "--out", str(out), "--vocab-size", "10", "--no-progress"]) == 2
    assert "error: vocab_size=10 is too small" in capsys.readouterr().err
    assert list(out.iterdir()) == []

    assert prepare_main([str(tmp_path / "corpus")]) == 2  # argparse: --out is required
    err = capsys.readouterr().err
    assert "--out" in err and err.startswith("cs336: error:") and len(err.strip().splitlines()) == 1  # no usage dump
    assert prepare_main(["x", "--out", str(out), "--max-bytes", "lots"]) == 2
    assert "invalid size 'lots'" in capsys.readouterr().err


def test_parse_size() -> None:
    assert _parse_size("8M") == 8_000_000
    assert _parse_size("500k") == 500_000
    assert _parse_size("1.5GB") == 1_500_000_000
    assert _parse_size("1234") == 1234


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def test_load_meta_and_tokens_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist; run `cs336 prepare SOURCES\.\.\. --out"):
        load_meta(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"meta.json not found; run `cs336 prepare"):
        load_meta(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON.*re-run `cs336 prepare"):
        load_meta(tmp_path / "d")
    d = _make_data_dir(tmp_path / "v2", np.arange(10), np.arange(10), format_version=2)
    with pytest.raises(ValueError, match="format_version 2, expected 1; re-run"):
        load_meta(d)

    d = _make_data_dir(tmp_path / "ok", np.arange(10), np.arange(10))
    assert np.array_equal(load_tokens(d, "train"), np.arange(10))
    assert isinstance(load_tokens(d, "train"), np.memmap)
    with pytest.raises(FileNotFoundError, match=r"test.bin not found; re-run `cs336 prepare"):
        load_tokens(d, "test")
    (d / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="val.bin is empty; re-run `cs336 prepare` with more text"):
        load_tokens(d, "val")
    (d / "val.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"is 3 bytes, not a multiple of 2 \(uint16\).*truncated or corrupt; re-run"):
        load_tokens(d, "val")


def test_get_batch_shapes_and_shift() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, batch_size=8, context_length=16, generator=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # arange: the next token is +1
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = get_batch(tokens, 8, 16, generator=np.random.default_rng(0))
    assert torch.equal(x, x2)


def test_get_batch_reaches_both_ends() -> None:
    tokens = np.arange(10)
    x, y = get_batch(tokens, batch_size=2000, context_length=3, generator=np.random.default_rng(1))
    starts = set(x[:, 0].tolist())
    assert starts == set(range(0, 10 - 3))  # 0 ..= len - T - 1, each reachable
    assert y.max().item() == 9  # the last token is used as a target


def test_get_batch_errors() -> None:
    with pytest.raises(ValueError, match=r"has 4 tokens but context_length=4 needs at least 5; use a smaller"):
        get_batch(np.arange(4), 2, 4)
    get_batch(np.arange(5), 2, 4)  # exactly context_length + 1 is enough
    with pytest.raises(ValueError, match="must be a 1-D array"):
        get_batch(np.zeros((2, 10)), 2, 4)


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def _take(ds: RandomWindowDataset, n: int) -> list[int]:
    it = iter(ds)
    return [int(next(it)[0][0]) for _ in range(n)]


def test_random_window_dataset_streams(tmp_path: Path) -> None:
    d = _make_data_dir(tmp_path / "d", np.arange(5000), np.arange(100))
    ds0 = RandomWindowDataset(d, "train", context_length=8, seed=7, rank=0)
    ds0b = RandomWindowDataset(d, "train", context_length=8, seed=7, rank=0)
    ds1 = RandomWindowDataset(d, "train", context_length=8, seed=7, rank=1)
    assert ds0.rng_seed(0) == [7, 0, 0] and ds1.rng_seed(1) == [7, 1, 1]
    assert len({tuple(ds0.rng_seed(w)) for w in range(4)} | {tuple(ds1.rng_seed(w)) for w in range(4)}) == 8
    first = _take(ds0, 20)
    assert first == _take(ds0b, 20)  # same (seed, rank, worker): same stream
    assert first != _take(ds1, 20)  # other rank: other stream
    assert first != _take(ds0, 20)  # second iteration (new epoch) in the same process: new stream
    x, y = next(iter(ds0))
    assert x.shape == y.shape == (8,) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)
    # Pickling (DataLoader workers, DDP spawn) must not carry the memmapped data along.
    assert len(pickle.dumps(ds0)) < 5000


def test_random_window_dataset_rank_from_distributed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _make_data_dir(tmp_path / "d", np.arange(100), np.arange(100))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    assert RandomWindowDataset(d, context_length=4).rank == 3


@pytest.mark.slow
def test_random_window_dataset_with_workers(tmp_path: Path) -> None:
    d = _make_data_dir(tmp_path / "d", np.arange(5000), np.arange(100))
    ds = RandomWindowDataset(d, "train", context_length=8, seed=0, rank=0)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]  # workers alternate: 0, 1, 0, 1
    del it
    for x, y in batches:
        assert x.shape == (4, 8) and torch.equal(y, x + 1)
    assert not torch.equal(batches[0][0], batches[1][0])  # worker 0 and worker 1 draw different windows
    # Worker 0's stream is the (seed, rank, 0) stream, as in the main process.
    main_stream = iter(RandomWindowDataset(d, "train", context_length=8, seed=0, rank=0))
    assert torch.equal(batches[0][0], torch.stack([next(main_stream)[0] for _ in range(4)]))


def test_fixed_window_dataset(tmp_path: Path) -> None:
    d = _make_data_dir(tmp_path / "d", np.arange(100), np.arange(1000))
    ds = FixedWindowDataset(d, "val", context_length=10, num_windows=7)
    assert len(ds) == 7
    assert ds.starts[0] == 0 and ds.starts[-1] == 1000 - 10 - 1
    assert np.array_equal(ds.starts, FixedWindowDataset(d, "val", 10, 7).starts)
    assert np.all(np.diff(ds.starts) > 0)
    x, y = ds[6]
    assert x.shape == (10,) and int(y[-1]) == 999 and torch.equal(y, x + 1)
    # Fewer possible starts than windows requested: each start once.
    small = FixedWindowDataset(d, "train", context_length=95, num_windows=256)
    assert small.starts.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"has 100 tokens but context_length=100 needs at least 101"):
        FixedWindowDataset(d, "train", context_length=100)


# --------------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------------


class _TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.out = torch.nn.Linear(8, vocab_size)
        self.val_batches = 0

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.out(self.emb(x))
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    _write_docs(tmp_path / "corpus")
    return prepare([str(tmp_path / "corpus")], tmp_path / "data", tokenizer="byte", show_progress=False)


def test_datamodule_reads_meta_eagerly(prepared: Path) -> None:
    dm = TokenDataModule(str(prepared), batch_size=4, context_length=16, val_windows=10)
    assert dm.vocab_size == 257 and dm.eot_id == 256 and dm.meta["tokenizer"] == "byte"
    assert dm.tokenizer.decode(dm.tokenizer.encode(DOCS[0])) == DOCS[0]
    assert dm.hparams["context_length"] == 16
    x, y = next(iter(dm.train_dataloader()))  # works without an explicit setup()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    val = list(dm.val_dataloader())
    assert sum(len(b[0]) for b in val) == 10
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, dm.val_dataloader(), strict=True))  # deterministic
    assert len(list(dm.test_dataloader())) == 3  # falls back to val.bin


def test_datamodule_fit_end_to_end(prepared: Path) -> None:
    dm = TokenDataModule(str(prepared), batch_size=4, context_length=16, val_windows=8)
    model = _TinyLM(dm.vocab_size)
    trainer = L.Trainer(
        max_steps=6,
        val_check_interval=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6
    assert model.val_batches >= 4  # sanity check + 2 validation runs
    assert "val_loss" in trainer.callback_metrics


@pytest.mark.slow
def test_datamodule_with_workers(prepared: Path) -> None:
    dm = TokenDataModule(str(prepared), batch_size=4, context_length=16, num_workers=2, val_windows=8)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    it = iter(loader)
    b0, b1 = next(it), next(it)
    assert not torch.equal(b0[0], b1[0])
    assert sum(len(b[0]) for b in dm.val_dataloader()) == 8


def test_datamodule_errors(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist; run `cs336 prepare SOURCES\.\.\. --out"):
        TokenDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TokenDataModule(str(prepared), batch_size=0)
    n_val = load_meta(prepared)["val_tokens"]
    # Found when the datamodule is built (before a Trainer or W&B run exists), not at setup.
    with pytest.raises(ValueError, match=rf"val split .* has {n_val} tokens but context_length={n_val} needs at least"):
        TokenDataModule(str(prepared), context_length=n_val)
    bad = _make_data_dir(tmp_path / "bad", np.array([1, 2, 300, 4] * 10), np.arange(50), vocab_size=257)
    with pytest.raises(ValueError, match=r"train.bin contains token id 300 but vocab_size is 257"):
        TokenDataModule(str(bad), context_length=4).setup("fit")


def test_load_meta_checks_the_splits_and_the_numbers(tmp_path: Path) -> None:
    """A directory whose .bin files or meta.json numbers disagree fails at load_meta, naming the file and the fix."""
    d = _make_data_dir(tmp_path / "d", np.arange(10), np.arange(8))
    assert load_meta(d)["train_tokens"] == 10
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-4])  # two whole tokens short
    with pytest.raises(ValueError, match=r"train.bin holds 8 tokens but .*meta.json records 10: it is truncated"):
        load_meta(d)
    (d / "train.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"train.bin not found; re-run `cs336 prepare"):
        load_meta(d)
    for overrides, match in (
        ({"eot_id": 300, "vocab_size": 257}, "eot_id=300 but vocab_size=257"),
        ({"train_tokens": 10.0}, "train_tokens=10.0, expected a non-negative integer"),
        ({"val_tokens": -1}, "val_tokens=-1"),
        ({"vocab_size": 70000, "dtype": "uint16"}, "too large for dtype uint16"),
    ):
        bad = _make_data_dir(tmp_path / str(len(match)), np.arange(10), np.arange(8), **overrides)
        with pytest.raises(ValueError, match=match):
            load_meta(bad)


def test_tokenizer_from_path(tmp_path: Path) -> None:
    d = _make_data_dir(tmp_path / "d", np.arange(10), np.arange(8))
    assert Tokenizer.from_path(d).to_str() == Tokenizer.from_path(d / "tokenizer.json").to_str()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json: pass a directory written by `cs336 prepare`"):
        Tokenizer.from_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{oops")
    with pytest.raises(ValueError, match="junk.json is not a valid tokenizer file"):
        Tokenizer.from_path(tmp_path / "junk.json")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.BPE()).save(str(tmp_path / "no_eot.json"))
    with pytest.raises(ValueError, match=r"no_eot.json has no <\|endoftext\|> token"):
        Tokenizer.from_path(tmp_path / "no_eot.json")


def test_prepare_of_an_empty_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.txt").write_text("skipped\n")
    with pytest.raises(FileNotFoundError, match=r"directory '.*empty' is empty \(hidden files and caches are skipped"):
        prepare([str(tmp_path / "empty")], tmp_path / "out", tokenizer="byte", show_progress=False)
    assert not (tmp_path / "out").exists()
