"""Passes 2 and 3 of `prepare`: learn the tokenizer from the spool (or take a given one), then
encode both splits into token files.

Pass 2 collects the characters (char) or counts byte-level pieces on an evenly spread sample of
at most --bpe-sample-mb of the train text (bpe), and trains the tokenizer; pass 3 encodes every
unit. Both run as tasks in worker processes (see units.py), so memory is bounded by the buffer
setting, never by the corpus.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dataset import SPLITS, TOKENIZER_FILE, dtype_for_vocab
from .shards import ShardWriter
from .units import (CHAR_DOC_SEPARATOR, Runner, Units, char_task, count_task, encode_task, make_tasks,
                    progress_bar, sampled_blocks, task_size)

# BPE learns from piece counts replayed to tokenizers' trainer; beyond this many
# occurrences the counts are scaled down (see tokenizer.scale_counts).
BPE_MAX_REPLAY = 4_000_000
# While counting, the rarest pieces are forgotten beyond this many distinct ones (bounds
# memory on corpora with endless distinct pieces; rare pieces hardly affect which merges win).
BPE_MAX_DISTINCT_PIECES = 1 << 19


@dataclass
class Work:
    """What passes 2 and 3 work on: the temporary output directory and its spool, the two
    splits' units, the runner, the target task size and whether progress bars show."""

    tmp: Path
    spool: Path
    train: Units
    val: Units
    runner: Runner
    task_bytes: int
    show: bool


@dataclass
class Learned:
    """The tokenizer (saved in the temporary directory) and the tasks that encode each split."""

    tok: Any
    tasks: dict[str, list[tuple]]
    piece_dir: Path | None = None  # bpe: the pieces saved while counting, reused when encoding
    bpe_info: dict[str, Any] | None = None
    unseen: str = ""  # char: val characters that the train split lacks


def _plain_tasks(w: Work) -> dict[str, list[tuple]]:
    return {"train": make_tasks(w.train, w.task_bytes, None), "val": make_tasks(w.val, w.task_bytes, None)}


def given_tokenizer(w: Work, tok_file: Path) -> Learned:
    """--tokenizer-from: the tokenizer copied byte for byte (parts compare its sha256)."""
    from ..tokenizer import Tokenizer, copy_tokenizer

    copy_tokenizer(tok_file, w.tmp)
    return Learned(Tokenizer.load(w.tmp / TOKENIZER_FILE), _plain_tasks(w))


def learn_char(w: Work, char_vocab: str) -> Learned:
    """Pass 2 (char): the vocabulary of the train split, or of every split (`char_vocab` "all")."""
    from ..tokenizer import train_char_tokenizer

    tasks = _plain_tasks(w)
    seen = []
    with progress_bar(w.show, w.train.bytes + w.val.bytes, "characters") as bar:
        for split in SPLITS:
            chars: set[str] = set()
            for task, found in zip(tasks[split], w.runner.map(char_task, (str(w.spool),), tasks[split])):
                chars.update(found)
                bar.update(task_size(task))
            seen.append(chars)
    train_chars, val_chars = seen
    if w.train.documents > 1 or w.val.documents > 1:
        train_chars.update(CHAR_DOC_SEPARATOR)
    unseen = "".join(sorted(val_chars - train_chars))
    if char_vocab == "all":
        tok = train_char_tokenizer([train_chars | val_chars])
    else:
        tok = train_char_tokenizer([train_chars], add_unk=bool(unseen))
    tok.save(w.tmp)
    return Learned(tok, tasks, unseen=unseen)


def learn_bpe(w: Work, vocab_size: int, min_frequency: int, sample_mb: int) -> Learned:
    """Pass 2 (bpe): count the pieces of an evenly spread sample of the train text, then train."""
    from ..tokenizer import scale_counts, train_bpe_from_counts

    fraction = min(1.0, (sample_mb << 20) / max(w.train.bytes, 1))
    sampled = sampled_blocks(int(w.train.blocks().max()) + 1 if len(w.train.sizes) else 0, fraction)
    tasks = {"train": make_tasks(w.train, w.task_bytes, sampled), "val": make_tasks(w.val, w.task_bytes, None)}
    count_tasks = [t for t in tasks["train"] if t[0] >= 0]
    sample_bytes = sum(map(task_size, count_tasks))
    piece_dir = w.tmp / "pieces"
    piece_dir.mkdir()
    counts, pruned_below = _count_pieces(w, count_tasks, piece_dir, sample_bytes)
    train_counts, count_scale = scale_counts(counts, BPE_MAX_REPLAY)
    del counts
    tok = train_bpe_from_counts(train_counts, vocab_size, min_frequency=min_frequency, show_progress=w.show)
    del train_counts
    tok.save(w.tmp)
    bpe_info = {"sample_bytes": sample_bytes, "train_bytes": w.train.bytes, "sample_mb_limit": sample_mb,
                "distinct_pieces_pruned_below": pruned_below, "count_scale": count_scale}
    return Learned(tok, tasks, piece_dir=piece_dir, bpe_info=bpe_info)


def _count_pieces(w: Work, count_tasks: list[tuple], piece_dir: Path, sample_bytes: int) -> tuple[Counter, int]:
    """The sampled blocks' piece counts (saving each block's pieces in `piece_dir`), and the
    count at or below which pieces were forgotten to stay under BPE_MAX_DISTINCT_PIECES."""
    counts: Counter = Counter()
    pruned_below = 0
    with progress_bar(w.show, sample_bytes, "counting") as bar:
        for task, (uniq, c) in zip(count_tasks, w.runner.map(count_task, (str(w.spool), str(piece_dir)),
                                                              count_tasks)):
            counts.update(dict(zip(uniq, c)))
            bar.update(task_size(task))
            while len(counts) > BPE_MAX_DISTINCT_PIECES:  # after each block: the same for any workers
                pruned_below += 1
                counts = Counter({p: n for p, n in counts.items() if n > pruned_below})
    return counts, pruned_below


def encode_splits(w: Work, learned: Learned, shard_tokens: int) -> tuple[str, dict[str, list], dict[str, int]]:
    """Pass 3: both splits encoded into token files in the temporary directory; returns the
    ids' dtype, each split's shard manifest, and how many ids of each split are <unk>."""
    dtype = dtype_for_vocab(learned.tok.vocab_size)
    args = (str(w.spool), str(w.tmp / TOKENIZER_FILE), dtype, str(learned.piece_dir) if learned.piece_dir else None)
    shards: dict[str, list] = {}
    unknown_chars = {split: 0 for split in SPLITS}
    with progress_bar(w.show, w.train.bytes + w.val.bytes, "encoding") as bar:
        for split in SPLITS:
            shards[split], unknown_chars[split] = _encode_split(w, split, learned.tasks[split], args, dtype,
                                                                shard_tokens, bar)
    return dtype, shards, unknown_chars


def _encode_split(w: Work, split: str, tasks: list[tuple], args: tuple, dtype: str, shard_tokens: int,
                  bar) -> tuple[list, int]:
    writer = ShardWriter(w.tmp, split, dtype, shard_tokens)
    unknown = 0
    try:
        for task, (data, unk) in zip(tasks, w.runner.map(encode_task, args, tasks)):
            writer.write(data)
            unknown += unk
            bar.update(task_size(task))
            if w.show:
                bar.set_postfix_str(f"{split} {writer.tokens:,} tokens", refresh=False)
        return writer.close(), unknown
    finally:
        writer.abort()
