"""Weight layout: one table, used in both directions, naming where each tensor of ours lives in a family.

Ours is nanoGPT's (`transformer.h.N.attn.c_attn` holds [q; k; v], each head contiguous; with
grouped-query attention k and v have n_kv_head heads each: [q (n_head * head_dim); k (n_kv_head *
head_dim); v (same)], query head h using key/value head h // (n_head / n_kv_head) as transformers'
repeat_kv does; a gated MLP's c_fc holds [gate; up]). GPT-2 stores Linear weights transposed
(Conv1D); OPT and the Llama-shaped classes split q, k, v (and gate, up); Phi-3 fuses them as we do
(qkv_proj, gate_up_proj: the same tensors); NeoX fuses qkv per head ([q_h; k_h; v_h] for each head
h); OPT's position table has 2 leading rows it never reads for unpadded input (written as zeros);
Qwen3's q_norm/k_norm weights have no tensor of ours (written as ones; on import they must be ones);
Gemma's RMSNorms scale by (1 + w), so its norm weights are ours minus one (exact in fp32 both ways,
as transformers computes 1 + w in fp32). A tied head is omitted from model.safetensors, as
transformers does. RoPE rotates (first half, second half) of each head in both.

Biases: `bias=false` drops the biases a class has only with its bias flag on; a bias a class always
has (GPT-2's, every LayerNorm's, NeoX's MLP, Qwen2's q/k/v: model.qkv_bias) is written as zeros when
ours has none. On import, biases that are all zero are dropped (config.py decides), which is the same
math with fewer parameters. Tensors present with a shape the config does not give are refused by
name before anything is converted. Reading a folder's tensors into ours is layout_in.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .. import UserError
from ..model import ModelConfig, meta_gpt
from .families import FAMILIES, export_model_type

ToHF = Callable[[torch.Tensor], list[torch.Tensor]]
FromHF = Callable[[list[torch.Tensor]], torch.Tensor]


def _as_is_to_hf(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _as_is_from_hf(ts: list[torch.Tensor]) -> torch.Tensor:
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


def _minus_one(t: torch.Tensor) -> list[torch.Tensor]:
    return [t - 1]


def _plus_one(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] + 1


AS_IS = (_as_is_to_hf, _as_is_from_hf)
TRANSPOSED = (_transpose, _untranspose)  # GPT-2's Conv1D stores a Linear weight as (in, out)
OPT_POSITIONS = (_pad_positions, _unpad_positions)
ONE_PLUS = (_minus_one, _plus_one)  # Gemma's RMSNorm multiplies by (1 + weight)


def _chunks(n: int) -> tuple[ToHF, FromHF]:
    return (lambda t: list(t.chunk(n, dim=0)), _cat)


def _split(sizes: list[int]) -> tuple[ToHF, FromHF]:
    return (lambda t: list(t.split(sizes, dim=0)), _cat)


def _per_head_qkv(n_head: int, head_dim: int) -> tuple[ToHF, FromHF]:
    """[q; k; v] (ours) <-> [q_0; k_0; v_0; q_1; ...] (GPT-NeoX's query_key_value), for weights and biases."""
    def to_hf(t):
        return [t.reshape(3, n_head, head_dim, -1).transpose(0, 1).reshape(t.shape)]

    def from_hf(ts):
        t = ts[0]
        return t.reshape(n_head, 3, head_dim, -1).transpose(0, 1).reshape(t.shape)

    return (to_hf, from_hf)


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: tuple[str, ...]
    to_hf: ToHF
    from_hf: FromHF
    bias: str = ""  # "": a weight; "flag": a bias the class has only with its bias flag on; "always": one it always has

    @property
    def transposed(self) -> bool:
        return self.to_hf is _transpose


class _Rules(list):
    """The rules of one model, built tensor by tensor."""

    def __init__(self, cfg: ModelConfig, norm_conv=AS_IS):
        super().__init__()
        self.cfg, self.norm_conv = cfg, norm_conv
        self.qkv = _split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])  # grouped-query attention: k and v narrower than q

    def tensor(self, ours: str, hf: str | list[str], conv=AS_IS, bias: str = "") -> None:
        self.append(Rule(ours, tuple(hf) if isinstance(hf, list) else (hf,), conv[0], conv[1], bias))

    def linear(self, ours: str, hf: str | list[str], conv=AS_IS, bias: str = "flag") -> None:
        names = hf if isinstance(hf, list) else [hf]
        self.tensor(ours + ".weight", [n + ".weight" for n in names], conv)
        self.tensor(ours + ".bias", [n + ".bias" for n in names], AS_IS if conv is TRANSPOSED else conv, bias)

    def norm(self, ours: str, hf: str) -> None:
        self.tensor(ours + ".weight", hf + ".weight", self.norm_conv)
        if self.cfg.norm == "layernorm":  # these classes' LayerNorms always have a bias; RMSNorms never do
            self.tensor(ours + ".bias", hf + ".bias", bias="always")


