"""Muon for the 2-D hidden weights: `torch.optim.Muon` with a batched Newton-Schulz step for CPUs.

torch's Muon orthogonalises one matrix at a time in bf16. On GPUs that is right. On CPUs two
things change (measured in BENCHMARKS.md, 2 cores):
- one small matmul chain per weight is overhead-bound, so updates of the same shape up to a
  transpose (every layer's c_attn, c_fc and mlp c_proj at 4x width, ...) are stacked and
  iterated together with batched matmuls;
- bf16 pays only where the CPU multiplies bf16 in hardware (AMX tiles on recent Xeons, AVX512-BF16
  on AMD Zen 4/5: several times fp32's rate); elsewhere it is emulated, several times slower than
  fp32. CPU flags do not tell how large the difference is for the model's shapes, so unless
  `--optim.ns_dtype` names one, the first run on a machine times one Newton-Schulz iteration on
  the model's own stacks in both dtypes (a few ms) and keeps the faster (`ns_dtype_by_measurement`),
  cached per machine: later runs, however busy the machine, take the same dtype. train records it
  in the run's config.json, and the optimizer's param group keeps it, so a resumed run does too.
The state (`momentum_buffer`), the update rule and the LR adjustment are torch's own, so
checkpoints and results carry over between the two paths.
"""

from __future__ import annotations

import inspect
import sys
from collections import defaultdict

import torch
import torch.optim._muon as _torch_muon

from .runtime import best_times, machine_choice, rank_test_hook


