"""torchrun support: process group setup, DDP/FSDP2 wrapping, and rank-aware saving.

Without torchrun's environment (RANK, WORLD_SIZE, ...) every function here is a cheap no-op,
so the training loop reads the same for one process and for many.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    parallel: str = "none"  # what the model is wrapped in: none | ddp | fsdp


def setup(tcfg) -> DistContext:
    """Join the process group torchrun describes: nccl on CUDA, gloo on CPU, with a collective timeout."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and tcfg.device in ("auto", "cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("SCRATCHGPT_DIST_TIMEOUT", 60)))
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    parallel = tcfg.parallel if tcfg.parallel != "none" else "ddp"
    return DistContext(rank, world, local_rank, device, parallel if world > 1 else "none")


def wrap(model: torch.nn.Module, tcfg, ctx: DistContext) -> torch.nn.Module:
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:  # one shard unit per block: gathers one block's weights at a time
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def no_sync(model: torch.nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps; only the last one syncs."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    if not last and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _ResyncFSDP(model)
    if last and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(True)
    return contextlib.nullcontext()


class _ResyncFSDP(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model = model

    def __exit__(self, *exc):
        return False


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (clipped when max_norm > 0); works for plain, DDP and FSDP2 parameters."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return norm


def mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a scalar over ranks (only at log steps: it is a collective)."""
    if ctx.world == 1:
        return t
    t = t.detach().clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.AVG if ctx.device.type == "cuda" else tdist.ReduceOp.SUM)
    return t if ctx.device.type == "cuda" else t / ctx.world


def save(out: Path, model, optimizers, state: dict, config: dict, tokenizer_file, tcfg, ctx: DistContext,
         is_best: bool) -> None:
    """Rank 0 writes the same safetensors checkpoint as a single process, so runs move between world sizes."""
    from .checkpoint import save_checkpoint

    if ctx.parallel == "fsdp":
        from .fsdp_checkpoint import save_fsdp

        save_fsdp(out, model, optimizers, state, config, tokenizer_file, tcfg, ctx, is_best)
        return
    if ctx.rank == 0:
        save_checkpoint(out, model=model, optimizer=optimizers, state=state, config=config,
                        tokenizer_file=tokenizer_file, keep_last=tcfg.keep_last, is_best=is_best)
    if ctx.world > 1:
        tdist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.world > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
