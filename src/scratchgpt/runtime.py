"""Where and how the work runs: the one device / dtype / threads picker, and the MFU peak.

Every command that touches a model asks here, so `--device auto` means the same thing for
`train`, `finetune`, `sample`, `chat`, `serve` and `eval`: CUDA (this process's LOCAL_RANK
under torchrun), then Apple's MPS, then the CPU. Long work (`train`, `finetune`, `tune`)
also takes its Ctrl-C / SIGTERM policy from here (`stop_on_signals`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import UserError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda:LOCAL_RANK > mps > cpu; an explicit name is checked now, with a one-line error.

    Under torchrun every rank of a node needs a GPU of its own: more ranks (LOCAL_WORLD_SIZE) than
    GPUs is refused by every rank alike, before any of them joins the process group."""
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
            ranks = max(local_rank + 1, int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1))
            if ranks > count:  # more ranks on this node than GPUs
                raise UserError(f"{ranks} ranks on this node but only {count} GPU(s): run torchrun with "
                                f"--nproc_per_node {count}, or train on the CPU with --train.device cpu")
            device = torch.device("cuda", local_rank)
        elif device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} GPU(s) (cuda:0 .. cuda:{count - 1})")
        elif int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1) > 1:  # every rank would share one GPU (NCCL refuses)
            raise UserError(f"--device {name} under torchrun: each rank takes its own GPU; pass --train.device cuda "
                            "(or auto), and CUDA_VISIBLE_DEVICES to choose which GPUs")
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # no such device, or torch built without it
        raise UserError(f"--device {name}: not usable here ({str(e).splitlines()[0]})") from None
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 autocast on GPUs that have it (else fp16), fp32 on CPUs (training settles a CPU's auto by
    measurement first: numerics.cpu_dtype_for)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        # emulated bf16 (V100, T4) runs far below fp16's tensor-core rate: fp16 + GradScaler there
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32  # CPUs without bf16 units run bf16 several times slower than fp32


def cpu_topology() -> tuple[int, int]:
    """(physical cores, logical CPUs) this process may run on: SMT siblings count once among the cores;
    both capped by a cgroup CPU quota (`docker --cpus`). From /sys; os.cpu_count() where that is missing."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores = set(cpus)  # no topology (not Linux, or hidden): every CPU counts
            break
    n_cores, n_cpus = len(cores) or 1, len(cpus) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            limit = max(1, math.ceil(int(quota) / int(period)))
            n_cores, n_cpus = min(n_cores, limit), min(n_cpus, limit)
    except (OSError, ValueError):
        pass
    return n_cores, n_cpus


def best_times(variants: dict, rounds: int) -> dict:
    """Seconds of each variant's call (a dict of name -> function): the best of `rounds`, the variants taking
    turns (a busy machine slows them alike), after a warm-up round (allocations, kernel selection)."""
    best = {name: float("inf") for name in variants}
    for trial in range(rounds + 1):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            if trial:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def rank_test_hook(env: str, allowed: tuple[str, ...]) -> Optional[str]:
    """What test hook `env` ("0:float32,1:bfloat16") says this rank's own measurement would give, if anything."""
    for pair in filter(None, os.environ.get(env, "").split(",")):
        rank, _, value = pair.partition(":")
        if rank == os.environ.get("RANK", "0") and value in allowed:
            return value
    return None


def time_matmul_threads(counts: tuple[int, ...], n: int = 512, rounds: int = 3) -> dict[int, float]:
    """Seconds of an n x n fp32 matmul (a training step's typical GEMM) at each thread count: best_times of the
    counts. The thread count is restored."""
    before = torch.get_num_threads()
    a = torch.ones(n, n)
    try:
        return best_times({c: lambda c=c: (torch.set_num_threads(c), a @ a) for c in counts}, rounds)
    finally:
        torch.set_num_threads(before)


_THREADS: dict[tuple[int, int], int] = {}


