"""Load model weights from the files transformers writes (saving: :mod:`neoxja.saving`).

Loading builds the module on the meta device (no random initialisation, no memory), then takes
one tensor at a time and assigns it to the module, so the weights exist once. A safetensors file
already in the wanted dtype, for the CPU, is memory-mapped copy-on-write (no copy at all; pages are
read on first use). One that must be converted is read tensor by tensor with plain ``readinto``
(no mapping whose touched pages would count as a second copy), converted, and the read buffer
freed. ``.bin`` files go through ``torch.load(weights_only=True, mmap=True)``.

Before the model is built, the config's sizes are checked against the shapes in the safetensors
headers and the layers the shard index lists, so that a config that does not describe the weights
fails at once, naming the key. Every tensor must come from exactly one file, and for shards from the
one the index names: a tensor outside the index, or in two files, is refused.

Files looked for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (shards).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neoxja.checkpoint_files import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    iter_bin,
    iter_safetensors,
    read_safetensors_header,
)
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

# Buffers that transformers 4 saved with this model's weights (each attention's rotary inv_freq,
# causal-mask ``bias`` and ``masked_bias``; transformers 5 ignores any ``rotary_emb.inv_freq``):
# recomputed, never loaded, accepted by name and nothing else.
_STALE_KEYS = re.compile(
    r"(gpt_neox_japanese\.)?(layers\.(?P<layer>\d+)\.attention\.(rotary_emb\.inv_freq|bias|masked_bias)"
    r"|rotary_emb\.inv_freq)"
)
_LAYER = re.compile(r"(?:gpt_neox_japanese\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint; for shards also the index and its tensor -> file map."""

    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, str] | None = None

    @property
    def where(self) -> Path:
        """The file that describes the checkpoint: the index, or the one weight file."""
        return self.index if self.index is not None else self.files[0]


