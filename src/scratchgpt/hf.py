"""Hugging Face transformers interop: export a checkpoint as a stock transformers model, import one back.

An exported folder loads with `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)`, no `trust_remote_code`: every scratchgpt model that
has an exact standard twin is written as that class, with the same math, so fp32 logits
agree within 1e-4 and greedy decoding agrees token for token. Nothing is approximated:
a model without an exact twin is refused with one line naming the option.

Mapping (our `ModelConfig` -> transformers class, and the config keys that carry the choice):

    pos      norm       placement  mlp         -> class (model_type)
    learned  layernorm  pre        plain       -> GPT2LMHeadModel (gpt2): activation_function, n_inner
    learned  layernorm  post       plain       -> OPTForCausalLM (opt): do_layer_norm_before=false
    rope     layernorm  pre        plain       -> GPTNeoXForCausalLM (gpt_neox): use_parallel_residual=false,
                                                 partial_rotary_factor=1, hidden_act
    rope     rmsnorm    pre        swiglu      -> LlamaForCausalLM (llama): hidden_act=silu
    rope     rmsnorm    pre        plain       -> ArceeForCausalLM (arcee): Llama with a plain up/down MLP
    rope     rmsnorm    pre        swiglu,     -> Qwen3ForCausalLM (qwen3): bias=false only (Qwen3's MLP has
                                   qk_norm        no biases); q_norm/k_norm weights are ones, eps 1e-6

  plain MLPs: ours -> transformers' ACT2FN name (activation_function / hidden_act), and back

    gelu       <-> gelu                 the exact erf GELU
    gelu_tanh  <-> gelu_new (GPT-2, as its released configs say), gelu_pytorch_tanh (the
                   other families: F.gelu(approximate="tanh"), the very kernel ours calls);
                   imported too: gelu_fast, gelu_python_tanh, gelu_accurate (the same tanh
                   formula: in fp32 all are within 4.8e-7 of ours on [-12, 12], where the
                   erf GELU is 4.7e-4 away)
    relu       <-> relu
    relu2      <-> relu2

  every row: vocab_size, n_layer, n_head, n_embd, block_size (max_position_embeddings),
  mlp_hidden (intermediate size), rope_base (rope_theta), tie_embeddings (tie_word_embeddings),
  dropout, init_std (initializer_range), norm_eps (GPT-2 layer_norm_epsilon, NeoX layer_norm_eps,
  Llama/Arcee/Qwen3 rms_norm_eps; OPT has no key: its LayerNorms are 1e-5, so only that exports
  as OPT). `bias=false` sets the classes' bias flags off
  (OPT enable_bias, NeoX attention_bias, Llama/Arcee attention_bias and mlp_bias, Qwen3
  attention_bias); a bias a class always has (GPT-2's, every LayerNorm's, NeoX's MLP) is
  written as zeros.
  Epsilons: norm_eps=null means LayerNorm 1e-5, RMSNorm 1e-6, and qk_norm's per-head RMSNorm
  1e-6 (model.QK_NORM_EPS, Qwen3's default rms_norm_eps); a norm_eps applies to every norm,
  qk_norm's too, as Qwen3's one rms_norm_eps does. On import an eps equal to our default for
  the norm becomes null, so configs that always imported stay byte for byte what they were.
  Llama, Arcee, Qwen3 rows only: n_kv_head (num_key_value_heads; null = n_head), grouped-query
  attention as in SmolLM2, TinyLlama and Qwen3 (GPT-2, OPT and NeoX have none: refused), and
  Llama 3.1/3.2's RoPE frequency scaling:

    rope_scaling=llama3  <-> rope_type "llama3"
    rope_factor              factor (Llama 3.1: 8, 3.2: 32)
    rope_low_freq_factor     low_freq_factor
    rope_high_freq_factor    high_freq_factor
    rope_original_context    original_max_position_embeddings (8192)

  read from rope_parameters (transformers 5) or rope_scaling (4.x, as Meta's config.json has it;
  a missing original_max_position_embeddings is transformers' fallback, max_position_embeddings),
  written to both (5.x reads rope_scaling first when both are there: the same values).

Refused (no standard class computes the same function):
  causal=false (bidirectional), value_embeds, logit_softcap (Gemma2's final_logit_softcapping
  comes with (1+w) RMSNorms, sandwich norms, scaled embeddings and GeGLU), qk_norm outside
  Qwen3's combination (rope, rmsnorm, pre, swiglu, bias=false), pos=sinusoidal, learned
  positions with rmsnorm or swiglu, rope with post-norm, swiglu with layernorm, n_kv_head <
  n_head or rope_scaling=llama3 outside the Llama/Arcee/Qwen3 rows, norm_eps other than 1e-5 for OPT.

Weight layout: ours is nanoGPT's (`transformer.h.N.attn.c_attn` holds [q; k; v], each head
contiguous; with grouped-query attention k and v have n_kv_head heads each: [q (n_head * head_dim);
k (n_kv_head * head_dim); v (same)], query head h using key/value head h // (n_head / n_kv_head)
as transformers' repeat_kv does; swiglu's c_fc holds [gate; up]). GPT-2 stores Linear weights
transposed (Conv1D); OPT/Llama/Arcee/Qwen3 split q, k, v (and gate, up); NeoX fuses qkv per head
([q_h; k_h; v_h] for each head h); OPT's position table has 2 leading rows it never reads
for unpadded input (written as zeros); Qwen3's q_norm/k_norm weights have no tensor of
ours (written as ones; on import they must be ones). A tied head is omitted from
model.safetensors, as transformers does. RoPE rotates (first half, second half) of each
head in both.

Classifiers (`finetune classify` runs: a linear head on the last real token's hidden state)
export as the family's `...ForSequenceClassification`. Its `score` layer has no bias, so our
head's bias is folded into the final LayerNorm's bias (exact: that norm feeds only the
score); RMSNorm families have no bias to fold into and are refused unless the bias is zero.
transformers pools the rightmost token that is not `pad_token_id`, so the pad id must be one
that text never encodes to: `<|endoftext|>` for BPE (our encoder never emits it), and for
char tokenizers a new `<pad>` token with a zero embedding row. `pooling: mean` is refused.

Tokenizer: tokenizer.json is copied as is (it is already a `tokenizers` file) with a
tokenizer_config.json for `PreTrainedTokenizerFast`. `split_special_tokens: true` keeps
`<|endoftext|>` inside text as plain characters, exactly as scratchgpt encodes it; the EOT
id is the config's bos/eos id (append `tokenizer.eos_token_id` to mark a document end).
An imported model's own tokenizer (kind "hf": tokenizer.py) goes back byte for byte with the
files that came with it (tokenizer_config.json, chat_template.jinja); config.json's
bos_token_id is the BOS its post-processor adds (else the eos), eos_token_id its eos.

Import (`import_hf`) reads model.safetensors or a sharded index (fp32, fp16 or bf16; held as
fp32) for the six classes above and writes a scratchgpt run. Refused in one line: any other
model_type, pytorch_model.bin (loading it means unpickling, which can run code),
num_key_value_heads that does not divide num_attention_heads, head_dim != hidden_size / heads,
scaled RoPE other than llama3 (linear, dynamic, yarn, longrope; llama3 in GPT-NeoX) and
partial RoPE, GPT-NeoX's parallel residual, a non-positive eps, activations we lack
(e.g. quick_gelu), Qwen3 with sliding-window layers, nonzero attention biases or trained q/k norm
weights (so released Qwen3 checkpoints are refused; exported ones come back). A bias is
kept (bias=true) when the config declares linear biases or any bias tensor is nonzero;
biases that are all zero are dropped, which is the same math with fewer parameters.
Export -> import -> export reproduces model.safetensors and config.json byte for byte.

Released GPT-2 folders (gpt2, gpt2-medium, distilgpt2, ...) import as they are: their keys lack
the `transformer.` prefix (a bare GPT2Model's names), the head is tied and absent, and files
converted from the 2019 pickles hold each layer's causal-mask buffers (`h.N.attn.bias`, a
lower-triangular (1, 1, n_positions, n_positions) mask; `attn.masked_bias`, -1e4). They
are dropped after checking that they change nothing: the mask must be lower-triangular ones
and the masking value at most -1e4 (GPT-NeoX's `attention.bias` / `attention.masked_bias`,
-1e9, likewise); anything else is refused. Config keys that
change nothing we compute are ignored: n_ctx (transformers reads n_positions),
reorder_and_upcast_attn (fp32 attention either way), summary_* (the double-heads model's
classifier), task_specific_params, bos/eos ids (the tokenizer's `<|endoftext|>` is the EOT).
Tokenizers: any tokenizer.json the `tokenizers` library loads imports (one it cannot load is refused
in one line); files in scratchgpt's own char/bpe shapes load as those kinds, every other one (Llama's
byte-fallback BPE, SmolLM2's or Qwen's byte-level BPE with their splits and normalizers...) as kind
"hf", encoded by `tokenizers` itself, with the tokenizer_config.json and chat template files beside
it copied into the run. Its eos is tokenizer_config.json's eos_token, else config.json's (or
generation_config.json's) eos_token_id, which import then writes into the run's tokenizer_config.json.
The model's generation_config.json (else one holding config.json's eos_token_id) goes beside it too:
its eos_token_id list (Llama 3 Instruct's <|eot_id|>) also ends generated text (Tokenizer.stop_ids).
GPT-2's tokenizer.json (byte-level BPE, `<|endoftext|>` = 50256 as an added token, the BPE
model written without a "type" in older files) loads as a scratchgpt bpe tokenizer that
encodes exactly as transformers' GPT-2 tokenizer does, with one deliberate difference: a
literal `<|endoftext|>` in text stays plain characters (transformers' default makes it id
50256; `split_special_tokens=True` there gives our ids, and prompts.encode_with_eot gives theirs).

LoRA runs (`finetune ... --lora`: PEFT over our names, LoRA on every c_attn, c_proj, c_fc)
export with `export_adapter` as a PEFT adapter folder whose base, exported as above, sits in
out/base: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out/"base"), out)`
computes what `load_run(run).model` does (fp32 logits within 1e-4). LoRA adds s B A to W, so
B's rows are split or permuted exactly as W's rows are (q/k/v, gate/up, NeoX's per-head qkv)
and each part keeps A; GPT-2 keeps A and B and sets fan_in_fan_out. adapter_config.json's
base_model_name_or_path is "base", relative (PEFT would resolve it against the working
directory: load the base explicitly). Classifier LoRA runs are refused: export them merged.

Public API:
    hf_architecture(cfg, classifier_pooling=None) -> str
    hf_config(cfg, *, eot_id=None, pad_token_id=None, labels=None, bos_id=None) -> dict
    state_dict_to_hf(cfg, tensors) -> dict[str, Tensor]
    export_checkpoint(ckpt, out, *, which="best", force=False) -> Path
    read_hf_folder(hf_dir) -> (hf config dict, fp32 tensors)
    config_from_hf(hf_config, tensors=None) -> ModelConfig
    state_dict_from_hf(hf_config, tensors, cfg=None) -> dict[str, Tensor]
    load_hf_tokenizer(path) -> Tokenizer
    import_hf(hf_dir, out, *, tokenizer=None, force=False) -> Path
    adapter_to_hf(cfg, adapter_config, tensors, base_model_name_or_path="base") -> (adapter_config.json, tensors)
    export_adapter(ckpt, out, *, which="best", force=False, base=None) -> Path
`transformers` itself is never imported here: the files are written and read directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import UserError
from .checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, HEAD_FILE, MODEL_FILE, STATE_FILE,
                         TOKENIZER_FILE, load_tensors, resolve_checkpoint, save_checkpoint, verify_checkpoint,
                         weights_sha256)
from .lora import LORA_TARGETS
from .model import GPT, LAYERNORM_EPS, RMSNORM_EPS, ModelConfig
from .tokenizer import EOT, HF_CONFIG_FILE, HF_GENERATION_FILE, UNK, Tokenizer, copy_tokenizer
from .utils import atomic_write, atomic_write_bytes, atomic_write_json, read_json, replace_dir, sha256_file

__all__ = [
    "FAMILIES",
    "hf_architecture",
    "hf_config",
    "state_dict_to_hf",
    "export_checkpoint",
    "read_hf_folder",
    "config_from_hf",
    "state_dict_from_hf",
    "load_hf_tokenizer",
    "import_hf",
    "adapter_to_hf",
    "export_adapter",
]

# transformers' ACT2FN name -> our plain (non-gated) MLP; export writes them back with _hf_activation
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "relu2": "relu2", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
               "gelu_accurate": "gelu_tanh"}
PAD = "<pad>"  # the pad token added for char-tokenizer classifiers


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


# ---------------------------------------------------------------------------------------
# Which class


GQA_FAMILIES = ("llama", "arcee", "qwen3")  # the classes with num_key_value_heads
# Llama 3's RoPE frequency scaling (rope_type "llama3"): config key -> our ModelConfig field
LLAMA3_ROPE = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_context"}
# the config key holding the norms' eps, and its default when a config omits it (OPT's LayerNorm: always 1e-5)
NORM_EPS_KEYS = {"gpt2": ("layer_norm_epsilon", 1e-5), "opt": (None, 1e-5), "gpt_neox": ("layer_norm_eps", 1e-5),
                 "llama": ("rms_norm_eps", 1e-6), "arcee": ("rms_norm_eps", 1e-5), "qwen3": ("rms_norm_eps", 1e-6)}


def _model_type(cfg: ModelConfig) -> str:
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
    """_model_type's choice from pos, norm, placement, mlp and the options no class has."""
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
    family = FAMILIES[_model_type(cfg)]
    if classifier_pooling is None:
        return family.causal_lm
    if classifier_pooling != "last":
        raise UserError(f"classifier pooling={classifier_pooling!r} has no transformers equivalent: "
                        f"{family.seq_cls} pools the last non-pad token (pooling=last)")
    return family.seq_cls


