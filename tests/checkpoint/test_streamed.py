"""StreamedTensors (import_hf's writer): the file safetensors' save_file writes, made one tensor at a time."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from scratchgpt.checkpoint import StreamedTensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    names = ["transformer.h.10.mlp.c_fc.weight", "transformer.h.2.ln_1.weight", "transformer.wte.weight",
             "lm_head.weight", "transformer.h.0.attn.c_attn.bias", "名前.weight"]
    shapes = [(6, 4), (4,), (11, 4), (11, 4), (12,), (3, 1)]
    return {n: torch.randn(*s, generator=g) for n, s in zip(names, shapes)}


def test_the_same_bytes_as_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    StreamedTensors({k: v.shape for k, v in tensors.items()},
                    {k: (lambda v=v: v.clone()) for k, v in tensors.items()}).write(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_one_tensor_at_a_time(tmp_path):
    """Each tensor is made when its turn comes, and the one before it is gone by then."""
    tensors, made = _tensors(), []

    def maker(name: str):
        def make() -> torch.Tensor:
            assert all(ref() is None for ref in made), "the previous tensor is still held"
            t = tensors[name].clone()
            made.append(weakref.ref(t))
            return t
        return make

    StreamedTensors({k: v.shape for k, v in tensors.items()}, {k: maker(k) for k in tensors}).write(tmp_path / "c")
    assert len(made) == len(tensors)


def test_a_tensor_unlike_its_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match="header says"):
        StreamedTensors({"w": (2, 3)}, {"w": lambda: torch.zeros(3, 2)}).write(tmp_path / "d")
    with pytest.raises(ValueError, match="header says"):
        StreamedTensors({"w": (2,)}, {"w": lambda: torch.zeros(2, dtype=torch.float16)}).write(tmp_path / "e")
