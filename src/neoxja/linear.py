"""Weight layout for fast CPU decoding.

A decoding step is a chain of matrix-vector products (batch 1) or skinny GEMMs (small batches), so
its speed is set by how fast the weights stream from memory. PyTorch's CPU kernels read an
``nn.Linear`` weight ``[out, in]`` stored row-major noticeably slower in that regime than the same
matrix stored column-major (``[in, out]`` contiguous, i.e. ``weight.t().contiguous().t()``): on the
2-core development machine the 32000 x 768 LM head takes ~4.2 ms instead of ~7.8 ms per token.

:func:`optimize_for_cpu_inference` rewrites each linear weight (and a tied input embedding, which
is the same tensor) into that layout *in place*:

* the ``Parameter`` objects stay the same, with the same shape and values, so ``state_dict()`` keys
  and values, weight tying, ``save_pretrained`` output and later module swaps (quantized linears)
  are untouched; only the strides change;
* the old storage is released, so memory is not doubled (one matrix is copied at a time);
* the results equal ``nn.Linear``'s up to float rounding (the reduction order differs), within
  1e-5 in float32.

The layout is an inference choice: :func:`restore_row_major` undoes it (e.g. before training, where
row-major is what the backward kernels prefer), and it is refused on a model in training mode.
"""

from __future__ import annotations

import torch
from torch import nn

_LAYOUT_FLAG = "_neoxja_cpu_inference_layout"


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """Distinct weight matrices of every ``nn.Linear`` and ``nn.Embedding`` (tied ones once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(module.weight, nn.Parameter):
            seen.setdefault(id(module.weight), module.weight)
    return list(seen.values())


def is_column_major(weight: torch.Tensor) -> bool:
    """True when a 2-D ``weight`` ``[out, in]`` is stored as a contiguous ``[in, out]`` matrix."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


@torch.no_grad()
def optimize_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Store the linear weights of ``model`` column-major for fast CPU decoding; returns ``model``.

    Only float32 CPU weights of ``nn.Linear`` / ``nn.Embedding`` are changed (other dtypes and
    devices have their own fast paths). Calling it again is a no-op. Raises ``RuntimeError`` if the
    model is in training mode: call ``model.eval()`` first, or :func:`restore_row_major` to undo.
    """
    if model.training:
        raise RuntimeError(
            "optimize_for_cpu_inference needs a model in eval mode (model.eval()); the column-major "
            "layout is for decoding, training prefers the row-major one"
        )
    for weight in _weights(model):
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2:
            if not is_column_major(weight) and weight.shape[0] > 1 and weight.shape[1] > 1:
                weight.data = weight.data.t().contiguous().t()
    setattr(model, _LAYOUT_FLAG, True)
    return model


@torch.no_grad()
def restore_row_major(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_for_cpu_inference`: every weight contiguous (row-major) again."""
    for weight in _weights(model):
        if not weight.data.is_contiguous():
            weight.data = weight.data.contiguous()
    if hasattr(model, _LAYOUT_FLAG):
        delattr(model, _LAYOUT_FLAG)
    return model


def is_optimized_for_cpu_inference(model: nn.Module) -> bool:
    """Whether :func:`optimize_for_cpu_inference` has been applied to ``model`` (and not undone)."""
    return bool(getattr(model, _LAYOUT_FLAG, False))