# ---------------------------------------------------------------------------------------
# Weight layout: one rule per tensor of ours, naming the transformers tensor(s) it becomes


def _same(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _first(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _transpose(t: torch.Tensor) -> list[torch.Tensor]:
    return [t.t()]


def _untranspose(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].t()


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _pad_positions(t: torch.Tensor) -> list[torch.Tensor]:
    # OPT looks positions up at index + 2 (rows 0 and 1 belonged to fairseq's padding scheme)
    return [torch.cat([t.new_zeros(2, t.size(1)), t])]


def _unpad_positions(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0][2:]


SAME = (_same, _first)
TRANSPOSED = (_transpose, _untranspose)  # GPT-2's Conv1D stores a Linear weight as (in, out)
OPT_POSITIONS = (_pad_positions, _unpad_positions)


def _chunks(n: int):
    return (lambda t: list(t.chunk(n, dim=0)), _cat)


def _split(sizes: list[int]):
    return (lambda t: list(t.split(sizes, dim=0)), _cat)


def _per_head_qkv(n_head: int, head_dim: int):
    """[q; k; v] (ours) <-> [q_0; k_0; v_0; q_1; ...] (GPT-NeoX's query_key_value), for weights and biases."""
    def to_hf(t):
        return [t.reshape(3, n_head, head_dim, -1).transpose(0, 1).reshape(t.shape)]

    def from_hf(ts):
        t = ts[0]
        return t.reshape(n_head, 3, head_dim, -1).transpose(0, 1).reshape(t.shape)

    return (to_hf, from_hf)


@dataclass(frozen=True)
class _Rule:
    ours: str
    hf: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    from_hf: Callable[[list[torch.Tensor]], torch.Tensor]
    bias: str = ""  # "": a weight; "flag": a bias the class has only with its bias flag on; "always": one it always has


def _layout(model_type: str, cfg: ModelConfig, lm_head: bool = True) -> list[_Rule]:
    """Every tensor of a `cfg` model with bias=True (ours) and where it lives in `model_type`."""
    rules: list[_Rule] = []

    def tensor(ours: str, hf: str | list[str], conv=SAME, bias: str = "") -> None:
        rules.append(_Rule(ours, tuple(hf) if isinstance(hf, list) else (hf,), conv[0], conv[1], bias))

    def linear(ours: str, hf: str | list[str], conv=SAME, bias: str = "flag") -> None:
        names = hf if isinstance(hf, list) else [hf]
        tensor(ours + ".weight", [n + ".weight" for n in names], conv)
        tensor(ours + ".bias", [n + ".bias" for n in names], SAME if conv is TRANSPOSED else conv, bias)

    def norm(ours: str, hf: str) -> None:
        tensor(ours + ".weight", hf + ".weight")
        if cfg.norm == "layernorm":  # these classes' LayerNorms always have a bias; RMSNorms never do
            tensor(ours + ".bias", hf + ".bias", bias="always")

    qkv = _split([cfg.n_embd, cfg.kv_dim, cfg.kv_dim])  # grouped-query attention: k and v narrower than q
    for i in range(cfg.n_layer):
        o = f"transformer.h.{i}."
        if model_type == "gpt2":  # same names as ours (nanoGPT copied them), weights transposed
            norm(o + "ln_1", o + "ln_1")
            linear(o + "attn.c_attn", o + "attn.c_attn", TRANSPOSED, "always")
            linear(o + "attn.c_proj", o + "attn.c_proj", TRANSPOSED, "always")
            norm(o + "ln_2", o + "ln_2")
            linear(o + "mlp.c_fc", o + "mlp.c_fc", TRANSPOSED, "always")
            linear(o + "mlp.c_proj", o + "mlp.c_proj", TRANSPOSED, "always")
        elif model_type == "opt":
            h = f"model.decoder.layers.{i}."
            norm(o + "ln_1", h + "self_attn_layer_norm")
            linear(o + "attn.c_attn", [h + "self_attn.q_proj", h + "self_attn.k_proj", h + "self_attn.v_proj"], qkv)
            linear(o + "attn.c_proj", h + "self_attn.out_proj")
            norm(o + "ln_2", h + "final_layer_norm")  # (OPT's name for the MLP's norm)
            linear(o + "mlp.c_fc", h + "fc1")
            linear(o + "mlp.c_proj", h + "fc2")
        elif model_type == "gpt_neox":
            h = f"gpt_neox.layers.{i}."
            norm(o + "ln_1", h + "input_layernorm")
            # (n_head keys and values: _model_type refuses grouped-query attention for NeoX)
            linear(o + "attn.c_attn", h + "attention.query_key_value", _per_head_qkv(cfg.n_head, cfg.head_dim))
            linear(o + "attn.c_proj", h + "attention.dense")
            norm(o + "ln_2", h + "post_attention_layernorm")
            linear(o + "mlp.c_fc", h + "mlp.dense_h_to_4h", bias="always")
            linear(o + "mlp.c_proj", h + "mlp.dense_4h_to_h", bias="always")
        else:  # llama, arcee, qwen3
            h = f"model.layers.{i}."
            norm(o + "ln_1", h + "input_layernorm")
            linear(o + "attn.c_attn", [h + "self_attn.q_proj", h + "self_attn.k_proj", h + "self_attn.v_proj"], qkv)
            linear(o + "attn.c_proj", h + "self_attn.o_proj")
            norm(o + "ln_2", h + "post_attention_layernorm")
            if model_type in ("llama", "qwen3"):
                linear(o + "mlp.c_fc", [h + "mlp.gate_proj", h + "mlp.up_proj"], _chunks(2))
            else:
                linear(o + "mlp.c_fc", h + "mlp.up_proj")
            linear(o + "mlp.c_proj", h + "mlp.down_proj")

    embed, final_norm = {
        "gpt2": ("transformer.wte", "transformer.ln_f"),
        "opt": ("model.decoder.embed_tokens", "model.decoder.final_layer_norm"),
        "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
        "llama": ("model.embed_tokens", "model.norm"),
        "arcee": ("model.embed_tokens", "model.norm"),
        "qwen3": ("model.embed_tokens", "model.norm"),
    }[model_type]
    tensor("transformer.wte.weight", embed + ".weight")
    if cfg.pos == "learned":
        if model_type == "gpt2":
            tensor("transformer.wpe.weight", "transformer.wpe.weight")
        else:
            tensor("transformer.wpe.weight", "model.decoder.embed_positions.weight", OPT_POSITIONS)
    if cfg.norm_placement == "pre":  # post-norm ends on the last block's ln_2 (OPT-350m's layout)
        norm("transformer.ln_f", final_norm)
    if lm_head and not cfg.tie_embeddings:
        tensor("lm_head.weight", "lm_head.weight")
    return rules


def _fixed(model_type: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers tensors with no counterpart in ours, at the one value that makes the math ours:
    Qwen3's per-head q_norm/k_norm weights are ones (our qk_norm has no weight)."""
    if model_type != "qwen3":
        return {}
    return {f"model.layers.{i}.self_attn.{n}.weight": torch.ones(cfg.head_dim)
            for i in range(cfg.n_layer) for n in ("q_norm", "k_norm")}


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our state dict's shapes for `cfg` (a tied head omitted), without allocating the weights."""
    with torch.device("meta"):
        sd = GPT(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.shape for k, v in sd.items()}


def _check_shapes(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    want = _expected_shapes(cfg)
    missing = sorted(want.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - want.keys() - {"lm_head.weight"})
    if missing or unexpected:
        raise UserError(f"{where}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in want.items():
        if tensors[k].shape != shape:
            raise UserError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, the config needs {tuple(shape)}")


def _owned(t: torch.Tensor) -> torch.Tensor:
    # a contiguous copy: chunks of one tensor share storage, which safetensors refuses to save
    return t.clone(memory_format=torch.contiguous_format)


def state_dict_to_hf(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's tensors (a checkpoint's model.safetensors) -> the fp32 tensors of `hf_architecture(cfg)`."""
    return _to_hf(_model_type(cfg), cfg, tensors, lm_head=True)


def _to_hf(model_type: str, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], lm_head: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used = set()
    for rule in _layout(model_type, cfg, lm_head):
        if rule.bias == "flag" and not cfg.bias:
            continue  # the class's bias flag is off: it has no such tensor
        t = tensors.get(rule.ours)
        if t is None:
            if not rule.bias:
                raise UserError(f"checkpoint lacks tensor {rule.ours}")
            t = torch.zeros(tensors[rule.ours[: -len("bias")] + "weight"].shape[0])  # bias=false: a bias of zeros
        used.add(rule.ours)
        for key, piece in zip(rule.hf, rule.to_hf(t.float()), strict=True):
            out[key] = _owned(piece)
    out.update(_fixed(model_type, cfg))
    left = sorted(set(tensors) - used - {"lm_head.weight"})
    if left:
        raise UserError(f"checkpoint tensor {left[0]} has no place in {FAMILIES[model_type].causal_lm}")
    return out


# ---------------------------------------------------------------------------------------
# transformers config.json


def _hf_activation(cfg: ModelConfig, model_type: str) -> str:
    """The ACT2FN name of cfg.mlp in `model_type`'s config (see the table in the module docstring)."""
    if cfg.mlp == "swiglu":
        return "silu"
    if cfg.mlp == "gelu_tanh":
        return "gelu_new" if model_type == "gpt2" else "gelu_pytorch_tanh"
    return cfg.mlp


def hf_config(cfg: ModelConfig, *, eot_id: Optional[int] = None, pad_token_id: Optional[int] = None,
              labels: Optional[Sequence[str]] = None, bos_id: Optional[int] = None) -> dict[str, Any]:
    """The config.json of `hf_architecture(cfg)` (a `...ForSequenceClassification` when `labels` are given).

    bos_token_id is `bos_id` (an imported tokenizer's BOS), else the EOT id, as GPT-2's configs have it.

    Written for transformers 5 (rope_parameters, dtype) with the 4.x spellings beside them
    (rope_theta, rotary_pct, torch_dtype), which 5.x reads as the same values.
    """
    mt = _model_type(cfg)
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
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_base)}
    if mt == "gpt2":
        c.update(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.block_size,
                 n_inner=cfg.hidden_dim, activation_function=_hf_activation(cfg, mt), layer_norm_epsilon=cfg.eps,
                 resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                 initializer_range=cfg.init_std, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 reorder_and_upcast_attn=False, add_cross_attention=False)
    elif mt == "opt":
        c.update(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                 ffn_dim=cfg.hidden_dim, max_position_embeddings=cfg.block_size, word_embed_proj_dim=cfg.n_embd,
                 do_layer_norm_before=False, activation_function=_hf_activation(cfg, mt), enable_bias=cfg.bias,
                 layer_norm_elementwise_affine=True, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                 layerdrop=0.0, init_std=cfg.init_std)
    elif mt == "gpt_neox":
        c.update(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                 intermediate_size=cfg.hidden_dim, hidden_act=_hf_activation(cfg, mt),
                 max_position_embeddings=cfg.block_size,
                 layer_norm_eps=cfg.eps, use_parallel_residual=False, attention_bias=cfg.bias,
                 rope_parameters=dict(rope, partial_rotary_factor=1.0), rotary_pct=1.0, rotary_emb_base=rope["rope_theta"],
                 attention_dropout=cfg.dropout, hidden_dropout=cfg.dropout, initializer_range=cfg.init_std)
    else:  # llama, arcee, qwen3
        c.update(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                 num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim,
                 hidden_act=_hf_activation(cfg, mt), max_position_embeddings=cfg.block_size,
                 rms_norm_eps=cfg.eps, rope_parameters=rope, rope_theta=rope["rope_theta"],
                 attention_bias=cfg.bias, attention_dropout=cfg.dropout, initializer_range=cfg.init_std)
        if cfg.rope_scaling == "llama3":
            # 5.x reads rope_parameters (rope_scaling first when both are there: the same values), 4.x rope_scaling
            scaling = {"rope_type": "llama3"} | {key: getattr(cfg, ours) for key, ours in LLAMA3_ROPE.items()}
            rope.update(scaling)
            c["rope_scaling"] = scaling
        if mt == "qwen3":  # (no mlp_bias: Qwen3's MLP never has biases)
            c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                     layer_types=["full_attention"] * cfg.n_layer)
        else:
            c["mlp_bias"] = cfg.bias
        if mt == "llama":
            c["pretraining_tp"] = 1
    if labels:
        c.update(id2label={str(i): lab for i, lab in enumerate(labels)}, label2id={lab: i for i, lab in enumerate(labels)},
                 num_labels=len(labels), problem_type="single_label_classification")
    return c


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------
# Export


def _check_out(out: Path, force: bool, source: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} already exists and is not empty: pass --force to replace it")
        if not out.is_dir():
            raise UserError(f"{out} is a file, not a directory")
        src, dst = source.resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise UserError(f"{out} holds the source {source}: replacing it would delete what is being converted")


def _fold_head_bias(cfg: ModelConfig, tensors: dict[str, torch.Tensor], weight: torch.Tensor,
                    bias: torch.Tensor, arch: str) -> None:
    """Move the head's bias c into the final norm's bias b: find d with W d = c, then b += d.

    The final norm feeds only the score layer in a ...ForSequenceClassification, so
    W (norm(x) * g + b + d) = W (norm(x) * g + b) + c exactly (to float rounding).
    """
    if not bias.any():
        return
    if cfg.norm != "layernorm":
        raise UserError(f"{arch}'s score layer has no bias and an RMSNorm has none to fold the classifier head's "
                        "bias into; only a head with a zero bias exports")
    key = "transformer.ln_f.bias" if cfg.norm_placement == "pre" else f"transformer.h.{cfg.n_layer - 1}.ln_2.bias"
    w, c = weight.double(), bias.double()
    d = torch.linalg.pinv(w) @ c  # the smallest d with W d = c when W has full row rank
    if (w @ d - c).abs().max() > 1e-6 * max(1.0, c.abs().max().item()):
        raise UserError("the classifier head's weight is rank-deficient: its bias cannot be folded into the final "
                        f"norm, and {arch}'s score layer has no bias")
    base = tensors.get(key, torch.zeros(cfg.n_embd))
    tensors[key] = (base.double() + d).float()


def _add_pad_token(tokenizer_json: bytes, pad_id: int) -> bytes:
    """tokenizer.json with `<pad>` added as a special token at `pad_id` (one past the vocabulary)."""
    spec = json.loads(tokenizer_json)
    spec.setdefault("added_tokens", []).append({"id": pad_id, "content": PAD, "single_word": False, "lstrip": False,
                                                "rstrip": False, "normalized": False, "special": True})
    return (json.dumps(spec, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, which: str = "best",
                      force: bool = False) -> Path:
    """Write a transformers model folder for a checkpoint (or a run dir: its `which` checkpoint). Returns `out`.

    The folder holds config.json, model.safetensors, generation_config.json (language
    models), tokenizer.json, tokenizer_config.json, special_tokens_map.json and a README.md
    model card. It is built under a temporary name and renamed into place.
    """
    for d in (Path(ckpt), Path(ckpt) / which):
        if (d / ADAPTER_FILE).is_file() and not (d / MODEL_FILE).is_file():
            raise UserError(f"{d} holds a LoRA adapter, not full weights: merge it first (scratchgpt merge-lora)")
    ckpt, out = resolve_checkpoint(Path(ckpt), which), Path(out)
    _check_out(out, force, ckpt)
    state = verify_checkpoint(ckpt)
    config = read_json(ckpt / CONFIG_FILE)
    cfg = _model_config(config["model"], where=str(ckpt / CONFIG_FILE))
    classifier = config.get("classifier")
    arch = hf_architecture(cfg, classifier.get("pooling", "last") if classifier else None)
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    tensors = {k: v.float() for k, v in load_tensors(ckpt / MODEL_FILE).items()}
    _check_shapes(cfg, tensors, str(ckpt / MODEL_FILE))
    eot, labels = tokenizer.eot_id, None
    bos = tokenizer.bos_ids[0] if tokenizer.bos_ids else None
    files = {"tokenizer.json": (ckpt / TOKENIZER_FILE).read_bytes()}
    special = {"bos_token": EOT, "eos_token": EOT} if eot is not None else {}
    if tokenizer.unk_id is not None:
        special["unk_token"] = UNK
    if classifier:
        labels = list(classifier["labels"])
        head = load_tensors(ckpt / HEAD_FILE)
        hf_tensors, hf_cfg, special["pad_token"] = _classifier_export(cfg, tensors, head, labels, tokenizer, arch,
                                                                      files)
        n_params = sum(t.numel() for k, t in tensors.items() if k != "lm_head.weight")
        n_params += sum(t.numel() for t in head.values())
    else:
        hf_tensors, hf_cfg = _to_hf(_model_type(cfg), cfg, tensors, lm_head=True), hf_config(cfg, eot_id=eot, bos_id=bos)
        n_params = sum(t.numel() for t in tensors.values())
        gen = {"bos_token_id": eot if bos is None else bos, "eos_token_id": eot, "pad_token_id": eot} \
            if eot is not None else {}
        files["generation_config.json"] = _json_bytes(gen)
    files["config.json"] = _json_bytes(hf_cfg)
    if tokenizer.kind == "hf":
        # an imported tokenizer goes back as it came (tokenizer_config.json holds its special tokens, it or
        # chat_template.jinja its chat template); only a classifier's pad token is added
        files.update(tokenizer.side_files)
        hf_tok = files.get(HF_CONFIG_FILE) or \
            _json_bytes({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size})
        if "pad_token" in special:
            hf_tok = _json_bytes(dict(json.loads(hf_tok), pad_token=special["pad_token"]))
        files[HF_CONFIG_FILE] = hf_tok
    else:
        files["tokenizer_config.json"] = _json_bytes(dict(
            special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=cfg.block_size,
            clean_up_tokenization_spaces=False, split_special_tokens=True))
        files["special_tokens_map.json"] = _json_bytes(special)
    files["README.md"] = _model_card(ckpt, out, config, state, cfg, arch, n_params, tokenizer, labels).encode("utf-8")
    _write_folder(out, hf_tensors, files)
    return out


def _classifier_export(cfg: ModelConfig, tensors: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                       labels: list[str], tokenizer: Tokenizer, arch: str,
                       files: dict[str, bytes]) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, config.json, pad token) of a ...ForSequenceClassification; may add <pad> to files["tokenizer.json"]."""
    if head["weight"].shape != (len(labels), cfg.n_embd):
        raise UserError(f"{HEAD_FILE}: weight shape {tuple(head['weight'].shape)} does not match "
                        f"{len(labels)} labels x n_embd {cfg.n_embd}")
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # the head reads hidden states, not logits
    _fold_head_bias(cfg, tensors, head["weight"].float(), head["bias"].float(), arch)
    eot = tokenizer.eot_id
    if eot is not None:  # our encoder never emits <|endoftext|> (an eos) for text, so it never ends a real row
        pad, pad_token = eot, tokenizer.eot_token
    else:  # a char vocabulary: every id is a character, so add a <pad> id with a zero embedding row
        pad, pad_token = cfg.vocab_size, PAD
        wte = tensors["transformer.wte.weight"]
        tensors["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(1, cfg.n_embd)])
        cfg = replace(cfg, vocab_size=cfg.vocab_size + 1)
        files["tokenizer.json"] = _add_pad_token(files["tokenizer.json"], pad)
    hf_tensors = _to_hf(_model_type(cfg), cfg, tensors, lm_head=False)
    hf_tensors["score.weight"] = _owned(head["weight"].float())
    return hf_tensors, hf_config(cfg, eot_id=eot, pad_token_id=pad, labels=labels), pad_token


def _write_folder(out: Path, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
    """model.safetensors and `files` into a temporary sibling of `out`, renamed to `out` once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        atomic_write(tmp / "model.safetensors", lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _run_metrics(ckpt: Path, state: dict) -> tuple[Optional[float], Optional[float], str]:
    """(val loss, perplexity, where they come from), the most telling record first: `scratchgpt eval`'s
    eval-lm.json, the final whole-split eval (result.json), a fine-tuned checkpoint's own eval on its
    val file (state.json), then the best periodic estimate."""
    runs = (ckpt, ckpt.parent)
    for d in runs:
        path = d / "eval-lm.json"
        if path.is_file():
            r = read_json(path)
            if r.get("val_loss") is not None:
                return r["val_loss"], r.get("perplexity"), f"`scratchgpt eval` ({path.name}, {r.get('split', 'val')})"
        path = d / "result.json"
        if path.is_file():
            r = read_json(path)
            if r.get("final_val_loss") is not None:
                return r["final_val_loss"], r.get("final_perplexity"), "final evaluation on the whole val split (result.json)"
    val = state.get("val") or {}
    if val.get("val_loss") is not None:
        return val["val_loss"], None, "this checkpoint on the fine-tuning val file (state.json)"
    for d in runs:
        path = d / "result.json"
        if path.is_file() and read_json(path).get("best_val_loss") is not None:
            return read_json(path)["best_val_loss"], None, "best periodic val estimate (result.json)"
    return state.get("best_val_loss"), None, "best periodic val estimate (state.json)"


def _training_lines(ckpt: Path, config: dict, state: dict, labels: Optional[list[str]]) -> list[str]:
    """The model card's "Training" section: data, tokens, val loss, the command, the fine-tune."""
    imported = config.get("imported_from")
    loss, ppl, source = _run_metrics(ckpt, state)
    command = config.get("command")
    if isinstance(command, list):
        command = " ".join(map(str, command))
    ft = config.get("finetune") or {}
    lines = ["## Training", ""]
    if imported:
        lines.append(f"- imported from `{imported.get('path')}` ({imported.get('architecture')}); "
                     "its training history is not recorded here")
    lines += [
        f"- data: `{config.get('data')}`" if config.get("data") else "- data: not recorded",
        f"- tokens seen: {state.get('tokens', 0):,} in {state.get('step', 0):,} steps",
    ]
    if ft:
        lora = ft.get("lora") or {}
        lines.append(f"- fine-tuned ({ft.get('task', 'finetune')}"
                     + (f", LoRA r={lora.get('r')} alpha={lora.get('lora_alpha')}" if lora else "")
                     + (", LoRA merged into the weights" if ft.get("merged_from") else "")
                     + f") from `{ft.get('base')}`"
                     + (f" on `{ft['train_file']}` (val: `{ft.get('val_file')}`)" if ft.get("train_file") else ""))
    val = state.get("val") or {}
    if labels and val.get("accuracy") is not None:  # a classifier's loss is over labels: no perplexity
        lines.append(f"- val accuracy: {val['accuracy']:.4f}, macro-F1 {val.get('macro_f1', float('nan')):.4f}, "
                     f"loss {val.get('val_loss', float('nan')):.4f} (this checkpoint on the fine-tuning val file)")
    elif loss is not None:
        ppl = ppl if ppl is not None else math.exp(min(loss, 700))
        lines.append(f"- val loss: {loss:.4f} nats/token (perplexity {ppl:.2f}); source: {source}")
    else:
        lines.append("- val loss: not recorded")
    lines.append(f"- command: `{command}`" if command else "- command: not recorded")
    if labels:
        lines.append(f"- classifier labels: {', '.join(labels)} (pooling: last token)")
    return lines


def _model_card(ckpt: Path, out: Path, config: dict, state: dict, cfg: ModelConfig, arch: str, n_params: int,
                tokenizer: Tokenizer, labels: Optional[list[str]]) -> str:
    merged_from = Path((config.get("finetune") or {}).get("merged_from") or "")
    if merged_from.name and (merged_from / STATE_FILE).is_file():
        # a merged LoRA run (merge-lora, or export's merge into a temporary run): the LoRA run's name and record
        ckpt, state = merged_from, read_json(merged_from / STATE_FILE)
    name = ckpt.parent.name if ckpt.name in ("best", "latest") else out.name
    pipeline = "text-classification" if labels else "text-generation"
    auto = "AutoModelForSequenceClassification" if labels else "AutoModelForCausalLM"
    kind = {"char": "character-level", "bpe": "byte-level BPE", "hf": "the imported model's own"}[tokenizer.kind]
    mlp = f"{cfg.mlp}, hidden {cfg.hidden_dim}"
    heads = f"{cfg.n_head} ({cfg.kv_heads} key/value)" if cfg.kv_heads != cfg.n_head else str(cfg.n_head)
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline}",
        f"tags: [scratchgpt, {FAMILIES[_model_type(cfg)].model_type}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A small GPT trained from scratch with scratchgpt, exported as a stock `{arch}`: it loads with "
        f"`{auto}.from_pretrained` (no `trust_remote_code`) and computes what scratchgpt computes "
        "(fp32 logits within 1e-4).",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{arch}` |",
        f"| parameters | {_human(n_params)} ({n_params:,}) |",
        f"| layers / heads / width | {cfg.n_layer} / {heads} / {cfg.n_embd} |",
        f"| context | {cfg.block_size} tokens |",
        f"| positions / norm / MLP | {cfg.pos} / {cfg.norm} ({cfg.norm_placement}{', qk norm' * cfg.qk_norm}) / {mlp} |",
        f"| biases / tied embeddings | {'yes' if cfg.bias else 'no'} / {'yes' if cfg.tie_embeddings else 'no'} |",
        f"| tokenizer | {kind}, {tokenizer.vocab_size} tokens |",
        "",
        *_training_lines(ckpt, config, state, labels),
    ]
    lines += ["", "## Usage", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{out.name}")',
              f'model = {auto}.from_pretrained("{out.name}")']
    if labels:
        lines += ['batch = tokenizer(["some text"], return_tensors="pt", padding=True)',
                  "label = model.config.id2label[model(**batch).logits.argmax(-1).item()]"]
    else:
        lines += ['ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
                  "out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=50)",
                  "print(tokenizer.decode(out[0]))"]
    lines += ["```", ""]
    if tokenizer.kind == "hf" and tokenizer.eot_id is not None:
        lines += [f"`{tokenizer.eot_token}` (id {tokenizer.eot_id}) is the eos token; scratchgpt encodes special-token "
                  "strings inside text as plain characters (transformers' `split_special_tokens=True`).", ""]
    elif tokenizer.eot_id is not None:
        lines += [f"`{EOT}` (id {tokenizer.eot_id}) is the bos/eos token. As in scratchgpt, that string inside text is "
                  "encoded as plain characters (`split_special_tokens`); append `tokenizer.eos_token_id` to end a "
                  "document.", ""]
    if labels and tokenizer.eot_id is None:
        lines += [f"`{PAD}` (id {cfg.vocab_size}) was added as the padding token, with a zero embedding: "
                  "the classifier pools the last token that is not padding.", ""]
    return "\n".join(lines + _limits_lines(cfg))


def _limits_lines(cfg: ModelConfig) -> list[str]:
    return [
        "## Intended use and limits",
        "",
        "An educational and experimental model: small, trained on a small corpus, for studying how language "
        "models train and behave. It produces fluent-looking but unreliable text: it has no knowledge beyond its "
        "training data, makes up facts, and has had no safety tuning. Do not use it for decisions about people "
        "or for anything that needs correct output. It sees at most "
        f"{cfg.block_size} tokens"
        + (" (learned positions: longer input is an error)" if cfg.pos == "learned" else
           " (RoPE runs past that, but it was not trained there)") + ".",
        "",
    ]


# ---------------------------------------------------------------------------------------
# LoRA adapters: a PEFT adapter folder over the exported base


PEFT_PREFIX = "base_model.model."  # the prefix of every key PEFT saves (PeftModel.base_model.model is the model)
_UNSUPPORTED_LORA = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                     "exclude_modules", "layer_replication", "trainable_token_indices", "target_parameters",
                     "fan_in_fan_out")  # options scratchgpt never sets, each of which changes what the tensors mean


def adapter_to_hf(cfg: ModelConfig, adapter_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  base_model_name_or_path: str = "base") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A scratchgpt LoRA adapter (PEFT keys over our module names) -> (adapter_config.json, tensors) of the
    same adapter over `hf_architecture(cfg)`'s modules.

    LoRA adds s * B @ A to a Linear's weight W (out, in). Where a family splits or permutes
    W's rows (q/k/v, gate/up, GPT-NeoX's per-head qkv), B's rows are split or permuted the
    same way and every part keeps A: delta W_q = s B_q A. GPT-2's Conv1D stores W transposed;
    its A and B stay as they are and fan_in_fan_out=true tells PEFT to transpose the delta.
    """
    mt = _model_type(cfg)
    arch = FAMILIES[mt].causal_lm
    if adapter_config.get("peft_type", "LORA") != "LORA" or adapter_config.get("bias", "none") != "none":
        raise UserError(f"adapter_config.json: peft_type={adapter_config.get('peft_type')!r}, "
                        f"bias={adapter_config.get('bias')!r}: only LoRA without trained biases exports as an adapter")
    odd = [k for k in _UNSUPPORTED_LORA if adapter_config.get(k)]
    if odd:
        raise UserError(f"adapter_config.json: {odd[0]}={adapter_config[odd[0]]!r} is not supported in an adapter "
                        "export; export the run merged")
    for key in ("r", "lora_alpha"):
        if key not in adapter_config:
            raise UserError(f"adapter_config.json: missing {key}")
    targets = {r.ours.removesuffix(".weight"): r for r in _layout(mt, cfg) if r.ours.startswith("transformer.h.")
               and r.ours.endswith(".weight") and r.ours.split(".")[-2] in LORA_TARGETS}
    out: dict[str, torch.Tensor] = {}
    found: dict[str, set[str]] = {}
    for key, t in tensors.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        rule = targets.get(module)
        if not (key.startswith(PEFT_PREFIX) and key.endswith(".weight") and part in ("lora_A", "lora_B") and rule):
            raise UserError(f"adapter tensor {key} has no place in {arch}")
        names = [n.removesuffix(".weight") for n in rule.hf]
        if part == "lora_A":  # the input side, shared by every part of a split weight
            pieces = [t] * len(names)
        else:  # the output side: B's rows go where W's rows go
            pieces = [t] if rule.to_hf is _transpose else rule.to_hf(t)
        for name, piece in zip(names, pieces, strict=True):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = _owned(piece)
        found.setdefault(module, set()).add(part)
    if not found:
        raise UserError("adapter_model.safetensors holds no LoRA tensors")
    hf_targets = sorted({k.removeprefix(PEFT_PREFIX).split(".")[-3] for k in out})
    for module, rule in targets.items():  # PEFT matches target_modules by name: each match needs its A and B
        if found.get(module) != {"lora_A", "lora_B"} and any(n.split(".")[-2] in hf_targets for n in rule.hf):
            raise UserError(f"adapter_model.safetensors lacks lora_A or lora_B of {module}")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "inference_mode": True, "r": int(adapter_config["r"]), "lora_alpha": adapter_config["lora_alpha"],
              "lora_dropout": adapter_config.get("lora_dropout", 0.0),
              "use_rslora": bool(adapter_config.get("use_rslora", False)), "target_modules": hf_targets,
              "bias": "none", "fan_in_fan_out": mt == "gpt2", "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True}
    return config, out


def _adapter_base(ckpt: Path, finetune: Mapping[str, Any], base: Optional[str | os.PathLike]) -> Path:
    """The base checkpoint a LoRA run was trained on (its recorded path, or `base`), checked by weights sha256."""
    recorded = finetune.get("base")
    if base is None and not recorded:
        raise UserError(f"{ckpt}: LoRA run without a recorded base; pass base=PATH (--base)")
    path = Path(base if base is not None else recorded)
    if base is None and not path.exists():
        raise UserError(f"{ckpt}: its base {path} is gone; pass base=PATH (--base) with a copy of it")
    base_ckpt = resolve_checkpoint(path, "best")
    want = finetune.get("base_sha256")
    if want and want != weights_sha256(base_ckpt):
        raise UserError(f"{ckpt}: this adapter was trained on a different base ({recorded}, weights sha256 "
                        f"{want[:12]}...); {base_ckpt} has {weights_sha256(base_ckpt)[:12]}...")
    return base_ckpt


def export_adapter(ckpt: str | os.PathLike, out: str | os.PathLike, *, which: str = "best", force: bool = False,
                   base: Optional[str | os.PathLike] = None) -> Path:
    """Write a LoRA run (or its `which` checkpoint) as a PEFT adapter folder `out` over its base exported
    in `out/base` (with export_checkpoint). Returns `out`.

        base = AutoModelForCausalLM.from_pretrained("out/base")
        model = PeftModel.from_pretrained(base, "out")

    computes what `load_run(run).model` computes (fp32 logits within 1e-4). adapter_config.json
    names the base "base", relative: PEFT resolves that against the working directory, not
    against `out`, so load the base explicitly as above. `base` overrides the base path the run
    records (when it moved). A classifier's LoRA run is refused: export it merged.
    """
    ckpt, out = resolve_checkpoint(Path(ckpt), which), Path(out)
    if not (ckpt / ADAPTER_FILE).is_file():
        raise UserError(f"{ckpt} holds full weights, not a LoRA adapter: export it as a model (without --adapter)")
    state = verify_checkpoint(ckpt)
    config = read_json(ckpt / CONFIG_FILE)
    if config.get("classifier"):
        raise UserError(f"{ckpt} is a LoRA classification run: PEFT's causal-LM adapter has no place for its head; "
                        "export it merged (without --adapter)")
    base_ckpt = _adapter_base(ckpt, config.get("finetune") or {}, base)
    _check_out(out, force, ckpt)
    _check_out(out, force, base_ckpt)
    base_config = read_json(base_ckpt / CONFIG_FILE)
    if base_config.get("classifier"):
        raise UserError(f"{ckpt}: its base {base_ckpt} is a classification run; only a language-model base exports "
                        "with an adapter")
    cfg = _model_config(base_config["model"], where=str(base_ckpt / CONFIG_FILE))
    adapter_config = read_json(ckpt / ADAPTER_CONFIG_FILE)
    hf_adapter_config, tensors = adapter_to_hf(cfg, adapter_config, load_tensors(ckpt / ADAPTER_FILE))
    n_params = sum(t.numel() for t in tensors.values())
    card = _adapter_card(ckpt, out, config, state, cfg, hf_adapter_config, n_params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        export_checkpoint(base_ckpt, tmp / "base")
        atomic_write(tmp / "adapter_model.safetensors",
                     lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        atomic_write_bytes(tmp / "adapter_config.json", _json_bytes(hf_adapter_config))
        atomic_write_bytes(tmp / "README.md", card.encode("utf-8"))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _adapter_card(ckpt: Path, out: Path, config: dict, state: dict, cfg: ModelConfig, adapter: dict,
                  n_params: int) -> str:
    name = ckpt.parent.name if ckpt.name in ("best", "latest") else out.name
    arch = hf_architecture(cfg)
    scale = "alpha/sqrt(r)" if adapter["use_rslora"] else "alpha/r"
    lines = [
        "---",
        "library_name: peft",
        "pipeline_tag: text-generation",
        f"tags: [scratchgpt, lora, {_model_type(cfg)}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A LoRA adapter trained with scratchgpt, as a PEFT adapter over `base/`: the base model it was "
        f"fine-tuned from, exported as a stock `{arch}` (with its tokenizer and its own model card). "
        "Base plus adapter compute what scratchgpt computes with the adapter applied (fp32 logits within 1e-4).",
        "",
        "## Adapter",
        "",
        "| | |",
        "|---|---|",
        f"| base | `base/` (`{arch}`; {cfg.n_layer} layers, width {cfg.n_embd}) |",
        f"| rank r / lora_alpha / scale | {adapter['r']} / {adapter['lora_alpha']} / {scale} |",
        f"| target modules | {', '.join(adapter['target_modules'])} |",
        f"| adapter parameters | {_human(n_params)} ({n_params:,}) |",
        "",
        *_training_lines(ckpt, config, state, None),
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}/base")',
        f'base = AutoModelForCausalLM.from_pretrained("{out.name}/base")',
        f'model = PeftModel.from_pretrained(base, "{out.name}")',
        "# model = model.merge_and_unload()  # optional: plain weights, faster",
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        "out = model.generate(input_ids=ids, max_new_tokens=100, do_sample=True, top_k=50)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
        "adapter_config.json names its base `base`, a relative path: `AutoPeftModelForCausalLM` would look for "
        "it in the working directory, so load the base explicitly as above.",
        "",
    ]
    if config.get("chat_template"):
        lines += ["Fine-tuned on prompts in this scratchgpt chat template (`{prompt}` is the user's message); format "
                  "prompts the same way:", "", "```json", json.dumps(config["chat_template"], indent=2,
                                                                       ensure_ascii=False), "```", ""]
    return "\n".join(lines + _limits_lines(cfg))


# ---------------------------------------------------------------------------------------
# Import


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0][:200]})") from None


def read_hf_folder(hf_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, every tensor as fp32) of a transformers folder: model.safetensors or a sharded index.

    fp16 and bf16 weights are widened to fp32 (exact). pytorch_model.bin is refused: it is a
    pickle, and unpickling a file can run arbitrary code.
    """
    d = Path(hf_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such directory")
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json (not a transformers model folder)")
    try:
        hf_cfg = read_json(d / "config.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        files, expected = ["model.safetensors"], None
    elif index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        files, expected = sorted(set(weight_map.values())), set(weight_map)
        for f in files:
            if Path(f).name != f or not (d / f).is_file():
                raise UserError(f"{index}: shard {f!r} is missing from {d}")
    elif any(d.glob("pytorch_model*.bin")):
        raise UserError(f"{d} holds only pytorch_model.bin, a pickle: loading it means unpickling, which can run "
                        "arbitrary code; convert it to safetensors with transformers (save_pretrained) and import that")
    else:
        raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_safetensors(d / f)
        clash = tensors.keys() & part.keys()
        if clash:
            raise UserError(f"{d / f}: tensor {min(clash)} also appears in another shard")
        tensors.update(part)
    if expected is not None and expected != set(tensors):
        diff = sorted(expected ^ set(tensors))
        raise UserError(f"{index}: the index and the shards disagree about {diff[0]}")
    return hf_cfg, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _get(c: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    if key in c and c[key] is not None:
        return c[key]
    if default is ...:
        raise UserError(f"config.json: missing {key}")
    return default


def _expect(c: Mapping[str, Any], key: str, want: Any, default: Any, why: str) -> None:
    value = _get(c, key, default)
    if value != want:
        raise UserError(f"config.json: {key}={value!r} has no scratchgpt equivalent ({why})")


def _activation(c: Mapping[str, Any], key: str, default: str) -> str:
    act = _get(c, key, default)
    if act in ACTIVATIONS:
        return ACTIVATIONS[act]
    raise UserError(f"config.json: {key}={act!r} has no scratchgpt equivalent (scratchgpt's plain MLPs take "
                    f"{', '.join(ACTIVATIONS)})")


def _rope(c: Mapping[str, Any], partial_default: float, scaled: bool = False) -> dict[str, Any]:
    """ModelConfig's rope fields: rope_base (rope_theta) of RoPE over whole heads and, where `scaled` (the
    Llama/Arcee/Qwen3 classes), Llama 3's frequency scaling; other scaling and partial RoPE are refused."""
    params = dict(c.get("rope_scaling") or {}) | dict(c.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {}
    if kind == "llama3" and scaled:
        # transformers takes a top-level original_max_position_embeddings first, then max_position_embeddings
        for context in (c.get("original_max_position_embeddings"), params.get("original_max_position_embeddings"),
                        c.get("max_position_embeddings")):
            if context is not None:
                params["original_max_position_embeddings"] = context
                break
        for key, ours in LLAMA3_ROPE.items():
            value = params.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"config.json: rope_type 'llama3' needs a number for {key}, got {value!r}")
            out[ours] = value if ours == "rope_original_context" else float(value)
        out["rope_scaling"] = "llama3"
    elif kind != "default":
        raise UserError(f"config.json: rope_type={kind!r} (scaled RoPE) has no scratchgpt equivalent: model.pos=rope "
                        "is plain RoPE" + (" or Llama 3's (rope_type llama3)" if scaled else ""))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", partial_default)))
    if partial != 1:
        raise UserError(f"config.json: partial_rotary_factor={partial} (RoPE on part of each head) has no scratchgpt "
                        "equivalent: model.pos=rope rotates whole heads")
    return out | {"rope_base": float(params.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0))))}


