"""Quantized weights: the bitsandbytes settings (:mod:`neoxja.quantization.config`), the layers'
CPU arithmetic (:mod:`neoxja.quantization.arithmetic`) and :func:`set_arithmetic`, which changes a
loaded model's in place. Names are imported when first used."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "set_arithmetic": "neoxja.quantization.loading",
    "resolve": "neoxja.quantization.arithmetic",
    "describe": "neoxja.quantization.arithmetic",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neoxja.quantization' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
