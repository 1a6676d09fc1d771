"""GPT-2's byte-level pre-tokenization, emulated with the stdlib `re`, and a cache of piece encodings.

`tokenizers`' byte-level regex runs at ~1.5 MB/s per core; splitting with `re` and caching the
encoding of each distinct piece is several times faster. `split_pieces` yields exactly the pieces
`tokenizers` produces (tests compare both), so ids agree.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache
from itertools import chain

import numpy as np

# Forget cached piece encodings past this many entries, so memory stays bounded on
# corpora with endless distinct pieces (numbers, hashes, URLs).
_CACHE_LIMIT = 400_000


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def to_byte_level(piece: str) -> str:
    # latin-1 turns each byte into the character with that code, which the table maps.
    return piece.encode("utf-8").decode("latin-1").translate(bytes_to_unicode())


# Oniguruma's \s (what tokenizers' ByteLevel regex uses) is the Unicode White_Space set;
# Python's \s also matches \x1c-\x1f, so spell it out.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS = _WHITESPACE
# GPT-2's pre-tokenizer regex is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# The stdlib `re` has no \p{..}, but its \w is exactly L+N+"_" and \d exactly Nd, so
# [^\W\d_] is L plus the other numbers (Nl, No: "½", "Ⅻ", "²"). Text without those gets
# this fast pattern; text with them gets the exact one below, which excludes them by name.
# Alternatives are reordered (letters first, contractions folded) for speed; no two of
# them can match at the same position, so the pieces are unchanged.
_FAST = re.compile(
    rf"[ ]?[^\W\d_]+|[ ]?\d+|'(?:[stmd]|re|ve|ll)|[ ]?(?:[^\w{_WS}]|_)+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


@lru_cache(maxsize=1)
def _bmp_other_numbers() -> str:
    """Class body of the Nl/No code points ("½", "Ⅻ", "²") in the BMP."""
    cat = unicodedata.category
    return _ranges_class(lambda cp: cat(chr(cp)) in ("Nl", "No"), 0, 0xFFFF)


@lru_cache(maxsize=1)
def _astral_other_numbers() -> str:
    # Kept apart (and built only when needed, it walks ~1M code points) because `re`
    # has fast bitmap sets only for BMP-only classes.
    cat = unicodedata.category
    return _ranges_class(lambda cp: cat(chr(cp)) in ("Nl", "No"), 0x10000, sys.maxunicode)


@lru_cache(maxsize=1)
def _bmp_unassigned() -> str:
    """Class body of the BMP code points this Python's Unicode tables leave unassigned (Cn)."""
    cat = unicodedata.category
    return _ranges_class(lambda cp: cat(chr(cp)) == "Cn", 0, 0xFFFF)


def _astral_unassigned(text: str) -> bool:
    # (astral Cn is ~800k code points in hundreds of ranges: a slow class for `re`, so look at each astral char)
    cat = unicodedata.category
    return any(cat(c) == "Cn" for c in set(_ASTRAL.findall(text)))


# What the fast pattern may split wrongly: other numbers, and code points newer than this Python's
# Unicode tables (tokenizers' regex engine may know them as letters).
@lru_cache(maxsize=1)
def _bmp_check() -> re.Pattern:
    return re.compile(f"[{_bmp_other_numbers()}{_bmp_unassigned()}]")


@lru_cache(maxsize=1)
def _astral_check() -> re.Pattern:
    return re.compile(f"[{_astral_other_numbers()}]")


@lru_cache(maxsize=1)
def _bmp_unassigned_check() -> re.Pattern:
    return re.compile(f"[{_bmp_unassigned()}]")


@lru_cache(maxsize=1)
def _byte_level():
    from tokenizers.pre_tokenizers import ByteLevel

    return ByteLevel(add_prefix_space=False, use_regex=True)


@lru_cache(maxsize=1)
def _exact_pattern() -> re.Pattern:
    x = _bmp_other_numbers() + _astral_other_numbers()
    return re.compile(
        rf"[ ]?[^\W\d_{x}]+|[ ]?[\d{x}]+|'(?:[stmd]|re|ve|ll)|[ ]?(?:[^\w{_WS}]|_)+"
        rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
    )


