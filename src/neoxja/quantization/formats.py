"""bitsandbytes' weight formats, value for value: 4-bit nf4/fp4 (with double quantization) and int8.

These are the formats transformers + bitsandbytes write, so the functions here reproduce
``bitsandbytes.functional.quantize_4bit`` (its CPU path), ``dequantize_4bit`` and
``int8_vectorwise_quant`` exactly: the same packed bytes, absmax, nested absmax and offset (tests
compare them with bitsandbytes). They are plain PyTorch and run on any device; the fast CPU
multiplications are in :mod:`neoxja.quantization.kernels`.

4-bit layout: the weight ``[out, in]`` is flattened; each run of ``blocksize`` values is scaled by
its absolute maximum (``absmax``) into [-1, 1] and each value replaced by the index of the nearest
entry of a 16-value code (nf4 or fp4); two indices share a byte, the even element in the high
nibble. Double quantization stores the float32 absmax values themselves in 8 bits: minus their
mean (``offset``), in blocks of 256 with bitsandbytes' signed dynamic code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4", "fp4")
# What a 4-bit weight dequantizes to (bitsandbytes has kernels for these alone): a quant state's
# "dtype" is looked up here, never taken as any attribute of torch.
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# nf4: quantiles of a standard normal (QLoRA), as bitsandbytes lists them.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# fp4 (1 sign, 2 exponent, 1 mantissa bits) in bit-pattern order, before scaling to [-1, 1].
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_4bit(quant_type: str) -> Tensor:
    """The 16 float32 values a 4-bit index stands for (before the block's absmax)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    values = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return values / values.abs().max()


def dynamic_code() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted float32 values), used for nested absmax.

    Per decade ``10**(e-6)`` for e in 0..6 it holds ``2**e`` midpoints of an even split of
    [0.1, 1], with both signs; then 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = 10 ** (e - 6) * mids
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _scale_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(absmax per block, values scaled into [-1, 1]) of a flat float32 tensor, as bitsandbytes."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).unsqueeze(1)), -1, 1).reshape(-1)
    if rem:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return absmax, scaled


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index into ``code`` of the entry nearest each value (ties to the lower one), int64."""
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return order[torch.bucketize(scaled, bounds, out_int32=True)]


@dataclass
class Quantized4bit:
    """A 4-bit weight in bitsandbytes' layout (what its ``QuantState`` plus the packed bytes hold)."""

    packed: Tensor  # uint8 [(n + 1) // 2, 1]
    absmax: Tensor  # float32 [blocks], or uint8 [blocks] with double quantization
    code: Tensor  # float32 [16]
    blocksize: int
    quant_type: str
    shape: tuple[int, int]
    dtype: torch.dtype  # the weight's dtype before quantization (what dequantization gives back)
    nested_absmax: Tensor | None = None  # float32 [ceil(blocks / 256)]
    nested_code: Tensor | None = None  # float32 [256]
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> Tensor:
        """The float32 absmax of every block (undoing double quantization)."""
        if not self.nested:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default: its own), exactly as bitsandbytes gives it."""
        high = (self.packed.view(-1) >> 4).to(torch.int64)
        low = (self.packed.view(-1) & 0xF).to(torch.int64)
        n = self.shape[0] * self.shape[1]
        values = self.code[torch.stack([high, low], dim=1).view(-1)[:n]]
        absmax = self.block_absmax()
        rem = n % self.blocksize
        full = n - rem
        out = torch.empty(n, dtype=torch.float32, device=values.device)
        out[:full] = (values[:full].view(-1, self.blocksize) * absmax[: full // self.blocksize, None]).view(
            -1
        )
        if rem:
            out[full:] = values[full:] * absmax[-1]
        return out.view(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes held: packed weight, absmax, code tables."""
        parts = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_blockwise(values: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(uint8 indices into the sorted 256-value ``code``, float32 absmax per block) of ``values``:
    the nested absmax of double quantization.

    As bitsandbytes' CPU kernel: no clamping (an all-zero block keeps absmax 0 and index 0), values
    divided by their block's absmax, the nearest entry taken (the lower one on a tie). bitsandbytes'
    own search rounds differently within about 1e-3 of a step around some midpoints, so a few
    indices in a thousand can differ from it by one step (see the README).
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    normed = (padded / absmax.unsqueeze(1)).reshape(-1)[:n]
    last = code.numel() - 1
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, last)
    left[normed.isnan()] = 0
    right = (left + 1).clamp(max=last)
    nearer = (normed - code[right]).abs() < (normed - code[left]).abs()
    return torch.where(nearer, right, left).to(torch.uint8).view(values.shape), absmax


def dequantize_blockwise(
    indices: Tensor, absmax: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> Tensor:
    """float32 values of blockwise-quantized ``indices`` (the inverse of :func:`quantize_blockwise`)."""
    values = code[indices.reshape(-1).to(torch.int64)]
    n = values.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
    if rem:
        out[full:] = values[full:] * absmax[-1]
    return out


def quantize_4bit(
    weight: Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False
) -> Quantized4bit:
    """``weight`` ``[out, in]`` (float32, float16 or bfloat16) in bitsandbytes' 4-bit format."""
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(
            f"blocksize={blocksize} is not a 4-bit blocksize bitsandbytes allows {BLOCKSIZES_4BIT}"
        )
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 weights, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"4-bit quantization takes a 2-d weight [out, in], got shape {list(weight.shape)}")
    code = code_4bit(quant_type).to(weight.device)
    absmax, scaled = _scale_blocks(weight.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = _nearest(scaled, code).to(torch.uint8)
    packed = ((index[::2] << 4) | index[1::2]).unsqueeze(1)
    result = Quantized4bit(packed, absmax, code, blocksize, quant_type, tuple(weight.shape), weight.dtype)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_code().to(weight.device)
        result.absmax, result.nested_absmax = quantize_blockwise(
            absmax - offset, nested_code, NESTED_BLOCKSIZE
        )
        result.nested_code = nested_code
        result.offset = offset.item()
    return result


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, float32 row absmax ``SCB``) of ``weight`` ``[out, in]``: LLM.int8's weight format."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"int8 quantization takes a 2-d float weight, got {weight.dtype} {list(weight.shape)}"
        )
    scb = weight.abs().amax(dim=1).float()
    return torch.round(weight * (127.0 / scb.unsqueeze(1))).to(torch.int8), scb


def dequantize_int8(weight: Tensor, scb: Tensor) -> Tensor:
    """The float32 weight an int8 weight and its ``SCB`` stand for."""
    return weight.float() * (scb.unsqueeze(1) / 127.0)
