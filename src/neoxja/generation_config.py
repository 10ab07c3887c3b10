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
    ``num_beams > 1`` is beam search (``length_penalty``, ``early_stopping``); ``prompt_lookup_num_tokens``
    (with ``max_matching_ngram_size``) or an ``assistant_model`` passed to ``generate`` is assisted
    decoding (``num_assistant_tokens``, ``num_assistant_tokens_schedule``,
    ``assistant_confidence_threshold`` shape the assistant's drafts). ``return_dict_in_generate`` with
    ``output_scores``/``output_logits`` returns transformers' output classes with the per-step scores.
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
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool | None = None
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
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

    def validate(self, request: DecodingRequest | None = None) -> None:
        """Raise ValueError naming the first setting whose value cannot work, alone or with the others
        and the call's arguments (``request``)."""
        for setting in fields(self):
            value = getattr(self, setting.name)
            if setting.name in _RULES and not (value is None and setting.default is None):
                check_setting(setting.name, value)
        check_temperature(self.temperature, do_sample=self.do_sample)
        check_combination(self, request)

    @property
    def is_beam_search(self) -> bool:
        """Beam search (or beam sampling with ``do_sample``): ``num_beams > 1``."""
        return self.num_beams > 1

    def eos_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def warn_unused_sampling_flags(self, stacklevel: int = 4) -> None:
        """Warn when settings are set but others make them do nothing (as transformers warns)."""
        default = GenerationConfig()
        changed = [n for n in self.field_names() if getattr(self, n) != getattr(default, n)]
        unused = {}
        if not self.do_sample:
            unused["do_sample=False"] = ("temperature", "top_p", "top_k", "min_p")
        if self.num_beams == 1:
            unused["num_beams=1"] = ("length_penalty", "early_stopping")
        if not self.return_dict_in_generate:
            unused["return_dict_in_generate=False"] = ("output_scores", "output_logits")
        if self.prompt_lookup_num_tokens is None:
            unused["prompt_lookup_num_tokens=None"] = ("max_matching_ngram_size",)
        for cause, names in unused.items():
            ignored = [n for n in names if n in changed]
            if ignored:
                warnings.warn(
                    f"{cause}, so these settings are ignored: {', '.join(ignored)}",
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
    "use_cache": (lambda v: isinstance(v, bool), "True or False"),
    "num_beams": (lambda v: _is_int(v) and v > 0, "a positive integer (1: no beam search)"),
    "length_penalty": (_is_finite, "a finite number (> 0 favours longer sequences, < 0 shorter)"),
    "early_stopping": (lambda v: isinstance(v, bool) or v == "never", 'True, False or "never"'),
    "return_dict_in_generate": (lambda v: isinstance(v, bool), "True or False"),
    "output_scores": (lambda v: isinstance(v, bool), "True or False"),
    "output_logits": (lambda v: isinstance(v, bool), "True, False or None"),
    "prompt_lookup_num_tokens": (lambda v: _is_int(v) and v > 0, "a positive integer or None"),
    "max_matching_ngram_size": (lambda v: _is_int(v) and v > 0, "a positive integer or None"),
    "num_assistant_tokens": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "num_assistant_tokens_schedule": (
        lambda v: v in ("constant", "heuristic", "heuristic_transient"),
        '"constant", "heuristic" or "heuristic_transient"',
    ),
    "assistant_confidence_threshold": (
        lambda v: _is_number(v) and 0.0 <= v < 1.0,
        "a number in [0, 1) (0 disables it)",
    ),
}


@dataclass(frozen=True)
class DecodingRequest:
    """What a call asks for beyond its settings, for the rules between settings and arguments:
    ``streaming`` (a ``streamer`` or ``stream_generate``), ``yields_text`` (``stream_generate``, which
    returns no output object), the ``assistant_model`` (or None), the number of prompts, and the
    model's vocabulary size."""

    streaming: bool = False
    yields_text: bool = False
    assistant_model: Any = None
    batch_size: int = 1
    vocab_size: int | None = None


# Rules between settings (and the call's arguments): (breaks the rule?, message). The first one broken
# is raised as a ValueError naming the arguments involved.
_COMBINATIONS: list[tuple[Callable[[GenerationConfig, DecodingRequest], bool], Callable[..., str]]] = [
    (
        lambda c, r: c.num_beams == 1 and c.num_return_sequences > 1 and not c.do_sample,
        lambda c, r: (
            f"num_return_sequences={c.num_return_sequences} needs do_sample=True or num_beams >= "
            f"{c.num_return_sequences}: greedy decoding would return the same sequence each time"
        ),
    ),
    (
        lambda c, r: c.num_beams > 1 and c.num_return_sequences > c.num_beams,
        lambda c, r: (
            f"num_return_sequences={c.num_return_sequences} is more than num_beams={c.num_beams}: "
            "beam search returns at most num_beams sequences per prompt"
        ),
    ),
    (
        lambda c, r: c.num_beams > 1 and r.streaming,
        lambda c, r: (
            f"num_beams={c.num_beams} cannot stream (a streamer or stream_generate): the best "
            "beam is only known at the end, as in transformers; generate without streaming"
        ),
    ),
    (
        lambda c, r: r.yields_text and c.return_dict_in_generate,
        lambda c, r: (
            "return_dict_in_generate=True with stream_generate: it yields text pieces, not an "
            "output with sequences and scores; use generate(..., return_dict_in_generate=True)"
        ),
    ),
    (
        lambda c, r: c.num_beams > 1 and c.stop_strings is not None,
        lambda c, r: (
            f"stop_strings with num_beams={c.num_beams} is not supported: stop beams with "
            "eos_token_id, or use greedy decoding or sampling"
        ),
    ),
    (
        lambda c, r: c.prompt_lookup_num_tokens is not None and r.assistant_model is not None,
        lambda c, r: (
            "pass either prompt_lookup_num_tokens or assistant_model, not both: each drafts the "
            "tokens that assisted decoding verifies"
        ),
    ),
    (
        lambda c, r: c.num_beams > 1 and _assisted(c, r),
        lambda c, r: (
            f"num_beams={c.num_beams} with {_assisted_name(c, r)}: assisted "
            "decoding works with greedy decoding and sampling only (num_beams=1)"
        ),
    ),
    (
        lambda c, r: _assisted(c, r) and r.batch_size > 1,
        lambda c, r: (
            f"{_assisted_name(c, r)} decodes one prompt at a time, got a batch of {r.batch_size} "
            "(as in transformers): call generate once per prompt"
        ),
    ),
    (
        lambda c, r: _assisted(c, r) and c.num_return_sequences > 1,
        lambda c, r: (
            f"{_assisted_name(c, r)} with num_return_sequences={c.num_return_sequences}: assisted "
            "decoding returns one sequence per call"
        ),
    ),
    (
        lambda c, r: (
            r.assistant_model is not None and r.vocab_size is not None and _assistant_vocab(r) != r.vocab_size
        ),
        lambda c, r: (
            f"assistant_model has another vocabulary (vocab_size {_assistant_vocab(r)}, the "
            f"model's {r.vocab_size}): the assistant must share the model's tokenizer"
        ),
    ),
]


def _assisted(config: GenerationConfig, request: DecodingRequest) -> bool:
    return config.prompt_lookup_num_tokens is not None or request.assistant_model is not None


def _assisted_name(config: GenerationConfig, request: DecodingRequest) -> str:
    return "assistant_model" if request.assistant_model is not None else "prompt_lookup_num_tokens"


def _assistant_vocab(request: DecodingRequest) -> Any:
    return getattr(getattr(request.assistant_model, "config", None), "vocab_size", None)


def check_combination(config: GenerationConfig, request: DecodingRequest | None = None) -> None:
    """Raise ValueError for the first rule between settings (and the call's arguments) that is broken."""
    request = request if request is not None else DecodingRequest()
    for broken, message in _COMBINATIONS:
        if broken(config, request):
            raise ValueError(message(config, request))


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
