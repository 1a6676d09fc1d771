"""The Tokenizer: a vocabulary, its special tokens and side files, and one codec for its kind (kinds.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import UserError
from ..utils import atomic_write_bytes, first_line
from .files import (EOT, HF_CONFIG_FILE, HF_GENERATION_FILE, HF_SPECIAL_TOKEN_NAMES, TOKENIZER_FILE, json_object,
                    kind_of, loaded_spec, read_side_files)
from .kinds import KINDS
from .stream import HFStreamDecoder, StreamDecoder


class Tokenizer:
    """A tokenizer: ``kind`` is ``"char"``, ``"bpe"`` (scratchgpt's own) or ``"hf"`` (any other tokenizer.json)."""

    kind: str
    vocab_size: int
    eot_id: int | None
    unk_id: int | None
    bos_ids: list[int]  # put before a text where transformers' tokenizer(text) would (an imported Llama's <s>)

    def __init__(self, hf, kind: str, *, raw: str | bytes | None = None,
                 side_files: dict[str, bytes] | None = None) -> None:
        # `hf` is a tokenizers.Tokenizer holding the vocabulary (and, for bpe, merges); `raw` is the file's text
        # as read and `side_files` the HF_SIDE_FILES beside it, any kind's (all kept byte for byte). The text is
        # held as UTF-8 bytes: a byte-level vocabulary's str takes 2 bytes a character (6.6 MiB for SmolLM2's).
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r} (one of {', '.join(KINDS)})")
        codec = KINDS[kind]
        self._hf = hf
        self.kind = kind
        self._raw = raw.encode("utf-8") if isinstance(raw, str) else raw
        self.side_files = dict(side_files or {})
        self.hf_config = json_object(self.side_files.get(HF_CONFIG_FILE), HF_CONFIG_FILE)
        vocab: dict[str, int] = hf.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab) if codec.dense_ids else max(vocab.values(), default=-1) + 1
        self._itos: list[str] = [""] * self.vocab_size
        for tok, i in vocab.items():
            if not 0 <= i < self.vocab_size:
                raise UserError(f"tokenizer: id {i} of {tok!r} is outside 0..{self.vocab_size - 1}")
            self._itos[i] = tok
        # the model's own eos (tokenizer_config.json's eos_token: SmolLM2-Instruct's <|im_end|>), else the kind's
        self.eot_id = self._named_id("eos_token")
        if self.eot_id is None and codec.eos_default:
            self.eot_id = vocab.get(EOT)
        self._codec = codec(hf, self._itos)
        self.unk_id = self._codec.unk_id
        self.bos_ids = list(self._codec.bos_ids)
        self._hf_specials = None

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens().get(name)
        return self._hf.token_to_id(token) if token is not None else None

    @property
    def bos_id(self) -> int | None:
        """The model's bos id: what `bos_ids` puts first, else tokenizer_config.json's bos_token (SmolLM2's
        <|im_start|>, which its tokenizer(text) does not add); None where neither names one."""
        return self.bos_ids[0] if self.bos_ids else self._named_id("bos_token")

    def special_tokens(self) -> dict[str, str]:
        """An imported tokenizer's named special tokens from tokenizer_config.json ({"eos_token": "</s>", ...})."""
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
        eos = json_object(self.side_files.get(HF_GENERATION_FILE), HF_GENERATION_FILE).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if type(i) is int and 0 <= i < self.vocab_size and i not in ids:
                ids.append(i)
        return ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Encode text in which special-token strings ARE the special tokens (a chat template's own text;
        message text keeps them plain: `encode`), as transformers' tokenizer(text, add_special_tokens=False)
        does. Between special tokens the ids are `encode`'s (`tokenizers` and the kinds' encoders agree)."""
        if self._hf_specials is None:
            # char and bpe never change the flag (their codecs keep special strings plain themselves), so the one
            # tokenizer serves; the hf kind's is set, so it gets a second copy that honours them (flipping a shared
            # flag would race in serve), ~30 MiB for a 49k vocabulary
            self._hf_specials = self._hf if not self._hf.encode_special_tokens else (
                type(self._hf).from_buffer(self._raw) if self._raw is not None
                else type(self._hf).from_str(self._hf.to_str()))
            self._hf_specials.encode_special_tokens = False
        return self._hf_specials.encode_batch([text], add_special_tokens=False)[0].ids  # (releases the GIL)

    @property
    def eot_token(self) -> str | None:
        """The end-of-text token's string (`<|endoftext|>`, or an imported tokenizer's eos such as `</s>`)."""
        return None if self.eot_id is None else self._itos[self.eot_id]

    # -- encoding ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to an int64 numpy array (the fast path the data pipeline uses)."""
        return self._codec.encode(text)

    def encode_indexed(self, uniq: list[str], inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BPE ids for the piece sequence `uniq[inv]` (see `index_pieces`), and the end
        offset of each piece's ids. Lets the data pipeline split text only once."""
        return self._codec.encode_indexed(uniq, inv)

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` a char tokenizer maps to <unk> (0 for bpe)."""
        return self._codec.count_unknown(text)

    # -- decoding ------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; invalid UTF-8 (a split multi-byte character) becomes U+FFFD."""
        return self._codec.decode(self._check_ids(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes for `ids`; lets a streamer hold back an incomplete UTF-8 character."""
        return self._codec.decode_bytes(self._check_ids(ids))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UserError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        return ids

    def stream_decoder(self, context: Sequence[int] = ()) -> StreamDecoder | HFStreamDecoder:
        """A decoder for ids generated after `context` (the prompt: an "hf" tokenizer's decoder may
        drop a text's leading space, which a continuation must keep; the other kinds ignore it)."""
        return self._codec.stream_decoder(self, context)

    def id_to_token(self, i: int) -> str:
        return self._itos[i]

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def token_bytes_table(self) -> list[bytes]:
        """The bytes every token stands for, indexed by id (a byte-level token's may be part of a character)."""
        return self._codec.token_bytes()

    # -- persistence ---------------------------------------------------------------------

    def to_json(self) -> str:
        """tokenizer.json's text (a loaded one's exactly as it was read)."""
        return self._raw.decode("utf-8") if self._raw is not None else self._hf.to_str(pretty=True)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` and its side files (tokenizer_config.json...) atomically."""
        path = Path(directory) / TOKENIZER_FILE
        if self._raw is not None:
            atomic_write_bytes(path, self._raw)
        else:
            atomic_write_bytes(path, (self.to_json() + "\n").encode("utf-8"))
        for name, data in self.side_files.items():
            atomic_write_bytes(path.parent / name, data)
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike) -> "Tokenizer":
        """Load from a directory holding tokenizer.json, or from the file itself."""
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no tokenizer found at {path}")
        raw, kind, hf = _read(path)
        try:
            return cls(hf, kind, raw=raw, side_files=read_side_files(path.parent))
        except UserError as e:
            raise UserError(f"{path.parent}/{e}") from None

    @property
    def chat_template(self) -> str | list | None:
        """An imported model's own (jinja) chat template, if its tokenizer files hold one (any kind)."""
        if "chat_template.jinja" in self.side_files:
            return self.side_files["chat_template.jinja"].decode("utf-8", "replace")
        spare = json_object(self.side_files.get("chat_template.json"), "chat_template.json")
        return self.hf_config.get("chat_template") or spare.get("chat_template")

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _read(path: Path):
    """(UTF-8 bytes, kind, tokenizers.Tokenizer) of a tokenizer.json; a file `tokenizers` cannot load is a
    UserError."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        raw = path.read_bytes()
        hf = HFTokenizer.from_buffer(raw)
        return raw, kind_of(loaded_spec(hf)), hf
    except UserError:
        raise
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise UserError(f"{path}: not a valid tokenizer.json: the tokenizers library cannot load it "
                        f"({first_line(e)})") from None
