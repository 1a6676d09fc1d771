"""Reading a transformers model's tensors into ours (import_hf), by layout.py's table of where each one lives.

Released GPT-2 folders (gpt2, gpt2-medium, distilgpt2, ...) import as they are: their keys lack the
`transformer.` prefix (a bare GPT2Model's names), the head is tied and absent, and files converted
from the 2019 pickles hold each layer's causal-mask buffers (`h.N.attn.bias`, a lower-triangular
(1, 1, n_positions, n_positions) mask; `attn.masked_bias`, -1e4). They are dropped after checking
that they change nothing: the mask must be lower-triangular ones and the masking value at most -1e4
(GPT-NeoX's `attention.bias` / `attention.masked_bias`, -1e9, likewise); anything else is refused.

A folder's tensors may be read one at a time (hf_converter with `load`): every name, shape and constant is
checked on shapes alone first (meta tensors), then each of our tensors is made from its pieces when its turn
comes, so an import never holds the whole model.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Optional

import torch

from .. import UserError
from ..model import ModelConfig
from .families import FAMILIES
from .layout import (Rule, check_shapes, constant_hf_tensors, contiguous_copy, meta_state_dict, to_hf_tensors,
                     weight_rules)


# the prefix every transformers key of a causal LM starts with; a bare base model's keys lack it
_PREFIX = {"gpt2": "transformer.", "opt": "model.", "gpt_neox": "gpt_neox."}  # the others: "model."
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


def canonical_keys(model_type: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` under the causal LM's names: a bare base model's keys get the prefix, old names the new ones."""
    bare = _is_bare(model_type, tensors)
    return {canonical_key(model_type, k, bare): v for k, v in tensors.items()}


def _is_bare(model_type: str, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether `tensors` are a bare base model's (no key has the causal LM's prefix)."""
    prefix = _PREFIX.get(model_type, "model.")
    return not any(k.startswith(prefix) for k in tensors)


def canonical_key(model_type: str, key: str, bare: bool) -> str:
    """transformers tensor `key` under the causal LM's name (`bare`: of a base model, see _is_bare)."""
    if model_type == "gpt_neox" and key == "embed_out.weight":
        return "lm_head.weight"  # transformers < 5 named GPT-NeoX's head embed_out
    if bare and key != "lm_head.weight":
        return _PREFIX.get(model_type, "model.") + key
    return key


def _hf_piece(model_type: str, rule: Rule, tensors: Mapping[str, torch.Tensor], key: str,
              value: Optional[Callable[[str], torch.Tensor]] = None) -> torch.Tensor:
    """transformers tensor `key` of `rule` as fp32 (a missing bias beside its weight: zeros), checked against
    `tensors` (meta tensors will do) and read from `value(key)` where given."""
    if key in tensors:
        t = tensors[key]
        if not t.is_floating_point():
            raise UserError(f"tensor {key} is {t.dtype}, not floating point (a quantized checkpoint?)")
        return (t if value is None else value(key)).float()
    if rule.bias:  # e.g. Llama with attention_bias but no mlp_bias: ours has both, the missing one is zero
        weight = tensors[key[: -len("bias")] + "weight"]
        return torch.zeros(weight.shape[0], device=weight.device if value is None else "cpu")
    raise UserError(f"{FAMILIES[model_type].causal_lm} weights lack tensor {key}")


def _ours_has(cfg: ModelConfig, rule: Rule) -> bool:
    """Whether a `cfg` model has `rule`'s tensor (every weight; biases with bias=true, c_attn's with qkv_bias)."""
    return not rule.bias or cfg.bias or (cfg.qkv_bias and rule.ours.endswith(".attn.c_attn.bias"))


def from_hf_tensors(model_type: str, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's fp32 state dict (tied head omitted) from a `model_type` model's tensors, read as `cfg`."""
    return {name: make() for name, make in hf_converter(model_type, cfg, tensors).items()}


def hf_converter(model_type: str, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor],
                 load: Optional[Callable[[str], torch.Tensor]] = None) -> dict[str, Callable[[], torch.Tensor]]:
    """{our tensor's name: a function making it (fp32)} from a `model_type` model's tensors read as `cfg`, every
    name, shape and constant checked first: a bad folder is a UserError before anything is converted.

    `tensors` may hold shapes alone (meta tensors), with `load(key)` reading a tensor's values when a function
    needs them: import_hf then holds one transformers tensor and its converted form at a time, never the model.
    """
    arch = FAMILIES[model_type].causal_lm
    bare = _is_bare(model_type, tensors)
    origin = {canonical_key(model_type, k, bare): k for k in tensors}
    tensors = canonical_keys(model_type, tensors)
    value = (lambda key: tensors[key]) if load is None else (lambda key: load(origin[key]))
    _check_hf_shapes(model_type, cfg, tensors)
    shapes = {k: v.to("meta") for k, v in tensors.items()}  # (converted here without their values)
    rules, converted, used = [], {}, set()
    for rule in weight_rules(model_type, cfg):
        used.update(k for k in rule.hf if k in tensors)
        if _ours_has(cfg, rule):  # (else absent, or all zero (config_from_hf checked): our model has no such tensor)
            converted[rule.ours] = rule.from_hf([_hf_piece(model_type, rule, shapes, k) for k in rule.hf])
            rules.append(rule)
    for key, want in constant_hf_tensors(model_type, cfg).items():
        if key not in tensors:
            raise UserError(f"{arch} weights lack tensor {key}")
        if not torch.equal(value(key).float(), want):
            raise UserError(f"tensor {key} is not all ones: scratchgpt's qk_norm has no weight (model.qk_norm "
                            "represents a Qwen3 whose q_norm/k_norm weights are 1)")
        used.add(key)
    left = sorted(k for k in set(tensors) - used if not k.endswith(_IGNORED_SUFFIXES) and k != "lm_head.weight"
                  and not _is_mask_buffer(model_type, k, value(k)))
    if left:
        raise UserError(f"unexpected tensor {left[0]} for {arch} (a variant scratchgpt cannot represent?)")
    check_shapes(cfg, converted, arch)
    return {r.ours: partial(_convert_rule, model_type, r, shapes, value) for r in rules}


def _convert_rule(model_type: str, rule: Rule, shapes: Mapping[str, torch.Tensor],
                  value: Callable[[str], torch.Tensor]) -> torch.Tensor:
    return _owned(rule.from_hf([_hf_piece(model_type, rule, shapes, k, value) for k in rule.hf]))


def _check_hf_shapes(model_type: str, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """A UserError naming the first transformers tensor whose shape is not the one `cfg` gives it."""
    want = to_hf_tensors(model_type, cfg, meta_state_dict(cfg), lm_head=True)
    for key, t in tensors.items():
        if key in want and t.shape != want[key].shape:
            raise UserError(f"tensor {key} has shape {tuple(t.shape)}, where config.json makes a "
                            f"{FAMILIES[model_type].causal_lm} with {tuple(want[key].shape)}")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself where it is contiguous and alone in its storage (a tensor read from a file, a concatenation),
    else a contiguous copy: an import holds each weight once."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return contiguous_copy(t)