def default_threads() -> int:
    """One thread per physical core. Where the CPUs include SMT siblings (hyperthreads), whether the
    second thread of a core helps depends on the CPU and the VM, so a few 512^3 matmuls at both counts
    decide (the faster wins). Measured once per machine (machine_choice: a later run, busy or not, reads
    the cached count, since the count changes the order of sums); a resumed run keeps its config's count."""
    cores, cpus = cpu_topology()
    if cpus <= cores:
        return cores
    if (cores, cpus) not in _THREADS:
        def measure() -> dict:
            times = time_matmul_threads((cores, cpus))
            return {"choice": cpus if times[cpus] < times[cores] else cores, "times": {str(c): t for c, t in times.items()}}

        _THREADS[(cores, cpus)] = int(machine_choice(f"threads | {cores} cores, {cpus} cpus", measure)[0]["choice"])
    return _THREADS[(cores, cpus)]


# ---------------------------------------------------------------- choices measured once per machine
CHOICES_FILE = "machine_choices.json"


def machine_key() -> str:
    """What a cached choice is valid for: the CPU model, this process's CPUs and torch's version."""
    cores, cpus = cpu_topology()
    return f"{device_name(torch.device('cpu'))} | {cores} cores, {cpus} cpus | torch {torch.__version__}"


