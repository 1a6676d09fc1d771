"""kernels.py: decoding's int8 and bf16 matrix-vector products, built once per machine, and the fallback."""

from __future__ import annotations

import os

import pytest
import torch

from scratchgpt import kernels
from scratchgpt.quantize import Bf16Linear, Int4Linear, Int8Linear

needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason="no C compiler with OpenMP, or no AVX-512: torch's kernels run instead")
SHAPES = [(64, 96), (576, 960), (100, 33), (1536, 40), (17, 5)]  # K not a multiple of 16 or 64: the tails


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@needs_kernels
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_rows_compute_what_torch_int8_layers_compute(k, n, rows, bias):
    torch.manual_seed(k + n + rows)
    q = Int8Linear(torch.nn.Linear(k, n, bias=bias))
    x = torch.randn(rows, k)
    exact = (bf16_round(x).double() @ q.weight.double().t()) * q.scales.double()  # the defined product, unrounded
    got = kernels.int8_rows(x, q.weight, q.scales, q.bias)
    biased = bf16_round(exact.float()) + (q.bias if bias else 0)
    # fp32 sums in another order can only move a result across a bf16 rounding boundary: one bf16 step at most
    step = exact.abs().float() * 2 ** -7 + 1e-30
    assert ((got - biased).abs() <= step + 1e-6).all()
    assert (got - biased).abs().gt(1e-6).float().mean() < 0.05  # and rarely


@needs_kernels
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_rows_are_the_fp32_product_with_bf16_weights(k, n, rows):
    torch.manual_seed(k * n + rows)
    lin = torch.nn.Linear(k, n)
    b = Bf16Linear(lin)
    x = torch.randn(rows, k)
    ref = x.double() @ lin.weight.to(torch.bfloat16).double().t() + lin.bias.double()
    got = kernels.bf16_rows(x, b.weight, b.bias)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert b.weight.dtype == torch.bfloat16 and b.rows(x).shape == (rows, n)


@pytest.mark.parametrize("cls", [Int8Linear, Bf16Linear])
def test_layers_agree_with_and_without_the_kernels(cls, monkeypatch):
    """The quantized layers give the same results (bf16: within its rounding) without the kernels, or past MAX_ROWS
    rows."""
    torch.manual_seed(0)
    layer = cls(torch.nn.Linear(64, 48))
    x = torch.randn(2, 64)
    fast = layer.rows(x)
    many = layer.rows(torch.cat([x] * 8))[:2]  # 16 rows: torch's kernels
    monkeypatch.setenv("SCRATCHGPT_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None and not kernels.usable(x)
        slow = layer.rows(x)
    finally:
        kernels.library.cache_clear()
    for other in (many, slow):  # (bf16 without the kernels rounds its inputs and outputs too: ~2^-9 of each)
        assert (fast - other).abs().max() <= 2 ** -7 * fast.abs().max()


def test_int8_layers_are_right_for_any_width():
    """torch's int8 kernel reads inputs 16 at a time and returns garbage for other widths: such layers multiply
    the dequantized weights instead."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 33)
    q = Int8Linear(lin)
    x = torch.randn(12, 100)  # more rows than the kernels take
    assert (q(x) - lin(x)).abs().max() / lin(x).abs().max() < 0.02


def test_a_failed_build_falls_back_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert not kernels.usable(torch.zeros(1, 4))
    finally:
        kernels.library.cache_clear()
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "kernels"])  # no half-written library, no temporary file


@needs_kernels
def test_the_build_is_cached_with_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    old = os.umask(0o027)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        (built,) = (tmp_path / "kernels").iterdir()
        assert built.name.startswith("kernels-") and built.stat().st_mode & 0o777 == 0o750
        stamp = built.stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.library() is not None and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        os.umask(old)
        kernels.library.cache_clear()


def test_an_unwritable_cache_falls_back(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(blocked))  # kernels/ cannot be made under a file
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()
    assert blocked.read_text() == "not a folder"


@pytest.mark.parametrize("bias", [True, False])
def test_decoding_rows_are_the_layers_rows(bias):
    """What DecodeStep calls (a kernel bound once, or torch's int4 kernel without the checks) is `rows`."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    x = torch.randn(2, 64)
    for layer in (Int8Linear(lin), Int4Linear(lin), Bf16Linear(lin)):
        fast = layer.decoding_rows(2, torch.float32, reuse_output=True)
        first = fast(x).clone()
        assert torch.equal(first, layer.rows(x)) or torch.allclose(first, layer.rows(x), rtol=2 ** -7, atol=1e-6)
        assert torch.equal(fast(x), first)  # the same call twice: the same result (in the reused buffer)
    assert Int8Linear(lin).decoding_rows(2, torch.bfloat16, True) is not None  # another dtype: plain rows


def test_no_home_or_an_unreadable_cache_falls_back(monkeypatch):
    """cache_dir() raising (HOME unset and no passwd entry) or the cache unreadable (a folder an earlier sudo run
    left): torch's ops run, no error."""
    import scratchgpt.runtime

    for error in (RuntimeError("Could not determine home directory."), PermissionError(13, "Permission denied")):
        def broken(error=error):
            raise error
        monkeypatch.setattr(scratchgpt.runtime, "cache_dir", broken)
        kernels.library.cache_clear()
        try:
            assert kernels.library() is None
        finally:
            kernels.library.cache_clear()


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_the_kernels_write_fp32_whatever_the_default_dtype(default):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 64)
    want = Int8Linear(lin).rows(x), Bf16Linear(lin).rows(x)
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = Int8Linear(lin).rows(x), Bf16Linear(lin).rows(x)
    finally:
        torch.set_default_dtype(old)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)


