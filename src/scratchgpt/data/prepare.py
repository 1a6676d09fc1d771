"""Making prepared token data: `scratchgpt prepare` (cleaning, tokenizer training, encoding),
and its split across processes and machines (`--num-parts/--part`, then `--merge`).

A prepared data directory holds train.bin / val.bin (flat token ids; shards train-00000.bin,
... for long splits), tokenizer.json and meta.json; dataset.py reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np

from .. import UserError
from ..checks import ConfigError, check_fields
from ..utils import atomic_write_json, fsync_dir, replace_dir, sha256_file
from .dataset import (FORMAT_VERSION, META_FILE, SHARDED_FORMAT_VERSION, SPLITS, TOKENIZER_FILE, dtype_for_vocab,
                      load_meta, split_shards)
from .inputs import BUILTIN, READ_BLOCK, Reading, Source, documents, resolve_inputs
from .shards import ShardWriter


# ---------------------------------------------------------------------------------------
# Making: `scratchgpt prepare`
#
# Pass 1 reads every input once (streamed, in blocks), cleans it and appends the clean
# UTF-8 to a spool file in the temporary output directory, remembering only a few numbers
# per document; each document's split follows from a hash of its content. Documents are
# cut into units of at most UNIT_BYTES (at points where tokenization does not depend on the
# cut). Pass 2 trains the tokenizer on the train part of the spool (bpe: on an evenly spread
# sample of at most --bpe-sample-mb) and pass 3 encodes both parts into the token files.
# Passes 2 and 3 run in worker processes over groups of units, so memory is bounded by the
# buffer setting, never by the corpus, and every core is used. The units, the sample and
# hence the output do not depend on the number of workers or the buffer size.


CHAR_DOC_SEPARATOR = "\n\n"
# BPE learns from piece counts replayed to tokenizers' trainer; beyond this many
# occurrences the counts are scaled down (see tokenizer.scale_counts).
BPE_MAX_REPLAY = 4_000_000
# While counting, the rarest pieces are forgotten beyond this many distinct ones (bounds
# memory on corpora with endless distinct pieces; rare pieces hardly affect which merges win).
BPE_MAX_DISTINCT_PIECES = 1 << 19
# Documents longer than this are cut into units; consecutive units make ~1 MB blocks, the
# grain of the BPE sample and of the work sent to worker processes.
UNIT_BYTES = 1 << 20
# Remove C0/C1 controls except \t and \n; \r is left to newline normalisation.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_GUTENBERG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.M | re.I
)
# Settings that change the token stream: parts merged together must agree on them.
_STREAM_SETTINGS = ("val_fraction", "seed", "text_field", "nfc", "normalize_newlines", "strip_control",
                    "strip_gutenberg", "dedup", "errors")


@dataclass
class _Report:
    documents_read: int = 0
    empty_documents_dropped: int = 0
    duplicate_documents_removed: int = 0
    byte_order_marks_removed: int = 0
    newlines_normalized: int = 0
    control_chars_removed: int = 0
    nfc_documents_changed: int = 0
    gutenberg_headers_removed: int = 0
    gutenberg_footers_removed: int = 0
    gutenberg_chars_removed: int = 0
    invalid_utf8_replaced: int = 0
    chars_in: int = 0
    chars_out: int = 0


@dataclass
class _Options:
    seed: int
    nfc: bool
    normalize_newlines: bool
    strip_control: bool
    strip_gutenberg: bool
    dedup: bool
    report: _Report = field(default_factory=_Report)


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


def default_data_dir() -> Path:
    """The embedded corpus (CPython's pydoc topics) as char-level data, prepared on first use."""
    d = Path("data/default")
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
    pydoc topics. Other files are one document each. `val` names explicit validation inputs;
    otherwise each document is validation with probability `val_fraction` (decided by a
    hash of `seed` and its content, so adding documents never moves others), or, with a
    single document, its tail (as nanoGPT does). `workers` and `buffer_mb` change speed
    and memory only, never the output. With `merge`, the inputs are part directories (see
    `merge_parts`). A progress bar shows on a terminal; a one-line summary always ends on
    stderr. Bad input raises UserError and leaves nothing behind.
    """
    from ..tokenizer import MAX_VOCAB, MIN_BPE_VOCAB, Tokenizer

    if "jsonl_field" in overrides:  # the field's old name
        overrides["text_field"] = overrides.pop("jsonl_field")
    o = replace(options or PrepareConfig(), **overrides)
    if o.merge:
        return merge_parts(list(inputs or []), out, force=o.force)
    t0 = time.time()
    out = Path(out)
    inputs = list(inputs or [])
    val = list(o.val or [])
    if o.tokenizer not in ("char", "bpe"):
        raise UserError(f"--tokenizer must be 'char' or 'bpe', not {o.tokenizer!r}")
    if o.tokenizer == "bpe" and not o.tokenizer_from and not MIN_BPE_VOCAB <= o.vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for bpe (256 bytes + <|endoftext|>), "
                        f"not {o.vocab_size}")
    if not val and not 0.0 < o.val_fraction < 1.0:
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
    if o.num_parts > 1 and o.dedup:
        raise UserError("--dedup cannot be combined with --num-parts (duplicates in different parts would stay): "
                        "deduplicate in one process, or the inputs beforehand")
    workers = _default_workers() if o.workers is None else o.workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    tok_file = None
    if o.tokenizer_from:
        tok_file = Path(o.tokenizer_from)
        if tok_file.is_dir():  # a prepared directory or checkpoint, or a run (its best checkpoint's tokenizer)
            in_run = tok_file / "best" / TOKENIZER_FILE
            tok_file = in_run if not (tok_file / TOKENIZER_FILE).exists() and in_run.is_file() else tok_file / TOKENIZER_FILE
        Tokenizer.load(tok_file)  # a bad tokenizer fails now, before any work
    _check_out(out, o.force)

    sources = resolve_inputs(inputs, is_val=False)
    if val:
        sources += resolve_inputs(val, is_val=True)
        if sum(s.kind == "stdin" for s in sources) > 1:
            raise UserError("stdin ('-') can be given only once")
    part = None
    if o.num_parts > 1:
        sources, part = _select_part(sources, o.num_parts, o.part)
    show = sys.stderr.isatty() if progress is None else progress
    settings = {
        "inputs": [str(p) for p in inputs] or [BUILTIN], "val": [str(p) for p in val],
        "val_fraction": None if val else o.val_fraction, "seed": o.seed,
        "tokenizer": None if tok_file else o.tokenizer, "tokenizer_from": str(tok_file) if tok_file else None,
        "vocab_size": o.vocab_size if o.tokenizer == "bpe" and not tok_file else None,
        "min_frequency": o.min_frequency if o.tokenizer == "bpe" and not tok_file else None,
        "bpe_sample_mb": o.bpe_sample_mb if o.tokenizer == "bpe" and not tok_file else None,
        "char_vocab": o.char_vocab if o.tokenizer == "char" and not tok_file else None,
        "text_field": o.text_field, "nfc": o.nfc, "normalize_newlines": o.normalize_newlines,
        "strip_control": o.strip_control, "strip_gutenberg": o.strip_gutenberg, "dedup": o.dedup,
        "errors": o.errors, "shard_tokens": o.shard_tokens,
    }

    tmp = _new_tmp(out)
    try:
        meta = _prepare_into(tmp, sources, o, tok_file=tok_file, explicit_val=bool(val), part=part,
                             buffer_bytes=o.buffer_mb << 20, workers=workers, show=show, stdin=stdin,
                             settings=settings)
        _move_into_place(tmp, out, o.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _warn_unknown_chars(meta)
    print(_summary(out, meta, time.time() - t0), file=sys.stderr)
    return meta


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is not a directory")
        if not force:
            raise UserError(f"output directory {out} already exists (use --force to replace it)")


def _new_tmp(out: Path) -> Path:
    """A temporary directory beside `out`, renamed to it when complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    except OSError as e:
        raise UserError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    return tmp


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished tmp dir to `out`; with force, swap so the old dir survives failure."""
    _check_out(out, force)
    replace_dir(tmp, out)


def _finish_files(tmp: Path) -> None:
    for name in (META_FILE, TOKENIZER_FILE):  # atomic writes create private (0600) files
        os.chmod(tmp / name, 0o666 & ~_umask())
    fsync_dir(tmp)


# -- cleaning -----------------------------------------------------------------------------


def _line_chunks(texts: Iterable[str]) -> Iterator[str]:
    """Re-cut decoded blocks at line ends, so that no \\r\\n pair, combining sequence or
    Gutenberg marker line is split between two chunks."""
    held = ""
    for text in texts:
        held += text
        cut = held.rfind("\n") + 1
        if cut == 0 and len(held) > 4 * READ_BLOCK:  # a huge line: cut at a safe character
            cut = len(held) - 1
            while cut > 0 and (held[cut - 1] == "\r" or unicodedata.combining(held[cut])):
                cut -= 1
        if cut > 0:
            yield held[:cut]
            held = held[cut:]
    if held:
        yield held


def _clean(text: str, opts: _Options, changed: list[bool]) -> str:
    r = opts.report
    if opts.normalize_newlines and "\r" in text:
        n = text.count("\r")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        r.newlines_normalized += n
    if opts.strip_control:
        text, n = _CONTROL.subn("", text)
        r.control_chars_removed += n
    if opts.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        changed[0] = True
    return text


def _gutenberg(chunks: Iterable[str], r: _Report) -> Iterator[str]:
    """Drop a Project Gutenberg header (through the START line) and footer (from END on)."""
    first = True
    ended = False
    for chunk in chunks:
        if ended:
            r.gutenberg_chars_removed += len(chunk)
            continue
        if first:
            first = False
            m = _GUTENBERG_START.search(chunk)
            if m:
                cut = m.end() + (1 if chunk[m.end():m.end() + 1] == "\n" else 0)
                r.gutenberg_headers_removed += 1
                r.gutenberg_chars_removed += cut
                chunk = chunk[cut:]
        m = _GUTENBERG_END.search(chunk)
        if m:
            r.gutenberg_footers_removed += 1
            r.gutenberg_chars_removed += len(chunk) - m.start()
            chunk = chunk[: m.start()]
            ended = True
        yield chunk


class _Docs:
    """The kept documents, a few numbers each in flat arrays (tens of millions fit in memory)."""

    def __init__(self) -> None:
        self.start, self.end, self.chars = array("q"), array("q"), array("q")
        self.key, self.is_val = array("Q"), array("b")

    def __len__(self) -> int:
        return len(self.start)

    def add(self, start: int, end: int, chars: int, key: int, is_val: bool) -> None:
        self.start.append(start)
        self.end.append(end)
        self.chars.append(chars)
        self.key.append(key)
        self.is_val.append(is_val)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.frombuffer(a, dtype=a.typecode) if len(a) else np.zeros(0, dtype=a.typecode)
                     for a in (self.start, self.end, self.chars, self.key, self.is_val))


def _read_corpus(sources: list[Source], opts: _Options, reading: Reading, spool: BinaryIO,
                 stdin: BinaryIO | None, bar) -> _Docs:
    """Pass 1: clean every document into the spool; returns the kept documents."""
    r = opts.report
    docs = _Docs()
    seen: set[bytes] = set()
    pos = 0
    for src in sources:
        for raw_chunks in documents(src, reading, stdin):
            r.documents_read += 1
            start = pos
            h = hashlib.sha256()
            chars = 0
            content = False
            changed = [False]
            chunks = _line_chunks(raw_chunks)
            cleaned = (_clean(c, opts, changed) for c in _counting(chunks, r))
            if opts.strip_gutenberg:
                cleaned = _gutenberg(cleaned, r)
            for text in cleaned:
                if not text:
                    continue
                data = text.encode("utf-8")
                spool.write(data)
                h.update(data)
                pos += len(data)
                chars += len(text)
                content = content or not text.isspace()
            r.nfc_documents_changed += changed[0]
            if bar is not None:
                bar.update(reading.bytes_in - bar.n)
                bar.set_postfix_str(f"{r.documents_read:,} docs", refresh=False)
            digest = h.digest()
            if not content:
                r.empty_documents_dropped += 1
            elif opts.dedup and digest in seen:
                r.duplicate_documents_removed += 1
            else:
                if opts.dedup:
                    seen.add(digest)
                key = hashlib.sha256(opts.seed.to_bytes(16, "big", signed=True) + digest).digest()
                docs.add(start, pos, chars, int.from_bytes(key[:8], "big"), src.is_val)
                r.chars_out += chars
                continue
            spool.seek(start)
            spool.truncate()
            pos = start
    r.byte_order_marks_removed += reading.byte_order_marks_removed
    r.invalid_utf8_replaced += reading.invalid_utf8_replaced
    return docs


def _counting(chunks: Iterable[str], r: _Report) -> Iterator[str]:
    for c in chunks:
        r.chars_in += len(c)
        yield c


# -- splitting ----------------------------------------------------------------------------


def _split(docs: _Docs, explicit_val: bool, val_fraction: float, spool_path: Path,
           in_part: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """Spool byte spans (starts, ends) of the (train, val) documents, and the split method.

    Each document's split depends on itself alone (its hash against val_fraction), so one
    part of a corpus gets the split it would get in the whole. Only a single document (its
    tail) and, outside parts, a split left empty by chance (one document moved) look wider.
    """
    start, end, chars, key, doc_is_val = docs.arrays()
    if explicit_val:
        is_val = doc_is_val.astype(bool)
        method = "explicit"
    elif len(start) == 1 and not in_part:
        cut = int(start[0]) + _byte_offset_of_char(spool_path, int(start[0]), int(end[0]),
                                                   int(chars[0] * (1.0 - val_fraction)))
        start, end, is_val = np.array([start[0], cut]), np.array([cut, end[0]]), np.array([False, True])
        method = "tail"
    else:
        is_val = key < np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
        if not in_part and len(key) > 1:
            if not is_val.any():
                is_val[np.argmin(key)] = True
            if is_val.all():
                is_val[np.argmax(key)] = False
        method = "documents"
    keep = end > start
    train, val = (start[keep & ~is_val], end[keep & ~is_val]), (start[keep & is_val], end[keep & is_val])
    if not in_part:
        if not len(train[0]):
            raise UserError("the training split is empty after cleaning: give more text")
        if not len(val[0]):
            raise UserError("the validation split is empty: give more text, a larger --val-fraction, "
                            "or --val files with text in them")
    return train, val, method


def _byte_offset_of_char(path: Path, start: int, end: int, n_chars: int) -> int:
    """Byte offset, from `start`, of character number `n_chars` of the UTF-8 in [start, end)."""
    seen = 0
    pos = start
    with open(path, "rb") as f:
        while pos < end:
            block = np.frombuffer(os.pread(f.fileno(), min(READ_BLOCK * 8, end - pos), pos), dtype=np.uint8)
            lead = np.flatnonzero((block & 0xC0) != 0x80)  # first byte of each character
            if seen + len(lead) > n_chars:
                return pos + int(lead[n_chars - seen]) - start
            seen += len(lead)
            pos += len(block)
    return end - start


# -- units, blocks and tasks --------------------------------------------------------------


class _Units:
    """One split's text as spool spans of at most UNIT_BYTES, in order; `sep[i]`: a document
    separator goes before unit i (it starts a document other than the first)."""

    def __init__(self, spans: tuple[np.ndarray, np.ndarray], spool: BinaryIO) -> None:
        starts, ends = (np.asarray(a, dtype=np.int64) for a in spans)
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        self.documents = len(starts)
        sep = np.ones(len(starts), dtype=bool)
        sep[:1] = False
        out_s, out_e, out_sep, done = [], [], [], 0
        for b in np.flatnonzero(ends - starts > UNIT_BYTES):  # cut long documents where BPE splits anyway
            bounds = [int(starts[b])]
            while int(ends[b]) - bounds[-1] > UNIT_BYTES:
                bounds.append(_safe_cut(spool, bounds[-1] + UNIT_BYTES // 2, bounds[-1] + UNIT_BYTES))
            bounds.append(int(ends[b]))
            out_s += [starts[done:b], np.array(bounds[:-1], dtype=np.int64)]
            out_e += [ends[done:b], np.array(bounds[1:], dtype=np.int64)]
            out_sep += [sep[done:b], np.array([sep[b]] + [False] * (len(bounds) - 2))]
            done = b + 1
        if out_s:
            starts = np.concatenate(out_s + [starts[done:]])
            ends = np.concatenate(out_e + [ends[done:]])
            sep = np.concatenate(out_sep + [sep[done:]])
        self.starts, self.ends, self.sep = starts, ends, sep
        self.sizes = ends - starts
        self.bytes = int(self.sizes.sum())

    def blocks(self) -> np.ndarray:
        """Block number of each unit: consecutive units starting in the same UNIT_BYTES window
        of the split's text (so a block holds at most 2 * UNIT_BYTES; numbers run 0, 1, ...)."""
        offset = np.cumsum(self.sizes) - self.sizes
        _, block = np.unique(offset // UNIT_BYTES, return_inverse=True)
        return block.reshape(-1)

    def task(self, lo: int, hi: int, key: int = -1) -> tuple:
        """Units [lo, hi) as a task for a worker; `key` names its saved pieces (-1: none)."""
        return key, self.starts[lo:hi], self.ends[lo:hi], self.sep[lo:hi]


def _group(sizes: np.ndarray, lo: int, hi: int, target: int) -> list[tuple[int, int]]:
    """Cut units [lo, hi) into consecutive ranges of about `target` bytes."""
    if hi <= lo:
        return []
    cum = np.cumsum(sizes[lo:hi])
    ends = np.flatnonzero(np.diff(cum // target, append=-1)) + 1  # last unit of each target window
    out, a = [], lo
    for e in ends:
        out.append((a, lo + int(e)))
        a = lo + int(e)
    return out


def _sampled_blocks(n_blocks: int, fraction: float) -> np.ndarray:
    """An evenly spread `fraction` of the blocks (all when fraction >= 1)."""
    if fraction >= 1.0:
        return np.ones(n_blocks, dtype=bool)
    i = np.arange(n_blocks)
    return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def _tasks(units: _Units, task_bytes: int, sampled: np.ndarray | None) -> list[tuple]:
    """Tasks covering all units in order. Each sampled block is a task of its own (its pieces
    are counted, saved, and reused when encoding); the other units are grouped by size."""
    if sampled is None or not sampled.any():
        return [units.task(a, b) for a, b in _group(units.sizes, 0, len(units.sizes), task_bytes)]
    block = units.blocks()
    unit_sampled = sampled[block]
    tasks: list[tuple] = []
    edges = np.flatnonzero(np.diff(block, prepend=-1, append=-2))  # where each block starts (and the end)
    run_start = 0
    for b in range(len(edges) - 1):
        lo, hi = int(edges[b]), int(edges[b + 1])
        if unit_sampled[lo]:
            tasks += [units.task(a, z) for a, z in _group(units.sizes, run_start, lo, task_bytes)]
            tasks.append(units.task(lo, hi, key=b))
            run_start = hi
    tasks += [units.task(a, z) for a, z in _group(units.sizes, run_start, len(units.sizes), task_bytes)]
    return tasks


def _task_bytes(task: tuple) -> int:
    return int((task[2] - task[1]).sum())


_SAFE_CUT = re.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")


def _safe_cut(f: BinaryIO, lo: int, hi: int) -> int:
    """A cut in (lo, hi] right after a newline between two visible ASCII characters:
    byte-level BPE splits there in any case, so encoding both halves separately gives the
    same ids as encoding the whole. Falls back to any newline, then to a character boundary."""
    window = os.pread(f.fileno(), hi - lo + 1, lo)
    best = None
    for m in _SAFE_CUT.finditer(window):
        best = m.start() + 2
    if best is None:
        nl = window.rfind(b"\n", 0, len(window) - 1)
        best = nl + 1 if nl >= 0 else None
    if best is None:
        best = len(window) - 1
        while best > 1 and window[best] & 0xC0 == 0x80:
            best -= 1
    return lo + best


# -- work for the pool --------------------------------------------------------------------

_WORKER_STATE: dict[str, Any] = {}


def _read_span(fd: int, start: int, end: int) -> str:
    return os.pread(fd, end - start, start).decode("utf-8")


def _count_task(spool: str, piece_dir: str, task: tuple) -> tuple[list[str], list[int]]:
    """Pass 2 (bpe): distinct byte-level pieces of the task's text and their counts.

    The piece sequence is also saved (as indices into the distinct pieces) so that pass 3
    does not split the text again: splitting is the most expensive step in Python.
    """
    from ..tokenizer import index_pieces, split_pieces

    key, starts, ends, _ = task
    pieces: list[str] = []
    seg_pieces = []
    fd = os.open(spool, os.O_RDONLY)
    try:
        for start, end in zip(starts.tolist(), ends.tolist()):
            p = split_pieces(_read_span(fd, start, end))
            pieces += p
            seg_pieces.append(len(p))
    finally:
        os.close(fd)
    uniq, inv, counts = index_pieces(pieces)
    dtype = "uint16" if len(uniq) <= 65536 else "uint32"
    inv.astype(dtype).tofile(os.path.join(piece_dir, f"{key}.bin"))
    with open(os.path.join(piece_dir, f"{key}.json"), "w", encoding="utf-8") as f:
        json.dump({"uniq": uniq, "segments": seg_pieces, "dtype": dtype}, f, ensure_ascii=False)
    return uniq, counts.tolist()


def _encode_task(spool: str, tok_path: str, dtype: str, piece_dir: str | None, task: tuple) -> tuple[bytes, int]:
    """Pass 3: the task's token ids as raw bytes (separators between documents included),
    and how many ids are <unk>. Uses the pieces saved by `_count_task` when there are some."""
    from ..tokenizer import Tokenizer

    key, starts, ends, seps = task
    tok = _WORKER_STATE.get(tok_path)
    if tok is None:
        _WORKER_STATE.clear()
        tok = _WORKER_STATE[tok_path] = Tokenizer.load(tok_path)
    if piece_dir is not None and key >= 0:
        with open(os.path.join(piece_dir, f"{key}.json"), encoding="utf-8") as f:
            saved = json.load(f)
        inv = np.fromfile(os.path.join(piece_dir, f"{key}.bin"), dtype=saved["dtype"]).astype(np.int64)
        ids, piece_ends = tok.encode_indexed(saved["uniq"], inv)
        bounds = np.concatenate([[0], piece_ends])[np.cumsum([0] + saved["segments"])]
        segments = [ids[bounds[k]:bounds[k + 1]] for k in range(len(starts))]
    else:
        fd = os.open(spool, os.O_RDONLY)
        try:
            segments = [tok.encode_array(_read_span(fd, s, e)) for s, e in zip(starts.tolist(), ends.tolist())]
        finally:
            os.close(fd)
    parts = []
    sep = None
    for sep_before, seg in zip(seps.tolist(), segments):
        if sep_before:
            if sep is None:
                sep = _separator_ids(tok)
            parts.append(sep)
        parts.append(seg)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    unknown = int((ids == tok.unk_id).sum()) if tok.unk_id is not None else 0
    return ids.astype(dtype).tobytes(), unknown


def _separator_ids(tok) -> np.ndarray:
    """What goes between two documents: <|endoftext|> (bpe), an imported tokenizer's eos followed by what
    it puts before a text (Llama: `</s><s>`), or a blank line (char)."""
    if tok.eot_id is not None:
        return np.array([tok.eot_id] + tok.bos_ids, dtype=np.int64)
    return tok.encode_array(CHAR_DOC_SEPARATOR)


def _char_task(spool: str, task: tuple) -> str:
    """Pass 2 (char): the distinct characters in the task's text."""
    chars: set[str] = set()
    fd = os.open(spool, os.O_RDONLY)
    try:
        for start, end in zip(task[1].tolist(), task[2].tolist()):
            chars.update(_read_span(fd, start, end))
    finally:
        os.close(fd)
    return "".join(sorted(chars))


class _Runner:
    """Maps a task function over tasks in order: in worker processes, or inline when the
    corpus is small or one worker is asked for (the results are the same either way)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = None

    def map(self, fn: Callable, args: tuple, tasks: list) -> Iterator[Any]:
        from functools import partial

        f = partial(fn, *args)
        if self.workers <= 1 or len(tasks) <= 1:
            return map(f, tasks)
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may already run tokenizers' thread pool. An
            # executor (unlike mp.Pool) raises instead of hanging if a worker dies.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool.map(f, tasks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _bar(show: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not show, file=sys.stderr, dynamic_ncols=True, leave=False)


# -- the three passes ---------------------------------------------------------------------


def _prepare_into(tmp: Path, sources: list[Source], o: PrepareConfig, *, tok_file: Path | None, explicit_val: bool,
                  part: dict | None, buffer_bytes: int, workers: int, show: bool, stdin: BinaryIO | None,
                  settings: dict) -> dict[str, Any]:
    from .. import __version__
    from ..tokenizer import Tokenizer, copy_tokenizer, scale_counts, train_bpe_from_counts, train_char_tokenizer

    opts = _Options(seed=o.seed, nfc=o.nfc, normalize_newlines=o.normalize_newlines, strip_control=o.strip_control,
                    strip_gutenberg=o.strip_gutenberg, dedup=o.dedup)
    reading = Reading(errors=o.errors, text_field=o.text_field)
    spool_path = tmp / "corpus.spool"
    with open(spool_path, "wb+") as spool, _bar(show, None, "reading") as bar:
        docs = _read_corpus(sources, opts, reading, spool, stdin, bar if show else None)
    if not len(docs):
        r = opts.report
        raise UserError(f"the corpus is empty after cleaning ({r.documents_read} document(s) read, "
                        f"{r.empty_documents_dropped} empty, {r.duplicate_documents_removed} duplicate)")
    train_spans, val_spans, method = _split(docs, explicit_val, o.val_fraction, spool_path, in_part=part is not None)
    del docs
    with open(spool_path, "rb") as spool:
        train, val = _Units(train_spans, spool), _Units(val_spans, spool)
    # Tasks small enough that a few in flight per worker stay well inside the buffer.
    task_bytes = max(64 << 10, min(4 << 20, buffer_bytes // (16 * workers)))
    runner = _Runner(workers if train.bytes + val.bytes > 4 * UNIT_BYTES else 1)
    piece_dir = None
    bpe_info = None
    unseen = ""
    try:
        if tok_file is not None:
            copy_tokenizer(tok_file, tmp)  # byte for byte: parts compare its sha256
            tok = Tokenizer.load(tmp / TOKENIZER_FILE)
            train_tasks, val_tasks = _tasks(train, task_bytes, None), _tasks(val, task_bytes, None)
        elif o.tokenizer == "char":
            train_tasks, val_tasks = _tasks(train, task_bytes, None), _tasks(val, task_bytes, None)
            with _bar(show, train.bytes + val.bytes, "characters") as bar:
                seen = []
                for tasks in (train_tasks, val_tasks):
                    chars: set[str] = set()
                    for task, found in zip(tasks, runner.map(_char_task, (str(spool_path),), tasks)):
                        chars.update(found)
                        bar.update(_task_bytes(task))
                    seen.append(chars)
            train_chars, val_chars = seen
            if train.documents > 1 or val.documents > 1:
                train_chars.update(CHAR_DOC_SEPARATOR)
            unseen = "".join(sorted(val_chars - train_chars))
            if o.char_vocab == "all":
                tok = train_char_tokenizer([train_chars | val_chars])
            else:
                tok = train_char_tokenizer([train_chars], add_unk=bool(unseen))
            tok.save(tmp)
        else:
            fraction = min(1.0, (o.bpe_sample_mb << 20) / max(train.bytes, 1))
            sampled = _sampled_blocks(int(train.blocks().max()) + 1 if len(train.sizes) else 0, fraction)
            train_tasks, val_tasks = _tasks(train, task_bytes, sampled), _tasks(val, task_bytes, None)
            count_tasks = [t for t in train_tasks if t[0] >= 0]
            sample_bytes = sum(map(_task_bytes, count_tasks))
            counts: Counter = Counter()
            pruned_below = 0
            piece_dir = tmp / "pieces"
            piece_dir.mkdir()
            with _bar(show, sample_bytes, "counting") as bar:
                for task, (uniq, c) in zip(count_tasks, runner.map(_count_task, (str(spool_path), str(piece_dir)),
                                                                    count_tasks)):
                    counts.update(dict(zip(uniq, c)))
                    bar.update(_task_bytes(task))
                    while len(counts) > BPE_MAX_DISTINCT_PIECES:  # after each block: the same for any workers
                        pruned_below += 1
                        counts = Counter({p: n for p, n in counts.items() if n > pruned_below})
            train_counts, count_scale = scale_counts(counts, BPE_MAX_REPLAY)
            del counts
            tok = train_bpe_from_counts(train_counts, o.vocab_size, min_frequency=o.min_frequency,
                                        show_progress=show)
            del train_counts
            tok.save(tmp)
            bpe_info = {"sample_bytes": sample_bytes, "train_bytes": train.bytes, "sample_mb_limit": o.bpe_sample_mb,
                        "distinct_pieces_pruned_below": pruned_below, "count_scale": count_scale}
        tok_path = tmp / TOKENIZER_FILE
        dtype = dtype_for_vocab(tok.vocab_size)
        shards: dict[str, list] = {}
        unknown_chars = {split: 0 for split in SPLITS}
        with _bar(show, train.bytes + val.bytes, "encoding") as bar:
            for split, tasks in (("train", train_tasks), ("val", val_tasks)):
                args = (str(spool_path), str(tok_path), dtype, str(piece_dir) if piece_dir else None)
                writer = ShardWriter(tmp, split, dtype, o.shard_tokens)
                try:
                    for task, (data, unk) in zip(tasks, runner.map(_encode_task, args, tasks)):
                        writer.write(data)
                        unknown_chars[split] += unk
                        bar.update(_task_bytes(task))
                        if show:
                            bar.set_postfix_str(f"{split} {writer.tokens:,} tokens", refresh=False)
                    shards[split] = writer.close()
                finally:
                    writer.abort()
    finally:
        runner.close()
    os.unlink(spool_path)
    if piece_dir is not None:
        shutil.rmtree(piece_dir)
    tokens = {split: sum(s["tokens"] for s in shards[split]) for split in SPLITS}
    if part is None:
        for split in SPLITS:
            if tokens[split] == 0:
                raise UserError(f"the {split} split has no tokens")
    report = vars(opts.report).copy()
    report["train_unknown_chars"] = unknown_chars["train"]  # only a --tokenizer-from vocabulary can miss some
    report["val_unknown_chars"] = unknown_chars["val"]
    itemsize = np.dtype(dtype).itemsize
    sharded = any(len(shards[s]) > 1 for s in SPLITS)
    files = {s["file"]: {"bytes": s["tokens"] * itemsize, "sha256": s["sha256"]}
             for split in SPLITS for s in shards[split]}
    files[TOKENIZER_FILE] = {"bytes": tok_path.stat().st_size, "sha256": sha256_file(tok_path)}
    meta = {
        "format_version": SHARDED_FORMAT_VERSION if sharded else FORMAT_VERSION,
        "created_by": f"scratchgpt {__version__}",
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "eot_id": tok.eot_id,
        "unk_id": tok.unk_id,
        "document_separator": tok.decode(_separator_ids(tok)) if tok.eot_id is not None else CHAR_DOC_SEPARATOR,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "train_documents": train.documents,
        "val_documents": val.documents,
        "train_bytes": train.bytes,
        "val_bytes": val.bytes,
        "bytes_in": reading.bytes_in,
        "split": method,
        "cleaning": report,
        "val_unseen_chars": unseen,
        "bpe_training": bpe_info,
        "shards": shards,
        "files": files,
        "settings": settings,
    }
    if part is not None:
        meta["part"] = part
    atomic_write_json(tmp / META_FILE, meta)
    _finish_files(tmp)
    return meta


def _warn_unknown_chars(meta: dict) -> None:
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


def _summary(out: Path, meta: dict, seconds: float) -> str:
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


# ---------------------------------------------------------------------------------------
# Parts: `prepare --num-parts P --part I`, then `prepare --merge`


def _select_part(sources: list[Source], num_parts: int, part: int) -> tuple[list[Source], dict]:
    """Part `part`'s share of the inputs: consecutive whole files, balanced by size (a file
    belongs to the part its middle byte falls in), so the parts in order are the corpus."""
    if any(s.kind in ("stdin", "builtin") for s in sources):
        raise UserError("--num-parts needs input files (not stdin or the embedded corpus)")
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
    metas = []
    for d in map(Path, part_dirs):
        meta = load_meta(d)
        if not isinstance(meta.get("part"), dict):
            raise UserError(f"{d} is not a part directory (prepare --num-parts N --part I makes those)")
        metas.append((meta["part"]["index"], d, meta))
    metas.sort(key=lambda m: m[0])
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
    out_abs = Path(os.path.abspath(out))
    for _, d, _ in metas:
        d_abs = Path(os.path.abspath(d))
        if d_abs == out_abs or out_abs in d_abs.parents:
            raise UserError(f"--out {out} must not be or hold a part directory ({d}): the merged directory "
                            "refers to the parts' files")
    _check_out(out, force)

    tmp = _new_tmp(out)
    try:
        from ..tokenizer import Tokenizer, copy_tokenizer

        copy_tokenizer(metas[0][1] / TOKENIZER_FILE, tmp)
        sep = _separator_ids(Tokenizer.load(tmp / TOKENIZER_FILE)).astype(first["dtype"])
        sep_file = {"file": "separator.bin", "tokens": len(sep), "sha256": hashlib.sha256(sep.tobytes()).hexdigest()}
        shards: dict[str, list] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for _, d, meta in metas:
                files = [s for s in split_shards(meta, split) if s["tokens"] > 0]
                if files and shards[split]:
                    shards[split].append(dict(sep_file))
                for s in files:
                    digest = s.get("sha256") or meta["files"][s["file"]]["sha256"]
                    rel = os.path.relpath(os.path.abspath(d / s["file"]), out_abs)
                    shards[split].append({"file": rel, "tokens": s["tokens"], "sha256": digest})
            if not shards[split]:
                raise UserError(f"the {split} split is empty in every part: give more text or a larger --val-fraction")
        if any(s["file"] == sep_file["file"] for split in SPLITS for s in shards[split]):
            sep.tofile(tmp / sep_file["file"])
        meta = _merged_meta(first, [m[2] for m in metas], shards, [os.path.relpath(os.path.abspath(m[1]), out_abs)
                                                                  for m in metas])
        meta["files"] = {TOKENIZER_FILE: first["files"][TOKENIZER_FILE]}
        if (tmp / sep_file["file"]).exists():
            meta["files"][sep_file["file"]] = {"bytes": sep.nbytes, "sha256": sep_file["sha256"]}
        atomic_write_json(tmp / META_FILE, meta)
        _finish_files(tmp)
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = "; ".join(f"{s} {meta[f'{s}_documents']:,} docs, {meta[f'{s}_tokens']:,} tokens in "
                       f"{len(meta['shards'][s])} files" for s in SPLITS)
    print(f"merged {num_parts} parts into {out} (their token files stay where they are; nothing copied): {counts}; "
          f"{meta['tokenizer']} vocab {meta['vocab_size']:,}; {time.time() - t0:.1f} s", file=sys.stderr)
    return meta


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
