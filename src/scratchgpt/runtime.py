"""Where and how the work runs: the one device / dtype / threads picker, and the MFU peak.

Every command that touches a model asks here, so `--device auto` means the same thing for
`train`, `finetune`, `sample`, `chat`, `serve` and `eval`: CUDA (this process's LOCAL_RANK
under torchrun), then Apple's MPS, then the CPU.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from . import UserError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda:LOCAL_RANK > mps > cpu; an explicit name is checked now, with a one-line error."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0) or 0)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is None:
            if local_rank >= count:  # more ranks on this node than GPUs
                ranks = os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1))
                raise UserError(f"{ranks} ranks on this node but only {count} GPU(s): run torchrun with "
                                f"--nproc_per_node {count}, or train on the CPU with --train.device cpu")
            device = torch.device("cuda", local_rank)
        elif device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} GPU(s) (cuda:0 .. cuda:{count - 1})")
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # no such device, or torch built without it
        raise UserError(f"--device {name}: not usable here ({str(e).splitlines()[0]})") from None
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 autocast on GPUs that have it (else fp16), fp32 on CPUs (see below)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPUs without bf16 units run bf16 several times slower than fp32


def configure_threads(threads: int) -> None:
    """torch's CPU threads: `threads` if given, else OMP_NUM_THREADS if set, else one per physical core."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        # hyperthreads only add contention on matmul-bound work
        cpus = os.cpu_count() or 2
        torch.set_num_threads(max(1, cpus // (2 if cpus > 2 else 1)))


def keep_freed_memory() -> None:
    """Stop glibc from handing each step's freed activations back to the OS and faulting them in again.

    With glibc's defaults a training step at nanoGPT's CPU size takes ~1000 page faults; keeping freed
    memory in the heap (trim threshold 1 GiB, mmap threshold at glibc's 32 MiB maximum) cuts that ~5x:
    median +9% tok/s over 6 alternating runs on 2 cores. Memory is reused, not grown. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (fixing it also stops glibc's dynamic adjustment)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """A quick matmul benchmark: the denominator of MFU when train.peak_flops is not given."""
    a = torch.ones(n, n, device=device, dtype=dtype)  # not randn: must not consume the training RNG
    for _ in range(2):
        a @ a
    reps, t0 = 8, time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)