@needs_kernels
@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_attention_heads_write_fp32_whatever_the_default_dtype(default):
    from scratchgpt.model import rope_cos_sin

    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 2 * 8, requires_grad=True)
    rope = rope_cos_sin(torch.arange(5), 8, 300.0)
    want = kernels.attention_heads(qkv, 2, 2, 8, 1e-6, rope)
    want_grad = torch.autograd.grad(sum(t.sum() for t in want), qkv)[0]
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = kernels.attention_heads(qkv, 2, 2, 8, 1e-6, rope)
        got_grad = torch.autograd.grad(sum(t.sum() for t in got), qkv)[0]
    finally:
        torch.set_default_dtype(old)
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(got_grad, want_grad)


# ---------------------------------------------------------------- training's attention inputs
def _torch_ops(monkeypatch):
    """From here on library() is None and the model runs torch's ops (until monkeypatch.undo and a cache_clear)."""
    monkeypatch.setenv("SCRATCHGPT_KERNELS", "0")
    kernels.library.cache_clear()


def _step(cfg_kw: dict, seed: int = 0, autocast: bool = False):
    """One forward and backward of a tiny GPT on a fixed batch (in CPU bf16 autocast if `autocast`): the loss and
    every parameter's gradient."""
    from scratchgpt.model import GPT, ModelConfig

    torch.manual_seed(seed)
    net = GPT(ModelConfig(**{"vocab_size": 37, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                             "bias": False, **cfg_kw}))
    x, y = torch.randint(0, 37, (3, 16)), torch.randint(0, 37, (3, 16))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        _, loss = net(x, y)
    loss.backward()
    return loss.detach(), [p.grad for p in net.parameters()]


HEADS = [{"pos": "rope"}, {"pos": "learned"}, {"pos": "rope", "n_head": 4, "n_kv_head": 2},
         {"pos": "rope", "head_size": 24}, {"pos": "rope", "value_embeds": True}]


@needs_kernels
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("cfg_kw", HEADS + [{**c, "qk_norm": True} for c in HEADS])
def test_training_attention_inputs_match_torchs_ops(cfg_kw, autocast, monkeypatch):
    """kernels.c's qk norm and rotation give torch's loss and gradients: bit for bit without qk norm (a run keeps
    its numbers whether or not a compiler is there), within fp32 sums' order with it; in bf16 autocast too,
    where the kernels take c_attn's bf16 output and hand its gradient back in bf16."""
    fast = _step(cfg_kw, autocast=autocast)
    _torch_ops(monkeypatch)
    try:
        assert kernels.library() is None
        slow = _step(cfg_kw, autocast=autocast)
    finally:
        monkeypatch.undo()
        kernels.library.cache_clear()
    if cfg_kw.get("qk_norm") and autocast:  # a sum's last bit can flip a bf16 gradient's: one bf16 ulp at most
        assert torch.allclose(fast[0], slow[0], rtol=1e-5)
        assert all((a - b).abs().max() <= 2 ** -7 * b.abs().max() for a, b in zip(fast[1], slow[1]))
    elif cfg_kw.get("qk_norm"):
        assert torch.allclose(fast[0], slow[0], rtol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fast[1], slow[1]))
    else:
        assert torch.equal(fast[0], slow[0]) and all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))


