"""Text cleaning for `prepare`: newline normalisation, control characters, Unicode NFC and
Project Gutenberg headers/footers, with a count of every change (meta.json's "cleaning").

Documents arrive as streams of decoded blocks; `line_chunks` re-cuts them at line ends so that
each cleaning step sees whole lines and the result never depends on the block size.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .inputs import READ_BLOCK

# Remove C0/C1 controls except \t and \n; \r is left to newline normalisation.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_GUTENBERG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.M | re.I
)


@dataclass
class CleanReport:
    """What cleaning changed, summed over the corpus (meta.json's "cleaning", in this order)."""

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
class CleanOptions:
    """The cleaning steps to run (PrepareConfig's flags of the same names), and their report."""

    seed: int
    nfc: bool
    normalize_newlines: bool
    strip_control: bool
    strip_gutenberg: bool
    dedup: bool
    report: CleanReport = field(default_factory=CleanReport)


def line_chunks(texts: Iterable[str]) -> Iterator[str]:
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


def clean(text: str, opts: CleanOptions, changed: list[bool]) -> str:
    """One chunk cleaned; `changed[0]` becomes True when NFC changed it."""
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


def gutenberg(chunks: Iterable[str], r: CleanReport) -> Iterator[str]:
    """Drop a Project Gutenberg header (through the START line) and footer (from END on)."""
    first = True
    ended = False
    for chunk in chunks:
        if ended:
            r.gutenberg_chars_removed += len(chunk)
            continue
        if first:
            first = False
            chunk = _strip_header(chunk, r)
        m = _GUTENBERG_END.search(chunk)
        if m:
            r.gutenberg_footers_removed += 1
            r.gutenberg_chars_removed += len(chunk) - m.start()
            chunk = chunk[: m.start()]
            ended = True
        yield chunk


def _strip_header(chunk: str, r: CleanReport) -> str:
    m = _GUTENBERG_START.search(chunk)
    if not m:
        return chunk
    cut = m.end() + (1 if chunk[m.end():m.end() + 1] == "\n" else 0)
    r.gutenberg_headers_removed += 1
    r.gutenberg_chars_removed += cut
    return chunk[cut:]


def counting(chunks: Iterable[str], r: CleanReport) -> Iterator[str]:
    """The chunks unchanged, their characters counted as read (`chars_in`)."""
    for c in chunks:
        r.chars_in += len(c)
        yield c
