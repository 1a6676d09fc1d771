"""Making prepared token data: `scratchgpt prepare` (cleaning, tokenizer training, encoding).

A prepared data directory holds train.bin / val.bin (flat token ids), tokenizer.json and
meta.json; dataset.py reads it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np

from .. import UserError
from ..utils import atomic_write_json, fsync_dir, sha256_file
from .dataset import FORMAT_VERSION, META_FILE, SPLITS, dtype_for_vocab


# ---------------------------------------------------------------------------------------
# Making: `scratchgpt prepare`
#
# Pass 1 reads every input once (streamed, in blocks), cleans it and appends the clean
# UTF-8 to a spool file in the temporary output directory, remembering only a few numbers
# per document. The split is then decided from those numbers; pass 2 trains the tokenizer
# on the train part of the spool and pass 3 encodes both parts into the .bin files. Passes
# 2 and 3 run in worker processes over byte ranges of the spool, so memory is bounded by
# the buffer setting, never by the corpus, and every core is used.


TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CHAR_DOC_SEPARATOR = "\n\n"
_READ_BLOCK = 1 << 20
# BPE learns from piece counts replayed to tokenizers' trainer; beyond this many
# occurrences the counts are scaled down (see tokenizer.scale_counts).
BPE_MAX_REPLAY = 4_000_000
# Remove C0/C1 controls except \t and \n; \r is left to newline normalisation.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_GUTENBERG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.M | re.I
)
# A file with more replaced (undecodable) bytes than this share is binary, not text.
_MAX_REPLACED_SHARE = 0.1


@dataclass
class _Source:
    kind: str  # "text" | "jsonl" | "stdin" | "builtin"
    name: str
    path: Path | None = None
    is_val: bool = False


@dataclass
class _Doc:
    start: int  # byte range in the spool
    end: int
    chars: int
    key: int  # from the content hash: decides the document split
    is_val: bool


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
    errors: str
    jsonl_field: str
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
    val: Optional[list[str]] = None
    """Explicit validation inputs (otherwise --val-fraction of the documents, or one document's tail)."""
    val_fraction: float = 0.1
    """Share of documents (or of a single document's tail) held out for validation, in (0, 1)."""
    jsonl_field: str = "text"
    """Field holding the text in .jsonl inputs."""
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
    buffer_mb: int = 64
    """Text buffered in memory at once, in MB (speed and memory only, never the output)."""
    min_frequency: int = 2
    """BPE: merge only pairs seen at least this often."""
    workers: Optional[int] = None
    """Worker processes (default: all cores; speed only, never the output)."""
    seed: int = 1337
    """Seeds the document split."""
    force: bool = False
    """Replace an existing output directory."""


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

    `options` (PrepareConfig, or its fields as keywords) say how. `inputs`: text files, directories (recursive *.txt, *.md), globs, JSONL files (one
    document per line, field `jsonl_field`) and "-" for stdin; none means the bundled
    pydoc topics. Each file is one document. `val` names explicit validation inputs;
    otherwise `val_fraction` of the documents (chosen by a hash of `seed` and the
    content) is validation, or,
    with a single document, its tail (as nanoGPT does). `vocab_size` and
    `min_frequency` apply to bpe only. `workers` and `buffer_mb` change speed and memory
    only, never the output. Bad input raises UserError and leaves nothing behind.
    """
    from ..tokenizer import MIN_BPE_VOCAB, MAX_VOCAB

    o = replace(options or PrepareConfig(), **overrides)
    tokenizer, vocab_size, val, val_fraction, seed = o.tokenizer, o.vocab_size, o.val, o.val_fraction, o.seed
    jsonl_field, nfc, normalize_newlines, strip_control = o.jsonl_field, o.nfc, o.normalize_newlines, o.strip_control
    strip_gutenberg, dedup, errors, min_frequency = o.strip_gutenberg, o.dedup, o.errors, o.min_frequency
    buffer_mb, workers, force = o.buffer_mb, o.workers, o.force
    out = Path(out)
    inputs = list(inputs or [])
    val = list(val or [])
    if tokenizer not in ("char", "bpe"):
        raise UserError(f"--tokenizer must be 'char' or 'bpe', not {tokenizer!r}")
    if tokenizer == "bpe" and not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_BPE_VOCAB} for bpe (256 bytes + <|endoftext|>), "
                        f"not {vocab_size}")
    if not val and not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    if errors not in ("strict", "replace"):
        raise UserError(f"--errors must be 'strict' or 'replace', not {errors!r}")
    if buffer_mb < 1:
        raise UserError(f"--buffer-mb must be at least 1, not {buffer_mb}")
    if min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, not {min_frequency}")
    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    _check_out(out, force)

    sources = _resolve_sources(inputs, is_val=False)
    if val:
        sources += _resolve_sources(val, is_val=True)
        if sum(s.kind == "stdin" for s in sources) > 1:
            raise UserError("stdin ('-') can be given only once")
    opts = _Options(seed=seed, nfc=nfc, normalize_newlines=normalize_newlines, strip_control=strip_control,
                    strip_gutenberg=strip_gutenberg, dedup=dedup, errors=errors, jsonl_field=jsonl_field)
    show = sys.stderr.isatty() if progress is None else progress

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    except OSError as e:
        raise UserError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    try:
        meta = _prepare_into(
            tmp, sources, opts, tokenizer=tokenizer, vocab_size=vocab_size, explicit_val=bool(val),
            val_fraction=val_fraction, min_frequency=min_frequency, buffer_bytes=buffer_mb << 20,
            workers=workers, show=show, stdin=stdin,
            settings={
                "inputs": [str(p) for p in inputs] or ["<builtin:pydoc_data.topics>"],
                "val": [str(p) for p in val], "val_fraction": None if val else val_fraction,
                "seed": seed,
                "tokenizer": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None,
                "min_frequency": min_frequency if tokenizer == "bpe" else None,
                "jsonl_field": jsonl_field, "nfc": nfc, "normalize_newlines": normalize_newlines,
                "strip_control": strip_control, "strip_gutenberg": strip_gutenberg, "dedup": dedup,
                "errors": errors,
            },
        )
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished tmp dir to `out`; with force, swap so the old dir survives failure."""
    _check_out(out, force)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        fsync_dir(out.parent)


# -- inputs -------------------------------------------------------------------------------


def _resolve_sources(inputs: Sequence[str | os.PathLike], *, is_val: bool) -> list[_Source]:
    if not inputs:
        return [_Source("builtin", "<builtin:pydoc_data.topics>", is_val=is_val)]
    sources: list[_Source] = []
    seen: set[str] = set()

    def add_file(p: Path) -> None:
        real = os.path.realpath(p)
        if real in seen:
            return
        seen.add(real)
        kind = "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text"
        sources.append(_Source(kind, str(p), p, is_val))

    for raw in inputs:
        s = os.fspath(raw)
        if s == "-":
            sources.append(_Source("stdin", "<stdin>", None, is_val))
            continue
        p = Path(s)
        if p.exists():
            matches = [p]
        elif glob.has_magic(s):
            matches = [Path(m) for m in sorted(glob.glob(s, recursive=True))]
            if not matches:
                raise UserError(f"no files match {s!r}")
        else:
            raise UserError(f"input not found: {s}")
        for m in matches:
            if m.is_dir():
                files = _text_files_under(m)
                if not files:
                    raise UserError(f"{m}: directory holds no text (no *.txt or *.md files)")
                for f in files:
                    add_file(f)
            elif m.is_file():
                add_file(m)
            else:
                raise UserError(f"{m}: not a regular file or directory")
    return sources


def _text_files_under(d: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if f.lower().endswith(TEXT_SUFFIXES) and not f.startswith("."):
                found.append(Path(root) / f)
    return found


# Undecodable bytes replaced since the last reset (module-level: codecs error handlers
# are registered globally, so one handler serves every file).
_replaced = [0]


def _count_replacement(e: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += e.end - e.start
    return "\ufffd", e.end


codecs.register_error("scratchgpt-count-replace", _count_replacement)


def _complete_utf8_prefix(buf: bytes) -> int:
    """Length of `buf` without a trailing incomplete UTF-8 sequence."""
    n = len(buf)
    for i in range(1, min(4, n) + 1):
        b = buf[n - i]
        if b & 0xC0 == 0x80:
            continue
        need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return n - i if need > i else n
    return n


def _decode_stream(f: BinaryIO, name: str, opts: _Options, counter: list[int]) -> Iterator[str]:
    """Decode a byte stream block by block, rejecting binary data and (by default) bad UTF-8."""
    errors = "scratchgpt-count-replace" if opts.errors == "replace" else "strict"
    _replaced[0] = 0
    base = 0  # file offset of carry[0]
    carry = b""
    first = True
    while True:
        block = f.read(_READ_BLOCK)
        counter[0] += len(block)
        nul = block.find(b"\0")
        if nul >= 0:
            raise UserError(f"{name}: looks like a binary file (NUL byte at offset {base + len(carry) + nul}); "
                            "only UTF-8 text can be prepared")
        buf = carry + block
        cut = _complete_utf8_prefix(buf) if block else len(buf)
        try:
            text = buf[:cut].decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid UTF-8 at byte offset {base + e.start} "
                            "(pass --errors replace to replace undecodable bytes)") from None
        if first and text.startswith("\ufeff"):
            text = text[1:]
            opts.report.byte_order_marks_removed += 1
        first = False
        base += cut
        carry = buf[cut:]
        if text:
            yield text
        if not block:
            break
    bad = _replaced[0]
    if bad:
        opts.report.invalid_utf8_replaced += bad
        if bad > _MAX_REPLACED_SHARE * max(base, 1):
            raise UserError(f"{name}: looks like a binary file ({bad} of {base} bytes are not UTF-8)")


def _line_chunks(texts: Iterable[str]) -> Iterator[str]:
    """Re-cut decoded blocks at line ends, so that no \\r\\n pair, combining sequence or
    Gutenberg marker line is split between two chunks."""
    held = ""
    for text in texts:
        held += text
        cut = held.rfind("\n") + 1
        if cut == 0 and len(held) > 4 * _READ_BLOCK:  # a huge line: cut at a safe character
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


def _documents(src: _Source, opts: _Options, stdin: BinaryIO | None,
               bytes_in: list[int]) -> Iterator[Iterator[str]]:
    """Yield each document of a source as an iterator over its raw (uncleaned) text chunks."""
    if src.kind == "builtin":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise UserError("this Python has no pydoc_data module: give input files") from None
        for key in sorted(topics):
            bytes_in[0] += len(topics[key].encode("utf-8"))
            yield iter([topics[key]])
        return
    if src.kind == "stdin":
        f = stdin if stdin is not None else sys.stdin.buffer
        yield _decode_stream(f, src.name, opts, bytes_in)
        return
    try:
        f = open(src.path, "rb")
    except OSError as e:
        raise UserError(f"{src.name}: cannot read ({e.strerror})") from None
    with f:
        if src.kind == "text":
            yield _decode_stream(f, src.name, opts, bytes_in)
        else:
            yield from _jsonl_documents(f, src.name, opts, bytes_in)


def _jsonl_documents(f: BinaryIO, name: str, opts: _Options, bytes_in: list[int]) -> Iterator[Iterator[str]]:
    errors = "scratchgpt-count-replace" if opts.errors == "replace" else "strict"
    _replaced[0] = 0
    offset = 0
    for lineno, raw in enumerate(f, 1):
        bytes_in[0] += len(raw)
        if b"\0" in raw:
            nul = offset + raw.index(b"\0")
            raise UserError(f"{name}: looks like a binary file (NUL byte at offset {nul})")
        try:
            line = raw.decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid UTF-8 at byte offset {offset + e.start} (line {lineno}; "
                            "pass --errors replace to replace undecodable bytes)") from None
        offset += len(raw)
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{name}:{lineno}: invalid JSON ({e})") from None
        text = obj.get(opts.jsonl_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{name}:{lineno}: no string field {opts.jsonl_field!r} (choose it with --jsonl-field)")
        yield iter([text])
    opts.report.invalid_utf8_replaced += _replaced[0]


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


def _read_corpus(sources: list[_Source], opts: _Options, spool: BinaryIO, stdin: BinaryIO | None,
                 bar) -> tuple[list[_Doc], int]:
    """Pass 1: clean every document into the spool; returns the kept documents and bytes read."""
    r = opts.report
    docs: list[_Doc] = []
    seen: set[bytes] = set()
    bytes_in = [0]
    pos = 0
    for src in sources:
        for raw_chunks in _documents(src, opts, stdin, bytes_in):
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
                bar.update(bytes_in[0] - bar.n)
            r.nfc_documents_changed += changed[0]
            digest = h.digest()
            if not content:
                r.empty_documents_dropped += 1
            elif opts.dedup and digest in seen:
                r.duplicate_documents_removed += 1
            else:
                if opts.dedup:
                    seen.add(digest)
                key = hashlib.sha256(opts.seed.to_bytes(16, "big", signed=True) + digest).digest()
                docs.append(_Doc(start, pos, chars, int.from_bytes(key[:8], "big"), src.is_val))
                r.chars_out += chars
                continue
            spool.seek(start)
            spool.truncate()
            pos = start
    bar.update(bytes_in[0] - bar.n)
    return docs, bytes_in[0]


def _counting(chunks: Iterable[str], r: _Report) -> Iterator[str]:
    for c in chunks:
        r.chars_in += len(c)
        yield c


# -- splitting ----------------------------------------------------------------------------


def _split(docs: list[_Doc], explicit_val: bool, val_fraction: float,
           spool_path: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]], str]:
    """Byte spans of the spool for (train, val), one per document, and the split method."""
    if explicit_val:
        train = [(d.start, d.end) for d in docs if not d.is_val]
        val = [(d.start, d.end) for d in docs if d.is_val]
        method = "explicit"
    elif len(docs) == 1:
        d = docs[0]
        cut_char = int(d.chars * (1.0 - val_fraction))
        cut = d.start + _byte_offset_of_char(spool_path, d.start, d.end, cut_char)
        train, val = [(d.start, cut)], [(cut, d.end)]
        method = "tail"
    else:
        n = len(docs)
        k = min(n - 1, max(1, round(n * val_fraction)))
        order = sorted(range(n), key=lambda i: (docs[i].key, i))
        is_val = np.zeros(n, dtype=bool)
        is_val[order[:k]] = True
        train = [(d.start, d.end) for d, v in zip(docs, is_val) if not v]
        val = [(d.start, d.end) for d, v in zip(docs, is_val) if v]
        method = "documents"
    train = [s for s in train if s[1] > s[0]]
    val = [s for s in val if s[1] > s[0]]
    if not train:
        raise UserError("the training split is empty after cleaning: give more text")
    if not val:
        raise UserError("the validation split is empty: give more text, a larger --val-fraction, "
                        "or --val files with text in them")
    return train, val, method


def _byte_offset_of_char(path: Path, start: int, end: int, n_chars: int) -> int:
    """Byte offset, from `start`, of character number `n_chars` of the UTF-8 in [start, end)."""
    seen = 0
    pos = start
    with open(path, "rb") as f:
        while pos < end:
            block = np.frombuffer(os.pread(f.fileno(), min(_READ_BLOCK * 8, end - pos), pos), dtype=np.uint8)
            lead = np.flatnonzero((block & 0xC0) != 0x80)  # first byte of each character
            if seen + len(lead) > n_chars:
                return pos + int(lead[n_chars - seen]) - start
            seen += len(lead)
            pos += len(block)
    return end - start


# -- work for the pool --------------------------------------------------------------------

# A task is a list of (start, end, separator_before) byte spans of the spool.
_Task = list


def _make_tasks(spans: list[tuple[int, int]], spool_path: Path, task_bytes: int) -> list[_Task]:
    """Group document spans into tasks of about `task_bytes`, cutting long documents only
    where tokenization does not depend on the cut (see `_safe_cut`)."""
    tasks: list[_Task] = []
    cur: _Task = []
    size = 0
    with open(spool_path, "rb") as f:
        for i, (start, end) in enumerate(spans):
            sep = i > 0
            while end - start > task_bytes:
                cut = _safe_cut(f, start + task_bytes // 2, start + task_bytes)
                cur.append((start, cut, sep))
                tasks.append(cur)
                cur, size, sep = [], 0, False
                start = cut
            cur.append((start, end, sep))
            size += end - start
            if size >= task_bytes:
                tasks.append(cur)
                cur, size = [], 0
    if cur:
        tasks.append(cur)
    return tasks


_SAFE_CUT = re.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")


def _safe_cut(f: BinaryIO, lo: int, hi: int) -> int:
    """A cut in [lo, hi] right after a newline between two visible ASCII characters:
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


_WORKER_STATE: dict[str, Any] = {}


def _read_span(fd: int, start: int, end: int) -> str:
    return os.pread(fd, end - start, start).decode("utf-8")


def _count_task(spool: str, piece_dir: str, item: tuple[int, _Task]) -> tuple[list[str], list[int]]:
    """Pass 2 (bpe): distinct byte-level pieces of the task's text and their counts.

    The piece sequence is also saved (as indices into the distinct pieces) so that pass 3
    does not split the text again: splitting is the most expensive step in Python.
    """
    from ..tokenizer import index_pieces, split_pieces

    i, task = item
    pieces: list[str] = []
    seg_pieces = []
    fd = os.open(spool, os.O_RDONLY)
    try:
        for start, end, _ in task:
            p = split_pieces(_read_span(fd, start, end))
            pieces += p
            seg_pieces.append(len(p))
    finally:
        os.close(fd)
    uniq, inv, counts = index_pieces(pieces)
    dtype = "uint16" if len(uniq) <= 65536 else "uint32"
    inv.astype(dtype).tofile(os.path.join(piece_dir, f"{i}.bin"))
    with open(os.path.join(piece_dir, f"{i}.json"), "w", encoding="utf-8") as f:
        json.dump({"uniq": uniq, "segments": seg_pieces, "dtype": dtype}, f, ensure_ascii=False)
    return uniq, counts.tolist()


def _encode_task(spool: str, tok_path: str, dtype: str, piece_dir: str | None,
                 item: tuple[int, _Task]) -> tuple[bytes, int]:
    """Pass 3: the task's token ids as raw bytes (separators between documents included),
    and how many ids are <unk>. Uses the pieces saved by `_count_task` when there are some."""
    from ..tokenizer import Tokenizer

    i, task = item
    tok = _WORKER_STATE.get(tok_path)
    if tok is None:
        _WORKER_STATE.clear()
        tok = _WORKER_STATE[tok_path] = Tokenizer.load(tok_path)
    if tok.eot_id is not None:
        sep = np.array([tok.eot_id], dtype=np.int64)
    else:  # only needed (and only in the vocabulary) when there are several documents
        sep = None
    parts = []
    if piece_dir is not None:
        with open(os.path.join(piece_dir, f"{i}.json"), encoding="utf-8") as f:
            saved = json.load(f)
        inv = np.fromfile(os.path.join(piece_dir, f"{i}.bin"), dtype=saved["dtype"]).astype(np.int64)
        ids, ends = tok.encode_indexed(saved["uniq"], inv)
        bounds = np.concatenate([[0], ends])[np.cumsum([0] + saved["segments"])]
        segments = [ids[bounds[k]:bounds[k + 1]] for k in range(len(task))]
    else:
        fd = os.open(spool, os.O_RDONLY)
        try:
            segments = [tok.encode_array(_read_span(fd, start, end)) for start, end, _ in task]
        finally:
            os.close(fd)
    for (_, _, sep_before), seg in zip(task, segments):
        if sep_before:
            if sep is None:
                sep = tok.encode_array(CHAR_DOC_SEPARATOR)
            parts.append(sep)
        parts.append(seg)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    unknown = int((ids == tok.unk_id).sum()) if tok.unk_id is not None else 0
    return ids.astype(dtype).tobytes(), unknown


def _char_task(spool: str, task: _Task) -> str:
    """Pass 2 (char): the distinct characters in the task's text."""
    chars: set[str] = set()
    fd = os.open(spool, os.O_RDONLY)
    try:
        for start, end, _ in task:
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


def _prepare_into(tmp: Path, sources: list[_Source], opts: _Options, *, tokenizer: str, vocab_size: int,
                  explicit_val: bool, val_fraction: float, min_frequency: int, buffer_bytes: int,
                  workers: int, show: bool, stdin: BinaryIO | None, settings: dict) -> dict[str, Any]:
    from .. import __version__
    from ..tokenizer import EOT, scale_counts, train_bpe_from_counts, train_char_tokenizer

    spool_path = tmp / "corpus.spool"
    with open(spool_path, "wb+") as spool, _bar(show, None, "reading") as bar:
        docs, bytes_in = _read_corpus(sources, opts, spool, stdin, bar)
    if not docs:
        r = opts.report
        raise UserError(f"the corpus is empty after cleaning ({r.documents_read} document(s) read, "
                        f"{r.empty_documents_dropped} empty, {r.duplicate_documents_removed} duplicate)")
    train, val, method = _split(docs, explicit_val, val_fraction, spool_path)
    # Tasks small enough that a few in flight per worker stay well inside the buffer.
    task_bytes = max(64 << 10, min(4 << 20, buffer_bytes // (16 * workers)))
    spool_size = spool_path.stat().st_size
    runner = _Runner(workers if spool_size > 2 * task_bytes else 1)
    try:
        train_tasks = _make_tasks(train, spool_path, task_bytes)
        val_tasks = _make_tasks(val, spool_path, task_bytes)
        train_bytes = sum(e - s for s, e in train)
        val_bytes = sum(e - s for s, e in val)
        unknown_chars = 0
        piece_dir = None
        bpe_info = None
        if tokenizer == "char":
            with _bar(show, train_bytes + val_bytes, "characters") as bar:
                train_chars: set[str] = set()
                for task, chars in zip(train_tasks, runner.map(_char_task, (str(spool_path),), train_tasks)):
                    train_chars.update(chars)
                    bar.update(sum(e - s for s, e, _ in task))
                val_chars: set[str] = set()
                for task, chars in zip(val_tasks, runner.map(_char_task, (str(spool_path),), val_tasks)):
                    val_chars.update(chars)
                    bar.update(sum(e - s for s, e, _ in task))
            if len(train) > 1 or len(val) > 1:
                train_chars.update(CHAR_DOC_SEPARATOR)
            tok = train_char_tokenizer([train_chars], add_unk=bool(val_chars - train_chars))
        else:
            counts: Counter = Counter()
            max_pieces = max(200_000, buffer_bytes // 128)
            pruned_below = 0
            piece_dir = tmp / "pieces"
            piece_dir.mkdir()
            items = list(enumerate(train_tasks))
            with _bar(show, train_bytes, "counting") as bar:
                for (_, task), (uniq, c) in zip(items, runner.map(_count_task, (str(spool_path), str(piece_dir)), items)):
                    counts.update(dict(zip(uniq, c)))
                    bar.update(sum(e - s for s, e, _ in task))
                    # Memory stays bounded on corpora with endless distinct pieces by
                    # forgetting the rarest ones (they hardly affect which merges win).
                    while len(counts) > max_pieces:
                        pruned_below += 1
                        counts = Counter({p: n for p, n in counts.items() if n > pruned_below})
            train_counts, count_scale = scale_counts(counts, BPE_MAX_REPLAY)
            del counts
            tok = train_bpe_from_counts(train_counts, vocab_size, min_frequency=min_frequency,
                                        show_progress=show)
            del train_counts
            bpe_info = {"distinct_pieces_pruned_below": pruned_below, "count_scale": count_scale}
        dtype = dtype_for_vocab(tok.vocab_size)
        tok_path = tok.save(tmp)
        results = {}
        with _bar(show, train_bytes + val_bytes, "encoding") as bar:
            for split, tasks in (("train", train_tasks), ("val", val_tasks)):
                h = hashlib.sha256()
                n_tokens = 0
                items = list(enumerate(tasks))
                saved = str(piece_dir) if piece_dir is not None and split == "train" else None
                args = (str(spool_path), str(tok_path), dtype, saved)
                with open(tmp / f"{split}.bin", "wb") as f:
                    for (_, task), (data, unk) in zip(items, runner.map(_encode_task, args, items)):
                        f.write(data)
                        h.update(data)
                        n_tokens += len(data) // np.dtype(dtype).itemsize
                        unknown_chars += unk
                        bar.update(sum(e - s for s, e, _ in task))
                    f.flush()
                    os.fsync(f.fileno())
                results[split] = (n_tokens, h.hexdigest())
    finally:
        runner.close()
    os.unlink(spool_path)
    if piece_dir is not None:
        shutil.rmtree(piece_dir)
    for split in SPLITS:
        if results[split][0] == 0:
            raise UserError(f"the {split} split has no tokens")
    report = vars(opts.report).copy()
    report["val_unknown_chars"] = unknown_chars
    meta = {
        "format_version": FORMAT_VERSION,
        "created_by": f"scratchgpt {__version__}",
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "eot_id": tok.eot_id,
        "unk_id": tok.unk_id,
        "document_separator": EOT if tok.kind == "bpe" else CHAR_DOC_SEPARATOR,
        "train_tokens": results["train"][0],
        "val_tokens": results["val"][0],
        "train_documents": len(train),
        "val_documents": len(val),
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
        "bytes_in": bytes_in,
        "split": method,
        "cleaning": report,
        "bpe_training": bpe_info,
        "files": {
            "train.bin": {"bytes": results["train"][0] * np.dtype(dtype).itemsize, "sha256": results["train"][1]},
            "val.bin": {"bytes": results["val"][0] * np.dtype(dtype).itemsize, "sha256": results["val"][1]},
            "tokenizer.json": {"bytes": tok_path.stat().st_size, "sha256": sha256_file(tok_path)},
        },
        "settings": settings,
    }
    atomic_write_json(tmp / META_FILE, meta)
    for name in (META_FILE, "tokenizer.json"):  # atomic writes create private (0600) files
        os.chmod(tmp / name, 0o666 & ~_umask())
    fsync_dir(tmp)
    return meta


