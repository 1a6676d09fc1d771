"""Muon for the 2-D hidden weights, via `torch.optim.Muon`, with an fp32 path for CPUs.

torch's Muon runs its Newton-Schulz orthogonalisation in bf16. That is right on GPUs with bf16
tensor cores and about 5x slower than fp32 on CPUs without bf16 units, so on CPU tensors we
swap in the same iteration computed in the gradient's own dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.optim._muon as _torch_muon

_bf16_newton_schulz = _torch_muon._zeropower_via_newtonschulz


def _newton_schulz_native_dtype(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    if grad.is_cuda:
        return _bf16_newton_schulz(grad, ns_coefficients, ns_steps, eps)
    a, b, c = ns_coefficients
    x = grad.T if grad.size(0) > grad.size(1) else grad  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


@contextlib.contextmanager
def _native_newton_schulz():
    _torch_muon._zeropower_via_newtonschulz = _newton_schulz_native_dtype
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = _bf16_newton_schulz


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose orthogonalisation runs in fp32 on CPU tensors."""

    @torch.no_grad()
    def step(self, closure=None):
        with _native_newton_schulz():
            return super().step(closure)


def make_muon(params: list[torch.Tensor], o) -> torch.optim.Optimizer:
    """Muon over `params` at optim.muon_lr; `lr_scale` lets one LR schedule drive every optimizer."""
    return Muon(
        [dict(params=params, lr_scale=o.muon_lr / o.lr if o.lr else 1.0)],
        lr=o.muon_lr,
        weight_decay=o.weight_decay,
        momentum=o.muon_momentum,
        adjust_lr_fn="original",  # lr scaled by sqrt(max(1, rows/cols)), as Keller Jordan's reference
    )
