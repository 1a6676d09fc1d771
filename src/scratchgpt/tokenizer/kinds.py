"""What differs between the tokenizer kinds: how text becomes ids, and ids text and bytes.

One small codec per kind ("char", "bpe", "hf"); `Tokenizer` holds one and keeps what every kind
shares (the vocabulary, special tokens, side files, saving and loading).
"""

from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np

from .. import UserError
from .files import UNK
from .pieces import PieceCache, bytes_to_unicode, split_pieces
from .stream import HFStreamDecoder, StreamDecoder


class Codec:
    """The behaviour all kinds share unless they say otherwise."""

    kind = ""
    dense_ids = True  # the vocabulary is exactly ids 0..n-1 (hub files ("hf") may leave ids unused)
    eos_default = True  # without an eos_token in tokenizer_config.json, <|endoftext|> (if any) ends a text
    unk_id: int | None = None
    bos_ids: Sequence[int] = ()

    def __init__(self, hf, itos: list[str]) -> None:
        self._hf = hf
        self._itos = itos
        self._table: list[bytes] | None = None

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(map(self.token_bytes().__getitem__, ids))

    def token_bytes(self) -> list[bytes]:
        """The bytes of every token, indexed by id (built once)."""
        if self._table is None:
            self._table = self._token_bytes()
        return self._table

    def _token_bytes(self) -> list[bytes]:
        return [t.encode("utf-8", "surrogatepass") for t in self._itos]

    def count_unknown(self, text: str) -> int:
        return 0

    def encode_indexed(self, uniq: list[str], inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("encode_indexed is for bpe tokenizers")

    def stream_decoder(self, tokenizer, context: Sequence[int]):
        return StreamDecoder(tokenizer)


class CharCodec(Codec):
    """One id per character (a WordLevel vocabulary of single characters and maybe <unk>), found with numpy."""

    kind = "char"

    def __init__(self, hf, itos: list[str]) -> None:
        super().__init__(hf, itos)
        self.unk_id = hf.token_to_id(UNK)
        chars = [t for t in itos if len(t) == 1]
        if len(chars) + (self.unk_id is not None) != len(itos):
            raise UserError("tokenizer: a char vocabulary may only hold single characters and <unk>")
        order = sorted((ord(t), i) for i, t in enumerate(itos) if len(t) == 1)
        self._cps = np.array([c for c, _ in order], dtype=np.uint32)
        self._cp_ids = np.array([i for _, i in order], dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
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

    def decode(self, ids: list[int]) -> str:
        return "".join(map(self._itos.__getitem__, ids))

    def count_unknown(self, text: str) -> int:
        if not text:
            return 0
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._cps, cps), len(self._cps) - 1)
        return int((self._cps[pos] != cps).sum())


class BpeCodec(Codec):
    """scratchgpt's byte-level BPE: split with `split_pieces`, each distinct piece encoded once by `tokenizers`."""

    kind = "bpe"

    def __init__(self, hf, itos: list[str]) -> None:
        super().__init__(hf, itos)
        fast = getattr(hf, "encode_batch_fast", hf.encode_batch)
        # Special tokens inside text are deliberately not honoured: every piece is plain
        # text (the split never yields a whole "<|endoftext|>"), so a document that
        # mentions it keeps it as ordinary characters.
        self._pieces = PieceCache(lambda ps: [e.ids for e in fast(ps, add_special_tokens=False)])

    def encode(self, text: str) -> np.ndarray:
        return self._pieces.encode(split_pieces(text))

    def encode_indexed(self, uniq: list[str], inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._pieces.encode_indexed(uniq, inv)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def _token_bytes(self) -> list[bytes]:
        return _byte_level_bytes(self._itos, {t.content for t in self._hf.get_added_tokens_decoder().values()})


class HfCodec(Codec):
    """Any other tokenizer.json, encoded and decoded by `tokenizers` itself (as transformers does)."""

    kind = "hf"
    dense_ids = False
    eos_default = False  # only what its tokenizer_config.json names (transformers has no default either)

    def __init__(self, hf, itos: list[str]) -> None:
        super().__init__(hf, itos)
        hf.encode_special_tokens = True  # "<s>" typed in text is text, as with the other kinds
        self.bos_ids = prefix_specials(hf)

    def encode(self, text: str) -> np.ndarray:
        # encode_batch lets other threads (serve's event loop) run meanwhile; encode holds the GIL throughout
        return np.asarray(self._hf.encode_batch([text], add_special_tokens=False)[0].ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        # special tokens are shown, as <|endoftext|> is by the other kinds
        return self._hf.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def stream_decoder(self, tokenizer, context: Sequence[int]):
        return HFStreamDecoder(tokenizer, context)

    def _token_bytes(self) -> list[bytes]:
        """The bytes each token decodes to, as the file's decoder makes them: a ByteLevel decoder's byte
        alphabet (SmolLM2, Qwen), ByteFallback's <0xNN> (Llama) and Replace/Metaspace's "▁" -> " "; added tokens
        and other vocabularies (WordPiece...) are their spelling."""
        steps = _decoder_steps(json.loads(self._hf.to_str()).get("decoder"))
        types = {d.get("type") for d in steps}
        added = {t.content for t in self._hf.get_added_tokens_decoder().values()}
        if "ByteLevel" in types:
            return _byte_level_bytes(self._itos, added)
        swaps = [(d["pattern"]["String"], d.get("content", "")) for d in steps
                 if d.get("type") == "Replace" and "String" in (d.get("pattern") or {})]
        swaps += [(d.get("replacement") or "▁", " ") for d in steps if d.get("type") == "Metaspace"]
        fallback = "ByteFallback" in types
        out = []
        for t in self._itos:
            if fallback and t not in added and _BYTE_TOKEN.fullmatch(t):
                out.append(bytes([int(t[3:5], 16)]))
                continue
            for a, b in swaps if t not in added else ():
                t = t.replace(a, b)
            out.append(t.encode("utf-8", "surrogatepass"))
        return out


_BYTE_TOKEN = re.compile("<0x[0-9A-Fa-f]{2}>")


def _decoder_steps(decoder: dict | None) -> list[dict]:
    """A tokenizer.json decoder as a flat list (a Sequence's decoders in order)."""
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders") or [] for d in _decoder_steps(sub)]
    return [decoder]


def _byte_level_bytes(itos: list[str], added: set[str]) -> list[bytes]:
    """GPT-2's byte alphabet back to bytes; added tokens (and anything outside the alphabet) are their UTF-8."""
    # str.translate maps each alphabet character to the one whose code is its byte, and the characters below 256
    # that are not in the alphabet to U+FFFF, so latin-1 encodes exactly the tokens made of alphabet characters
    # (3x faster than a lookup per character: 20 ms for SmolLM2's 49,152 tokens, on the way to a first token)
    table = {ord(c): b for b, c in bytes_to_unicode().items()}
    table.update({code: 0xFFFF for code in range(256) if code not in table})
    out = []
    for t in itos:
        try:
            out.append(t.encode("utf-8") if t in added else t.translate(table).encode("latin-1"))
        except UnicodeEncodeError:  # a character outside the alphabet
            out.append(t.encode("utf-8"))
    return out


KINDS: dict[str, type[Codec]] = {c.kind: c for c in (CharCodec, BpeCodec, HfCodec)}


def prefix_specials(hf) -> list[int]:
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

