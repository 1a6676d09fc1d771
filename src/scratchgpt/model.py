"""The GPT model: a decoder-only transformer, its config, and its KV cache.

Read top to bottom in architecture order: config, norms and positions, attention, MLP,
block, GPT, and the one-token decode step generation runs on. Module names follow nanoGPT / HF GPT-2 (`transformer.h.0.attn.c_attn`, ...), so
weights map onto those tools one to one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .checks import ConfigError, check_fields


@dataclass
class ModelConfig:
    """Architecture. Every field is a `--model.<field>` flag and a `model:` config key."""

    vocab_size: int = 0
    """Tokens in the vocabulary; 0: taken from the prepared data's tokenizer."""
    block_size: int = 128
    """Context length in tokens."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_kv_head: Optional[int] = None
    """Key/value heads (grouped-query attention, Llama 2/3, Qwen3): each serves n_head/n_kv_head query heads,
    so c_attn and the KV cache shrink; must divide n_head; null: n_head (every head its own keys and values)."""
    head_size: Optional[int] = None
    """Width of each attention head (transformers' head_dim); null: n_embd / n_head. Set, the heads together
    may be wider or narrower than n_embd (Gemma 7B: 16 heads of 256 in a 3072 stream; Qwen3-0.6B: 16 of 128 in 1024)."""
    n_embd: int = 128
    """Width of the residual stream (the defaults: a small model that trains in minutes on a CPU)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches, in [0, 1)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers; false drops every bias: fewer params, no loss in quality at scale."""
    qkv_bias: bool = False
    """Biases on the query/key/value projection (c_attn) even with bias=false: Qwen2's only biases."""
    pos: Literal["learned", "sinusoidal", "rope"] = "learned"
    """Positions: a learned table (GPT-2), fixed sinusoids (the 2017 paper), or rope (relative, trains faster)."""
    rope_base: float = 10000.0
    """RoPE's base frequency (theta)."""
    rope_scaling: Literal["none", "llama3"] = "none"
    """RoPE frequency scaling: none, or llama3 (Llama 3.1/3.2's: frequencies whose wavelength exceeds
    rope_original_context/rope_low_freq_factor are divided by rope_factor, those shorter than
    rope_original_context/rope_high_freq_factor kept, those between blended smoothly; needs pos=rope)."""
    rope_factor: float = 8.0
    """llama3 scaling: how much the low frequencies are slowed (Llama 3.1: 8, Llama 3.2: 32)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above rope_original_context / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below rope_original_context / this are kept; must exceed rope_low_freq_factor."""
    rope_original_context: int = 8192
    """llama3 scaling: the context length the model was pretrained at before scaling (Llama 3: 8192)."""
    mlp: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh", "relu2"] = "gelu"
    """MLP nonlinearity; gelu is the exact (erf) GELU, gelu_tanh its tanh approximation (GPT-2's "gelu_new", what
    imported GPT-2 checkpoints use); swiglu: gated, silu(gate) * up (Llama); geglu_tanh: gated, gelu_tanh(gate) * up
    (Gemma); relu2: ReLU squared (cheap and strong in modded-nanogpt)."""
    mlp_hidden: int = 0
    """MLP hidden width, absolute; 0: mlp_ratio * n_embd."""
    mlp_ratio: float = 0.0
    """MLP hidden width as a multiple of n_embd (rounded), so it scales with the model; mlp_hidden, if set, wins;
    0: 4 (gated MLPs: 8/3, rounded up to a multiple of 32: the same parameter count)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """layernorm, or rmsnorm (no mean, no bias: a little cheaper on GPUs, as good)."""
    norm_eps: Optional[float] = None
    """Epsilon of every norm, qk_norm's too (Llama's RMSNorm uses 1e-5); null: LayerNorm 1e-5, RMSNorm 1e-6,
    qk_norm 1e-6."""
    norm_placement: Literal["pre", "post"] = "pre"
    """pre: norm before each branch (trains stably without warmup tricks); post: the 2017 original."""
    qk_norm: bool = False
    """Normalise queries and keys per head (RMS): bounds attention logits, allows a higher LR."""
    tie_embeddings: bool = True
    """Share the token embedding and the output head: fewer params; untying helps once data is plentiful."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(n_embd) (Gemma): the stream starts at unit scale while a tied head
    reads the same small-init weights."""
    zero_init_proj: bool = False
    """Zero-init residual output projections (and an untied head): each block starts as the identity."""
    logit_softcap: float = 0.0
    """If > 0, logits become cap*tanh(logits/cap): keeps them from running away early in training."""
    value_embeds: bool = False
    """Add a token embedding to every layer's values (modded-nanogpt): cheap extra capacity."""
    causal: bool = True
    """Causal attention (a GPT); false: bidirectional, for the masked-LM objective."""
    init_std: float = 0.02
    """Standard deviation of the normal init (residual projections scaled by 1/sqrt(2*n_layer))."""

    def __post_init__(self) -> None:
        check_fields(self, lambda name: f"--model.{name}", MODEL_RANGES)
        if self.head_size is None and self.n_embd % self.n_head:
            raise ConfigError(f"--model.n_embd {self.n_embd} must be divisible by --model.n_head {self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(f"--model.n_head {self.n_head} must be divisible by --model.n_kv_head {self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"--model.pos rope needs an even head dimension (--model.head_size, else --model.n_embd "
                              f"/ --model.n_head), got {self.head_dim}")
        if self.rope_scaling != "none" and self.pos != "rope":
            raise ConfigError(f"--model.rope_scaling {self.rope_scaling} needs --model.pos rope, got {self.pos}")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"--model.rope_high_freq_factor {self.rope_high_freq_factor} must exceed "
                              f"--model.rope_low_freq_factor {self.rope_low_freq_factor}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of the attention output c_proj reads): n_head * head_dim."""
        return self.n_head * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): n_embd unless grouped-query attention shrinks it."""
        return self.kv_heads * self.head_dim

    @property
    def eps(self) -> float:
        """The epsilon of the block and final norms."""
        if self.norm_eps is not None:
            return self.norm_eps
        return RMSNORM_EPS if self.norm == "rmsnorm" else LAYERNORM_EPS

    @property
    def qk_norm_eps(self) -> float:
        return QK_NORM_EPS if self.norm_eps is None else self.norm_eps

    @property
    def gated(self) -> bool:
        """A gated MLP: c_fc holds [gate; up]."""
        return self.mlp in ("swiglu", "geglu_tanh")

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp_ratio:
            return max(1, round(self.mlp_ratio * self.n_embd))
        if self.gated:
            return 32 * math.ceil(8 * self.n_embd / 3 / 32)
        return 4 * self.n_embd


# Allowed values of ModelConfig's numeric fields; the upper bounds are far past any model this code
# trains (they keep a typo like n_layer=10000000 from allocating), the memory check at train start does the rest.
MODEL_RANGES = {
    "vocab_size": "[0, 16777216]", "block_size": "[1, 1048576]", "n_layer": "[1, 1024]", "n_head": "[1, 1024]",
    "n_embd": "[1, 65536]", "dropout": "[0, 1)", "rope_base": "[1, inf)", "mlp_hidden": "[0, 1048576]", "mlp_ratio": "[0, 1024]",
    "logit_softcap": "[0, inf)", "init_std": "[0, inf)", "n_kv_head": "[1, 1024]", "head_size": "[1, 65536]", "norm_eps": "(0, inf)",
    "rope_factor": "[1, inf)", "rope_low_freq_factor": "(0, inf)", "rope_high_freq_factor": "(0, inf)",
    "rope_original_context": "[1, 1048576]",
}


# The norms' epsilons when model.norm_eps is unset: torch's LayerNorm default, and for RMSNorm the default
# rms_norm_eps of Llama's and Qwen3's configs. qk_norm's is Qwen3's too, so qk_norm models export to Qwen3
# exactly; torch's default (finfo.eps, 1.2e-7) would miss it (the switch moved a tiny random model's logits
# by ~1e-5, nothing).
LAYERNORM_EPS, RMSNORM_EPS, QK_NORM_EPS = 1e-5, 1e-6, 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMSNORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.eps)
    return nn.LayerNorm(cfg.n_embd, cfg.eps, bias=cfg.bias)


def cpu_dropout_mask(shape: tuple, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A dropout mask (0 or 1/(1-p)) drawn with numpy's SFC64, seeded from torch's RNG.

    torch's CPU bernoulli_ is ~5x slower and took ~25% of a training step at nanoGPT's 10M
    shape (BENCHMARKS.md). The seed comes from torch's generator, so torch.manual_seed and a
    checkpoint's RNG state still fix every mask. p is applied at 2^-16 resolution and the
    scale uses that exact p, so E[mask] = 1.
    """
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    bits = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]  # uniform int16s
    dropped = round(p * 65536)
    mask = np.multiply(bits >= dropped - 32768, np.float32(65536 / (65536 - dropped)), dtype=np.float32)
    return torch.from_numpy(mask).view(shape).to(dtype)


