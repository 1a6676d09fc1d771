"""Prepared token data, read: the manifest (meta.json), the memory-mapped splits, `data-info`.

A prepared data directory holds:
  train.bin, val.bin   flat token ids, little-endian uint16 (vocab <= 65536) or uint32; a
                       split longer than `prepare --shard-tokens` is train-00000.bin, ... (shards.py)
  tokenizer.json       see scratchgpt.tokenizer
  meta.json            manifest: counts, dtype, shards, cleaning report, sha256s, settings
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from .. import UserError
from ..checks import check_range
from ..runs.files import META_FILE, TOKENIZER_FILE
from ..utils import read_json, sha256_file
from .shards import ShardedTokens

# 1: train.bin and val.bin in the directory; 2: a split may be shards, or files of other
# directories (prepare --merge). New directories with one file per split still say 1.
FORMAT_VERSION = 1
SHARDED_FORMAT_VERSION = 2
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


# ---------------------------------------------------------------------------------------
# Reading


def split_shards(meta: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The files of one split, in order: [{"file": path relative to the data dir, "tokens": n, ...}]."""
    shards = (meta.get("shards") or {}).get(split)
    if shards is None:  # format 1 written before shards existed
        return [{"file": f"{split}.bin", "tokens": meta[f"{split}_tokens"]}]
    return shards


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check `data_dir/meta.json`; UserError when missing, invalid or inconsistent.

    Checks that every token file has the size meta.json gives it and that tokenizer.json is
    the one meta.json was written with (its sha256: one small file hashed per call).
    """
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not path.is_file():
        if not data_dir.exists():
            raise UserError(f"data directory {data_dir} does not exist (run `scratchgpt prepare` first)")
        raise UserError(f"{path} not found: {data_dir} is not a prepared data directory")
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable meta.json ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: meta.json must hold a JSON object")
    version = meta.get("format_version")
    if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise UserError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION} or "
                        f"{SHARDED_FORMAT_VERSION}; a newer scratchgpt wrote it?)")
    for key, typ in (("tokenizer", str), ("vocab_size", int), ("dtype", str),
                     ("train_tokens", int), ("val_tokens", int)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise UserError(f"{path}: field {key!r} missing or not a {typ.__name__}")
    if meta["dtype"] not in _DTYPES:
        raise UserError(f"{path}: dtype {meta['dtype']!r} must be one of {sorted(_DTYPES)}")
    most = np.iinfo(meta["dtype"]).max + 1
    if not 1 <= meta["vocab_size"] <= most:
        raise UserError(f"{path}: vocab_size must be between 1 and {most} for {meta['dtype']} ids, "
                        f"not {meta['vocab_size']}")
    for split in SPLITS:
        if meta[f"{split}_tokens"] < 0:
            raise UserError(f"{path}: {split}_tokens must not be negative")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        shards = split_shards(meta, split)
        try:
            total = sum(int(s["tokens"]) for s in shards)
            files = [(data_dir / s["file"], int(s["tokens"])) for s in shards]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: the {split} shards must each have a file and a token count") from None
        if total != meta[f"{split}_tokens"]:
            raise UserError(f"{path}: the {split} shards hold {total} tokens but {split}_tokens says "
                            f"{meta[f'{split}_tokens']}")
        for bin_path, n in files:
            if not bin_path.is_file():
                raise UserError(f"{bin_path} is missing")
            want, got = n * itemsize, bin_path.stat().st_size
            if got != want:
                raise UserError(
                    f"{bin_path} holds {got} bytes but meta.json says {n} {meta['dtype']} tokens ({want} bytes): "
                    "the directory is damaged or mixed up"
                )
    _check_tokenizer(data_dir, meta)
    return meta


def _check_tokenizer(data_dir: Path, meta: dict[str, Any]) -> None:
    want = (meta.get("files") or {}).get(TOKENIZER_FILE, {}).get("sha256")
    if want is None:
        return
    tok_path = data_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise UserError(f"{tok_path} is missing (meta.json lists it)")
    got = sha256_file(tok_path)
    if got != want:
        try:
            from ..tokenizer import Tokenizer

            vocab = f"vocab {Tokenizer.load(tok_path).vocab_size}"
        except UserError:
            vocab = "not a valid tokenizer"
        raise UserError(f"{tok_path} ({vocab}, sha256 {got[:12]}) is not the tokenizer meta.json was written with "
                        f"(vocab {meta['vocab_size']}, sha256 {want[:12]}): the directory is mixed up")


def split_tokens(data_dir: str | os.PathLike, meta: dict[str, Any], split: str) -> Union[np.memmap, ShardedTokens]:
    """The split's tokens as one flat read-only array (memory-mapped; shards joined)."""
    data_dir = Path(data_dir)
    shards = [s for s in split_shards(meta, split) if s["tokens"] > 0]
    if len(shards) == 1:
        return np.memmap(data_dir / shards[0]["file"], dtype=meta["dtype"], mode="r", shape=(shards[0]["tokens"],))
    return ShardedTokens([data_dir / s["file"] for s in shards], [s["tokens"] for s in shards], meta["dtype"])