def find_weight_files(name_or_path: str | os.PathLike, options: HubOptions) -> WeightFiles:
    """The weight files of a model directory or Hub id (all shards), in the preferred format."""
    for filename in WEIGHT_FILES:
        path = resolve_file(name_or_path, filename, options)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return WeightFiles([path])
        weight_map = _read_index(path)
        shards = []
        for shard in sorted(set(weight_map.values())):
            shard_path = resolve_file(name_or_path, shard, options)
            if shard_path is None:
                raise OSError(f"{path} lists shard {shard!r}, which is missing from {str(name_or_path)!r}")
            shards.append(shard_path)
        return WeightFiles(shards, path, weight_map)
    where = Path(name_or_path) / options.subfolder if options.subfolder else name_or_path
    raise OSError(f"no weights found in {str(where)!r}: looked for {', '.join(WEIGHT_FILES)}")


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``*.index.json``: tensor names to plain file names inside the model
    directory, no others."""
    try:
        data = read_json_object(index, "a shard index object")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        found = "no such key" if weight_map is None else f"a JSON {type(weight_map).__name__}"
        raise CheckpointError(
            f"{index}: 'weight_map' must be an object of tensor names to shard files ({found})"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: weight_map[{key!r}] is {name!r}, not a shard file name")
        parts = name.replace("\\", "/").split("/")
        if name in ("", ".", "..") or len(parts) > 1 or Path(name).is_absolute():
            raise CheckpointError(
                f"{index} names shard {name!r}, which is not a file name inside the model directory: refused"
            )
    return weight_map


class _Ledger:
    """Checks that each tensor of shards comes from the one file the index names (so a tensor in two
    shards, or outside the index, is refused); :meth:`finish` then checks that every indexed tensor
    was found."""

    def __init__(self, weights: WeightFiles) -> None:
        self.weights = weights
        self.seen: set[str] = set()

    def see(self, path: Path, name: str) -> None:
        weight_map, index = self.weights.weight_map, self.weights.index
        if weight_map is not None:
            listed = weight_map.get(name)
            if listed is None:
                raise CheckpointError(f"{path}: tensor {name!r} is not in the index {index}: refused")
            if listed != path.name:
                raise CheckpointError(f"{path}: tensor {name!r} is listed in {index} under shard {listed!r}")
        self.seen.add(name)  # once only: one file per name, and no name twice in a file

    def finish(self) -> None:
        for name, shard in (self.weights.weight_map or {}).items():
            if name not in self.seen:
                raise CheckpointError(
                    f"{self.weights.index} lists tensor {name!r} in {shard!r}, which lacks it"
                )


def header_shapes(weights: WeightFiles) -> dict[str, tuple[Path, list[int], torch.dtype]]:
    """``{name: (file, shape, dtype)}`` from the headers of the checkpoint's safetensors files
    (no data is read), after checking that no tensor is outside the index or in two files."""
    shapes: dict[str, tuple[Path, list[int], torch.dtype]] = {}
    files = [path for path in weights.files if path.name.endswith(".safetensors")]
    ledger = _Ledger(weights)
    for path in files:
        header, _ = read_safetensors_header(path)
        for name, info in header.items():
            ledger.see(path, name)
            shapes[name] = (path, info["shape"], SAFETENSORS_DTYPES[info["dtype"]])
    if len(files) == len(weights.files):
        ledger.finish()
    return shapes


def check_config_against_weights(config: GPTNeoXJapaneseConfig, weights: WeightFiles, strict: bool) -> None:
    """Before any module is built: a :class:`CheckpointError` naming the config key and the file when
    the config's sizes do not describe the checkpoint's shapes (safetensors headers) or, with
    ``strict``, its number of layers (headers or shard index). ``.bin`` files without an index
    show neither before they are read; their tensors are checked one by one as they load."""
    shapes = header_shapes(weights)
    hidden, vocab = config.hidden_size, config.vocab_size
    expected = {
        "embed_in.weight": ([vocab, hidden], ("vocab_size", "hidden_size")),
        "embed_out.weight": ([vocab, hidden], ("vocab_size", "hidden_size")),
        "final_layer_norm.weight": ([hidden], ("hidden_size",)),
        "mlp.dense_h_to_4h.weight": (
            [config.intermediate_size, hidden],
            ("intermediate_multiple_size", "hidden_size"),
        ),
    }
    for name, found in shapes.items():
        key = _LAYER.sub("", name).removeprefix("gpt_neox_japanese.")
        if key in expected and found[2].is_floating_point:  # a packed (quantized) weight has its own shape
            _check_shape(config, found, name, *expected[key])
    names = set(shapes) | set(weights.weight_map or ())
    layers = {int(match[1]) for name in names if (match := _LAYER.match(name))}
    if strict and layers and max(layers) + 1 != config.num_hidden_layers:
        raise CheckpointError(
            f"{weights.where}: the checkpoint has layers 0 to {max(layers)} ({max(layers) + 1} layers), "
            f"the config's num_hidden_layers is {config.num_hidden_layers}"
        )


def _check_shape(
    config: GPTNeoXJapaneseConfig,
    found: tuple[Path, list[int], torch.dtype],
    name: str,
    shape: list[int],
    fields: tuple[str, ...],
) -> None:
    path, actual, _ = found
    if list(actual) == shape:
        return
    wrong = [field for field, got, want in zip(fields, actual, shape, strict=False) if got != want] or list(
        fields
    )
    settings = ", ".join(f"{field}={getattr(config, field)}" for field in wrong)
    raise CheckpointError(
        f"{path}: {name} has shape {list(actual)}, the config's {settings} needs {shape}: "
        f"the config does not describe these weights"
    )


def iter_checkpoint(
    weights: WeightFiles, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Every ``(file, name, tensor)`` of the checkpoint, each tensor from exactly one file (the one
    its index names); safetensors already in ``dtype`` are memory-mapped rather than read when they
    are to stay on the CPU."""
    keep = dtype if device is not None and device.type == "cpu" else None
    ledger = _Ledger(weights)
    for path in weights.files:
        tensors = iter_safetensors(path, keep) if path.name.endswith(".safetensors") else iter_bin(path)
        for name, tensor in tensors:
            ledger.see(path, name)
            yield path, name, tensor
    ledger.finish()


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
                kinds = [SAFETENSORS_DTYPES[info["dtype"]] for info in header.values()]
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
    layers = model.config.num_hidden_layers
    loaded: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[Path, str]] = {}  # model key -> (file, checkpoint name) it came from
    unexpected: dict[str, Path] = {}
    files: set[Path] = set()
    for path, name, tensor in tensors:
        files.add(path)
        key = name
        if has_prefix and not key.startswith(prefix) and key.split(".", 1)[0] in base_children:
            key = prefix + key
        elif not has_prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        if key in origin:  # e.g. both "embed_in.weight" and "gpt_neox_japanese.embed_in.weight"
            first_path, first = origin[key]
            where = "" if first_path == path else f" (in {first_path})"
            raise CheckpointError(f"{path}: {name} and {first}{where} are both the model's {key}: refused")
        origin[key] = (path, name)
        if take is not None and take(key, path, tensor):
            continue
        if key not in expected:
            # The LM head is no error for a tied model, nor for the bare model (transformers agrees).
            head = key == "embed_out.weight" and (tied or not has_prefix)
            if not (head or _is_stale_buffer(key, layers)):
                unexpected[name] = path
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

    missing = sorted(set(expected) - set(origin))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_some(missing)}")
        if unexpected:
            parts.append(
                "unexpected keys: "
                + _some([f"{name} ({unexpected[name].name})" for name in sorted(unexpected)])
            )
        where = min(files) if len(files) == 1 else min(files).parent if files else "the checkpoint"
        raise CheckpointError(f"{where}: does not match the model: " + "; ".join(parts))
    if missing:  # non-strict: initialise what the checkpoint lacks
        for key in missing:
            loaded[key] = torch.empty_like(expected[key], device=device, dtype=dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    if missing:
        _init_missing(model, missing)


def _is_stale_buffer(key: str, layers: int) -> bool:
    """Whether ``key`` is a buffer transformers 4 saved for this model (in an existing layer)."""
    match = _STALE_KEYS.fullmatch(key)
    return match is not None and (match["layer"] is None or int(match["layer"]) < layers)


def _some(names: list[str], limit: int = 20) -> str:
    """``names`` joined, the first ``limit`` of them and how many there are in all."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


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
    ``cpu_arithmetic`` (``"fast"`` or ``"exact"``) sets the quantized layers' CPU arithmetic
    (:mod:`neoxja.quantization.arithmetic`).
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
    cpu_arithmetic = kwargs.pop("cpu_arithmetic", None)
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
    if kwargs:
        config.validate()  # an override must not build what the file could not

    weights = find_weight_files(name_or_path, options)
    check_config_against_weights(config, weights, strict)  # before any module exists
    files = weights.files
    dtype = resolve_dtype(dtype, config, files)
    device = resolve_device(device, default="cpu")
    with torch.device("meta"):
        model = cls(config)
    loader = None
    quantizing = (quantization_config, weight_format, cpu_arithmetic) != (None, None, None)
    if quantizing or hasattr(config, "quantization_config"):
        from neoxja.quantization.loading import QuantizingLoader, check_device, plan_for

        plan, prequantized = plan_for(config, quantization_config, weight_format, cpu_arithmetic)
        if plan is not None:
            check_device(plan, device)
            loader = QuantizingLoader(model, plan, prequantized, device, dtype)
    # Quantizing reads (rather than maps) the file, so that each float weight is freed once quantized.
    keep = dtype if loader is None else None
    tensors = _with_progress(iter_checkpoint(weights, keep, device), files, progress)
    load_state(model, tensors, dtype, device, strict=strict, take=loader)
    model.tie_weights()
    if loader is not None:
        loader.install(model, dtype)
    model.base_model.rotary_emb.to(device)
    return model.eval()
