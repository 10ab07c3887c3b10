"""Which arithmetic a quantized layer computes with on the CPU: ``"fast"`` or ``"exact"``.

* ``"exact"``: float32 arithmetic on the dequantized weights (every weight expanded to float32 and
  multiplied by the float32 activation), within float32 rounding of ``x @ dequantize(W).T``.
* ``"fast"`` (the default): what users of these formats get elsewhere (bitsandbytes computes in
  half precision, llama.cpp and CTranslate2 in int8): nf4, fp4 and int8 weights multiply
  int8-quantized activations on the integer kernels of ``neoxja._quant`` where they are built, and
  bfloat16 weights bfloat16-rounded activations; prompts (more rows than the decoding kernels take)
  multiply bfloat16 tiles of the weight through oneDNN where the CPU multiplies bfloat16 natively
  (AVX512_BF16 or AMX), float32 tiles elsewhere.

Each layer holds its own setting (``layer.arithmetic``, from ``BitsAndBytesConfig(cpu_arithmetic=)``
or ``from_pretrained(..., cpu_arithmetic=)``; :func:`neoxja.quantization.set_arithmetic` changes a
loaded model in place), and the environment variable ``NEOXJA_CPU_ARITHMETIC`` (``fast`` or
``exact``) overrides every layer's, for comparing the paths without reloading. :func:`resolve` is
the one place that applies the two; :func:`describe` says what runs, for ``explain_decoding``.
The choice never depends on timings taken at run time, only on the setting and the CPU's features,
so results do not change with the machine's load.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from neoxja.quantization import kernels
from neoxja.quantization.kernels import ARITHMETICS, check_arithmetic

__all__ = [
    "ARITHMETICS",
    "ENVIRONMENT_VARIABLE",
    "Arithmetic",
    "check_arithmetic",
    "describe",
    "override",
    "resolve",
]

Arithmetic = Literal["fast", "exact"]
ENVIRONMENT_VARIABLE = "NEOXJA_CPU_ARITHMETIC"


def override() -> Arithmetic | None:
    """The arithmetic ``NEOXJA_CPU_ARITHMETIC`` forces on every layer (None when it is unset or empty)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    if not value:
        return None
    return check_arithmetic(value, f"the environment variable {ENVIRONMENT_VARIABLE}")  # type: ignore[return-value]


def resolve(layer: Any) -> Arithmetic:
    """The arithmetic ``layer`` computes with: the environment's override if set, else its own."""
    forced = override()
    if forced is not None:
        return forced
    return check_arithmetic(getattr(layer, "arithmetic", None), f"{type(layer).__name__}.arithmetic")  # type: ignore[return-value]


def describe(layer: Any) -> str:
    """One line on what ``layer`` runs on the CPU: its format, the arithmetic and where it came from,
    the decoding kernel (up to ``kernels.MATVEC_ROWS`` rows) and the prompt path (more rows)."""
    arithmetic = resolve(layer)
    source = f" ({ENVIRONMENT_VARIABLE})" if override() is not None else ""
    fmt = type(layer).format_name
    decode = kernels.decode_path(fmt, arithmetic)
    prompt = kernels.prompt_path(fmt, arithmetic)
    return f"{fmt} {arithmetic}{source}: decoding rows {decode}; prompts {prompt}"
