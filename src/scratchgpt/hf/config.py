"""transformers config.json, both ways: `hf_config` (config_out.py) writes a family's keys for a ModelConfig,
`config_from_hf` (here) reads them back (or refuses in one line). The mapping below is both directions'.

Every family: vocab_size, n_layer, n_head, n_embd, block_size (max_position_embeddings), mlp_hidden
(intermediate size), rope_base (rope_theta), tie_embeddings (tie_word_embeddings), dropout, init_std
(initializer_range), norm_eps (GPT-2 layer_norm_epsilon, NeoX layer_norm_eps, the Llama-shaped
classes rms_norm_eps; OPT has no key: its LayerNorms are 1e-5, so only that exports as OPT).
`bias=false` sets the classes' bias flags off (OPT enable_bias, NeoX attention_bias, Llama/Arcee
attention_bias and mlp_bias, Qwen3 and Gemma attention_bias); Qwen2, Mistral and Phi-3 have no
flag (Qwen2's q/k/v biases are model.qkv_bias, always on).

Plain MLPs: ours -> transformers' ACT2FN name (activation_function / hidden_act), and back:

    gelu       <-> gelu                 the exact erf GELU
    gelu_tanh  <-> gelu_new (GPT-2, as its released configs say), gelu_pytorch_tanh (the
                   other families: F.gelu(approximate="tanh"), the very kernel ours calls);
                   imported too: gelu_fast, gelu_python_tanh, gelu_accurate (the same tanh
                   formula: in fp32 all are within 4.8e-7 of ours on [-12, 12], where the
                   erf GELU is 4.7e-4 away)
    relu       <-> relu
    relu2      <-> relu2

Gated MLPs (the Llama-shaped classes but Arcee): hidden_act names the gate's activation, silu <->
swiglu, gelu_pytorch_tanh <-> geglu_tanh (and the tanh names above; Gemma's "gelu", which
transformers runs as gelu_pytorch_tanh). Gemma's config also gets hidden_activation, its 4.x key.

Epsilons: norm_eps=null means LayerNorm 1e-5, RMSNorm 1e-6, and qk_norm's per-head RMSNorm 1e-6
(model.QK_NORM_EPS, Qwen3's default rms_norm_eps); a norm_eps applies to every norm, qk_norm's too,
as Qwen3's one rms_norm_eps does. On import an eps equal to our default for the norm becomes null,
so configs that always imported stay byte for byte what they were.

The Llama-shaped classes only: n_kv_head (num_key_value_heads; null = n_head), grouped-query
attention as in SmolLM2, TinyLlama and Qwen3 (GPT-2, OPT and NeoX have none: refused), head_size
(head_dim; null where it is hidden_size / heads, the default of all but Qwen3's 128 and Gemma's
256), and, except Phi-3, Llama 3.1/3.2's RoPE frequency scaling:

    rope_scaling=llama3  <-> rope_type "llama3"
    rope_factor              factor (Llama 3.1: 8, 3.2: 32)
    rope_low_freq_factor     low_freq_factor
    rope_high_freq_factor    high_freq_factor
    rope_original_context    original_max_position_embeddings (8192)

read as transformers reads them: rope_scaling (4.x, as Meta's config.json has it) when it is there, else
rope_parameters (5.x; a rope_scaling replaces it whole, so yarn in rope_scaling beside a default
rope_parameters is yarn, refused); a missing original_max_position_embeddings is transformers'
fallback, max_position_embeddings. Written to both (the same values).

Sliding windows: ours is whole-context attention, so export writes none (Mistral and Phi-3
sliding_window=null, Qwen2/Qwen3 use_sliding_window=false), and import takes a window at least as
long as max_position_embeddings (it changes nothing there) and refuses a shorter one (Mistral's
default when the key is missing: 4096).

Import refuses in one line: num_key_value_heads that does not divide num_attention_heads, a
head_dim that is not a positive integer, scaled RoPE other than llama3 (linear, dynamic, yarn,
longrope; llama3 in GPT-NeoX or Phi-3) and partial RoPE, GPT-NeoX's parallel residual, a
non-positive eps, activations we lack (e.g. quick_gelu), Qwen3 with sliding-window layers, nonzero
attention biases (so released Qwen3 checkpoints are refused; exported ones come back), Gemma with
attention biases or bidirectional attention. A bias is kept (bias=true) when the config declares
linear biases or any bias tensor is nonzero. Keys that change nothing we compute are ignored: n_ctx
(transformers reads n_positions), reorder_and_upcast_attn (fp32 attention either way), summary_*
(the double-heads model's classifier), task_specific_params, bos/eos ids (the tokenizer's
`<|endoftext|>` is the EOT), Phi-3's original_max_position_embeddings (read by longrope alone).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any, Mapping, Optional

import torch

from .. import UserError
from ..model import LAYERNORM_EPS, RMSNORM_EPS, ModelConfig
from .families import FAMILIES, LLAMA_LIKE, NORM_EPS_KEYS, build_model_config, import_model_type
from .layout import weight_rules
from .layout_in import canonical_keys

# transformers' ACT2FN name -> our plain (non-gated) MLP; export writes them back (config_out._hf_activation)
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "relu2": "relu2", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
               "gelu_accurate": "gelu_tanh"}
# Llama 3's RoPE frequency scaling (rope_type "llama3"): config key -> our ModelConfig field
LLAMA3_ROPE = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_context"}
PAD = "<pad>"  # the pad token (config.json's pad_token_id) added for char-tokenizer classifiers
QWEN3_BIAS = ("config.json: attention_bias=true (a Qwen3 with q/k/v/o biases) has no scratchgpt equivalent: "
              "model.qk_norm models have no biases, as Qwen3's MLP has none")


def json_bytes(obj: Any) -> bytes:
    """A JSON file as every exported one is written: sorted keys, 2-space indent, UTF-8, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------
