"""LoRA adapters through PEFT: every c_attn, c_proj and c_fc of the blocks; the base stays frozen.

A LoRA run saves only `adapter_model.safetensors` (PEFT's key names) and `adapter_config.json`
(PEFT's LoraConfig fields), plus the base checkpoint's path and weights hash, so a different
base is refused when the run is loaded (checkpoint/load.py applies the adapter).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import UserError

LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # every nn.Linear in a block (c_proj matches attn and mlp)


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'scratchgpt[finetune]'") from None
    return peft


def lora_config_dict(r: int, alpha: float, dropout: float) -> dict:
    """The adapter_config.json content: PEFT LoraConfig fields (loadable by peft.LoraConfig(**d))."""
    if r < 1:
        raise UserError(f"--lora-r must be at least 1, not {r}")
    return {"peft_type": "LORA", "r": int(r), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
            "target_modules": list(LORA_TARGETS), "bias": "none"}


def add_lora(model: nn.Module, adapter_config: dict) -> nn.Module:
    """Wrap `model` with PEFT LoRA on its c_attn/c_proj/c_fc Linears; everything else is frozen.

    A classifier's head is new, so it is unfrozen again (saved in head.safetensors, not the adapter).
    """
    peft = _peft()
    kwargs = {k: v for k, v in adapter_config.items() if k != "peft_type"}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        head.requires_grad_(True)
    return wrapped


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    peft = _peft()
    return {k: v.detach().contiguous().cpu() for k, v in peft.get_peft_model_state_dict(model).items()}


def set_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Load saved adapter tensors into an already LoRA-wrapped model (a resumed fine-tune)."""
    check_complete(model, tensors, where)
    _peft().set_peft_model_state_dict(model, tensors)


def check_complete(wrapped: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the adapter config implies (lora_A and lora_B of each target) is in `tensors`: PEFT loads
    an incomplete adapter without a word, keeping its random lora_A (a wrong merge) or its zero lora_B
    (a layer the adapter silently leaves alone)."""
    missing = sorted(set(_peft().get_peft_model_state_dict(wrapped)) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{where}: the adapter is incomplete: {missing[0]}{more} missing (a damaged or truncated "
                        "adapter_model.safetensors; use another checkpoint of the run)")


def load_adapter(model: nn.Module, adapter_config: dict, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """LoRA-wrap `model` and load saved adapter tensors into it; a mismatch names `where`."""
    peft = _peft()
    wrapped = add_lora(model, adapter_config)
    check_complete(wrapped, tensors, where)
    try:
        result = peft.set_peft_model_state_dict(wrapped, tensors)
    except RuntimeError as e:  # shape mismatch: a base of another size
        raise UserError(f"{where}: adapter does not fit this base model ({str(e).splitlines()[0][:200]})") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"{where}: adapter does not fit this base model (unexpected {unexpected[:3]})")
    return wrapped