def split_pieces(text: str) -> list[str]:
    """Split text into the pieces byte-level BPE encodes independently (as tokenizers does)."""
    # (ASCII holds no character the checks look for: a fresh `sample` of an ASCII prompt skips building them, 70 ms)
    if not text.isascii() and (_bmp_check().search(text) or (_ASTRAL.search(text) and (
            _astral_check().search(text) or _astral_unassigned(text)))):
        if _bmp_unassigned_check().search(text) or _astral_unassigned(text):
            # rare: let tokenizers' own regex split it (its offsets count characters)
            return [text[a:b] for _, (a, b) in _byte_level().pre_tokenize_str(text)]
        return _exact_pattern().findall(text)
    return _FAST.findall(text)


def index_pieces(pieces: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(distinct pieces in first-seen order, index of each piece into them, their counts)."""
    uniq = list(dict.fromkeys(pieces))
    pos = dict(zip(uniq, range(len(uniq))))
    inv = np.fromiter(map(pos.__getitem__, pieces), dtype=np.int64, count=len(pieces))
    return uniq, inv, np.bincount(inv, minlength=len(uniq))


def _ranges_class(pred, lo: int, hi: int) -> str:
    """A regex character class body for the code points in [lo, hi] satisfying `pred`."""
    out = []
    start = prev = None
    for cp in range(lo, hi + 1):
        if pred(cp):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            out.append(_range(start, prev))
            start = None
    if start is not None:
        out.append(_range(start, prev))
    return "".join(out)


def _range(a: int, b: int) -> str:
    esc = lambda cp: "\\U%08x" % cp  # noqa: E731
    return esc(a) if a == b else f"{esc(a)}-{esc(b)}"


class PieceCache:
    """Encodings of distinct pieces, stored flat so a whole text is one numpy gather."""

    def __init__(self, encode_many) -> None:
        self._encode_many = encode_many  # list[str] -> list[list[int]]
        self.clear()

    def clear(self) -> None:
        self.index: dict[str, int] = {}
        self.flat = np.zeros(1 << 16, dtype=np.int64)
        self.starts = np.zeros(1 << 12, dtype=np.int64)
        self.lens = np.zeros(1 << 12, dtype=np.int64)
        self.n_flat = 0

    def encode(self, pieces: list[str]) -> np.ndarray:
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        self._ensure(set(pieces))
        which = np.fromiter(map(self.index.__getitem__, pieces), dtype=np.int64, count=len(pieces))
        return self._gather(which)[0]

    def encode_indexed(self, uniq: list[str], inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids for the pieces `uniq[inv]`, and the end offset of each piece's ids."""
        if len(inv) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self._ensure(uniq)
        which = np.fromiter(map(self.index.__getitem__, uniq), dtype=np.int64, count=len(uniq))
        return self._gather(which[inv])

    def _ensure(self, pieces) -> None:
        missing = [p for p in pieces if p not in self.index]
        if missing:
            if len(self.index) + len(missing) > _CACHE_LIMIT:
                self.clear()
                missing = list(pieces)
            self._add(missing, self._encode_many(missing))

    def _gather(self, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lens = self.lens[which]
        ends = np.cumsum(lens)
        # output position k reads flat[start of its piece + (k - where that piece's ids begin)]
        shift = np.repeat(self.starts[which] - (ends - lens), lens)
        return self.flat[np.arange(int(ends[-1]), dtype=np.int64) + shift], ends

    def _add(self, pieces: list[str], encodings: list[list[int]]) -> None:
        n0 = len(self.index)
        n1 = n0 + len(pieces)
        total = sum(map(len, encodings))
        self.flat = _grow(self.flat, self.n_flat + total)
        self.starts = _grow(self.starts, n1)
        self.lens = _grow(self.lens, n1)
        lens = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        self.lens[n0:n1] = lens
        self.starts[n0:n1] = self.n_flat + np.cumsum(lens) - lens
        self.flat[self.n_flat : self.n_flat + total] = np.fromiter(
            chain.from_iterable(encodings), dtype=np.int64, count=total
        )
        self.n_flat += total
        self.index.update(zip(pieces, range(n0, n1)))


def _grow(a: np.ndarray, need: int) -> np.ndarray:
    if need <= len(a):
        return a
    b = np.zeros(max(need, 2 * len(a)), dtype=a.dtype)
    b[: len(a)] = a
    return b
