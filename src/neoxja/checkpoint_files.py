"""Reading one weights file: safetensors (header checked, tensors memory-mapped or read without a
second copy) and PyTorch pickles (``torch.load(weights_only=True)`` only). Which files make up a
checkpoint, and how their tensors reach a model, is :mod:`neoxja.checkpoint`'s concern."""

from __future__ import annotations

import ctypes
import json
import mmap
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from neoxja.jsonfile import loads

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_READ_CHUNK = 1 << 30


class CheckpointError(ValueError):
    """A weights file is unreadable, or its contents do not fit the model."""


# ----- reading files --------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse and check a safetensors header: ``({name: {dtype, shape, data_offsets}}, data_start)``.

    Raises :class:`CheckpointError` naming the file (and tensor) for a truncated or corrupt file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file "
                f"(header claims {length} bytes, the file has {size})"
            )
        raw = f.read(length)
    data_start = 8 + length
    header = _check_complete(path, raw, data_start, size)
    _check_with_library(path)  # after it, the header is known to be well formed
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}, which neoxja does not read "
                f"(it reads {', '.join(SAFETENSORS_DTYPES)})"
            )
    return header, data_start


def _check_complete(path: Path, raw: bytes, data_start: int, size: int) -> dict[str, dict] | None:
    """The parsed header without ``__metadata__``, after naming the tensor a truncated file cuts off;
    None for a header too damaged to tell (the library's check then says what is wrong)."""
    try:
        entries = loads(raw, str(path))
        entries.pop("__metadata__", None)
        ends = {name: int(info["data_offsets"][1]) for name, info in entries.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    duplicate = _duplicate_key(raw)
    if duplicate is not None:
        raise CheckpointError(f"{path}: the header names {duplicate!r} twice: refused (which one is meant?)")
    for name, end in ends.items():
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size} bytes"
            )
    return entries


def _duplicate_key(raw: bytes) -> str | None:
    """A key that a JSON object of ``raw`` (already known to parse, nesting bounded) holds twice."""
    found: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            found.extend(key for i, key in enumerate(keys) if key in keys[:i])
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return found[0] if found else None


def _check_with_library(path: Path) -> None:
    """The safetensors library's own header checks (offsets that tile the data without overlap,
    sizes that fit shapes and dtypes, whole numbers, bounded nesting), so that neoxja accepts
    exactly the files it accepts; a :class:`CheckpointError` naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise CheckpointError(f"{path}: corrupt safetensors header (the safetensors library: {err})") from err


def iter_safetensors(path: Path, keep_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a safetensors file in file order.

    If every floating tensor of the file already has dtype ``keep_dtype``, the tensors are
    copy-on-write views of a memory map of the file: nothing is copied, and pages are read when
    first used (as transformers does). Otherwise each tensor is read into fresh memory, so that
    converting it never keeps the file's pages mapped beside the converted copy.
    """
    header, data_start = read_safetensors_header(path)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    kinds = {SAFETENSORS_DTYPES[info["dtype"]] for info in header.values()}
    if keep_dtype is not None and all(k == keep_dtype for k in kinds if k.is_floating_point):
        yield from _map_safetensors(path, entries, data_start)
        return
    with open(path, "rb", buffering=0) as f:
        for name, info in entries:
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                f.seek(data_start + info["data_offsets"][0])
                view = memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
                done = 0
                while done < nbytes:
                    got = f.readinto(view[done : done + _READ_CHUNK])
                    if not got:
                        raise CheckpointError(f"{path}: truncated safetensors file while reading {name!r}")
                    done += got
            yield name, tensor


def _map_safetensors(path: Path, entries: list, data_start: int) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
    for name, info in entries:
        dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        if end == begin:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        yield name, raw.view(dtype).view(info["shape"])


def iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a PyTorch pickle, refusing anything but plain tensors (weights_only)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # the legacy (non-zip) format cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refusing to load it: the pickle holds more than tensors and unpickling it could run "
            f"code (torch.load weights_only=True said: {str(err).splitlines()[0]}). Convert it to "
            f"safetensors with a tool you trust."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    while state:
        name, tensor = state.popitem()
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        # A memory-mapped tensor would keep the model tied to the file: copy it into owned memory.
        yield name, tensor.clone()
