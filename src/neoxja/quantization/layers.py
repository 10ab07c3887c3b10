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

Each layer carries ``arithmetic`` (``"fast"``, the default, or ``"exact"``), set when it is built:
the CPU arithmetic its products use (:mod:`neoxja.quantization.arithmetic`, whose ``resolve``
applies the ``NEOXJA_CPU_ARITHMETIC`` override at each call).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from neoxja import jsonfile
from neoxja.linear import FORMATS, LinearFormat
from neoxja.quantization import formats, ops
from neoxja.quantization.arithmetic import Arithmetic, check_arithmetic, resolve
from neoxja.quantization.config import STORAGE_DTYPES

# bitsandbytes' QuantState.from_dict accepts these keys in a serialized quant state and no others
_NESTED_STATE_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")
_QUANT_STATE_KEYS = {"quant_type", "blocksize", "dtype", "shape", *_NESTED_STATE_KEYS}


class QuantizedLinear(LinearFormat):
    """A linear layer whose frozen weight is stored quantized (base of the classes below)."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, cpu_arithmetic: str) -> None:
        super().__init__(in_features, out_features, bias)
        self.arithmetic: Arithmetic = check_arithmetic(cpu_arithmetic, "cpu_arithmetic")  # type: ignore[assignment]

    def resolved_arithmetic(self) -> Arithmetic:
        """The arithmetic the next product uses (the environment's override, else ``self.arithmetic``)."""
        return resolve(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, arithmetic={self.arithmetic}"

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
    def from_state(
        cls,
        tensors: dict[str, Tensor],
        prefix: str,
        bias: Tensor | None,
        files: Mapping[str, str | os.PathLike] | None = None,
        cpu_arithmetic: str = "fast",
    ) -> QuantizedLinear:
        """A layer from its serialized tensors (keys after ``prefix``, e.g. ``"weight.absmax"``; ``files``:
        the file each came from, for the errors), every key, shape and value checked; it computes with
        ``cpu_arithmetic``."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the layer holds (weight in its format, scales, bias)."""
        tensors = list(self.buffers()) + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in tensors)


class SerializedLayer:
    """One layer's serialized tensors (keys after ``prefix``) as a checkpoint brought them, read with
    errors that name the file (where known) and the key of every value refused."""

    def __init__(
        self, tensors: dict[str, Tensor], prefix: str, files: Mapping[str, str | os.PathLike] | None = None
    ) -> None:
        self.tensors, self.prefix, self.files = tensors, prefix, dict(files or {})

    def where(self, key: str) -> str:
        """``"<file>: <prefix><key>"``, the file being the key's own or else the layer weight's."""
        file = self.files.get(key, self.files.get("weight"))
        return f"{file if file is not None else 'quantized checkpoint'}: {self.prefix}{key}"

    def error(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self.where(key)} {problem}")

    def require(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise ValueError(
                f"quantized checkpoint: {self.prefix}{key} is missing (needed by the layer "
                f"{self.prefix.rstrip('.')})"
            )
        return self.tensors[key]

    def check_keys(self, allowed: set[str]) -> None:
        """Refuse tensors the format has no place for (they would be dropped without a word)."""
        extra = sorted(set(self.tensors) - allowed)
        if extra:
            raise self.error(extra[0], f"is not part of a {self.prefix.rstrip('.')} layer's format")

    def check_shape(self, key: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(shape):
            raise self.error(key, f"has shape {list(tensor.shape)}, the layer needs {list(shape)}")

    def floats(self, key: str, tensor: Tensor, low: float, high: float) -> Tensor:
        """``tensor`` as float32 (the kernels' arithmetic), refused unless it is a float tensor whose
        every value is finite and within [low, high]; the error gives the first bad value's index."""
        if not tensor.is_floating_point():
            raise self.error(key, f"holds {tensor.dtype} values; the format stores floats here")
        values = tensor.float()
        bad = ~torch.isfinite(values) | (values < low) | (values > high)
        if bad.any():
            index = [int(i) for i in bad.nonzero()[0]]
            raise self.error(
                key,
                f"holds {values[tuple(index)].item()!r} at index {index}; the format needs finite values "
                f"in [{low:g}, {high:g}]",
            )
        return values

    def quant_state(self, key: str) -> dict[str, Any]:
        """The JSON object bitsandbytes packs into the uint8 tensor ``key``."""
        raw = self.require(key)
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise self.error(
                key, f"must be a 1-d uint8 tensor (JSON bytes), got {raw.dtype} {list(raw.shape)}"
            )
        info = jsonfile.loads(raw.cpu().numpy().tobytes(), self.where(key))
        if not isinstance(info, dict):
            raise self.error(key, f"is not a valid quant state: a JSON {type(info).__name__}, not an object")
        unknown = sorted(set(info) - _QUANT_STATE_KEYS)
        if unknown:
            raise self.error(key, f"has keys bitsandbytes does not know: {', '.join(unknown)}")
        return info

    def state_int(self, key: str, info: dict[str, Any], field: str) -> int:
        value = info.get(field)
        if type(value) is not int:
            raise self.error(key, f"has {field}={value!r}; it must be an integer")
        return value


class Linear4bit(QuantizedLinear):
    """4-bit weights (nf4 or fp4) in bitsandbytes' blocks, optionally with double quantization."""

    format_name: ClassVar[str] = "4bit"
    quant_type: ClassVar[str] = ""

    def __init__(
        self,
        weight: formats.Quantized4bit,
        bias: Tensor | None,
        storage: torch.dtype = torch.uint8,
        cpu_arithmetic: str = "fast",
    ):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, cpu_arithmetic)
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
        cpu_arithmetic: str = "fast",
    ) -> Linear4bit:
        quantized = formats.quantize_4bit(weight.detach(), blocksize, cls.quant_type, double_quant)
        return cls(quantized, bias, storage, cpu_arithmetic)

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
            self.blocksize, self.out_features, self.resolved_arithmetic(),
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
    def from_state(
        cls,
        tensors: dict[str, Tensor],
        prefix: str,
        bias: Tensor | None,
        files: Mapping[str, str | os.PathLike] | None = None,
        cpu_arithmetic: str = "fast",
    ) -> Linear4bit:
        layer = SerializedLayer(tensors, prefix, files)
        state_key = "weight.quant_state.bitsandbytes__" + cls.quant_type
        info = layer.quant_state(state_key)
        if info.get("quant_type") != cls.quant_type:
            raise layer.error(state_key, f"says quant_type={info.get('quant_type')!r}")
        blocksize = layer.state_int(state_key, info, "blocksize")
        if blocksize not in formats.BLOCKSIZES_4BIT:
            raise layer.error(state_key, f"has blocksize {blocksize}, not 4-bit's {formats.BLOCKSIZES_4BIT}")
        dtype = formats.WEIGHT_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise layer.error(
                state_key, f"has dtype={info.get('dtype')!r}, not one of {', '.join(formats.WEIGHT_DTYPES)}"
            )
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
            raise layer.error(state_key, f"has shape={shape!r}; it must be [out_features, in_features]")
        nested = "weight.nested_absmax" in tensors or any(key in info for key in _NESTED_STATE_KEYS)
        layer.check_keys(
            {"weight", "bias", "weight.absmax", "weight.quant_map", state_key}
            | ({"weight.nested_absmax", "weight.nested_quant_map"} if nested else set())
        )
        out_features, in_features = shape
        n = out_features * in_features
        blocks = -(-n // blocksize)
        packed = layer.require("weight")
        storage = packed.dtype
        if str(storage).removeprefix("torch.") not in STORAGE_DTYPES:
            raise layer.error(
                "weight", f"is {storage}, not a 4-bit storage dtype ({', '.join(STORAGE_DTYPES)})"
            )
        packed = packed.reshape(-1).view(torch.uint8).reshape(-1, 1)
        layer.check_shape("weight", packed, ((n + 1) // 2, 1))
        code = layer.require("weight.quant_map")
        layer.check_shape("weight.quant_map", code, (16,))
        standard = formats.code_4bit(cls.quant_type).to(code.device)
        if not torch.allclose(layer.floats("weight.quant_map", code, -1, 1), standard, rtol=0, atol=1e-6):
            # bitsandbytes decodes with quant_type's fixed table whatever the file holds, so another
            # table would give other weights here than in transformers: no writer makes one.
            raise layer.error("weight.quant_map", f"is not bitsandbytes' {cls.quant_type} table")
        absmax = layer.require("weight.absmax")
        layer.check_shape("weight.absmax", absmax, (blocks,))
        weight = formats.Quantized4bit(
            packed, absmax, standard, blocksize, cls.quant_type, (out_features, in_features), dtype
        )
        largest = torch.finfo(dtype).max  # an absmax is the largest |value| of a block of the weight
        if nested:
            _read_nested(layer, info, state_key, weight)
        else:
            weight.absmax = layer.floats("weight.absmax", absmax, 0.0, largest)
        return cls(weight, bias, storage, cpu_arithmetic)

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        return f"{super().extra_repr()}, {self.quant_type}, blocksize={self.blocksize}{nested}"


def _read_nested(
    layer: SerializedLayer, info: dict[str, Any], state_key: str, weight: formats.Quantized4bit
) -> None:
    """Double quantization's tensors and offset into ``weight``, each checked against what a real file
    can hold: nested absmax (a block's largest |absmax - offset|) finite in [0, the weight dtype's
    largest]; the nested code 256 finite values in [-1, 1]; the offset (the mean of the absmax) finite
    in [0, that largest]; and the block absmax they give back in that range too, give or take one
    step of the nested code (the rounding double quantization may do on an all-zero block)."""
    missing = [key for key in _NESTED_STATE_KEYS if key not in info]
    if missing:
        raise layer.error(state_key, f"lacks {', '.join(missing)}, needed with double quantization")
    if layer.state_int(state_key, info, "nested_blocksize") != formats.NESTED_BLOCKSIZE:
        raise layer.error(
            state_key, f"has nested_blocksize={info['nested_blocksize']}, not {formats.NESTED_BLOCKSIZE}"
        )
    if info["nested_dtype"] != "float32":
        raise layer.error(state_key, f"has nested_dtype={info['nested_dtype']!r}, not 'float32'")
    largest = torch.finfo(weight.dtype).max
    offset = info["nested_offset"]
    if type(offset) not in (int, float) or not (math.isfinite(offset) and 0 <= offset <= largest):
        raise layer.error(
            state_key,
            f"has nested_offset={offset!r}; the mean of a {weight.dtype} weight's block absmax is a "
            f"finite number in [0, {largest:g}]",
        )
    if weight.absmax.dtype != torch.uint8:
        raise layer.error("weight.absmax", "must be uint8 with double quantization")
    nested_absmax = layer.require("weight.nested_absmax")
    groups = -(-weight.absmax.numel() // formats.NESTED_BLOCKSIZE)
    layer.check_shape("weight.nested_absmax", nested_absmax, (groups,))
    weight.nested_absmax = layer.floats("weight.nested_absmax", nested_absmax, 0.0, largest)
    code = layer.require("weight.nested_quant_map")
    layer.check_shape("weight.nested_quant_map", code, (256,))
    weight.nested_code = layer.floats("weight.nested_quant_map", code, -1.0, 1.0)
    weight.offset = float(offset)
    block_absmax = weight.block_absmax()
    step = weight.nested_code.sort().values.diff().max()
    slack = (step * weight.nested_absmax).repeat_interleave(formats.NESTED_BLOCKSIZE)[: block_absmax.numel()]
    bad = ~torch.isfinite(block_absmax) | (block_absmax < -slack) | (block_absmax > largest + slack)
    if bad.any():
        block = int(bad.nonzero()[0])
        raise layer.error(
            "weight.absmax",
            f"with nested_offset={offset!r} gives block {block} the absmax {block_absmax[block].item()!r}; "
            f"a block absmax of a {weight.dtype} weight lies in [0, {largest:g}]",
        )


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

    def __init__(
        self, weight: Tensor, scb: Tensor, bias: Tensor | None, cpu_arithmetic: str = "fast"
    ) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias, cpu_arithmetic)
        self.register_buffer("weight", weight)
        self.register_buffer("SCB", scb)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, cpu_arithmetic: str = "fast") -> Linear8bit:
        # transformers + bitsandbytes round the weight to float16 before taking its int8 rows
        return cls(*formats.quantize_int8(weight.detach().to(torch.float16)), bias, cpu_arithmetic)

    def forward(self, x: Tensor) -> Tensor:
        return self._add_bias(ops.linear_int8(x, self.weight, self.SCB, self.resolved_arithmetic()))

    def dense_weight(self) -> Tensor:
        return formats.dequantize_int8(self.weight, self.SCB)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "SCB"] = self.SCB
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # bitsandbytes' "row"

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, Tensor],
        prefix: str,
        bias: Tensor | None,
        files: Mapping[str, str | os.PathLike] | None = None,
        cpu_arithmetic: str = "fast",
    ) -> Linear8bit:
        layer = SerializedLayer(tensors, prefix, files)
        layer.check_keys({"weight", "bias", "SCB", "weight_format"})
        weight = layer.require("weight")
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise layer.error("weight", f"must be a 2-d int8 tensor, got {weight.dtype} {list(weight.shape)}")
        if weight.numel() and weight.min() == -128:  # bitsandbytes rounds rows to [-127, 127]
            index = [int(i) for i in (weight == -128).nonzero()[0]]
            raise layer.error("weight", f"holds -128 at index {index}; int8 rows lie in [-127, 127]")
        scb = layer.require("SCB")
        layer.check_shape("SCB", scb, (weight.shape[0],))
        # A row's largest |value| (in float32, the kernels' arithmetic); 0 for an all-zero row, as
        # bitsandbytes writes it, so zero is accepted and only a negative scale is refused.
        scb = layer.floats("SCB", scb, 0.0, torch.finfo(torch.float32).max)
        layout = tensors.get("weight_format")
        if layout is not None:
            if layout.numel() != 1 or layout.is_floating_point() or layout.is_complex():
                raise layer.error(
                    "weight_format", f"must be one integer, got {layout.dtype} {list(layout.shape)}"
                )
            if int(layout) != 0:
                raise layer.error("weight_format", f"is {int(layout)}; only 0 (row) is supported")
        return cls(weight, scb, bias, cpu_arithmetic)


