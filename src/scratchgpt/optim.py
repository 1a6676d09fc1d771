"""Optimizers and learning-rate schedules: AdamW (fused) with no decay on norms, biases and
embeddings, optionally Muon for the 2-D hidden weights (muon.py), one schedule for every group."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from . import UserError
from .checks import F32, LR, check_fields
from .muon import AdamW, make_muon, skip_dynamo_import


@dataclass
class OptimConfig:
    """Optimizer and LR schedule. Every field is an `--optim.<field>` flag and an `optim:` config key."""

    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw for everything, or muon: Muon for the 2-D hidden weights and AdamW for the rest."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (every group follows the same schedule, scaled)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_iters: int = 100
    """Steps of linear warmup from ~0 to lr."""
    schedule: Literal["cosine", "constant", "wsd", "linear"] = "cosine"
    """After warmup: cosine or linear decay to min_lr, constant, or wsd (warmup, stable, then linear decay)."""
    decay_iters: int = 0
    """Length of the schedule in steps; 0: train.max_iters (a resume with a longer max_iters keeps the original)."""
    wsd_decay_frac: float = 0.2
    """wsd: the final fraction of steps that decays linearly to min_lr, in [0, 1]."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the 2-D weights (norms, biases and embeddings get none)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW's beta1 and beta2, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0: off (the norm is still computed and checked for NaN)."""
    fused: Optional[bool] = None
    """Fused AdamW (one kernel per step, ~10% faster on 2 CPU cores); null: on for CUDA and CPU."""
    embed_lr: float = 0.0
    """Learning rate of the token/position embeddings; 0: lr (per-group LRs, as modded-nanogpt tunes them)."""
    head_lr: float = 0.0
    """Learning rate of an untied output head; 0: lr."""
    muon_lr: float = 0.02
    """Muon's learning rate for the 2-D hidden weights."""
    muon_momentum: float = 0.95
    """Muon's momentum."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per Muon step (torch's default)."""
    ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Muon's Newton-Schulz dtype; auto: on CPUs the faster for the model's shapes, measured once per machine and
    cached, on GPUs bfloat16 (torch's own). The run's config.json records the dtype used."""

    def __post_init__(self) -> None:
        check_fields(self, lambda name: f"--optim.{name}", OPTIM_RANGES)


OPTIM_RANGES = {
    "lr": LR, "min_lr": LR, "warmup_iters": "[0, inf)", "decay_iters": "[0, inf)", "wsd_decay_frac": "[0, 1]",
    "weight_decay": LR, "betas": "[0, 1)", "eps": f"[0, {F32}]", "grad_clip": f"[0, {F32}]", "embed_lr": LR,
    "head_lr": LR, "muon_lr": LR,
    "muon_momentum": "[0, 1)", "muon_ns_steps": "[1, 99]",
}


def lr_at(step: int, o: OptimConfig, max_iters: int) -> float:
    """LR multiplier schedule: linear warmup, then cosine / constant / linear / warmup-stable-decay."""
    total = o.decay_iters or max_iters
    if step < o.warmup_iters:
        return o.lr * (step + 1) / (o.warmup_iters + 1)
    if o.schedule == "constant" or step >= total:
        return o.lr if o.schedule == "constant" else o.min_lr
    if o.schedule == "wsd":
        decay_start = total - int(o.wsd_decay_frac * total)
        if step < decay_start:
            return o.lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return o.lr + frac * (o.min_lr - o.lr)
    frac = (step - o.warmup_iters) / max(1, total - o.warmup_iters)
    if o.schedule == "linear":
        return o.lr + frac * (o.min_lr - o.lr)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (o.lr - o.min_lr)


def param_kinds(model: torch.nn.Module) -> tuple[list, list, list, list]:
    """The trainable parameters as (embedding tables, untied head, 2-D hidden weights: Muon's, the rest)."""
    embed, head, hidden_2d, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("transformer.wte", "transformer.wpe", "transformer.vte")):  # token/position/value tables
            embed.append(p)
        elif name.startswith("lm_head"):
            head.append(p)
        elif p.dim() == 2:
            hidden_2d.append(p)
        else:
            other.append(p)  # norms, biases, scalars
    return embed, head, hidden_2d, other


def check_extension(run, state: dict, o: OptimConfig, max_iters: int) -> Optional[str]:
    """What the LR does first when a resume trains on from checkpoint `state`: steps at LR 0 (a schedule that
    ended at min_lr 0) raise, naming the ways forward; an LR that jumps (a changed schedule) gives a note."""
    step = state["step"]
    if step >= max_iters:
        return None
    lr = lr_at(step, o, max_iters)
    if lr == 0 and o.lr > 0:
        raise UserError(f"{run} ended its {o.decay_iters or max_iters}-step LR schedule at LR 0 (min_lr {o.min_lr:g}): "
                        f"{max_iters - step} more steps would not train. To go on, give --optim.decay_iters N (> {step}: "
                        f"a longer schedule, resumed at its LR for step {step}), --optim.min_lr X (train on at X), or "
                        "start a new run from its weights with --train.init_from")
    before = (state.get("scheduler") or {}).get("lr")
    if before is not None and not math.isclose(lr, before, rel_tol=1e-6, abs_tol=1e-12):
        return (f"note: step {step} trains at LR {lr:.3g}; the schedule it was saved with had {before:.3g} "
                "(a changed --optim.* schedule)")
    return None


def build_optimizer(model: torch.nn.Module, o: OptimConfig, device: torch.device, *,
                    decay_embeddings: bool = False, compiled: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW with no decay on norms, biases and embeddings; optionally Muon for 2-D hidden weights.

    Only parameters that require grad are optimised. Each param group remembers its `lr_scale`
    relative to optim.lr so one schedule drives them all. `decay_embeddings` decays the embedding
    tables too (every matrix decays: fine-tuning's rule). Unless the step will be `compiled`, torch.optim
    is kept from importing torch._dynamo (~1-1.5 s of a start-up, for compile's sake only).
    """
    if not compiled:
        skip_dynamo_import()

    embed, head, hidden_2d, other = param_kinds(model)
    fused = o.fused if o.fused is not None else device.type in ("cuda", "cpu")

    def scale(group_lr: float) -> float:
        return (group_lr or o.lr) / o.lr if o.lr else 1.0

    adam_groups = [
        dict(params=embed, weight_decay=o.weight_decay if decay_embeddings else 0.0, lr_scale=scale(o.embed_lr)),
        dict(params=head, weight_decay=o.weight_decay, lr_scale=scale(o.head_lr)),
        dict(params=other, weight_decay=0.0, lr_scale=1.0),
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if o.optimizer == "muon":
        optimizers.append(make_muon(hidden_2d, o))
    else:
        adam_groups.insert(0, dict(params=hidden_2d, weight_decay=o.weight_decay, lr_scale=1.0))
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers.insert(0, AdamW(adam_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused))
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float, o: OptimConfig) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
