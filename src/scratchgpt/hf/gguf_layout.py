"""GGUF (llama.cpp's file format): which of its architectures our options express, where each of our
tensors lives in each, and which byte-level pre-tokenizers we rebuild. Shared by gguf_in.py (read) and
gguf_out.py (write).

    GGUF arch  ours                                                          transformers twin
    llama      rope, rmsnorm, pre, swiglu, bias=false (GQA, head_size)        llama
    qwen2      llama + qkv_bias                                               qwen2
    qwen3      llama + qk_norm (its q/k norm weights ones)                    qwen3
    gpt2       learned positions, layernorm, pre, gelu_tanh, biases          gpt2
    gptneox    rope over whole heads, layernorm, pre, gelu_tanh, biases,     gpt_neox
               sequential residual

llama.cpp's GELU is the tanh approximation (ggml_gelu), so gpt2 and gptneox carry mlp=gelu_tanh only.
Its `llama` rotates interleaved pairs where ours (and transformers') rotate halves, so its q and k rows
are permuted per head, as convert_hf_to_gguf.py does; qwen2, qwen3 and gptneox rotate halves (NeoX
RoPE) and need no permutation. GGUF stores each matrix as ours, (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import UserError
from ..model import ModelConfig

# GGUF general.architecture -> the transformers model_type recorded as the run's origin (export goes back there)
ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "gptneox": "gpt_neox"}
# architectures whose llama.cpp graph always reads output.weight: a tied head is written as a copy of the
# embedding (and a file whose output.weight equals token_embd.weight reads back tied)
UNTIED_ONLY = ("gptneox",)
# architectures recognised and refused, with why
REFUSED_ARCHES = {
    "gemma": "Gemma's norms scale by 1 + w (scratchgpt's by w) with scaled embeddings; not mapped yet",
    "gemma2": "attention-logit softcapping and a norm after each attention and MLP",
    "gemma3": "a norm after each attention and MLP and local layers with their own RoPE base",
    "phi2": "attention and the MLP run in parallel on one norm, over part of each head",
    "phi3": "fused qkv with its own RoPE scaling; not mapped yet",
    "qwen2moe": "a mixture-of-experts MLP",
    "qwen3moe": "a mixture-of-experts MLP",
    "mamba": "a state-space model, not attention",
    "bert": "bidirectional attention (an encoder)",
    "t5": "an encoder-decoder",
    "falcon": "parallel attention and MLP with multi-query attention",
    "starcoder2": "sliding-window attention",
    "stablelm": "partial RoPE and per-head norms",
}


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (n_head heads) from rotate-half order to llama.cpp's interleaved pairs (convert_hf_to_gguf's
    LlamaModel.permute); a bias (1-D) the same way."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """permute_rows undone: llama.cpp's interleaved pairs back to rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Slot:
    """One of our tensors as GGUF tensors: the names, our tensor -> theirs, theirs -> ours."""
    ours: str
    gguf: tuple[str, ...]
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    join: Callable[[list[torch.Tensor]], torch.Tensor]


