"""LoRA adapters in peft's format.

Training wraps the model with peft itself (``pip install neoxja[train]``), so the adapter files are
the ones peft writes for transformers' GPT-NeoX-Japanese: the same module names
(``query_key_value``, ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``), ``adapter_config.json``
and ``adapter_model.safetensors``. Loading an adapter for inference does not need peft:
:func:`merge_adapter` reads those two files and adds ``B @ A * scale`` to each target weight, which
gives the model peft's logits and keeps decoding on neoxja's fast paths (plain ``nn.Linear``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neoxja.jsonfile import read_json_object
from neoxja.tuner import LORA_TARGETS

if TYPE_CHECKING:
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TARGETS = LORA_TARGETS
MAX_ADAPTER_CHAIN = 16  # adapters stacked on adapters; real ones stack one or two


@dataclass
class LoraArguments:
    """LoRA's rank, scale (``alpha / r``), dropout on its input, and the layers it adapts."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target: tuple[str, ...] = TARGETS

    def validate(self) -> None:
        """A ``ValueError`` naming the first argument out of range."""
        if not _positive_int(self.r):
            raise ValueError(f"lora r must be a positive int, got {self.r!r}")
        if not _positive_number(self.alpha):
            raise ValueError(f"lora alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.target) - set(TARGETS))
        if unknown or not self.target:
            raise ValueError(f"lora target {unknown or 'empty'} is not among {', '.join(TARGETS)}")


PEFT_MISSING = "LoRA training needs peft: pip install 'neoxja[train]'"


def check_peft() -> None:
    """An ``ImportError`` saying what to install when peft is missing, found without importing it
    (peft brings transformers along: seconds), so that a run stops before loading model or data."""
    try:
        found = importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):  # a parent package or a module set to None in sys.modules
        found = False
    if not found:
        raise ImportError(PEFT_MISSING, name="peft")


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(PEFT_MISSING, name="peft") from err
    return peft


def apply_lora(model: nn.Module, args: LoraArguments) -> nn.Module:
    """``model`` wrapped by peft with LoRA on ``args.target`` (the base weights are frozen)."""
    args.validate()
    peft = _peft()
    config = peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(args.target)
    )
    quantized = _quantized_layer_types(model)
    if quantized:
        # QLoRA: peft's own LoRA linear wraps neoxja's quantized layers (it only calls their forward
        # and reads in/out_features); the adapter tensors and files are the same as for nn.Linear.
        from peft.tuners.lora.layer import Linear as LoraLinear

        config._register_custom_module(dict.fromkeys(quantized, LoraLinear))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type .*neoxja.quantization")
        wrapped = peft.get_peft_model(model, config)
    # What peft writes for transformers' model, so that peft on transformers loads the adapter as its own.
    saved = wrapped.peft_config["default"]
    saved.task_type = "CAUSAL_LM"
    saved.auto_mapping = None
    base = getattr(getattr(model, "config", None), "name_or_path", "")
    if base and Path(base).is_dir():
        base = str(Path(base).resolve())  # the adapter must find its base from any directory
    saved.base_model_name_or_path = base or None
    return wrapped


def _quantized_layer_types(model: nn.Module) -> set[type]:
    """The quantized layer classes (neoxja.quantization.layers) present in ``model``."""
    return {type(m) for m in model.modules() if type(m).__module__ == "neoxja.quantization.layers"}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a peft adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _adapter_only(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapter directory with no model of its own (loading it loads its base)."""
    return is_adapter_dir(path) and not (Path(path) / "config.json").is_file()


def _read_base(path: str | os.PathLike) -> str:
    config_path = Path(path) / ADAPTER_CONFIG
    base = read_json_object(config_path, "a peft adapter config").get("base_model_name_or_path")
    if base is None or base == "":
        raise ValueError(f"{config_path}: no base_model_name_or_path; pass the base model")
    if not isinstance(base, str):
        raise ValueError(f"{config_path}: base_model_name_or_path must be a path or Hub id, got {base!r}")
    return base


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter directory names (``base_model_name_or_path``).

    The chain of bases is followed first, as loading will follow it (a base that is an adapter
    directory without config.json loads its own base, and so on): a chain that comes back to an
    adapter already on it (itself, A -> B -> A), or stacks more than ``MAX_ADAPTER_CHAIN`` adapters,
    is refused naming the chain, where loading would recurse without end.
    """
    chain = [str(path)]
    seen = {Path(path).resolve()}
    base = current = _read_base(path)
    while _adapter_only(current):
        chain.append(current)
        if Path(current).resolve() in seen:
            raise ValueError(
                f"{Path(chain[-2]) / ADAPTER_CONFIG}: base_model_name_or_path leads back to {current}, an "
                f"adapter already on the chain {' -> '.join(chain)}; the chain must end in a model"
            )
        if len(chain) > MAX_ADAPTER_CHAIN:
            raise ValueError(
                f"{path}: more than {MAX_ADAPTER_CHAIN} adapters stacked on one another: {' -> '.join(chain)}"
            )
        seen.add(Path(current).resolve())
        current = _read_base(current)
    return base


def merge_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the LoRA adapter in ``path`` to ``model``'s weights, in place; returns ``model``.

    Supports what neoxja trains and peft's plain LoRA: ``r``/``lora_alpha`` with optional
    ``rank_pattern``/``alpha_pattern`` and ``use_rslora``; anything else (DoRA, biases, other
    adapter types) is refused with its name rather than merged wrongly. Every setting and tensor is
    checked before the first weight changes (types, ranks against the shapes, finite values, merged
    weights within the model's dtype), so a refused adapter leaves ``model`` as it was.
    """
    import torch
    from torch import nn

    directory = Path(path)
    settings = _LoraSettings.read(directory / ADAPTER_CONFIG)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}")
    modules = dict(model.named_modules())
    merges = []
    for name, (a, b) in _read_pairs(weights_path).items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{weights_path}: {name!r} is not a linear layer of the model")
        rank = a.shape[0]
        if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape) or b.shape[1] != rank:
            raise ValueError(
                f"{weights_path}: {name} has A {list(a.shape)} and B {list(b.shape)}, which do not fit "
                f"the weight {list(layer.weight.shape)}"
            )
        key, configured = settings.rank(name)
        if rank != configured:
            raise ValueError(
                f"{weights_path}: {name}.lora_A has rank {rank}, but {settings.path} says {key}={configured}"
            )
        scale = settings.alpha(name) / (math.sqrt(rank) if settings.use_rslora else rank)
        _check_merged(weights_path, name, layer.weight, a, b, scale)
        merges.append((layer, a, b, scale))
    with torch.no_grad():
        for layer, a, b, scale in merges:
            delta = (b.double() @ a.double()) * scale
            layer.weight.copy_((layer.weight.double() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    return model


def _read_pairs(weights_path: Path) -> dict[str, tuple[Any, Any]]:
    """(A, B) of each adapted layer (by the model's module name), every tensor a finite 2-d float."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights_path)
    except SafetensorError as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file: {err}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights merge)")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise ValueError(
                f"{weights_path}: {key} must be a 2-d float tensor, got {tensor.dtype} {list(tensor.shape)}"
            )
        bad = ~torch.isfinite(tensor)
        if bad.any():
            index = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"{weights_path}: {key} holds {tensor[tuple(index)].item()} at index {index}")
        pairs.setdefault(name, {})[part[0]] = tensor
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights_path}: {name} has lora_{next(iter(pair))} without its other half")
    return {name: (pair["A"], pair["B"]) for name, pair in pairs.items()}


