"""Load and save model weights in the files transformers reads and writes.

Loading builds the module on the meta device (no random initialisation, no memory), then takes
one tensor at a time and assigns it to the module, so the weights exist once. A safetensors file
already in the wanted dtype, for the CPU, is memory-mapped copy-on-write (no copy at all; pages are
read on first use). One that must be converted is read tensor by tensor with plain ``readinto``
(no mapping whose touched pages would count as a second copy), converted, and the read buffer
freed. ``.bin`` files go through ``torch.load(weights_only=True, mmap=True)``.

Files looked for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (shards).
"""

from __future__ import annotations

import copy
import ctypes
import json
import mmap
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neoxja.configuration import GPTNeoXJapaneseConfig
from neoxja.devices import resolve_device
from neoxja.devices import resolve_dtype as _named_dtype
from neoxja.hub import HubOptions, file_not_directory, resolve_file
from neoxja.jsonfile import read_json_object
from neoxja.tuner.lora import adapter_base, is_adapter_dir, merge_adapter

if TYPE_CHECKING:
    from neoxja.network import GPTNeoXJapanesePreTrainedModel

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)

# Buffers that old transformers versions saved with the weights; they are recomputed, never loaded.
_STALE_KEYS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")

_SAFETENSORS_DTYPES = {
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
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}, which neoxja does not read "
                f"(it reads {', '.join(_SAFETENSORS_DTYPES)})"
            )
    return header, data_start


def _check_complete(path: Path, raw: bytes, data_start: int, size: int) -> dict[str, dict] | None:
    """The parsed header without ``__metadata__``, after naming the tensor a truncated file cuts off;
    None for a header too damaged to tell (the library's check then says what is wrong)."""
    try:
        entries = json.loads(raw)
        entries.pop("__metadata__", None)
        ends = {name: int(info["data_offsets"][1]) for name, info in entries.items()}
    except (ValueError, RecursionError, TypeError, KeyError, IndexError, AttributeError):
        return None
    for name, end in ends.items():
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size} bytes"
            )
    return entries


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
    kinds = {_SAFETENSORS_DTYPES[info["dtype"]] for info in header.values()}
    if keep_dtype is not None and all(k == keep_dtype for k in kinds if k.is_floating_point):
        yield from _map_safetensors(path, entries, data_start)
        return
    with open(path, "rb", buffering=0) as f:
        for name, info in entries:
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
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
        dtype, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
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


def find_weight_files(name_or_path: str | os.PathLike, options: HubOptions) -> list[Path]:
    """The weight files of a model directory or Hub id (all shards), in the preferred format."""
    for filename in WEIGHT_FILES:
        path = resolve_file(name_or_path, filename, options)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        shards = []
        for shard in _shard_names(path):
            shard_path = resolve_file(name_or_path, shard, options)
            if shard_path is None:
                raise OSError(f"{path} lists shard {shard!r}, which is missing from {str(name_or_path)!r}")
            shards.append(shard_path)
        return shards
    where = Path(name_or_path) / options.subfolder if options.subfolder else name_or_path
    raise OSError(f"no weights found in {str(where)!r}: looked for {', '.join(WEIGHT_FILES)}")


def _shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names: plain names inside the model directory, no others."""
    try:
        weight_map = read_json_object(index, "a shard index object")["weight_map"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{index}: not a shard index (no 'weight_map' object): {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name in ("", ".", "..") or len(parts) > 1 or Path(name).is_absolute():
            raise CheckpointError(
                f"{index} names shard {name!r}, which is not a file name inside the model directory: refused"
            )
    return names


def iter_checkpoint(
    files: list[Path], dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Every ``(file, name, tensor)`` of the given weight files; safetensors already in ``dtype`` are
    memory-mapped rather than read when they are to stay on the CPU."""
    keep = dtype if device is not None and device.type == "cpu" else None
    for path in files:
        tensors = iter_safetensors(path, keep) if path.name.endswith(".safetensors") else iter_bin(path)
        for name, tensor in tensors:
            yield path, name, tensor


# ----- loading into a model -------------------------------------------------------------------------


