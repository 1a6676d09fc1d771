"""Weight-only bf16 / int8 / int4 quantization of a trained GPT, for generation (`--quantize bf16|int8|int4`).

Decoding one token at batch 1 reads every weight once and does two FLOPs with it, so on a
CPU it runs at memory speed: GPT-2 124M in fp32 streams ~500 MB per token. Storing the
Linear weights as int8 with one fp32-derived scale per output row cuts that 4x (the scheme of
gpt-fast and torchao's int8 weight-only), and torch's `_weight_int8pack_mm` kernel multiplies
them directly against bf16 activations. Measured on the project's 2-core CPU (BENCHMARKS.md):
the GPT-2-shaped model's matrix-vector products take 18.6 ms per token instead of 40 ms.

What changes: every Linear inside the blocks and the output head (a tied head gets its own
int8 copy; the embedding table stays fp32 for lookups). Norms, attention, the residual stream
and the KV cache stay in fp32; only each matmul's input is rounded to bf16. The cost in model
quality is measured by `scratchgpt eval RUN --quantize int8` (BENCHMARKS.md gives figures).

`int4` goes one step further, as llama.cpp's Q4 and gpt-fast's int4 do: 4-bit weights in groups
of 32 along the input, each group with its own scale and offset (asymmetric), multiplied by
`_weight_int4pack_mm_for_cpu` on CPUs (~1.6x int8's speed, at a larger quality cost) and by
tinygemm's `_weight_int4pack_mm` on CUDA GPUs of compute capability 8.0+ (Ampere and newer). The
two kernels read the same groups packed two different ways, so a layer is packed for the device
its weights are on: quantize after moving the model. The kernels need the output size to be a
multiple of 16, so other layers (e.g. a 65-character head) stay int8.
`bf16` stores the weights in bfloat16 (half of fp32's bytes); decoding through kernels.py keeps the inputs,
sums and outputs in fp32, torch's bf16 matmul (prompts, machines without the kernels) rounds them to bf16.
On x86 CPUs with AVX-512, int8 and bf16 layers multiply a few rows (decoding) through kernels.py's C loops,
which stream the weights faster than torch's kernels: the same products, sums in another order.
Training never sees these modules: quantize a loaded model, not one you will train further.
"""

from __future__ import annotations

import typing
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from . import UserError, kernels

Quantize = Literal["none", "int8", "int4", "bf16"]  # the --quantize choices
QUANTIZE_CHOICES = typing.get_args(Quantize)
INT4_GROUP = 32  # input features per (scale, offset) pair
ACT_DTYPE = torch.bfloat16  # the kernel's fast path: fp32 inputs take a ~7x slower route on CPU (measured)


