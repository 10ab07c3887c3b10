"""CPU matrix products with quantized weights: ``y = x @ W.T`` for each format.

This module is the one place the quantized layers' CPU arithmetic lives. Today it is plain
PyTorch: the weight is dequantized (to float32) a tile of output rows at a time and each tile
multiplied with ``torch.mm``, so a layer never holds more than one tile of float weights besides
its quantized ones. That is exact (the products use the dequantized values bitsandbytes gives) but
not yet fast for decoding; direct kernels per format are the next step (see the README).
"""

from __future__ import annotations

import torch
from torch import Tensor

from neoxja.quantization import formats

TILE_ELEMENTS = 1 << 22  # float32 weights dequantized at once (16 MiB)


def extension_available() -> bool:
    """Whether compiled kernels are in use (not yet: PyTorch only)."""
    return False


def kernel_name() -> str:
    """The implementation the products run on."""
    return "torch"


def _check_x(x: Tensor, in_features: int) -> Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be float32 on the CPU, got {x.dtype} on {x.device}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features ; the weight takes {in_features}")
    return x.reshape(-1, in_features)


def _tiled(x: Tensor, out_features: int, in_features: int, tile_of) -> Tensor:
    """``x @ W.T`` with ``W`` given a tile of rows at a time by ``tile_of((begin, end))``."""
    rows = _check_x(x, in_features)
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    step = max(1, TILE_ELEMENTS // max(1, in_features))
    for begin in range(0, out_features, step):
        end = min(out_features, begin + step)
        out[:, begin:end] = rows @ tile_of((begin, end)).t()
    return out.view(*x.shape[:-1], out_features)


def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    offset: float = 0.0,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """float32 rows ``[begin, end)`` (default: all) of a 4-bit weight ``[out_features, in_features]``."""
    begin, end = rows if rows is not None else (0, out_features)
    if not 0 <= begin <= end <= out_features:
        raise ValueError(f"rows={rows} is not a range of the weight's {out_features} rows")
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or nested_code is None:
            raise ValueError("a uint8 absmax (double quantization) needs nested_absmax and nested_code")
        scales = formats.dequantize_blockwise(absmax, nested_absmax, nested_code) + offset
    else:
        scales = absmax
    first, last = begin * in_features, end * in_features
    if (first % blocksize, first % 2, last % 2) != (0, 0, 0):  # a tile must start on a block and a byte
        whole = formats.Quantized4bit(
            packed, scales, code, blocksize, "", (out_features, in_features), torch.float32
        ).dequantize(torch.float32)
        return whole[begin:end]
    count = (end - begin) * in_features
    part = formats.Quantized4bit(
        packed.view(-1)[first // 2 : (last + 1) // 2],
        scales[first // blocksize : -(-last // blocksize)],
        code,
        blocksize,
        "",
        (end - begin, in_features),
        torch.float32,
    )
    return part.dequantize(torch.float32).view(-1)[:count].view(end - begin, in_features)


def linear_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    offset: float = 0.0,
) -> Tensor:
    """``x @ W.T`` for a 4-bit weight in bitsandbytes' layout (float32 ``x`` [..., in])."""
    in_features = x.shape[-1]

    def tile(rows: tuple[int, int]) -> Tensor:
        return dequantize_4bit(
            packed, absmax, code, blocksize, out_features, in_features,
            nested_absmax, nested_code, offset, rows,
        )  # fmt: skip

    return _tiled(x, out_features, in_features, tile)


def dequantize_int8(weight: Tensor, scb: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
    """float32 rows ``[begin, end)`` (default: all) of an int8 weight with row absmax ``scb``."""
    begin, end = rows if rows is not None else (0, weight.shape[0])
    return formats.dequantize_int8(weight[begin:end], scb[begin:end])


def linear_int8(x: Tensor, weight: Tensor, scb: Tensor) -> Tensor:
    """``x @ W.T`` for an int8 weight with per-row absmax ``scb``."""
    if weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8, got {weight.dtype}")
    return _tiled(x, weight.shape[0], weight.shape[1], lambda rows: dequantize_int8(weight, scb, rows))


def linear_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ W.T`` for a bfloat16 weight, in float32."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"weight must be bfloat16, got {weight.dtype}")
    return _tiled(x, weight.shape[0], weight.shape[1], lambda rows: weight[rows[0] : rows[1]].float())
