"""The choices that change a run's numbers, settled once at start: CPU threads and Muon's Newton-Schulz dtype.

The thread count changes the order of a matmul's sums (1 and 2 threads part ways from step 5), and
bf16 or fp32 Newton-Schulz changes every Muon update. Each is a flag (`--train.threads`,
`--optim.ns_dtype`); left at auto, it is measured once per machine and cached
(runtime.machine_choice), so the same command and seed on the same machine give the same run,
however busy the machine is when it starts. The values used go into the run's config.json, so a
resume, or `--config RUN/config.json` on another machine, repeats them. Under torchrun rank 0
decides and every rank takes its values (broadcast): ranks never measure for themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import distributed as dist
from .optim import OptimConfig, param_kinds


@dataclass
class Settled:
    """What was decided and how, for the start-up summary."""

    threads: Optional[int]  # None off the CPU: the thread count does not touch a GPU's numerics
    ns_dtype: str  # "auto" for a run without Muon
    ns_source: str = ""  # flag, config, checkpoint, measured / cached (with timings), rank 0's
    ns_times: Optional[dict] = None


def ns_dtype_for(ocfg: OptimConfig, model: torch.nn.Module, device: torch.device,
                 checkpoint_state: Optional[dict]) -> tuple[str, str, Optional[dict]]:
    """(dtype, where it came from, timings) of Muon's Newton-Schulz for this run, on this process."""
    if ocfg.optimizer != "muon":
        return "auto", "", None
    if ocfg.ns_dtype != "auto":
        return ocfg.ns_dtype, "--optim.ns_dtype", None
    for meta in (checkpoint_state or {}).get("optimizer", []):  # a run from before ns_dtype was recorded
        saved = next((g.get("ns_dtype") for g in meta.get("param_groups", []) if g.get("ns_dtype")), None)
        if saved:
            return saved, "the checkpoint's", None
    if device.type != "cpu":
        return "bfloat16", "torch's GPU path", None
    from .muon import ns_dtype_by_measurement, ns_source

    shapes = [p.shape for p in param_kinds(model)[2]]
    if not shapes:
        return "float32", "no Muon weights", None
    dtype, times = ns_dtype_by_measurement(shapes)
    return str(dtype).removeprefix("torch."), ns_source(), times


def settle(tcfg, ocfg: OptimConfig, model: torch.nn.Module, device: torch.device, ctx: dist.DistContext,
           checkpoint_state: Optional[dict] = None) -> tuple[object, OptimConfig, Settled]:
    """(tcfg, ocfg) with the thread count (CPU runs) and Newton-Schulz dtype (Muon runs) made concrete.

    Call after configure_threads and before build_optimizer, on every rank: rank 0 decides, the others
    follow (a collective under torchrun)."""
    decided = None
    if ctx.rank == 0:
        saved_threads = (checkpoint_state or {}).get("threads")
        if device.type == "cpu" and saved_threads and not tcfg.threads and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(min(saved_threads, os.cpu_count() or 1))  # a run from before threads were recorded
        ns, source, times = ns_dtype_for(ocfg, model, device, checkpoint_state)
        threads = torch.get_num_threads() if device.type == "cpu" else None
        decided = {"threads": threads, "ns_dtype": ns, "ns_source": source, "ns_times": times}
    decided = dist.broadcast_json(decided, ctx)
    if ctx.rank != 0:
        decided["ns_source"] = f"rank 0's ({decided['ns_source']})" if decided["ns_source"] else ""
    if decided["threads"]:
        torch.set_num_threads(decided["threads"])
        tcfg = replace(tcfg, threads=decided["threads"])
    ocfg = replace(ocfg, ns_dtype=decided["ns_dtype"])
    return tcfg, ocfg, Settled(decided["threads"], decided["ns_dtype"], decided["ns_source"], decided["ns_times"])


def apply_ns_dtype(optimizers: list, ns_dtype: str) -> None:
    """The settled dtype into Muon's param groups (a loaded checkpoint brings its own back: the flag wins)."""
    if ns_dtype == "auto":
        return
    from .muon import Muon

    for opt in optimizers:
        if isinstance(opt, Muon):
            opt.ns_dtype = getattr(torch, ns_dtype)
            for group in opt.param_groups:
                group["ns_dtype"] = ns_dtype
