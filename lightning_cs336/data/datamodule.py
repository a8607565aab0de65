"""``TokenDataModule``: the prepared data directory as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lightning_cs336.data.datasets import FixedWindowDataset, RandomWindowDataset, _dist_rank
from lightning_cs336.data.format import _check_length, load_meta, load_tokens
from lightning_cs336.data.tokenizer import Tokenizer

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
        for split in ("train", "val"):  # before any Trainer or W&B run exists (setup() is too late for that)
            _check_length(int(self.meta[f"{split}_tokens"]), context_length, f"the {split} split of {self.data_dir}")
        self._tokenizer: Tokenizer | None = None
        self._checked: set[str] = set()
        self._train_ds: RandomWindowDataset | None = None
        self._val_ds: FixedWindowDataset | None = None
        self._test_ds: FixedWindowDataset | None = None
        self._train_batches = 0  # training batches consumed: the stream position a checkpoint keeps
        self._resume_batches: int | None = None

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
        if self._resume_batches:
            self._train_ds.resume_after(self._resume_batches, self.batch_size)
        self._resume_batches = None
        return self._loader(self._train_ds)

    # ------------------------------------------------------------------------------------------------ resume
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Counted here (once per batch the loop consumes, in the main process), not from Lightning's loop progress,
        # whose counters are rewound differently depending on where the checkpoint was taken.
        if self.trainer is not None and self.trainer.training:
            self._train_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (Lightning saves it in every checkpoint)."""
        return {"train_batches": self._train_batches, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where the checkpoint left it (not from its first window again)."""
        batches = int(state_dict.get("train_batches", 0))
        if state_dict.get("batch_size", self.batch_size) != self.batch_size or state_dict.get("seed", self.seed) != (
            self.seed
        ):
            return  # a different stream (new seed or batch size): starting it afresh is the only consistent choice
        self._train_batches = self._resume_batches = batches

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