def _gpt2_block(r: _Rules, i: int) -> None:
    o = f"transformer.h.{i}."  # same names as ours (nanoGPT copied them), weights transposed
    r.norm(o + "ln_1", o + "ln_1")
    r.linear(o + "attn.c_attn", o + "attn.c_attn", TRANSPOSED, "always")
    r.linear(o + "attn.c_proj", o + "attn.c_proj", TRANSPOSED, "always")
    r.norm(o + "ln_2", o + "ln_2")
    r.linear(o + "mlp.c_fc", o + "mlp.c_fc", TRANSPOSED, "always")
    r.linear(o + "mlp.c_proj", o + "mlp.c_proj", TRANSPOSED, "always")


def _opt_block(r: _Rules, i: int) -> None:
    o, h = f"transformer.h.{i}.", f"model.decoder.layers.{i}."
    r.norm(o + "ln_1", h + "self_attn_layer_norm")
    r.linear(o + "attn.c_attn", [h + "self_attn.q_proj", h + "self_attn.k_proj", h + "self_attn.v_proj"], r.qkv)
    r.linear(o + "attn.c_proj", h + "self_attn.out_proj")
    r.norm(o + "ln_2", h + "final_layer_norm")  # (OPT's name for the MLP's norm)
    r.linear(o + "mlp.c_fc", h + "fc1")
    r.linear(o + "mlp.c_proj", h + "fc2")


def _neox_block(r: _Rules, i: int) -> None:
    o, h = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
    r.norm(o + "ln_1", h + "input_layernorm")
    # (n_head keys and values: export_model_type refuses grouped-query attention for NeoX)
    r.linear(o + "attn.c_attn", h + "attention.query_key_value", _per_head_qkv(r.cfg.n_head, r.cfg.head_dim))
    r.linear(o + "attn.c_proj", h + "attention.dense")
    r.norm(o + "ln_2", h + "post_attention_layernorm")
    r.linear(o + "mlp.c_fc", h + "mlp.dense_h_to_4h", bias="always")
    r.linear(o + "mlp.c_proj", h + "mlp.dense_4h_to_h", bias="always")


def _llama_block(r: _Rules, i: int, gated: bool = True, qkv_bias: str = "flag") -> None:
    o, h = f"transformer.h.{i}.", f"model.layers.{i}."
    r.norm(o + "ln_1", h + "input_layernorm")
    r.linear(o + "attn.c_attn", [h + "self_attn.q_proj", h + "self_attn.k_proj", h + "self_attn.v_proj"], r.qkv,
             qkv_bias)
    r.linear(o + "attn.c_proj", h + "self_attn.o_proj")
    r.norm(o + "ln_2", h + "post_attention_layernorm")
    if gated:
        r.linear(o + "mlp.c_fc", [h + "mlp.gate_proj", h + "mlp.up_proj"], _chunks(2))
    else:
        r.linear(o + "mlp.c_fc", h + "mlp.up_proj")
    r.linear(o + "mlp.c_proj", h + "mlp.down_proj")


def _arcee_block(r: _Rules, i: int) -> None:
    _llama_block(r, i, gated=False)  # Llama with a plain up/down MLP


def _qwen2_block(r: _Rules, i: int) -> None:
    _llama_block(r, i, qkv_bias="always")  # Llama whose q, k and v always have biases (and nothing else has)


def _phi3_block(r: _Rules, i: int) -> None:
    o, h = f"transformer.h.{i}.", f"model.layers.{i}."  # Llama with our fused [q; k; v] and [gate; up]
    r.norm(o + "ln_1", h + "input_layernorm")
    r.linear(o + "attn.c_attn", h + "self_attn.qkv_proj")
    r.linear(o + "attn.c_proj", h + "self_attn.o_proj")
    r.norm(o + "ln_2", h + "post_attention_layernorm")
    r.linear(o + "mlp.c_fc", h + "mlp.gate_up_proj")
    r.linear(o + "mlp.c_proj", h + "mlp.down_proj")


