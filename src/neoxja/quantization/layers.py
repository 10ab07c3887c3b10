"""Quantized linear layers: one :class:`~neoxja.linear.LinearFormat` class per weight format.

:class:`Linear4bit` (nf4, fp4; optionally double-quantized), :class:`Linear8bit` (int8) and
:class:`LinearBFloat16` hold their weight as buffers (frozen: not parameters, so no optimizer or
LoRA wrapper mistakes them for trainable weights) and multiply through the custom ops of
:mod:`neoxja.quantization.ops`. Their ``state_dict()`` is transformers + bitsandbytes'
serialization of the same layer (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``; ``weight``, ``SCB``,
``weight_format`` for int8), and :meth:`QuantizedLinear.from_state` builds a layer back from those
tensors, checking every key and shape. Unlike oneDNN packing, these layers also train: backward
gives the gradient with respect to the input, for LoRA on a quantized base.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from neoxja.linear import FORMATS, LinearFormat
from neoxja.quantization import formats, ops


class QuantizedLinear(LinearFormat):
    """A linear layer whose frozen weight is stored quantized (base of the classes below)."""

    def check_trainable(self) -> None:
        """Quantized layers train (their weight stays frozen; gradients flow to the input)."""

    def check_movable(self) -> None:
        """Quantized layers move between devices (see ``_apply``); dtype casts leave them as they are."""

    def train(self, mode: bool = True) -> QuantizedLinear:
        return nn.Module.train(self, mode)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        """Follow device moves (``model.to("cuda")``) but not dtype casts: the format fixes the dtypes."""
        device = fn(torch.empty(0, device=self._weights_device())).device
        for name, tensor in list(self._buffers.items()):
            if tensor is not None:
                self._buffers[name] = tensor.to(device)
        if self.bias is not None:
            self.bias.data = self.bias.data.to(device)
        return self

    def _weights_device(self) -> torch.device:
        return next(t for t in self._buffers.values() if t is not None).device

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        raise RuntimeError(
            f"{type(self).__name__} layers do not load state dicts in place: load a quantized "
            "checkpoint with from_pretrained (neoxja.quantization.loading)"
        )

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, **options: Any) -> QuantizedLinear:
        """This format's layer for a dense weight ``[out, in]`` (quantized here) and bias."""
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> QuantizedLinear:
        return cls.from_weight(linear.weight, linear.bias, **options)

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], prefix: str, bias: Tensor | None) -> QuantizedLinear:
        """A layer from its serialized tensors (keys after ``prefix``, e.g. ``"weight.absmax"``)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the layer holds (weight in its format, scales, bias)."""
        tensors = list(self.buffers()) + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in tensors)


def _require(tensors: dict[str, Tensor], prefix: str, key: str) -> Tensor:
    if key not in tensors:
        raise ValueError(
            f"quantized checkpoint: {prefix}{key} is missing (needed by the layer {prefix.rstrip('.')})"
        )
    return tensors[key]


def _check_shape(prefix: str, key: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"quantized checkpoint: {prefix}{key} has shape {list(tensor.shape)}, "
            f"the layer needs {list(shape)}"
        )


