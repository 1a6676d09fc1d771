"""Optimizers: Muon (batched Newton-Schulz, its dtype chosen by measurement) against torch's own, AdamW."""

from __future__ import annotations

import pytest
import torch

from scratchgpt import muon as muon_module
from scratchgpt.muon import Muon, newton_schulz
from scratchgpt.optim import OptimConfig


def _muon_run(cls, dtype_patch=None, **kw):
    import torch.optim._muon as tm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(48, 16), (16, 16), (16, 48), (48, 16), (16, 64)]]
    opt = cls(params, lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn="original", **kw)
    original = tm._zeropower_via_newtonschulz
    if dtype_patch is not None:
        tm._zeropower_via_newtonschulz = lambda g, c, s, e: newton_schulz(g[None], c, s, e, dtype_patch)[0]
    try:
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
    finally:
        tm._zeropower_via_newtonschulz = original
    return params


def test_batched_muon_matches_torch_muon():
    """The CPU path (same-shaped updates stacked, NS in fp32 or bf16) is torch.optim.Muon's update."""
    ref32 = _muon_run(torch.optim.Muon, dtype_patch=torch.float32)
    ours32 = _muon_run(Muon, ns_dtype=torch.float32)
    for a, b in zip(ref32, ours32):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ref16 = _muon_run(torch.optim.Muon)  # torch's own bf16 iteration
    ours16 = _muon_run(Muon, ns_dtype=torch.bfloat16)
    for a, b in zip(ref16, ours16):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_muon_ns_steps_reaches_the_iteration():
    from scratchgpt.muon import make_muon

    opt = make_muon([torch.nn.Parameter(torch.randn(16, 48))], OptimConfig(optimizer="muon", muon_ns_steps=3))
    assert opt.param_groups[0]["ns_steps"] == 3
    ref3 = _muon_run(torch.optim.Muon, dtype_patch=torch.float32, ns_steps=3)
    ours3 = _muon_run(Muon, ns_dtype=torch.float32, ns_steps=3)
    ours5 = _muon_run(Muon, ns_dtype=torch.float32)
    for a, b, c in zip(ref3, ours3, ours5):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(b, c, atol=1e-4) for b, c in zip(ours3, ours5))


SHAPES = [(96, 32), (32, 96), (32, 32), (128, 32)]


def _muon(params, **kw):
    return muon_module.Muon([dict(params=params)], lr=0.02, momentum=0.95, adjust_lr_fn="original", **kw)


@pytest.mark.parametrize("times, chosen", [
    ({"float32": 1.0, "bfloat16": 0.5}, torch.bfloat16),
    ({"float32": 1.0, "bfloat16": 0.95}, torch.float32),  # within the margin: not worth bf16's rounding
    ({"float32": 1.0, "bfloat16": 3.0}, torch.float32),  # emulated bf16
])
def test_newton_schulz_dtype_is_chosen_by_measurement(monkeypatch, tmp_path, times, chosen):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    calls = []
    monkeypatch.setattr(muon_module, "time_newton_schulz", lambda stacks, **kw: calls.append(stacks) or dict(times))
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = _muon(params)
    assert opt.ns_dtype == chosen and opt.param_groups[0]["ns_dtype"] == str(chosen).removeprefix("torch.")
    assert calls == [{(32, 96): 2, (32, 32): 1, (32, 128): 1}]  # the model's own stacks, W and W^T together
    _muon(params)
    assert len(calls) == 1  # once per process


def test_the_newton_schulz_choice_is_cached_per_machine(monkeypatch, tmp_path):
    """A later process reads the first one's choice, whatever its own timing would say (a busy machine)."""
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    monkeypatch.setattr(muon_module, "time_newton_schulz", lambda stacks, **kw: {"float32": 1.0, "bfloat16": 0.1})
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    assert _muon(params).ns_dtype == torch.bfloat16 and "measured" in muon_module.ns_source()
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})  # a new process, on a loaded machine
    monkeypatch.setattr(muon_module, "time_newton_schulz", lambda stacks, **kw: {"float32": 0.1, "bfloat16": 1.0})
    assert _muon(params).ns_dtype == torch.bfloat16 and "cached" in muon_module.ns_source()
    assert _muon(params, ns_dtype=torch.float32).ns_dtype == torch.float32  # a flag pins it
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path / "elsewhere"))  # another machine measures for itself
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    assert _muon(params).ns_dtype == torch.float32


def test_real_measurement_times_both_dtypes():
    times = muon_module.time_newton_schulz({(32, 96): 2}, rounds=1)
    assert set(times) == {"float32", "bfloat16"} and all(0 < t < 10 for t in times.values())


def test_small_stacks_are_timed_whole_and_large_ones_a_matrix_at_a_time(monkeypatch):
    """bf16's gain on small matrices shows only in a batched stack: timing one matrix of 12 chose fp32 where
    the whole stack runs 1.8x faster in bf16 (AMX); a GPT-2-sized stack must still cost one matrix."""
    timed = []
    monkeypatch.setattr(muon_module, "newton_schulz", lambda x, *a: timed.append(tuple(x.shape)))
    muon_module.time_newton_schulz({(128, 384): 12, (128, 128): 4, (768, 3072): 24}, rounds=1)
    assert {(12, 128, 384), (4, 128, 128), (1, 768, 3072)} == set(timed)


def test_a_resumed_muon_keeps_its_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    monkeypatch.setattr(muon_module, "time_newton_schulz", lambda stacks, **kw: {"float32": 1.0, "bfloat16": 0.1})
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path / "a"))
    saved = _muon(params).state_dict()
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path / "b"))  # resumed on another machine
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    monkeypatch.setattr(muon_module, "time_newton_schulz", lambda stacks, **kw: {"float32": 0.1, "bfloat16": 1.0})
    resumed = _muon(params)
    assert resumed.ns_dtype == torch.float32
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["ns_dtype"] == "bfloat16"


def test_bf16_and_fp32_newton_schulz_give_the_same_step():
    torch.manual_seed(0)
    start = [torch.randn(*s) for s in SHAPES]
    grads = [torch.randn(*s) for s in SHAPES]
    after = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = _muon(params, ns_dtype=dtype)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        after[dtype] = [p.detach() for p in params]
    for w0, a, b in zip(start, after[torch.float32], after[torch.bfloat16]):
        update = (a - w0).norm()
        assert update > 0 and (a - b).norm() / update < 0.03  # bf16 rounding: ~1% of the update
