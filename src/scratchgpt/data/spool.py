"""Pass 1 of `prepare`: every input read once (streamed, in blocks), cleaned, and appended as
UTF-8 to a spool file in the temporary output directory, with only a few numbers kept per
document; then each document's split (train or val), from a hash of its content.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .. import UserError
from .clean import CleanOptions, clean, counting, gutenberg, line_chunks
from .inputs import READ_BLOCK, Reading, Source, documents


class Docs:
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


def read_corpus(sources: list[Source], opts: CleanOptions, reading: Reading, spool: BinaryIO,
                stdin: BinaryIO | None, bar) -> Docs:
    """Pass 1: clean every document into the spool; returns the kept documents."""
    r = opts.report
    docs = Docs()
    seen: set[bytes] = set()
    pos = 0
    for src in sources:
        for raw_chunks in documents(src, reading, stdin):
            r.documents_read += 1
            try:
                size, chars, content, digest = _spool_document(raw_chunks, opts, spool)
            except UnicodeEncodeError as e:  # JSON can escape lone surrogates, which are not text
                raise UserError(f"{src.name}: document {r.documents_read} holds {e.object[e.start]!r}, a lone "
                                "surrogate: not Unicode text") from None
            if bar is not None:
                bar.update(reading.bytes_in - bar.n)
                bar.set_postfix_str(f"{r.documents_read:,} docs", refresh=False)
            if _kept(opts, seen, content, digest):
                key = hashlib.sha256(opts.seed.to_bytes(16, "big", signed=True) + digest).digest()
                docs.add(pos, pos + size, chars, int.from_bytes(key[:8], "big"), src.is_val)
                r.chars_out += chars
                pos += size
            else:
                spool.seek(pos)
                spool.truncate()
    r.byte_order_marks_removed += reading.byte_order_marks_removed
    r.invalid_utf8_replaced += reading.invalid_utf8_replaced
    return docs


def _spool_document(raw_chunks: Iterator[str], opts: CleanOptions,
                    spool: BinaryIO) -> tuple[int, int, bool, bytes]:
    """Append one document's clean text to the spool: bytes written, characters, whether any
    of it is not whitespace, and its sha256."""
    r = opts.report
    h = hashlib.sha256()
    size = chars = 0
    content = False
    changed = [False]
    cleaned = (clean(c, opts, changed) for c in counting(line_chunks(raw_chunks), r))
    if opts.strip_gutenberg:
        cleaned = gutenberg(cleaned, r)
    for text in cleaned:
        if not text:
            continue
        data = text.encode("utf-8")
        spool.write(data)
        h.update(data)
        size += len(data)
        chars += len(text)
        content = content or not text.isspace()
    r.nfc_documents_changed += changed[0]
    return size, chars, content, h.digest()


def _kept(opts: CleanOptions, seen: set[bytes], content: bool, digest: bytes) -> bool:
    """Whether a document stays: it has content and (with dedup) was not seen before."""
    r = opts.report
    if not content:
        r.empty_documents_dropped += 1
        return False
    if opts.dedup and digest in seen:
        r.duplicate_documents_removed += 1
        return False
    if opts.dedup:
        seen.add(digest)
    return True


def split_docs(docs: Docs, explicit_val: bool, val_fraction: float, spool_path: Path,
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
        cut = int(start[0]) + byte_offset_of_char(spool_path, int(start[0]), int(end[0]),
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


def byte_offset_of_char(path: Path, start: int, end: int, n_chars: int) -> int:
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
