"""The model's hyper-parameters: :class:`GPTNeoXJapaneseConfig`, read from and written to ``config.json``.

The file format is the one transformers uses for ``model_type = "gpt_neox_japanese"``. Both of its
generations are read: transformers 4.x wrote the rotary settings as ``rotary_pct``,
``rotary_emb_base`` and ``rope_scaling``; transformers 5.x writes them in one ``rope_parameters``
dict. neoxja keeps ``rope_parameters`` (5.x form) as the source of truth and writes that form, so a
config saved here loads in transformers 5 to an equal config. The old names stay available as
properties. Keys neoxja does not know are kept as attributes and written back unchanged.

This module does not need torch, except :func:`get_activation` and ``torch_dtype``, which import it
when called.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neoxja.hub import HubOptions, resolve_file
from neoxja.jsonfile import read_json_object

CONFIG_NAME = "config.json"

# Named architectures for ``neoxja init``, the benchmarks and the tests: the fields that differ from
# the defaults, which are abeja/gpt-neox-japanese-2.7b's.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "2.7b": {},
}

# Names accepted for ``hidden_act``; each computes what transformers' ACT2FN entry of that name does.
ACTIVATIONS = (
    "gelu",
    "gelu_10",
    "gelu_accurate",
    "gelu_fast",
    "gelu_new",
    "gelu_python",
    "gelu_pytorch_tanh",
    "linear",
    "mish",
    "quick_gelu",
    "relu",
    "relu2",
    "relu6",
    "sigmoid",
    "silu",
    "swish",
    "tanh",
)

# RoPE variants (``rope_parameters["rope_type"]``) and the keys each one cannot do without.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ROPE_NEEDS_ORIGINAL_MAX = ("yarn", "longrope", "llama3")

# Written by the library that saved the file; describes the writer, not the model, so not kept.
_WRITER_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")

# Computed from other fields; a file may carry them, but they must agree with what they derive from.
_DERIVED = ("head_dim", "intermediate_size", "rotary_ndims")

# Upper bounds on the sizes: far beyond any model of this architecture (the 2.7B model has 32 layers
# of width 2560 and 32000 tokens), far below sizes whose products overflow. A config past them is a
# damaged or crafted file, refused before anything is built or allocated.
SIZE_LIMITS = {
    "vocab_size": 2**24,
    "hidden_size": 2**16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 2**16,
    "max_position_embeddings": 2**24,
    "intermediate_size": 2**20,
}
# Fields that hold true or false, and special token ids (an int, or none).
_FLAGS = (
    "use_cache",
    "tie_word_embeddings",
    "is_decoder",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
)
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def get_activation(name: str) -> Callable:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`), as a tensor -> tensor callable.

    Each matches transformers' ``ACT2FN[name]`` bit for bit on the same inputs: ``gelu`` is the exact
    (erf) GELU, ``gelu_new``/``gelu_pytorch_tanh`` the tanh approximation, and so on.
    """
    import torch
    import torch.nn.functional as F

    sqrt_2_over_pi = math.sqrt(2.0 / math.pi)

    def gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(sqrt_2_over_pi * (x + 0.044715 * torch.pow(x, 3.0))))

    def gelu_erf_formula(x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))

    def gelu_fast(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))

    def gelu_accurate(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(sqrt_2_over_pi * (x + 0.044715 * torch.pow(x, 3))))

    functions: dict[str, Callable] = {
        "gelu": F.gelu,
        "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
        "gelu_accurate": gelu_accurate,
        "gelu_fast": gelu_fast,
        "gelu_new": gelu_tanh_formula,
        "gelu_python": gelu_erf_formula,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "linear": lambda x: x,
        "mish": F.mish,
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu,
        "relu2": lambda x: torch.square(F.relu(x)),
        "relu6": F.relu6,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
        "swish": F.silu,
        "tanh": torch.tanh,
    }
    if name not in functions:
        raise ValueError(f"hidden_act={name!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
    return functions[name]


class GPTNeoXJapaneseConfig:
    """Hyper-parameters of a GPT-NeoX-Japanese model; the defaults describe abeja/gpt-neox-japanese-2.7b.

    The arguments are the seed's (transformers') ones. ``rotary_pct``, ``rotary_emb_base`` and
    ``rope_scaling`` are folded into ``rope_parameters`` (transformers-5 form). As in transformers,
    ``rope_scaling`` wins over ``rope_parameters``, and keys inside either win over ``rotary_pct`` and
    ``rotary_emb_base``. Any other keyword becomes an attribute and is written back by :meth:`to_dict`
    (``head_dim``, ``intermediate_size`` and ``rotary_ndims`` are accepted only if they agree with the
    fields they derive from).
    """

    model_type = "gpt_neox_japanese"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2560,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        intermediate_multiple_size: int = 4,
        hidden_act: str = "gelu",
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        use_cache: bool = True,
        bos_token_id: int | None = 31996,
        eos_token_id: int | list[int] | None = 31999,
        rope_scaling: dict | None = None,
        attention_dropout: float = 0.1,
        hidden_dropout: float = 0.0,
        *,
        rope_parameters: dict | None = None,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        is_decoder: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        dtype: Any = None,
        architectures: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_multiple_size = intermediate_multiple_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.tie_word_embeddings = tie_word_embeddings
        self.is_decoder = is_decoder
        self.output_attentions = output_attentions
        self.output_hidden_states = output_hidden_states
        self.return_dict = return_dict
        if architectures is not None and not isinstance(architectures, (list, tuple)):
            raise ValueError(f"architectures must be a list of class names, got {architectures!r}")
        self.architectures = list(architectures) if architectures is not None else None

        # Old files say torch_dtype, new ones dtype; the new name wins when both are there.
        legacy_dtype = kwargs.pop("torch_dtype", None)
        self._dtype = (
            _dtype_name(dtype, "dtype") if dtype is not None else _dtype_name(legacy_dtype, "torch_dtype")
        )

        theta = float(rotary_emb_base) if _is_number(rotary_emb_base) else rotary_emb_base
        self.rope_parameters = _complete_rope(
            rope_scaling or rope_parameters, theta, rotary_pct, max_position_embeddings
        )

        for key in (*_WRITER_KEYS, "model_type"):
            kwargs.pop(key, None)
        derived = {key: kwargs.pop(key) for key in _DERIVED if key in kwargs}
        for key, value in kwargs.items():
            if key in vars(self):  # e.g. "_dtype": a field kept under another name
                raise ValueError(f"{key!r} is the internal name of a {type(self).__name__} field: refused")
            self._check_settable(key)
            setattr(self, key, value)
        self.validate()
        for key, value in derived.items():
            self._check_derived(key, value)

    # ----- derived values used by the network -------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        """Width of the MLP's hidden layer."""
        return int(self.hidden_size * self.intermediate_multiple_size)

    @property
    def rotary_pct(self) -> float:
        """Fraction of each head's dimensions that RoPE rotates (``partial_rotary_factor``)."""
        return self.rope_parameters.get("partial_rotary_factor", 1.0)

    @rotary_pct.setter
    def rotary_pct(self, value: float) -> None:
        self.rope_parameters["partial_rotary_factor"] = value

    @property
    def rotary_ndims(self) -> int:
        """Number of leading dimensions of each head that RoPE rotates."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def rotary_emb_base(self) -> float:
        """RoPE's base wavelength (``rope_theta``)."""
        return self.rope_parameters["rope_theta"]

    @rotary_emb_base.setter
    def rotary_emb_base(self, value: float) -> None:
        self.rope_parameters["rope_theta"] = value

    @property
    def rope_scaling(self) -> dict | None:
        """The scaling part of ``rope_parameters`` in transformers-4 form, or None for plain RoPE."""
        if self.rope_parameters.get("rope_type", "default") == "default":
            return None
        return {
            key: copy.deepcopy(value)
            for key, value in self.rope_parameters.items()
            if key not in ("rope_theta", "partial_rotary_factor")
        }

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        rope = {
            key: v for key, v in (value or {}).items() if key not in ("rope_theta", "partial_rotary_factor")
        }
        self.rope_parameters = _complete_rope(
            rope, self.rotary_emb_base, self.rotary_pct, self.max_position_embeddings
        )

    @property
    def dtype(self) -> Any:
        """The dtype the weights were saved in (``torch.dtype``), or None when the file does not say."""
        if self._dtype is None:
            return None
        import torch

        return getattr(torch, self._dtype)

    @dtype.setter
    def dtype(self, value: Any) -> None:
        self._dtype = _dtype_name(value, "dtype")

    torch_dtype = dtype  # the transformers-4 name of the same field

    # ----- validation -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value the model cannot be built with: a wrong
        type, or a size outside ``1..SIZE_LIMITS[key]`` (checked before any product of sizes is taken)."""
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
            if value > SIZE_LIMITS[key]:
                raise ValueError(f"{key}={value} is beyond the limit of {SIZE_LIMITS[key]}: refused")
        if not _is_number(self.intermediate_multiple_size) or self.intermediate_size <= 0:
            raise ValueError(
                f"intermediate_multiple_size must be a positive number (hidden_size * it is the MLP width), "
                f"got {self.intermediate_multiple_size!r}"
            )
        if self.intermediate_size > SIZE_LIMITS["intermediate_size"]:
            raise ValueError(
                f"intermediate_multiple_size={self.intermediate_multiple_size} makes the MLP "
                f"(hidden_size * it) wider than the limit of {SIZE_LIMITS['intermediate_size']}: refused"
            )
        for key in _FLAGS:
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        for key in _TOKEN_IDS:
            value = getattr(self, key)
            ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not (ids and all(_is_int(i) and i >= 0 for i in ids)):
                allowed = "a token id or a list of them" if key == "eos_token_id" else "a token id"
                raise ValueError(f"{key} must be {allowed} (an integer >= 0) or null, got {value!r}")
        architectures = self.architectures
        if architectures is not None and not all(isinstance(name, str) for name in architectures):
            raise ValueError(f"architectures must be a list of class names, got {architectures!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; choose one of {', '.join(ACTIVATIONS)}"
            )
        for key in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be a probability in [0, 1], got {value!r}")
        if not _is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range!r}")
        self._validate_rope()

    def _validate_rope(self) -> None:
        rope = self.rope_parameters
        rope_type = rope.get("rope_type")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_parameters['rope_type']={rope_type!r} is unknown; "
                f"choose one of {', '.join(ROPE_TYPES)}"
            )
        pct = rope.get("partial_rotary_factor")
        if not _is_number(pct) or not 0.0 < pct <= 1.0:
            raise ValueError(f"rotary_pct (partial_rotary_factor) must be in (0, 1], got {pct!r}")
        ndims = self.rotary_ndims
        if ndims < 2 or ndims % 2:
            raise ValueError(
                f"rotary_pct={pct} gives {ndims} rotary dimensions per head (head_dim={self.head_dim}); "
                f"RoPE needs an even number >= 2"
            )
        theta = rope.get("rope_theta")
        if not _is_number(theta) or theta <= 0:
            raise ValueError(f"rotary_emb_base (rope_theta) must be a positive number, got {theta!r}")
        missing = [key for key in _ROPE_REQUIRED_KEYS[rope_type] if key not in rope]
        if missing:
            raise ValueError(
                f"rope_parameters for rope_type={rope_type!r} lacks {', '.join(map(repr, missing))}"
            )
        factor = rope.get("factor")
        # yarn and longrope infer a missing factor from max_position_embeddings / original max.
        if rope_type != "default" and not (factor is None and rope_type in ("yarn", "longrope")):
            if not _is_number(factor) or factor <= 0:
                raise ValueError(f"rope_parameters['factor'] must be a positive number, got {factor!r}")
        if "original_max_position_embeddings" in rope:
            original = rope["original_max_position_embeddings"]
            if not _is_int(original) or original <= 0:
                raise ValueError(
                    f"rope_parameters['original_max_position_embeddings'] must be a positive integer, "
                    f"got {original!r}"
                )
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                value = rope[key]
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != ndims // 2
                    or not all(_is_number(v) and v > 0 for v in value)
                ):
                    raise ValueError(
                        f"rope_parameters[{key!r}] must be a list of {ndims // 2} positive numbers "
                        f"(rotary_ndims / 2), got {value!r}"
                    )
        if rope_type == "llama3":
            low, high = rope["low_freq_factor"], rope["high_freq_factor"]
            if not _is_number(low) or not _is_number(high) or not 0 < low < high:
                raise ValueError(
                    f"rope_parameters needs 0 < low_freq_factor < high_freq_factor, got {low!r} and {high!r}"
                )

    def _check_settable(self, key: str) -> None:
        """A ValueError when ``key`` (from a file or an override) names a method or a computed value
        of the class, which setting it would break, rather than a setting."""
        attribute = getattr(type(self), key, None)
        if key in _DERIVED or attribute is None or (isinstance(attribute, property) and attribute.fset):
            return
        kind = "computed value" if isinstance(attribute, property) else "method or class attribute"
        raise ValueError(f"{key!r} is a {type(self).__name__} {kind}, not a setting: refused")

    def _check_derived(self, key: str, value: Any) -> None:
        expected = getattr(self, key)
        if value != expected:
            raise ValueError(f"{key}={value!r} contradicts the other fields, which give {key}={expected}")

    # ----- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-able values, in transformers-5 form (what ``config.json`` holds)."""
        out = {key: copy.deepcopy(value) for key, value in vars(self).items() if not key.startswith("_")}
        out["dtype"] = self._dtype
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        """:meth:`to_dict` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GPTNeoXJapaneseConfig:
        """Build a config from a ``config.json`` dict (either transformers generation); kwargs override."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"a config must be a JSON object (dict), got {type(config_dict).__name__}")
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type={model_type!r} is not {cls.model_type!r}: another model's config")
        config = cls(**config_dict)
        config._override(kwargs)
        return config

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> GPTNeoXJapaneseConfig:
        """The architecture named ``name`` in :data:`PRESETS` (``"tiny"``, ``"small"``, ``"2.7b"``);
        keyword arguments set other fields (``vocab_size``, special ids, ...)."""
        if name not in PRESETS:
            raise ValueError(f"preset {name!r} is not one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kwargs})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GPTNeoXJapaneseConfig:
        """Read a ``config.json`` file."""
        data = read_json_object(path, "a config.json object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> GPTNeoXJapaneseConfig:
        """Load ``config.json`` from a model directory, a Hub id or the file itself; other keyword
        arguments override fields.

        Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``) are
        taken out first and passed to :func:`neoxja.hub.resolve_file`.
        """
        options = HubOptions.pop_from(kwargs)
        if Path(name_or_path).is_file():  # a config.json given directly
            path: Path | None = Path(name_or_path)
        else:
            path = resolve_file(name_or_path, CONFIG_NAME, options)
        if path is None:
            where = Path(name_or_path) / options.subfolder if options.subfolder else name_or_path
            raise OSError(f"no {CONFIG_NAME} in {str(where)!r}")
        config = cls.from_json_file(path)
        config._override(kwargs)
        config._name_or_path = str(name_or_path)
        return config

    def _override(self, values: dict[str, Any]) -> None:
        """Set fields from ``from_pretrained``/``from_dict`` keyword arguments, then re-validate."""
        for key, value in values.items():
            self._check_settable(key)
            if key == "rope_parameters":
                value = _complete_rope(
                    value, self.rotary_emb_base, self.rotary_pct, self.max_position_embeddings
                )
            if key not in _DERIVED:
                setattr(self, key, value)
        self.validate()
        for key in _DERIVED:
            if key in values:
                self._check_derived(key, values[key])

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``save_directory`` (created if needed) and return its path."""
        directory = Path(save_directory)
        if directory.is_file():
            raise OSError(f"cannot save the config into {directory}: it is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @property
    def name_or_path(self) -> str:
        """Where :meth:`from_pretrained` loaded this config from ('' otherwise)."""
        return getattr(self, "_name_or_path", "")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GPTNeoXJapaneseConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def _dtype_name(value: Any, key: str) -> str | None:
    """The name in :data:`_DTYPE_NAMES` of ``value`` (a torch dtype, or its name with or without
    ``torch.``), None for None; a ValueError naming ``key`` otherwise."""
    if value is None:
        return None
    name = value if isinstance(value, str) else str(value)
    name = name.removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"{key}={value!r} is not one of the torch dtypes {', '.join(_DTYPE_NAMES)}")
    return name


def _complete_rope(rope: Any, theta: Any, rotary_pct: Any, max_positions: Any) -> dict[str, Any]:
    """A copy of ``rope`` with what transformers fills in: theta, rotary fraction, type, original max."""
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters (rope_scaling) must be a dict, got {type(rope).__name__}")
    rope = copy.deepcopy(rope)
    rope.setdefault("rope_theta", theta)
    rope.setdefault("partial_rotary_factor", rotary_pct)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in _ROPE_NEEDS_ORIGINAL_MAX:
        rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
