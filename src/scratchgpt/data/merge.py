"""One corpus prepared in parts: `prepare --num-parts P --part I` takes its share of the
input files (`select_part`), and `prepare --merge` combines the part directories into one
data directory that lists their token files (`merge_parts`)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import UserError
from ..runs.staging import staged
from ..utils import atomic_write_json
from .dataset import META_FILE, SHARDED_FORMAT_VERSION, SPLITS, TOKENIZER_FILE, load_meta, split_shards
from .inputs import Source
from .units import separator_ids

# Settings that change the token stream: parts merged together must agree on them.
_STREAM_SETTINGS = ("val_fraction", "seed", "text_field", "nfc", "normalize_newlines", "strip_control",
                    "strip_gutenberg", "dedup", "errors")


def select_part(sources: list[Source], num_parts: int, part: int) -> tuple[list[Source], dict]:
    """Part `part`'s share of the inputs: consecutive whole files, balanced by size (a file
    belongs to the part its middle byte falls in), so the parts in order are the corpus."""
    if any(s.kind in ("stdin", "builtin", "hub") for s in sources):
        raise UserError("--num-parts needs input files (not stdin, --hf-dataset or the embedded corpus)")
    sizes = np.array([s.size() for s in sources], dtype=np.float64)
    middle = np.cumsum(sizes) - sizes / 2
    owner = np.minimum((middle * num_parts / max(sizes.sum(), 1.0)).astype(np.int64), num_parts - 1)
    counts = np.bincount(owner, minlength=num_parts)
    if (counts == 0).any():
        raise UserError(f"--num-parts {num_parts}: part {int(np.argmin(counts))} would get no input file "
                        f"({len(sources)} files in all, of uneven sizes): use fewer parts")
    listing = [[Path(s.name).name, int(n), s.is_val] for s, n in zip(sources, sizes)]
    info = {"index": part, "num_parts": num_parts, "files": int(counts[part]),
            "inputs_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    return [s for s, k in zip(sources, owner) if k == part], info


def merge_parts(part_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                force: bool = False) -> dict[str, Any]:
    """`prepare --merge`: one data directory from the parts of a corpus (`--num-parts P --part I`).

    Its meta.json lists the parts' token files in order by relative path (nothing is copied:
    keep the part directories where they are, beside `out`), with the document separator
    between parts; the token stream is the one a single process makes of the whole corpus
    with the same tokenizer, byte for byte. Returns the new meta.json content.
    """
    t0 = time.time()
    out = Path(out)
    if not part_dirs:
        raise UserError("--merge needs the part directories as inputs")
    metas = _load_parts(part_dirs)
    _check_parts(metas)
    out_abs = Path(os.path.abspath(out))
    for _, d, _ in metas:
        d_abs = Path(os.path.abspath(d))
        if d_abs == out_abs or out_abs in d_abs.parents:
            raise UserError(f"--out {out} must not be or hold a part directory ({d}): the merged directory "
                            "refers to the parts' files")
    with staged(out, "data", force=force, inputs=[Path(d) for d in part_dirs],
                exists=f"output directory {out} already exists (use --force to replace it)", empty_is_new=False,
                summarize=True) as tmp:
        meta = _write_merged(tmp, metas, out_abs)
    counts = "; ".join(f"{s} {meta[f'{s}_documents']:,} docs, {meta[f'{s}_tokens']:,} tokens in "
                       f"{len(meta['shards'][s])} files" for s in SPLITS)
    print(f"merged {len(metas)} parts into {out} (their token files stay where they are; nothing copied): {counts}; "
          f"{meta['tokenizer']} vocab {meta['vocab_size']:,}; {time.time() - t0:.1f} s", file=sys.stderr)
    return meta


def _load_parts(part_dirs: Sequence[str | os.PathLike]) -> list[tuple[int, Path, dict]]:
    """(index, directory, meta) of each part, in index order."""
    metas = []
    for d in map(Path, part_dirs):
        meta = load_meta(d)
        if not isinstance(meta.get("part"), dict):
            raise UserError(f"{d} is not a part directory (prepare --num-parts N --part I makes those)")
        metas.append((meta["part"]["index"], d, meta))
    metas.sort(key=lambda m: m[0])
    return metas


def _check_parts(metas: list[tuple[int, Path, dict]]) -> None:
    """The parts are parts 0 .. P-1 of one corpus, each once, prepared the same way."""
    num_parts = metas[0][2]["part"]["num_parts"]
    first = metas[0][2]
    for index, d, meta in metas:
        info = meta["part"]
        if info["num_parts"] != num_parts:
            raise UserError(f"{d} is part of {info['num_parts']} parts, {metas[0][1]} of {num_parts}")
        tok_sha = meta["files"][TOKENIZER_FILE]["sha256"], first["files"][TOKENIZER_FILE]["sha256"]
        for what, a, b in (("tokenizer", *tok_sha),
                           ("input files", info["inputs_sha256"], first["part"]["inputs_sha256"]),
                           ("token dtype", meta["dtype"], first["dtype"]),
                           *((f"--{k.replace('_', '-')}", meta["settings"].get(k), first["settings"].get(k))
                             for k in _STREAM_SETTINGS)):
            if a != b:
                raise UserError(f"{d} and {metas[0][1]} were prepared with different {what} "
                                f"({str(a)[:16]} vs {str(b)[:16]}): they are not parts of one corpus")
    indices = [m[0] for m in metas]
    if indices != list(range(num_parts)):
        missing = sorted(set(range(num_parts)) - set(indices))
        dup = sorted({i for i in indices if indices.count(i) > 1})
        raise UserError(f"--merge needs parts 0 .. {num_parts - 1} once each: "
                        + (f"part(s) {missing} missing" if missing else f"part(s) {dup} given twice"))


def _write_merged(tmp: Path, metas: list[tuple[int, Path, dict]], out_abs: Path) -> dict[str, Any]:
    """The merged directory's tokenizer, separator file and meta.json, written into `tmp`."""
    from ..tokenizer import Tokenizer, copy_tokenizer

    first = metas[0][2]
    copy_tokenizer(metas[0][1] / TOKENIZER_FILE, tmp)
    sep = separator_ids(Tokenizer.load(tmp / TOKENIZER_FILE)).astype(first["dtype"])
    sep_file = {"file": "separator.bin", "tokens": len(sep), "sha256": hashlib.sha256(sep.tobytes()).hexdigest()}
    shards = {split: _merged_split(metas, split, sep_file, out_abs) for split in SPLITS}
    if any(s["file"] == sep_file["file"] for split in SPLITS for s in shards[split]):
        sep.tofile(tmp / sep_file["file"])
    meta = _merged_meta(first, [m[2] for m in metas], shards, [os.path.relpath(os.path.abspath(m[1]), out_abs)
                                                              for m in metas])
    meta["files"] = {TOKENIZER_FILE: first["files"][TOKENIZER_FILE]}
    if (tmp / sep_file["file"]).exists():
        meta["files"][sep_file["file"]] = {"bytes": sep.nbytes, "sha256": sep_file["sha256"]}
    atomic_write_json(tmp / META_FILE, meta)
    return meta