# Import: config.json -> ModelConfig


def _config_value(c: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    """c[key]; a missing or null key is `default`, or a UserError when there is none."""
    if key in c and c[key] is not None:
        return c[key]
    if default is ...:
        raise UserError(f"config.json: missing {key}")
    return default


def _require_value(c: Mapping[str, Any], key: str, want: Any, default: Any, why: str) -> None:
    """A UserError (saying `why`) unless c[key] (`default` when missing) is `want`."""
    value = _config_value(c, key, default)
    if value != want:
        raise UserError(f"config.json: {key}={value!r} has no scratchgpt equivalent ({why})")


def _plain_mlp_activation(c: Mapping[str, Any], key: str, default: str) -> str:
    act = _config_value(c, key, default)
    if act in ACTIVATIONS:
        return ACTIVATIONS[act]
    raise UserError(f"config.json: {key}={act!r} has no scratchgpt equivalent (scratchgpt's plain MLPs take "
                    f"{', '.join(ACTIVATIONS)})")


def _llama3_rope_fields(c: Mapping[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    # transformers takes a top-level original_max_position_embeddings first, then max_position_embeddings
    for context in (c.get("original_max_position_embeddings"), params.get("original_max_position_embeddings"),
                    c.get("max_position_embeddings")):
        if context is not None:
            params["original_max_position_embeddings"] = context
            break
    out: dict[str, Any] = {}
    for key, ours in LLAMA3_ROPE.items():
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config.json: rope_type 'llama3' needs a number for {key}, got {value!r}")
        out[ours] = value if ours == "rope_original_context" else float(value)
    out["rope_scaling"] = "llama3"
    return out


def _rope_fields(c: Mapping[str, Any], partial_default: float, scaled: bool = False) -> dict[str, Any]:
    """ModelConfig's rope fields: rope_base (rope_theta) of RoPE over whole heads and, where `scaled` (the
    Llama/Arcee/Qwen3 classes), Llama 3's frequency scaling; other scaling and partial RoPE are refused."""
    # as transformers reads it: a non-empty rope_scaling (4.x's key) replaces rope_parameters whole (5.x's
    # RotaryEmbeddingConfigMixin), so yarn there beside a default rope_parameters is yarn
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
        raise UserError(f"config.json: {key} must be an object, got {str(params)[:80]!r}")
    params = dict(params)
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {}
    if kind == "llama3" and scaled:
        out = _llama3_rope_fields(c, params)
    elif kind != "default":
        raise UserError(f"config.json: rope_type={kind!r} (scaled RoPE) has no scratchgpt equivalent: model.pos=rope "
                        "is plain RoPE" + (" or Llama 3's (rope_type llama3)" if scaled else ""))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", partial_default)))
    if partial != 1:
        raise UserError(f"config.json: partial_rotary_factor={partial} (RoPE on part of each head) has no scratchgpt "
                        "equivalent: model.pos=rope rotates whole heads")
    return out | {"rope_base": float(params.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0))))}


