"""What `serve` refuses and how it behaves under load and shutdown: strict request bodies, the API key, the
bounded queue, the per-request timeout, and a graceful exit on SIGTERM (a real process on a loopback port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import scratchgpt.serve.routes as serve_mod  # noqa: E402  (where the endpoints call complete and stream)
from conftest import load_lm  # noqa: E402
from scratchgpt.cli import main  # noqa: E402
from scratchgpt.generate import SEED_RANGE, generate  # noqa: E402
from scratchgpt.serve import create_app  # noqa: E402
from scratchgpt.serve.options import MAX_BODY_BYTES  # noqa: E402

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_lm(tiny_run)


@pytest.fixture(scope="module")
def client(loaded):
    model, tok, config = loaded
    with TestClient(create_app(model, tok, config, name="tiny", max_tokens_limit=32, api_key=KEY)) as c:
        yield c


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---------------------------------------------------------------- the cases
@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 33}, "max_tokens"),  # over --max-tokens-limit
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "stop": ["x"] * 5}, "stop"),
    ({"prompt": "a" * 100_001}, "prompt"),
    ({"prompt": ["a"] * 17}, "prompt"),
    ({"prompt": "a", "temperature": "0.5"}, "temperature"),
])
def test_strict_bodies(client, body, param):
    err = error_of(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_chat_message_needs_content(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]}, headers=AUTH)
    assert error_of(r, 400)["param"] == "messages.0.content"


@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
def test_numbers_must_be_finite(client, literal):
    body = b'{"prompt": "a", "max_tokens": 2, "temperature": ' + literal + b"}"
    r = client.post("/v1/completions", content=body, headers={**AUTH, "content-type": "application/json"})
    assert "finite" in error_of(r, 400)["message"]


def test_any_seed_is_reduced_as_the_cli_reduces_it(client, loaded, tiny_run, capsys):
    model, tok, _ = loaded
    huge = 2**70 + 5
    req = {"prompt": "The ", "max_tokens": 12, "temperature": 1.0}
    texts = [client.post("/v1/completions", json={**req, "seed": s}, headers=AUTH).json()["choices"][0]["text"]
             for s in (huge, huge % SEED_RANGE, huge - 3 * SEED_RANGE)]
    assert texts[0] == texts[1] == texts[2] == generate(model, tok, "The ", max_new_tokens=12, temperature=1.0, seed=huge)
    assert main(["sample", str(tiny_run), "--prompt", "The ", "--max-new-tokens", "12", "--temperature", "1.0",
                 "--seed", str(huge), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "The " + texts[0] + "\n"


def test_unsupported_options_only_at_their_neutral_values(client):
    ok = {"prompt": "a", "max_tokens": 2, "frequency_penalty": 0.0, "best_of": 1, "logit_bias": {}}
    assert client.post("/v1/completions", json=ok, headers=AUTH).status_code == 200
    chat = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json={**chat, "logprobs": False}, headers=AUTH).status_code == 200
    err = error_of(client.post("/v1/chat/completions", json={**chat, "logprobs": True}, headers=AUTH), 400)
    assert err["param"] == "logprobs" and "not supported" in err["message"]
    for field, value in (("best_of", 3), ("presence_penalty", 0.5), ("logit_bias", {"1": 2.0}), ("suffix", "x")):
        err = error_of(client.post("/v1/completions", json={"prompt": "a", field: value}, headers=AUTH), 400)
        assert err["param"] == field and "not supported" in err["message"]


def test_openapi_document_states_types_ranges_and_required_fields(client):
    doc = client.get("/openapi.json", headers=AUTH).json()
    schemas = doc["components"]["schemas"]
    req = schemas["CompletionRequest"]
    assert req["required"] == ["prompt"] and req["properties"]["stream"]["type"] == "boolean"
    assert {"minimum": 0, "maximum": 32, "type": "integer"}.items() <= req["properties"]["max_tokens"]["anyOf"][0].items()
    assert req["properties"]["top_p"]["exclusiveMinimum"] == 0 and req["properties"]["top_p"]["maximum"] == 1
    assert set(schemas["ChatMessage"]["required"]) == {"role", "content"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert op["security"] == [{"bearer": []}] and {"400", "401", "503", "504"} <= set(op["responses"])
    assert "security" not in doc["paths"]["/health"]["get"]


# ---------------------------------------------------------------- the API key
def test_every_route_but_health_needs_the_key(client):
    assert client.get("/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/openapi.json"),
                         ("GET", "/docs"), ("GET", "/nope")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.request(method, path, json={"prompt": "a"}, headers=headers)
            err = error_of(r, 401)
            assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_no_key_means_open_and_loopback_only(loaded, tmp_path, capsys):
    model, tok, config = loaded
    with TestClient(create_app(model, tok, config)) as open_client:
        assert open_client.get("/v1/models").status_code == 200
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 0.0.0.0") and "--api-key" in err and "--insecure" in err and "\n" not in err


def test_body_size_is_capped(client):
    big = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}'
    r = client.post("/v1/completions", content=big, headers={**AUTH, "content-type": "application/json"})
    assert error_of(r, 413)["type"] == "invalid_request_error"


# ---------------------------------------------------------------- queue and timeout
def test_full_queue_answers_503_with_retry_after(loaded, monkeypatch):
    model, tok, config = loaded
    started, release = threading.Event(), threading.Event()
    real = serve_mod.complete

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_mod, "complete", slow)
    with TestClient(create_app(model, tok, config, max_queue=0)) as c:
        first: list = []
        t = threading.Thread(target=lambda: first.append(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})))
        t.start()
        assert started.wait(30)
        busy = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert "busy" in error_of(busy, 503)["message"] and busy.headers["retry-after"] == "1"
        release.set()
        t.join(30)
        assert first[0].status_code == 200
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200  # slot freed


@pytest.mark.slow
def test_request_timeout_stops_generation(loaded, monkeypatch):
    model, tok, config = loaded
    with TestClient(create_app(model, tok, config, request_timeout=0.3)) as c:
        real = serve_mod.complete

        def crawl(*args, should_stop, **kwargs):  # each token takes 50 ms: 32 tokens run past the 0.3 s timeout
            return real(*args, should_stop=lambda: time.sleep(0.05) or should_stop(), **kwargs)

        monkeypatch.setattr(serve_mod, "complete", crawl)
        t0 = time.monotonic()
        err = error_of(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 32}), 504)
        assert err["type"] == "timeout" and "--request-timeout" in err["message"] and time.monotonic() - t0 < 1.5
        monkeypatch.setattr(serve_mod, "stream", _slow_stream(serve_mod.stream))
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 32, "stream": True})
        events = [json.loads(ln[6:]) for ln in r.text.split("\n\n") if ln.startswith("data: {")]
        assert r.text.rstrip().endswith("data: [DONE]") and events[-1]["error"]["type"] == "timeout"
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200  # lock released


def _slow_stream(real):
    class Slow:  # a TextStream whose every piece takes 50 ms
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            return self

        def __next__(self):
            time.sleep(0.05)
            return next(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    return lambda *args, **kwargs: Slow(real(*args, **kwargs))


# ---------------------------------------------------------------- graceful shutdown
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_gracefully(tiny_run, sig):
    port = _free_port()
    env = {**os.environ, "SCRATCHGPT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "scratchgpt", "serve", str(tiny_run), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # the key came from the environment
        lines = []
        body = {"prompt": "a", "max_tokens": 4096, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:  # mid-stream: the signal arrives while a request is in flight
                    proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and "shutting down" in data[-2] and len(data) < 4096
        assert "Traceback" not in err and "server stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
