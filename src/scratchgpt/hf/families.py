"""Which transformers class computes exactly what a `ModelConfig` does (export), and which class a
config.json names (import).

The choice follows pos, norm, norm placement and mlp (the table in hf/__init__.py), then the one
option that marks a Llama variant: qk_norm (Qwen3), qkv_bias (Qwen2), scale_embeddings (Gemma).
Mistral and Phi-3 compute what Llama computes (without biases): a model exports as one of them when
asked (`model_type`), or when it was imported from one. Refused, since no standard class computes
the same function: causal=false (bidirectional), value_embeds, logit_softcap (Gemma 2's
final_logit_softcapping comes with attention-logit softcapping and extra norms), two of qk_norm,
qkv_bias and scale_embeddings together or outside Llama's shape (rope, rmsnorm, pre, a gated mlp,
bias=false), pos=sinusoidal, learned positions with rmsnorm or a gated mlp, rope with post-norm, a
gated mlp with layernorm, n_kv_head < n_head or head_size outside the Llama-shaped rows,
rope_scaling=llama3 in GPT-2/OPT/GPT-NeoX/Phi-3, norm_eps other than 1e-5 for OPT.

On import, model types whose computation our options do not express are named with the reason
(Gemma 2 and 3, Mixtral, Qwen2-MoE, Phi-1/2); any other unknown model_type is refused in one line.
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
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", False),
    Family("mistral", "MistralForCausalLM", "MistralForSequenceClassification", False),
    Family("gemma", "GemmaForCausalLM", "GemmaForSequenceClassification", True),
    Family("phi3", "Phi3ForCausalLM", "Phi3ForSequenceClassification", False),
]}

# Llama's shape (rope, rmsnorm, pre-norm): the classes with num_key_value_heads and head_dim
LLAMA_LIKE = ("llama", "arcee", "qwen3", "qwen2", "mistral", "gemma", "phi3")
# the classes whose rope_parameters take rope_type llama3 (Phi-3's take only its own longrope)
LLAMA3_ROPE_FAMILIES = ("llama", "arcee", "qwen3", "qwen2", "mistral", "gemma")
# the config key holding the norms' eps, and its default when a config omits it (OPT's LayerNorm: always 1e-5)
NORM_EPS_KEYS = {"gpt2": ("layer_norm_epsilon", 1e-5), "opt": (None, 1e-5), "gpt_neox": ("layer_norm_eps", 1e-5),
                 "llama": ("rms_norm_eps", 1e-6), "arcee": ("rms_norm_eps", 1e-5), "qwen3": ("rms_norm_eps", 1e-6),
                 "qwen2": ("rms_norm_eps", 1e-6), "mistral": ("rms_norm_eps", 1e-6), "gemma": ("rms_norm_eps", 1e-6),
                 "phi3": ("rms_norm_eps", 1e-5)}
# Llama's variants: the option that marks each (Mistral and Phi-3 have none: they are Llama without biases)
_VARIANT_OPTIONS = {"qk_norm": "qwen3", "qkv_bias": "qwen2", "scale_embeddings": "gemma"}
# model types recognised on import and refused, with the reason
_REFUSED_TYPES = {
    "gemma2": "Gemma 2 adds attention-logit softcapping and a norm after each attention and MLP, which scratchgpt's "
              "blocks lack",
    "gemma3_text": "Gemma 3 adds a norm after each attention and MLP, weighted q/k norms and local layers with their "
                   "own RoPE base, which scratchgpt's blocks lack",
    "gemma3": "Gemma 3 adds a vision tower, a norm after each attention and MLP, weighted q/k norms and local "
              "layers with their own RoPE base",
    "mixtral": "a mixture-of-experts MLP",
    "qwen2_moe": "a mixture-of-experts MLP",
    "phi": "Phi-1/2 run attention and the MLP in parallel on one norm and rotate part of each head",
}


def export_model_type(cfg: ModelConfig, model_type: Optional[str] = None) -> str:
    """The transformers model_type that computes exactly what `cfg` does (`model_type`, if given and it
    does), or a one-line UserError."""
    natural = _architecture_type(cfg)
    mt = natural if model_type is None else _chosen_type(cfg, natural, model_type)
    if cfg.kv_heads != cfg.n_head and mt not in LLAMA_LIKE:
        raise UserError(f"model.n_kv_head={cfg.n_kv_head} (grouped-query attention) has no {FAMILIES[mt].causal_lm} "
                        "equivalent: only the Llama-shaped classes (pos=rope, norm=rmsnorm) share keys and values "
                        "between heads")
    if cfg.head_dim * cfg.n_head != cfg.n_embd and mt not in LLAMA_LIKE:
        raise UserError(f"model.head_size={cfg.head_size} (heads {cfg.q_dim} wide in all, n_embd {cfg.n_embd}) has no "
                        f"{FAMILIES[mt].causal_lm} equivalent: only the Llama-shaped classes have head_dim")
    if cfg.rope_scaling != "none" and mt not in LLAMA3_ROPE_FAMILIES:
        raise UserError(f"model.rope_scaling={cfg.rope_scaling} has no {FAMILIES[mt].causal_lm} equivalent: it exports "
                        "as Llama, Arcee, Qwen2, Qwen3, Mistral or Gemma (model.norm=rmsnorm), whose configs carry it")
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
    variant = [name for name in _VARIANT_OPTIONS if getattr(cfg, name) and not (name == "qkv_bias" and cfg.bias)]
    if variant:
        return _variant_type(cfg, variant)
    if cfg.pos == "sinusoidal":
        raise UserError("model.pos=sinusoidal has no transformers decoder with the same position table "
                        "(pos=learned exports as GPT-2, pos=rope as GPT-NeoX/Llama)")
    if cfg.pos == "learned":
        if cfg.norm != "layernorm":
            raise UserError("model.norm=rmsnorm with model.pos=learned has no standard transformers class "
                            "(GPT-2 and OPT use LayerNorm)")
        if cfg.gated:
            raise UserError(f"model.mlp={cfg.mlp} with model.pos=learned has no standard transformers class "
                            "(GPT-2 and OPT have a plain MLP)")
        return "gpt2" if cfg.norm_placement == "pre" else "opt"
    if cfg.norm_placement == "post":
        raise UserError("model.norm_placement=post with model.pos=rope has no standard transformers class "
                        "(OPT, the post-norm decoder, has learned positions)")
    if cfg.norm == "layernorm":
        if cfg.gated:
            raise UserError(f"model.mlp={cfg.mlp} with model.norm=layernorm has no standard transformers class "
                            "(Llama's gated MLP comes with RMSNorm)")
        return "gpt_neox"
    return "llama" if cfg.gated else "arcee"


def _variant_type(cfg: ModelConfig, options: list[str]) -> str:
    """Qwen3 (qk_norm), Qwen2 (qkv_bias) or Gemma (scale_embeddings): Llama's shape plus that one option."""
    if len(options) > 1:
        raise UserError(f"model.{options[0]}=true with model.{options[1]}=true has no standard transformers class "
                        "(Qwen3 has qk_norm, Qwen2 qkv_bias, Gemma scale_embeddings, each alone)")
    name = options[0]
    mt = _VARIANT_OPTIONS[name]
    arch = FAMILIES[mt].causal_lm.removesuffix("ForCausalLM")
    if (cfg.pos, cfg.norm, cfg.norm_placement) != ("rope", "rmsnorm", "pre") or not cfg.gated:
        raise UserError(f"model.{name}=true exports only as {arch}, which needs model.pos=rope, norm=rmsnorm, "
                        "norm_placement=pre and a gated mlp (swiglu or geglu_tanh)")
    if cfg.bias:
        raise UserError(f"model.{name}=true with model.bias=true has no standard transformers class: {arch}'s MLP "
                        "has no biases (set model.bias=false)")
    return mt