def _norm_eps(c: Mapping[str, Any], mt: str, norm: str) -> Optional[float]:
    """model.norm_eps from the family's eps key: None where it is our default for `norm`, so configs
    (and export -> import -> export) stay as they were."""
    key, default = NORM_EPS_KEYS[mt]
    eps = _config_value(c, key, default) if key else default
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise UserError(f"config.json: {key}={eps!r} must be a positive number")
    return None if float(eps) == (RMSNORM_EPS if norm == "rmsnorm" else LAYERNORM_EPS) else float(eps)


# Each family's reader: (ModelConfig fields, its biases: True when the config declares them, False when the
# class has none, None when the tensors settle it)


def _gpt2_fields(c: Mapping[str, Any], mt: str) -> tuple[dict[str, Any], Optional[bool]]:
    for key, want, default in (("scale_attn_weights", True, True), ("scale_attn_by_inverse_layer_idx", False, False),
                               ("add_cross_attention", False, False)):
        _require_value(c, key, want, default, "scratchgpt's attention is plain scaled self-attention")
    n_embd = _config_value(c, "n_embd")
    kw = dict(pos="learned", norm="layernorm", norm_placement="pre",
              mlp=_plain_mlp_activation(c, "activation_function", "gelu_new"),
              block_size=_config_value(c, "n_positions", 1024), n_layer=_config_value(c, "n_layer"),
              n_head=_config_value(c, "n_head"), n_embd=n_embd, mlp_hidden=_config_value(c, "n_inner", 4 * n_embd),
              dropout=_config_value(c, "resid_pdrop", 0.1), init_std=_config_value(c, "initializer_range", 0.02))
    return kw, None  # GPT-2 has every bias, always: biases all zero import as bias=false


def _opt_fields(c: Mapping[str, Any], mt: str) -> tuple[dict[str, Any], Optional[bool]]:
    pre = _config_value(c, "do_layer_norm_before", True)
    if pre:
        _require_value(c, "_remove_final_layer_norm", False, False, "a pre-norm scratchgpt model ends with a final norm")
    n_embd = _config_value(c, "hidden_size")
    _require_value(c, "word_embed_proj_dim", n_embd, n_embd, "scratchgpt has no embedding projection")
    _require_value(c, "layer_norm_elementwise_affine", True, True, "scratchgpt's LayerNorms have a weight")
    kw = dict(pos="learned", norm="layernorm", norm_placement="pre" if pre else "post",
              mlp=_plain_mlp_activation(c, "activation_function", "relu"),
              block_size=_config_value(c, "max_position_embeddings", 2048),
              n_layer=_config_value(c, "num_hidden_layers"), n_head=_config_value(c, "num_attention_heads"),
              n_embd=n_embd, mlp_hidden=_config_value(c, "ffn_dim"), dropout=_config_value(c, "dropout", 0.1),
              init_std=_config_value(c, "init_std", 0.02))
    return kw, _config_value(c, "enable_bias", True) or None