# model_type -> (the rules of block i, the embedding, the final norm, the norm weights' conversion)
_LAYOUTS: dict[str, tuple[Callable[[_Rules, int], None], str, str, tuple[ToHF, FromHF]]] = {
    "gpt2": (_gpt2_block, "transformer.wte", "transformer.ln_f", AS_IS),
    "opt": (_opt_block, "model.decoder.embed_tokens", "model.decoder.final_layer_norm", AS_IS),
    "gpt_neox": (_neox_block, "gpt_neox.embed_in", "gpt_neox.final_layer_norm", AS_IS),
    "llama": (_llama_block, "model.embed_tokens", "model.norm", AS_IS),
    "arcee": (_arcee_block, "model.embed_tokens", "model.norm", AS_IS),
    "qwen3": (_llama_block, "model.embed_tokens", "model.norm", AS_IS),
    "qwen2": (_qwen2_block, "model.embed_tokens", "model.norm", AS_IS),
    "mistral": (_llama_block, "model.embed_tokens", "model.norm", AS_IS),
    "gemma": (_llama_block, "model.embed_tokens", "model.norm", ONE_PLUS),
    "phi3": (_phi3_block, "model.embed_tokens", "model.norm", AS_IS),
}


def weight_rules(model_type: str, cfg: ModelConfig, lm_head: bool = True) -> list[Rule]:
    """Every tensor of a `cfg` model with bias=True (ours) and where it lives in `model_type`."""
    block, embed, final_norm, norm_conv = _LAYOUTS[model_type]
    rules = _Rules(cfg, norm_conv)
    for i in range(cfg.n_layer):
        block(rules, i)
    rules.tensor("transformer.wte.weight", embed + ".weight")
    if cfg.pos == "learned":
        if model_type == "gpt2":
            rules.tensor("transformer.wpe.weight", "transformer.wpe.weight")
        else:
            rules.tensor("transformer.wpe.weight", "model.decoder.embed_positions.weight", OPT_POSITIONS)
    if cfg.norm_placement == "pre":  # post-norm ends on the last block's ln_2 (OPT-350m's layout)
        rules.norm("transformer.ln_f", final_norm)
    if lm_head and not cfg.tie_embeddings:
        rules.tensor("lm_head.weight", "lm_head.weight")
    return list(rules)


def constant_hf_tensors(model_type: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers tensors with no counterpart in ours, at the one value that makes the math ours:
    Qwen3's per-head q_norm/k_norm weights are ones (our qk_norm has no weight)."""
    if model_type != "qwen3":
        return {}
    return {f"model.layers.{i}.self_attn.{n}.weight": torch.ones(cfg.head_dim)
            for i in range(cfg.n_layer) for n in ("q_norm", "k_norm")}


def meta_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict for `cfg` (a tied head omitted) on the meta device: shapes without the weights."""
    sd = meta_gpt(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in meta_state_dict(cfg).items()}


def check_shapes(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """A one-line UserError naming `where` unless `tensors` are exactly a `cfg` model's (the head may be absent)."""
    want = expected_shapes(cfg)
    missing = sorted(want.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - want.keys() - {"lm_head.weight"})
    if missing or unexpected:
        raise UserError(f"{where}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in want.items():
        if tensors[k].shape != shape:
            raise UserError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, the config needs {tuple(shape)}")


def contiguous_copy(t: torch.Tensor) -> torch.Tensor:
    # chunks of one tensor share storage, which safetensors refuses to save
    return t.clone(memory_format=torch.contiguous_format)


def state_dict_to_hf(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], *,
                     model_type: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Our model's tensors (a checkpoint's model.safetensors) -> the fp32 tensors of
    `hf_architecture(cfg, model_type=model_type)`."""
    return to_hf_tensors(export_model_type(cfg, model_type), cfg, tensors, lm_head=True)


def to_hf_tensors(model_type: str, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor],
                  lm_head: bool) -> dict[str, torch.Tensor]:
    """state_dict_to_hf for a chosen family; `lm_head=False` leaves the head out (a classifier's body)."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for rule in weight_rules(model_type, cfg, lm_head):
        if rule.bias == "flag" and not cfg.bias:
            continue  # the class's bias flag is off: it has no such tensor
        t = tensors.get(rule.ours)
        if t is None:
            if not rule.bias:
                raise UserError(f"checkpoint lacks tensor {rule.ours}")
            t = torch.zeros(tensors[rule.ours[: -len("bias")] + "weight"].shape[0])  # bias=false: a bias of zeros
        used.add(rule.ours)
        for key, piece in zip(rule.hf, rule.to_hf(t.float()), strict=True):
            out[key] = contiguous_copy(piece)
    out.update(constant_hf_tensors(model_type, cfg))
    left = sorted(set(tensors) - used - {"lm_head.weight"})
    if left:
        raise UserError(f"checkpoint tensor {left[0]} has no place in {FAMILIES[model_type].causal_lm}")
    return out
