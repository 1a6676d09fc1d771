"""Muon for the 2-D hidden weights: `torch.optim.Muon` with a batched Newton-Schulz step for CPUs.

torch's Muon orthogonalises one matrix at a time in bf16. On GPUs that is right. On CPUs two
things change (measured in BENCHMARKS.md, 2 cores):
- one small matmul chain per weight is overhead-bound, so updates of the same shape up to a
  transpose (every layer's c_attn, c_fc and mlp c_proj at 4x width, ...) are stacked and
  iterated together with batched matmuls;
- bf16 only pays where the CPU multiplies bf16 in hardware (AMX tiles, as on the project's
  2-core Xeon: 512x512 bf16 matmuls ~3.5x fp32); CPUs without bf16 units emulate it, several
  times slower than fp32, so the iteration runs in fp32 there.
The state (`momentum_buffer`), the update rule and the LR adjustment are torch's own, so
checkpoints and results carry over between the two paths.
"""

from __future__ import annotations

import inspect
import sys
from collections import defaultdict

import torch
import torch.optim._muon as _torch_muon


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run on AMX tiles (the one case measured faster than fp32 on CPU)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except Exception:  # private API: absent or failing means no
        return False


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


class Muon(torch.optim.Muon):
    """torch.optim.Muon; on CPU tensors the orthogonalisation is batched by shape, in `ns_dtype`."""

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype or (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        if any(p.device.type != "cpu" for g in self.param_groups for p in g["params"]):
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
            for idx in stacks.values():
                wide = [updates[i].mT if updates[i].size(0) > updates[i].size(1) else updates[i] for i in idx]
                ortho = newton_schulz(torch.stack(wide), group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      self.ns_dtype).to(params[idx[0]].dtype).unbind(0)
                by_shape: dict[torch.Size, tuple[list, list]] = defaultdict(lambda: ([], []))
                for i, o in zip(idx, ortho):
                    ps, os_ = by_shape[params[i].shape]
                    ps.append(params[i])
                    os_.append(o.mT if params[i].size(0) > params[i].size(1) else o)
                for shape, (ps, os_) in by_shape.items():
                    torch._foreach_add_(ps, os_, alpha=-_torch_muon._adjust_lr(lr, group["adjust_lr_fn"], shape))
        return loss


def make_muon(params: list[torch.Tensor], o) -> torch.optim.Optimizer:
    """Muon over `params` at optim.muon_lr; `lr_scale` lets one LR schedule drive every optimizer."""
    return Muon(
        [dict(params=params, lr_scale=o.muon_lr / o.lr)],
        lr=o.muon_lr,
        weight_decay=o.weight_decay,
        momentum=o.muon_momentum,
        ns_steps=o.muon_ns_steps,
        adjust_lr_fn="original",  # lr scaled by sqrt(max(1, rows/cols)), as Keller Jordan's reference
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