class Dropout(nn.Dropout):
    """nn.Dropout with the fast mask above on CPU; elsewhere (CUDA's fused kernel) torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, self.training)  # (numpy inside a compiled graph would break it)
        return x * cpu_dropout_mask(x.shape, self.p, x.dtype)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed positional encoding of "Attention Is All You Need" (seed 001)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


def llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's frequency scaling, exactly as transformers' _compute_llama3_parameters (same ops, same order,
    so the logits match): long wavelengths slowed by rope_factor, short ones kept, a smooth blend between."""
    factor, low, high, context = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_original_context)
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float,
                 cfg: Optional[ModelConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim/2) of RoPE's angles at `positions` (T,); cfg's rope_scaling, if any, applies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    if cfg is not None and cfg.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, cfg)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x1, sin, out=o2).addcmul_(x2, cos)  # x1 sin + x2 cos
    return out


class _Rope(torch.autograd.Function):
    """The rotation's backward is the inverse rotation (sin -> -sin): 4 kernels each way instead of
    autograd's ~12 for the chunk/mul/cat graph, a measured ~3x cut of RoPE's cost on CPU."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by position-dependent angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():  # the out= writes would break the graph; inductor fuses this into one kernel
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return _Rope.apply(x, cos, sin)


class KVCache:
    """Preallocated keys and values for every layer, so decoding a token costs O(context), not O(context^2).

    `length` counts the tokens written; writing past `max_len` is an error (generation rebuilds the
    cache for a sliding window instead: generate.py). It holds n_kv_head heads per layer:
    grouped-query attention divides its size by n_head/n_kv_head.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0


