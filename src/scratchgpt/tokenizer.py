"""Character, byte-level BPE and imported tokenizers, all stored as a Hugging Face `tokenizer.json`.

* ``char``: one id per character of the training split, sorted by code point (so
  tinyshakespeare gets the same 65 ids as nanoGPT's shakespeare_char). A single ``<unk>``
  id is appended only when asked for (validation text holding characters train lacks).
  Saved as a WordLevel model with a one-character Split pre-tokenizer and a Fuse
  decoder, so ``tokenizers.Tokenizer.from_file`` loads it and round-trips.
* ``bpe``: GPT-2 style byte-level BPE with ``<|endoftext|>`` at id 0, no normalizer and
  no prefix space, so ``decode(encode(text)) == text`` for any text.

* ``hf``: any other tokenizer.json that ``tokenizers`` loads (imported models: Llama's
  SentencePiece-style BPE with byte fallback, SmolLM2's and Qwen's byte-level BPE with their
  own splits and normalizers, WordPiece, Unigram...). Encoded and decoded by ``tokenizers``
  itself, exactly as transformers' PreTrainedTokenizerFast does, with two conventions shared
  with the other kinds: `encode` adds no special tokens (``bos_ids`` holds what the file's
  post-processor puts before a text, e.g. Llama's ``<s>``: generation, eval and data
  preparation add it where transformers' ``tokenizer(text)`` would), and special-token
  strings inside text are plain characters (transformers' ``split_special_tokens=True``).
  Its end-of-text token (``eot_id``) is the ``eos_token`` of the transformers
  ``tokenizer_config.json`` kept beside tokenizer.json with the model's chat template files
  and generation_config.json (`HF_SIDE_FILES`, carried byte for byte wherever tokenizer.json
  goes; import writes them); ``stop_ids`` adds the latter's eos_token_id list (Llama 3's).

Encoding char and bpe does not go through ``tokenizers`` for whole texts: its byte-level regex
runs at ~1.5 MB/s per core, while splitting with the stdlib ``re`` and caching the
encoding of each distinct piece is several times faster. The pieces are the same ones
``tokenizers`` produces (see ``split_pieces``; tests compare both), so ids agree.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import sys
import unicodedata
from collections import Counter
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import UserError
from .utils import atomic_write_bytes

EOT = "<|endoftext|>"
UNK = "<unk>"
TOKENIZER_FILE = "tokenizer.json"
# transformers' tokenizer settings (eos_token, chat_template...), kept beside an "hf" tokenizer.json with
# the chat template files transformers >= 4.4x writes apart from it, and the model's generation_config.json
# (its eos_token_id list: the ids that end a turn, e.g. Llama 3's <|end_of_text|> and <|eot_id|>)
HF_CONFIG_FILE = "tokenizer_config.json"
HF_GENERATION_FILE = "generation_config.json"
HF_SIDE_FILES = (HF_CONFIG_FILE, "chat_template.jinja", "chat_template.json", HF_GENERATION_FILE)
# the special-token names transformers passes to a chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
HF_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Byte-level BPE needs the 256 byte symbols plus <|endoftext|>.
MIN_BPE_VOCAB = 257
MAX_VOCAB = 2**31 - 1
# Forget cached piece encodings past this many entries, so memory stays bounded on
# corpora with endless distinct pieces (numbers, hashes, URLs).
_CACHE_LIMIT = 400_000

__all__ = [
    "EOT",
    "UNK",
    "HF_CONFIG_FILE",
    "HF_SIDE_FILES",
    "HF_GENERATION_FILE",
    "Tokenizer",
    "StreamDecoder",
    "copy_tokenizer",
    "train_char_tokenizer",
    "train_bpe_tokenizer",
    "bpe_word_counts",
    "train_bpe_from_counts",
    "spec_model_type",
]


# ---------------------------------------------------------------------------------------
# Byte-level helpers


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
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


def _to_byte_level(piece: str) -> str:
    # latin-1 turns each byte into the character with that code, which the table maps.
    return piece.encode("utf-8").decode("latin-1").translate(_bytes_to_unicode())


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
    if _bmp_check().search(text) or (_ASTRAL.search(text) and (_astral_check().search(text) or _astral_unassigned(text))):
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


class _PieceCache:
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


# ---------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A tokenizer: ``kind`` is ``"char"``, ``"bpe"`` (scratchgpt's own) or ``"hf"`` (any other tokenizer.json)."""

    kind: str
    vocab_size: int
    eot_id: int | None
    unk_id: int | None
    bos_ids: list[int]  # put before a text where transformers' tokenizer(text) would ("hf" kind only)

    def __init__(self, hf, kind: str, *, raw: str | None = None, side_files: dict[str, bytes] | None = None) -> None:
        # `hf` is a tokenizers.Tokenizer holding the vocabulary (and, for bpe, merges); for kind "hf",
        # `raw` is the file's text and `side_files` the HF_SIDE_FILES beside it (all kept byte for byte).
        self._hf = hf
        self.kind = kind
        self._raw = raw
        self.side_files = dict(side_files or {})
        self.hf_config = _json_object(self.side_files.get(HF_CONFIG_FILE), HF_CONFIG_FILE)
        vocab: dict[str, int] = hf.get_vocab(with_added_tokens=True)
        # (hub files may leave ids unused: the vocabulary spans the largest id)
        self.vocab_size = max(vocab.values(), default=-1) + 1 if kind == "hf" else len(vocab)
        self._itos: list[str] = [""] * self.vocab_size
        for tok, i in vocab.items():
            if not 0 <= i < self.vocab_size:
                raise UserError(f"tokenizer: id {i} of {tok!r} is outside 0..{self.vocab_size - 1}")
            self._itos[i] = tok
        self.eot_id = vocab.get(EOT) if kind != "hf" else self._hf_eos()
        self.unk_id = vocab.get(UNK) if kind == "char" else None
        self.bos_ids = []
        self._token_bytes: list[bytes] | None = None
        self._hf_specials = None
        if kind == "hf":
            hf.encode_special_tokens = True  # "<s>" typed in text is text, as with the other kinds
            self.bos_ids = _prefix_specials(hf)
        elif kind == "char":
            chars = [t for t in self._itos if len(t) == 1]
            if len(chars) + (self.unk_id is not None) != self.vocab_size:
                raise UserError("tokenizer: a char vocabulary may only hold single characters and <unk>")
            self._stoi = {t: i for i, t in enumerate(self._itos)}
            order = sorted((ord(t), i) for i, t in enumerate(self._itos) if len(t) == 1)
            self._cps = np.array([c for c, _ in order], dtype=np.uint32)
            self._cp_ids = np.array([i for _, i in order], dtype=np.int64)
        else:
            fast = getattr(hf, "encode_batch_fast", hf.encode_batch)
            # Special tokens inside text are deliberately not honoured: every piece is plain
            # text (the split never yields a whole "<|endoftext|>"), so a document that
            # mentions it keeps it as ordinary characters.
            self._pieces = _PieceCache(lambda ps: [e.ids for e in fast(ps, add_special_tokens=False)])

    def _hf_eos(self) -> int | None:
        eos = self.special_tokens().get("eos_token")
        return self._hf.token_to_id(eos) if eos is not None else None

    def special_tokens(self) -> dict[str, str]:
        """An "hf" tokenizer's named special tokens from tokenizer_config.json ({"eos_token": "</s>", ...})."""
        out = {}
        for name in HF_SPECIAL_TOKEN_NAMES:
            value = self.hf_config.get(name)
            value = value.get("content") if isinstance(value, dict) else value  # older files: an AddedToken dict
            if isinstance(value, str):
                out[name] = value
        return out

    def added_tokens(self) -> dict:
        """The tokenizer file's added tokens, {id: tokenizers.AddedToken} (.content, .special)."""
        return dict(self._hf.get_added_tokens_decoder())

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end generated text: `eot_id`, then an imported model's other eos ids (its
        generation_config.json's eos_token_id list, e.g. Llama 3 Instruct's <|eot_id|> beside <|end_of_text|>)."""
        ids = [] if self.eot_id is None else [self.eot_id]
        eos = _json_object(self.side_files.get(HF_GENERATION_FILE), HF_GENERATION_FILE).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if type(i) is int and 0 <= i < self.vocab_size and i not in ids:
                ids.append(i)
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Encode an "hf" tokenizer's text in which special-token strings ARE the special tokens (a chat
        template's own text; message text keeps them plain: `encode`), as transformers' tokenizer(text,
        add_special_tokens=False) does."""
        if self.kind != "hf":
            raise ValueError("encode_with_special_tokens is for imported (hf) tokenizers")
        if self._hf_specials is None:  # a second copy that honours them (a shared flag would race in serve)
            self._hf_specials = type(self._hf).from_str(self._raw or self._hf.to_str())
            self._hf_specials.encode_special_tokens = False
        return self._hf_specials.encode_batch([text], add_special_tokens=False)[0].ids  # (releases the GIL)

    @property
    def eot_token(self) -> str | None:
        """The end-of-text token's string (`<|endoftext|>`, or an imported tokenizer's eos such as `</s>`)."""
        return None if self.eot_id is None else self._itos[self.eot_id]

    # -- encoding ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to an int64 numpy array (the fast path the data pipeline uses)."""
        if self.kind == "char":
            return self._encode_char(text)
        if self.kind == "hf":  # (encode_batch lets other threads run meanwhile; encode holds the GIL throughout)
            return np.asarray(self._hf.encode_batch([text], add_special_tokens=False)[0].ids, dtype=np.int64)
        return self._pieces.encode(split_pieces(text))

    def encode_indexed(self, uniq: list[str], inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BPE ids for the piece sequence `uniq[inv]` (see `index_pieces`), and the end
        offset of each piece's ids. Lets the data pipeline split text only once."""
        if self.kind != "bpe":
            raise ValueError("encode_indexed is for bpe tokenizers")
        return self._pieces.encode_indexed(uniq, inv)

    def _encode_char(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.int64)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._cps, cps)
        np.minimum(pos, len(self._cps) - 1, out=pos)
        ids = self._cp_ids[pos]
        bad = self._cps[pos] != cps
        if bad.any():
            if self.unk_id is None:
                missing = sorted({chr(c) for c in cps[bad].tolist()})
                shown = ", ".join(repr(c) for c in missing[:10])
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise UserError(
                    f"{len(missing)} character(s) not in the char tokenizer's vocabulary: {shown}{more}"
                )
            ids[bad] = self.unk_id
        return ids

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` a char tokenizer maps to <unk> (0 for bpe)."""
        if self.kind != "char" or not text:
            return 0
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._cps, cps), len(self._cps) - 1)
        return int((self._cps[pos] != cps).sum())

    # -- decoding ------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; invalid UTF-8 (a split multi-byte character) becomes U+FFFD."""
        if self.kind == "char":
            return "".join(map(self._itos.__getitem__, self._check_ids(ids)))
        if self.kind == "hf":  # special tokens are shown, as <|endoftext|> is by the other kinds
            return self._hf.decode(self._check_ids(ids), skip_special_tokens=False)
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes for `ids`; lets a streamer hold back an incomplete UTF-8 character."""
        if self.kind == "hf":
            return self.decode(ids).encode("utf-8")
        table = self.token_bytes_table()
        return b"".join(map(table.__getitem__, self._check_ids(ids)))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UserError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        return ids

    def stream_decoder(self, context: Sequence[int] = ()) -> "StreamDecoder | HFStreamDecoder":
        """A decoder for ids generated after `context` (the prompt: an "hf" tokenizer's decoder may
        drop a text's leading space, which a continuation must keep; the other kinds ignore it)."""
        return HFStreamDecoder(self, context) if self.kind == "hf" else StreamDecoder(self)

    def id_to_token(self, i: int) -> str:
        return self._itos[i]

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def token_bytes(self, i: int) -> bytes:
        return self.token_bytes_table()[i]

    def token_bytes_table(self) -> list[bytes]:
        """The UTF-8 bytes of every token, indexed by id ("hf": the vocabulary's spelling, in UTF-8)."""
        if self._token_bytes is None:
            if self.kind in ("char", "hf"):
                self._token_bytes = [t.encode("utf-8", "surrogatepass") for t in self._itos]
            else:
                back = {c: b for b, c in _bytes_to_unicode().items()}
                special = {t.content for t in self._hf.get_added_tokens_decoder().values()}
                table = []
                for t in self._itos:
                    if t in special or any(c not in back for c in t):
                        table.append(t.encode("utf-8"))
                    else:
                        table.append(bytes(back[c] for c in t))
                self._token_bytes = table
        return self._token_bytes

    # -- persistence ---------------------------------------------------------------------

    def to_json(self) -> str:
        """tokenizer.json's text (an "hf" tokenizer's exactly as it was read)."""
        return self._raw if self._raw is not None else self._hf.to_str(pretty=True)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` (and an "hf" tokenizer's tokenizer_config.json) atomically."""
        path = Path(directory) / TOKENIZER_FILE
        if self._raw is not None:
            atomic_write_bytes(path, self._raw.encode("utf-8"))
        else:
            atomic_write_bytes(path, (self.to_json() + "\n").encode("utf-8"))
        for name, data in self.side_files.items():
            atomic_write_bytes(path.parent / name, data)
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike) -> "Tokenizer":
        """Load from a directory holding tokenizer.json, or from the file itself."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory_or_file)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no tokenizer found at {path}")
        try:
            raw = path.read_text(encoding="utf-8")
            kind = _kind_of(json.loads(raw))
            hf = HFTokenizer.from_str(raw)
        except UserError:
            raise
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise UserError(f"{path}: not a valid tokenizer.json: the tokenizers library cannot load it "
                            f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
        if kind != "hf":
            return cls(hf, kind)
        side = {name: (path.parent / name).read_bytes() for name in HF_SIDE_FILES if (path.parent / name).is_file()}
        try:
            return cls(hf, kind, raw=raw, side_files=side)
        except UserError as e:
            raise UserError(f"{path.parent}/{e}") from None

    @property
    def chat_template(self) -> str | list | None:
        """An imported model's own (jinja) chat template, if its tokenizer files hold one."""
        if "chat_template.jinja" in self.side_files:
            return self.side_files["chat_template.jinja"].decode("utf-8", "replace")
        spare = _json_object(self.side_files.get("chat_template.json"), "chat_template.json")
        return self.hf_config.get("chat_template") or spare.get("chat_template")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def spec_model_type(spec: dict) -> str | None:
    """The model type of a parsed tokenizer.json ("BPE", "WordLevel", ...). Files from older `tokenizers`
    (GPT-2's on the Hugging Face hub) omit "type"; `tokenizers` then recognises BPE by its merges."""
    model = spec.get("model") or {}
    return model.get("type") or ("BPE" if "merges" in model else None)