class Linear4bit(QuantizedLinear):
    """4-bit weights (nf4 or fp4) in bitsandbytes' blocks, optionally with double quantization."""

    format_name: ClassVar[str] = "4bit"
    quant_type: ClassVar[str] = ""

    def __init__(
        self, weight: formats.Quantized4bit, bias: Tensor | None, storage: torch.dtype = torch.uint8
    ):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self.offset = weight.offset
        self.quant_storage = storage
        self.register_buffer("weight", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        self.register_buffer("nested_absmax", weight.nested_absmax)
        self.register_buffer("nested_code", weight.nested_code)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        blocksize: int = 64,
        double_quant: bool = False,
        storage: torch.dtype = torch.uint8,
    ) -> Linear4bit:
        quantized = formats.quantize_4bit(weight.detach(), blocksize, cls.quant_type, double_quant)
        return cls(quantized, bias, storage)

    def quantized(self) -> formats.Quantized4bit:
        """The weight as a :class:`~neoxja.quantization.formats.Quantized4bit`."""
        return formats.Quantized4bit(
            self.weight, self.absmax, self.code, self.blocksize, self.quant_type,
            (self.out_features, self.in_features), self.weight_dtype, self.nested_absmax, self.nested_code,
            self.offset,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        y = ops.linear_4bit(
            x, self.weight, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset,
            self.blocksize, self.out_features,
        )  # fmt: skip
        return self._add_bias(y)

    def dense_weight(self) -> Tensor:
        return self.quantized().dequantize()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        packed = self.weight if self.quant_storage == torch.uint8 else self.weight.view(self.quant_storage)
        destination[prefix + "weight"] = packed
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        key = prefix + "weight."
        destination[key + "absmax"] = self.absmax
        destination[key + "quant_map"] = self.code
        info: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.weight_dtype).removeprefix("torch."),
            "shape": [self.out_features, self.in_features],
        }
        if self.nested_absmax is not None:
            destination[key + "nested_absmax"] = self.nested_absmax
            destination[key + "nested_quant_map"] = self.nested_code.clone()
            info.update(
                nested_blocksize=formats.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset
            )
        packed_info = torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8)
        destination[key + "quant_state.bitsandbytes__" + self.quant_type] = packed_info

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], prefix: str, bias: Tensor | None) -> Linear4bit:
        state_key = "weight.quant_state.bitsandbytes__" + cls.quant_type
        raw = _require(tensors, prefix, state_key)
        try:
            info = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
            out_features, in_features = (int(n) for n in info["shape"])
            blocksize = int(info["blocksize"])
            dtype = getattr(torch, info["dtype"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"quantized checkpoint: {prefix}{state_key} is not a valid quant state: {error}"
            ) from None
        if info.get("quant_type") != cls.quant_type:
            raise ValueError(
                f"quantized checkpoint: {prefix}{state_key} says quant_type={info.get('quant_type')!r}"
            )
        if blocksize not in formats.BLOCKSIZES_4BIT:
            raise ValueError(
                f"quantized checkpoint: {prefix}{state_key} has blocksize {blocksize}, not 4-bit's"
            )
        n = out_features * in_features
        blocks = -(-n // blocksize)
        packed = _require(tensors, prefix, "weight")
        storage = packed.dtype
        packed = packed.reshape(-1).view(torch.uint8).reshape(-1, 1)
        _check_shape(prefix, "weight", packed, ((n + 1) // 2, 1))
        code = _require(tensors, prefix, "weight.quant_map").float()
        _check_shape(prefix, "weight.quant_map", code, (16,))
        absmax = _require(tensors, prefix, "weight.absmax")
        _check_shape(prefix, "weight.absmax", absmax, (blocks,))
        weight = formats.Quantized4bit(
            packed, absmax, code, blocksize, cls.quant_type, (out_features, in_features), dtype
        )
        if "nested_offset" in info or "weight.nested_absmax" in tensors:
            weight.nested_absmax = _require(tensors, prefix, "weight.nested_absmax").float()
            _check_shape(
                prefix,
                "weight.nested_absmax",
                weight.nested_absmax,
                (-(-blocks // formats.NESTED_BLOCKSIZE),),
            )
            weight.nested_code = _require(tensors, prefix, "weight.nested_quant_map").float()
            _check_shape(prefix, "weight.nested_quant_map", weight.nested_code, (256,))
            if absmax.dtype != torch.uint8:
                raise ValueError(
                    f"quantized checkpoint: {prefix}weight.absmax must be uint8 with double quantization"
                )
            weight.offset = float(info.get("nested_offset", 0.0))
        else:
            weight.absmax = absmax.float()
        return cls(weight, bias, storage)

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        return f"{super().extra_repr()}, {self.quant_type}, blocksize={self.blocksize}{nested}"


class LinearNF4(Linear4bit):
    """4-bit NormalFloat weights (QLoRA's nf4)."""

    format_name = "nf4"
    quant_type = "nf4"


class LinearFP4(Linear4bit):
    """4-bit floating-point weights (bitsandbytes' fp4)."""

    format_name = "fp4"
    quant_type = "fp4"


class Linear8bit(QuantizedLinear):
    """int8 weights with one float32 scale per output row (LLM.int8's weight format)."""

    format_name = "int8"

    def __init__(self, weight: Tensor, scb: Tensor, bias: Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight)
        self.register_buffer("SCB", scb)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> Linear8bit:
        # transformers + bitsandbytes round the weight to float16 before taking its int8 rows
        return cls(*formats.quantize_int8(weight.detach().to(torch.float16)), bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._add_bias(ops.linear_int8(x, self.weight, self.SCB))

    def dense_weight(self) -> Tensor:
        return formats.dequantize_int8(self.weight, self.SCB)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "SCB"] = self.SCB
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # bitsandbytes' "row"

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], prefix: str, bias: Tensor | None) -> Linear8bit:
        weight = _require(tensors, prefix, "weight")
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(
                f"quantized checkpoint: {prefix}weight must be a 2-d int8 tensor, got {weight.dtype}"
            )
        scb = _require(tensors, prefix, "SCB").float()
        _check_shape(prefix, "SCB", scb, (weight.shape[0],))
        layout = tensors.get("weight_format")
        if layout is not None and int(layout) != 0:
            raise ValueError(
                f"quantized checkpoint: {prefix}weight_format={int(layout)}; only 0 (row) is supported"
            )
        return cls(weight, scb, bias)


class LinearBFloat16(QuantizedLinear):
    """bfloat16 weights (half of float32's bytes), multiplied in float32 on the CPU."""

    format_name = "bfloat16"

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> LinearBFloat16:
        return cls(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._add_bias(ops.linear_bf16(x, self.weight))

    def dense_weight(self) -> Tensor:
        return self.weight

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], prefix: str, bias: Tensor | None) -> LinearBFloat16:
        return cls(_require(tensors, prefix, "weight"), bias)


QUANTIZED_FORMATS: dict[str, type[QuantizedLinear]] = {
    cls.format_name: cls for cls in (LinearNF4, LinearFP4, Linear8bit, LinearBFloat16)
}
"""The quantized formats by name (``neoxja quantize --format``)."""
FORMATS.update(QUANTIZED_FORMATS)