def attention_inputs(cfg: ModelConfig, qkv: torch.Tensor, ve: Optional[torch.Tensor],
                     rope, fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From c_attn's output (B, T, (H + 2 KV) D) to what attention sees, each (B, heads, T, D): value embeddings
    (B, T, KV D), qk norm, rotation; in fp32 if `fp32` (bf16 autocast's fp32 attention on a CPU). On a CPU
    kernels.c does the rest in one pass each way, widening bf16 on the way (with qk norm, torch's ops were a sixth
    of a small model's step; the separate cast each way, 5% of its loop: BENCHMARKS.md)."""
    B, T, _ = qkv.shape
    heads = kernels.attention_heads(qkv, cfg.n_head, cfg.kv_heads, cfg.head_dim,
                                    cfg.qk_norm_eps if cfg.qk_norm else -1.0, rope, from_bf16=fp32)
    if heads is None:
        qkv = qkv.float() if fp32 else qkv
        q, k, v = split_gqa(cfg, qkv, B, T)
        heads = qk_inputs(cfg, q, rope), qk_inputs(cfg, k, rope), v
    q, k, v = heads
    return q, k, v if ve is None else v + ve.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)


def qk_inputs(cfg: ModelConfig, heads: torch.Tensor, rope, rotate: Callable = apply_rope) -> torch.Tensor:
    """Query or key heads (or both, stacked along the head axis) as attention sees them: qk norm, then rotation.
    Each head's arithmetic is its own, so q and k stacked give what each gives alone (DecodeStep stacks them)."""
    if cfg.qk_norm:
        heads = F.rms_norm(heads, (cfg.head_dim,), eps=cfg.qk_norm_eps)
    return heads if rope is None else rotate(heads, *rope)


def split_gqa(cfg: ModelConfig, qkv: torch.Tensor, B: int, T: int, joint_qk: bool = False) -> tuple[torch.Tensor, ...]:
    """c_attn's output [q; k; v] (B, T, (H + 2 KV) D) -> q (B, H, T, D), k and v (B, KV, T, D), views;
    with joint_qk, [q; k] (B, H + KV, T, D) and v.

    Query head h shares the keys and values of head h // (H / KV), as in Llama's repeat_kv.
    """
    H, KV = cfg.n_head, cfg.kv_heads
    heads = qkv.view(B, T, H + 2 * KV, cfg.head_dim).transpose(1, 2)
    return heads.split([H + KV, KV] if joint_qk else [H, KV, KV], dim=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kv_heads = cfg.kv_heads
        self.gqa = cfg.kv_heads != cfg.n_head  # grouped-query: SDPA repeats each key/value head for its group
        # q, k, v in one matmul
        self.c_attn = nn.Linear(cfg.n_embd, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.q_dim, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True  # marks it for the scaled GPT-2 init
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, cache: Optional[KVCache], layer: int, ve=None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        qkv = self.c_attn(x)
        fp32_attention = x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
        q, k, v = attention_inputs(self.cfg, qkv, ve, rope, fp32=fp32_attention)
        dropout = self.cfg.dropout if self.training else 0.0
        with torch.autocast("cpu", enabled=False) if fp32_attention else nullcontext():
            if cache is None and 0 < dropout < 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
                y = self._attend_with_cpu_dropout(q, k, v, dropout)
            elif cache is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                   is_causal=self.cfg.causal and mask is None, enable_gqa=self.gqa)
            else:
                y = self._attend_cached(q, k, v, cache, layer)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_dropout(self.c_proj(y))

    def _attend_with_cpu_dropout(self, q, k, v, p: float) -> torch.Tensor:
        """SDPA's math path, written out so the dropout mask is the fast one: 1.7x SDPA with
        dropout_p on CPU (measured, BENCHMARKS.md), where no fused kernel supports dropout."""
        T = q.size(-2)
        if self.gqa:
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        att = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))
        if self.cfg.causal:
            att.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        att = torch.softmax(att, dim=-1) * cpu_dropout_mask(att.shape, p, att.dtype)
        return att @ v

    def _attend_cached(self, q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
        return attend_cached(q, k, v, cache.k[layer], cache.v[layer], cache.length, self.cfg.causal, self.gqa)


def check_room(keys: torch.Tensor, start: int, T: int) -> None:
    """A layer's cache (B, KV, max_len, D) takes T more positions after `start`, or a ValueError."""
    if start + T > keys.size(2):
        raise ValueError(f"KV cache is full: {start} + {T} positions past its {keys.size(2)}")


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  start: int, causal: bool, gqa: bool) -> torch.Tensor:
    """Attention for T new positions (q, k, v: (B, heads, T, D)) that continue `start` cached ones: k and v are
    written into one layer's cache (`keys`, `values`: (B, KV, max_len, D)) at `start`, and q attends to
    every position up to its own. Shared by the forward with a cache and DecodeStep."""
    T = q.size(2)
    check_room(keys, start, T)
    keys.narrow(2, start, T).copy_(k)
    values.narrow(2, start, T).copy_(v)
    keys, values = keys.narrow(2, 0, start + T), values.narrow(2, 0, start + T)
    if start == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=causal, enable_gqa=gqa)
    if T == 1:  # one new token sees everything before it: no mask needed
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
    mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