class _QuantizedLinear(nn.Module):
    """What the formats share: y = x W^T + b, the kernel taking bf16 rows, the bias added in fp32."""

    bits = 0
    kernel: Optional[str] = None  # kernels.bound's kind for a few fp32 rows on an AVX-512 CPU, where there is one
    quantized = True  # model.DecodeStep calls such layers' `rows` directly

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # (rows, in) bf16 -> (rows, out) bf16
        raise NotImplementedError

    def rows(self, x2d: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) in x2d's dtype (with a bias: the bias' dtype, which the add promotes to)."""
        if self.kernel is not None and kernels.usable(x2d) and self._fp32_bias():
            return self._bound(x2d.size(0), reuse_output=False)(x2d)  # the same product, faster
        y = self._matmul(x2d.to(ACT_DTYPE))
        return y.to(x2d.dtype) if self.bias is None else torch.add(y, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def decoding_rows(self, rows: int, dtype: torch.dtype, reuse_output: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """`rows` for a decoder that always passes `rows` contiguous rows of `dtype` (model.DecodeStep): the
        kernel bound once where kernels.py runs this layer (with reuse_output, each result is overwritten by the
        next call), else `rows` itself."""
        if self.kernel is None or not kernels.takes(rows, dtype, self.weight.device) or not self._fp32_bias():
            return self.rows
        return self._bound(rows, reuse_output)

    def _bound(self, rows: int, reuse_output: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        return kernels.bound(self.kernel, self.weight, getattr(self, "scales", None), self.bias, rows, reuse_output)

    def _fp32_bias(self) -> bool:  # (what the kernels add)
        return self.bias is None or self.bias.dtype == torch.float32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int{self.bits}"


class Int8Linear(_QuantizedLinear):
    """W stored as int8 rows times a per-row scale (symmetric, max-abs)."""

    bits = 8
    kernel = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(ACT_DTYPE))

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.in_features % 16:  # the kernel reads inputs 16 at a time: other widths give garbage (torch 2.13)
            return (torch.mm(x2d.float(), self.weight.t().float()) * self.scales.float()).to(x2d.dtype)
        return torch._weight_int8pack_mm(x2d, self.weight, self.scales)


class Int4Linear(_QuantizedLinear):
    """W in 4-bit groups: w = (q - 8) * scale + offset, per group of INT4_GROUP inputs."""

    bits = 4
    INNER_K_TILES = 2  # tinygemm's tiling of the packed weight (2, 4 or 8); needs in_features % (16 x this)

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__(linear)
        n, k = linear.out_features, linear.in_features
        g = linear.weight.detach().float().reshape(n, k // group, group)
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-6) / 15
        q = ((g - low) / scale).round_().clamp_(0, 15).to(torch.int32).reshape(n, k)
        offset = low + 8 * scale  # the kernels compute (q - 8) * scale + offset
        self.group = group
        self.packed_for = linear.weight.device.type
        if self.packed_for == "cuda":  # two 4-bit values a byte, the even column in the high nibble
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), self.INNER_K_TILES)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, self.INNER_K_TILES)
        self.register_buffer("weight", packed)
        # (k/group, n, 2): both kernels' layout
        self.register_buffer("scales_offsets", torch.cat([scale, offset], -1).transpose(0, 1).contiguous().to(ACT_DTYPE))

    @staticmethod
    def fits(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
        return linear.out_features % 16 == 0 and linear.in_features % max(group, 16 * Int4Linear.INNER_K_TILES) == 0

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.device.type != self.packed_for:
            raise UserError(f"int4 weights packed for {self.packed_for} cannot run on {x2d.device.type}: "
                            "quantize the model after moving it")
        if self.packed_for == "cuda":
            return torch._weight_int4pack_mm(x2d, self.weight, self.group, self.scales_offsets)
        return torch._weight_int4pack_mm_for_cpu(x2d, self.weight, self.group, self.scales_offsets)

    def decoding_rows(self, rows: int, dtype: torch.dtype, reuse_output: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """`rows` without its checks and Python layers, for a decoder's fixed rows of fp32 on a CPU: torch's
        int4 kernel streams these weights faster than a C loop of ours did (BENCHMARKS.md's experiment log)."""
        if self.packed_for != "cpu" or self.weight.device.type != "cpu" or dtype != torch.float32 or not self._fp32_bias():
            return self.rows
        mm, w, group, so, bias = torch._weight_int4pack_mm_for_cpu, self.weight, self.group, self.scales_offsets, self.bias
        if bias is None:
            return lambda x: mm(x.to(ACT_DTYPE), w, group, so).float()
        return lambda x: torch.add(mm(x.to(ACT_DTYPE), w, group, so), bias)


class Bf16Linear(_QuantizedLinear):
    """W stored in bfloat16 (half of fp32's bytes, its exponent range: no scales needed). Through kernels.py
    (decoding on an AVX-512 CPU) the inputs, sums and outputs stay fp32, so only the weights are rounded;
    elsewhere (a prompt's many rows, other machines) torch's bf16 matmul rounds inputs and outputs as well."""

    bits = 16
    kernel = "bf16"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous())

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        # torch has no fp32 x bf16 product (widening the weights every call costs 2x fp32's time): its bf16
        # matmul rounds the inputs and outputs to bf16 too
        return torch.mm(x2d, self.weight.t())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bf16"


def quantize_linears(model: nn.Module, bits: int) -> nn.Module:
    """Replace the model's Linear layers with Int8Linear (bits=8), Int4Linear (bits=4, where the shape
    allows; Int8Linear elsewhere) or Bf16Linear (bits=16) in place; returns the model in eval mode."""
    devices = {p.device for p in model.parameters()}
    on_cuda = any(d.type == "cuda" for d in devices)
    op = "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm" if on_cuda else "_weight_int4pack_mm_for_cpu"
    if bits != 16 and not hasattr(torch, op):
        raise UserError(f"--quantize int{bits} needs torch.{op}, which this torch lacks")
    if bits == 4 and on_cuda:
        for d in devices:
            major, minor = torch.cuda.get_device_capability(d)
            if major < 8:  # tinygemm uses Ampere's tensor-core instructions
                raise UserError(f"--quantize int4 on CUDA needs compute capability 8.0 or newer (Ampere+); "
                                f"{torch.cuda.get_device_name(d)} is {major}.{minor}: use --quantize int8 there")
    elif bits == 4 and any(d.type not in ("cpu", "cuda") for d in devices):
        other = next(d.type for d in devices if d.type not in ("cpu", "cuda"))
        raise UserError(f"--quantize int4 runs on CPUs and CUDA GPUs, not on {other} "
                        "(use --quantize int8, or --device cpu)")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped = [name for name, m in targets if type(m) is not nn.Linear]
    if wrapped or hasattr(model, "peft_config"):
        choice = "bf16" if bits == 16 else f"int{bits}"
        raise UserError(f"--quantize {choice}: this model has adapter (LoRA) layers; fold them in first with "
                        "`scratchgpt merge-lora`")
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = Bf16Linear(m) if bits == 16 else Int4Linear(m) if bits == 4 and Int4Linear.fits(m) else Int8Linear(m)
        setattr(parent, child, quantized.to(m.weight.device))
    return model.eval()


def quantize_model(model: nn.Module, quantize: Optional[Quantize]) -> nn.Module:
    """Apply a `--quantize` choice ("none"/None leaves the model as it is)."""
    if quantize in (None, "none"):
        return model
    if quantize in ("int8", "int4", "bf16"):
        return quantize_linears(model, bits=16 if quantize == "bf16" else int(quantize[3:]))
    raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
