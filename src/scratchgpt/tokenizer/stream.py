"""Decoding ids to text as they are generated, never emitting part of a character."""

from __future__ import annotations

import codecs
from typing import Iterable, Sequence


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting part of a multi-byte character.

    Byte-level BPE tokens may end inside a character (a Chinese character is 3 bytes, often split
    over 2 tokens): those bytes are held until the character is complete. Bytes that can't be
    UTF-8 whatever follows (the model's own invalid sequences) become U+FFFD as soon as that is
    certain. At the end, `flush` drops an incomplete last character rather than emit U+FFFD for it
    (`dropped_bytes` says how many bytes that was).
    """

    def __init__(self, tokenizer) -> None:  # a Tokenizer
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

    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:  # an "hf" Tokenizer
        self._hf = tokenizer._hf
        self._context = [int(i) for i in context]
        self._ids: list[int] = []  # pushed so far
        self._sent = 0  # characters of text emitted so far
        self._stream = self._start(self._context)
        self._pending = 0  # ids pushed whose text is not out yet
        self.dropped_bytes = 0

    def _start(self, prefill: list[int]):
        from tokenizers.decoders import DecodeStream

        try:
            return DecodeStream(ids=prefill, skip_special_tokens=False)
        except TypeError:  # tokenizers < 0.22 has no prefill: step through the context, which ends the same
            stream = DecodeStream(skip_special_tokens=False)
            for i in prefill:
                try:
                    stream.step(self._hf, i)
                except Exception:  # (an invalid byte sequence in the context: see _resync)
                    stream = DecodeStream(skip_special_tokens=False)
            return stream

    def push(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            self._ids.append(int(i))
            try:
                piece = self._stream.step(self._hf, int(i))
            except Exception:  # DecodeStream gives up on some bytes that are not UTF-8 (sampled without the guard)
                piece = self._resync()
            self._pending += 1
            if piece is not None:
                out.append(piece)
                self._sent += len(piece)
                self._pending = 0
        return "".join(out)

    def _resync(self) -> str:
        """Decode the whole text once and emit what is new (U+FFFD for the invalid bytes, as decode gives them),
        then restart the stream after it."""
        whole = self._hf.decode(self._context + self._ids, skip_special_tokens=False)
        start = len(self._hf.decode(self._context, skip_special_tokens=False)) + self._sent
        self._stream = self._start(self._context + self._ids)
        return whole[start:]

    def flush(self) -> str:
        """The end of the text: ids still waiting for the rest of a character are dropped."""
        self.dropped_bytes = self._pending  # (byte-fallback ids: one byte each)
        self._pending = 0
        return ""

    def decode(self, ids: Iterable[int]) -> str:
        return self.push(ids) + self.flush()
