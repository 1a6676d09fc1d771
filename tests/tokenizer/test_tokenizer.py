"""Tokenizers: char and byte-level BPE, their tokenizer.json, and agreement with HF tokenizers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import train_bpe_tokenizer
from scratchgpt import UserError
from scratchgpt.tokenizer import (
    EOT,
    Tokenizer,
    split_pieces,
    train_char_tokenizer,
)

CHINESE = (
    "训练生成预训练变换器（GPT）模型需要遵循一定的步骤，包括预处理数据、定义模型、"
    "选择优化器和损失函数、以及训练和评估模型。\n数据预处理是训练GPT模型的第一步。\n"
)
# Whitespace variants, letters/numbers of every kind (Nl/No take the exact regex path),
# astral characters, combining marks, contractions and a literal special token.
TRICKY = (
    "Hello  world\n\n  x\t\ty 12345 ½ ² ٣ Ⅻ ① 中文，测试。\u3000全角 \x1c\x1d\x85\xa0 a\u2028b "
    " café naïve e\u0301 😀🎉 𝟎𝟏 𐄇 x_y __init__ it's we'll I'M 'S don't\r\n\r\n   \n\t "
)


def _english(n_chars: int, seed: int = 0) -> str:
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
             "but have an they you were her she there would their we him been has when who will more no if "
             "out so said what up its about into than them can only other new some could time these two may "
             "then do first any my now such like our over man me even most made after also did many before").split()
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".!?,;")
        out.append(s + ("\n" if rng.random() < 0.2 else " "))
        size += len(out[-1]) + 1
    return "".join(out)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe_tokenizer([_english(60_000), CHINESE * 20, TRICKY * 5], 600)


# -- char --------------------------------------------------------------------------------


def test_char_vocab_is_sorted_characters_like_nanogpt():
    text = "hello world\nthe quick brown fox\n"
    tok = train_char_tokenizer([text])
    chars = sorted(set(text))
    assert tok.kind == "char" and tok.vocab_size == len(chars)
    assert tok.eot_id is None and tok.unk_id is None
    assert tok.encode(text) == [chars.index(c) for c in text]
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_characters_raise_or_map_to_unk():
    tok = train_char_tokenizer(["abc"])
    with pytest.raises(UserError, match="'z'"):
        tok.encode("abz")
    tok = train_char_tokenizer(["abc"], add_unk=True)
    assert tok.unk_id == 3 and tok.vocab_size == 4
    assert tok.encode("azb") == [0, 3, 1]
    assert tok.count_unknown("azzb") == 2


def test_char_tokenizer_json_is_a_real_hf_file(tmp_path):
    from tokenizers import Tokenizer as HF

    text = CHINESE + "a\tb\r\nc  d\n"
    tok = train_char_tokenizer([text])
    tok.save(tmp_path)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == "char" and again.encode(text) == tok.encode(text)


def test_char_encode_is_fast():
    import time

    text = _english(1_000_000)
    tok = train_char_tokenizer([text])
    t0 = time.perf_counter()
    ids = tok.encode_array(text)
    assert time.perf_counter() - t0 < 1.0
    assert tok.decode(ids) == text


# -- bpe ---------------------------------------------------------------------------------


def test_bpe_round_trips_any_text(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 600 and bpe.eot_id == 0
    for text in (TRICKY, CHINESE, _english(5000, seed=9), "", "\n", " ", "🎉" * 3):
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_matches_hf_tokenizers_encoding(bpe):
    # Our fast splitter must cut exactly where tokenizers' ByteLevel regex does.
    hf = bpe._hf
    # (U+31350, U+2FFC: letters of Unicode 15 and symbols of 15.1, newer than Python 3.11's tables)
    for text in (TRICKY, CHINESE, _english(20_000, seed=3), "a''b 's ''s x\u00a0 y\u2009z 3.14 ½½ 12ab",
                 "A\U00031350\U00031351 b\u2ffcc \U000323af."):
        assert bpe.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert [p for p in split_pieces(text)] == [
            bytes(_unbyte(c) for c in w).decode("utf-8") for w, _ in hf.pre_tokenizer.pre_tokenize_str(text)
        ]


def _unbyte(c: str) -> int:
    from scratchgpt.tokenizer.pieces import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}[c]


def test_bpe_special_token_text_stays_plain(bpe):
    ids = bpe.encode(f"a{EOT}b")
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == f"a{EOT}b"
    assert bpe.decode([bpe.eot_id]) == EOT


def test_bpe_file_loads_in_hf_and_transformers(bpe, tmp_path):
    from tokenizers import Tokenizer as HF

    bpe.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["normalizer"] is None and spec["pre_tokenizer"]["add_prefix_space"] is False
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.decode(hf.encode(TRICKY).ids) == TRICKY
    again = Tokenizer.load(tmp_path)
    assert again.kind == "bpe" and again.encode(TRICKY) == bpe.encode(TRICKY)
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast.decode(fast.encode(CHINESE)) == CHINESE


def test_decode_bytes_and_stream_decoder_never_split_characters(bpe):
    text = CHINESE + "😀 é"
    ids = bpe.encode(text)
    assert bpe.decode_bytes(ids) == text.encode("utf-8")
    dec = bpe.stream_decoder()
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_bpe_vocab_size_limits():
    with pytest.raises(UserError, match="at least 257"):
        train_bpe_tokenizer(["abc"], 100)
    with pytest.raises(UserError, match="more than this corpus supports"):
        train_bpe_tokenizer(["tiny text tiny text"], 5000)


def test_decode_rejects_out_of_range_ids(bpe):
    with pytest.raises(UserError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_encode_array_dtype(bpe):
    ids = bpe.encode_array("hello world")
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
