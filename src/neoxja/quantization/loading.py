"""Loading into quantized layers: quantizing a dense checkpoint as it is read, or reading a
pre-quantized one (transformers + bitsandbytes' serialization).

Dense checkpoints are quantized one weight at a time, as each tensor comes off the file: the
float model is never resident, so loading peaks near the quantized model plus one layer's float
weight. The checkpoint's tensors are read (not memory-mapped) so that a weight's pages are freed
once it is quantized. Which layers: every ``nn.Linear`` but ``llm_int8_skip_modules`` (default:
the output head, as transformers).

The output head, when the skip list leaves it out (``llm_int8_skip_modules=[]``), becomes an int8
layer (:class:`Linear8bit`) in every format: it is a sixth of what a 4-bit model reads per token in
float32 and its error reaches every logit directly, so it gets int8's precision, not 4 bits. A head
tied to the input embedding (this model's default) is quantized from the embedding, which stays
float32 for its row lookups; the two are then separate tensors, so the model's config says
``tie_word_embeddings=False`` and ``save_pretrained`` writes both (the head as int8 rows with its
``SCB``). A pre-quantized head is read in the format its tensors are in (int8 with ``SCB``, else the
checkpoint's own format, as transformers writes an untied 4-bit head).

Every quantized layer is built with the load's CPU arithmetic (``cpu_arithmetic``:
:mod:`neoxja.quantization.arithmetic`); :func:`set_arithmetic` changes a loaded model's.
"""

from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from neoxja.quantization.arithmetic import Arithmetic, check_arithmetic
from neoxja.quantization.config import BitsAndBytesConfig
from neoxja.quantization.layers import QUANTIZED_FORMATS, QuantizedLinear

if TYPE_CHECKING:
    from neoxja.network import GPTNeoXJapanesePreTrainedModel

DEFAULT_SKIP = ("embed_out",)
WEIGHT_FORMATS = tuple(QUANTIZED_FORMATS)


@dataclass
class QuantizationPlan:
    """What to quantize and how: a format class, its options, the modules left dense and the layers'
    CPU arithmetic."""

    fmt: type[QuantizedLinear]
    options: dict[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = DEFAULT_SKIP
    config: BitsAndBytesConfig | None = None  # written to config.json when the format is bitsandbytes'
    arithmetic: Arithmetic = "fast"

    @classmethod
    def from_config(cls, config: BitsAndBytesConfig) -> QuantizationPlan:
        """The plan a ``BitsAndBytesConfig`` describes."""
        skip = DEFAULT_SKIP if config.llm_int8_skip_modules is None else tuple(config.llm_int8_skip_modules)
        arithmetic = config.cpu_arithmetic
        if config.load_in_8bit:
            return cls(QUANTIZED_FORMATS["int8"], {}, skip, config, arithmetic)
        if not config.load_in_4bit:
            raise ValueError(
                "quantization_config has neither load_in_4bit nor load_in_8bit set: nothing to quantize"
            )
        options = {"double_quant": config.bnb_4bit_use_double_quant, "storage": config.bnb_4bit_quant_storage}
        return cls(QUANTIZED_FORMATS[config.bnb_4bit_quant_type], options, skip, config, arithmetic)

    @classmethod
    def from_format(cls, name: str, cpu_arithmetic: str = "fast", **options: Any) -> QuantizationPlan:
        """The plan for neoxja's ``weight_format=`` / ``--quantize`` names."""
        if name not in QUANTIZED_FORMATS:
            raise ValueError(f"weight_format={name!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        arithmetic: Arithmetic = check_arithmetic(cpu_arithmetic, "cpu_arithmetic")  # type: ignore[assignment]
        fmt = QUANTIZED_FORMATS[name]
        config = None
        if name != "bfloat16":
            config = BitsAndBytesConfig(
                load_in_8bit=name == "int8", load_in_4bit=name != "int8",
                bnb_4bit_quant_type=name if name != "int8" else "nf4",
                bnb_4bit_use_double_quant=bool(options.get("double_quant", False)),
                cpu_arithmetic=arithmetic,
            )  # fmt: skip
        return cls(fmt, options, DEFAULT_SKIP, config, arithmetic)

    def with_arithmetic(self, cpu_arithmetic: str | None) -> QuantizationPlan:
        """This plan with its layers computing in ``cpu_arithmetic`` (None: as it is); its config, which
        config.json receives, says the same. The plan itself is left as it is."""
        if cpu_arithmetic is None:
            return self
        arithmetic: Arithmetic = check_arithmetic(cpu_arithmetic, "cpu_arithmetic")  # type: ignore[assignment]
        config = copy.deepcopy(self.config)
        if config is not None:
            config.cpu_arithmetic = arithmetic
        return QuantizationPlan(self.fmt, dict(self.options), self.skip, config, arithmetic)

    def skips(self, name: str) -> bool:
        """Whether the module called ``name`` stays dense."""
        return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in self.skip)


def check_device(plan: QuantizationPlan, device: torch.device) -> None:
    """A ValueError naming the field when the device cannot run the plan's compute dtype."""
    config = plan.config
    if device.type == "cuda" and config is not None and config.load_in_4bit:
        if config.bnb_4bit_compute_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "bnb_4bit_compute_dtype=bfloat16 cannot run on "
                f"{torch.cuda.get_device_name(device)}: use float16"
            )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantized layers run on the CPU or CUDA, not on device {device}")