def _kind_of(spec: dict) -> str:
    """"char" or "bpe" for a file in exactly the shape scratchgpt writes (its fast encoders agree with
    `tokenizers` on those), else "hf" (encoded by `tokenizers` itself)."""
    return _scratchgpt_kind(spec) or "hf"


def _scratchgpt_kind(spec: dict) -> str | None:
    kind = spec_model_type(spec)
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    post = spec.get("post_processor") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if spec.get("normalizer") or post.get("type") not in (None, "ByteLevel", "TemplateProcessing") \
            or (post.get("type") == "TemplateProcessing" and post.get("special_tokens")):
        return None
    if kind == "BPE":
        byte_level = pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
        plain = not (model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix")
                     or model.get("end_of_word_suffix"))
        return "bpe" if byte_level and decoder == "ByteLevel" and plain else None
    if kind == "WordLevel":
        split = pre.get("type") == "Split" and (pre.get("pattern") or {}).get("Regex") == r"[\s\S]" \
            and pre.get("behavior") == "Isolated" and not pre.get("invert")
        return "char" if split and decoder == "Fuse" else None
    return None


def _prefix_specials(hf) -> list[int]:
    """The ids the post-processor puts before a text (Llama's <s>), found by encoding a probe both ways."""
    probe = "a b"
    try:
        plain = hf.encode(probe, add_special_tokens=False).ids
        full = hf.encode(probe, add_special_tokens=True).ids
    except Exception:  # e.g. a WordLevel vocabulary without these words and no unknown token
        return []
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def _json_object(data: bytes | None, name: str) -> dict:
    if data is None:
        return {}
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{name}: not a JSON object")
    return obj


