"""A PyTorch model of the fast CPU arithmetic (csrc/weights.h), for the tests to compare the C kernels with.

* Activations: each row of x in blocks of :data:`ACT_BLOCK`; a block's scale is ``d = amax / 127``
  (``amax`` its largest ``|x|``) and its values ``q = round(x * (127 / amax))``, ties to even, all in
  float32 as the kernels compute them (so ``q`` and ``d`` are the kernels' own, bit for bit).
* 4-bit weights: the code looked up as ``lut = round(127 * code)``; ``y = sum_i lut[w_i] * q_i *
  absmax(w_i's block) * (d(x_i's block) / 127)``.
* int8 weights: ``y = scale_o * sum_i w_i * q_i * d(x_i's block)`` (``scale = SCB / 127``).
* bfloat16 weights: ``y = sum_i w_i * bfloat16(x_i)``.

Integer parts are exact and the sums here run in float64, so a kernel differs from this model only
by its float32 fold (one multiply-add per block or lane, then a sum of lanes). The exact arithmetic's
reference is here too: the weight a 4-bit format stands for, and a product within float32 rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neoxja.quantization.layers import Linear4bit, Linear8bit, LinearBFloat16

ACT_BLOCK = 64


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(q [rows, in] int64, d [rows, in] float32: each element's block scale) of float32 rows x."""
    rows, n = x.shape
    blocks = F.pad(x.float(), (0, -n % ACT_BLOCK)).view(rows, -1, ACT_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse).to(torch.int64).view(rows, -1)[:, :n]
    d = (amax / 127.0).expand_as(blocks).reshape(rows, -1)[:, :n]
    return q, d


def linear_4bit(x: Tensor, packed: Tensor, code: Tensor, absmax: Tensor, blocksize: int, out: int) -> Tensor:
    """The fast 4-bit product of float32 x [rows, in]; absmax: float32 per block (nesting undone)."""
    rows, n = x.shape
    byte = packed.reshape(-1).to(torch.int64)
    index = torch.stack([byte >> 4, byte & 15], 1).reshape(-1)[: out * n].view(out, n)
    lut = torch.round(127.0 * code.float()).double()
    q, d = quantize_rows(x)
    scale = absmax.float().repeat_interleave(blocksize)[: out * n].view(out, n).double()
    act = q.double() * (d / 127.0).double()  # float32 d / 127, as the kernels fold it
    return ((act[:, None, :] * lut[index][None] * scale[None]).sum(-1)).float()


def block_scales(absmax: Tensor, blocksize: int, out: int, n: int) -> Tensor:
    """Each weight's block absmax, [out, n]."""
    return absmax.float().repeat_interleave(blocksize)[: out * n].view(out, n)


def assert_fold(y: Tensor, reference: Tensor, magnitude: Tensor, what: str) -> None:
    """``y`` equals ``reference`` (this model) within a float32 fold of terms whose absolute values
    add up to ``magnitude``: what a kernel may differ by."""
    error = (y.double() - reference.double()).abs()
    allowed = 4e-6 * magnitude.double() + 1e-30
    worst = float((error / allowed).max()) if error.numel() else 0.0
    assert bool((error <= allowed).all()), f"{what}: error {worst:.3g}x what the float fold allows"


def linear_int8(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """The fast int8 product of float32 x [rows, in]; scale: float32 per output row (SCB / 127)."""
    q, d = quantize_rows(x)
    return ((q.double() * d.double()) @ weight.double().T * scale.double()).float()


def linear_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """The fast bfloat16 product (where the CPU has AVX512_BF16): x rounded to bfloat16."""
    return (x.bfloat16().double() @ weight.double().T).float()


def weight_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out: int,
    in_: int,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: float,
) -> torch.Tensor:
    """The float64 weight a 4-bit format stands for, computed here from its definition."""
    n = out * in_
    byte = packed.reshape(-1).long()
    index = torch.stack([byte >> 4, byte & 15], 1).reshape(-1)[:n]
    if absmax.dtype == torch.uint8:
        per_block = nested_absmax.double().repeat_interleave(256)[: absmax.numel()]
        scales = nested_code.double()[absmax.long()] * per_block + offset
    else:
        scales = absmax.double()
    return (code.double()[index] * scales.repeat_interleave(blocksize)[:n]).view(out, in_)


def assert_product(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> str:
    """``y`` is ``x @ weight.T`` within float32 accumulation (and ``y``'s own rounding)."""
    reference = x.double() @ weight.T
    assert y.shape == reference.shape and y.dtype == x.dtype, (y.shape, y.dtype, reference.shape, x.dtype)
    bound = x.double().abs() @ weight.abs().T
    error = (y.double() - reference.to(x.dtype).double()).abs()
    allowed = 1e-5 * bound + 1e-6 + 2 * torch.finfo(x.dtype).eps * reference.abs()
    assert bool((error <= allowed).all()), f"error {float((error - allowed).max())} beyond the bound"
    return f"max error {float(error.max()) if error.numel() else 0.0:.2e}"


class FastReference(nn.Module):
    """A quantized layer computed by this model of the fast arithmetic (PyTorch, float64 sums)."""

    def __init__(self, layer: nn.Module, bf16_native: bool) -> None:
        super().__init__()
        self.layer = layer
        self.bf16_native = bf16_native

    def forward(self, x: Tensor) -> Tensor:
        layer, rows = self.layer, x.reshape(-1, x.shape[-1]).float()
        if isinstance(layer, Linear4bit):
            absmax = layer.quantized().block_absmax()
            y = linear_4bit(rows, layer.weight, layer.code, absmax, layer.blocksize, layer.out_features)
        elif isinstance(layer, Linear8bit):
            y = linear_int8(rows, layer.weight, layer.SCB.float() / 127.0)
        elif self.bf16_native:
            y = linear_bf16(rows, layer.weight)
        else:  # without AVX512_BF16 the fast bfloat16 product is the float32 one
            y = (rows.double() @ layer.weight.double().T).float()
        return y.view(*x.shape[:-1], -1)


def fast_reference_model(model: nn.Module, bf16_native: bool) -> nn.Module:
    """A copy of ``model`` whose quantized layers compute the fast arithmetic in PyTorch."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, (Linear4bit, Linear8bit, LinearBFloat16)):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, FastReference(module, bf16_native))
    return reference