def _chosen_type(cfg: ModelConfig, natural: str, model_type: str) -> str:
    """`model_type` where it computes what `natural` (the class export would pick) does, else a UserError."""
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not one scratchgpt writes ({', '.join(FAMILIES)})")
    if model_type == natural:
        return model_type
    arch, natural_arch = FAMILIES[model_type].causal_lm, FAMILIES[natural].causal_lm
    if natural == "llama" and model_type in ("mistral", "phi3"):
        if cfg.bias:
            raise UserError(f"{arch} has no biases: this model (model.bias=true) exports as {natural_arch}")
        return model_type
    raise UserError(f"{arch} does not compute this model: it exports as {natural_arch}")


def hf_architecture(cfg: ModelConfig, classifier_pooling: Optional[str] = None, *,
                    model_type: Optional[str] = None) -> str:
    """The transformers class that represents this model exactly (a classifier's with `classifier_pooling`;
    `model_type` picks among classes that compute the same, as export_model_type)."""
    family = FAMILIES[export_model_type(cfg, model_type)]
    if classifier_pooling is None:
        return family.causal_lm
    if classifier_pooling != "last":
        raise UserError(f"classifier pooling={classifier_pooling!r} has no transformers equivalent: "
                        f"{family.seq_cls} pools the last non-pad token (pooling=last)")
    return family.seq_cls


def import_model_type(c: Mapping[str, Any]) -> str:
    """The model_type of a transformers config.json, if it names a causal LM of FAMILIES; else a UserError."""
    mt = c.get("model_type")
    if mt in _REFUSED_TYPES:
        raise UserError(f"config.json: model_type {mt!r} has no scratchgpt equivalent ({_REFUSED_TYPES[mt]}); "
                        f"scratchgpt imports {', '.join(FAMILIES)}")
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
