"""Which transformers class computes exactly what a `ModelConfig` does (export), and which class a
config.json names (import).

The choice follows pos, norm, norm placement and mlp (the table in hf/__init__.py). Refused, since
no standard class computes the same function: causal=false (bidirectional), value_embeds,
logit_softcap (Gemma2's final_logit_softcapping comes with (1+w) RMSNorms, sandwich norms, scaled
embeddings and GeGLU), qk_norm outside Qwen3's combination (rope, rmsnorm, pre, swiglu,
bias=false), pos=sinusoidal, learned positions with rmsnorm or swiglu, rope with post-norm, swiglu
with layernorm, n_kv_head < n_head or rope_scaling=llama3 outside the Llama/Arcee/Qwen3 rows,
norm_eps other than 1e-5 for OPT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .. import UserError
from ..model import ModelConfig


@dataclass(frozen=True)
class Family:
    model_type: str
    causal_lm: str
    seq_cls: str
    tied_default: bool  # the config class's tie_word_embeddings default, for configs that omit the key


FAMILIES = {f.model_type: f for f in [
    Family("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification", True),
    Family("opt", "OPTForCausalLM", "OPTForSequenceClassification", True),
    Family("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification", False),
    Family("llama", "LlamaForCausalLM", "LlamaForSequenceClassification", False),
    Family("arcee", "ArceeForCausalLM", "ArceeForSequenceClassification", False),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", False),
]}

GQA_FAMILIES = ("llama", "arcee", "qwen3")  # the classes with num_key_value_heads
# the config key holding the norms' eps, and its default when a config omits it (OPT's LayerNorm: always 1e-5)
NORM_EPS_KEYS = {"gpt2": ("layer_norm_epsilon", 1e-5), "opt": (None, 1e-5), "gpt_neox": ("layer_norm_eps", 1e-5),
                 "llama": ("rms_norm_eps", 1e-6), "arcee": ("rms_norm_eps", 1e-5), "qwen3": ("rms_norm_eps", 1e-6)}


def export_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type that computes exactly what `cfg` does, or a one-line UserError."""
    mt = _architecture_type(cfg)
    if cfg.kv_heads != cfg.n_head and mt not in GQA_FAMILIES:
        raise UserError(f"model.n_kv_head={cfg.n_kv_head} (grouped-query attention) has no {FAMILIES[mt].causal_lm} "
                        "equivalent: only Llama, Arcee and Qwen3 (pos=rope, norm=rmsnorm) share keys and values "
                        "between heads")
    if cfg.rope_scaling != "none" and mt not in GQA_FAMILIES:
        raise UserError(f"model.rope_scaling={cfg.rope_scaling} exports only as Llama, Arcee or Qwen3 "
                        "(model.norm=rmsnorm), whose configs carry rope_scaling")
    if NORM_EPS_KEYS[mt][0] is None and cfg.eps != NORM_EPS_KEYS[mt][1]:
        raise UserError(f"model.norm_eps={cfg.norm_eps} has no {FAMILIES[mt].causal_lm} equivalent: its LayerNorm eps "
                        f"is fixed at {NORM_EPS_KEYS[mt][1]}")
    return mt


def _architecture_type(cfg: ModelConfig) -> str:
    """export_model_type's choice from pos, norm, placement, mlp and the options no class has."""
    if not cfg.causal:
        raise UserError("model.causal=false (bidirectional attention) has no transformers causal-LM class to export to")
    if cfg.value_embeds:
        raise UserError("model.value_embeds=true (a token embedding added to every layer's values) has no standard "
                        "transformers equivalent")
    if cfg.logit_softcap > 0:
        raise UserError("model.logit_softcap has no standard transformers equivalent: Gemma2's final_logit_softcapping "
                        "comes with (1+w) RMSNorms, sandwich norms, scaled embeddings and GeGLU")
    if cfg.qk_norm:
        if (cfg.pos, cfg.norm, cfg.norm_placement, cfg.mlp) != ("rope", "rmsnorm", "pre", "swiglu"):
            raise UserError("model.qk_norm=true exports only as Qwen3, which needs model.pos=rope, norm=rmsnorm, "
                            "norm_placement=pre and mlp=swiglu")
        if cfg.bias:
            raise UserError("model.qk_norm=true with model.bias=true has no standard transformers class: Qwen3's MLP "
                            "has no biases (set model.bias=false)")
        return "qwen3"
    if cfg.pos == "sinusoidal":
        raise UserError("model.pos=sinusoidal has no transformers decoder with the same position table "
                        "(pos=learned exports as GPT-2, pos=rope as GPT-NeoX/Llama)")
    if cfg.pos == "learned":
        if cfg.norm != "layernorm":
            raise UserError("model.norm=rmsnorm with model.pos=learned has no standard transformers class "
                            "(GPT-2 and OPT use LayerNorm)")
        if cfg.mlp == "swiglu":
            raise UserError("model.mlp=swiglu with model.pos=learned has no standard transformers class "
                            "(GPT-2 and OPT have a plain MLP)")
        return "gpt2" if cfg.norm_placement == "pre" else "opt"
    if cfg.norm_placement == "post":
        raise UserError("model.norm_placement=post with model.pos=rope has no standard transformers class "
                        "(OPT, the post-norm decoder, has learned positions)")
    if cfg.norm == "layernorm":
        if cfg.mlp == "swiglu":
            raise UserError("model.mlp=swiglu with model.norm=layernorm has no standard transformers class "
                            "(Llama's SwiGLU comes with RMSNorm)")
        return "gpt_neox"
    return "llama" if cfg.mlp == "swiglu" else "arcee"


def hf_architecture(cfg: ModelConfig, classifier_pooling: Optional[str] = None) -> str:
    """The transformers class that represents this model exactly (a classifier's with `classifier_pooling`)."""
    family = FAMILIES[export_model_type(cfg)]
    if classifier_pooling is None:
        return family.causal_lm
    if classifier_pooling != "last":
        raise UserError(f"classifier pooling={classifier_pooling!r} has no transformers equivalent: "
                        f"{family.seq_cls} pools the last non-pad token (pooling=last)")
    return family.seq_cls


def import_model_type(c: Mapping[str, Any]) -> str:
    """The model_type of a transformers config.json, if it names a causal LM of FAMILIES; else a UserError."""
    mt = c.get("model_type")
    if mt not in FAMILIES:
        raise UserError(f"config.json: model_type {mt!r} is not supported; scratchgpt imports {', '.join(FAMILIES)}")
    arch = (c.get("architectures") or [FAMILIES[mt].causal_lm])[0]
    if arch != FAMILIES[mt].causal_lm:
        raise UserError(f"config.json: architecture {arch} is not supported; scratchgpt imports the causal LM "
                        f"{FAMILIES[mt].causal_lm}")
    return mt


def build_model_config(kwargs: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig(**kwargs), its complaints as a one-line UserError naming `where`."""
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
