"""Weight formats for the model's linear layers, as explicit module swaps.

The network (:mod:`neoxja.network`) is built from plain ``nn.Linear`` layers and never changes
itself: forwards, ``generate()`` and pipelines leave every module, parameter and weight layout as
they are. A faster format is asked for explicitly: :func:`swap_linear_layers` replaces the
model's ``nn.Linear`` layers by a :class:`LinearFormat` subclass, in place, and
:func:`restore_dense` puts plain ``nn.Linear`` layers back.

Each format is one class. It builds itself from a dense layer (:meth:`LinearFormat.from_linear`),
gives one back (:meth:`LinearFormat.to_linear`), and its ``parameters()`` and ``state_dict()`` show
what it stores. :meth:`LinearFormat.dense_weight` gives the weight in transformers' layout, which
``state_dict()`` writes under ``weight`` so that ``save_pretrained`` stays in transformers' format
(a lossy format would raise there instead, saying why). A new format (bfloat16, int8, 4-bit) is a
new subclass registered in :data:`FORMATS`; nothing else branches on formats.

:class:`PackedLinear` is today's one format: the weight stored once in oneDNN's blocked layout,
which oneDNN multiplies faster than PyTorch's default CPU kernel for the few rows of decoding and
the prompt (the "packed" rows of ``benchmarks/bench_model.py``); outputs equal ``F.linear``'s within
float32 rounding. :func:`optimize_for_cpu_inference` swaps it into every large float32 CPU layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

MIN_PACKED_ELEMENTS = 1 << 18  # 1 MiB of float32: below that oneDNN's fixed cost outweighs its gain


def packing_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels that :class:`PackedLinear` needs."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class LinearFormat(nn.Module):
    """A linear layer ``y = x W^T (+ b)`` whose weight is stored in some format."""

    format_name: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def supports(cls, linear: nn.Linear) -> str | None:
        """Why ``linear`` cannot be stored in this format (None when it can)."""
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> LinearFormat:
        """This format's layer computing what ``linear`` computes (``options``: the format's settings)."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The weight as ``nn.Linear`` holds it ([out, in]); what ``state_dict()`` saves."""
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's weight and bias."""
        weight = self.dense_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=weight.dtype
        )
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        raise RuntimeError(
            f"{type(self).__name__} layers do not load state dicts: load into the dense model "
            "(neoxja.linear.restore_dense) and swap the format in again"
        )

    def check_movable(self) -> None:
        """Raise: a format layer does not change device or dtype (models call this before moving)."""
        raise RuntimeError(
            f"{type(self).__name__} layers cannot change device or dtype: call "
            "neoxja.linear.restore_dense(model) first, then move the model"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> LinearFormat:
        self.check_movable()
        return self

    def check_trainable(self) -> None:
        """Raise: format layers are for inference (models call this before switching to training)."""
        raise RuntimeError(
            f"{type(self).__name__} layers are for inference: call neoxja.linear.restore_dense(model) "
            "before training"
        )

    def train(self, mode: bool = True) -> LinearFormat:
        if mode:
            self.check_trainable()
        return super().train(False)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class PackedLinear(LinearFormat):
    """The weight in oneDNN's packed layout (float32, CPU), as a non-trainable parameter."""

    format_name = "onednn-packed"

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.weight = nn.Parameter(packed, requires_grad=False)

    @classmethod
    def supports(cls, linear: nn.Linear) -> str | None:
        weight = linear.weight
        if not packing_available():
            return "this PyTorch build has no oneDNN linear kernels"
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return f"the weight is {weight.dtype} on {weight.device}, not float32 on the CPU"
        if weight.numel() < MIN_PACKED_ELEMENTS:
            return f"the weight has {weight.numel()} elements, fewer than {MIN_PACKED_ELEMENTS}"
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        reason = cls.supports(linear)
        if reason is not None:
            raise ValueError(f"cannot pack {linear}: {reason}")
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear has no backward: run it without autograd, or restore_dense")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def dense_weight(self) -> Tensor:
        return self.weight.detach().to_dense()


FORMATS: dict[str, type[LinearFormat]] = {PackedLinear.format_name: PackedLinear}
"""Weight formats by name (the quantized ones register from :mod:`neoxja.quantization.layers`)."""


def format_class(name: str) -> type[LinearFormat]:
    """The weight format called ``name`` (``"onednn-packed"``; ``"bfloat16"``, ``"int8"``, ``"nf4"``,
    ``"fp4"`` once :mod:`neoxja.quantization.layers` is imported, which registers them)."""
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def swap_linear_layers(
    model: nn.Module,
    fmt: type[LinearFormat] | str,
    *,
    where: Callable[[str, nn.Linear], bool] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` of ``model`` that the format supports (and ``where(name,
    layer)`` accepts) by that format's layer; returns ``model``. ``options`` go to the format's
    ``from_linear`` (e.g. ``blocksize`` and ``double_quant`` of the 4-bit formats).

    A weight shared with another module (the output head tied to the input embedding) is copied
    into the format, so the new layer no longer follows later writes to the embedding.
    """
    cls = format_class(fmt) if isinstance(fmt, str) else fmt
    if model.training:
        raise RuntimeError(f"swapping in {cls.__name__} layers needs a model in eval mode (model.eval())")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            wanted = where is None or where(name, child)
            if type(child) is nn.Linear and wanted and cls.supports(child) is None:
                setattr(parent, child_name, cls.from_linear(child, **options).eval())
    return model


def optimize_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap :class:`PackedLinear` into every large float32 CPU linear layer of ``model`` (in place);
    returns ``model``. The C decoding step does not read packed layers, so ``generate()`` then runs
    its steps through PyTorch's packed kernels (``neoxja.explain_decoding`` says so)."""
    return swap_linear_layers(model, PackedLinear)


def restore_dense(model: nn.Module) -> nn.Module:
    """Put a plain ``nn.Linear`` back for every :class:`LinearFormat` layer of ``model`` (in place)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LinearFormat):
                setattr(parent, child_name, child.to_linear())
    tie = getattr(model, "tie_weights", None)
    if tie is not None:  # a packed head had its own copy of the tied embedding
        tie()
    return model


def is_optimized_for_cpu_inference(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a :class:`PackedLinear`."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
