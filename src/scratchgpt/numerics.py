"""The choices that change a run's numbers, settled once at start: CPU threads, the CPU's training dtype and
Muon's Newton-Schulz dtype.

The thread count changes the order of a matmul's sums (1 and 2 threads part ways from step 5), bf16 autocast
rounds every matmul's inputs, and bf16 or fp32 Newton-Schulz changes every Muon update. Each is a flag
(`--train.threads`, `--train.dtype`, `--optim.ns_dtype`); left at auto, it is measured once per machine and cached
(runtime.machine_choice), so the same command and seed on the same machine give the same run,
however busy the machine is when it starts. The values used go into the run's config.json (and the dtype into
each checkpoint), so a resume, or `--config RUN/config.json` on another machine, repeats them. (Runs from
before 2026-12-07 recorded `dtype: auto`, which then meant fp32 on a CPU: their resumes keep fp32; their
config.json reused with --config needs `--train.dtype float32` to repeat them.) Under torchrun rank 0
decides and every rank takes its values (broadcast): ranks never measure for themselves.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from . import distributed as dist
from .optim import OptimConfig, param_kinds
from .runtime import best_times, machine_choice, rank_test_hook


@dataclass
class Settled:
    """What was decided and how, for the start-up summary."""

    threads: Optional[int]  # None off the CPU: the thread count does not touch a GPU's numerics
    ns_dtype: str  # "auto" for a run without Muon
    ns_source: str = ""  # flag, config, checkpoint, measured / cached (with timings), rank 0's
    ns_times: Optional[dict] = None
    dtype_source: str = ""  # how --train.dtype was settled on a CPU (empty: the flag, or a GPU's rule)
    dtype_times: Optional[dict] = None


# bf16 autocast on a CPU only where it is clearly faster: its inputs lose 16 mantissa bits for the time it saves
DTYPE_MARGIN = 0.8
TEST_HOOK = "SCRATCHGPT_TEST_CPU_DTYPE"  # "0:float32,1:bfloat16": what each rank's own measurement would say


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere oneDNN emulates it, slower than fp32."""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def time_train_step(model: torch.nn.Module, batch: int, block: int, rounds: int = 3) -> dict[str, float]:
    """Best seconds of one forward and backward of a copy of `model` (eval mode: no dropout draws) on a
    random (batch, block) batch, fp32 against bf16 autocast, alternating; round 0 warms up."""
    net = copy.deepcopy(model).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, block), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool):
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss = net(tokens, tokens)
            loss.backward()
            net.zero_grad(set_to_none=True)
        return run

    return best_times({"float32": step(False), "bfloat16": step(True)}, rounds)


def cpu_dtype_for(tcfg, model: torch.nn.Module, batch: int, device: torch.device,
                  checkpoint_state: Optional[dict], parallel: str = "none") -> tuple[str, str, Optional[dict]]:
    """(dtype, where it came from, timings) for --train.dtype on this process: concrete on a CPU, where `auto` is
    bf16 autocast if a step of this model measured below DTYPE_MARGIN x fp32's time (once per machine, model
    and batch shape; cached), else fp32; "auto" on a GPU (runtime.pick_dtype's rule)."""
    if tcfg.dtype != "auto":
        return tcfg.dtype, "", None
    if device.type != "cpu":
        return "auto", "", None
    if checkpoint_state is not None:  # a resume keeps its dtype, whatever an `auto` given again would measure now
        saved = checkpoint_state.get("dtype")
        return (saved, "the checkpoint's", None) if saved in ("float32", "bfloat16", "float16") else \
            ("float32", "what auto was when the run began", None)  # a run from before the dtype was recorded
    if parallel == "fsdp":  # timing a whole copy of the model could need more memory than its shards
        return "float32", "not measured under FSDP", None
    forced = rank_test_hook(TEST_HOOK, ("float32", "bfloat16"))
    if forced:
        return forced, "this rank's measurement (a test hook)", None
    if not cpu_has_bf16():
        return "float32", "no bf16 arithmetic in this CPU", None

    cfg = json.dumps(asdict(model.cfg), sort_keys=True, default=str)
    name = (f"train_dtype | model {hashlib.sha256(cfg.encode()).hexdigest()[:12]} ({model.cfg.n_layer}x"
            f"{model.cfg.n_embd}) | batch {batch}x{model.cfg.block_size} | {torch.get_num_threads()} threads")

    def measure() -> dict:
        times = time_train_step(model, batch, model.cfg.block_size)
        return {"choice": "bfloat16" if times["bfloat16"] < DTYPE_MARGIN * times["float32"] else "float32",
                "times": times}

    record, source = machine_choice(name, measure)
    return record["choice"], source, dict(record.get("times") or {})


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
           checkpoint_state: Optional[dict] = None, batch: int = 1) -> tuple[object, OptimConfig, Settled]:
    """(tcfg, ocfg) with the thread count and dtype (CPU runs) and Newton-Schulz dtype (Muon runs) made concrete;
    `batch`: the sequences of one micro-step, as the dtype is timed.

    Call after configure_threads and before build_optimizer, on every rank: rank 0 decides, the others
    follow (a collective under torchrun)."""
    decided = None
    if ctx.rank == 0:
        saved_threads = (checkpoint_state or {}).get("threads")
        if device.type == "cpu" and saved_threads and not tcfg.threads and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(min(saved_threads, os.cpu_count() or 1))  # a run from before threads were recorded
        ns, source, times = ns_dtype_for(ocfg, model, device, checkpoint_state)
        threads = torch.get_num_threads() if device.type == "cpu" else None
        dtype, dtype_source, dtype_times = cpu_dtype_for(tcfg, model, batch, device, checkpoint_state, ctx.parallel)
        decided = {"threads": threads, "ns_dtype": ns, "ns_source": source, "ns_times": times, "dtype": dtype,
                   "dtype_source": dtype_source, "dtype_times": dtype_times}
    decided = dist.broadcast_json(decided, ctx)
    if ctx.rank != 0:
        for key in ("ns_source", "dtype_source"):
            decided[key] = f"rank 0's ({decided[key]})" if decided[key] else ""
    if decided["threads"]:
        torch.set_num_threads(decided["threads"])
        tcfg = replace(tcfg, threads=decided["threads"])
    tcfg, ocfg = replace(tcfg, dtype=decided["dtype"]), replace(ocfg, ns_dtype=decided["ns_dtype"])
    return tcfg, ocfg, Settled(decided["threads"], decided["ns_dtype"], decided["ns_source"], decided["ns_times"],
                               decided["dtype_source"], decided["dtype_times"])


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
