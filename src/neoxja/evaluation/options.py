"""lm-eval's settings as its users write them, parsed and checked without importing lm-eval.

``neoxja eval`` checks every option here before lm-eval and the model load (a mistake is reported
in a second, not after an hour), and the lm-eval model (:mod:`neoxja.evaluation.harness`) turns a
request's generation settings into ``generate`` arguments with the same rules.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_GEN_TOKS",
    "DEFAULT_SEEDS",
    "ResultsPaths",
    "check_gen_kwargs",
    "generation_settings",
    "install_hint",
    "parse_gen_kwargs",
    "parse_seed",
    "results_paths",
]

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default number of new tokens for generate_until
# simple_evaluate's seeds (python's random, numpy, torch, few-shot sampling), as lm-eval's --seed shows them.
DEFAULT_SEEDS = "0,1234,1234,1234"
# Aliases lm-eval accepts for the number of new tokens, in its order of priority.
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_SAMPLING_ONLY = ("temperature", "top_k", "top_p")


def _split_top_level(text: str) -> list[str]:
    """``text`` cut at the commas outside brackets, braces and quotes (``until=["a","b"]`` stays whole)."""
    parts, current, depth, quote = [], [], 0, None
    for char in text:
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def _value(text: str) -> Any:
    """A ``key=value`` value typed as lm-eval's CLI types it: booleans, None, numbers, Python
    literals (lists, quoted strings), else the text itself."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_gen_kwargs(text: str) -> dict[str, Any]:
    """``--gen-kwargs``: ``temperature=0,max_gen_toks=64`` (or a JSON object) as a dict.

    ValueError naming the item that is not ``key=value``.
    """
    if text.lstrip().startswith("{"):
        from neoxja.jsonfile import loads

        values = loads(text, "--gen-kwargs")
        if not isinstance(values, dict):
            raise ValueError(f"--gen-kwargs: expected a JSON object, got {text!r}")
        return values
    settings: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--gen-kwargs: expected key=value, got {item.strip()!r}")
        settings[key.strip()] = _value(value)
    if not settings:
        raise ValueError("--gen-kwargs is empty: give key=value pairs, e.g. temperature=0,max_gen_toks=64")
    return settings


def parse_seed(text: str) -> tuple[int | None, int | None, int | None, int | None]:
    """``--seed``: one integer for all four of lm-eval's seeds (python, numpy, torch, few-shot), or
    three or four comma-separated integers or ``None`` (leave that one unset); a missing fourth is
    lm-eval's default."""
    items = [item.strip() for item in text.split(",")]
    if len(items) not in (1, 3, 4):
        raise ValueError(
            f"--seed {text}: give one integer, or 3 or 4 comma-separated integers or None "
            "(python,numpy,torch,fewshot)"
        )
    seeds: list[int | None] = []
    for item in items:
        if item.lower() == "none":
            seeds.append(None)
            continue
        try:
            seeds.append(int(item))
        except ValueError:
            raise ValueError(f"--seed {text}: {item!r} is not an integer or None") from None
    if len(seeds) == 1:
        seeds *= 4
    elif len(seeds) == 3:
        seeds.append(int(DEFAULT_SEEDS.split(",")[3]))
    return seeds[0], seeds[1], seeds[2], seeds[3]


def generation_settings(settings: Any, default_max_gen_toks: int) -> tuple[list[str], dict[str, Any]]:
    """A ``generate_until`` request's settings -> (stop sequences, ``model.generate`` arguments).

    As lm-eval's ``hf`` model reads them: ``until`` (a string or a list), the number of new tokens
    under any of lm-eval's names (else ``default_max_gen_toks``), greedy unless ``do_sample`` or a
    temperature above 0 asks for sampling (then the sampling-only settings are dropped).
    """
    if not isinstance(settings, dict):
        raise TypeError(f"generate_until expects a dict of generation settings, got {settings!r}")
    kwargs = dict(settings)
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        until = list(until)
    else:
        raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
    lengths = [kwargs.pop(key) for key in _MAX_TOKEN_KEYS if key in kwargs]
    max_gen_toks = lengths[0] if lengths else default_max_gen_toks
    if isinstance(max_gen_toks, str) and max_gen_toks.strip().isdigit():
        max_gen_toks = int(max_gen_toks)
    elif isinstance(max_gen_toks, float) and max_gen_toks.is_integer():
        max_gen_toks = int(max_gen_toks)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    if "max_length" in kwargs:  # lm-eval's meaning: prompt + new tokens
        raise ValueError("give generate_until 'max_gen_toks' (new tokens), not 'max_length'")
    do_sample = kwargs.get("do_sample")
    if do_sample is None:
        do_sample = float(kwargs.get("temperature", 0.0)) > 0.0
    kwargs["do_sample"] = bool(do_sample)
    if not do_sample:
        for name in _SAMPLING_ONLY:
            kwargs.pop(name, None)
    kwargs["max_new_tokens"] = max_gen_toks
    return until, kwargs


def check_gen_kwargs(gen_kwargs: dict[str, Any]) -> None:
    """ValueError naming what ``--gen-kwargs`` sets that generation cannot use (an unknown setting,
    a value out of range), so that it fails before the model loads rather than at the first request."""
    from neoxja.generation_config import GenerationConfig

    try:
        _, kwargs = generation_settings(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        unknown = sorted(set(kwargs) - GenerationConfig.field_names())
        if unknown:
            raise ValueError(
                f"unknown generation setting {', '.join(unknown)} (known: until, max_gen_toks, "
                f"{', '.join(sorted(GenerationConfig.field_names()))})"
            )
        GenerationConfig(**kwargs).validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"--gen-kwargs: {err}") from None


def install_hint(folder: str, missing: list[str], extras: list[str]) -> str:
    """How to install what a task folder of lm-eval needs: lm-eval's extra of the same name where it
    has one (spelled as pip matches it on every version: lower case, ``-`` for ``_``), else the
    packages themselves."""

    def normalized(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    extra = normalized(folder)
    if extra in map(normalized, extras):
        return f"pip install 'lm-eval[{extra}]'"
    return "pip install " + " ".join(missing)


@dataclass(frozen=True)
class ResultsPaths:
    """Where one ``neoxja eval`` run writes: the results JSON and, beside it, the samples."""

    results: Path
    date_id: str

    def samples(self, task: str) -> Path:
        """The per-sample JSONL of ``task`` (``--log-samples``), named as lm-eval names it."""
        return self.results.parent / f"samples_{task}_{self.date_id}.jsonl"


def results_paths(output: str) -> ResultsPaths:
    """``--output``, as lm-eval's ``--output_path``: a path ending in ``.json`` is the results file;
    anything else is a directory (created now, so that a long run cannot fail at its end) that gets
    a ``results_<timestamp>.json``. ValueError when neither can be written."""
    path = Path(output)
    date_id = datetime.now().isoformat().replace(":", "-")
    if path.suffix == ".json" and not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        return ResultsPaths(path, date_id)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {output} is a file: give a directory or a file name ending in .json")
    path.mkdir(parents=True, exist_ok=True)
    return ResultsPaths(path / f"results_{date_id}.json", date_id)
