"""`scratchgpt prepare`: text in, a prepared data directory out (PrepareConfig says how).

A prepared data directory holds train.bin / val.bin (flat token ids; shards train-00000.bin,
... for long splits), tokenizer.json and meta.json; dataset.py reads it.

The work runs in three passes over a temporary directory beside --out, renamed into place
when complete. Pass 1 (spool.py) reads every input once, streamed, cleans it (clean.py) into a
spool file and decides each document's split; passes 2 and 3 (encode.py) learn the tokenizer
and encode both splits, in worker processes over units of the spool (units.py), so memory is
bounded by --buffer-mb, never by the corpus. A corpus can also be prepared in parts and merged
(merge.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, Optional, Sequence

import numpy as np

from .. import UserError
from ..checks import ConfigError, check_fields
from ..runs.guard import check_out
from ..runs.staging import staged, terminate_as_interrupt
from ..utils import atomic_write_json, sha256_file
from .clean import CleanOptions
from .dataset import FORMAT_VERSION, META_FILE, SHARDED_FORMAT_VERSION, SPLITS, TOKENIZER_FILE
from .encode import Learned, Work, encode_splits, given_tokenizer, learn_bpe, learn_char
from .hub import HubDataset
from .inputs import BUILTIN, Reading, Source, resolve_inputs
from .merge import merge_parts, select_part
from .spool import read_corpus, split_docs
from .summary import summary, warn_unknown_chars
from .units import CHAR_DOC_SEPARATOR, Runner, Units, progress_bar, separator_ids

def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class PrepareConfig:
    """How `scratchgpt prepare` cleans, splits and tokenizes. Every field is a `prepare` flag
    (`vocab_size` -> `--vocab-size`; a field that is on by default is turned off with `--no-...`)."""

    tokenizer: Literal["char", "bpe"] = "bpe"
    """char: one id per character (nanoGPT's shakespeare_char); bpe: GPT-2 style byte-level BPE."""
    vocab_size: int = 4096
    """BPE vocabulary size, at least 257 (256 bytes + <|endoftext|>)."""
    tokenizer_from: Optional[str] = None
    """Use the tokenizer of this prepared directory, run, checkpoint (or this tokenizer.json) instead of training
    one (an imported model's run: its own tokenizer, so the data fine-tunes it)."""
    hf_dataset: Optional[str] = None
    """Also read a Hugging Face dataset: ORG/NAME on the hub (streamed, never downloaded whole; from the local
    cache when HF_HUB_OFFLINE=1), or a folder laid out as a hub dataset repo. Each row's --text-field is a
    document. Needs `pip install datasets`."""
    hf_config: Optional[str] = None
    """--hf-dataset's configuration (subset), e.g. wikitext-2-raw-v1 (default: the dataset's default one)."""
    split: str = "train"
    """--hf-dataset's split to read; its rows are then split into train and val as any input's are."""
    hf_revision: Optional[str] = None
    """--hf-dataset's revision on the hub: a branch, tag or commit (default: main)."""
    val: Optional[list[str]] = None
    """Explicit validation inputs (otherwise --val-fraction of the documents, or one document's tail)."""
    val_fraction: float = 0.1
    """Each document is validation with this probability (a hash of --seed and its content decides), in
    (0, 1); with a single document, the share of its tail."""
    text_field: str = field(default="text", metadata={"aliases": ("--jsonl-field",)})
    """Field (column) holding each document's text in .jsonl, parquet and datasets.save_to_disk
    inputs."""
    errors: Literal["strict", "replace"] = "strict"
    """Invalid UTF-8: fail naming the byte offset, or replace the bytes and count them."""
    nfc: bool = True
    """Unicode NFC normalisation (--no-nfc skips it)."""
    normalize_newlines: bool = field(default=True, metadata={"flag": "--no-newlines"})
    """Turn \\r\\n and \\r into \\n (--no-newlines keeps them as they are)."""
    strip_control: bool = True
    """Remove control characters other than tab and newline (--no-strip-control keeps them)."""
    strip_gutenberg: bool = False
    """Strip Project Gutenberg headers and footers."""
    dedup: bool = False
    """Drop exact-duplicate documents."""
    char_vocab: Literal["train", "all"] = "train"
    """char: the vocabulary of the train split (val characters it lacks become <unk>, with a warning)
    or of every split (as nanoGPT does)."""
    min_frequency: int = 2
    """BPE: merge only pairs seen at least this often."""
    bpe_sample_mb: int = 256
    """BPE: train the tokenizer on at most about this many MB of the train text, spread evenly over
    it (every byte is still encoded)."""
    shard_tokens: int = 100_000_000
    """Tokens per token file: a longer split is written as train-00000.bin, train-00001.bin, ...
    (200 MB each for uint16 ids)."""
    num_parts: int = 1
    """Prepare only one of this many parts of the inputs (whole files, balanced by size), with --part
    and --tokenizer-from; then --merge."""
    part: int = 0
    """Which part to prepare, 0 .. --num-parts - 1."""
    merge: bool = False
    """Combine the part directories given as inputs into --out: a manifest of their token files,
    nothing copied."""
    buffer_mb: int = 64
    """Text buffered in memory at once, in MB (speed and memory only, never the output)."""
    workers: Optional[int] = None
    """Worker processes (default: all cores; speed only, never the output)."""
    seed: int = 1337
    """Seeds the document split."""
    force: bool = False
    """Replace an existing output directory."""

    def __post_init__(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"), {})  # types; prepare() checks the ranges
        for name, most in (("vocab_size", 2**24), ("workers", 1024)):  # what must not reach the tokenizer or the OS
            value = getattr(self, name)
            if value is not None and value > most:
                raise ConfigError(f"--{name.replace('_', '-')} must be at most {most}, got {value}")


DEFAULT_DATA_DIR = Path("data/default")  # where `prepare` writes without --out, and bare `train` reads


def default_data_dir() -> Path:
    """The embedded corpus (CPython's pydoc topics) as char-level data, prepared on first use."""
    d = DEFAULT_DATA_DIR
    if (d / META_FILE).exists():
        return d
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun only rank 0 prepares; the others wait for it
        deadline = time.time() + 600
        while not (d / META_FILE).exists():
            if time.time() > deadline:
                raise UserError(f"timed out waiting for rank 0 to prepare {d}")
            time.sleep(0.5)
        return d
    print(f"preparing the embedded default corpus into {d} ...", file=sys.stderr)
    prepare(inputs=[], out=d, tokenizer="char")
    return d


def prepare(inputs: Sequence[str | os.PathLike] | None, out: str | os.PathLike, options: Optional[PrepareConfig] = None,
            *, progress: bool | None = None, stdin: BinaryIO | None = None, **overrides: Any) -> dict[str, Any]:
    """Turn text into a prepared data directory `out`; returns its meta.json content.

    `options` (PrepareConfig, or its fields as keywords) say how. `inputs`: text files,
    directories (recursive), globs, JSONL (one document per line), parquet files and
    `datasets.save_to_disk` folders (one document per row; the text in `text_field`),
    .gz/.bz2/.xz/.zst compressed text and JSONL, and "-" for stdin; none means the bundled
    pydoc topics (or, with `hf_dataset`, that dataset alone: see hub.py). Other files are one
    document each. `val` names explicit validation inputs;
    otherwise each document is validation with probability `val_fraction` (decided by a
    hash of `seed` and its content, so adding documents never moves others), or, with a
    single document, its tail (as nanoGPT does). `workers` and `buffer_mb` change speed
    and memory only, never the output. With `merge`, the inputs are part directories (see
    `merge_parts`). A progress bar shows on a terminal; a one-line summary always ends on
    stderr. Bad input raises UserError and leaves nothing behind.
    """
    if "jsonl_field" in overrides:  # the field's old name
        overrides["text_field"] = overrides.pop("jsonl_field")
    o = replace(options or PrepareConfig(), **overrides)
    if o.merge:
        return merge_parts(list(inputs or []), out, force=o.force)
    t0 = time.time()
    out = Path(out)
    inputs = list(inputs or [])
    val = list(o.val or [])
    workers = _check_options(o, explicit_val=bool(val))
    tok_file = _tokenizer_file(o.tokenizer_from)
    guard = dict(force=o.force, inputs=[Path(p) for p in [*inputs, *val, tok_file] if p is not None],
                 exists=f"output directory {out} already exists (use --force to replace it)", empty_is_new=False)
    check_out(out, "data", **guard)  # before any work (staged checks again before the swap)
    sources, part = _sources(inputs, val, o)
    show = sys.stderr.isatty() if progress is None else progress
    settings = _settings(o, inputs, val, tok_file)

    with staged(out, "data", **guard, summarize=True) as tmp, terminate_as_interrupt():
        meta = _prepare_into(tmp, sources, o, tok_file=tok_file, explicit_val=bool(val), part=part,
                             buffer_bytes=o.buffer_mb << 20, workers=workers, show=show, stdin=stdin,
                             settings=settings)
    warn_unknown_chars(meta)
    print(summary(out, meta, time.time() - t0), file=sys.stderr)
    return meta


def _check_options(o: PrepareConfig, explicit_val: bool) -> int:
    """The ranges and combinations PrepareConfig's types cannot state; returns the worker count."""
    from ..tokenizer import MAX_VOCAB, MIN_BPE_VOCAB

    if o.tokenizer not in ("char", "bpe"):
        raise UserError(f"--tokenizer must be 'char' or 'bpe', not {o.tokenizer!r}")
    if o.tokenizer == "bpe" and not o.tokenizer_from and not MIN_BPE_VOCAB <= o.vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for bpe (256 bytes + <|endoftext|>), "
                        f"not {o.vocab_size}")
    if not explicit_val and not 0.0 < o.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {o.val_fraction}")
    if o.errors not in ("strict", "replace"):
        raise UserError(f"--errors must be 'strict' or 'replace', not {o.errors!r}")
    if o.char_vocab not in ("train", "all"):
        raise UserError(f"--char-vocab must be 'train' or 'all', not {o.char_vocab!r}")
    for name, value, least in (("--buffer-mb", o.buffer_mb, 1), ("--min-frequency", o.min_frequency, 1),
                               ("--bpe-sample-mb", o.bpe_sample_mb, 1), ("--shard-tokens", o.shard_tokens, 1),
                               ("--num-parts", o.num_parts, 1)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, not {value}")
    if not 0 <= o.part < o.num_parts:
        raise UserError(f"--part must be between 0 and --num-parts - 1 ({o.num_parts - 1}), not {o.part}")
    if o.num_parts > 1 and not o.tokenizer_from:
        raise UserError("--num-parts needs --tokenizer-from DIR: every part must encode with the same tokenizer "
                        "(prepare a sample of the corpus first and pass its directory)")
    if not o.hf_dataset and (o.hf_config or o.hf_revision or o.split != "train"):
        raise UserError("--hf-config, --split and --hf-revision need --hf-dataset NAME")
    if o.num_parts > 1 and o.dedup:
        raise UserError("--dedup cannot be combined with --num-parts (duplicates in different parts would stay): "
                        "deduplicate in one process, or the inputs beforehand")
    workers = _default_workers() if o.workers is None else o.workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    return workers


def _tokenizer_file(tokenizer_from: str | None) -> Path | None:
    """--tokenizer-from's tokenizer.json, loaded once so that a bad one fails before any work."""
    from ..tokenizer import Tokenizer

    if not tokenizer_from:
        return None
    tok_file = Path(tokenizer_from)
    if tok_file.is_dir():  # a prepared directory or checkpoint, or a run (its best checkpoint's tokenizer)
        in_run = tok_file / "best" / TOKENIZER_FILE
        own = tok_file / TOKENIZER_FILE
        tok_file = in_run if not own.exists() and in_run.is_file() else own
    Tokenizer.load(tok_file)
    return tok_file


def _sources(inputs: list, val: list, o: PrepareConfig) -> tuple[list[Source], dict | None]:
    """The documents' sources (the inputs, then --val's), cut to --part's share; and the part's info."""
    sources = resolve_inputs(inputs, is_val=False) if inputs or not o.hf_dataset else []
    if o.hf_dataset:
        hub = HubDataset(o.hf_dataset, o.hf_config, o.split, o.hf_revision)
        sources.append(Source("hub", hub.label, hub=hub))
    if val:
        sources += resolve_inputs(val, is_val=True)
        if sum(s.kind == "stdin" for s in sources) > 1:
            raise UserError("stdin ('-') can be given only once")
    if o.num_parts > 1:
        return select_part(sources, o.num_parts, o.part)
    return sources, None


def _settings(o: PrepareConfig, inputs: list, val: list, tok_file: Path | None) -> dict[str, Any]:
    """meta.json's "settings": what the output was made from and how (None where a setting did not apply)."""
    learned_bpe = o.tokenizer == "bpe" and not tok_file
    settings = {
        "inputs": [str(p) for p in inputs] or ([] if o.hf_dataset else [BUILTIN]), "val": [str(p) for p in val],
        "val_fraction": None if val else o.val_fraction, "seed": o.seed,
        "tokenizer": None if tok_file else o.tokenizer, "tokenizer_from": str(tok_file) if tok_file else None,
        "vocab_size": o.vocab_size if learned_bpe else None,
        "min_frequency": o.min_frequency if learned_bpe else None,
        "bpe_sample_mb": o.bpe_sample_mb if learned_bpe else None,
        "char_vocab": o.char_vocab if o.tokenizer == "char" and not tok_file else None,
        "text_field": o.text_field, "nfc": o.nfc, "normalize_newlines": o.normalize_newlines,
        "strip_control": o.strip_control, "strip_gutenberg": o.strip_gutenberg, "dedup": o.dedup,
        "errors": o.errors, "shard_tokens": o.shard_tokens,
    }
    if o.hf_dataset:  # only then: other directories' meta.json stay as they were
        settings["hf_dataset"] = {"name": o.hf_dataset, "config": o.hf_config, "split": o.split,
                                  "revision": o.hf_revision}
    return settings


# -- the three passes ---------------------------------------------------------------------


def _prepare_into(tmp: Path, sources: list[Source], o: PrepareConfig, *, tok_file: Path | None, explicit_val: bool,
                  part: dict | None, buffer_bytes: int, workers: int, show: bool, stdin: BinaryIO | None,
                  settings: dict) -> dict[str, Any]:
    """The three passes into `tmp`; returns the meta.json written there."""
    opts = CleanOptions(seed=o.seed, nfc=o.nfc, normalize_newlines=o.normalize_newlines,
                        strip_control=o.strip_control, strip_gutenberg=o.strip_gutenberg, dedup=o.dedup)
    reading = Reading(errors=o.errors, text_field=o.text_field)
    spool_path = tmp / "corpus.spool"
    (train, val), method = _read_and_split(spool_path, sources, opts, reading, stdin, show, explicit_val,
                                           o.val_fraction, in_part=part is not None)
    # Tasks small enough that a few in flight per worker stay well inside the buffer.
    task_bytes = max(64 << 10, min(4 << 20, buffer_bytes // (16 * workers)))
    w = Work(tmp, spool_path, train, val, Runner(workers, train.bytes + val.bytes), task_bytes, show)
    try:
        learned = _learn_tokenizer(w, o, tok_file)
        dtype, shards, unknown_chars = encode_splits(w, learned, o.shard_tokens)
    finally:
        w.runner.close()
    os.unlink(spool_path)
    if learned.piece_dir is not None:
        shutil.rmtree(learned.piece_dir)
    tokens = {split: sum(s["tokens"] for s in shards[split]) for split in SPLITS}
    if part is None:
        for split in SPLITS:
            if tokens[split] == 0:
                raise UserError(f"the {split} split has no tokens")
    report = vars(opts.report).copy()
    report["train_unknown_chars"] = unknown_chars["train"]  # only a --tokenizer-from vocabulary can miss some
    report["val_unknown_chars"] = unknown_chars["val"]
    meta = _meta(w, learned, dtype, shards, tokens, bytes_in=reading.bytes_in, method=method, report=report,
                 settings=settings)
    if part is not None:
        meta["part"] = part
    atomic_write_json(tmp / META_FILE, meta)
    return meta


def _read_and_split(spool_path: Path, sources: list[Source], opts: CleanOptions, reading: Reading,
                    stdin: BinaryIO | None, show: bool, explicit_val: bool, val_fraction: float, *,
                    in_part: bool) -> tuple[tuple[Units, Units], str]:
    """Pass 1: the inputs cleaned into the spool, split into train and val units; and the split method."""
    with open(spool_path, "wb+") as spool, progress_bar(show, None, "reading") as bar:
        docs = read_corpus(sources, opts, reading, spool, stdin, bar if show else None)
    if not len(docs):
        r = opts.report
        raise UserError(f"the corpus is empty after cleaning ({r.documents_read} document(s) read, "
                        f"{r.empty_documents_dropped} empty, {r.duplicate_documents_removed} duplicate)")
    train_spans, val_spans, method = split_docs(docs, explicit_val, val_fraction, spool_path, in_part=in_part)
    del docs
    with open(spool_path, "rb") as spool:
        return (Units(train_spans, spool), Units(val_spans, spool)), method


def _learn_tokenizer(w: Work, o: PrepareConfig, tok_file: Path | None) -> Learned:
    """Pass 2: the tokenizer given by --tokenizer-from, or one learned from the train text."""
    if tok_file is not None:
        return given_tokenizer(w, tok_file)
    if o.tokenizer == "char":
        return learn_char(w, o.char_vocab)
    return learn_bpe(w, o.vocab_size, o.min_frequency, o.bpe_sample_mb)


def _meta(w: Work, learned: Learned, dtype: str, shards: dict[str, list], tokens: dict[str, int], *,
          bytes_in: int, method: str, report: dict, settings: dict) -> dict[str, Any]:
    """meta.json's content: counts, dtype, shards, cleaning report, sha256s and settings."""
    from .. import __version__

    tok = learned.tok
    tok_path = w.tmp / TOKENIZER_FILE
    itemsize = np.dtype(dtype).itemsize
    sharded = any(len(shards[s]) > 1 for s in SPLITS)
    files = {s["file"]: {"bytes": s["tokens"] * itemsize, "sha256": s["sha256"]}
             for split in SPLITS for s in shards[split]}
    files[TOKENIZER_FILE] = {"bytes": tok_path.stat().st_size, "sha256": sha256_file(tok_path)}
    return {
        "format_version": SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION,
        "created_by": f"scratchgpt {__version__}",
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "eot_id": tok.eot_id,
        "unk_id": tok.unk_id,
        "document_separator": tok.decode(separator_ids(tok)) if tok.eot_id is not None else CHAR_DOC_SEPARATOR,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "train_documents": w.train.documents,
        "val_documents": w.val.documents,
        "train_bytes": w.train.bytes,
        "val_bytes": w.val.bytes,
        "bytes_in": bytes_in,
        "split": method,
        "cleaning": report,
        "val_unseen_chars": learned.unseen,
        "bpe_training": learned.bpe_info,
        "shards": shards,
        "files": files,
        "settings": settings,
    }