@contextlib.contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the cache dir: runs started together measure once and the others wait and read
    (without it, three runs started at once measured under each other's load and chose differently)."""
    try:
        import fcntl

        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a")
    except (ImportError, OSError):  # not POSIX, or a read-only cache: no lock (each run measures for itself)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def machine_choice(name: str, measure, refresh=None) -> tuple[dict, str]:
    """The cached record of choice `name` on this machine (machine_key), measured by `measure()` (a JSON-able
    dict) where missing; (record, where it came from). `refresh(old)` may return a new record to store in place
    of a cached one (or None: keep it). Kept in cache_dir()/machine_choices.json, under a lock."""
    path, key = cache_dir() / CHOICES_FILE, f"{name} | {machine_key()}"
    with _cache_lock(path.parent):
        try:
            stored = json.loads(path.read_text())
            stored = stored if isinstance(stored, dict) else {}
        except (OSError, ValueError):
            stored = {}
        record = stored.get(key)
        if isinstance(record, dict) and "choice" in record:
            new = refresh(record) if refresh else None
            if new is None:
                return record, f"cached in {path}"
            record = new
        else:
            record = measure()
        try:
            from .utils import atomic_write_json

            atomic_write_json(path, {**stored, key: record})
        except OSError:
            return record, "measured (not cached: the cache dir is not writable)"
    return record, f"measured, cached in {path}"


def device_memory(device: torch.device) -> Optional[int]:
    """Total memory of `device` in bytes (RAM for the CPU); None where it can't be told (mps)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX
            return None
    return None


def configure_threads(threads: int) -> None:
    """torch's CPU threads: `threads` if given, else OMP_NUM_THREADS if set, else default_threads()."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())


def configure_device(device: torch.device) -> None:
    """Process-wide settings for training on `device`: on CUDA, fp32 matmuls on TF32 tensor cores.

    TF32 keeps fp32's range with a 10-bit mantissa, as nanoGPT and most GPU trainers run fp32
    matmuls (~8x fp32's rate on an A100/H100). Under bf16/fp16 autocast it only touches the few
    matmuls autocast leaves in fp32."""
    if device.type == "cuda":  # torch >= 2.9's API: reading the legacy allow_tf32 after it raises
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


@contextlib.contextmanager
def exact_fp32_matmuls():
    """fp32 matmuls at full precision inside (configure_device turned TF32 on for training): a final score
    that equals what `scratchgpt eval` computes."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


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


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim): what loading a model left behind.

    Parsing a tokenizer.json and reading weights free tens of MiB in the middle of the heap, which glibc keeps
    (only the top is trimmed by itself), so a process would peak that much higher once the weights are faulted
    in (measured: 25 MiB of a fresh `sample` of SmolLM2-135M). Costs ~1 ms. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- MFU: the peak FLOP/s of the device
def _dense(half: float, tf32: float, fp32: float, bf16: bool = True) -> dict[str, float]:
    """A datasheet's dense (no 2:4 sparsity) tensor-core rates in TFLOP/s, fp32 accumulation."""
    rates = {"float16": half, "tf32": tf32, "float32": fp32}
    if bf16:
        rates["bfloat16"] = half
    return rates


# (pattern in torch.cuda.get_device_name(), entry name, rates). NVIDIA quotes tensor rates "with
# sparsity" (marked *): the dense rate is half of it. The first pattern that matches wins.
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    # GH200 datasheet: BF16 1,979* TF32 989* FP32 67 (before H200, which its name contains; the H100 SXM's tensor cores)
    (r"GH200", "GH200", _dense(989.5, 494.5, 67.0)),
    # H200 datasheet: H200 NVL BF16/FP16 1,671* TF32 835* FP32 60; H200 SXM BF16 1,979* TF32 989* FP32 67
    (r"H200 NVL", "H200 NVL", _dense(835.5, 417.5, 60.0)),
    (r"H200", "H200 SXM", _dense(989.5, 494.5, 67.0)),
    # H100 datasheet: NVL BF16 1,671* TF32 835* FP32 60; PCIe BF16 1,513* TF32 756* FP32 51; SXM as GH200
    (r"H100 NVL", "H100 NVL", _dense(835.5, 417.5, 60.0)),
    (r"H100 PCIe", "H100 PCIe", _dense(756.5, 378.0, 51.0)),
    (r"H100", "H100 SXM", _dense(989.5, 494.5, 67.0)),
    # A100 datasheet (40 and 80 GB, SXM and PCIe): BF16/FP16 312 (624*), TF32 156 (312*), FP32 19.5
    (r"A100", "A100", _dense(312.0, 156.0, 19.5)),
    # L40S datasheet: BF16/FP16 362.05 (733*), TF32 183 (366*), FP32 91.6
    (r"L40S", "L40S", _dense(362.05, 183.0, 91.6)),
    # L4 datasheet: BF16/FP16 242*, TF32 120*, FP32 30.3
    (r"\bL4\b", "L4", _dense(121.0, 60.0, 30.3)),
    # A10 datasheet: BF16/FP16 125 (250*), TF32 62.5 (125*), FP32 31.2
    (r"\bA10\b", "A10", _dense(125.0, 62.5, 31.2)),
    # Ada whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 (330.4*), TF32 82.6, FP32 82.6
    (r"RTX 4090", "RTX 4090", _dense(165.2, 82.6, 82.6)),
    # Ampere GA102 whitepaper, RTX 3090: FP16/BF16 tensor with FP32 accumulate 71 (142*), TF32 35.6, FP32 35.6
    (r"RTX 3090", "RTX 3090", _dense(71.0, 35.6, 35.6)),
    # V100 datasheet: SXM2 tensor (fp16) 125, FP32 15.7; PCIe 112, 14. No bf16 or TF32 units.
    (r"V100-SXM", "V100 SXM2", {"float16": 125.0, "float32": 15.7, "tf32": 15.7}),
    (r"V100-PCIE", "V100 PCIe", {"float16": 112.0, "float32": 14.0, "tf32": 14.0}),
    # T4 datasheet: mixed precision (fp16) 65, FP32 8.1
    (r"\bT4\b", "T4", {"float16": 65.0, "float32": 8.1, "tf32": 8.1}),
]


