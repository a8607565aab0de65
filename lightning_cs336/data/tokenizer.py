"""The tokenizers of the token data: byte-level (257 ids) and Hugging Face byte-level BPE, with ``<|endoftext|>``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

EOT = "<|endoftext|>"
"""The special token placed between documents."""


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
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not a valid tokenizer file ({reason}); re-run `cs336 prepare`") from e
        if hf.token_to_id(EOT) is None:
            raise ValueError(
                f"{path} has no {EOT} token, so it is not a `cs336 prepare` tokenizer; re-run `cs336 prepare`"
            )
        return cls(hf)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a prepared data directory (its ``tokenizer.json``) or a ``tokenizer.json`` file.

        Raises:
            FileNotFoundError: ``path`` does not exist, or is a directory without ``tokenizer.json``.
            ValueError: The file is not a tokenizer file with ``<|endoftext|>``.
        """
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(
                    f"{path} holds no tokenizer.json: pass a directory written by `cs336 prepare`, or a tokenizer.json"
                )
            path = path / "tokenizer.json"
        elif not path.exists():
            raise FileNotFoundError(
                f"tokenizer {path} does not exist: pass a directory written by `cs336 prepare`, or its tokenizer.json"
            )
        return cls.from_file(path)

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