def _merged_split(metas: list[tuple[int, Path, dict]], split: str, sep_file: dict, out_abs: Path) -> list[dict]:
    """One split's token files over all parts, by path relative to --out, the separator between parts."""
    shards: list[dict] = []
    for _, d, meta in metas:
        files = [s for s in split_shards(meta, split) if s["tokens"] > 0]
        if files and shards:
            shards.append(dict(sep_file))
        for s in files:
            digest = s.get("sha256") or meta["files"][s["file"]]["sha256"]
            rel = os.path.relpath(os.path.abspath(d / s["file"]), out_abs)
            shards.append({"file": rel, "tokens": s["tokens"], "sha256": digest})
    if not shards:
        raise UserError(f"the {split} split is empty in every part: give more text or a larger --val-fraction")
    return shards


def _merged_meta(first: dict, metas: list[dict], shards: dict[str, list], part_dirs: list[str]) -> dict[str, Any]:
    from .. import __version__

    total = {s: sum(x["tokens"] for x in shards[s]) for s in SPLITS}
    cleaning = {k: sum(m["cleaning"].get(k, 0) for m in metas) for k in first["cleaning"]}
    settings = {k: v for k, v in first["settings"].items()}
    settings["inputs"] = [p for m in metas for p in m["settings"]["inputs"]]
    return {
        "format_version": SHARDED_FORMAT_VERSION,
        "created_by": f"scratchgpt {__version__}",
        **{k: first[k] for k in ("tokenizer", "vocab_size", "dtype", "eot_id", "unk_id", "document_separator")},
        "train_tokens": total["train"],
        "val_tokens": total["val"],
        **{k: sum(m[k] for m in metas) for k in ("train_documents", "val_documents", "train_bytes", "val_bytes",
                                                  "bytes_in")},
        "split": first["split"],
        "cleaning": cleaning,
        "val_unseen_chars": "".join(sorted(set("".join(m.get("val_unseen_chars", "") for m in metas)))),
        "bpe_training": None,
        "shards": shards,
        "merged_from": part_dirs,
        "settings": settings,
    }