@dataclass
class Peak:
    """The MFU denominator: FLOP/s and where the figure came from (said in train's start-up summary).
    A measured peak carries `remeasure`: called once, when a run's rate exceeds it, it measures again."""

    flops: float
    source: str
    remeasure: Optional[Callable[[], float]] = field(default=None, compare=False, repr=False)

    def mfu(self, achieved_flops: float) -> float:
        """achieved / peak, never above 1. A measured peak below what the model achieves (measured under load)
        is measured again, once, and the higher figure kept (and cached); one still below it (a matmul too
        small for the device) is said once, and the ratio is capped."""
        if achieved_flops > self.flops and self.remeasure is not None:
            remeasure, self.remeasure = self.remeasure, None
            self.flops = max(self.flops, remeasure())
        ratio = achieved_flops / self.flops
        if ratio > 1.0 and self.source not in _WARNED:
            _WARNED.add(self.source)
            print(f"warning: the model runs at {achieved_flops / 1e12:.3g} TFLOP/s, above the peak used for MFU "
                  f"({self.flops / 1e12:.3g}, {self.source}); MFU is capped at 1: give the device's peak with "
                  "--train.peak_flops", file=sys.stderr)
        return min(ratio, 1.0)

    def describe(self) -> str:
        return f"{self.flops / 1e12:.4g} TFLOP/s ({self.source})"


_WARNED: set[str] = set()
_MEASURED: dict[str, float] = {}


def tf32_matmuls() -> bool:
    """Whether CUDA runs fp32 matmuls on TF32 tensor cores: the matmul setting, or the global one it inherits."""
    setting = torch.backends.cuda.matmul.fp32_precision
    return (torch.backends.fp32_precision if setting == "none" else setting) == "tf32"


def _precision(dtype: torch.dtype, device_type: str = "cuda") -> str:
    """The table column of a compute dtype: CUDA runs fp32 matmuls as TF32 where torch allows it (configure_device)."""
    if dtype == torch.float32 and device_type == "cuda" and tf32_matmuls():
        return "tf32"
    return str(dtype).removeprefix("torch.")