# Ids checked when a split is opened: all of a split this short, else this many evenly spread
# windows of SAMPLE_WINDOW ids (a cheap look for damaged or foreign token files; --verify reads all).
SAMPLE_WINDOW = 4096
SAMPLE_WINDOWS = 16
_CHECK_CHUNK = 1 << 24


def check_ids(tokens: Any, vocab_size: int, where: str, *, full: bool) -> None:
    """UserError naming the first token id at or past `vocab_size`: among all `tokens` (`full`),
    or an evenly spread sample of them."""
    n = len(tokens)
    if full or n <= SAMPLE_WINDOW * SAMPLE_WINDOWS:
        spans = [(a, min(n, a + _CHECK_CHUNK)) for a in range(0, n, _CHECK_CHUNK)]
    else:
        starts = np.linspace(0, n - SAMPLE_WINDOW, SAMPLE_WINDOWS).astype(np.int64).tolist()
        spans = [(a, a + SAMPLE_WINDOW) for a in starts]
    for a, b in spans:
        ids = np.asarray(tokens[a:b])
        if ids.size and int(ids.max()) >= vocab_size:
            at = int(np.argmax(ids >= vocab_size))
            raise UserError(f"{where}: token id {int(ids[at])} at position {a + at:,} is outside the vocabulary "
                            f"({vocab_size} ids): the token files are damaged or were made with another tokenizer"
                            + ("" if full else " (data-info --verify checks every id)"))


# keeps shuffle's per-epoch draws ([seed, SHUFFLE_STREAM, epoch]) apart from random sampling's per-step ones ([seed, step])
SHUFFLE_STREAM = 999


