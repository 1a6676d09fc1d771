"""Every switchable model option trains a step; RoPE, GQA, dropout and norms are what they claim; the fast recipe parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
import torch

from scratchgpt.model import GPT, ModelConfig, meta_gpt, mlp_activation
from scratchgpt.optim import OptimConfig, build_optimizer

SMALL = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32)

OPTIONS = [
    {},
    {"pos": "rope"},
    {"pos": "sinusoidal"},
    {"norm": "rmsnorm"},
    {"qk_norm": True, "pos": "rope"},
    {"mlp": "relu2"},
    {"mlp": "swiglu"},
    {"mlp": "relu"},
    {"mlp": "geglu_tanh"},
    {"head_size": 24, "pos": "rope", "n_kv_head": 1},
    {"qkv_bias": True, "bias": False},
    {"scale_embeddings": True},
    {"tie_embeddings": False},
    {"zero_init_proj": True, "tie_embeddings": False},
    {"logit_softcap": 15.0},
    {"bias": False},
    {"norm_placement": "post"},
    {"value_embeds": True},
    {"n_kv_head": 1, "pos": "rope", "value_embeds": True},
    {"norm_eps": 1e-3, "norm": "rmsnorm", "qk_norm": True},
    {"pos": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
     "zero_init_proj": True, "logit_softcap": 15.0, "bias": False, "value_embeds": True},
]


def test_head_size_qkv_bias_geglu_and_embedding_scale_are_what_they_claim():
    cfg = ModelConfig(**SMALL, pos="rope", head_size=24, n_kv_head=1, bias=False, qkv_bias=True, mlp="geglu_tanh")
    model = GPT(cfg)
    block = model.transformer.h[0]
    assert (cfg.head_dim, cfg.q_dim, cfg.kv_dim) == (24, 48, 24)
    assert block.attn.c_attn.weight.shape == (48 + 2 * 24, 32) and block.attn.c_proj.weight.shape == (32, 48)
    assert block.attn.c_attn.bias is not None and block.attn.c_proj.bias is None and block.mlp.c_fc.bias is None
    assert block.mlp.c_fc.weight.shape == (2 * cfg.hidden_dim, 32)  # [gate; up]
    h = torch.randn(3, 2 * cfg.hidden_dim)
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal(mlp_activation(h, "geglu_tanh"),
                       torch.nn.functional.gelu(gate, approximate="tanh") * up)
    scaled = GPT(ModelConfig(**{**cfg.__dict__, "scale_embeddings": True}))
    scaled.load_state_dict(model.state_dict())
    x = torch.randint(0, 37, (2, 5))
    assert torch.allclose(scaled.embed(x)[0], model.embed(x)[0] * 32**0.5)
    with pytest.raises(ValueError, match="even head dimension"):
        ModelConfig(**SMALL, pos="rope", head_size=7)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_option_trains(opts, optimizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, **opts))
    opt_cfg = OptimConfig(optimizer=optimizer, lr=3e-3, muon_lr=0.02)
    opts_ = build_optimizer(model, opt_cfg, torch.device("cpu"))
    x = torch.randint(0, 37, (4, 16))
    losses = []
    for _ in range(6):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for o in opts_:
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # it learns the batch
    logits = model(x)
    assert logits.shape == (4, 16, 37)
    if opts.get("logit_softcap"):
        assert logits.abs().max() <= opts["logit_softcap"]


def test_zero_init_proj_starts_each_block_as_identity():
    model = GPT(ModelConfig(**SMALL, zero_init_proj=True, tie_embeddings=False))
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert model.lm_head.weight.abs().sum() == 0


def test_no_bias_means_no_bias_parameters():
    model = GPT(ModelConfig(**SMALL, bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_rope_is_relative():
    """RoPE scores depend only on the distance: shifting both positions leaves q.k unchanged."""
    from scratchgpt.model import apply_rope, rope_cos_sin

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rope_cos_sin(torch.arange(20), 8, 10000.0)
    s1 = (apply_rope(q, cos[3:4], sin[3:4]) * apply_rope(k, cos[7:8], sin[7:8])).sum()
    s2 = (apply_rope(q, cos[13:14], sin[13:14]) * apply_rope(k, cos[17:18], sin[17:18])).sum()
    assert torch.allclose(s1, s2, atol=1e-5)


def test_fast_recipe_config_parses_into_the_configs_it_names():
    """Every key of configs/shakespeare-char-fast.yaml reaches the config object with its value (a key the
    classes do not know, or a value a field's check rejects, raises)."""
    import yaml

    from scratchgpt.train import TrainConfig

    cfg = yaml.safe_load((REPO / "configs" / "shakespeare-char-fast.yaml").read_text())
    optim = dict(cfg["optim"], betas=tuple(cfg["optim"].get("betas", (0.9, 0.99))))
    built = {"model": ModelConfig(vocab_size=65, **cfg["model"]), "train": TrainConfig(**cfg["train"]),
             "optim": OptimConfig(**optim)}
    for section, values in cfg.items():
        for key, value in values.items():
            got = getattr(built[section], key)
            want = tuple(value) if isinstance(got, tuple) else type(got)(value)  # YAML reads 1.0e11 as a string
            assert got == want, (section, key)
    assert built["optim"].optimizer == "muon" and built["model"].pos == "rope"


def test_the_recipes_mlp_width_scales_with_the_model():
    """The recipe's MLP is 3x n_embd at any width (not an absolute 384); an absolute mlp_hidden still wins."""
    from scratchgpt.cli import RECIPE, _sections, _train_parser, use_recipe

    def model(*argv: str) -> ModelConfig:
        parser = _train_parser()
        use_recipe(parser, list(argv))
        return _sections(parser.parse_args(list(argv)))[0]

    assert model().hidden_dim == 3 * model().n_embd == 384
    assert model("--model.n_embd", "512", "--model.n_head", "4").hidden_dim == 1536
    assert model("--model.n_embd", "512", "--model.n_head", "4", "--model.mlp_hidden", "100").hidden_dim == 100
    assert "mlp_hidden" not in RECIPE.read_text()
    assert ModelConfig(n_embd=64).hidden_dim == 256 and ModelConfig(n_embd=64, mlp_ratio=2.5).hidden_dim == 160
    assert ModelConfig(n_embd=96, mlp="swiglu").hidden_dim == 256  # gated default: 8/3, rounded up to 32


def test_rope_backward_is_autograd_of_the_rotation():
    from scratchgpt.model import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(5), 6, 10000.0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos.double(), sin.double()), (x,))
    x1, x2 = x.detach().chunk(2, dim=-1)  # the textbook form
    ref = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    torch.testing.assert_close(apply_rope(x.detach(), cos.double(), sin.double()), ref)