def newton_schulz(x: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch (and Keller Jordan's reference), on a stack (n, rows, cols)."""
    a, b, c = coefficients
    x = x.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


# a dtype must beat the other by this factor to be chosen: timing noise must not flip the choice back and forth
NS_MARGIN = 0.9
_NS_CHOICES: dict[tuple, tuple[torch.dtype, dict[str, float]]] = {}
# test hook: "RANK:DTYPE[,RANK:DTYPE]" makes that rank's own measurement say DTYPE (ranks that disagree)
TEST_HOOK = "SCRATCHGPT_TEST_NS_DTYPE"
NS_DTYPES = ("float32", "bfloat16")
# the most of a stack timed per iteration (~2 ms in fp32 on 2 cores): whole stacks of a small model's matrices
STACK_FLOPS_TIMED = 400_000_000


def _stack_shapes(shapes) -> dict[tuple[int, int], int]:
    """(rows, cols) of each Newton-Schulz stack (tall matrices as their transpose) and how many it holds."""
    stacks: dict[tuple[int, int], int] = defaultdict(int)
    for shape in shapes:
        stacks[(min(shape), max(shape))] += 1
    return dict(stacks)


def time_newton_schulz(stacks: dict[tuple[int, int], int], dtypes=(torch.float32, torch.bfloat16), coefficients=(
        _torch_muon.DEFAULT_A, _torch_muon.DEFAULT_B, _torch_muon.DEFAULT_C), eps: float = _torch_muon.EPS,
        rounds: int = 5) -> dict[str, float]:
    """Seconds for one Newton-Schulz iteration over every stack, per dtype: the best of `rounds`, the dtypes
    taking turns (a busy machine slows both alike), after a warm-up. A stack is timed whole up to
    STACK_FLOPS_TIMED: bf16's gain on small matrices shows only in a stack (12 of (128, 384) on AMX: bf16
    0.54x fp32's time; one of them alone: 1.25x). Larger matrices are timed one or a few at a time, so a
    GPT-2-sized model costs about as little to measure as a small one."""
    xs = []
    for (rows, cols), count in stacks.items():
        per_matrix = 2 * rows * rows * (2 * cols + rows)  # x x^T, then gram @ gram and (..) @ x
        n = max(1, min(count, STACK_FLOPS_TIMED // per_matrix))
        xs.append(torch.ones(n, rows, cols).add_(torch.arange(cols) / cols))  # no RNG: must not shift training's

    def iteration(dtype: torch.dtype):
        return lambda: [newton_schulz(x, coefficients, 1, eps, dtype) for x in xs]

    return best_times({_name(d): iteration(d) for d in dtypes}, rounds)


def ns_dtype_by_measurement(shapes, coefficients=(_torch_muon.DEFAULT_A, _torch_muon.DEFAULT_B, _torch_muon.DEFAULT_C),
                            eps: float = _torch_muon.EPS) -> tuple[torch.dtype, dict[str, float]]:
    """bf16 or fp32 for the CPU Newton-Schulz iteration of weights of these shapes: bf16 if its measured
    time is below NS_MARGIN x fp32's. Measured once per machine for given stacks and thread count, and
    cached (runtime.machine_choice); ns_source() says where the last answer came from."""
    stacks = _stack_shapes(shapes)
    key = (tuple(sorted(stacks.items())), torch.get_num_threads())
    forced = _test_hook()
    if forced:
        return getattr(torch, forced), {}
    if key not in _NS_CHOICES:
        def measure() -> dict:
            times = time_newton_schulz(stacks, coefficients=coefficients, eps=eps)
            return {"choice": "bfloat16" if times["bfloat16"] < NS_MARGIN * times["float32"] else "float32",
                    "times": times}

        # "whole stacks": choices cached before stacks were timed whole (one matrix each) are measured anew
        name = f"ns_dtype | stacks {sorted(stacks.items())} | {key[1]} threads | whole stacks"
        record, source = machine_choice(name, measure)
        _NS_CHOICES[key] = (getattr(torch, record["choice"]), dict(record.get("times") or {}))
        _NS_SOURCE[key] = source
    _NS_SOURCE["last"] = _NS_SOURCE[key]
    return _NS_CHOICES[key]


_NS_SOURCE: dict = {}


def ns_source() -> str:
    """Where the last measured choice came from: measured now, or read from the machine's cache."""
    return _NS_SOURCE.get("last", "measured")


def _test_hook() -> str | None:
    return rank_test_hook(TEST_HOOK, NS_DTYPES)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Muon(torch.optim.Muon):
    """torch.optim.Muon; on CPU tensors the orthogonalisation is batched by shape, in `ns_dtype`.

    ns_dtype None: measured (ns_dtype_by_measurement) for CPU parameters; `ns_times` keeps the timings.
    Each param group records its dtype as "ns_dtype", which a loaded state dict brings back. On GPUs
    torch's own path runs (bf16) unless ns_dtype is float32: then the batched path runs there too."""

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype, self.ns_times = ns_dtype, {}
        params = [p for g in self.param_groups for p in g["params"]]
        if ns_dtype is None and params and all(p.device.type == "cpu" for p in params):
            group = self.param_groups[0]
            self.ns_dtype, self.ns_times = ns_dtype_by_measurement([p.shape for p in params], group["ns_coefficients"],
                                                                   group["eps"])
        for group in self.param_groups:  # null on GPUs (torch's own bf16 path): a CPU resume measures anew
            group.setdefault("ns_dtype", _name(self.ns_dtype) if self.ns_dtype else None)

    @torch.no_grad()
    def step(self, closure=None):
        if (any(p.device.type != "cpu" for g in self.param_groups for p in g["params"])
                and all(g.get("ns_dtype") != "float32" for g in self.param_groups)):
            return super().step(closure)  # GPUs: torch's own bf16 path
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            # a tall matrix is iterated as its transpose, so (384, 128) and (128, 384) share one stack
            stacks: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                stacks[(min(p.shape), max(p.shape))].append(i)
            ns_dtype = getattr(torch, group.get("ns_dtype") or _name(self.ns_dtype or torch.float32))
            for idx in stacks.values():
                wide = [updates[i].mT if updates[i].size(0) > updates[i].size(1) else updates[i] for i in idx]
                ortho = newton_schulz(torch.stack(wide), group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      ns_dtype).to(params[idx[0]].dtype).unbind(0)
                by_shape: dict[torch.Size, tuple[list, list]] = defaultdict(lambda: ([], []))
                for i, o in zip(idx, ortho):
                    ps, os_ = by_shape[params[i].shape]
                    ps.append(params[i])
                    os_.append(o.mT if params[i].size(0) > params[i].size(1) else o)
                for shape, (ps, os_) in by_shape.items():
                    torch._foreach_add_(ps, os_, alpha=-_torch_muon._adjust_lr(lr, group["adjust_lr_fn"], shape))
        return loss


def make_muon(params: list[torch.Tensor], o) -> torch.optim.Optimizer:
    """Muon over `params` at optim.muon_lr, Newton-Schulz in optim.ns_dtype (auto: measured);
    `lr_scale` lets one LR schedule drive every optimizer."""
    return Muon(
        [dict(params=params, lr_scale=o.muon_lr / o.lr if o.lr else 0.0)],  # lr 0: the schedule is all 0
        lr=o.muon_lr,
        weight_decay=o.weight_decay,
        momentum=o.muon_momentum,
        ns_steps=o.muon_ns_steps,
        adjust_lr_fn="original",  # lr scaled by sqrt(max(1, rows/cols)), as Keller Jordan's reference
        ns_dtype=getattr(torch, o.ns_dtype) if o.ns_dtype in NS_DTYPES else None,
    )


# ---------------------------------------------------------------- start-up: torch.optim without torch._dynamo
# torch.optim imports torch._dynamo (~1.5 s on 2 CPU cores: 8% of a 20 s run) the first time an optimizer
# is built (add_param_group is wrapped in torch._disable_dynamo) and the first time Adam steps (its step
# is wrapped in _use_grad_for_differentiable). Both wrappers exist for torch.compile only; without it the
# functions they wrap are all that runs. Everything falls back to torch's own path if its internals move.
_ADAM_STEP = inspect.unwrap(torch.optim.Adam.step)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step is torch's own step function, minus the wrapper that imports torch._dynamo."""

    @torch.no_grad()
    def step(self, closure=None):
        if self.defaults.get("differentiable") or _ADAM_STEP is torch.optim.Adam.step:
            return super().step(closure)
        return _ADAM_STEP(self, closure)


def skip_dynamo_import() -> None:
    """Call when nothing will be compiled: torch.optim's `_disable_dynamo` wrappers caches the dynamo-disabled
    function on first use; pre-filling that cache with the function itself skips the import. (A compiled region
    calling these optimizer methods would then trace them instead of breaking the graph.)"""
    if "torch._dynamo" in sys.modules:
        return
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        fn = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            setattr(fn, "__dynamo_disable", fn)