def target_layers(model: nn.Module, plan: QuantizationPlan) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` to quantize, by name (the output head among them unless
    the plan skips it)."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not plan.skips(name)
    }


def head_name(model: nn.Module) -> str | None:
    """The name of ``model``'s output head module (None for a model without one)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is output), None)


def is_tied(model: nn.Module) -> bool:
    """Whether ``model``'s config ties its output head to the input embedding (transformers' default)."""
    return bool(getattr(model.config, "tie_word_embeddings", True))


class QuantizingLoader:
    """The ``take`` hook of :func:`neoxja.checkpoint.load_state` that builds quantized layers."""

    def __init__(
        self,
        model: nn.Module,
        plan: QuantizationPlan,
        prequantized: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.plan = plan
        self.dtype = dtype
        self.prequantized = prequantized
        self.device = device
        self.targets = target_layers(model, plan)
        self.head = head_name(model) if head_name(model) in self.targets else None
        self.tied_head = self.head is not None and is_tied(model)
        self.pieces: dict[str, dict[str, Tensor]] = {name: {} for name in self.targets}
        self.files: dict[str, dict[str, Path]] = {name: {} for name in self.targets}  # for the errors

    def _format(self, name: str) -> type[QuantizedLinear]:
        """The layer class of target ``name``: int8 for the output head, the plan's format otherwise."""
        return QUANTIZED_FORMATS["int8"] if name == self.head else self.plan.fmt

    def _layer_of(self, key: str) -> tuple[str, str] | None:
        name, _, rest = key.partition(".weight")
        if name in self.targets and (rest == "" or rest.startswith(".")):
            return name, "weight" + rest
        name, _, rest = key.rpartition(".")
        if name in self.targets and rest in ("bias", "SCB", "weight_format"):
            return name, rest
        return None

    def __call__(self, key: str, path: Path, tensor: Tensor) -> bool:
        found = self._layer_of(key)
        if found is None:
            return False
        name, sub = found
        module = self.targets[name]
        if name == self.head and self.tied_head:
            return False  # a tied head is the input embedding's weight: it is quantized from there
        if not self.prequantized and sub not in ("weight", "bias"):
            return False
        if sub in self.pieces[name]:
            raise ValueError(f"{path}: {key} is also in {self.files[name][sub]}: which one is meant?")
        self.files[name][sub] = path
        if sub == "weight" and not self.prequantized:
            if tuple(tensor.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"{path}: shape mismatch for {key}: checkpoint has {list(tensor.shape)}, "
                    "the model expects "
                    f"{list(module.weight.shape)}"
                )
            if not tensor.is_floating_point():
                raise ValueError(
                    f"{path}: {key} holds {tensor.dtype} values; a dense checkpoint needs float "
                    "weights (is it "
                    "quantized without a quantization_config in config.json?)"
                )
            weight = tensor.to(
                device=self.device, dtype=self.dtype
            )  # quantized from the load dtype, as bitsandbytes
            options = {} if name == self.head else self.plan.options
            self.pieces[name]["weight"] = self._format(name).from_weight(
                weight, None, cpu_arithmetic=self.plan.arithmetic, **options
            )
            return True
        self.pieces[name][sub] = tensor.to(self.device)
        return True

    def install(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Put the quantized layers into ``model`` (after the other tensors were loaded), then hand
        the quantization's freed temporaries back to the system (:func:`release_freed_memory`)."""
        for name, pieces in self.pieces.items():
            bias = pieces.get("bias")
            if bias is not None:
                bias = bias.to(dtype)
            if name == self.head and self.tied_head:
                layer = self._tied_head(model)
            elif not pieces or (self.prequantized and "weight" not in pieces):
                raise ValueError(f"quantized checkpoint: {name}.weight is missing")
            elif self.prequantized:
                int8_head = name == self.head and "SCB" in pieces
                fmt = QUANTIZED_FORMATS["int8"] if int8_head else self.plan.fmt
                layer = fmt.from_state(
                    pieces, name + ".", bias, self.files[name], cpu_arithmetic=self.plan.arithmetic
                )
                module = self.targets[name]
                if (layer.out_features, layer.in_features) != (module.out_features, module.in_features):
                    raise ValueError(
                        f"{self.files[name]['weight']}: {name}.weight is [{layer.out_features}, "
                        f"{layer.in_features}] "
                        "but the model (from its config) expects "
                        f"[{module.out_features}, {module.in_features}]"
                    )
            else:
                layer = pieces["weight"]
                if bias is not None:
                    layer.bias = nn.Parameter(bias, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.eval())
        if self.tied_head:
            model.config.tie_word_embeddings = False  # the head is an int8 copy of the embedding now
        if self.plan.config is not None:
            model.config.quantization_config = self.plan.config.to_dict()
        if not self.prequantized:
            release_freed_memory()

    def _tied_head(self, model: nn.Module) -> QuantizedLinear:
        """The int8 head quantized from the input embedding (loaded by now; it stays as it is)."""
        embedding = model.get_input_embeddings().weight.detach()
        return QUANTIZED_FORMATS["int8"].from_weight(
            embedding.to(self.device), None, cpu_arithmetic=self.plan.arithmetic
        )


def release_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Quantizing frees float temporaries of every size between the long-lived quantized buffers;
    glibc keeps the pages of freed blocks below its mmap threshold (up to 32 MiB) for reuse, which
    left the loaded 2.7B in nf4 holding ~0.45 GB of free heap beside its 1.46 GB. Only memory that
    is already free is given back; nothing the process uses moves.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def plan_for(
    config: Any,
    quantization_config: BitsAndBytesConfig | dict | None,
    weight_format: str | None,
    cpu_arithmetic: str | None = None,
) -> tuple[QuantizationPlan | None, bool]:
    """(the plan, whether the checkpoint is pre-quantized) for a load's arguments and config.json.

    A pre-quantized checkpoint loads in its own format: asking for that format (``weight_format=`` or
    ``quantization_config=``) is fine, asking for another is a ValueError (:func:`check_format`).
    ``cpu_arithmetic`` (``from_pretrained(..., cpu_arithmetic=)``) sets the layers' CPU arithmetic,
    over the one ``quantization_config`` gives; a pre-quantized checkpoint otherwise keeps the one
    its config.json names (``"fast"`` when it names none, as transformers' files). Given for a load
    that quantizes nothing, it is refused: it would have no effect.
    """
    if cpu_arithmetic is not None:
        check_arithmetic(cpu_arithmetic, "cpu_arithmetic")
    if quantization_config is not None and weight_format is not None:
        raise ValueError("give quantization_config or weight_format, not both")
    if isinstance(quantization_config, dict):
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    if quantization_config is not None and not isinstance(quantization_config, BitsAndBytesConfig):
        raise TypeError(
            "quantization_config must be a neoxja.BitsAndBytesConfig, got "
            f"{type(quantization_config).__name__}"
        )
    asked = QuantizationPlan.from_config(quantization_config) if quantization_config is not None else None
    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        stored = _saved_settings(config, saved)
        if asked is not None:
            check_format(config, stored, format_of(quantization_config), "quantization_config")
        elif weight_format is not None:
            check_format(config, stored, weight_format, "weight_format")
        plan = QuantizationPlan.from_config(stored)
        if quantization_config is not None:
            plan = plan.with_arithmetic(quantization_config.cpu_arithmetic)
        return plan.with_arithmetic(cpu_arithmetic), True
    if asked is not None:
        return asked.with_arithmetic(cpu_arithmetic), False
    if weight_format is not None:
        return QuantizationPlan.from_format(weight_format).with_arithmetic(cpu_arithmetic), False
    if cpu_arithmetic is not None:
        raise ValueError(
            "cpu_arithmetic applies to quantized and bfloat16 layers: give weight_format= or "
            "quantization_config= too (this checkpoint is not quantized)"
        )
    return None, False


def format_of(settings: BitsAndBytesConfig) -> str | None:
    """neoxja's name (``weight_format=`` / ``--quantize``) of the format ``settings`` quantize to (None:
    they quantize nothing)."""
    if settings.load_in_8bit:
        return "int8"
    return settings.bnb_4bit_quant_type if settings.load_in_4bit else None


def _describe(option: str, requested: str) -> str:
    """How the user asked for ``requested``: ``weight_format='int8'``, ``--quantize int8``, ..."""
    if option == "quantization_config":
        return f"quantization_config ({requested})"
    return f"{option} {requested}" if option.startswith("--") else f"{option}={requested!r}"


def check_format(config: Any, stored: BitsAndBytesConfig, requested: str, option: str) -> None:
    """A ValueError when the pre-quantized checkpoint of ``config`` (in ``stored``'s format) is asked
    for another format, ``requested``, through ``option`` (``weight_format``, ``quantization_config``
    or a CLI flag such as ``--quantize``): its weights cannot be quantized again, and loading it as
    saved would silently give another format than the one asked for. The same format is fine."""
    if requested not in QUANTIZED_FORMATS:
        raise ValueError(f"{_describe(option, requested)} is not one of {', '.join(WEIGHT_FORMATS)}")
    own = format_of(stored)
    if own is not None and requested != own:  # (settings that quantize nothing: the load reports them)
        where = getattr(config, "name_or_path", "") or "the checkpoint"
        raise ValueError(
            f"{_describe(option, requested)} asks for {requested}, but {where} is already quantized to "
            f"{own} (quantization_config in its config.json) and loads only as {own}; for {requested}, "
            "quantize the float checkpoint it was made from instead"
        )


def check_requested_format(name_or_path: str | Path, requested: str, option: str = "--quantize") -> None:
    """Before any weight is read: a ValueError (:func:`check_format`) when the model directory or Hub id
    ``name_or_path`` is a pre-quantized checkpoint in another format than ``requested``. Reads only its
    config.json; a model without one is left to the load to report."""
    from neoxja.configuration import GPTNeoXJapaneseConfig
    from neoxja.hub import resolve_file

    if resolve_file(name_or_path, "config.json") is None:
        return
    config = GPTNeoXJapaneseConfig.from_pretrained(name_or_path)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        check_format(config, _saved_settings(config, saved), requested, option)


def _saved_settings(config: Any, saved: Any) -> BitsAndBytesConfig:
    """The ``quantization_config`` of a checkpoint's config.json, its errors naming that file and key."""
    if isinstance(saved, BitsAndBytesConfig):
        return saved
    where = Path(getattr(config, "name_or_path", "") or ".")
    where = where if where.suffix == ".json" else where / "config.json"
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got a {type(saved).__name__}")
    try:
        return BitsAndBytesConfig.from_dict(saved)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: quantization_config: {error}") from None


def quantize(
    model: GPTNeoXJapanesePreTrainedModel, weight_format: str, cpu_arithmetic: str = "fast", **options: Any
) -> nn.Module:
    """Swap ``weight_format``'s layers into ``model`` in place (an explicit conversion, like
    :func:`neoxja.linear.swap_linear_layers`), computing with ``cpu_arithmetic``; ``options`` as the
    format's (``blocksize``, ``double_quant``). Returns ``model``."""
    from neoxja.linear import swap_linear_layers

    plan = QuantizationPlan.from_format(weight_format, cpu_arithmetic, **options)
    targets = target_layers(model, plan)
    swap_linear_layers(
        model, plan.fmt, where=lambda name, _: name in targets, cpu_arithmetic=plan.arithmetic, **plan.options
    )
    if plan.config is not None:
        model.config.quantization_config = plan.config.to_dict()
    return model


def set_arithmetic(model: nn.Module, cpu_arithmetic: str) -> nn.Module:
    """Make every quantized layer of ``model`` compute with ``cpu_arithmetic`` (``"fast"`` or
    ``"exact"``). This changes the model in place, as an explicit setter: its layers and the
    ``cpu_arithmetic`` of its config's ``quantization_config`` (what ``save_pretrained`` writes).
    Returns ``model``; a model without quantized layers is refused (the call would do nothing)."""
    arithmetic = check_arithmetic(cpu_arithmetic, "cpu_arithmetic")
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers whose arithmetic could be set")
    for layer in layers:
        layer.arithmetic = arithmetic  # type: ignore[assignment]
    settings = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(settings, dict):
        settings["cpu_arithmetic"] = arithmetic
    elif isinstance(settings, BitsAndBytesConfig):
        settings.cpu_arithmetic = arithmetic
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
