"""scratchgpt's C loops for x86 CPUs (kernels.c): decoding's int8 and bf16 matrix-vector products (AVX-512) and
the rest of a one-token step (DecodeOps: RMS norm, SwiGLU's activation, attention over the KV cache), and
training's attention inputs (attention_heads: qk norm and RoPE in one pass each way).

At batch 1 a decoder reads every weight once per token, so its speed is how fast the weights stream from
memory. torch's kernels for a few rows of int8 or bf16 weights stay well below that (BENCHMARKS.md), and
between the matmuls a 30-layer model runs ~1000 small torch ops a token at 1-3 us each; the C loops in
kernels.c stream the weights faster and make each of those steps one call. In training, torch's qk norm and
rotation are ~14 small ops a layer each way (a sixth of a small model's step with qk norm on a CPU); one
C pass takes their place. They are compiled once per machine
with the C compiler found (`$CC`, `cc`, `gcc` or `clang`, `-O3 -march=native -fopenmp`) into the cache folder
(runtime.cache_dir()/kernels, named by a hash of the source, compiler and CPU), and loaded with ctypes. Where
that is not possible (no compiler, another OS, an unwritable cache) or `SCRATCHGPT_KERNELS=0` is set,
`library()` is None and torch's ops run: the same results up to the order of fp32 sums, only slower (a run's
environment.json records which ran). Built
without AVX-512, the plain C matmul loops are slower than torch's, so only DecodeOps is used (`fast_matmuls()`
is False).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .utils import umask

SOURCE = Path(__file__).with_name("kernels.c")
# up to this many input rows (batch x new tokens) a call; more (a prompt) read the weights often enough for torch's GEMMs
MAX_ROWS = 8
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (runtime.machine_key names the model alone: a
    cluster's shared home can see nodes of one model name whose VMs expose different flags)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _build(cc: str, out: Path) -> bool:
    """Compile kernels.c into `out`, atomically (a temporary file renamed): True if it worked."""
    try:  # (a cache folder that cannot be written: no kernels, torch's run)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
        os.close(fd)
    except OSError:
        return False
    try:
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        if done.returncode != 0:
            return False
        os.chmod(tmp, 0o755 & ~umask())  # (mkstemp makes it 0600 whatever the umask)
        os.replace(tmp, out)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built on first use; None where they cannot be had (then torch's kernels run)."""
    if os.environ.get("SCRATCHGPT_KERNELS", "1") == "0" or platform.system() != "Linux" \
            or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:  # an unreadable cache folder, no home directory, ...: torch's ops, never an error
        return _load()
    except (OSError, RuntimeError):
        return None


def _load() -> Optional[ctypes.CDLL]:
    cc = _compiler()
    if cc is None:
        return None
    from .runtime import cache_dir

    try:  # the compiler's identity by its file, not `cc --version` (a process start on every run's first token)
        info = os.stat(os.path.realpath(cc))
    except OSError:
        return None
    compiler = f"{os.path.realpath(cc)} {info.st_size} {info.st_mtime_ns}"
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + _cpu_key().encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"kernels-{key}.so"
    if not path.exists() and not _build(cc, path):
        return None
    torch.get_num_threads()  # torch's OpenMP runtime is loaded first, so the library shares its threads
    lib = ctypes.CDLL(str(path))
    lib.sg_int8_rows.argtypes = [_P, _I, _P, _P, _P, _P, _I, _I]
    lib.sg_bf16_rows.argtypes = [_P, _I, _P, _P, _P, _I, _I]
    lib.sg_rms_norm.argtypes = [_P, _I, _I, _P, ctypes.c_float, _P]
    lib.sg_silu_mul.argtypes = [_P, _I, _I, _P]
    lib.sg_attend_one.argtypes = [_P, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P, _P, _I, _I, _P]
    lib.sg_int8_rows.restype = lib.sg_bf16_rows.restype = lib.sg_attend_one.restype = ctypes.c_int
    lib.sg_heads_fwd.argtypes = [_P, ctypes.c_int, _I, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P, _P, _P, _P]
    lib.sg_heads_bwd.argtypes = [_P, ctypes.c_int, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P]
    return lib


def runs_on(device: torch.device) -> bool:
    """Whether kernels.c's loops run on `device` (a CPU, where they could be built): what environment.json records."""
    return device.type == "cpu" and library() is not None


def fast_matmuls() -> bool:
    """Whether the matrix-vector products beat torch's: built with AVX-512 (the plain C loops do not; the
    rest of DecodeOps helps either way)."""
    lib = library()
    return lib is not None and bool(lib.sg_fast_path())


