"""torchrun support: process group setup, DDP/FSDP2 wrapping, rank-aware saving and loading, restarts.

Without torchrun's environment (RANK, WORLD_SIZE, ...) every function here is a cheap no-op,
so the training loop reads the same for one process and for many.

- Data: batches are a pure function of (seed, step) (shuffle sampling: of the seed and the windows drawn
  before, which every rank counts alike); rank r takes rows [r*B/W, (r+1)*B/W) of the global batch B, so
  every rank's data cursor is the same and needs no exchange.
- DDP checkpoints are the single-process checkpoint (written by rank 0). FSDP checkpoints hold
  the sharded state as `torch.distributed.checkpoint` safetensors shards plus a full
  `model.safetensors` export (see checkpoint/fsdp.py). Any of them resumes on any world size.
- Failures: a rank that dies takes the job down (torchrun stops the others and names the rank);
  a rank that hangs is caught by the collective timeout (SCRATCHGPT_DIST_TIMEOUT seconds).
  Under `torchrun --max-restarts K` a restarted worker resumes from RUN/latest by itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist

from . import UserError
from .runtime import pick_device

# Long enough for rank 0 to write a large checkpoint or print a sample while the others wait
# in a collective; short enough that a hung rank ends the job instead of stalling it for hours.
DEFAULT_TIMEOUT_S = 600.0


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
        # one process: train.parallel does not apply (a run saved under FSDP resumes here)
        return DistContext(device=pick_device(tcfg.device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(tcfg.device)  # auto: cuda:LOCAL_RANK (one line if ranks outnumber GPUs), else the CPU
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        try:
            timeout = datetime.timedelta(seconds=float(os.environ.get("SCRATCHGPT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        except ValueError:
            raise UserError("SCRATCHGPT_DIST_TIMEOUT must be a number of seconds, "
                            f"not {os.environ['SCRATCHGPT_DIST_TIMEOUT']!r}") from None
        backend = "nccl" if use_cuda else "gloo"
        bind = {"device_id": device} if use_cuda else {}  # NCCL knows this rank's GPU from the start (no guessing barrier)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one key-value store for every restart of its workers, so a restarted
            # rank could read the dead attempt's peer addresses (gloo: "connectFullMesh failed ...
            # Connection refused", or a hang). A key prefix per attempt keeps the attempts apart.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            client = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                    timeout=timeout)
            tdist.init_process_group(backend, store=tdist.PrefixStore(f"scratchgpt/attempt_{attempt}/", client),
                                     rank=rank, world_size=world, timeout=timeout, **bind)
        else:
            tdist.init_process_group(backend, timeout=timeout, **bind)
    # one rank wraps only when asked to (--train.parallel ddp|fsdp): the same code path as many ranks, e.g.
    # DDP or FSDP under nccl on a one-GPU machine
    parallel = tcfg.parallel if tcfg.parallel != "none" else ("ddp" if world > 1 else "none")
    return DistContext(rank, world, local_rank, device, parallel)


def restart_mode(out: Path, resume: bool, force: bool) -> tuple[bool, bool]:
    """(resume, force) for this launch. A worker restarted by `torchrun --max-restarts` continues
    from RUN/latest when a checkpoint exists, else starts over, replacing what its first attempt wrote."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return resume, force
    has_checkpoint = (Path(out) / "latest").exists()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: "
              + ("resuming from the last checkpoint" if has_checkpoint else "no checkpoint yet, starting over"),
              file=sys.stderr)
    return (True, force) if has_checkpoint else (False, True)


def maybe_fail(step: int, ctx: DistContext) -> None:
    """Fault injection for the tests: SCRATCHGPT_FAULT_RANK=r SCRATCHGPT_FAULT_STEP=s makes rank r
    exit with status 1 (no cleanup, as a crash) before step s, on the first attempt only, so that
    a torchrun restart can be seen to recover."""
    env = os.environ
    if (env.get("SCRATCHGPT_FAULT_STEP") == str(step) and env.get("SCRATCHGPT_FAULT_RANK") == str(ctx.rank)
            and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        print(f"rank {ctx.rank}: injected fault at step {step} (SCRATCHGPT_FAULT_STEP), exiting",
              file=sys.stderr, flush=True)
        os._exit(1)


def wrap(model: torch.nn.Module, tcfg, ctx: DistContext) -> torch.nn.Module:
    """DDP wrapper, or FSDP2 in place. FSDP2 replaces the parameters: build the optimizer after this."""
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:  # one shard unit per block: gathers one block's weights at a time
            fully_shard(block)
        fully_shard(model)  # the rest (embeddings, tied head, final norm) in the root unit
        return model
    return model


def no_sync(model: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on accumulation micro-steps."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: a flag, read at backward time
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (clipped when max_norm > 0); works for plain, DDP and FSDP2 parameters."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP: the sum over shards
        norm = norm.full_tensor()
    return norm


def mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average a scalar over ranks (only at log steps: it is a collective)."""
    if ctx.world == 1:
        return t
    t = t.detach().clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)  # gloo has no AVG
    return t / ctx.world


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is true on any: decisions from local clocks must agree, or ranks part ways."""
    if ctx.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_json(obj, ctx: DistContext):
    """Rank 0's JSON-able `obj` on every rank (as UTF-8 bytes in a tensor: nothing is pickled)."""
    if ctx.world == 1:
        return obj
    import json

    data = json.dumps(obj).encode("utf-8") if ctx.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=ctx.device)
    tdist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=ctx.device)
    if ctx.rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    tdist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))


def data_slices(batch_size: int, per_rank: int, micro: int, ctx: DistContext) -> dict:
    """The data cursor spelled out per rank, for state.json: all derive from (seed, step)."""
    return {"global_batch_size": batch_size, "world_size": ctx.world, "micro_batch_size": micro,
            "ranks": [{"rank": r, "rows": [r * per_rank, (r + 1) * per_rank]} for r in range(ctx.world)]}


@contextlib.contextmanager
def unsharded(model: torch.nn.Module, ctx: DistContext):
    """Root-level weights gathered for code that uses them outside forward (generation calls lm_head).

    Under FSDP every rank must enter this and run the same forwards (same seed: same tokens)."""
    if ctx.parallel != "fsdp":
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def teardown(ctx: DistContext) -> None:
    if "RANK" in os.environ and tdist.is_initialized():  # under torchrun: a one-rank run has its group too
        tdist.destroy_process_group()
