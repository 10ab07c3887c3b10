"""Decoding settings: :class:`GenerationConfig`, named and defaulted as in transformers.

Every rule about a setting's value lives here, in :func:`check_setting` (one rule per setting) and
:func:`check_temperature`. :meth:`GenerationConfig.validate`, which ``generate()``,
``stream_generate()``, ``pipeline()`` and the CLI all go through, and the logits processors of
:mod:`neoxja.sample_utils` call them, so a bad value gets the same message wherever it comes from.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from neoxja.jsonfile import read_json_object

GENERATION_CONFIG_NAME = "generation_config.json"

TEXT_GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
"""What a person asking for text gets unless they say otherwise: transformers' text-generation
pipeline's defaults, used by ``pipeline()`` and by ``neoxja generate``/``neoxja chat`` (whose
``--temperature 0`` is greedy decoding). Settings not named here come from the model's
``generation_config`` as in ``generate()`` (top_k 50, top_p 1.0, no min_p, no repetition penalty
unless the checkpoint's generation_config.json says otherwise)."""

MIN_REPETITION_PENALTY = 1e-30
"""The smallest repetition penalty: a positive score divided by it stays finite in float32 up to
3.4e8 (float32's maximum times the penalty), far beyond any model's logits. Penalties above 1 can
only push negative scores towards -inf, which is their limit, so they have no upper bound."""


@dataclass
class GenerationConfig:
    """Decoding settings, named and defaulted as in transformers' ``GenerationConfig``.

    ``max_length`` counts prompt + new tokens, ``max_new_tokens`` only new ones (it wins when both are
    set). With neither set, 20 new tokens are generated (capped at ``max_position_embeddings``).
    ``top_k``/``top_p``/``min_p``/``temperature`` only act when ``do_sample=True``; ``min_p`` keeps the
    tokens whose probability is at least ``min_p`` times the most likely one's (after temperature).
    Keys this class does not know (e.g. from a transformers ``generation_config.json``) are kept in
    ``extra`` and written back.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The settings ``generate`` accepts as keyword arguments."""
        return frozenset(f.name for f in fields(cls)) - {"extra"}

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The special token ids of a model config (what transformers does without generation_config.json)."""
        return cls(
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        """Build from a dict; unknown keys go to ``extra``."""
        known = cls.field_names()
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.extra = {k: v for k, v in values.items() if k not in known and k != "extra"}
        return config

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> GenerationConfig:
        """Read ``generation_config.json`` from a directory or Hub id (Hub options as in from_pretrained)."""
        from neoxja.hub import HubOptions, resolve_file

        options = HubOptions.pop_from(kwargs)
        path = resolve_file(name_or_path, GENERATION_CONFIG_NAME, options)
        if path is None:
            raise OSError(f"{name_or_path} has no {GENERATION_CONFIG_NAME}")
        values = read_json_object(path, "a JSON object of generation settings")
        return cls.from_dict({**values, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting plus the ``extra`` keys."""
        values = asdict(self)
        extra = values.pop("extra")
        return {**values, **extra}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``generation_config.json`` (only the settings that differ from the defaults)."""
        default = GenerationConfig().to_dict()
        values = {k: v for k, v in self.to_dict().items() if k not in default or default[k] != v}
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / GENERATION_CONFIG_NAME
        path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known settings in place and return the keyword arguments that are not settings."""
        known = self.field_names()
        for key, value in kwargs.items():
            if key in known:
                setattr(self, key, value)
        return {k: v for k, v in kwargs.items() if k not in known}

    def validate(self) -> None:
        """Raise ValueError naming the first setting whose value cannot work."""
        for setting in fields(self):
            value = getattr(self, setting.name)
            if setting.name in _RULES and not (value is None and setting.default is None):
                check_setting(setting.name, value)
        check_temperature(self.temperature, do_sample=self.do_sample)
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs do_sample=True: "
                "greedy decoding would return the same sequence each time"
            )

    def eos_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def warn_unused_sampling_flags(self, stacklevel: int = 4) -> None:
        """Warn when sampling settings are set but ``do_sample=False`` makes them do nothing."""
        if self.do_sample:
            return
        default = GenerationConfig()
        unused = [
            n for n in ("temperature", "top_p", "top_k", "min_p") if getattr(self, n) != getattr(default, n)
        ]
        if unused:
            warnings.warn(
                f"do_sample=False, so these sampling settings are ignored: {', '.join(unused)}. "
                "Set do_sample=True to sample.",
                UserWarning,
                stacklevel=stacklevel,
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is neither infinite nor NaN (the scores it scales would become NaN)."""
    return _is_number(value) and math.isfinite(value)


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_non_empty_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _one_or_list(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``test`` for one value, or for every item of a list or tuple of them."""
    return lambda value: test(value) or (isinstance(value, (list, tuple)) and all(map(test, value)))


# Each setting's rule on its own: (does the value pass, what the message says it must be). A setting
# whose default is None may also be None. Rules between settings are in GenerationConfig.validate.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_length": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "max_new_tokens": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "min_length": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "do_sample": (lambda v: isinstance(v, bool), "True or False"),
    "temperature": (lambda v: _is_finite(v) and v >= 0, "a finite number >= 0 (> 0 when do_sample=True)"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 disables it)"),
    "top_p": (lambda v: _is_number(v) and 0.0 < v <= 1.0, "a number in (0, 1]"),
    "repetition_penalty": (
        lambda v: _is_finite(v) and v >= MIN_REPETITION_PENALTY,
        f"a finite number >= {MIN_REPETITION_PENALTY} (1.0 disables it; a smaller one can push a score "
        "past float32's range)",
    ),
    "no_repeat_ngram_size": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 disables it)"),
    "min_p": (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1] (0 disables it)"),
    # The serving engine's settings (not generate()'s), here so that every rule is in one table.
    "presence_penalty": (lambda v: _is_number(v) and -2.0 <= v <= 2.0, "a number in [-2, 2]"),
    "frequency_penalty": (lambda v: _is_number(v) and -2.0 <= v <= 2.0, "a number in [-2, 2]"),
    "num_return_sequences": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "bos_token_id": (_is_token_id, "a token id (an integer >= 0) or None"),
    "eos_token_id": (_one_or_list(_is_token_id), "a token id (an integer >= 0), a list of them, or None"),
    "pad_token_id": (_is_token_id, "a token id (an integer >= 0) or None"),
    "stop_strings": (_one_or_list(_is_non_empty_text), "a non-empty string or a list of them"),
}


def check_setting(name: str, value: Any) -> Any:
    """``value`` if it passes the rule of generation setting ``name``; else ValueError naming both."""
    passes, rule = _RULES[name]
    if not passes(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_temperature(temperature: Any, *, do_sample: bool) -> float:
    """``temperature`` as a float: its rule, and not 0 when sampling (0 would divide by zero)."""
    check_setting("temperature", temperature)
    if do_sample and temperature == 0:
        raise ValueError(
            f"temperature must be > 0 when do_sample=True, got {temperature!r}; "
            "for greedy decoding use do_sample=False"
        )
    return float(temperature)


def check_seed(seed: Any) -> int:
    """``seed`` as torch accepts it (an integer in [-2**63, 2**64)); ValueError naming it otherwise."""
    if not _is_int(seed) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return seed
