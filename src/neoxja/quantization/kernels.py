"""CPU matrix products with quantized weights: ``y = x @ W.T`` for each format.

The one place the quantized layers' CPU arithmetic lives. Decoding (up to :data:`MATVEC_ROWS` rows
of ``x``) runs neoxja's C kernels (``neoxja._quant``: AVX-512, AVX2 or portable C), which read each
quantized weight once and multiply by it directly. Prompts dequantize the weight to float32 a tile
of output rows at a time (the C kernel again) and multiply each tile through BLAS (``torch.mm``),
so a layer never holds more than one tile of float weights beside its quantized ones. Without the
extension, or for shapes the C path does not take, the same products run in PyTorch. All of them
use the values bitsandbytes dequantizes to, in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neoxja.quantization import formats

try:
    from neoxja import _quant
except ImportError:  # built without a C compiler: PyTorch only
    _quant = None

TILE_ELEMENTS = 1 << 22  # float32 weights dequantized at once (16 MiB)
MATVEC_ROWS = 8  # rows of x the C kernels take per call (decoding); more go tile by tile through BLAS


def extension_available() -> bool:
    """Whether the C kernels (``neoxja._quant``) were built."""
    return _quant is not None


def kernel_name() -> str:
    """The implementation decoding runs on: ``avx512``, ``avx2``, ``scalar`` or ``torch``."""
    return _quant.kernel() if _quant is not None else "torch"


def _threads() -> int:
    return torch.get_num_threads()


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


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
    if _quant is not None and in_features % blocksize == 0 and blocksize % 2 == 0:
        out = torch.empty(end - begin, in_features, dtype=torch.float32)
        nested = absmax.dtype == torch.uint8
        _quant.dequantize_4bit(
            begin, end - begin, in_features, packed.data_ptr(), code.data_ptr(),
            0 if nested else absmax.data_ptr(), absmax.data_ptr() if nested else 0,
            _address(nested_absmax), _address(nested_code), offset, blocksize, out.data_ptr(), _threads(),
        )  # fmt: skip
        return out
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
    rows = _check_x(x, in_features).contiguous()
    matvec = rows.shape[0] <= MATVEC_ROWS and in_features % blocksize == 0 and blocksize % 32 == 0
    if _quant is not None and matvec:
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        nested = absmax.dtype == torch.uint8
        _quant.linear_4bit(
            rows.data_ptr(), rows.shape[0], in_features, out_features, packed.data_ptr(), code.data_ptr(),
            0 if nested else absmax.data_ptr(), absmax.data_ptr() if nested else 0,
            _address(nested_absmax), _address(nested_code), offset, blocksize, y.data_ptr(), _threads(),
        )  # fmt: skip
        return y.view(*x.shape[:-1], out_features)

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


def _matvec_dense(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor | None:
    """The C kernel's ``x @ W.T`` for int8 (with ``scale``) or bfloat16 weights, or None when it
    does not apply (no extension, too many rows)."""
    rows = _check_x(x, weight.shape[1]).contiguous()
    if _quant is None or rows.shape[0] > MATVEC_ROWS or not weight.is_contiguous():
        return None
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    _quant.linear_dense(
        rows.data_ptr(), rows.shape[0], weight.shape[1], weight.shape[0], weight.data_ptr(), _address(scale),
        y.data_ptr(), _threads(),
    )  # fmt: skip
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_int8(x: Tensor, weight: Tensor, scb: Tensor) -> Tensor:
    """``x @ W.T`` for an int8 weight with per-row absmax ``scb``."""
    if weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8, got {weight.dtype}")
    y = _matvec_dense(x, weight, (scb.float() / 127.0).contiguous())
    if y is not None:
        return y
    return _tiled(x, weight.shape[0], weight.shape[1], lambda rows: dequantize_int8(weight, scb, rows))


def linear_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ W.T`` for a bfloat16 weight, in float32."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"weight must be bfloat16, got {weight.dtype}")
    y = _matvec_dense(x, weight, None)
    if y is not None:
        return y
    return _tiled(x, weight.shape[0], weight.shape[1], lambda rows: weight[rows[0] : rows[1]].float())
