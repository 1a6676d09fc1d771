"""Muon for the 2-D hidden weights: `torch.optim.Muon` with a batched Newton-Schulz step for CPUs.

torch's Muon orthogonalises one matrix at a time in bf16. On GPUs that is right. On CPUs two
things change (measured in BENCHMARKS_race.md, 2 cores):
- one small matmul chain per weight is overhead-bound, so same-shaped updates (every layer's
  c_attn, every layer's c_fc, ...) are stacked and iterated together with batched matmuls;
- bf16 only pays where the CPU multiplies bf16 in hardware (AMX tiles: Sapphire Rapids and
  later, where it is ~4x fp32); elsewhere bf16 is emulated and several times slower than fp32,
  so the iteration runs in fp32 there.
The state (`momentum_buffer`), the update rule and the LR adjustment are torch's own, so
checkpoints and results carry over between the two paths.
"""

from __future__ import annotations

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
            by_shape: dict[torch.Size, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[p.shape].append(i)
            for shape, idx in by_shape.items():
                ortho = newton_schulz(torch.stack([updates[i] for i in idx]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"], self.ns_dtype).to(params[idx[0]].dtype)
                ps = [params[i] for i in idx]
                if group["weight_decay"]:
                    torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
                adjusted = _torch_muon._adjust_lr(lr, group["adjust_lr_fn"], shape)
                torch._foreach_add_(ps, list(ortho.unbind(0)), alpha=-adjusted)
        return loss


def make_muon(params: list[torch.Tensor], o) -> torch.optim.Optimizer:
    """Muon over `params` at optim.muon_lr; `lr_scale` lets one LR schedule drive every optimizer."""
    return Muon(
        [dict(params=params, lr_scale=o.muon_lr / o.lr)],
        lr=o.muon_lr,
        weight_decay=o.weight_decay,
        momentum=o.muon_momentum,
        adjust_lr_fn="original",  # lr scaled by sqrt(max(1, rows/cols)), as Keller Jordan's reference
    )
