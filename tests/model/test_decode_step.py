"""One forward pass: the KV-cache decode step (model.DecodeStep) equals GPT.forward for every option
that changes the forward, every pair of option values covered at least once."""

from __future__ import annotations

import itertools

import pytest
import torch

from scratchgpt import kernels
from scratchgpt.model import GPT, DecodeStep, KVCache, ModelConfig

FACTORS = {
    "pos": ["learned", "sinusoidal", "rope"],
    "norm": ["layernorm", "rmsnorm"],
    "mlp": ["gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh", "relu2"],
    "norm_placement": ["pre", "post"],
    "qk_norm": [False, True],
    "value_embeds": [False, True],
    "logit_softcap": [0.0, 15.0],
    "tie_embeddings": [True, False],
    "bias": [True, False],
    "n_kv_head": [None, 1],  # grouped-query attention (n_head 2): one key/value head for both
    "norm_eps": [None, 1e-3],
    "head_size": [None, 24],  # heads wider than n_embd / n_head (Gemma's, Qwen3's head_dim)
    "qkv_bias": [False, True],  # Qwen2: biases on q, k, v only
    "scale_embeddings": [False, True],  # Gemma: embeddings times sqrt(n_embd)
}


def pairwise(factors: dict[str, list]) -> list[dict]:
    """A small set of option combinations in which every pair of values of two options occurs.

    Greedy and deterministic, one row at a time (as AETG does): a row starts from the first pair not yet
    covered, and each other option takes the value that covers the most new pairs with the values already
    in the row. (Scoring every row of the full product instead took ~20 s at collection.)"""
    names = list(factors)
    order = {name: i for i, name in enumerate(names)}

    def pair(p: tuple, q: tuple) -> tuple:
        return (p, q) if order[p[0]] < order[q[0]] else (q, p)

    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rows = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (order[p[0][0]], order[p[1][0]], repr(p)))
        row = {a: va, b: vb}
        for name in names:
            if name not in row:
                row[name] = max(factors[name], key=lambda v: sum(pair((n, w), (name, v)) in uncovered
                                                                 for n, w in row.items()))
        rows.append({name: row[name] for name in names})
        uncovered -= {pair((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}
    return rows


COMBOS = pairwise(FACTORS)


def test_pairwise_covers_every_pair():
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            assert any(r[a] == va and r[b] == vb for r in COMBOS), (a, va, b, vb)
    assert len(COMBOS) < 30  # pairwise, not the full 73728-combination product


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("opts", COMBOS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_decode_step_equals_forward(opts, native, monkeypatch):
    """Both ways a step can run: kernels.c's norm, activation and attention (where built), and torch's ops."""
    if native and kernels.library() is None:
        pytest.skip("no C compiler with OpenMP, or no AVX-512: torch's ops run instead")
    if not native:
        monkeypatch.setattr(kernels.DecodeOps, "of", staticmethod(lambda *a: None))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=41, block_size=24, n_layer=2, n_head=2, n_embd=32, **opts)
    model = GPT(cfg).eval()
    with torch.no_grad():  # random (not zero) biases and norm weights, so every term is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seq = torch.randint(0, 41, (2, 20))
    prompt = 5
    with torch.no_grad():
        reference = model(seq)  # (B, T, V): the plain forward over the whole sequence
        cache = KVCache(cfg, 2, 24)
        prefill = model(seq[:, :prompt], cache=cache)
        assert torch.allclose(prefill, reference[:, :prompt], atol=1e-5)
        step = DecodeStep(model, cache)
        assert (step.native is not None) == (native and not cfg.value_embeds)
        worst = 0.0
        for t in range(prompt, seq.size(1)):
            logits = step(seq[:, t])
            worst = max(worst, (logits - reference[:, t]).abs().max().item())
    assert worst <= 1e-5, f"decode step differs from forward by {worst:.2e}"


def test_decode_step_equals_forward_with_llama3_rope_scaling():
    """Llama 3's scaled frequencies reach the decode step: the table and the on-the-fly angles past it."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=41, block_size=12, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, rope_scaling="llama3", rope_factor=8.0,
                      rope_original_context=16)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        seq = torch.randint(0, 41, (2, 20))
        # the reference past block_size: the same weights with a table that covers all 20 positions
        wide = GPT(ModelConfig(**{**cfg.__dict__, "block_size": 20})).eval()
        wide.load_state_dict(model.state_dict())
        reference = wide(seq)
        cache = KVCache(cfg, 2, 20)
        model(seq[:, :5], cache=cache)
        step = DecodeStep(model, cache)
        worst = max((step(seq[:, t]) - reference[:, t]).abs().max().item() for t in range(5, 20))
    assert worst <= 1e-5, f"decode step differs from forward by {worst:.2e}"


def test_decode_step_with_a_qk_norm_epsilon_below_float32():
    """qk norm stays on in the C attention even when its epsilon rounds to 0 in fp32."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=41, block_size=24, n_layer=1, n_head=2, n_embd=32, pos="rope", norm="rmsnorm",
                      qk_norm=True, norm_eps=1e-46)
    model = GPT(cfg).eval()
    seq = torch.randint(0, 41, (1, 12))
    with torch.no_grad():
        reference = model(seq)
        cache = KVCache(cfg, 1, 24)
        model(seq[:, :4], cache=cache)
        step = DecodeStep(model, cache)
        worst = max((step(seq[:, t]) - reference[:, t]).abs().max().item() for t in range(4, 12))
    assert worst <= 1e-5