def mlp_activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The MLP's nonlinearity on c_fc's output (the gated ones: c_fc holds [gate; up])."""
    if kind == "gelu":
        return F.gelu(h)
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if kind == "relu":
        return F.relu(h)
    if kind == "relu2":
        return F.relu(h).square()
    gate, up = h.chunk(2, dim=-1)
    if kind == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden_dim
        fc_out = 2 * hidden if cfg.gated else hidden  # gate and up in one matmul
        self.c_fc = nn.Linear(cfg.n_embd, fc_out, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual = True
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(mlp_activation(self.c_fc(x), self.kind)))


def residual(pre: bool, x: torch.Tensor, attn: Callable, mlp: Callable, norm1: Callable, norm2: Callable):
    """A block's residual wiring, shared by Block.forward and DecodeStep: pre-norm (GPT-2) adds each sublayer's
    output to the stream and normalises only its input; post-norm (the original Transformer) normalises each sum."""
    if pre:
        x = x + attn(norm1(x))
        return x + mlp(norm2(x))
    x = norm1(x + attn(x))
    return norm2(x + mlp(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre = cfg.norm_placement == "pre"
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope=None, cache: Optional[KVCache] = None, layer: int = 0,
                ve=None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return residual(self.pre, x, lambda h: self.attn(h, rope, cache, layer, ve, mask), self.mlp, self.ln_1,
                        self.ln_2)


_NO_INIT = [False]  # set by _no_init while GPT.with_weights builds a model whose weights come from a file


@contextmanager
def _no_init() -> Iterator[None]:
    """Linear and Embedding layers built inside keep torch.empty weights (no init): for weights about to be replaced."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    _NO_INIT[0] = True
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved
        _NO_INIT[0] = False