def _neox_fields(c: Mapping[str, Any], mt: str) -> tuple[dict[str, Any], Optional[bool]]:
    _require_value(c, "use_parallel_residual", False, True, "scratchgpt's blocks are sequential: x + attn, then + mlp")
    kw = dict(pos="rope", **_rope_fields(c, partial_default=0.25), norm="layernorm", norm_placement="pre",
              mlp=_plain_mlp_activation(c, "hidden_act", "gelu"),
              block_size=_config_value(c, "max_position_embeddings", 2048),
              n_layer=_config_value(c, "num_hidden_layers"), n_head=_config_value(c, "num_attention_heads"),
              n_embd=_config_value(c, "hidden_size"), mlp_hidden=_config_value(c, "intermediate_size"),
              dropout=_config_value(c, "hidden_dropout", 0.0), init_std=_config_value(c, "initializer_range", 0.02))
    return kw, _config_value(c, "attention_bias", True) or None


# The Llama-shaped classes: what a config omits (transformers' defaults)
_DEFAULT_CONTEXT = {"llama": 2048, "arcee": 4096, "qwen3": 32768, "qwen2": 32768, "mistral": 131072, "gemma": 8192,
                    "phi3": 4096}
_DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma": 256}  # the others: hidden_size / num_attention_heads
_TANH_GELUS = tuple(k for k, v in ACTIVATIONS.items() if v == "gelu_tanh")


def _llama_mlp(c: Mapping[str, Any], mt: str) -> str:
    """A gated MLP (silu: swiglu; tanh GELU, which Gemma's "gelu" also means: geglu_tanh), Arcee's plain one."""
    if mt == "arcee":
        return _plain_mlp_activation(c, "hidden_act", "relu2")
    act = _config_value(c, "hidden_act", "gelu_pytorch_tanh" if mt == "gemma" else "silu")
    if act in ("silu", "swish"):
        return "swiglu"
    if act in _TANH_GELUS or (mt == "gemma" and act == "gelu"):  # (transformers runs Gemma's "gelu" as tanh)
        return "geglu_tanh"
    raise UserError(f"config.json: hidden_act={act!r} in {FAMILIES[mt].causal_lm}'s gated MLP has no "
                    "scratchgpt equivalent (model.mlp=swiglu is SiLU-gated, geglu_tanh tanh-GELU-gated)")