def _check_merged(weights_path: Path, name: str, weight: Any, a: Any, b: Any, scale: float) -> None:
    """Refuse an adapter whose merged weight leaves the model dtype's finite range (an overflow would
    give inf or NaN logits). A bound on ``|W| + |scale| |B| |A|`` settles almost every layer without
    computing the product; only a layer the bound cannot clear is merged here on trial."""
    import torch

    largest = torch.finfo(weight.dtype).max
    with torch.no_grad():
        bound = weight.detach().abs().max().double() + abs(scale) * (
            b.double().abs().sum(dim=1).max() * a.double().abs().max()
        )
        if bound <= largest:
            return
        merged = weight.detach().double() + (b.double() @ a.double()).to(weight.device) * scale
        if torch.isfinite(merged.to(weight.dtype)).all():
            return
    raise ValueError(
        f"{weights_path}: merging {name} (scale {scale:g}) gives weights beyond {weight.dtype}'s range"
    )


def _positive_int(value: Any) -> bool:
    return type(value) is int and value >= 1


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


@dataclass
class _LoraSettings:
    """The settings of an adapter_config.json that a merge uses, each checked as it is read."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def read(cls, path: Path) -> _LoraSettings:
        config = read_json_object(path, "a peft adapter config")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
        for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
            if config.get(key, plain) != plain:
                raise ValueError(f"{path}: {key}={config[key]!r} is not supported; merge with peft instead")
        r, alpha = config.get("r", 8), config.get("lora_alpha", 8)  # peft's defaults
        if not _positive_int(r):
            raise ValueError(f"{path}: r={r!r}; it must be a positive integer")
        if not _positive_number(alpha):
            raise ValueError(f"{path}: lora_alpha={alpha!r}; it must be a finite number > 0")
        use_rslora = config.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"{path}: use_rslora={use_rslora!r}; it must be true or false")
        patterns = {}
        for key, valid, what in (
            ("rank_pattern", _positive_int, "a positive integer"),
            ("alpha_pattern", _positive_number, "a finite number > 0"),
        ):
            pattern = config.get(key) or {}
            if not isinstance(pattern, dict):
                raise ValueError(f"{path}: {key} must be an object (layer name -> value), got {pattern!r}")
            for layer, value in pattern.items():
                if not valid(value):
                    raise ValueError(f"{path}: {key}[{layer!r}]={value!r}; it must be {what}")
                try:
                    re.compile(layer)
                except re.error as err:
                    raise ValueError(f"{path}: {key} key {layer!r} is not a valid pattern: {err}") from None
            patterns[key] = pattern
        return cls(path, r, alpha, use_rslora, patterns["rank_pattern"], patterns["alpha_pattern"])

    def rank(self, name: str) -> tuple[str, int]:
        """(the setting that gives the rank of layer ``name``, that rank)."""
        key = _pattern_key(self.rank_pattern, name)
        return ("r", self.r) if key is None else (f"rank_pattern[{key!r}]", self.rank_pattern[key])

    def alpha(self, name: str) -> float:
        key = _pattern_key(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]


def _pattern_key(pattern: dict[str, Any], name: str) -> str | None:
    """The first key of peft's ``rank_pattern``/``alpha_pattern`` that matches layer ``name``, as
    peft matches them: a regular expression for the end of the name, after a dot or the start."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