def _same(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _first(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _split(sizes: list[int], perms: list[int]) -> tuple[Callable, Callable]:
    """Rows cut into `sizes` (q, k, v or gate, up), piece i permuted for `perms[i]` heads (0: as is)."""
    def split(t: torch.Tensor) -> list[torch.Tensor]:
        return [permute_rows(p, h) if h else p for p, h in zip(torch.split(t, sizes), perms, strict=True)]

    def join(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([unpermute_rows(p, h) if h else p for p, h in zip(ts, perms, strict=True)])
    return split, join


def tensor_slots(arch: str, cfg: ModelConfig) -> list[Slot]:
    """Every tensor of a `cfg` model in GGUF `arch` (biases only where the model has them), in file order."""
    slots: list[Slot] = [Slot("transformer.wte.weight", ("token_embd.weight",), _same, _first)]
    if arch == "gpt2":
        slots.append(Slot("transformer.wpe.weight", ("position_embd.weight",), _same, _first))
    llama_like = arch in ("llama", "qwen2", "qwen3")
    perm = (cfg.n_head, cfg.kv_heads, 0) if arch == "llama" else (0, 0, 0)
    qkv = _split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], list(perm))
    gate_up = _split([cfg.hidden_dim, cfg.hidden_dim], [0, 0])
    for i in range(cfg.n_layer):
        o, g = f"transformer.h.{i}.", f"blk.{i}."
        names = [("ln_1", "attn_norm"), ("attn.c_proj", "attn_output"), ("ln_2", "ffn_norm"),
                 ("mlp.c_proj", "ffn_down")]
        if not llama_like:
            names += [("attn.c_attn", "attn_qkv"), ("mlp.c_fc", "ffn_up")]
        for ours, theirs in names:
            slots.append(Slot(o + ours + ".weight", (g + theirs + ".weight",), _same, _first))
            if not llama_like:  # LayerNorm families: every linear and norm has a bias in llama.cpp
                slots.append(Slot(o + ours + ".bias", (g + theirs + ".bias",), _same, _first))
        if llama_like:
            slots.append(Slot(o + "attn.c_attn.weight", tuple(g + f"attn_{x}.weight" for x in "qkv"), *qkv))
            if cfg.qkv_bias:
                slots.append(Slot(o + "attn.c_attn.bias", tuple(g + f"attn_{x}.bias" for x in "qkv"), *qkv))
            slots.append(Slot(o + "mlp.c_fc.weight", (g + "ffn_gate.weight", g + "ffn_up.weight"), *gate_up))
    slots.append(Slot("transformer.ln_f.weight", ("output_norm.weight",), _same, _first))
    if not llama_like:
        slots.append(Slot("transformer.ln_f.bias", ("output_norm.bias",), _same, _first))
    if not cfg.tie_embeddings or arch in UNTIED_ONLY:
        slots.append(Slot("lm_head.weight", ("output.weight",), _same, _first))
    return slots


def constant_tensors(arch: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GGUF tensors with no counterpart in ours, at the value that makes the math ours: qwen3's q/k norm
    weights are ones (our qk_norm has no weight)."""
    if arch != "qwen3":
        return {}
    return {f"blk.{i}.attn_{x}_norm.weight": torch.ones(cfg.head_dim) for i in range(cfg.n_layer) for x in "qk"}


# ------------------------------------------------------------------------------------------------
# Byte-level BPE pre-tokenizers: llama.cpp names a split (tokenizer.ggml.pre) that tokenizer.json spells out

_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PLAIN_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")


def _regex_split(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        _PLAIN_BYTE_LEVEL]}


# tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer that splits text as llama.cpp does for it
PRE_TOKENIZERS = {
    "gpt-2": _GPT2_BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     _GPT2_BYTE_LEVEL]},
    "qwen2": _regex_split(_QWEN2),
    "llama-bpe": _regex_split(_LLAMA3),
}


def _canonical(pre: dict) -> object:
    """A pre_tokenizer's parts that decide the split (trim_offsets only moves offsets), for comparison."""
    if pre.get("type") == "Sequence":
        return [_canonical(p) for p in pre.get("pretokenizers") or []]
    if pre.get("type") == "ByteLevel":
        return ("ByteLevel", bool(pre.get("add_prefix_space")), pre.get("use_regex", True))
    if pre.get("type") == "Split":
        return ("Split", pre.get("pattern"), pre.get("behavior"), bool(pre.get("invert")))
    if pre.get("type") == "Digits":
        return ("Digits", bool(pre.get("individual_digits")))
    return pre


def pre_tokenizer_name(pre: dict | None) -> str:
    """The tokenizer.ggml.pre that splits text exactly as tokenizer.json's `pre` does; a UserError if none we
    know does (llama.cpp would then split text its own way, and encode it differently)."""
    if pre:
        for name, spec in PRE_TOKENIZERS.items():
            if _canonical(pre) == _canonical(spec):
                return name
    shape = "none" if not pre else pre.get("type")
    raise UserError(f"tokenizer: pre-tokenizer {shape} is not one llama.cpp is known to split the same way "
                    f"(scratchgpt writes {', '.join(PRE_TOKENIZERS)}), so llama.cpp would encode text differently")