def takes(rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the matrix-vector products take `rows` rows of `dtype` on `device`: a few fp32 rows on the CPU."""
    return device.type == "cpu" and dtype == torch.float32 and rows <= MAX_ROWS and fast_matmuls()


def usable(x2d: torch.Tensor) -> bool:
    """Whether these rows can go through the kernels: a few contiguous fp32 rows on the CPU."""
    return x2d.is_contiguous() and takes(x2d.size(0), x2d.dtype, x2d.device)


def bound(kind: str, weight: torch.Tensor, scales: Optional[torch.Tensor], bias: Optional[torch.Tensor], rows: int,
          reuse_output: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """int8_rows or bf16_rows (`kind`) for exactly `rows` contiguous fp32 rows, their arguments
    converted once: a decoder's per-call cost drops from ~9 to ~3 us. With reuse_output every call returns the
    same tensor, overwritten by the next call. The caller keeps the weights alive."""
    lib, (n, k) = library(), weight.shape
    fn = {"int8": lib.sg_int8_rows, "bf16": lib.sg_bf16_rows}[kind]
    consts = [ctypes.c_void_p(weight.data_ptr())] + ([ctypes.c_void_p(scales.data_ptr())] if kind != "bf16" else [])
    consts += [ctypes.c_void_p(_ptr(bias))]
    out = torch.empty(rows, n, dtype=torch.float32) if reuse_output else None

    def call(x: torch.Tensor) -> torch.Tensor:
        y = out if out is not None else torch.empty(rows, n, dtype=torch.float32)
        if fn(x.data_ptr(), rows, *consts, y.data_ptr(), n, k):
            raise MemoryError(f"{kind} kernel: no memory for its rounded inputs")
        return y
    return call


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def int8_rows(x2d: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(M, K) fp32 x (N, K) int8 with (N,) bf16 scales -> (M, N) fp32: torch._weight_int8pack_mm's product
    (inputs and the scaled sums rounded to bf16), plus the bias."""
    return bound("int8", weight, scales, bias, x2d.size(0), reuse_output=False)(x2d)


def bf16_rows(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(M, K) fp32 x (N, K) bf16 -> (M, N) fp32, summed in fp32, plus the bias."""
    return bound("bf16", weight, None, bias, x2d.size(0), reuse_output=False)(x2d)


class DecodeOps:
    """kernels.c's RMS norm, SwiGLU activation and one-token attention, for model.DecodeStep's rows of fp32 on
    the CPU: one call each where torch runs 2-12 small ops (the same arithmetic, sums in another order)."""

    def __init__(self, lib: ctypes.CDLL, heads: int, kv_heads: int, head_dim: int, qk_norm_eps: float) -> None:
        self.lib, self.heads, self.kv_heads, self.head_dim, self.qk_eps = lib, heads, kv_heads, head_dim, qk_norm_eps

    @staticmethod
    def of(model_cfg, dtype: torch.dtype, device: torch.device) -> Optional["DecodeOps"]:
        """Where the kernels run this model's decoding steps (fp32 on the CPU, no value embeddings), else None."""
        if dtype != torch.float32 or device.type != "cpu" or model_cfg.value_embeds:
            return None
        lib, cfg = library(), model_cfg
        if lib is None:
            return None  # (qk norm's epsilon, or -1: off; an epsilon that rounds to 0 still normalizes)
        return DecodeOps(lib, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.qk_norm_eps if cfg.qk_norm else -1.0)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()  # (a no-op: the step's rows are)
        y = torch.empty_like(x)
        self.lib.sg_rms_norm(x.data_ptr(), x.size(0), x.size(1), weight.data_ptr(), eps, y.data_ptr())
        return y

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        """[gate; up] rows -> silu(gate) * up."""
        h = h.contiguous()
        y = torch.empty(h.size(0), h.size(1) // 2, dtype=torch.float32)
        self.lib.sg_silu_mul(h.data_ptr(), h.size(0), h.size(1) // 2, y.data_ptr())
        return y

    def attend(self, qkv: torch.Tensor, rope, keys: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
        """c_attn's rows (B, (H + 2 KV) D) at position `pos` -> attention's output (B, H D); the new keys and
        values go into the layer's cache (B, KV, max_len, D)."""
        B, (cos, sin), qkv = qkv.size(0), rope if rope is not None else (None, None), qkv.contiguous()
        y = torch.empty(B, self.heads * self.head_dim, dtype=torch.float32)
        if self.lib.sg_attend_one(qkv.data_ptr(), B, self.heads, self.kv_heads, self.head_dim, self.qk_eps,
                                  _ptr(cos), _ptr(sin), keys.data_ptr(), values.data_ptr(), pos, keys.size(2),
                                  y.data_ptr()):
            raise MemoryError("attention kernel: no memory for its scores")
        return y


class _Heads(torch.autograd.Function):
    """c_attn's output (fp32 or bf16) -> fp32 q, k, v for attention (qk norm and rotation applied), as kernels.c's
    one pass each way; the gradient comes back in c_attn's dtype."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, shape: tuple, qk_eps: float):
        B, T, H, KV, D = shape
        lib, bf16 = library(), qkv.dtype == torch.bfloat16
        f32 = dict(dtype=torch.float32, device="cpu")  # what the C loop writes, whatever torch's defaults are
        q = torch.empty(B, H, T, D, **f32)
        k, v = torch.empty(B, KV, T, D, **f32), torch.empty(B, KV, T, D, **f32)
        rstd = torch.empty(B, T, H + KV, **f32) if qk_eps >= 0 else None
        lib.sg_heads_fwd(qkv.data_ptr(), bf16, B, T, H, KV, D, qk_eps, _ptr(cos), _ptr(sin), q.data_ptr(),
                         k.data_ptr(), v.data_ptr(), _ptr(rstd))
        # qk norm's backward reads the input; the rotation's alone does not (then no activation is kept)
        ctx.save_for_backward(qkv if qk_eps >= 0 else None, rstd, cos, sin)
        ctx.shape, ctx.qk_eps, ctx.qkv_shape, ctx.bf16 = shape, qk_eps, qkv.shape, bf16
        return q, k, v

    @staticmethod
    @once_differentiable  # (the C backward builds no graph: a second derivative raises instead of being wrong)
    def backward(ctx, gq, gk, gv):
        qkv, rstd, cos, sin = ctx.saved_tensors
        B, T, H, KV, D = ctx.shape
        # read in place wherever D is the unit stride (SDPA's gradients are (B, T, heads, D) underneath)
        gq, gk, gv = (torch.zeros(B, n, T, D, dtype=torch.float32, device="cpu") if g is None
                      else g if g.dtype == torch.float32 and g.stride(3) == 1 else g.float().contiguous()
                      for g, n in ((gq, H), (gk, KV), (gv, KV)))
        strides = (ctypes.c_int64 * 9)(*(st for g in (gq, gk, gv) for st in g.stride()[:3]))
        gqkv = torch.empty(ctx.qkv_shape, dtype=torch.bfloat16 if ctx.bf16 else torch.float32, device="cpu")
        library().sg_heads_bwd(_ptr(qkv), ctx.bf16, _ptr(rstd), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), strides,
                               B, T, H, KV, D, ctx.qk_eps, _ptr(cos), _ptr(sin), gqkv.data_ptr())
        return gqkv, None, None, None, None


def attention_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, qk_eps: float,
                    rope: Optional[tuple], from_bf16: bool = False) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """c_attn's output (B, T, (H + 2 KV) D) -> q (B, H, T, D), k and v (B, KV, T, D), fp32, contiguous, q and k
    RMS-normalised if qk_eps >= 0 and rotated by rope's (cos, sin) (T, D/2) if given: what the model's
    view, permute, qk norm and rotation give (the rotation bit for bit; qk norm's sums in another order),
    in one pass each way. The output is fp32; with from_bf16 a bf16 qkv is taken too (widened in the pass: the
    same as `.float()` first; bf16 autocast's fp32 attention). None where the kernels do not take it (then the
    caller runs torch's ops)."""
    dtypes = (torch.float32, torch.bfloat16) if from_bf16 else (torch.float32,)
    if torch.compiler.is_compiling() or qkv.device.type != "cpu" or qkv.dtype not in dtypes \
            or qkv.dim() != 3 or not qkv.is_contiguous() or qkv.size(2) != (heads + 2 * kv_heads) * head_dim:
        return None  # (compiling first: inductor fuses torch's ops, and dynamo must not trace the build)
    T = qkv.size(1)
    if rope is not None and (head_dim % 2 or any(
            t.device.type != "cpu" or t.dtype != torch.float32 or tuple(t.shape) != (T, head_dim // 2) for t in rope)):
        return None
    if library() is None:
        return None
    B = qkv.size(0)
    cos, sin = (None, None) if rope is None else (rope[0].contiguous(), rope[1].contiguous())
    return _Heads.apply(qkv, cos, sin, (B, T, heads, kv_heads, head_dim), qk_eps)
