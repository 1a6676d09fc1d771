"""LoRA adapters: a PEFT adapter folder over the exported base.

LoRA runs (`finetune ... --lora`: PEFT over our names, LoRA on every c_attn, c_proj, c_fc) export
with `export_adapter` as a PEFT adapter folder whose base, exported as a model, sits in out/base:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out/"base"), out)` computes what
`load_run(run).model` does (fp32 logits within 1e-4). LoRA adds s B A to W, so B's rows are split or
permuted exactly as W's rows are (q/k/v, gate/up, NeoX's per-head qkv) and each part keeps A; GPT-2
keeps A and B and sets fan_in_fan_out. adapter_config.json's base_model_name_or_path is "base",
relative (PEFT would resolve it against the working directory: load the base explicitly).
Classifier LoRA runs are refused: export them merged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import UserError
from ..checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, load_tensors, resolve_checkpoint, \
    verify_checkpoint, weights_sha256
from ..checkpoint.load import checkpoint_config
from ..lora import LORA_TARGETS
from ..faults import save_tensors
from ..model import ModelConfig
from ..runs.guard import check_out
from ..runs.staging import staged
from ..utils import atomic_write, atomic_write_bytes, read_json
from .card import adapter_card
from .config import json_bytes
from .export import export_checkpoint, export_family
from .families import FAMILIES, build_model_config, export_model_type
from .layout import Rule, contiguous_copy, weight_rules

PEFT_PREFIX = "base_model.model."  # the prefix of every key PEFT saves (PeftModel.base_model.model is the model)
_UNSUPPORTED_LORA = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                     "exclude_modules", "layer_replication", "trainable_token_indices", "target_parameters",
                     "fan_in_fan_out")  # options scratchgpt never sets, each of which changes what the tensors mean


def _check_adapter_config(adapter_config: Mapping[str, Any]) -> None:
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


def _lora_pieces(rule: Rule, part: str, t: torch.Tensor) -> list[torch.Tensor]:
    """One LoRA factor of our module, as the factors of the transformers module(s) `rule` maps it to."""
    if part == "lora_A":  # the input side, shared by every part of a split weight
        return [t] * len(rule.hf)
    return [t] if rule.transposed else rule.to_hf(t)  # the output side: B's rows go where W's rows go


def adapter_to_hf(cfg: ModelConfig, adapter_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  base_model_name_or_path: str = "base", *,
                  model_type: Optional[str] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A scratchgpt LoRA adapter (PEFT keys over our module names) -> (adapter_config.json, tensors) of the
    same adapter over `hf_architecture(cfg, model_type=model_type)`'s modules.

    LoRA adds s * B @ A to a Linear's weight W (out, in). Where a family splits or permutes
    W's rows (q/k/v, gate/up, GPT-NeoX's per-head qkv), B's rows are split or permuted the
    same way and every part keeps A: delta W_q = s B_q A. GPT-2's Conv1D stores W transposed;
    its A and B stay as they are and fan_in_fan_out=true tells PEFT to transpose the delta.
    """
    mt = export_model_type(cfg, model_type)
    arch = FAMILIES[mt].causal_lm
    _check_adapter_config(adapter_config)
    targets = {r.ours.removesuffix(".weight"): r for r in weight_rules(mt, cfg) if r.ours.startswith("transformer.h.")
               and r.ours.endswith(".weight") and r.ours.split(".")[-2] in LORA_TARGETS}
    out: dict[str, torch.Tensor] = {}
    found: dict[str, set[str]] = {}
    for key, t in tensors.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        rule = targets.get(module)
        if not (key.startswith(PEFT_PREFIX) and key.endswith(".weight") and part in ("lora_A", "lora_B") and rule):
            raise UserError(f"adapter tensor {key} has no place in {arch}")
        names = [n.removesuffix(".weight") for n in rule.hf]
        for name, piece in zip(names, _lora_pieces(rule, part, t), strict=True):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = contiguous_copy(piece)
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
                   base: Optional[str | os.PathLike] = None, model_type: Optional[str] = None) -> Path:
    """Write a LoRA run (or its `which` checkpoint) as a PEFT adapter folder `out` over its base exported
    in `out/base` (with export_checkpoint). Returns `out`.

        base = AutoModelForCausalLM.from_pretrained("out/base")
        model = PeftModel.from_pretrained(base, "out")

    computes what `load_run(run).model` computes (fp32 logits within 1e-4). adapter_config.json
    names the base "base", relative: PEFT resolves that against the working directory, not
    against `out`, so load the base explicitly as above. `base` overrides the base path the run
    records (when it moved). `model_type` picks the base's class as export_checkpoint's does. A
    classifier's LoRA run is refused: export it merged.
    """
    ckpt, out = resolve_checkpoint(Path(ckpt), which), Path(out)
    if not (ckpt / ADAPTER_FILE).is_file():
        raise UserError(f"{ckpt} holds full weights, not a LoRA adapter: export it as a model (without --adapter)")
    state = verify_checkpoint(ckpt)
    config = checkpoint_config(ckpt / CONFIG_FILE)
    if config.get("classifier"):
        raise UserError(f"{ckpt} is a LoRA classification run: PEFT's causal-LM adapter has no place for its head; "
                        "export it merged (without --adapter)")
    base_ckpt = _adapter_base(ckpt, config.get("finetune") or {}, base)
    check_out(out, "hf-adapter", force=force, inputs=[ckpt, base_ckpt])  # before the work (staged checks again)
    base_config = checkpoint_config(base_ckpt / CONFIG_FILE)
    if base_config.get("classifier"):
        raise UserError(f"{ckpt}: its base {base_ckpt} is a classification run; only a language-model base exports "
                        "with an adapter")
    cfg = build_model_config(base_config["model"], where=str(base_ckpt / CONFIG_FILE))
    mt = export_family(cfg, base_config, model_type)  # the base's class: the adapter's module names are its
    adapter_config = read_json(ckpt / ADAPTER_CONFIG_FILE)
    hf_adapter_config, tensors = adapter_to_hf(cfg, adapter_config, load_tensors(ckpt / ADAPTER_FILE), model_type=mt)
    n_params = sum(t.numel() for t in tensors.values())
    card = adapter_card(ckpt, out, config, state, cfg, mt, hf_adapter_config, n_params)
    with staged(out, "hf-adapter", force=force, inputs=[ckpt, base_ckpt]) as tmp:
        export_checkpoint(base_ckpt, tmp / "base", model_type=mt)
        atomic_write(tmp / ADAPTER_FILE, lambda path: save_tensors(tensors, path))
        atomic_write_bytes(tmp / ADAPTER_CONFIG_FILE, json_bytes(hf_adapter_config))
        atomic_write_bytes(tmp / "README.md", card.encode("utf-8"))
    return out
