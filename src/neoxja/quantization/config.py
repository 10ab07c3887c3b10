"""``BitsAndBytesConfig``: transformers' bitsandbytes settings, with its fields, defaults and
``to_dict`` (the ``quantization_config`` of a quantized checkpoint's config.json), checked as it is
built: a setting that cannot apply raises a ``ValueError`` naming the field.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

import torch

from neoxja.quantization.kernels import check_arithmetic

QUANT_TYPES = ("fp4", "nf4")
# dtypes a 4-bit weight's packed bytes may be stored in (transformers' list)
STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# keys of transformers' to_dict() that are not constructor arguments
_SERIALIZED_ONLY = ("quant_method", "_load_in_4bit", "_load_in_8bit")


def _dtype(
    field: str, value: str | torch.dtype | None, default: torch.dtype, allowed: tuple[str, ...]
) -> torch.dtype:
    if value is None:
        return default
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(
            f"{field} must be one of {', '.join(allowed)} (a name or a torch.dtype), got {value!r}"
        )
    return getattr(torch, name)


class BitsAndBytesConfig:
    """4-bit (``load_in_4bit``: nf4 or fp4, optionally double-quantized) or 8-bit (``load_in_8bit``)
    weights, as transformers' class of the same name; arguments and defaults are its own, plus
    neoxja's ``cpu_arithmetic``: ``"fast"`` (default) or ``"exact"``, the arithmetic of the quantized
    layers on the CPU (:mod:`neoxja.quantization.arithmetic`), kept in ``to_dict`` under that name
    (transformers warns that it does not use it, and loads the rest)."""

    quant_method = "bitsandbytes"

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: str | torch.dtype | None = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: str | torch.dtype | None = None,
        cpu_arithmetic: str = "fast",
        **kwargs: Any,
    ) -> None:
        flags = {
            "load_in_8bit": load_in_8bit,
            "load_in_4bit": load_in_4bit,
            "llm_int8_enable_fp32_cpu_offload": llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": llm_int8_has_fp16_weight,
            "bnb_4bit_use_double_quant": bnb_4bit_use_double_quant,
        }
        for field, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{field} must be True or False, got {value!r}")
        if load_in_8bit and load_in_4bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be True: choose one")
        if (
            isinstance(llm_int8_threshold, bool)
            or not isinstance(llm_int8_threshold, (int, float))
            or not math.isfinite(llm_int8_threshold)
        ):
            raise ValueError(f"llm_int8_threshold must be a finite number, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and not (
            isinstance(llm_int8_skip_modules, list) and all(isinstance(m, str) for m in llm_int8_skip_modules)
        ):
            raise ValueError(
                f"llm_int8_skip_modules must be a list of module names, got {llm_int8_skip_modules!r}"
            )
        if bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {bnb_4bit_quant_type!r}"
            )
        check_arithmetic(cpu_arithmetic, "cpu_arithmetic")
        unknown = sorted(set(kwargs) - set(_SERIALIZED_ONLY))
        if unknown:
            warnings.warn(f"BitsAndBytesConfig ignores unknown settings: {', '.join(unknown)}", stacklevel=2)
        self._load_in_8bit, self._load_in_4bit = load_in_8bit, load_in_4bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None else list(llm_int8_skip_modules)
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_compute_dtype = _dtype(
            "bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, torch.float32, COMPUTE_DTYPES
        )
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_quant_storage = _dtype(
            "bnb_4bit_quant_storage", bnb_4bit_quant_storage, torch.uint8, STORAGE_DTYPES
        )
        self.cpu_arithmetic = cpu_arithmetic

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    def is_quantizable(self) -> bool:
        """Whether these settings quantize at all (4-bit or 8-bit)."""
        return self.load_in_4bit or self.load_in_8bit

    def quantization_method(self) -> str | None:
        """``"llm_int8"``, ``"nf4"``, ``"fp4"``, or None when nothing is quantized (transformers' names)."""
        if self.load_in_8bit:
            return "llm_int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def to_dict(self) -> dict[str, Any]:
        """The settings as config.json holds them (the same keys and values as transformers writes)."""
        out = {"quant_method": self.quant_method, **copy.deepcopy(self.__dict__)}
        for field in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            out[field] = str(out[field]).removeprefix("torch.")
        out["load_in_4bit"], out["load_in_8bit"] = self.load_in_4bit, self.load_in_8bit
        return out

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> BitsAndBytesConfig:
        """Settings from a config.json's ``quantization_config`` (transformers' or neoxja's)."""
        if settings.get("quant_method", cls.quant_method) != cls.quant_method:
            raise ValueError(
                f"quantization_config has quant_method={settings['quant_method']!r}; neoxja reads only "
                f"{cls.quant_method!r}"
            )
        return cls(**settings)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BitsAndBytesConfig {self.to_json_string()}"
