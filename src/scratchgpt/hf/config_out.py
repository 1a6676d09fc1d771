"""transformers config.json written for a ModelConfig: `hf_config`, each family's keys (the mapping, both
ways, is documented in config.py, beside the reader)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..model import ModelConfig
from .config import LLAMA3_ROPE
from .families import FAMILIES, LLAMA_LIKE, export_model_type


def _hf_activation(cfg: ModelConfig, model_type: str) -> str:
    """The ACT2FN name of cfg.mlp in `model_type`'s config (config.py's table; a gated MLP's gate's)."""
    if cfg.mlp == "swiglu":
        return "silu"
    if cfg.mlp == "geglu_tanh":
        return "gelu_pytorch_tanh"
    if cfg.mlp == "gelu_tanh":
        return "gelu_new" if model_type == "gpt2" else "gelu_pytorch_tanh"
    return cfg.mlp


def _gpt2_keys(cfg: ModelConfig, rope: dict[str, Any], mt: str) -> dict[str, Any]:
    # n_ctx beside n_positions, as GPT-2's own config.json has it (llama.cpp's convert_hf_to_gguf.py reads n_ctx)
    return dict(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.block_size,
                n_ctx=cfg.block_size, n_inner=cfg.hidden_dim, activation_function=_hf_activation(cfg, mt), layer_norm_epsilon=cfg.eps,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                initializer_range=cfg.init_std, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, add_cross_attention=False)


def _opt_keys(cfg: ModelConfig, rope: dict[str, Any], mt: str) -> dict[str, Any]:
    return dict(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                ffn_dim=cfg.hidden_dim, max_position_embeddings=cfg.block_size, word_embed_proj_dim=cfg.n_embd,
                do_layer_norm_before=False, activation_function=_hf_activation(cfg, mt), enable_bias=cfg.bias,
                layer_norm_elementwise_affine=True, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                layerdrop=0.0, init_std=cfg.init_std)


def _neox_keys(cfg: ModelConfig, rope: dict[str, Any], mt: str) -> dict[str, Any]:
    return dict(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                intermediate_size=cfg.hidden_dim, hidden_act=_hf_activation(cfg, mt),
                max_position_embeddings=cfg.block_size,
                layer_norm_eps=cfg.eps, use_parallel_residual=False, attention_bias=cfg.bias,
                rope_parameters=dict(rope, partial_rotary_factor=1.0), rotary_pct=1.0,
                rotary_emb_base=rope["rope_theta"], attention_dropout=cfg.dropout, hidden_dropout=cfg.dropout,
                initializer_range=cfg.init_std)


def _llama_keys(cfg: ModelConfig, rope: dict[str, Any], mt: str) -> dict[str, Any]:
    """The Llama-shaped classes' keys (`rope`, shared with the result, gains Llama 3's scaling)."""
    c = dict(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
             num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim,
             hidden_act=_hf_activation(cfg, mt), max_position_embeddings=cfg.block_size,
             rms_norm_eps=cfg.eps, rope_parameters=rope, rope_theta=rope["rope_theta"],
             attention_dropout=cfg.dropout, initializer_range=cfg.init_std)
    if mt in ("llama", "arcee", "qwen3", "gemma"):  # (the others have no flag: Qwen2's q/k/v biases are always there)
        c["attention_bias"] = cfg.bias
    if cfg.rope_scaling == "llama3":
        # 5.x reads rope_parameters (rope_scaling first when both are there: the same values), 4.x rope_scaling
        scaling = {"rope_type": "llama3"} | {key: getattr(cfg, ours) for key, ours in LLAMA3_ROPE.items()}
        rope.update(scaling)
        c["rope_scaling"] = scaling
    return c | _llama_variant_keys(cfg, mt)


def _llama_variant_keys(cfg: ModelConfig, mt: str) -> dict[str, Any]:
    """What each Llama-shaped class adds: bias flags, whole-context attention, Phi-3's dropouts, Gemma's
    activation under its 4.x name."""
    whole_context = dict(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                         layer_types=["full_attention"] * cfg.n_layer)
    return {"llama": dict(mlp_bias=cfg.bias, pretraining_tp=1), "arcee": dict(mlp_bias=cfg.bias),
            "qwen3": whole_context, "qwen2": whole_context,  # (no mlp_bias: their MLPs never have biases)
            "mistral": dict(sliding_window=None),
            "phi3": dict(sliding_window=None, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                         original_max_position_embeddings=cfg.block_size),
            "gemma": dict(hidden_activation=_hf_activation(cfg, mt))}[mt]


# Each family's writer: its config.json keys (`rope`: the default RoPE parameters of cfg)
_FAMILY_KEYS = {"gpt2": _gpt2_keys, "opt": _opt_keys, "gpt_neox": _neox_keys,
                **{mt: _llama_keys for mt in LLAMA_LIKE}}


def hf_config(cfg: ModelConfig, *, eot_id: Optional[int] = None, pad_token_id: Optional[int] = None,
              labels: Optional[Sequence[str]] = None, bos_id: Optional[int] = None,
              model_type: Optional[str] = None) -> dict[str, Any]:
    """The config.json of `hf_architecture(cfg)` (a `...ForSequenceClassification` when `labels` are given;
    `model_type` picks among classes that compute the same, as export_model_type).

    bos_token_id is `bos_id` (an imported tokenizer's BOS), else the EOT id, as GPT-2's configs have it.

    Written for transformers 5 (rope_parameters, dtype) with the 4.x spellings beside them
    (rope_theta, rotary_pct, torch_dtype), which 5.x reads as the same values.
    """
    mt = export_model_type(cfg, model_type)
    family = FAMILIES[mt]
    c: dict[str, Any] = {
        "architectures": [family.seq_cls if labels else family.causal_lm],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": eot_id if bos_id is None else bos_id,
        "eos_token_id": eot_id,
        "pad_token_id": pad_token_id,
        # a classifier has no LM head: nothing to tie
        "tie_word_embeddings": bool(cfg.tie_embeddings and not labels),
        "dtype": "float32",
        "torch_dtype": "float32",
        "use_cache": True,
    }
    c.update(_FAMILY_KEYS[mt](cfg, {"rope_type": "default", "rope_theta": float(cfg.rope_base)}, mt))
    if labels:
        c.update(id2label={str(i): lab for i, lab in enumerate(labels)}, label2id={lab: i for i, lab in enumerate(labels)},
                 num_labels=len(labels), problem_type="single_label_classification")
    return c
