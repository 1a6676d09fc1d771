"""The released SmolLM2-135M-Instruct chats as in transformers: `chat` and `serve` (through the openai client, streamed
and not) give the replies of apply_chat_template(add_generation_prompt=True) + greedy generate. Marked `real`."""

from __future__ import annotations

import io

import pytest

from conftest import cli
from real_model import hf_greedy


pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(900)]  # (the first run converts the model)

QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Name one color of the rainbow."]
CONVERSATION = ["Hi! My name is Anna.", "What is my name?", "Thank you, goodbye!"]
MAX_NEW = 48


def _hf_reply(model, tok, messages: list[dict]) -> str:
    (ids,) = hf_greedy(model, tok, [_chat_ids(tok, messages)], MAX_NEW)
    return tok.decode(ids[:-1] if ids[-1] == tok.eos_token_id else ids)


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def hf_replies(real_hf) -> tuple[list[str], list[str]]:
    """transformers' replies: to each question alone (one batch), and to each turn of the conversation."""
    model, tok = real_hf
    singles = [[{"role": "user", "content": q}] for q in QUESTIONS]
    rows = hf_greedy(model, tok, [_chat_ids(tok, m) for m in singles], MAX_NEW)
    answers = [tok.decode(r[:-1] if r[-1] == tok.eos_token_id else r) for r in rows]
    messages, turns = [], []
    for msg in CONVERSATION:
        messages.append({"role": "user", "content": msg})
        turns.append(_hf_reply(model, tok, messages))
        messages.append({"role": "assistant", "content": turns[-1]})
    return answers, turns


def test_chat_replies_as_transformers(real_run, hf_replies, capsys, monkeypatch):
    answers, turns = hf_replies
    assert "Paris" in answers[0]
    lines = [m for q in QUESTIONS for m in (q, "/reset")] + CONVERSATION
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(m + "\n" for m in lines)))
    code, out, err = cli(capsys, "chat", real_run, "--temperature", "0", "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out == "".join(r + "\n" for r in answers + turns)


def test_serve_replies_as_transformers_through_the_openai_client(real_lm, real_hf, hf_replies):
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from scratchgpt.serve import create_app

    model, tok, config = real_lm
    answers, turns = hf_replies
    with TestClient(create_app(model, tok, config, name="smollm2")) as client:
        api = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)

        def reply(messages: list[dict], stream: bool) -> str:
            r = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_NEW, temperature=0,
                                            stream=stream)
            if not stream:
                return r.choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)

        assert [reply([{"role": "user", "content": q}], False) for q in QUESTIONS] == answers
        messages = []
        for msg, want in zip(CONVERSATION, turns):
            messages.append({"role": "user", "content": msg})
            assert reply(messages, False) == want
            messages.append({"role": "assistant", "content": want})
        # streamed: a question alone, and the conversation's last turn with its whole history
        assert reply([{"role": "user", "content": QUESTIONS[0]}], True) == answers[0]
        assert reply(messages[:-1], True) == turns[-1]


def test_lora_sft_chats_and_exports_as_transformers_computes(real_run, tmp_path, capsys, monkeypatch):
    """A few LoRA steps on the imported model, `chat` with the result, `export` it: transformers' logits on the
    export are ours within 1e-4, and its chat template + greedy generate give our chat's reply."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import load_lm

    rows = [{"prompt": f"Say {w} twice.", "response": f"{w} {w}"} for w in ("red", "blue", "green", "gold")]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ft, hf_dir = tmp_path / "sft", tmp_path / "export"
    code, _, err = cli(capsys, "finetune", "sft", real_run, "--train", data, "--val", data, "--out", ft, "--lora",
                       "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu")
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO("Say purple twice.\n"))
    code, ours_reply, err = cli(capsys, "chat", ft, "--temperature", "0", "--max-new-tokens", 16)
    assert code == 0, err
    code, _, err = cli(capsys, "export", ft, "--out", hf_dir)
    assert code == 0, err
    model, _, _ = load_lm(ft)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is Rome.").input_ids])
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() < 1e-4
    (reply,) = hf_greedy(theirs, tok, [_chat_ids(tok, [{"role": "user", "content": "Say purple twice."}])], 16)
    assert ours_reply == tok.decode(reply[:-1] if reply[-1] == tok.eos_token_id else reply) + "\n"
