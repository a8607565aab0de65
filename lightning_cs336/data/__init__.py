"""Token data for the CS336 language model: tokenizers, corpus preparation, memmapped splits and a LightningDataModule.

One job per module: ``tokenizer``, ``preparation`` (``prepare``), ``format`` (the on-disk layout and reading it),
``datasets`` (windows), ``datamodule``. The ``cs336 prepare`` front end lives with the other commands in ``cli/``.

The on-disk format written by :func:`prepare` (``format_version`` 1) is a directory holding

* ``train.bin`` / ``val.bin``: raw numpy token arrays (``uint16`` when the vocabulary fits, else ``uint32``), documents
  joined by ``<|endoftext|>`` with no header, so ``np.memmap`` reads them with zero parsing;
* ``tokenizer.json``: the Hugging Face ``tokenizers`` serialization of the tokenizer that produced them;
* ``meta.json``: vocabulary size, dtype, end-of-text id, token counts, tokenizer kind and sources.

Reading side: :func:`load_meta`, :func:`load_tokens`, :func:`get_batch` (CS336 semantics), the two datasets and
:class:`TokenDataModule`.
"""

from lightning_cs336.data.datamodule import TokenDataModule
from lightning_cs336.data.datasets import FixedWindowDataset, RandomWindowDataset
from lightning_cs336.data.format import FORMAT_VERSION, get_batch, load_meta, load_tokens
from lightning_cs336.data.preparation import STDLIB_DEFAULT_MAX_BYTES, _stdlib_files, prepare  # noqa: F401
from lightning_cs336.data.tokenizer import EOT, Tokenizer

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
