"""LoRA adapters in peft's format.

Training wraps the model with peft itself (``pip install neoxja[train]``), so the adapter files are
the ones peft writes for transformers' GPT-NeoX-Japanese: the same module names
(``query_key_value``, ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``), ``adapter_config.json``
and ``adapter_model.safetensors``. Loading an adapter for inference does not need peft:
:func:`merge_adapter` reads those two files and adds ``B @ A * scale`` to each target weight, which
gives the model peft's logits and keeps decoding on neoxja's fast paths (plain ``nn.Linear``).
"""

from __future__ import annotations

import math
import os
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


@dataclass
class LoraArguments:
    """LoRA's rank, scale (``alpha / r``), dropout on its input, and the layers it adapts."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target: tuple[str, ...] = TARGETS

    def validate(self) -> None:
        """A ``ValueError`` naming the first argument out of range."""
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.target) - set(TARGETS))
        if unknown or not self.target:
            raise ValueError(f"lora target {unknown or 'empty'} is not among {', '.join(TARGETS)}")


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA training needs peft: pip install 'neoxja[train]'") from err
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


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter directory names (``base_model_name_or_path``)."""
    config = read_json_object(Path(path) / ADAPTER_CONFIG, "a peft adapter config")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(path) / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model")
    return base


def merge_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the LoRA adapter in ``path`` to ``model``'s weights, in place; returns ``model``.

    Supports what neoxja trains and peft's plain LoRA: ``r``/``lora_alpha`` with optional
    ``rank_pattern``/``alpha_pattern`` and ``use_rslora``; anything else (DoRA, biases, other
    adapter types) is refused with its name rather than merged wrongly.
    """
    import torch
    from safetensors.torch import load_file
    from torch import nn

    directory = Path(path)
    config_path = directory / ADAPTER_CONFIG
    config = read_json_object(config_path, "a peft adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, plain) != plain:
            raise ValueError(
                f"{config_path}: {key}={config[key]!r} is not supported; merge with peft instead"
            )
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}")
    state = load_file(weights_path)
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights merge)")
        pairs.setdefault(name, {})[part[0]] = tensor
    with torch.no_grad():
        for name, pair in pairs.items():
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear) or set(pair) != {"A", "B"}:
                raise ValueError(
                    f"{weights_path}: {name!r} is not a linear layer of the model with lora_A and lora_B"
                )
            a, b = pair["A"], pair["B"]
            rank = a.shape[0]
            alpha = _pattern(config, "alpha_pattern", name, config.get("lora_alpha", 8))
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape) or b.shape[1] != rank:
                raise ValueError(
                    f"{weights_path}: {name} has A {list(a.shape)} and B {list(b.shape)}, which do not fit "
                    f"the weight {list(layer.weight.shape)}"
                )
            delta = (b.double() @ a.double()) * scale
            layer.weight.copy_((layer.weight.double() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    return model


def _pattern(config: dict, key: str, name: str, default: float) -> float:
    """A per-layer override from peft's ``rank_pattern``/``alpha_pattern`` (matched as a name suffix)."""
    for pattern, value in (config.get(key) or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return value
    return default