def copy_tokenizer(tokenizer_file: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Copy tokenizer.json into `directory` byte for byte, with an "hf" tokenizer's HF_SIDE_FILES beside it."""
    src = Path(tokenizer_file)
    shutil.copyfile(src, Path(directory) / TOKENIZER_FILE)
    side = [n for n in HF_SIDE_FILES if (src.parent / n).is_file()]
    if side and _kind_of(json.loads(src.read_text(encoding="utf-8"))) == "hf":
        for name in side:
            shutil.copyfile(src.parent / name, Path(directory) / name)


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting part of a multi-byte character.

    Byte-level BPE tokens may end inside a character (a Chinese character is 3 bytes, often split
    over 2 tokens): those bytes are held until the character is complete. Bytes that can't be
    UTF-8 whatever follows (the model's own invalid sequences) become U+FFFD as soon as that is
    certain. At the end, `flush` drops an incomplete last character rather than emit U+FFFD for it
    (`dropped_bytes` says how many bytes that was).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._table = tokenizer.token_bytes_table()
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.dropped_bytes = 0

    def push(self, ids: Iterable[int]) -> str:
        return self._dec.decode(b"".join(self._table[int(i)] for i in ids))

    def flush(self) -> str:
        """The end of the text: held bytes are the start of a character that never came, so they are dropped."""
        self.dropped_bytes = len(self._dec.getstate()[0])
        self._dec.reset()
        return ""

    def decode(self, ids: Iterable[int]) -> str:
        """A whole text at once, by the same rules (what `push` and `flush` return, joined)."""
        return self.push(ids) + self.flush()


class HFStreamDecoder:
    """StreamDecoder's contract for an "hf" tokenizer, through `tokenizers`' own DecodeStream.

    Its decoders work on whole texts (Llama's strips the text's first space, byte-fallback tokens
    like <0xE2> form a character only together), so each step decodes the recent ids with the
    prompt as context and emits what was added; a step that ends inside a character emits nothing
    until the character is complete. At the end, `flush` drops such an unfinished character.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        from tokenizers.decoders import DecodeStream

        self._hf = tokenizer._hf
        context = [int(i) for i in context]
        try:
            self._stream = DecodeStream(ids=context, skip_special_tokens=False)
        except TypeError:  # tokenizers < 0.22 has no prefill: step through the context, which ends the same
            self._stream = DecodeStream(skip_special_tokens=False)
            for i in context:
                self._stream.step(self._hf, i)
        self._pending = 0  # ids pushed whose text is not out yet
        self.dropped_bytes = 0

    def push(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            piece = self._stream.step(self._hf, int(i))
            self._pending += 1
            if piece is not None:
                out.append(piece)
                self._pending = 0
        return "".join(out)

    def flush(self) -> str:
        """The end of the text: ids still waiting for the rest of a character are dropped."""
        self.dropped_bytes = self._pending  # (byte-fallback ids: one byte each)
        self._pending = 0
        return ""

    def decode(self, ids: Iterable[int]) -> str:
        return self.push(ids) + self.flush()


# ---------------------------------------------------------------------------------------
# Training


def train_char_tokenizer(chars: Iterable[str], *, add_unk: bool = False) -> Tokenizer:
    """Char tokenizer over the distinct characters in `chars` (strings or a set of chars)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    charset: set[str] = set()
    for s in chars:
        charset.update(s)
    if not charset:
        raise UserError("cannot build a char tokenizer from empty text")
    vocab = {c: i for i, c in enumerate(sorted(charset))}
    if add_unk:
        vocab[UNK] = len(vocab)
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    # One piece per code point, newlines included; Fuse joins them back without spaces.
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return Tokenizer(hf, "char")


def _check_bpe_vocab_size(vocab_size: int) -> None:
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(
            f"--vocab-size {vocab_size} is out of range: byte-level BPE needs at least "
            f"{MIN_BPE_VOCAB} (256 bytes + {EOT})"
        )


def bpe_word_counts(texts: Iterable[str], counts: Counter | None = None) -> Counter:
    """Count byte-level pieces (as the BPE model spells them) over `texts`."""
    counts = Counter() if counts is None else counts
    for text in texts:
        counts.update(split_pieces(text))
    return counts


def train_bpe_from_counts(
    counts: dict[str, int],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    exact: bool = True,
) -> Tokenizer:
    """Train byte-level BPE from piece counts (`bpe_word_counts`).

    The counts are replayed to `tokenizers`' BPE trainer with a whitespace pre-tokenizer
    (byte-level symbols never contain whitespace), which costs a fraction of letting it
    run the byte-level regex over the corpus again; the result is the same model.
    With `exact`, ending with fewer tokens than asked for is a UserError.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    _check_bpe_vocab_size(vocab_size)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(_replay_counts(counts), trainer=trainer)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    tok = Tokenizer(hf, "bpe")
    if tok.eot_id != 0:
        raise AssertionError("<|endoftext|> must be id 0")
    if exact and tok.vocab_size < vocab_size:
        raise UserError(
            f"--vocab-size {vocab_size} is more than this corpus supports: BPE training stopped at "
            f"{tok.vocab_size} tokens (no pair occurs at least {min_frequency} times); "
            f"use --vocab-size {tok.vocab_size} or less, or more text"
        )
    return tok


def scale_counts(counts: dict[str, int], max_total: int) -> tuple[dict[str, int], float]:
    """Counts scaled down so they sum to about `max_total` (pieces rounding to 0 dropped).

    Training replays every occurrence to `tokenizers`, at ~0.6 us each; past a few
    million occurrences the relative frequencies, which are all BPE uses, are known well
    enough, so big corpora train in bounded time. Returns (counts, factor applied).
    """
    total = sum(counts.values())
    if total <= max_total:
        return counts, 1.0
    f = max_total / total
    scaled = {}
    for piece, n in counts.items():
        k = int(n * f + 0.5)
        if k:
            scaled[piece] = k
    return scaled, f


def _replay_counts(counts: dict[str, int], chunk_chars: int = 1 << 16) -> Iterator[str]:
    # Small chunks: tokenizers buffers a few hundred items from the iterator at a time.
    buf: list[str] = []
    size = 0
    for piece, n in counts.items():
        word = _to_byte_level(piece) + " "
        per_chunk = max(1, chunk_chars // len(word))
        while n > 0:
            k = min(n, per_chunk)
            buf.append(word * k)
            size += len(word) * k
            n -= k
            if size >= chunk_chars:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, exact: bool = True
) -> Tokenizer:
    """Train byte-level BPE on an iterable of texts (streamed; only piece counts are kept)."""
    return train_bpe_from_counts(bpe_word_counts(texts), vocab_size, min_frequency=min_frequency, exact=exact)
