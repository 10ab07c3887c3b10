"""The quantized matrix products as PyTorch custom ops (``torch.ops.neoxja.*``), with backward.

Each op computes ``x @ W.T`` for a weight held in one format, dispatched by device: on the CPU
neoxja's kernels (:mod:`neoxja.quantization.kernels`, whatever ``x``'s dtype, with the op's
``arithmetic``: ``"exact"``, the default for direct calls, computes in float32; ``"fast"`` as
:mod:`neoxja.quantization.arithmetic` describes), on CUDA bitsandbytes' kernels when it is
installed (else a clear error; ``arithmetic`` is then bitsandbytes' own). The result has ``x``'s
dtype. Being custom ops, they show up as single nodes to ``torch.compile`` and the profiler, and
their autograd formula gives the gradient with respect to ``x`` (the weights are frozen), which is
what LoRA on a quantized base (QLoRA) needs: ``grad_x = grad_y @ W``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neoxja.quantization import formats, kernels


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise RuntimeError(
            "quantized layers on CUDA run on bitsandbytes' kernels: pip install 'neoxja[bnb]' "
            "(bitsandbytes), or keep the model on the CPU"
        ) from error
    return bitsandbytes


def _quant_state(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, dtype):
    """bitsandbytes' ``QuantState`` for a 4-bit weight (CUDA path)."""
    functional = _bitsandbytes().functional
    state2 = None
    if nested_absmax is not None:
        state2 = functional.QuantState(
            absmax=nested_absmax, code=nested_code, blocksize=256, dtype=torch.float32
        )
    quant_type = "fp4" if code[1] > 0 else "nf4"
    return functional.QuantState(
        absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type=quant_type,
        dtype=dtype, offset=None if state2 is None else torch.tensor(offset, device=absmax.device),
        state2=state2,
    )  # fmt: skip


def _check_devices(x: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: the op needs them on one device")


# Each op checks its arguments (dtypes, every size against the others, the tables double
# quantization needs, devices) before it dispatches, and so does its fake implementation: a call
# that disagrees is a ValueError or TypeError naming the argument, on every device and under
# torch.compile, never a read outside a tensor.


def _check_4bit(
    x, packed, absmax, code, nested_absmax, nested_code, blocksize, out_features, arithmetic
) -> None:
    kernels.check_arithmetic(arithmetic)
    in_features = kernels.x_features(x)
    kernels.check_x(x, in_features)
    kernels.check_4bit(packed, absmax, code, blocksize, out_features, in_features, nested_absmax, nested_code)
    _check_devices(
        x, packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax, nested_code=nested_code
    )


def _check_dense(x: Tensor, weight: Tensor, scb: Tensor | None, arithmetic: str) -> None:
    kernels.check_arithmetic(arithmetic)
    kernels.check_dense(weight, scb)
    kernels.check_x(x, weight.shape[1])
    _check_devices(x, weight=weight, scb=scb)


# ----- 4-bit -------------------------------------------------------------------------------------


@torch.library.custom_op("neoxja::linear_4bit", mutates_args=())
def linear_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: float,
    blocksize: int,
    out_features: int,
    arithmetic: str = "exact",
) -> Tensor:
    """``x @ W.T`` for a 4-bit weight ``W`` [out_features, x.shape[-1]] in bitsandbytes' layout."""
    _check_4bit(x, packed, absmax, code, nested_absmax, nested_code, blocksize, out_features, arithmetic)
    if x.device.type == "cuda":
        bnb = _bitsandbytes()
        state = _quant_state(
            packed,
            absmax,
            code,
            nested_absmax,
            nested_code,
            offset,
            blocksize,
            (out_features, x.shape[-1]),
            x.dtype,
        )
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)
    y = kernels.linear_4bit(
        x.float(), packed, absmax, code, blocksize, out_features,
        nested_absmax=nested_absmax, nested_code=nested_code, offset=offset, arithmetic=arithmetic,
    )  # fmt: skip
    return y.to(x.dtype)


@linear_4bit.register_fake
def _(
    x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, out_features, arithmetic="exact"
):
    _check_4bit(x, packed, absmax, code, nested_absmax, nested_code, blocksize, out_features, arithmetic)
    return x.new_empty((*x.shape[:-1], out_features))


def _dequantized_4bit(
    x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, out_features, _
):
    shape = (out_features, x.shape[-1])
    if x.device.type == "cuda":
        state = _quant_state(
            packed, absmax, code, nested_absmax, nested_code, offset, blocksize, shape, x.dtype
        )
        return _bitsandbytes().functional.dequantize_4bit(packed, state)
    return kernels.dequantize_4bit(
        packed, absmax, code, blocksize, out_features, x.shape[-1],
        nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
    )  # fmt: skip


def _setup_4bit(ctx, inputs, output) -> None:
    ctx.weight_inputs = inputs


def _backward_4bit(ctx, grad: Tensor):
    weight = _dequantized_4bit(*ctx.weight_inputs)
    grad_x = (grad.to(weight.dtype) @ weight).to(grad.dtype)
    return grad_x, None, None, None, None, None, None, None, None, None


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


# ----- int8 --------------------------------------------------------------------------------------


@torch.library.custom_op("neoxja::linear_int8", mutates_args=())
def linear_int8(x: Tensor, weight: Tensor, scb: Tensor, arithmetic: str = "exact") -> Tensor:
    """``x @ W.T`` for an int8 weight with per-row absmax ``scb`` (LLM.int8's weight format)."""
    _check_dense(x, weight, scb, arithmetic)
    if x.device.type == "cuda":
        return (x @ formats.dequantize_int8(weight, scb).to(x.dtype).t()).to(x.dtype)
    return kernels.linear_int8(x.float(), weight, scb, arithmetic).to(x.dtype)


@linear_int8.register_fake
def _(x, weight, scb, arithmetic="exact"):
    _check_dense(x, weight, scb, arithmetic)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_int8(ctx, inputs, output) -> None:
    ctx.weight_inputs = inputs[1:3]


def _backward_int8(ctx, grad: Tensor):
    weight, scb = ctx.weight_inputs
    dense = (
        kernels.dequantize_int8(weight, scb)
        if weight.device.type == "cpu"
        else formats.dequantize_int8(weight, scb)
    )
    return (grad.to(dense.dtype) @ dense).to(grad.dtype), None, None, None


linear_int8.register_autograd(_backward_int8, setup_context=_setup_int8)


# ----- bfloat16 weights ---------------------------------------------------------------------------


@torch.library.custom_op("neoxja::linear_bf16", mutates_args=())
def linear_bf16(x: Tensor, weight: Tensor, arithmetic: str = "exact") -> Tensor:
    """``x @ W.T`` for a bfloat16 weight: on the CPU with ``arithmetic`` (float32 for ``"exact"``),
    on CUDA in bfloat16."""
    _check_dense(x, weight, None, arithmetic)
    if x.device.type == "cuda":
        return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)
    return kernels.linear_bf16(x.float(), weight, arithmetic).to(x.dtype)


@linear_bf16.register_fake
def _(x, weight, arithmetic="exact"):
    _check_dense(x, weight, None, arithmetic)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_bf16(ctx, inputs, output) -> None:
    ctx.weight = inputs[1]


def _backward_bf16(ctx, grad: Tensor):
    return (grad.float() @ ctx.weight.float()).to(grad.dtype), None, None


linear_bf16.register_autograd(_backward_bf16, setup_context=_setup_bf16)
