"""CPU matrix products with quantized weights: ``y = x @ W.T`` for each format.

The one place the quantized layers' CPU arithmetic lives. Decoding (up to :data:`MATVEC_ROWS` rows
of ``x``) runs neoxja's C kernels (``neoxja._quant``: AVX-512, AVX2 or portable C), which read each
quantized weight once and multiply by it directly. Prompts dequantize the weight a tile of output
rows at a time (the C kernel again) and multiply each tile through PyTorch's matrix product, so a
layer never holds more than one tile of float weights beside its quantized ones. Without the
extension, or for shapes the C path does not take, the same products run in PyTorch. All of them
use the values bitsandbytes dequantizes to.

Each product takes an ``arithmetic`` (:mod:`neoxja.quantization.arithmetic`): ``"exact"`` computes
in float32 throughout; ``"fast"`` multiplies prompts' tiles in bfloat16 (the activation and the
dequantized tile rounded to bfloat16, oneDNN's product, its result rounded to bfloat16 by PyTorch's
CPU kernel and returned as float32) where the CPU has AVX512_BF16 or AMX
(:func:`bfloat16_matmul_feature`), which there runs ~4.6x float32 BLAS; elsewhere, and for decoding
rows until the integer kernels land, ``"fast"`` computes as ``"exact"`` does.

Every function checks its tensors first (:func:`check_4bit`, :func:`check_dense`, :func:`check_x`:
dtypes, each size against the others, the tables double quantization needs, the device), with a
ValueError or TypeError naming the argument, and hands the C kernels contiguous numpy views, which
the C entry points check once more (they are importable on their own).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from neoxja.quantization import formats

try:
    from neoxja import _quant
except ImportError:  # built without a C compiler: PyTorch only
    _quant = None

TILE_ELEMENTS = 1 << 22  # weights dequantized at once (16 MiB in float32, 8 MiB in bfloat16)
MATVEC_ROWS = 8  # rows of x the C kernels take per call (decoding); more go tile by tile through BLAS
ARITHMETICS = ("fast", "exact")  # the values of every product's ``arithmetic`` (see arithmetic.py)


def extension_available() -> bool:
    """Whether the C kernels (``neoxja._quant``) were built."""
    return _quant is not None


def kernel_name() -> str:
    """The implementation decoding runs on: ``avx512``, ``avx2``, ``scalar`` or ``torch``."""
    return _quant.kernel() if _quant is not None else "torch"


@functools.cache
def bfloat16_matmul_feature() -> str | None:
    """The CPU feature with which oneDNN multiplies bfloat16 natively here (``"AMX"`` or
    ``"AVX512_BF16"``), or None: then a bfloat16 product is no faster than float32 BLAS, and the
    ``"fast"`` prompt path keeps float32 tiles. Read from the CPU's features (PyTorch's probes), never
    from timings, so a result does not depend on the machine's load."""
    if not torch.backends.mkldnn.is_available():
        return None
    for feature, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return feature
    return None


def decode_path(fmt: str, arithmetic: str) -> str:
    """What multiplies up to :data:`MATVEC_ROWS` rows of a ``fmt`` layer with ``arithmetic``."""
    check_arithmetic(arithmetic)
    if _quant is None:
        return "float32 tiles through PyTorch (neoxja._quant is not built)"
    text = f"float32 activations on the {kernel_name()} kernel"
    return text if arithmetic == "exact" else text + " (the fast kernels are not in this build)"


def prompt_path(fmt: str, arithmetic: str) -> str:
    """What multiplies more than :data:`MATVEC_ROWS` rows of a ``fmt`` layer with ``arithmetic``."""
    check_arithmetic(arithmetic)
    feature = bfloat16_matmul_feature()
    if arithmetic == "exact":
        return "float32 tiles through BLAS"
    if feature is None:
        return "float32 tiles through BLAS (the CPU has neither AVX512_BF16 nor AMX)"
    what = "the bfloat16 weight" if fmt == "bfloat16" else "bfloat16 tiles"
    return f"{what} through oneDNN ({feature})"


def check_arithmetic(value: Any, name: str = "arithmetic") -> str:
    """``value`` if it is ``"fast"`` or ``"exact"``, else a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in ARITHMETICS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, ARITHMETICS))}, got {value!r}")
    return value


def _bfloat16_tiles(arithmetic: str) -> bool:
    """Whether a product of many rows with ``arithmetic`` multiplies bfloat16 tiles (see the module)."""
    check_arithmetic(arithmetic)
    return arithmetic == "fast" and bfloat16_matmul_feature() is not None


def _threads() -> int:
    return torch.get_num_threads()


def _array(t: Tensor | None) -> Any:
    """``t`` as the C kernels take it: a numpy view (bfloat16 as int16), made contiguous; None stays."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _tensor(value: Any, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _whole(value: Any, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")
    return value


