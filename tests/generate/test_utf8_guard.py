"""The UTF-8 guard: sampling with a byte-level tokenizer never emits bytes that break a character.

A small GPT is trained here (a few hundred steps) on Chinese paragraphs written into this file, with byte-level
BPE whose tokens often end inside a character. Sampled without the guard it writes U+FFFD; with it, never; its
greedy text is unchanged. A Hypothesis property drives the sampler over random byte vocabularies: every
prefix it emits can still be completed to valid UTF-8.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cli, train_bpe_tokenizer
from scratchgpt import generate as G
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.utf8guard import ACCEPT, REJECT, Utf8Tables, byte_automaton, token_transitions, utf8_tables

PARAGRAPHS = [
    "春天来了，山上的桃花开了，河边的柳树也绿了。孩子们在草地上放风筝，老人坐在门口晒太阳，说今年的雨水比去年多。",
    "我们先把原始文本清洗干净，去掉重复的段落和乱码，再用字节级的分词器把文字切成小块，最后交给模型去学习。",
    "训练一个小模型并不难：准备数据，定义网络，选择优化器，设置学习率，然后耐心地看着损失一点一点地下降。",
    "外婆做的红烧肉最好吃。她先把肉切成方块，用冷水焯一遍，再放冰糖炒出颜色，加酱油和黄酒，小火慢慢炖一个小时。",
    "城市的夜晚很安静。路灯一盏一盏亮起来，街角的小店还开着，店主一边听收音机，一边整理明天要卖的水果。",
    "学习编程的时候，最重要的是多写多练。遇到错误不要着急，先读懂报错信息，再一步一步地检查自己的代码。",
    "秋天的早晨有点凉，田里的稻子已经黄了。农民们忙着收割，机器的声音从远处传来，空气里都是稻草的香味。",
    "模型生成文字的时候，每一步都从概率分布里挑一个词。温度越高，选择越随意；温度越低，句子越稳定，也越重复。",
    "图书馆里人不多，窗外下着小雨。我找了一个靠窗的位置，打开一本旧书，书页已经发黄，但字迹还很清楚。",
    "中文的每个汉字在编码里占三个字节，如果分词器把一个字切成两半，模型就必须学会把它们重新拼在一起。",
    "周末我们去爬山，山路很陡，走了两个小时才到山顶。站在上面往下看，整个小镇都在云雾里，像一幅水墨画。",
    "评估模型不能只看训练损失，还要看验证集上的表现，再读一读它写出来的句子，才知道它到底学会了什么。",
]
TEXT = "\n".join(PARAGRAPHS) + "\n"


@pytest.fixture(scope="module")
def chinese():
    """(tokenizer, model): byte-level BPE with many partial-character tokens, a 2-layer GPT trained 300 steps."""
    tok = train_bpe_tokenizer([TEXT * 4], 330, exact=False)
    ids = torch.tensor(tok.encode(TEXT * 8))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=48, pos="rope"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(ids) - 49, (16,), generator=g)
        batch = torch.stack([ids[s:s + 49] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tok, model.eval()


@pytest.mark.slow
def test_partial_character_tokens_exist(chinese):
    tok, _ = chinese
    table = tok.token_bytes_table()
    partial = [b for b in table if b and not _valid(b)]
    assert len(partial) > 50  # many tokens are part of a character: the model must put bytes together


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_sampled_chinese_has_no_replacement_characters(chinese, temperature):
    """2,000 tokens (8 prompts x 250) at the same seeds: some U+FFFD without the guard, none with it."""
    tok, model = chinese
    prompts = ["春天", "我们", "模型", "外婆", "秋天的", "中文", "评估", ""]
    counts = {}
    for guard in (False, True):
        done = G.complete(model, tok, prompts, max_new_tokens=250, temperature=temperature, top_k=None, seed=7,
                          stop_tokens=(), utf8_guard=guard)
        assert sum(len(c.token_ids) for c in done) == 2000
        counts[guard] = sum(c.text.count("\ufffd") for c in done)
        if guard:
            table = tok.token_bytes_table()
            assert all(_completable(b"".join(table[i] for i in c.token_ids)) for c in done)
    assert counts[False] > 0 and counts[True] == 0, counts


@pytest.mark.slow
def test_greedy_text_is_unchanged_where_it_was_valid(chinese):
    tok, model = chinese
    for prompt in ["春天来了", "训练一个", "城市的夜晚", "图书馆"]:
        free = G.complete(model, tok, [prompt], max_new_tokens=60, temperature=0, utf8_guard=False)[0]
        assert "\ufffd" not in free.text and len(free.token_ids) > 10  # the model writes valid greedy text here
        guarded = G.complete(model, tok, [prompt], max_new_tokens=60, temperature=0)[0]
        assert (guarded.token_ids, guarded.text) == (free.token_ids, free.text)
        streamed = "".join(G.stream(model, tok, prompt, max_new_tokens=60, temperature=0))
        assert streamed == free.text


@pytest.mark.slow
def test_the_guard_is_on_by_default_and_a_flag_turns_it_off(capsys):
    assert G.GenerationConfig().utf8_guard is True
    flags = {"sample": "--no-utf8-guard", "chat": "--no-utf8-guard", "eval": "--no-utf8-guard",
             "train": "--train.sample_utf8_guard"}
    try:
        import fastapi  # noqa: F401
        flags["serve"] = "--no-utf8-guard"
    except ImportError:
        pass
    for command, flag in flags.items():
        code, out, _ = cli(capsys, command, "--help")
        assert code == 0 and flag in out, command


@pytest.mark.slow
def test_the_flag_reaches_serve_eval_and_the_training_samples(capsys, monkeypatch, tmp_path, tiny_run, char_data):
    """serve's --no-utf8-guard, eval --task generate's and train's --train.sample_utf8_guard false each reach the
    generation they configure (on by default)."""
    import json
    from types import SimpleNamespace

    import scratchgpt.evaluate as E
    from conftest import tiny_flags

    pytest.importorskip("fastapi")
    from scratchgpt.serve.options import ServeOptions
    from scratchgpt.serve.routes import gen_config
    from scratchgpt.serve.schema import CompletionRequest

    for guard in (True, False):
        engine = SimpleNamespace(options=ServeOptions(utf8_guard=guard))
        assert gen_config(engine, CompletionRequest(prompt="x"), None).utf8_guard is guard

    seen = []
    real_complete, real_generate = E.complete, G.generate
    monkeypatch.setattr(E, "complete", lambda *a, **kw: seen.append(("eval", kw["utf8_guard"])) or real_complete(*a, **kw))
    monkeypatch.setattr(G, "generate", lambda *a, **kw: seen.append(("train", kw["utf8_guard"])) or real_generate(*a, **kw))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    for extra in ((), ("--no-utf8-guard",)):
        code, _, err = cli(capsys, "eval", tiny_run, "--task", "generate", "--data", data, "--max-new-tokens", "2", *extra)
        assert code == 0, err
    for value in ("true", "false"):
        flags = tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 2, "train.eval_iters": 1,
                              "train.sample_tokens": 2, "train.sample_utf8_guard": value})
        code, _, err = cli(capsys, "train", "--data", char_data, "--out", tmp_path / f"run-{value}", *flags)
        assert code == 0, err
    assert seen == [("eval", True), ("eval", False), ("train", True), ("train", False)]


def test_vocabularies_of_whole_characters_need_no_guard():
    from scratchgpt.tokenizer import train_char_tokenizer

    assert utf8_tables(train_char_tokenizer(["中文 text，😀"])) is None
    assert not Utf8Tables(token_transitions([b"a", "中".encode(), b"bc"])).needed
    assert Utf8Tables(token_transitions([b"a", b"\xe4", b"\xb8\xad"])).needed


# -- the automaton and the property ------------------------------------------------------------------------------


def test_tokens_that_continue_complete_or_break_a_character():
    """中 is E4 B8 AD: a token of its first byte leaves a character pending; only tokens that go on with
    continuation bytes may follow (B8, AD, 80, or B8 AD then whole characters); the surrogate range (ED A0),
    overlong E0 80 and F4 90 (past U+10FFFF) are rejected as early as UTF-8 says."""
    zh = "中".encode()
    vocab = [b"a", zh[:1], zh[1:2], zh[2:], zh[1:] + b"x", b"\xed\xa0", b"\xe0\x80", b"\xf4\x90", b"\x80", "é".encode()]
    trans = token_transitions(vocab)
    after_lead = trans[ACCEPT, 1]
    assert after_lead not in (ACCEPT, REJECT)
    assert [trans[after_lead, i] == REJECT for i in range(len(vocab))] == \
        [True, True, False, False, False, True, True, True, False, True]
    assert trans[trans[after_lead, 2], 3] == ACCEPT and trans[after_lead, 4] == ACCEPT
    assert [trans[ACCEPT, i] == REJECT for i in (5, 6, 7, 8)] == [True, True, True, True]
    tables = Utf8Tables(trans)
    assert tables.needed and tables.allowed[ACCEPT].tolist() == [not r for r in (trans[ACCEPT] == REJECT)]


# one continuation byte of each range a state may ask for (80-8F, 90-9F, A0-BF): enough to complete any prefix
_CONT = (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _completable(b: bytes) -> bool:
    """Some 0-3 continuation bytes make `b` valid UTF-8 (brute force, independent of the automaton)."""
    return any(_valid(b + bytes(tail)) for k in range(4) for tail in itertools.product(_CONT, repeat=k))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=9))
def test_the_automaton_is_utf8(data):
    auto, state = byte_automaton(), ACCEPT
    for byte in data:
        state = auto[state, byte]
    assert (state == ACCEPT) == _valid(data)
    assert (state != REJECT) == _completable(data)


def _fragments(chars: str) -> list[bytes]:
    raw = chars.encode("utf-8", "surrogatepass")
    return [raw[i:j] for i in range(len(raw)) for j in range(i + 1, min(len(raw), i + 4) + 1)]


def _pending(b: bytes) -> bytes:
    """The bytes after the longest valid prefix (a character still being written)."""
    return next(b[k:] for k in range(len(b), -1, -1) if _valid(b[:k]))


def _can_go_on(vocab: list[bytes], steps: int) -> bool:
    """Some `steps` tokens in a row keep the text completable (brute force over pending tails: at most 3 bytes)."""
    tails = {b""}
    for _ in range(steps):
        tails = {_pending(t + v) for t in tails for v in vocab if _completable(t + v)}
    return bool(tails)


TOKENS = st.one_of(st.binary(min_size=1, max_size=3),
                   st.text(min_size=1, max_size=2).map(lambda s: s.encode("utf-8", "surrogatepass")),
                   st.text(min_size=1, max_size=2).map(_fragments).flatmap(st.sampled_from))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(vocab=st.lists(TOKENS, min_size=1, max_size=40), seed=st.integers(0, 2**31),
       temperature=st.sampled_from([0.0, 0.7, 1.0, 3.0]), top_k=st.sampled_from([None, 1, 3]))
def test_every_emitted_prefix_can_be_completed_to_valid_utf8(vocab, seed, temperature, top_k):
    """The real sampler (penalty, temperature, top-k/top-p, multinomial) with the guard, over random logits and a
    random vocabulary of byte tokens (random bytes, whole characters, pieces of characters), 2 rows, 25 steps."""
    tables = Utf8Tables(token_transitions(vocab))
    if not tables.needed:  # every token whole characters (nothing to guard), or no valid text can go on forever
        assert all(_valid(t) for t in vocab) or not _can_go_on(vocab, steps=len(tables.allowed) + 1)
        return
    gen = G.GenerationConfig(temperature=temperature, top_k=top_k, top_p=0.9, repetition_penalty=1.1)
    vocab_padded = len(vocab) + 2  # a padded embedding: ids past the vocabulary are never sampled
    ctx = torch.zeros(2, 1, dtype=torch.long)
    sampler = G._Sampler(gen, ctx, vocab_padded, len(vocab), [seed, seed + 1], tables)
    logits_rng = torch.Generator().manual_seed(seed)
    emitted = [b"", b""]
    for _ in range(25):
        tok = sampler(torch.randn(2, vocab_padded, generator=logits_rng) * 4)
        for row, t in enumerate(tok.tolist()):
            assert t < len(vocab)
            emitted[row] += vocab[t]
            assert _completable(emitted[row]), emitted[row]