def test_adamw_without_dynamo_wrapper_is_torch_adamw():
    from scratchgpt.muon import AdamW

    def run(cls, **kw):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
        opt = cls(ps, lr=0.01, weight_decay=0.1, **kw)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return ps

    for kw in ({}, {"fused": True}):
        for a, b in zip(run(torch.optim.AdamW, **kw), run(AdamW, **kw)):
            assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(pos="rope", mlp="relu2", norm="rmsnorm"),  # the GPU config's choices
                                dict(pos="rope", n_kv_head=1, qk_norm=True, mlp="swiglu", norm="rmsnorm")])
def test_the_whole_forward_is_one_graph_for_torch_compile(kw):
    """RoPE's eager kernel writes halves in place (out=): torch.compile would break the graph there, twice per
    layer, losing fusion and CUDA graphs; while compiling, RoPE takes the plain formula, which gives the same numbers."""
    from scratchgpt.model import apply_rope, rope_cos_sin

    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(x, x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    q = torch.randn(2, 2, 16, 16)
    cos, sin = rope_cos_sin(torch.arange(16), 16, 10000.0)
    compiled_formula = torch.compile(apply_rope, backend="eager")  # traced by dynamo, run eagerly: no C compiler
    assert torch.allclose(compiled_formula(q, cos, sin), apply_rope(q, cos, sin), atol=1e-6)


@pytest.mark.slow
def test_cpu_training_does_not_import_dynamo():
    """torch.optim's torch._dynamo import costs ~1.5 s of start-up on 2 cores; without compile, build_optimizer
    skips it (train's and fine-tuning's one way to their optimizers). So does
    a model built on the meta device (train's memory check) whose init or RoPE tables run torch's meta kernels."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from scratchgpt.model import GPT, ModelConfig\n"
        "from scratchgpt.optim import OptimConfig, build_optimizer\n"
        "cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=16, pos='rope')\n"
        "GPT.training_bytes(cfg, 4)\n"  # (train's memory check, on the meta device)
        "m = GPT(cfg)\n"
        "opts = build_optimizer(m, OptimConfig(optimizer='muon'), torch.device('cpu'))\n"
        "x = torch.randint(0, 11, (2, 8))\n"
        "m(x, x)[1].backward()\n"
        "[o.step() for o in opts]; [o.zero_grad() for o in opts]; [o.state_dict() for o in opts]\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cpu_dropout_mask_is_bernoulli_and_seeded():
    from scratchgpt.model import cpu_dropout_mask

    torch.manual_seed(0)
    m = cpu_dropout_mask((1000, 1000), 0.2, torch.float32)
    assert torch.unique(m).tolist() == pytest.approx([0.0, 1.25], abs=1e-4)
    assert abs((m > 0).float().mean().item() - 0.8) < 0.003
    assert abs(m.mean().item() - 1.0) < 0.004  # unbiased: the scale matches the p actually applied
    # neighbouring elements are independent (the int16 draws come four to a 64-bit word)
    keep = (m > 0).float().view(-1, 4)
    assert abs((keep[:, 0] * keep[:, 3]).mean().item() - 0.64) < 0.005
    torch.manual_seed(0)
    assert torch.equal(cpu_dropout_mask((1000, 1000), 0.2, torch.float32), m)  # torch's seed fixes it
    assert not torch.equal(cpu_dropout_mask((1000, 1000), 0.2, torch.float32), m)


@pytest.mark.parametrize("n_kv_head", [None, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_dropout_attention_is_sdpa_with_that_mask(causal, n_kv_head, monkeypatch):
    """The written-out attention used for CPU dropout equals SDPA, values and gradients, when no
    element is dropped; with dropout on, eval mode still takes SDPA."""
    import scratchgpt.model as model_mod

    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, dropout=0.3, causal=causal, n_kv_head=n_kv_head)
    net = GPT(cfg)
    x = torch.randint(0, 37, (3, 16))
    monkeypatch.setattr(model_mod, "cpu_dropout_mask", lambda shape, p, dtype: torch.ones(shape, dtype=dtype))
    net.train()
    logits_manual, _ = net(x, x)
    logits_manual.sum().backward()
    grads_manual = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.cfg.dropout = 0.0  # the SDPA path, same weights
    for mod in net.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    logits_sdpa, _ = net(x, x)
    logits_sdpa.sum().backward()
    torch.testing.assert_close(logits_manual, logits_sdpa, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_manual, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dropout_module_edges():
    from scratchgpt.model import Dropout

    x = torch.randn(4, 8)
    d = Dropout(0.5).eval()
    assert torch.equal(d(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    torch.manual_seed(1)
    y = Dropout(0.5).train()(x)
    assert torch.all((y == 0) | torch.isclose(y, 2 * x))


# ---------------------------------------------------------------- grouped-query attention and norm_eps
def test_gqa_is_attention_with_each_key_value_head_repeated_for_its_group():
    """A GQA model computes what a full multi-head model does whose heads 2g and 2g+1 carry copies of key/value
    head g (Llama's repeat_kv), with c_attn [q; k; v] of n_head, n_kv_head, n_kv_head heads; the cache holds
    n_kv_head heads."""
    from scratchgpt.model import KVCache

    torch.manual_seed(0)
    opts = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, pos="rope", value_embeds=True)
    gqa, full = GPT(ModelConfig(**opts, n_kv_head=2)).eval(), GPT(ModelConfig(**opts)).eval()
    D = 8
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 2 * D, 32)
    assert full.num_params() - gqa.num_params() == 2 * (2 * 2 * D) * 33 + 37 * 2 * D  # k, v rows (+bias); vte
    sd = {}
    for k, v in gqa.state_dict().items():
        if k.endswith(("c_attn.weight", "c_attn.bias")):
            q, kk, vv = v.split([32, 2 * D, 2 * D])
            v = torch.cat([q, *(t.unflatten(0, (2, D)).repeat_interleave(2, 0).flatten(0, 1) for t in (kk, vv))])
        elif k == "transformer.vte.weight":
            v = v.unflatten(1, (2, D)).repeat_interleave(2, 1).flatten(1)
        sd[k] = v
    full.load_state_dict(sd)
    x = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), full(x), atol=1e-5, rtol=1e-5)
    assert KVCache(gqa.cfg, 3, 16).k.shape == (2, 3, 2, 16, D)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gqa_kv_cache_in_chunks_equals_no_cache(pos):
    """Prefill, a multi-token chunk (the masked path) and single tokens through the module path's cache."""
    from scratchgpt.model import KVCache

    torch.manual_seed(1)
    model = GPT(ModelConfig(**{**SMALL, "n_head": 4}, n_kv_head=1, pos=pos, qk_norm=True)).eval()
    x = torch.randint(0, 37, (2, 12))
    cache = KVCache(model.cfg, 2, 12)
    with torch.no_grad():
        ref = model(x)
        got = torch.cat([model(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 11), (11, 12))], 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_full_cache_is_refused_not_overwritten():
    """Past max_len the cache raises: generation slides its window by rebuilding the cache (generate.py), since
    overwriting the oldest slot would be a different, approximate model."""
    from scratchgpt.model import DecodeStep, KVCache

    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**SMALL, "n_layer": 1, "n_head": 4, "block_size": 32}, n_kv_head=2, pos="rope")).eval()
    x = torch.randint(0, 37, (2, 9))
    cache = KVCache(model.cfg, 2, 8)
    with torch.no_grad():
        model(x[:, :8], cache=cache)
        before = cache.k.clone()
        with pytest.raises(ValueError, match="KV cache is full"):
            model(x[:, 8:], cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            DecodeStep(model, cache)(x[:, 8])
    assert torch.equal(cache.k, before) and cache.length == 8


def test_norm_eps_is_every_norms_eps():
    """norm_eps=None is the old per-norm defaults exactly (old checkpoints compute what they did); a value
    reaches every norm, qk_norm's included, and moves the logits."""
    torch.manual_seed(0)
    x = torch.randint(0, 37, (2, 16))

    def logits(**kw):
        model = GPT(ModelConfig(**SMALL, **kw)).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            return model(x), model

    for kind, default in (("layernorm", 1e-5), ("rmsnorm", 1e-6)):
        base = GPT(ModelConfig(**SMALL, norm=kind, qk_norm=True)).eval()
        ref, _ = logits(norm=kind, qk_norm=True)
        same, model = logits(norm=kind, qk_norm=True, norm_eps=default)
        assert model.transformer.h[0].ln_1.eps == model.transformer.ln_f.eps == default
        assert torch.equal(ref, same) == (kind == "rmsnorm")  # layernorm's qk_norm was 1e-6, now 1e-5
        big, model = logits(norm=kind, qk_norm=True, norm_eps=0.5)
        assert model.transformer.h[1].ln_2.eps == 0.5 and model.cfg.qk_norm_eps == 0.5
        assert (big - ref).abs().max() > 1e-2
    assert ModelConfig(norm="layernorm").eps == 1e-5 and ModelConfig(norm="rmsnorm").qk_norm_eps == 1e-6


def test_rope_table_default_unchanged_and_llama3_is_transformers():
    """rope_scaling none: the table is the plain formula bit for bit (old checkpoints compute what they did);
    llama3: the inverse frequencies are transformers' _compute_llama3_parameters exactly, in the table at init
    and in the angles computed past it."""
    from scratchgpt.model import rope_cos_sin

    plain = GPT(ModelConfig(**{**SMALL, "n_head": 2}, pos="rope", rope_base=500.0))
    inv = 1.0 / (500.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    angles = torch.arange(16).float()[:, None] * inv[None, :]
    assert torch.equal(plain.rope_cos, angles.cos()) and torch.equal(plain.rope_sin, angles.sin())

    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    cfg = ModelConfig(**SMALL, pos="rope", rope_base=500.0, rope_scaling="llama3", rope_factor=8.0,
                      rope_original_context=32)
    hf = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))
    hf_inv, _ = _compute_llama3_parameters(hf)
    kept, scaled = hf_inv == inv, hf_inv == inv / 8
    assert kept.any() and scaled.any() and not (kept | scaled).all()  # every regime: kept, divided, blended
    model = GPT(cfg)
    angles = torch.arange(24).float()[:, None] * hf_inv[None, :]
    assert torch.equal(model.rope_cos, angles.cos()[:16]) and torch.equal(model.rope_sin, angles.sin()[:16])
    past = model.rope_at(16, 8, "cpu")  # past block_size: computed on the fly, scaled the same
    assert torch.equal(past[0], angles.cos()[16:]) and torch.equal(past[1], angles.sin()[16:])
    assert torch.equal(rope_cos_sin(torch.arange(24), 16, 500.0, cfg)[0], angles.cos())