class LinearBFloat16(QuantizedLinear):
    """bfloat16 weights (half of float32's bytes); on the CPU the ``"exact"`` arithmetic multiplies them
    in float32, the ``"fast"`` one by bfloat16-rounded activations."""

    format_name = "bfloat16"

    def __init__(self, weight: Tensor, bias: Tensor | None, cpu_arithmetic: str = "fast") -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias, cpu_arithmetic)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, cpu_arithmetic: str = "fast") -> LinearBFloat16:
        return cls(weight, bias, cpu_arithmetic)

    def forward(self, x: Tensor) -> Tensor:
        return self._add_bias(ops.linear_bf16(x, self.weight, self.resolved_arithmetic()))

    def dense_weight(self) -> Tensor:
        return self.weight

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, Tensor],
        prefix: str,
        bias: Tensor | None,
        files: Mapping[str, str | os.PathLike] | None = None,
        cpu_arithmetic: str = "fast",
    ) -> LinearBFloat16:
        layer = SerializedLayer(tensors, prefix, files)
        layer.check_keys({"weight", "bias"})
        weight = layer.require("weight")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise layer.error(
                "weight", f"must be a 2-d float tensor, got {weight.dtype} {list(weight.shape)}"
            )
        return cls(weight, bias, cpu_arithmetic)


QUANTIZED_FORMATS: dict[str, type[QuantizedLinear]] = {
    cls.format_name: cls for cls in (LinearNF4, LinearFP4, Linear8bit, LinearBFloat16)
}
"""The quantized formats by name (``neoxja quantize --format``)."""
FORMATS.update(QUANTIZED_FORMATS)