def table_peak(device_name: str, dtype: torch.dtype) -> Optional[Peak]:
    """The datasheet's dense peak for this GPU and dtype, or None for a GPU (or dtype) not in GPU_PEAKS."""
    column = _precision(dtype)
    for pattern, entry, rates in GPU_PEAKS:
        if re.search(pattern, device_name):
            if column not in rates:
                return None  # e.g. bf16 on a V100: emulated, no datasheet figure
            return Peak(rates[column] * 1e12, f"table: {entry} {column} dense")
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (lscpu's), for tables and the peak cache."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def cache_dir() -> Path:
    """Where measured figures are kept between runs: $SCRATCHGPT_CACHE_DIR, else $XDG_CACHE_HOME/scratchgpt."""
    if os.environ.get("SCRATCHGPT_CACHE_DIR"):
        return Path(os.environ["SCRATCHGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scratchgpt"


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 0, budget_s: float = 0.3) -> float:
    """The best rate of repeated n x n matmuls in `dtype`: large enough to saturate the device
    (8192 on a GPU, 1024 on a CPU, where it reaches the GEMM rate of 2 cores). Random operands (a GPU
    multiplies constant ones ~12% faster than real data), from a generator of its own: the training
    RNG is untouched."""
    n = n or (8192 if device.type == "cuda" else 4096 if device.type == "mps" else 1024)
    generator = torch.Generator(device).manual_seed(0)
    a = torch.rand(n, n, device=device, generator=generator).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    reps = 4 if device.type == "cpu" else 10  # per timing: GPU launches are async, one matmul is too short
    for _ in range(2 if device.type == "cpu" else reps):
        a @ a
    sync()
    best, deadline = float("inf"), time.perf_counter() + budget_s
    for trial in range(5):
        t0 = time.perf_counter()
        for _ in range(1 if device.type == "cpu" else reps):
            a @ a
        sync()
        best = min(best, (time.perf_counter() - t0) / (1 if device.type == "cpu" else reps))
        if trial >= 1 and time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def robust_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """measure_peak_flops, such that load can't lower it much: on a CPU also the rate of one thread times the
    thread count (one busy core slows a many-thread matmul to its slowest thread; one thread finds a free core)."""
    flops = measure_peak_flops(device, dtype)
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        try:
            torch.set_num_threads(1)
            flops = max(flops, threads * measure_peak_flops(device, dtype))
        finally:
            torch.set_num_threads(threads)
    return flops


def measured_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """robust_peak_flops once per device, dtype, threads and torch version; kept in cache_dir()/peak_flops.json.
    The stored figure only rises: the Peak measures again when a run beats it, and keeps the higher figure."""
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    precision = _precision(dtype, device.type)
    key = f"{device_name(device)} | {precision}{threads} | torch {torch.__version__}"
    path = cache_dir() / "peak_flops.json"

    def store(flops: float) -> float:
        with _cache_lock(path.parent):
            try:
                stored = json.loads(path.read_text())
                stored = stored if isinstance(stored, dict) else {}
            except (OSError, ValueError):
                stored = {}
            old = stored.get(key)
            best = max(flops, float(old)) if isinstance(old, (int, float)) and old > 0 else flops
            try:
                from .utils import atomic_write_json

                atomic_write_json(path, {**stored, key: best})
            except OSError:
                pass  # a read-only home: measure again next time
        _MEASURED[key] = best
        return best

    if key not in _MEASURED:
        try:
            stored = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            stored = None
        _MEASURED[key] = float(stored) if isinstance(stored, (int, float)) and stored > 0 else \
            store(robust_peak_flops(device, dtype))
    return Peak(_MEASURED[key], f"measured: {precision} matmul on {key.split(' | ')[0]}{threads}, cached in {path}",
                remeasure=lambda: store(robust_peak_flops(device, dtype)))


def peak_flops(device: torch.device, dtype: torch.dtype, given: float = 0.0) -> Peak:
    """The dense peak of `dtype` on `device`: `given` (train.peak_flops) if > 0, else the datasheet
    figure of a known GPU (GPU_PEAKS), else a measured one (cached)."""
    if given > 0:
        return Peak(given, "train.peak_flops")
    if device.type == "cuda":
        found = table_peak(device_name(device), dtype)
        if found is not None:
            return found
    return measured_peak(device, dtype)


# ---------------------------------------------------------------- interrupts
INTERRUPTED = "interrupted"  # result.json's stop_reason after a Ctrl-C or SIGTERM
REPEAT_GRACE_S = 1.0


class Interrupted(KeyboardInterrupt):
    """Work that stopped on a signal after saving what it had; the CLI exits 130 with this message."""


class StopRequest:
    """Set by the first SIGINT / SIGTERM: the work stops at its next safe point and saves.

    A second signal raises KeyboardInterrupt at once (nothing more is saved). A repeat within
    REPEAT_GRACE_S of the first counts as the same request: under torchrun a terminal's Ctrl-C
    reaches each worker twice, from the terminal and forwarded by torchrun's agent.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self._at = 0.0

    def handle(self, signum: int, frame=None) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._at < REPEAT_GRACE_S:
                return
            raise KeyboardInterrupt
        self.requested, self._at, self.signal_name = True, now, signal.Signals(signum).name
        err = sys.__stderr__ or sys.stderr  # the terminal, even while a tune trial's stderr goes to its log
        print(f"\n{self.signal_name}: stopping after this step and saving (Ctrl-C again quits at once, "
              "without saving)", file=err, flush=True)


_active: Optional[StopRequest] = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM set the yielded StopRequest while the block runs, then the old handlers return.

    Nested uses share the outer request (tune's trials are trainings). Off the main thread, where
    Python can't install handlers, the request is never set and signals keep their usual effect."""
    global _active
    if _active is not None:
        yield _active
        return
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    request = StopRequest()
    previous = {sig: signal.signal(sig, request.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where a run ran, for its report: versions, device, dtype, threads."""
    from . import __version__

    env = {"scratchgpt": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "processor": device_name(torch.device("cpu")),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
           "dtype": str(dtype).removeprefix("torch.")}
    if device.type != "cpu":
        env["accelerator"] = device_name(device)
    return env