def _model_type_of(c: Mapping[str, Any]) -> str:
    mt = c.get("model_type")
    if mt not in FAMILIES:
        raise UserError(f"config.json: model_type {mt!r} is not supported; scratchgpt imports {', '.join(FAMILIES)}")
    arch = (c.get("architectures") or [FAMILIES[mt].causal_lm])[0]
    if arch != FAMILIES[mt].causal_lm:
        raise UserError(f"config.json: architecture {arch} is not supported; scratchgpt imports the causal LM "
                        f"{FAMILIES[mt].causal_lm}")
    return mt


def _model_config(kwargs: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def _norm_eps(c: Mapping[str, Any], mt: str, norm: str) -> Optional[float]:
    """model.norm_eps from the family's eps key: None where it is our default for `norm`, so configs
    (and export -> import -> export) stay as they were."""
    key, default = NORM_EPS_KEYS[mt]
    eps = _get(c, key, default) if key else default
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise UserError(f"config.json: {key}={eps!r} must be a positive number")
    return None if float(eps) == (RMSNORM_EPS if norm == "rmsnorm" else LAYERNORM_EPS) else float(eps)


QWEN3_BIAS = ("config.json: attention_bias=true (a Qwen3 with q/k/v/o biases) has no scratchgpt equivalent: "
              "model.qk_norm models have no biases, as Qwen3's MLP has none")


def config_from_hf(hf_config: Mapping[str, Any], tensors: Optional[Mapping[str, torch.Tensor]] = None) -> ModelConfig:
    """Our ModelConfig for a transformers config.json (any model_type of FAMILIES), or a one-line UserError.

    `tensors` settles `bias` where the config cannot: with no linear-bias flag set, a
    model whose bias tensors are all zero imports as bias=false (same math). Without
    tensors, biases the class always has count as present.
    """
    c = hf_config
    mt = _model_type_of(c)
    if mt == "gpt2":
        for key, want, default in (("scale_attn_weights", True, True), ("scale_attn_by_inverse_layer_idx", False, False),
                                   ("add_cross_attention", False, False)):
            _expect(c, key, want, default, "scratchgpt's attention is plain scaled self-attention")
        n_embd = _get(c, "n_embd")
        kw = dict(pos="learned", norm="layernorm", norm_placement="pre", mlp=_activation(c, "activation_function", "gelu_new"),
                  block_size=_get(c, "n_positions", 1024), n_layer=_get(c, "n_layer"), n_head=_get(c, "n_head"),
                  n_embd=n_embd, mlp_hidden=_get(c, "n_inner", 4 * n_embd), dropout=_get(c, "resid_pdrop", 0.1),
                  init_std=_get(c, "initializer_range", 0.02))
        flag = False  # GPT-2 has every bias, always
    elif mt == "opt":
        pre = _get(c, "do_layer_norm_before", True)
        if pre:
            _expect(c, "_remove_final_layer_norm", False, False, "a pre-norm scratchgpt model ends with a final norm")
        n_embd = _get(c, "hidden_size")
        _expect(c, "word_embed_proj_dim", n_embd, n_embd, "scratchgpt has no embedding projection")
        _expect(c, "layer_norm_elementwise_affine", True, True, "scratchgpt's LayerNorms have a weight")
        kw = dict(pos="learned", norm="layernorm", norm_placement="pre" if pre else "post",
                  mlp=_activation(c, "activation_function", "relu"), block_size=_get(c, "max_position_embeddings", 2048),
                  n_layer=_get(c, "num_hidden_layers"), n_head=_get(c, "num_attention_heads"), n_embd=n_embd,
                  mlp_hidden=_get(c, "ffn_dim"), dropout=_get(c, "dropout", 0.1), init_std=_get(c, "init_std", 0.02))
        flag = _get(c, "enable_bias", True)
    elif mt == "gpt_neox":
        _expect(c, "use_parallel_residual", False, True, "scratchgpt's blocks are sequential: x + attn, then + mlp")
        kw = dict(pos="rope", **_rope(c, partial_default=0.25), norm="layernorm", norm_placement="pre",
                  mlp=_activation(c, "hidden_act", "gelu"), block_size=_get(c, "max_position_embeddings", 2048),
                  n_layer=_get(c, "num_hidden_layers"), n_head=_get(c, "num_attention_heads"),
                  n_embd=_get(c, "hidden_size"), mlp_hidden=_get(c, "intermediate_size"),
                  dropout=_get(c, "hidden_dropout", 0.0), init_std=_get(c, "initializer_range", 0.02))
        flag = _get(c, "attention_bias", True)
    else:  # llama, arcee, qwen3
        n_embd, n_head = _get(c, "hidden_size"), _get(c, "num_attention_heads")
        kv = _get(c, "num_key_value_heads", n_head)
        if type(kv) is not int or kv < 1 or n_head % kv:
            raise UserError(f"config.json: num_key_value_heads={kv!r} must be a positive integer that divides "
                            f"num_attention_heads={n_head}")
        _expect(c, "head_dim", n_embd // n_head, 128 if mt == "qwen3" else n_embd // n_head,
                "scratchgpt's head_dim is n_embd / n_head")
        if mt == "qwen3":
            _expect(c, "use_sliding_window", False, False, "scratchgpt's attention sees the whole context")
            layer_types = set(_get(c, "layer_types", ["full_attention"]))
            if layer_types != {"full_attention"}:
                raise UserError(f"config.json: layer_types {sorted(layer_types)} has no scratchgpt equivalent (every "
                                "layer attends to the whole context)")
        if mt != "arcee":
            act = _get(c, "hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise UserError(f"config.json: hidden_act={act!r} in {FAMILIES[mt].causal_lm}'s gated MLP has no "
                                "scratchgpt equivalent (model.mlp=swiglu is SiLU-gated)")
            mlp = "swiglu"
        else:
            mlp = _activation(c, "hidden_act", "relu2")
        kw = dict(pos="rope", **_rope(c, partial_default=1.0, scaled=True), norm="rmsnorm", norm_placement="pre",
                  mlp=mlp, qk_norm=mt == "qwen3", n_layer=_get(c, "num_hidden_layers"), n_head=n_head, n_embd=n_embd,
                  n_kv_head=kv if kv != n_head else None,
                  block_size=_get(c, "max_position_embeddings", {"llama": 2048, "arcee": 4096, "qwen3": 32768}[mt]),
                  mlp_hidden=_get(c, "intermediate_size"), dropout=_get(c, "attention_dropout", 0.0),
                  init_std=_get(c, "initializer_range", 0.02))
        flag = mt != "qwen3" and (_get(c, "attention_bias", False) or _get(c, "mlp_bias", False))
    tied = _get(c, "tie_word_embeddings", FAMILIES[mt].tied_default)
    cfg = _model_config(dict(kw, vocab_size=_get(c, "vocab_size"), tie_embeddings=bool(tied), bias=True,
                             dropout=float(kw["dropout"]), norm_eps=_norm_eps(c, mt, kw["norm"])))
    if flag:
        return cfg
    bias_rules = [r for r in _layout(mt, cfg) if r.bias]
    if mt == "qwen3" and tensors is None and _get(c, "attention_bias", False):
        raise UserError(QWEN3_BIAS)  # (with the tensors, biases that are all zero import as bias=false)
    if tensors is None:
        return replace(cfg, bias=any(r.bias == "always" for r in bias_rules))
    tensors = _canonical_keys(mt, tensors)
    nonzero = any(tensors[k].any() for r in bias_rules for k in r.hf if k in tensors)
    if mt == "qwen3" and nonzero:
        raise UserError(QWEN3_BIAS)
    return replace(cfg, bias=bool(nonzero))


# the prefix every transformers key of a causal LM starts with; a bare base model's keys lack it
_PREFIX = {"gpt2": "transformer.", "opt": "model.", "gpt_neox": "gpt_neox.", "llama": "model.", "arcee": "model.",
           "qwen3": "model."}
# buffers older checkpoints saved beside the weights: causal masks (checked, then dropped) and RoPE frequencies
_MASKS = {"gpt2": (".attn.bias", ".attn.masked_bias"), "gpt_neox": (".attention.bias", ".attention.masked_bias")}
_IGNORED_SUFFIXES = (".inv_freq",)


def _is_mask_buffer(model_type: str, key: str, t: torch.Tensor) -> bool:
    """Whether `key` is one of the causal-mask buffers old GPT-2 / GPT-NeoX files hold, with the value that
    makes it our causal attention; a buffer of that name with another value is a UserError."""
    if model_type not in _MASKS:
        return False
    mask, fill = _MASKS[model_type]
    if key.endswith(mask):
        n = t.shape[-1] if t.dim() >= 2 else 0
        if t.dim() >= 2 and t.shape[-2] == n and t.numel() == n * n and torch.equal(
                t.reshape(n, n).float(), torch.ones(n, n).tril()):
            return True
        raise UserError(f"tensor {key} is not a lower-triangular causal mask: scratchgpt's attention is plain causal "
                        "attention (a model with a modified mask cannot be represented)")
    if key.endswith(fill):
        # the score masked positions get: any value this low has zero weight after softmax, as in ours
        if t.numel() == 1 and t.is_floating_point() and t.item() <= -1e4:
            return True
        raise UserError(f"tensor {key} is {t.flatten()[:3].tolist()}, not a masking value <= -1e4: masked positions "
                        "would take part in attention")
    return False


def _canonical_keys(model_type: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = _PREFIX[model_type]
    out = {}
    bare = not any(k.startswith(prefix) for k in tensors)
    for k, v in tensors.items():
        if model_type == "gpt_neox" and k == "embed_out.weight":
            k = "lm_head.weight"  # transformers < 5 named GPT-NeoX's head embed_out
        elif bare and k != "lm_head.weight":
            k = prefix + k
        out[k] = v
    return out


def state_dict_from_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                       cfg: Optional[ModelConfig] = None) -> dict[str, torch.Tensor]:
    """Our model's fp32 state dict (tied head omitted) from a transformers model's tensors."""
    mt = _model_type_of(hf_config)
    cfg = cfg or config_from_hf(hf_config, tensors)
    tensors = _canonical_keys(mt, tensors)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for rule in _layout(mt, cfg):
        used.update(k for k in rule.hf if k in tensors)
        if rule.bias and not cfg.bias:
            continue  # absent, or all zero (config_from_hf checked): our model has no such tensor
        pieces = []
        for key in rule.hf:
            if key in tensors:
                t = tensors[key]
                if not t.is_floating_point():
                    raise UserError(f"tensor {key} is {t.dtype}, not floating point (a quantized checkpoint?)")
            elif rule.bias:  # e.g. Llama with attention_bias but no mlp_bias: ours has both, the missing one is zero
                t = torch.zeros(tensors[key[: -len("bias")] + "weight"].shape[0])
            else:
                raise UserError(f"{FAMILIES[mt].causal_lm} weights lack tensor {key}")
            pieces.append(t.float())
        out[rule.ours] = _owned(rule.from_hf(pieces))
    for key, value in _fixed(mt, cfg).items():
        if key not in tensors:
            raise UserError(f"{FAMILIES[mt].causal_lm} weights lack tensor {key}")
        if not torch.equal(tensors[key].float(), value):
            raise UserError(f"tensor {key} is not all ones: scratchgpt's qk_norm has no weight (model.qk_norm "
                            "represents a Qwen3 whose q_norm/k_norm weights are 1)")
        used.add(key)
    left = sorted(k for k in set(tensors) - used if not k.endswith(_IGNORED_SUFFIXES) and k != "lm_head.weight"
                  and not _is_mask_buffer(mt, k, tensors[k]))
    if left:
        raise UserError(f"unexpected tensor {left[0]} for {FAMILIES[mt].causal_lm} (a variant scratchgpt cannot represent?)")
    _check_shapes(cfg, out, FAMILIES[mt].causal_lm)
    return out


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A transformers tokenizer.json (or a folder holding one, with its tokenizer_config.json).

    Files in exactly the shape scratchgpt writes load as its char or bpe kinds (fast encoders that
    agree with `tokenizers`), any other file the `tokenizers` library loads as kind "hf"; a file it
    cannot load is a one-line UserError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer.json at {path}")
    return Tokenizer.load(path)


def _eos_from_config(hf_dir: Path, tok: Tokenizer) -> Optional[str]:
    """The eos token named by config.json's (else generation_config.json's) eos_token_id, for an imported
    tokenizer whose tokenizer_config.json names none; the first one where it is a list (Llama 3's)."""
    for name in ("config.json", "generation_config.json"):
        try:
            eos = read_json(hf_dir / name).get("eos_token_id") if (hf_dir / name).is_file() else None
        except ValueError:
            eos = None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if type(eos) is int and 0 <= eos < tok.vocab_size and tok.id_to_token(eos):
            return tok.id_to_token(eos)
    return None


def _generation_file(hf_dir: Path) -> Optional[bytes]:
    """The model folder's generation_config.json (its eos_token_id, a list for Llama 3 Instruct), else one
    holding config.json's eos_token_id (transformers' generate falls back to it the same way)."""
    if (hf_dir / HF_GENERATION_FILE).is_file():
        return (hf_dir / HF_GENERATION_FILE).read_bytes()
    try:
        eos = read_json(hf_dir / "config.json").get("eos_token_id")
    except (OSError, ValueError):
        return None
    return _json_bytes({"eos_token_id": eos}) if eos is not None else None


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tokenizer: Optional[str | os.PathLike] = None,
              force: bool = False) -> Path:
    """Write a scratchgpt run (out/config.json, out/best, out/latest) from a transformers model folder.

    The tokenizer is the folder's tokenizer.json unless `tokenizer` names another file or
    folder. config["imported_from"] records the source path, class and file hashes.
    Returns `out`.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(out, force, hf_dir)
    hf_cfg, tensors = read_hf_folder(hf_dir)
    mt = _model_type_of(hf_cfg)
    cfg = config_from_hf(hf_cfg, tensors)
    sd = state_dict_from_hf(hf_cfg, tensors, cfg)
    tok_path = Path(tokenizer) if tokenizer is not None else hf_dir
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise UserError(f"no tokenizer.json at {tok_path}: scratchgpt needs the model's tokenizer (pass tokenizer=PATH)")
    tok = load_hf_tokenizer(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{tok_path}: {tok.vocab_size} tokens, but the model has only {cfg.vocab_size} embeddings")
    eos = _eos_from_config(hf_dir, tok) if tok.kind == "hf" and tok.eot_id is None else None
    generation = _generation_file(hf_dir) if tok.kind == "hf" else None
    if generation == tok.side_files.get(HF_GENERATION_FILE):
        generation = None  # copied with the tokenizer already
    model = GPT(cfg)
    if cfg.tie_embeddings:
        sd = dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"]})
    model.load_state_dict(sd, strict=True)
    files = sorted(p.name for p in hf_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    config = {"format_version": 1, "data": None, "model": asdict(cfg), "train": {}, "optim": {},
              "tokenizer": tok.kind,
              "imported_from": {"path": str(hf_dir.resolve()), "architecture": FAMILIES[mt].causal_lm,
                                "model_type": mt, "sha256": {f: sha256_file(hf_dir / f) for f in files}}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if eos is not None or generation is not None:
            (tmp / "tokenizer").mkdir()
            copy_tokenizer(tok_path, tmp / "tokenizer")
            if eos is not None:  # the run's tokenizer_config.json names it, so every later copy stops there too
                atomic_write_json(tmp / "tokenizer" / HF_CONFIG_FILE, dict(tok.hf_config, eos_token=eos))
            if generation is not None:  # the model's eos ids (Llama 3's list) end its turns wherever the run goes
                atomic_write_bytes(tmp / "tokenizer" / HF_GENERATION_FILE, generation)
            tok_path = tmp / "tokenizer" / TOKENIZER_FILE
        save_checkpoint(tmp, model=model, optimizer=None, state={"step": 0, "tokens": 0, "best_val_loss": None},
                        config=config, tokenizer_file=tok_path, is_best=True)
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
        atomic_write_json(tmp / CONFIG_FILE, config)  # the run-level copy, as train writes it
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