def resolve_dtype(
    dtype: torch.dtype | str | None, config: GPTNeoXJapaneseConfig, files: list[Path]
) -> torch.dtype:
    """The dtype to load in: a torch dtype, its name (``"bfloat16"``), or ``"auto"`` (also None, as in
    transformers 5) = the config's ``dtype``/``torch_dtype``, else the checkpoint's first float tensor."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype  # any floating dtype the network can run in, float64 included
    if dtype is None or dtype == "auto":
        if config.dtype is not None:
            return config.dtype
        for path in files:
            if path.name.endswith(".safetensors"):
                header, _ = read_safetensors_header(path)
                kinds = [_SAFETENSORS_DTYPES[info["dtype"]] for info in header.values()]
            else:
                kinds = [t.dtype for _, t in iter_bin(path)]
            for kind in kinds:
                if kind.is_floating_point:
                    return kind
        return torch.float32
    return _named_dtype(dtype)


def _convert(name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` in ``dtype`` on ``device``; an error instead of inf when ``dtype`` cannot hold a value."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor.to(device)
    converted = tensor.to(device=device, dtype=dtype)
    if torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        overflow = converted.isinf() & ~tensor.to(device).isinf()
        if bool(overflow.any()):
            peak = tensor.abs().max().item()
            raise CheckpointError(
                f"{name}: values up to {peak:.4g} do not fit in {dtype} (max {torch.finfo(dtype).max:.4g}); "
                f"load it in a wider dtype such as torch.float32 or torch.bfloat16"
            )
    return converted


def load_state(
    model: GPTNeoXJapanesePreTrainedModel,
    tensors: Iterator[tuple[Path, str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    strict: bool = True,
    take: Callable[[str, Path, torch.Tensor], bool] | None = None,
) -> None:
    """Assign checkpoint tensors to a (meta) model one by one, checking names and shapes.

    ``take(key, file, tensor)`` (quantized loading) sees each tensor first, under the model's key,
    and returns True for those it consumes itself; a taken key of the model counts as loaded.

    Keys are matched with or without the ``gpt_neox_japanese.`` prefix, so a bare-model
    checkpoint loads into the causal-LM class (its head tied or reported missing) and a causal-LM
    checkpoint into the bare model (its head skipped). The tied ``embed_out`` may be absent.
    With ``strict`` every missing or unexpected key is an error (listed).
    """
    prefix = model.base_model_prefix + "."
    expected = dict(model.state_dict(keep_vars=True))
    tied = getattr(model.config, "tie_word_embeddings", True) and "embed_out.weight" in expected
    if tied:
        del expected["embed_out.weight"]
    has_prefix = any(key.startswith(prefix) for key in expected)

    base_children = {key[len(prefix) :].split(".", 1)[0] for key in expected if key.startswith(prefix)}
    loaded: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    unexpected: list[str] = []
    for path, name, tensor in tensors:
        key = name
        if has_prefix and not key.startswith(prefix) and key.split(".", 1)[0] in base_children:
            key = prefix + key
        elif not has_prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        if take is not None and take(key, path, tensor):
            taken.add(key)
            continue
        if key not in expected:
            # The LM head is no error for a tied model, nor for the bare model (transformers agrees).
            head = key == "embed_out.weight" and (tied or not has_prefix)
            if not (head or _STALE_KEYS.search(key)):
                unexpected.append(name)
            continue
        target = expected[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: shape mismatch for {name}: checkpoint has {list(tensor.shape)}, "
                f"the model (from its config) expects {list(target.shape)}"
            )
        if target.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{path}: {name} holds {tensor.dtype} values where the model has a floating-point "
                f"weight: the file is damaged or was written for another model"
            )
        loaded[key] = _convert(f"{path}: {name}", tensor, dtype, device)

    missing = sorted(set(expected) - set(loaded) - taken)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(sorted(unexpected))}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    if missing:  # non-strict: initialise what the checkpoint lacks
        for key in missing:
            loaded[key] = torch.empty_like(expected[key], device=device, dtype=dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    if missing:
        _init_missing(model, missing)


def _init_missing(model: GPTNeoXJapanesePreTrainedModel, missing: list[str]) -> None:
    modules = {name.rsplit(".", 1)[0] for name in missing}
    for name, module in model.named_modules():
        if name in modules:
            model._init_weights(module)


PROGRESS_MIN_BYTES = 512 * 2**20


def _with_progress(
    tensors: Iterator[tuple[Path, str, torch.Tensor]], files: list[Path], show: bool | None
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """``tensors`` wrapped in a progress bar when ``show`` (or, if None, when the files are large)."""
    if show is None:
        show = sum(path.stat().st_size for path in files) >= PROGRESS_MIN_BYTES
    if not show:
        return tensors
    from tqdm.auto import tqdm

    total = None  # a .bin file's tensor count is only known once it is unpickled
    if all(path.name.endswith(".safetensors") for path in files):
        total = sum(len(read_safetensors_header(path)[0]) for path in files)
    return tqdm(tensors, total=total, desc="loading weights", unit=" tensors")


def load_pretrained(
    cls: type[GPTNeoXJapanesePreTrainedModel],
    name_or_path: str | os.PathLike,
    *,
    config: GPTNeoXJapaneseConfig | str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | int | None = None,
    strict: bool = True,
    progress: bool | None = None,
    **kwargs: Any,
) -> GPTNeoXJapanesePreTrainedModel:
    """Build ``cls`` from ``config.json`` + weights of a directory or Hub id; the model is in eval mode.

    ``progress`` shows a tqdm bar over the tensors (None: only for checkpoints of at least
    ``PROGRESS_MIN_BYTES``).

    Hub keyword arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``,
    ``subfolder``) go to :func:`neoxja.hub.resolve_file`; ``torch_dtype`` is an old name of
    ``dtype`` and ``device_map`` (a single device or ``"auto"``) of ``device``; other keyword
    arguments override config fields. A local LoRA adapter directory (peft's ``adapter_config.json``
    + ``adapter_model.safetensors``, no ``config.json``) loads its ``base_model_name_or_path`` with
    the adapter merged into the weights (:func:`neoxja.tuner.lora.merge_adapter`).
    """
    if Path(name_or_path).is_file():
        raise file_not_directory(name_or_path)
    if is_adapter_dir(name_or_path) and not (Path(name_or_path) / "config.json").is_file():
        # A LoRA adapter directory (peft's format): its base model with the adapter merged in.
        base = load_pretrained(
            cls,
            adapter_base(name_or_path),
            config=config,
            dtype=dtype,
            device=device,
            strict=strict,
            progress=progress,
            **kwargs,
        )
        return merge_adapter(base, name_or_path)
    options = HubOptions.pop_from(kwargs)
    quantization_config = kwargs.pop("quantization_config", None)
    weight_format = kwargs.pop("weight_format", None)
    if "torch_dtype" in kwargs:
        dtype = kwargs.pop("torch_dtype")
    if "device_map" in kwargs:
        device = kwargs.pop("device_map")
    if config is None or isinstance(config, (str, os.PathLike)):
        hub_kwargs = {key: value for key, value in vars(options).items() if value}
        config = GPTNeoXJapaneseConfig.from_pretrained(config or name_or_path, **hub_kwargs)
    elif not isinstance(config, GPTNeoXJapaneseConfig):
        raise TypeError(f"config must be a GPTNeoXJapaneseConfig or a path, got {type(config).__name__}")
    else:
        config = copy.deepcopy(config)  # the overrides below and save_pretrained must not touch the caller's
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise TypeError(f"from_pretrained() got an unexpected keyword argument {key!r}")
        setattr(config, key, value)

    files = find_weight_files(name_or_path, options)
    dtype = resolve_dtype(dtype, config, files)
    device = resolve_device(device, default="cpu")
    with torch.device("meta"):
        model = cls(config)
    loader = None
    if quantization_config is not None or weight_format is not None or hasattr(config, "quantization_config"):
        from neoxja.quantization.loading import QuantizingLoader, check_device, plan_for

        plan, prequantized = plan_for(config, quantization_config, weight_format)
        if plan is not None:
            check_device(plan, device)
            loader = QuantizingLoader(model, plan, prequantized, device, dtype)
    # Quantizing reads (rather than maps) the file, so that each float weight is freed once quantized.
    keep = dtype if loader is None else None
    tensors = _with_progress(iter_checkpoint(files, keep, device), files, progress)
    load_state(model, tensors, dtype, device, strict=strict, take=loader)
    model.tie_weights()
    if loader is not None:
        loader.install(model, dtype)
    model.base_model.rotary_emb.to(device)
    return model.eval()


# ----- saving ---------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10**9), ``"500MiB"`` (2**20), ``"10KB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


def save_pretrained(
    model: GPTNeoXJapanesePreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    safe_serialization: bool = True,
    max_shard_size: int | str = "50GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` and the weights, sharded above ``max_shard_size`` with an index file.

    A tied ``embed_out.weight`` is left out, as transformers does: it is rebuilt from ``embed_in``.
    ``state_dict`` (tensors under the model's own keys) is written instead of ``model.state_dict()``.
    Old weight files of the directory are removed first so that shards of two saves never mix.
    """
    directory = Path(save_directory)
    if directory.is_file():
        raise OSError(f"cannot save the model into {directory}: it is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)

    state = dict(state_dict) if state_dict is not None else model.state_dict()
    if getattr(model.config, "tie_word_embeddings", True):
        state.pop("embed_out.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += nbytes

    for old in directory.iterdir():
        if re.fullmatch(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?", old.name):
            old.unlink()

    model.config.dtype = model.dtype
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)

    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    count = len(shards)
    names = [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]
    if count == 1:
        names = [f"{stem}.{ext}"]
    for name, shard in zip(names, shards, strict=True):
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, directory / name, metadata={"format": "pt"})
        else:
            torch.save(shard, directory / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        index_name = SAFE_INDEX if safe_serialization else BIN_INDEX
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (directory / index_name).write_text(text, encoding="utf-8")