@pytest.mark.parametrize("kw, message", [
    (dict(n_head=4, n_kv_head=3), "--model.n_head 4 must be divisible by --model.n_kv_head 3"),
    (dict(n_head=4, n_kv_head=8), "--model.n_head 4 must be divisible by --model.n_kv_head 8"),
    (dict(n_kv_head=0), r"--model.n_kv_head must be in \[1, 1024\], got 0"),
    (dict(n_kv_head=-1), r"--model.n_kv_head must be in \[1, 1024\], got -1"),
    (dict(norm_eps=0.0), "--model.norm_eps must be > 0, got 0.0"),
    (dict(norm_eps=-1e-5), "--model.norm_eps must be > 0, got -1e-05"),
    (dict(norm_eps=float("nan")), "--model.norm_eps must be a finite number or null, got nan"),
    (dict(rope_scaling="llama3"), "--model.rope_scaling llama3 needs --model.pos rope, got learned"),
    (dict(pos="rope", rope_scaling="llama3", rope_low_freq_factor=4.0),
     "--model.rope_high_freq_factor 4.0 must exceed --model.rope_low_freq_factor 4.0"),
])
def test_bad_gqa_and_eps_values_are_one_line(kw, message):
    from scratchgpt import UserError

    with pytest.raises(UserError, match=message) as e:
        ModelConfig(**{"n_embd": 32, **kw})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"pos": "rope", "value_embeds": True},
                                {"pos": "learned", "value_embeds": True, "tie_embeddings": False}])
def test_non_embedding_count_is_the_blocks_the_final_norm_and_an_untied_head(kw):
    """What `train` prints as "non-embedding": no token, position or value table (a tied head is the token table);
    the FLOPs per token still count the head's matmul."""
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, **kw))
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    norm = sum(p.numel() for p in model.transformer.ln_f.parameters())
    head = 0 if model.cfg.tie_embeddings else model.lm_head.weight.numel()
    assert model.num_params(non_embedding=True) == blocks + norm + head < model.num_params()
    assert model.flops_per_token() == 6 * (blocks + norm + 50 * 32) + 12 * 2 * 32 * 16 * 0.5


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_meta_gpt_has_the_models_shapes(opts):
    """meta_gpt (train's memory check, the report's count, import-hf's expected shapes): every parameter and
    buffer of the real model, shapes alone."""
    cfg = ModelConfig(**SMALL, **opts)
    meta, real = meta_gpt(cfg), GPT(cfg)
    for got, want in ((meta.named_parameters(), real.named_parameters()), (meta.named_buffers(), real.named_buffers())):
        got, want = dict(got), dict(want)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
        assert all(v.is_meta for v in got.values())
    assert meta.num_params() == real.num_params()
