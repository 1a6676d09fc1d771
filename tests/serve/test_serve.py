"""`scratchgpt serve`: the OpenAI-compatible API, in process through FastAPI's TestClient (no network)."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient's transport

from fastapi.testclient import TestClient  # noqa: E402

from conftest import load_lm  # noqa: E402
from scratchgpt.cli import main  # noqa: E402
from scratchgpt.generate import generate  # noqa: E402
from scratchgpt.model import ModelConfig  # noqa: E402
from scratchgpt.optim import OptimConfig  # noqa: E402
from scratchgpt.serve import create_app  # noqa: E402
from scratchgpt.train import TrainConfig, train  # noqa: E402

TEMPLATE = {"system": "", "user": "Q: {prompt}\nA:", "assistant_end": "\n", "stop": ["\nQ:"]}


@pytest.fixture(scope="module")
def run_dir(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    train(data=char_data, out=out, model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64),
          train=TrainConfig(batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=0, progress=False,
                            tensorboard=False, plot=False, final_eval=False, peak_flops=1e15, threads=1,
                            device="cpu", dtype="float32"),
          optim=OptimConfig(warmup_iters=1))
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_lm(run_dir)


@pytest.fixture(scope="module")
def client(loaded):
    model, tok, config = loaded
    with TestClient(create_app(model, tok, config, name="tiny", max_tokens_limit=64)) as c:
        yield c


@pytest.fixture(scope="module")
def chat_client(loaded):
    model, tok, config = loaded
    with TestClient(create_app(model, tok, {**config, "chat_template": TEMPLATE}, name="tiny")) as c:
        yield c


def events(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in response.text.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_completion_is_the_models_greedy_continuation(client, loaded):
    model, tok, _ = loaded
    r = client.post("/v1/completions", json={"model": "anything", "prompt": "The ", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == generate(model, tok, "The ", max_new_tokens=12, temperature=0)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": len(tok.encode("The ")), "completion_tokens": 12, "total_tokens": 16}
    echoed = client.post("/v1/completions", json={"prompt": "The ", "max_tokens": 12, "temperature": 0, "echo": True})
    assert echoed.json()["choices"][0]["text"] == "The " + choice["text"]


def test_seed_n_and_prompt_lists(client):
    req = {"prompt": "In ", "max_tokens": 10, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 5}
    a, b = (client.post("/v1/completions", json=req).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # same seed, same text
    many = client.post("/v1/completions", json={**req, "prompt": ["In ", "A "], "n": 2}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == a["choices"][0]["text"]  # row 0 uses the request's seed
    assert many["usage"]["completion_tokens"] == 40 and many["usage"]["prompt_tokens"] == 5


def test_stop_string_cuts_the_text(client):
    greedy = client.post("/v1/completions", json={"prompt": "The ", "max_tokens": 20, "temperature": 0}).json()
    text = greedy["choices"][0]["text"]
    stop = text[6]
    r = client.post("/v1/completions", json={"prompt": "The ", "max_tokens": 20, "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"


def test_streaming_matches_the_plain_response(client):
    req = {"prompt": "The ", "max_tokens": 15, "seed": 3, "temperature": 0.9}
    plain = client.post("/v1/completions", json=req).json()["choices"][0]
    chunks = events(client.post("/v1/completions", json={**req, "stream": True,
                                                         "stream_options": {"include_usage": True}}))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == plain["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 15
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_chat_uses_the_checkpoint_template(chat_client, loaded):
    model, tok, _ = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Go on"}]
    r = chat_client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    # laid out as SFT trains on it: system message, then per exchange the user template, reply, assistant_end
    prompt = "Be brief.\n\nQ: Hi\nA:Yes\nQ: Go on\nA:"
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant",
                                 "content": generate(model, tok, prompt, max_new_tokens=10, temperature=0, stop=["\nQ:"])}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    chunks = events(chat_client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10,
                                                                     "temperature": 0, "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_without_template_and_long_history(client, loaded):
    _, tok, _ = loaded
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = client.post("/v1/chat/completions", json={"messages": parts, "max_completion_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tok.encode("Hi\n"))
    assert r.json()["usage"]["completion_tokens"] <= 4
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 3} for i in range(9)]
    r = client.post("/v1/chat/completions", json={"messages": long, "max_tokens": 8})
    assert r.status_code == 200
    # the oldest turns were dropped to leave room for the reply in the 64-token context
    assert r.json()["usage"]["prompt_tokens"] <= 64 - 8


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"max_tokens": 3}, "prompt: Field required"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens: Input should be less than or equal to 64"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True},
     "logprobs: not supported"),
    ("/v1/completions", {"prompt": "x", "stream": True, "n": 2}, "n=1"),
    ("/v1/completions", {"prompt": []}, "prompt: List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "last message must be the user's"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                                           {"role": "user", "content": "z"}]}, "system messages must come before"),
])
def test_bad_requests_get_a_clear_400(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_route(client):
    r = client.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404


def test_concurrent_requests_are_served_one_at_a_time_and_correctly(client):
    req = {"prompt": "The ", "max_tokens": 8, "seed": 11}
    expected = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    results: list = []

    def call(stream: bool) -> None:
        r = client.post("/v1/completions", json={**req, "stream": stream})
        results.append(r.json()["choices"][0]["text"] if not stream else
                       "".join(c["choices"][0]["text"] for c in events(r)))

    threads = [threading.Thread(target=call, args=(i % 2 == 1,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_cli_errors_are_one_line(tmp_path, capsys):
    pytest.importorskip("uvicorn")  # `scratchgpt serve` needs it; the app tests above don't
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such run directory" in err and "\n" not in err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 1
    assert "--port must be" in capsys.readouterr().err


def test_serve_options_are_declared_once(tmp_path, capsys):
    """ServeOptions is the one declaration of serve's flags: each field a documented flag, its checks one line."""
    import dataclasses

    from scratchgpt.cli import COMMANDS, field_docs
    from scratchgpt.flags import _flag
    from scratchgpt.generate import MAX_NEW_TOKENS
    from scratchgpt.serve.options import MAX_NEW_TOKENS as SERVE_MAX, ServeOptions

    assert SERVE_MAX == MAX_NEW_TOKENS
    docs = field_docs(ServeOptions)
    flags = {o for a in COMMANDS["serve"][0]()._actions for o in a.option_strings}
    for f in dataclasses.fields(ServeOptions):
        assert docs.get(f.name) and _flag(f) in flags, f.name  # (--x, or --no-x when on by default)
    for flag, value in (("--header-timeout", "0"), ("--max-connections", "0"), ("--request-timeout", "-1")):
        assert main(["serve", str(tmp_path), flag, value]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must be") and err.count("\n") == 1
