"""`/v1/completions` logprobs and echo: OpenAI's legacy shape, the model's raw log-probabilities (checked against
a forward pass), streamed as plain, read by the openai client and by lm-evaluation-harness's local-completions."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import load_lm  # noqa: E402
from scratchgpt.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_lm(tiny_run)


@pytest.fixture(scope="module")
def client(loaded):
    model, tok, config = loaded
    with TestClient(create_app(model, tok, config, name="tiny")) as c:
        yield c


def reference(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position: (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)


def test_echo_gives_the_prompts_logprobs_from_a_forward_pass(client, loaded):
    model, tok, _ = loaded
    r = client.post("/v1/completions", json={"prompt": "The cat sat", "max_tokens": 0, "echo": True, "logprobs": 3})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = tok.encode("The cat sat")
    ref = reference(model, ids)
    assert choice["text"] == "The cat sat" and set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == list("The cat sat") and lp["text_offset"] == list(range(len(ids)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert math.isclose(lp["token_logprobs"][i], ref[i - 1, ids[i]].item(), abs_tol=1e-5)
        vals, top = ref[i - 1].topk(3)
        expected = {tok.decode([t]): v for t, v in zip(top.tolist(), vals.tolist())}
        expected.setdefault(lp["tokens"][i], lp["token_logprobs"][i])  # the chosen token, if not in the top 3
        assert lp["top_logprobs"][i].keys() == expected.keys()
        assert all(math.isclose(lp["top_logprobs"][i][k], v, abs_tol=1e-5) for k, v in expected.items())


def test_generated_logprobs_are_raw_whatever_the_temperature(client, loaded):
    model, tok, _ = loaded
    for temperature in (0.0, 0.7, 1.5):
        body = {"prompt": "The ", "max_tokens": 8, "logprobs": 2, "temperature": temperature, "seed": 5, "top_k": 5}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        lp = choice["logprobs"]
        prompt, new = tok.encode("The "), [tok.encode(t)[0] for t in lp["tokens"]]
        assert "".join(lp["tokens"]) == choice["text"] and len(new) == 8
        ref = reference(model, prompt + new)  # teacher-forced over what was generated: the same numbers
        for j, t in enumerate(new):
            assert math.isclose(lp["token_logprobs"][j], ref[len(prompt) + j - 1, t].item(), abs_tol=1e-4)
            assert max(lp["top_logprobs"][j].values()) == pytest.approx(ref[len(prompt) + j - 1].max().item(), abs=1e-4)
        if temperature == 0:  # greedy: every chosen token is the top one
            assert all(lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values()) for j in range(8))
        assert lp["text_offset"] == list(range(8))


def test_streamed_logprobs_join_to_the_plain_ones(client):
    body = {"prompt": "The ", "max_tokens": 10, "logprobs": 1, "echo": True, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    r = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    joined: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c["choices"][0]["logprobs"]:
            for k in joined:
                joined[k] += c["choices"][0]["logprobs"][k]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert joined["tokens"] == plain["logprobs"]["tokens"] and joined["text_offset"] == plain["logprobs"]["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)


@pytest.mark.slow
def test_token_id_prompts_and_lm_eval_loglikelihood_requests(client, loaded):
    """What lm-evaluation-harness's local-completions sends for loglikelihood (a batch of token-id prompts, echo,
    logprobs 1, max_tokens 1 in lm-eval 0.4; 0 works too), read by its own parser."""
    model, tok, _ = loaded
    contexts, continuations = ["The cat", "A dog"], [" sat", " ran."]
    batch = [tok.encode(c + x) for c, x in zip(contexts, continuations)]
    ctxlens = [len(tok.encode(c)) for c in contexts]
    for max_tokens in (1, 0):
        body = {"model": "tiny", "prompt": batch, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
                "seed": 1234, "echo": True}
        out = client.post("/v1/completions", json=body).json()
        for choice, ids, n in zip(out["choices"], batch, ctxlens):
            lp = choice["logprobs"]["token_logprobs"]
            assert len(lp) == len(ids) + max_tokens
            ref = reference(model, ids)
            expected = sum(ref[i - 1, ids[i]].item() for i in range(n, len(ids)))
            assert sum(lp[n : len(ids)]) == pytest.approx(expected, abs=1e-5)
            greedy = all(ref[i - 1].argmax().item() == ids[i] for i in range(n, len(ids)))
            tops = choice["logprobs"]["top_logprobs"][n : len(ids)]
            assert all(t == max(top.values()) for t, top in zip(lp[n : len(ids)], tops)) == greedy
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    parsed = lm_eval.LocalCompletionsAPI.parse_logprobs(out, tokens=batch, ctxlens=ctxlens)  # (max_tokens 0: :-1 cut)
    assert len(parsed) == 2
    err = client.post("/v1/completions", json={"prompt": [[1, 2], [tok.vocab_size]], "max_tokens": 1}).json()["error"]
    assert err["param"] == "prompt" and "outside the vocabulary" in err["message"]


@pytest.mark.slow
def test_the_openai_client_reads_logprobs_unmodified(client, loaded):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    r = api.completions.create(model="tiny", prompt="The ", max_tokens=6, logprobs=2, echo=True, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == r.choices[0].text and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    streamed = api.completions.create(model="tiny", prompt="The ", max_tokens=6, logprobs=2, temperature=0, stream=True)
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices and c.choices[0].logprobs else [])]
    assert tokens == lp.tokens[4:]


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_a_forward_pass(loaded):
    """lm-eval's own local-completions model, with the server's remote tokenizer (/tokenizer_info, /tokenize)."""
    api_models = pytest.importorskip("lm_eval.models.openai_completions")
    for needed in ("tenacity", "aiohttp", "requests"):  # lm-eval's `api` extra
        pytest.importorskip(needed, reason="needs lm-eval[api]")
    from conftest import live_server
    from lm_eval.api.instance import Instance

    model, tok, config = loaded
    with live_server(create_app(model, tok, config, name="tiny")) as url:
        lm = api_models.LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", tokenizer_backend="remote",
                                            max_length=model.cfg.block_size, num_concurrent=1, max_retries=1)
        pairs = [("The cat", " sat on"), ("It is", " a test")]
        got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ids, n = tok.encode(context + continuation), len(tok.encode(context))
        ref = reference(model, ids)
        assert logprob == pytest.approx(sum(ref[i - 1, ids[i]].item() for i in range(n, len(ids))), abs=1e-5)
        assert greedy == all(ref[i - 1].argmax().item() == ids[i] for i in range(n, len(ids)))
