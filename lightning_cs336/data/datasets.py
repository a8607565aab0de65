"""Memmapped token windows: endless random training windows (seeded per rank and worker), fixed validation windows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from lightning_cs336.data.format import _check_length, load_meta, load_tokens

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
        self._skip_batches, self._batch_size = 0, 1

    def resume_after(self, batches: int, batch_size: int) -> None:
        """Continue the stream after ``batches`` batches of ``batch_size`` windows were consumed (a resumed run):
        the next ``iter()`` skips exactly the windows those batches held, in every DataLoader worker, so the run
        sees the batches an uninterrupted run would have seen next. Skipping draws the starts only (no token reads):
        about 1 ms per 100k windows."""
        if batches < 0 or batch_size < 1:
            raise ValueError(f"need batches >= 0 and batch_size >= 1, got {batches} and {batch_size}")
        self._skip_batches, self._batch_size = batches, batch_size

    def rng_seed(self, worker_id: int = 0) -> list[int]:
        """The seed sequence of this rank's stream in DataLoader worker ``worker_id`` (first iteration)."""
        return [self.seed, self.rank, worker_id]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seed = self.rng_seed(worker)
        if self._iterations:
            seed.append(self._iterations)
        self._iterations += 1
        rng = np.random.default_rng(seed)
        high = self._data.num_tokens - self.context_length  # exclusive bound: last valid start is included
        # A DataLoader takes whole batches from its workers in turn (worker k makes batches k, k + W, ...), so this
        # worker made `len(range(worker, n, W))` of the n batches consumed before a resume.
        skip = len(range(worker, self._skip_batches, workers)) * self._batch_size
        self._skip_batches = 0  # only the first iteration after a resume continues the old stream
        for _ in range(skip // 1024):
            rng.integers(0, high, size=1024)
        first = skip % 1024
        while True:
            # Draw starts in blocks: one numpy call per 1024 windows instead of per window.
            for start in rng.integers(0, high, size=1024)[first:].tolist():
                yield self._data.window(start)
            first = 0


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
