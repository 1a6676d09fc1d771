"""Learning a tokenizer from text: a char vocabulary, or byte-level BPE from piece counts."""

from __future__ import annotations

from typing import Iterable, Iterator

from .. import UserError
from .core import Tokenizer
from .files import EOT, UNK
from .pieces import to_byte_level

# Byte-level BPE needs the 256 byte symbols plus <|endoftext|>.
MIN_BPE_VOCAB = 257
MAX_VOCAB = 2**31 - 1


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




def train_bpe_from_counts(
    counts: dict[str, int],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    exact: bool = True,
) -> Tokenizer:
    """Train byte-level BPE from piece counts ({piece: count}, pieces as `split_pieces` cuts them).

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
        word = to_byte_level(piece) + " "
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