@needs_kernels
def test_attention_heads_are_the_normed_rotated_heads_and_take_only_what_they_can():
    from scratchgpt.model import apply_rope, rope_cos_sin

    torch.manual_seed(1)
    B, T, H, KV, D = 2, 5, 4, 2, 8
    qkv = torch.randn(B, T, (H + 2 * KV) * D, dtype=torch.float64).float().requires_grad_()
    rope = rope_cos_sin(torch.arange(T), D, 10000.0)
    q, k, v = kernels.attention_heads(qkv, H, KV, D, 1e-6, rope)
    heads = qkv.view(B, T, H + 2 * KV, D).transpose(1, 2)
    want = [apply_rope(torch.nn.functional.rms_norm(t, (D,), eps=1e-6), *rope) for t in heads.split([H, KV, KV], 1)[:2]]
    assert q.is_contiguous() and torch.allclose(q, want[0], atol=1e-6) and torch.allclose(k, want[1], atol=1e-6)
    assert torch.equal(v, heads[:, H + KV:])
    g = torch.autograd.grad((q.sin().sum() + k.cos().sum()), qkv)[0]  # v unused: its gradient is 0
    ref = torch.autograd.grad((want[0].sin().sum() + want[1].cos().sum()), qkv)[0]
    assert torch.allclose(g, ref, atol=1e-5) and not g[..., (H + KV) * D:].any()
    with pytest.raises(RuntimeError):  # no graph through the C backward: a second derivative is refused
        torch.autograd.grad(torch.autograd.grad(q.pow(2).sum(), qkv, create_graph=True)[0].sum(), qkv)
    # torch's ops for what the loop does not handle: another dtype, a strided input, positions that do not match,
    # a width that is not the heads', rope tables of another dtype, an odd head width
    x = qkv.detach()
    assert kernels.attention_heads(x.double(), H, KV, D, -1.0, None) is None
    assert kernels.attention_heads(x.transpose(0, 1), H, KV, D, -1.0, None) is None
    assert kernels.attention_heads(x, H, KV, D, -1.0, (rope[0][:3], rope[1][:3])) is None
    assert kernels.attention_heads(x[..., :-D].contiguous(), H, KV, D, -1.0, None) is None
    assert kernels.attention_heads(x, H, KV, D, -1.0, (rope[0], rope[1].double())) is None
    odd = torch.randn(B, T, (H + 2 * KV) * 5)
    assert kernels.attention_heads(odd, H, KV, 5, -1.0, (torch.ones(T, 2), torch.zeros(T, 2))) is None


@needs_kernels
@pytest.mark.parametrize("qk_eps", [1e-6, -1.0])
def test_attention_heads_widen_bf16_as_a_cast_would_and_read_strided_gradients(qk_eps):
    """bf16 autocast's c_attn output goes in as it is: q, k, v equal the kernel's on `.float()` of it, and the
    gradient equals that path's cast back to bf16, bit for bit, whatever the layout of the incoming gradients."""
    from scratchgpt.model import rope_cos_sin

    torch.manual_seed(2)
    B, T, H, KV, D = 3, 7, 4, 2, 16
    qkv16 = torch.randn(B, T, (H + 2 * KV) * D).to(torch.bfloat16).requires_grad_()
    rope = rope_cos_sin(torch.arange(T), D, 300.0)
    assert kernels.attention_heads(qkv16, H, KV, D, qk_eps, rope) is None  # only where fp32 attention is wanted
    fast = kernels.attention_heads(qkv16, H, KV, D, qk_eps, rope, from_bf16=True)
    widened = qkv16.detach().float().requires_grad_()
    slow = kernels.attention_heads(widened, H, KV, D, qk_eps, rope)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(fast, slow))
    # gradients laid out (B, T, heads, D) underneath, as SDPA's backward gives them
    grads = [torch.randn(B, T, n, D).transpose(1, 2) for n in (H, KV, KV)]
    (g16,) = torch.autograd.grad(fast, qkv16, grads)
    (g32,) = torch.autograd.grad(slow, widened, [g.contiguous() for g in grads])
    assert g16.dtype == torch.bfloat16 and torch.equal(g16, g32.to(torch.bfloat16))


@needs_kernels
def test_without_qk_norm_the_heads_keep_no_activation_for_backward():
    """The rotation's backward needs only the angles: c_attn's output is not kept alive (qk norm's needs it)."""
    from scratchgpt.model import rope_cos_sin

    B, T, H, D = 3, 8, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)
    rope = rope_cos_sin(torch.arange(T), D, 10000.0)
    for eps, kept in ((-1.0, 0), (1e-6, qkv.numel())):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            q, k, v = kernels.attention_heads(qkv, H, H, D, eps, rope)
        assert sum(n for n in saved if n == qkv.numel()) == kept
        (q.sum() + k.sum() + v.sum()).backward()  # and the backward still runs


def test_runs_on_says_whether_the_kernels_run():
    assert kernels.runs_on(torch.device("meta")) is False
    assert kernels.runs_on(torch.device("cpu")) is (kernels.library() is not None)