def meta_gpt(cfg: ModelConfig) -> "GPT":
    """`cfg`'s GPT on the meta device: its shapes, no values, no memory. Nothing is initialized: torch's meta
    init kernels (and arange) are Python references whose first use imports torch._dynamo, ~1 s of a start-up."""
    with _no_init(), torch.device("meta"):
        return GPT(cfg)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                drop=Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity(),
            )
        )
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.value_embeds:
            self.transformer["vte"] = nn.Embedding(cfg.vocab_size, cfg.kv_dim)  # added to the values
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._position_buffers()
        if not _NO_INIT[0]:
            self.apply(self._init_weights)

    def _position_buffers(self) -> None:
        """The tables RoPE (or sinusoidal positions) read: computed, never saved, on the current default device."""
        cfg = self.cfg
        # a model built on the meta device (counted, never run) gets the shapes alone: torch.arange there goes
        # through torch's Python references, whose first use imports torch._dynamo (~1 s of `train`'s start-up)
        meta = torch.empty(0).is_meta
        if cfg.pos == "sinusoidal":
            table = torch.empty(cfg.block_size, cfg.n_embd) if meta else sinusoidal_table(cfg.block_size, cfg.n_embd)
            self.register_buffer("sinusoidal", table, persistent=False)
        if cfg.pos == "rope":
            cos, sin = ([torch.empty(cfg.block_size, (cfg.head_dim + 1) // 2) for _ in "cs"] if meta else
                        rope_cos_sin(torch.arange(cfg.block_size), cfg.head_dim, cfg.rope_base, cfg))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def with_weights(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple["GPT", list[str], list[str]]:
        """(a GPT whose parameters are `tensors` themselves, missing keys, unexpected keys), so loading a
        checkpoint holds its weights once: no random init, no copy (tensors safetensors maps from a file stay
        file-backed until written). Floating tensors of another dtype are made fp32. A missing tensor is left
        uninitialized: the caller refuses it (missing keys)."""
        with _no_init():  # (torch.empty pages a checkpoint replaces are never touched; the meta device would cost
            model = cls(cfg)  # ~75 MB of torch's Python meta kernels the first time)
        tensors = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        return model, missing, unexpected

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual", False):
                # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the stream's variance stays put
                std = std / math.sqrt(2 * self.cfg.n_layer)
                if self.cfg.zero_init_proj:
                    std = 0.0
            if module is self.lm_head and self.cfg.zero_init_proj and not self.cfg.tie_embeddings:
                std = 0.0
            if std == 0.0:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights count once. non_embedding leaves out the embedding tables (token,
        position and value embeddings, as Kaplan et al. count; a tied head is the token table, so it goes too)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.transformer[name].weight.numel() for name in ("wte", "wpe", "vte") if name in self.transformer)
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the weights plus attention (PaLM, appendix B)."""
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        # the weights of matmuls: all but the embedding lookups, and the head (which a tied head shares with wte)
        n = self.num_params(non_embedding=True) + self.transformer.wte.weight.numel() * cfg.tie_embeddings
        # (attention scores and mixing: n_head query heads of head_dim, q_dim wide whatever n_kv_head is)
        return 6 * n + 12 * cfg.n_layer * cfg.q_dim * T * (0.5 if cfg.causal else 1.0)

    @staticmethod
    def training_bytes(cfg: ModelConfig, micro_batch: int, param_shards: int = 1) -> tuple[int, int]:
        """(parameters, a lower bound on one rank's training memory in bytes), without allocating:
        fp32 weights, grads and AdamW's two moments (16 bytes a parameter, sharded under FSDP) plus one
        micro-batch's activations (~34 values of the width per token and layer, two of them the keys and
        values at their grouped-query width, and the logits, in 16 bits)."""
        n = meta_gpt(cfg).num_params()
        tokens = micro_batch * cfg.block_size
        per_layer = 32 * cfg.n_embd + 2 * cfg.kv_dim
        return n, 16 * n // param_shards + 2 * tokens * (per_layer * cfg.n_layer + 2 * cfg.vocab_size)

    def embed(self, idx: torch.Tensor, start: int = 0, positions: Optional[torch.Tensor] = None):
        """Token (+ absolute position) embeddings of idx at positions start.. (or at `positions`, (B, T), each
        below block_size), and RoPE's (cos, sin) or None."""
        cfg, T = self.cfg, idx.size(-1)
        x = self.transformer.wte(idx)
        if cfg.scale_embeddings:
            x = x * cfg.n_embd**0.5
        if positions is not None:
            if cfg.pos == "rope":  # (B, 1, T, D/2): one angle per row and position, shared by the heads
                return x, (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
            return x + (self.transformer.wpe.weight if cfg.pos == "learned" else self.sinusoidal)[positions], None
        if cfg.pos == "rope":
            return x, self.rope_at(start, T, idx.device)
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {cfg.block_size}")
        table = self.transformer.wpe.weight if cfg.pos == "learned" else self.sinusoidal
        return x + table[start : start + T], None

    def rope_at(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if start + T <= self.cfg.block_size:
            return self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        # past the table (long generation): compute the angles on the fly
        cfg = self.cfg
        return rope_cos_sin(torch.arange(start, start + T, device=device), cfg.head_dim, cfg.rope_base, cfg)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states, with the optional soft cap."""
        return softcap(self.lm_head(x), self.cfg.logit_softcap)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
        positions: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ):
        """idx (B, T) -> logits (B, T, V); with targets also the mean cross-entropy (ignore_index -100).

        With a cache, idx continues the cached sequence at position `cache.length`.
        return_hidden returns the final normed hidden states (B, T, C) instead of logits.
        `positions` (B, T) and `mask` (B, 1, T, T): bool, True where a query may attend to a key, or additive
        floats, 0 there and -inf elsewhere, which CPU attention runs faster) run several
        sequences packed in one row, such as the choices of a multiple-choice question after their shared
        context (harness/scoring.py); not with a cache.
        """
        start = cache.length if cache is not None else 0
        x, rope = self.embed(idx, start, positions)
        x = self.transformer.drop(x)
        ve = self.transformer.vte(idx) if self.cfg.value_embeds else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i, ve, mask)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += idx.size(1)
        if return_hidden:
            return x
        logits = self.logits(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def gpt_of(model: nn.Module) -> GPT:
    """The GPT inside any wrapper: DDP, torch.compile, PEFT, a classifier."""
    if isinstance(model, GPT):
        return model
    for m in model.modules():
        if isinstance(m, GPT):
            return m
    raise TypeError(f"no scratchgpt GPT inside {type(model).__name__}")


class DecodeStep:
    """GPT.forward for one new token per row with a KV cache, without nn.Module dispatch.

    At batch 1 on a CPU the module path spends about as long in per-call overhead (module
    dispatch, no-op dropouts, linear's transpose, indexing) as a small model spends in
    arithmetic. This step runs forward's own code on the model's own weights: the block's
    residual wiring (`residual`), the cache write and attention (`attend_cached`), and the
    helpers (embed, split_gqa, attention_inputs, mlp_activation, softcap); only the Linear and
    norm layers are called as their torch functions rather than as modules. In fp32 on a CPU
    where kernels.py's C loops are built, the RMS norm, SwiGLU's activation and the attention
    (split, qk norm, rotation, cache write, GQA) are one call each instead of 2-12 torch ops:
    the same arithmetic, sums in another order. Tests check both ways against forward for
    every option that changes the forward. Eval mode only (no dropout).
    """

    def __init__(self, model: GPT, cache: KVCache):
        cfg = model.cfg
        self.cfg, self.model, self.cache = cfg, model, cache
        t = model.transformer
        self.pre = cfg.norm_placement == "pre"
        self.gqa = cfg.kv_heads != cfg.n_head
        self.vte = t.vte.weight if cfg.value_embeds else None
        # kernels.c's norm, activation and attention where they run (fp32 on a CPU with the kernels built)
        self.native = kernels.DecodeOps.of(cfg, t.wte.weight.dtype, t.wte.weight.device)
        # per layer: attention and MLP (partials over its weights and cache) and its two norms, as `residual` takes them
        linear = partial(self._linear, rows=cache.k.size(1), dtype=t.wte.weight.dtype)
        self.layers = [
            (partial(self._attention, linear(b.attn.c_attn), linear(b.attn.c_proj), cache.k[i], cache.v[i]),
             partial(self._mlp, linear(b.mlp.c_fc), linear(b.mlp.c_proj)), self._norm(b.ln_1), self._norm(b.ln_2))
            for i, b in enumerate(t.h)
        ]
        self.ln_f = self._norm(t.ln_f) if self.pre else None
        self.head = linear(model.lm_head, reuse_output=False)  # the logits outlive the step
        self._step: tuple = ()  # (batch, position, rope, value embeddings) of the token being decoded

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """A plain GPT whose Linears are plain or quantized; wrapped ones (unmerged LoRA) use forward."""
        if type(model) is not GPT:
            return False
        t = model.transformer
        linears = [model.lm_head] + [m for b in t.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        return all(type(m) is nn.Linear or getattr(m, "quantized", False) for m in linears)

    def _norm(self, m: nn.Module) -> Callable:
        # torch.* ops directly: the F.* wrappers add a Python layer per call
        if isinstance(m, nn.LayerNorm):
            return partial(torch.layer_norm, normalized_shape=m.normalized_shape, weight=m.weight, bias=m.bias,
                           eps=m.eps)
        if self.native is not None:  # torch's rms_norm is ~7 ops on a CPU
            eps = torch.finfo(m.weight.dtype).eps if m.eps is None else m.eps  # nn.RMSNorm's default
            return partial(self.native.rms_norm, weight=m.weight, eps=eps)
        return partial(torch.rms_norm, normalized_shape=(m.weight.numel(),), weight=m.weight, eps=m.eps)

    @staticmethod
    def _linear(m: nn.Module, rows: int, dtype: torch.dtype, reuse_output: bool = True) -> tuple:
        if type(m) is not nn.Linear:  # a quantized layer: its kernel and bias on (B, in) rows, no module dispatch
            return (m.decoding_rows(rows, dtype, reuse_output),)
        # (W^T view, bias): addmm/mm on a transposed view is exactly what F.linear does, minus two dispatches
        return (m.weight.t(), m.bias)

    @staticmethod
    def _mm(x: torch.Tensor, lin: tuple) -> torch.Tensor:
        if len(lin) == 1:
            return lin[0](x)
        return torch.mm(x, lin[0]) if lin[1] is None else torch.addmm(lin[1], x, lin[0])

    def _attention(self, attn: tuple, proj: tuple, kc: torch.Tensor, vc: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """CausalSelfAttention.forward for one token (h: (B, C)) at the step's position."""
        cfg, (B, pos, rope, ve) = self.cfg, self._step
        H, KV = cfg.n_head, cfg.kv_heads
        if self.native is not None:  # split_gqa, qk_inputs and attend_cached in one call
            check_room(kc, pos, 1)
            return self._mm(self.native.attend(self._mm(h, attn), rope, kc, vc, pos), proj)
        # attention_inputs with q and k as one tensor: [q; k] heads normed and rotated in one op each (the same
        # elementwise arithmetic per head; RoPE's kernels without its autograd Function: ~1 ms a token at 30 layers)
        qk, v = split_gqa(cfg, self._mm(h, attn), B, 1, joint_qk=True)
        if ve is not None:
            v = v + ve
        q, k = qk_inputs(cfg, qk, rope, rotate=_rotate).split([H, KV], dim=1)
        y = attend_cached(q, k, v, kc, vc, pos, cfg.causal, self.gqa)
        return self._mm(y.view(B, cfg.q_dim), proj)

    def _mlp(self, fc: tuple, out: tuple, h: torch.Tensor) -> torch.Tensor:
        if self.native is not None and self.cfg.mlp == "swiglu":
            return self._mm(self.native.silu_mul(self._mm(h, fc)), out)
        return self._mm(mlp_activation(self._mm(h, fc), self.cfg.mlp), out)

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B,) at position cache.length -> float logits (B, V); appends to the cache."""
        cfg, pre = self.cfg, self.pre
        B, pos = tok.size(0), self.cache.length
        x, rope = self.model.embed(tok[:, None], pos)
        if rope is not None:  # (apply_rope's cast, once a step instead of twice a layer)
            rope = (rope[0].to(x.dtype).contiguous(), rope[1].to(x.dtype).contiguous())
        ve = None if self.vte is None else self.vte[tok].view(B, cfg.kv_heads, 1, cfg.head_dim)
        self._step = (B, pos, rope, ve)
        x = x[:, 0]
        for attn, mlp, norm1, norm2 in self.layers:
            x = residual(pre, x, attn, mlp, norm1, norm2)
        if self.ln_f is not None:
            x = self.ln_f(x)
        self.cache.length += 1
        return softcap(self._mm(x, self.head), cfg.logit_softcap).float()