def _head_size(c: Mapping[str, Any], mt: str, n_embd: int, n_head: int) -> Optional[int]:
    """model.head_size from head_dim: None where it is n_embd / n_head, so configs stay as they were."""
    head = _config_value(c, "head_dim", _DEFAULT_HEAD_DIM.get(mt, n_embd // n_head))
    if type(head) is not int or head < 1:
        raise UserError(f"config.json: head_dim={head!r} must be a positive integer")
    return None if head * n_head == n_embd else head


def _check_whole_context(c: Mapping[str, Any], mt: str, context: int) -> None:
    """Refuse sliding-window attention narrower than the context (a window at least as long changes nothing
    there): scratchgpt's attention sees the whole context."""
    if mt == "qwen3":
        _require_value(c, "use_sliding_window", False, False, "scratchgpt's attention sees the whole context")
    if mt in ("qwen3", "qwen2"):
        layer_types = set(_config_value(c, "layer_types", ["full_attention"]))
        if layer_types != {"full_attention"} and (mt == "qwen3" or c.get("use_sliding_window")):
            raise UserError(f"config.json: layer_types {sorted(layer_types)} has no scratchgpt equivalent (every "
                            "layer attends to the whole context)")
    if mt == "qwen2":  # (its window applies only with use_sliding_window, to layers from max_window_layers on)
        sliding = c.get("use_sliding_window") and (_config_value(c, "max_window_layers", 28)
                                                   < _config_value(c, "num_hidden_layers"))
        window = _config_value(c, "sliding_window", 4096) if sliding else None
    elif mt == "mistral":
        window = c["sliding_window"] if "sliding_window" in c else 4096  # MistralConfig's default
    else:
        window = c.get("sliding_window")
    if window is not None and not (type(window) is int and window >= context):
        raise UserError(f"config.json: sliding_window={window!r} is shorter than the context (max_position_embeddings="
                        f"{context}): scratchgpt's attention sees the whole context")


def _llama_variant_refusals(c: Mapping[str, Any], mt: str) -> None:
    if mt == "gemma":
        _require_value(c, "use_bidirectional_attention", False, False, "scratchgpt's model generates: causal attention")
        _require_value(c, "attention_bias", False, False, "Gemma's MLP has no biases for model.bias to cover")


def _llama_fields(c: Mapping[str, Any], mt: str) -> tuple[dict[str, Any], Optional[bool]]:
    """The fields of every Llama-shaped class (rope, rmsnorm, pre-norm)."""
    n_embd, n_head = _config_value(c, "hidden_size"), _config_value(c, "num_attention_heads")
    kv = _config_value(c, "num_key_value_heads", n_head)
    if type(kv) is not int or kv < 1 or n_head % kv:
        raise UserError(f"config.json: num_key_value_heads={kv!r} must be a positive integer that divides "
                        f"num_attention_heads={n_head}")
    head_size = _head_size(c, mt, n_embd, n_head)
    block_size = _config_value(c, "max_position_embeddings", _DEFAULT_CONTEXT[mt])
    _check_whole_context(c, mt, block_size)
    _llama_variant_refusals(c, mt)
    mlp = _llama_mlp(c, mt)
    kw = dict(pos="rope", **_rope_fields(c, partial_default=1.0, scaled=mt != "phi3"), norm="rmsnorm",
              norm_placement="pre", mlp=mlp, qk_norm=mt == "qwen3", qkv_bias=mt == "qwen2",
              scale_embeddings=mt == "gemma", n_layer=_config_value(c, "num_hidden_layers"), n_head=n_head,
              n_embd=n_embd, n_kv_head=kv if kv != n_head else None, head_size=head_size, block_size=block_size,
              mlp_hidden=_config_value(c, "intermediate_size"), dropout=_config_value(c, "attention_dropout", 0.0),
              init_std=_config_value(c, "initializer_range", 0.02))
    if mt in ("llama", "arcee"):
        return kw, (_config_value(c, "attention_bias", False) or _config_value(c, "mlp_bias", False)) or None
    return kw, None if mt == "qwen3" else False


_FAMILY_FIELDS = {"gpt2": _gpt2_fields, "opt": _opt_fields, "gpt_neox": _neox_fields,
                  **{mt: _llama_fields for mt in LLAMA_LIKE}}


def _settle_bias(c: Mapping[str, Any], mt: str, cfg: ModelConfig,
                 tensors: Optional[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """`cfg` (built with bias=True) for a config that declares no linear biases: bias=false unless a bias
    tensor is nonzero (without tensors: unless the class always has biases)."""
    bias_rules = [r for r in weight_rules(mt, cfg) if r.bias]
    if mt == "qwen3" and tensors is None and _config_value(c, "attention_bias", False):
        raise UserError(QWEN3_BIAS)  # (with the tensors, biases that are all zero import as bias=false)
    if tensors is None:
        return replace(cfg, bias=any(r.bias == "always" for r in bias_rules))
    tensors = canonical_keys(mt, tensors)
    nonzero = any(tensors[k].any() for r in bias_rules for k in r.hf if k in tensors)
    if mt == "qwen3" and nonzero:
        raise UserError(QWEN3_BIAS)
    return replace(cfg, bias=bool(nonzero))


def config_from_hf(hf_config: Mapping[str, Any], tensors: Optional[Mapping[str, torch.Tensor]] = None) -> ModelConfig:
    """Our ModelConfig for a transformers config.json (any model_type of FAMILIES), or a one-line UserError.

    `tensors` settles `bias` where the config cannot: with no linear-bias flag set, a
    model whose bias tensors are all zero imports as bias=false (same math). Without
    tensors, biases the class always has count as present.
    """
    c = hf_config
    mt = import_model_type(c)
    kw, bias = _FAMILY_FIELDS[mt](c, mt)
    tied = _config_value(c, "tie_word_embeddings", FAMILIES[mt].tied_default)
    cfg = build_model_config(dict(kw, vocab_size=_config_value(c, "vocab_size"), tie_embeddings=bool(tied), bias=True,
                                  dropout=float(kw["dropout"]), norm_eps=_norm_eps(c, mt, kw["norm"])))
    if bias is None:
        return _settle_bias(c, mt, cfg, tensors)
    return cfg if bias else replace(cfg, bias=False)
