"""What `prepare` says when it ends: one summary line on stderr, and a warning when characters
became <unk>."""

from __future__ import annotations

import sys
from pathlib import Path

from .dataset import SPLITS


def warn_unknown_chars(meta: dict) -> None:
    """One line on stderr when characters became <unk> (char tokenizers only)."""
    r = meta["cleaning"]
    if not (r["val_unknown_chars"] or r.get("train_unknown_chars")):
        return
    unseen = meta.get("val_unseen_chars") or ""
    if unseen and not r.get("train_unknown_chars"):
        shown = ", ".join(repr(c) for c in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
        print(f"warning: the val split holds {len(unseen)} character(s) unseen in train ({shown}): "
              f"{r['val_unknown_chars']:,} occurrence(s) became <unk>; --char-vocab all builds the vocabulary "
              "from every split", file=sys.stderr)
    else:
        print(f"warning: {r.get('train_unknown_chars', 0):,} train and {r['val_unknown_chars']:,} val character(s) "
              "are not in the tokenizer's vocabulary and became <unk>", file=sys.stderr)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def summary(out: Path, meta: dict, seconds: float) -> str:
    """The one line `prepare` always ends with on stderr."""
    splits = "; ".join(f"{s} {meta[f'{s}_documents']:,} docs, {_mb(meta[f'{s}_bytes'])}, {meta[f'{s}_tokens']:,} tokens"
                       + (f" in {len(meta['shards'][s])} shards" if len(meta["shards"][s]) > 1 else "")
                       for s in SPLITS)
    bpe = meta.get("bpe_training")
    if meta["settings"].get("tokenizer_from"):
        trained = f"tokenizer from {meta['settings']['tokenizer_from']}"
    elif bpe:
        how = ("all of it" if bpe["sample_bytes"] >= bpe["train_bytes"]
               else f"an evenly spread sample, --bpe-sample-mb {bpe['sample_mb_limit']}")
        trained = f"BPE trained on {_mb(bpe['sample_bytes'])} of {_mb(bpe['train_bytes'])} train text ({how})"
    else:
        trained = "char vocabulary from " + ("every split" if meta["settings"].get("char_vocab") == "all" else "train")
    where = f"part {meta['part']['index']} of {meta['part']['num_parts']} into {out}" if meta.get("part") else str(out)
    unknown = meta["cleaning"]["train_unknown_chars"] + meta["cleaning"]["val_unknown_chars"]
    return (f"prepared {where}: {splits}; {meta['tokenizer']} vocab {meta['vocab_size']:,}; "
            f"{unknown:,} unknown chars; {trained}; "
            f"{seconds:.1f} s ({meta['bytes_in'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
