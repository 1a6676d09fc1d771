"""kernels.py: decoding's int8 and bf16 matrix-vector products, built once per machine, and the fallback."""

from __future__ import annotations

import os

import pytest
import torch

from scratchgpt import kernels
from scratchgpt.quantize import Bf16Linear, Int4Linear, Int8Linear

needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason="no C compiler with OpenMP, or no AVX-512: torch's kernels run instead")
SHAPES = [(64, 96), (576, 960), (100, 33), (1536, 40), (17, 5)]  # K not a multiple of 16 or 64: the tails


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@needs_kernels
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_rows_compute_what_torch_int8_layers_compute(k, n, rows, bias):
    torch.manual_seed(k + n + rows)
    q = Int8Linear(torch.nn.Linear(k, n, bias=bias))
    x = torch.randn(rows, k)
    exact = (bf16_round(x).double() @ q.weight.double().t()) * q.scales.double()  # the defined product, unrounded
    got = kernels.int8_rows(x, q.weight, q.scales, q.bias)
    biased = bf16_round(exact.float()) + (q.bias if bias else 0)
    # fp32 sums in another order can only move a result across a bf16 rounding boundary: one bf16 step at most
    step = exact.abs().float() * 2 ** -7 + 1e-30
    assert ((got - biased).abs() <= step + 1e-6).all()
    assert (got - biased).abs().gt(1e-6).float().mean() < 0.05  # and rarely


@needs_kernels
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_rows_are_the_fp32_product_with_bf16_weights(k, n, rows):
    torch.manual_seed(k * n + rows)
    lin = torch.nn.Linear(k, n)
    b = Bf16Linear(lin)
    x = torch.randn(rows, k)
    ref = x.double() @ lin.weight.to(torch.bfloat16).double().t() + lin.bias.double()
    got = kernels.bf16_rows(x, b.weight, b.bias)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert b.weight.dtype == torch.bfloat16 and b.rows(x).shape == (rows, n)


@pytest.mark.parametrize("cls", [Int8Linear, Bf16Linear])
def test_layers_agree_with_and_without_the_kernels(cls, monkeypatch):
    """The quantized layers give the same results (bf16: within its rounding) without the kernels, or past MAX_ROWS
    rows."""
    torch.manual_seed(0)
    layer = cls(torch.nn.Linear(64, 48))
    x = torch.randn(2, 64)
    fast = layer.rows(x)
    many = layer.rows(torch.cat([x] * 8))[:2]  # 16 rows: torch's kernels
    monkeypatch.setenv("SCRATCHGPT_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None and not kernels.usable(x)
        slow = layer.rows(x)
    finally:
        kernels.library.cache_clear()
    for other in (many, slow):  # (bf16 without the kernels rounds its inputs and outputs too: ~2^-9 of each)
        assert (fast - other).abs().max() <= 2 ** -7 * fast.abs().max()


def test_int8_layers_are_right_for_any_width():
    """torch's int8 kernel reads inputs 16 at a time and returns garbage for other widths: such layers multiply
    the dequantized weights instead."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 33)
    q = Int8Linear(lin)
    x = torch.randn(12, 100)  # more rows than the kernels take
    assert (q(x) - lin(x)).abs().max() / lin(x).abs().max() < 0.02


def test_a_failed_build_falls_back_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert not kernels.usable(torch.zeros(1, 4))
    finally:
        kernels.library.cache_clear()
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "kernels"])  # no half-written library, no temporary file


@needs_kernels
def test_the_build_is_cached_with_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(tmp_path))
    old = os.umask(0o027)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        (built,) = (tmp_path / "kernels").iterdir()
        assert built.name.startswith("decode-") and built.stat().st_mode & 0o777 == 0o750
        stamp = built.stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.library() is not None and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        os.umask(old)
        kernels.library.cache_clear()


def test_an_unwritable_cache_falls_back(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SCRATCHGPT_CACHE_DIR", str(blocked))  # kernels/ cannot be made under a file
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()
    assert blocked.read_text() == "not a folder"


@pytest.mark.parametrize("bias", [True, False])
def test_decoding_rows_are_the_layers_rows(bias):
    """What DecodeStep calls (a kernel bound once, or torch's int4 kernel without the checks) is `rows`."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    x = torch.randn(2, 64)
    for layer in (Int8Linear(lin), Int4Linear(lin), Bf16Linear(lin)):
        fast = layer.decoding_rows(2, torch.float32, reuse_output=True)
        first = fast(x).clone()
        assert torch.equal(first, layer.rows(x)) or torch.allclose(first, layer.rows(x), rtol=2 ** -7, atol=1e-6)
        assert torch.equal(fast(x), first)  # the same call twice: the same result (in the reused buffer)
    assert Int8Linear(lin).decoding_rows(2, torch.bfloat16, True) is not None  # another dtype: plain rows


def test_no_home_or_an_unreadable_cache_falls_back(monkeypatch):
    """cache_dir() raising (HOME unset and no passwd entry) or the cache unreadable (a folder an earlier sudo run
    left): torch's ops run, no error."""
    import scratchgpt.runtime

    for error in (RuntimeError("Could not determine home directory."), PermissionError(13, "Permission denied")):
        def broken(error=error):
            raise error
        monkeypatch.setattr(scratchgpt.runtime, "cache_dir", broken)
        kernels.library.cache_clear()
        try:
            assert kernels.library() is None
        finally:
            kernels.library.cache_clear()


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_the_kernels_write_fp32_whatever_the_default_dtype(default):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 64)
    want = Int8Linear(lin).rows(x), Bf16Linear(lin).rows(x)
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = Int8Linear(lin).rows(x), Bf16Linear(lin).rows(x)
    finally:
        torch.set_default_dtype(old)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)