def _dtype(t: Tensor, name: str, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {wanted}, got {str(t.dtype).removeprefix('torch.')}")


def _numel(t: Tensor, name: str, count: int, what: str) -> None:
    if t.numel() != count:
        raise ValueError(f"{name} holds {t.numel()} values; {what} needs {count}")


def check_4bit(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
) -> None:
    """Refuse a 4-bit weight whose parts disagree, naming the argument (ValueError, TypeError).

    ``packed`` uint8 holds ``ceil(out * in / 2)`` bytes; ``code`` 16 float32 values; ``absmax`` one
    float32 per block of ``blocksize`` values, or (double quantization) one uint8 per block with
    ``nested_absmax`` (float32, one per 256 blocks) and ``nested_code`` (256 float32). Only shapes and
    dtypes are read, so this also runs on meta and fake tensors (``torch.compile``), on any device.
    """
    for name, value, optional in (
        ("packed", packed, False), ("absmax", absmax, False), ("code", code, False),
        ("nested_absmax", nested_absmax, True), ("nested_code", nested_code, True),
    ):  # fmt: skip
        _tensor(value, name, optional)
    _whole(blocksize, "blocksize", 1)
    _whole(out_features, "out_features", 1)
    _whole(in_features, "in_features", 1)
    weights = out_features * in_features
    what = f"a 4-bit weight of out_features={out_features}, in_features={in_features}"
    _dtype(packed, "packed", torch.uint8)
    _numel(packed, "packed", (weights + 1) // 2, what)
    _dtype(code, "code", torch.float32)
    _numel(code, "code", 16, "a 4-bit code table")
    blocks = -(-weights // blocksize)
    _dtype(absmax, "absmax", torch.float32, torch.uint8)
    _numel(absmax, "absmax", blocks, f"{what} in blocks of {blocksize}")
    if absmax.dtype == torch.float32:
        if nested_absmax is not None or nested_code is not None:
            raise ValueError("nested_absmax and nested_code go with a uint8 absmax (double quantization)")
        return
    if nested_absmax is None or nested_code is None:
        raise ValueError("a uint8 absmax (double quantization) needs nested_absmax and nested_code")
    _dtype(nested_absmax, "nested_absmax", torch.float32)
    _numel(nested_absmax, "nested_absmax", -(-blocks // formats.NESTED_BLOCKSIZE), f"{blocks} blocks")
    _dtype(nested_code, "nested_code", torch.float32)
    _numel(nested_code, "nested_code", 256, "a double-quantization code table")


def check_dense(weight: Tensor, scb: Tensor | None = None) -> None:
    """Refuse an int8 weight ``[out, in]`` without its ``scb`` (one float per row), or a weight that is
    not 2-d int8 (with ``scb``) or bfloat16 (without), naming the argument."""
    _tensor(weight, "weight")
    _tensor(scb, "scb", optional=True)
    _dtype(weight, "weight", torch.int8 if scb is not None else torch.bfloat16)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-d [out, in] tensor, got shape {list(weight.shape)}")
    if scb is not None:
        if not scb.is_floating_point():
            raise ValueError(f"scb must be a floating-point tensor, got {scb.dtype}")
        if scb.shape != weight.shape[:1]:
            raise ValueError(
                f"scb has shape {list(scb.shape)}; an int8 weight {list(weight.shape)} "
                f"needs [{weight.shape[0]}]"
            )


def check_x(x: Tensor, in_features: int) -> None:
    """Refuse an ``x`` that is not a floating-point tensor ``[..., in_features]``, naming it."""
    _tensor(x, "x")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {list(x.shape)}; the weight takes [..., {in_features}]")


def x_features(x: Tensor) -> int:
    """The in_features of ``x`` [..., in_features] (at least 1), which sets a 4-bit weight's width."""
    _tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x has shape {list(x.shape)}; it must be [..., in_features] with in_features >= 1")
    return x.shape[-1]


def _on_cpu(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the CPU kernels take tensors on the CPU")


def _check_x(x: Tensor, in_features: int) -> Tensor:
    check_x(x, in_features)
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be float32 on the CPU, got {x.dtype} on {x.device}")
    return x.reshape(-1, in_features)


def _tiled(
    x: Tensor, out_features: int, in_features: int, tile_of, dtype: torch.dtype = torch.float32
) -> Tensor:
    """float32 ``x @ W.T`` with ``W`` given a tile of rows at a time by ``tile_of((begin, end))``, as
    ``dtype`` (float32, or bfloat16: then ``x`` is rounded to bfloat16 once and each tile's product
    is oneDNN's bfloat16 one)."""
    rows = _check_x(x, in_features)
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    left = rows.to(dtype)
    step = max(1, TILE_ELEMENTS // max(1, in_features))
    for begin in range(0, out_features, step):
        end = min(out_features, begin + step)
        out[:, begin:end] = left @ tile_of((begin, end)).t()
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
    check_4bit(packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code)
    _on_cpu(packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax, nested_code=nested_code)
    begin, end = rows if rows is not None else (0, out_features)
    if not 0 <= begin <= end <= out_features:
        raise ValueError(f"rows={rows} is not a range of the weight's {out_features} rows")
    nested = absmax.dtype == torch.uint8
    if _quant is not None and in_features % blocksize == 0 and blocksize % 2 == 0:
        out = torch.empty(end - begin, in_features, dtype=torch.float32)
        _quant.dequantize_4bit(
            begin, end - begin, out_features, in_features, _array(packed), _array(code),
            None if nested else _array(absmax), _array(absmax) if nested else None,
            _array(nested_absmax), _array(nested_code), offset, blocksize, out.numpy(), _threads(),
        )  # fmt: skip
        return out
    if nested:
        scales = formats.dequantize_blockwise(absmax, nested_absmax, nested_code) + offset
    else:
        scales = absmax
    packed, scales, code = packed.contiguous(), scales.contiguous(), code.contiguous()
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
    arithmetic: str = "exact",
) -> Tensor:
    """``x @ W.T`` for a 4-bit weight in bitsandbytes' layout (float32 ``x`` [..., in]), with
    ``arithmetic`` ``"exact"`` or ``"fast"`` (see the module)."""
    in_features = x_features(x)
    check_4bit(packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code)
    tiles = torch.bfloat16 if _bfloat16_tiles(arithmetic) else torch.float32
    _on_cpu(packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax, nested_code=nested_code)
    rows = _check_x(x, in_features)
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    matvec = rows.shape[0] <= MATVEC_ROWS and in_features % blocksize == 0 and blocksize % 32 == 0
    if _quant is not None and matvec:
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        nested = absmax.dtype == torch.uint8
        _quant.linear_4bit(
            _array(rows), rows.shape[0], in_features, out_features, _array(packed), _array(code),
            None if nested else _array(absmax), _array(absmax) if nested else None,
            _array(nested_absmax), _array(nested_code), offset, blocksize, y.numpy(), _threads(),
        )  # fmt: skip
        return y.view(*x.shape[:-1], out_features)

    def tile(rows: tuple[int, int]) -> Tensor:
        return dequantize_4bit(
            packed, absmax, code, blocksize, out_features, in_features,
            nested_absmax, nested_code, offset, rows,
        ).to(tiles)  # fmt: skip

    return _tiled(x, out_features, in_features, tile, tiles)


def dequantize_int8(weight: Tensor, scb: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
    """float32 rows ``[begin, end)`` (default: all) of an int8 weight with row absmax ``scb``."""
    check_dense(weight, scb)
    begin, end = rows if rows is not None else (0, weight.shape[0])
    if not 0 <= begin <= end <= weight.shape[0]:
        raise ValueError(f"rows={rows} is not a range of the weight's {weight.shape[0]} rows")
    return formats.dequantize_int8(weight[begin:end], scb[begin:end].float())


def _matvec_dense(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor | None:
    """The C kernel's ``x @ W.T`` for int8 (with ``scale``) or bfloat16 weights, or None when it
    does not apply (no extension, too many rows, a weight that is not contiguous)."""
    rows = _check_x(x, weight.shape[1])
    if _quant is None or rows.shape[0] > MATVEC_ROWS or not weight.is_contiguous():
        return None
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    if rows.shape[0]:
        _quant.linear_dense(
            _array(rows), rows.shape[0], weight.shape[1], weight.shape[0], _array(weight), _array(scale),
            y.numpy(), _threads(),
        )  # fmt: skip
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_int8(x: Tensor, weight: Tensor, scb: Tensor, arithmetic: str = "exact") -> Tensor:
    """``x @ W.T`` for an int8 weight with per-row absmax ``scb``, with ``arithmetic`` ``"exact"`` or
    ``"fast"`` (see the module). bfloat16 holds every int8 value exactly, so the fast prompt path
    multiplies the int8 rows themselves and scales the product's columns afterwards: only the
    activation and the product are rounded, never the weight."""
    check_dense(weight, scb)
    _on_cpu(weight=weight, scb=scb)
    bfloat16 = _bfloat16_tiles(arithmetic)
    scale = scb.float() / 127.0
    y = _matvec_dense(x, weight, scale)
    if y is not None:
        return y
    if bfloat16:

        def int8_rows(rows: tuple[int, int]) -> Tensor:  # int8 values are exact in bfloat16
            return weight[rows[0] : rows[1]].to(torch.bfloat16)

        return _tiled(x, weight.shape[0], weight.shape[1], int8_rows, torch.bfloat16).mul_(scale)
    return _tiled(x, weight.shape[0], weight.shape[1], lambda rows: dequantize_int8(weight, scb, rows))


def linear_bf16(x: Tensor, weight: Tensor, arithmetic: str = "exact") -> Tensor:
    """``x @ W.T`` for a bfloat16 weight, with ``arithmetic`` ``"exact"`` (float32) or ``"fast"`` (see
    the module: prompts multiply the weight as it is held, with the activation rounded to bfloat16)."""
    check_dense(weight)
    _on_cpu(weight=weight)
    bfloat16 = _bfloat16_tiles(arithmetic)
    y = _matvec_dense(x, weight, None)
    if y is not None:
        return y
    if bfloat16:
        rows = _check_x(x, weight.shape[1])
        y = torch.nn.functional.linear(rows.to(torch.bfloat16), weight).float()
        return y.view(*x.shape[:-1], weight.shape[0])
    return _tiled(x, weight.shape[0], weight.shape[1], lambda rows: weight[rows[0] : rows[1]].float())
