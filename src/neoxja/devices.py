"""The one policy for where a model runs and in which dtype, shared by the Python API and the CLI.

Devices: neoxja runs on the CPU and on CUDA GPUs. :func:`resolve_device` reads every form people
pass (``0``, ``-1``, ``"cuda:1"``, ``"auto"``, a ``torch.device``) and refuses, with a ValueError
that lists what this machine offers, anything this torch cannot run the model on here (``"mps"``,
``"meta"``, CUDA without a GPU, a GPU index past the last one, ...).

Dtypes: :func:`resolve_dtype` reads a ``torch.dtype`` or a name (``"float16"``, ``"bf16"``, ...).
"""

from __future__ import annotations

from typing import Literal

import torch

# The model's floating-point dtypes and the names they go by (PyTorch's and the usual short ones).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def available_devices() -> list[int | str]:
    """What :func:`resolve_device` accepts on this machine: ``"auto"``, the CPU, then each CUDA GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = ["cuda", *(f"cuda:{index}" for index in range(count)), *range(count)] if count else []
    return ["auto", "cpu", -1, *gpus]


def _unavailable(device: object, why: str = "is not available") -> ValueError:
    """The error for ``device``: what is wrong with it, and what this machine accepts."""
    choices = ", ".join(map(repr, available_devices()))
    return ValueError(f"device={device!r} {why}; available here: {choices}")


def resolve_device(
    device: int | str | torch.device | None, default: int | str | torch.device = "cpu"
) -> torch.device:
    """The ``torch.device`` that ``device`` names, checked against this machine.

    ``0``, ``1``, ... are CUDA GPUs and ``-1`` the CPU (as in transformers' pipeline); strings and
    ``torch.device`` are read as torch reads them; ``"auto"`` is the first CUDA GPU if there is one,
    else the CPU. ``None`` stands for ``default``: each caller keeps its own (the CPU for
    ``from_pretrained`` and ``pipeline``, ``"auto"`` for the CLI). Anything else, or a device this
    machine lacks, is a ValueError naming it and listing what is available.
    """
    if device is None:
        device = default
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise _unavailable(device, "is not a device (give an int, a string or a torch.device)")
    if isinstance(device, int):
        if device < -1:
            raise _unavailable(device, "is not a device index")
        resolved = torch.device("cpu") if device == -1 else torch.device("cuda", device)
    elif isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as err:
            raise _unavailable(device, "is not a torch device") from err
    else:
        resolved = device
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise _unavailable(device, "is not available (this torch sees no CUDA GPU)")
    if resolved.type != "cuda" or (resolved.index or 0) >= torch.cuda.device_count():
        raise _unavailable(device)
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | Literal["auto"] | None:
    """A ``torch.dtype`` from itself or a name (``"float16"``, ``"bf16"``, ``"torch.bfloat16"``, ...).

    ``None`` (the caller's default) and ``"auto"`` (the checkpoint's own dtype) pass through; anything
    else is a ValueError naming it and listing the choices.
    """
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} or 'auto'")
