"""Token files of a prepared split: one `train.bin`, or shards `train-00000.bin`, `train-00001.bin`, ...

A split longer than `shard_tokens` is written as shards; meta.json's "shards" lists each
split's files in order with their token counts and sha256. Readers see one flat array
either way: a `np.memmap` for one file, a `ShardedTokens` for several, so batches (a pure
function of seed and step over the split's global token offsets) do not depend on how the
split is cut into files. A merged directory (`prepare --merge`) lists files of its part
directories by relative path ("../part-0/train.bin").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Union

import numpy as np


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends token bytes to `split-00000.bin`, `split-00001.bin`, ... of `shard_tokens` tokens each,
    hashing as it goes; `close()` renames a lone shard to `split.bin` and returns the manifest."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.directory, self.split = Path(directory), split
        self.itemsize = np.dtype(dtype).itemsize
        self.shard_bytes = shard_tokens * self.itemsize
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._f = None
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self._f is None:
                self._f = open(self.directory / shard_name(self.split, len(self.shards)), "wb")
            take = min(len(view), self.shard_bytes - self._size)
            self._f.write(view[:take])
            self._hash.update(view[:take])
            self._size += take
            view = view[take:]
            if self._size == self.shard_bytes:
                self._finish_shard()
        self.tokens += len(data) // self.itemsize

    def _finish_shard(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": self._size // self.itemsize,
                            "sha256": self._hash.hexdigest()})
        self._f, self._hash, self._size = None, hashlib.sha256(), 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; one shard (or none: an empty split) becomes `split.bin`."""
        if self._f is not None or not self.shards:
            if self._f is None:
                self._f = open(self.directory / shard_name(self.split, 0), "wb")
            self._finish_shard()
        if len(self.shards) == 1:
            single = f"{self.split}.bin"
            os.rename(self.directory / self.shards[0]["file"], self.directory / single)
            self.shards[0]["file"] = single
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ShardedTokens:
    """Several token files read as one flat array, like the `np.memmap` of a single file:
    `len()`, and indexing by an int, a slice, or an integer array of any shape (a batch of
    windows may span two files)."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: Union[str, np.dtype]) -> None:
        self.dtype = np.dtype(dtype)
        self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) for p, n in zip(paths, counts)]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # shard k holds [starts[k], starts[k+1])
        self.shape = (int(self.starts[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step, dtype=np.int64)]
            return self._range(start, max(start, stop))
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(idx)} is out of bounds for {n} tokens")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self._maps[k][i - self.starts[k]]
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"indices must lie in [0, {n})")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.flatnonzero(np.bincount(which, minlength=len(self._maps))):  # the files touched (bincount: no sort)
            sel = which == k
            out[sel] = self._maps[k][flat[sel] - self.starts[k]]
        return out.reshape(idx.shape)

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        k = max(first, 0)
        while k < len(self._maps) and self.starts[k] < stop:
            lo, hi = max(start, self.starts[k]) - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            parts.append(np.asarray(self._maps[k][lo:hi]))
            k += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)