class TokenDataset:
    """One split of a prepared data directory, memory-mapped read-only.

    Batches come from `batch_offsets(step, ...)`, a pure function of (seed, step) (shuffle: of seed and the
    windows drawn before), so a resumed run or any number of data-parallel ranks (each slicing the global
    batch) see exactly the same token windows.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        block_size: int = 256,
        *,
        seed: int = 1337,
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, not {split!r}")
        if block_size < 1:
            raise UserError(f"block size must be at least 1, not {block_size}")
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self.split = split
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.n_tokens: int = self.meta[f"{split}_tokens"]
        self.dtype = np.dtype(self.meta["dtype"])
        if self.n_tokens == 0:
            raise UserError(f"the {split} split of {self.data_dir} is empty")
        # one np.memmap, or ShardedTokens over several files: the same offsets give the same tokens
        self.tokens = split_tokens(self.data_dir, self.meta, split)
        check_ids(self.tokens, self.vocab_size, f"the {split} split of {self.data_dir}", full=False)
        if self.block_size > self.n_tokens - 1:
            raise UserError(
                f"block size {self.block_size} is too large for the {split} split of {self.data_dir}: "
                f"it holds {self.n_tokens} tokens, so the block size can be at most {self.n_tokens - 1}"
            )

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def max_offset(self) -> int:
        """Largest valid window start: x and y need block_size + 1 tokens together."""
        return self.n_tokens - self.block_size - 1

    def batch_offsets(self, step: int, batch_size: int, seed: int | None = None, sampling: str = "random",
                      start: int | None = None) -> np.ndarray:
        """Window starts for global optimizer step `step`. random: uniform in [0, max_offset], with replacement, a
        pure function of (seed, step). shuffle: windows start .. start + batch_size - 1 of an endless sequence of
        epochs, each a permutation of the split's block-aligned windows shifted by one phase (shuffled_windows);
        `start` is the windows drawn so far (train passes its token count / block_size, so a resume with another
        batch size goes on where it stopped), by default step * batch_size."""
        seed = self.seed if seed is None else seed
        if sampling not in ("random", "shuffle"):
            raise ValueError(f"sampling must be random or shuffle, not {sampling!r}")
        if sampling == "shuffle":
            first = int(step) * batch_size if start is None else int(start)
            windows = np.arange(first, first + batch_size, dtype=np.int64)
            n = self._epoch_windows()
            epochs = windows // n
            out = np.empty(batch_size, dtype=np.int64)
            for epoch in np.unique(epochs):
                order, phase = self.shuffled_windows(int(seed), int(epoch))
                here = epochs == epoch
                out[here] = order[windows[here] % n].astype(np.int64) * self.block_size + phase
            return out
        rng = np.random.default_rng([int(seed), int(step)])
        return rng.integers(0, self.max_offset, size=batch_size, endpoint=True, dtype=np.int64)

    def _epoch_windows(self) -> int:
        """Block-aligned windows an epoch visits: as many whole blocks as fit below max_offset + 1 (at least one)."""
        return max(1, (self.max_offset + 1) // self.block_size)

    def shuffled_windows(self, seed: int, epoch: int) -> tuple[np.ndarray, int]:
        """Epoch `epoch`'s order of the windows (a permutation of range(_epoch_windows())) and its phase: window k
        starts at k * block_size + phase, so every epoch cuts the text at other places. The last two epochs asked
        are kept (a step's batch spans at most two, unless the split holds fewer windows than a batch): each
        computed once, 4 bytes a window (a 10B-token split in 256-token windows: 160 MB an epoch, a few seconds
        to shuffle)."""
        cache = self.__dict__.setdefault("_epochs", {})
        if (seed, epoch) not in cache:
            n = self._epoch_windows()
            rng = np.random.default_rng([seed, SHUFFLE_STREAM, epoch])
            phase_end = min(self.block_size, self.max_offset - (n - 1) * self.block_size + 1)
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            rng.shuffle(order)  # (the order rng.permutation(n) gives, in half the memory)
            cache[(seed, epoch)] = (order, int(rng.integers(0, phase_end)))
            while len(cache) > 2:
                cache.pop(next(iter(cache)))
        return cache[(seed, epoch)]

    def get_batch(self, offsets: np.ndarray):
        """(x, y) int64 tensors of shape (B, block_size); y is x shifted by one token."""
        import torch

        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1:
            raise ValueError("offsets must be one-dimensional")
        if offsets.size and (offsets.min() < 0 or offsets.max() > self.max_offset):
            raise ValueError(f"offsets must lie in [0, {self.max_offset}]")
        idx = offsets[:, None] + np.arange(self.block_size + 1, dtype=np.int64)
        buf = self.tokens[idx].astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        return x, y


def load_tokenizer(data_dir: str | os.PathLike):
    """The tokenizer of a prepared data directory."""
    from ..tokenizer import Tokenizer

    return Tokenizer.load(data_dir)


def data_info(data_dir: str | os.PathLike, *, sample_tokens: int = 200, verify: bool = False) -> str:
    """A readable summary of a prepared directory: manifest, token counts, decoded samples.

    Args:
        data_dir: a prepared data directory
        sample_tokens: tokens to decode from each split
        verify: check the sha256 of every file (each shard too) against meta.json, and every token id
            against the vocabulary (UserError if one is wrong)
    """
    check_range("--sample-tokens", sample_tokens, "[0, inf)")
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    tok = load_tokenizer(data_dir)
    lines = [f"data directory: {data_dir}", "manifest (meta.json):"]
    lines += ["  " + line for line in json.dumps(meta, indent=2, ensure_ascii=False).splitlines()]
    lines.append(
        f"tokens: train {meta['train_tokens']:,}  val {meta['val_tokens']:,}  "
        f"({meta['tokenizer']}, vocab {meta['vocab_size']:,}, {meta['dtype']})"
    )
    if verify:
        if tok.vocab_size != meta["vocab_size"]:
            raise UserError(f"{data_dir / TOKENIZER_FILE} has {tok.vocab_size} ids but meta.json says vocab_size "
                            f"{meta['vocab_size']}: the directory is mixed up")
        checked = _verify(data_dir, meta)
        lines.append(f"sha256: all files match meta.json ({checked} files); every token id is in the vocabulary")
    for split in SPLITS:
        n = meta[f"{split}_tokens"]
        shards = split_shards(meta, split)
        if len(shards) > 1:
            lines.append(f"{split}: {len(shards)} shards ({shards[0]['file']} ... {shards[-1]['file']})")
        tokens = split_tokens(data_dir, meta, split) if n else np.zeros(0, dtype=meta["dtype"])
        sample = tok.decode(np.asarray(tokens[: max(0, sample_tokens)]).astype(np.int64))
        lines.append(f"{split} sample (first {min(n, sample_tokens)} tokens, decoded):")
        lines += ["  | " + line for line in sample.split("\n")]
    return "\n".join(lines)


def _verify(data_dir: Path, meta: dict[str, Any]) -> int:
    """Check the sha256 of every shard and every listed file against meta.json; how many files."""
    want: dict[str, str] = {name: info.get("sha256") for name, info in (meta.get("files") or {}).items()}
    for split in SPLITS:
        for s in split_shards(meta, split):
            if "sha256" in s:
                want.setdefault(s["file"], s["sha256"])
            elif s["file"] not in want:
                raise UserError(f"{data_dir / s['file']}: meta.json records no sha256 for it")
    for name, digest in want.items():
        got = sha256_file(data_dir / name)
        if got != digest:
            raise UserError(f"{data_dir / name}: sha256 {got} does not match meta.json")
    for split in SPLITS:  # every id, file by file: a file can match a manifest that names a smaller vocabulary
        for s in split_shards(meta, split):
            if s["tokens"]:
                tokens = np.memmap(data_dir / s["file"], dtype=meta["dtype"], mode="r", shape=(s["tokens"],))
                check_ids(tokens, meta["vocab_size"], str(data_dir / s["file"]), full=True)
    return len(want)
