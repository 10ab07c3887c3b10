"""What the serving engine keeps per request and per sequence, and the rules a request's settings obey.

:class:`SamplingParams` is what a request asks for; :func:`check_params` refuses, with a ValueError
naming the field, every value the engine could not compute (the same rules as ``generate()``'s, from
:mod:`neoxja.generation_config`). A request is one or more sequences (prompts times ``n``); each
:class:`SequenceState` owns everything that is computed for it alone (its sampler and seeded
generator, its detokenizer, its :class:`StopMatcher`), so that a failure there is that sequence's
own. :class:`Event` is what a sequence hands to its request's sink.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neoxja.generation_config import check_seed, check_setting, check_temperature
from neoxja.sample_utils import PresenceFrequencyProcessor, Sampler, make_sampler
from neoxja.tokenizer_utils import StreamingDetokenizer


@dataclass
class SamplingParams:
    """How one request's sequences are continued and stopped (OpenAI's fields)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | Sequence[str] = ()  # one stop string or several
    seed: int | None = None  # choice i of a request samples with seed + i
    logprobs: int | None = None  # number of top alternatives per token; None: no logprobs
    prompt_logprobs: bool = False  # also score the prompt's tokens (``echo`` with ``logprobs``)
    ignore_eos: bool = False

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list (a single string is one stop string, not one per character)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_params(params: SamplingParams, vocab_size: int, sequences: int) -> None:
    """Raise ValueError naming the first field of ``params`` the engine cannot compute for a request
    of ``sequences`` sequences over a vocabulary of ``vocab_size``.

    Sampling values share ``generate()``'s rules (any finite temperature >= 0 computes: see
    :class:`~neoxja.sample_utils.TemperatureProcessor`); ``seed + i`` must be a seed for every
    sequence ``i``; ``logprobs`` asks for at most the whole vocabulary."""
    if not _is_int(params.max_tokens) or params.max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {params.max_tokens!r}")
    check_temperature(params.temperature, do_sample=False)
    check_setting("top_p", params.top_p)
    check_setting("top_k", params.top_k)
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        check_setting(name, getattr(params, name))
    stop = params.stop
    if not isinstance(stop, str) and not (
        isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)
    ):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if params.seed is not None:
        try:
            check_seed(params.seed)
            check_seed(params.seed + sequences - 1)  # the seed of the request's last sequence
        except ValueError:
            raise ValueError(
                f"seed must be an integer such that seed + i, for each of the request's {sequences} "
                f"sequences, is in [-2**63, 2**64); got {params.seed!r}"
            ) from None
    logprobs = params.logprobs
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= vocab_size):
        raise ValueError(f"logprobs must be None or an integer in [0, {vocab_size}], got {logprobs!r}")
    for name in ("prompt_logprobs", "ignore_eos"):
        if not isinstance(getattr(params, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(params, name)!r}")


@dataclass
class Event:
    """What a sequence (``index`` within its request) produced.

    One per generated token (``token`` set; ``text`` the text it completes, possibly "" while a
    character or a possible stop string is held back), a last one with ``finish_reason``
    (``"stop"``/``"length"``/``"cancelled"``/``"error"``, the last with ``error`` saying what
    failed) and any text still held, and, before the tokens when asked for, one with
    ``prompt_logprobs``.
    """

    index: int
    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None
    error: str | None = None


class StopMatcher:
    """Cuts generated text at the first stop string and holds back any tail that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text now safe to send and whether a stop string was reached (the text before it)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        # Hold back the longest end of the text that begins a stop string. Only the places where a
        # stop's first character occurs can start one, so the work per token stays small.
        start = len(text)
        for stop in self.stops:
            at = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
            while 0 <= at < start:
                if stop.startswith(text[at:]):
                    start = at
                    break
                at = text.find(stop[0], at + 1)
        self.pending = text[start:]
        return text[:start], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass(eq=False)
class Request:
    """A submitted request: its sequences, its sink, and whether its client is gone."""

    params: SamplingParams
    sink: Callable[[Event], None]
    sequences: list[SequenceState] = field(default_factory=list)
    cancelled: bool = False


@dataclass(eq=False)
class SequenceState:
    """One sequence of a request: its tokens, its slot, and its own sampler, detokenizer and stops."""

    request: Request
    index: int
    prompt: list[int]
    sampler: Sampler
    detokenizer: StreamingDetokenizer
    stops: StopMatcher
    tokens: torch.Tensor  # [1, capacity] on the model's device: prompt, then the generated ids
    slot: int = -1
    filled: int = 0  # positions of the slot holding keys/values
    generated: int = 0
    last: int = 0  # the newest token, fed at the next step
    hit_stop: bool = False  # ended by a stop string (its text and anything after it are dropped)
    finished: bool = False
    scored: list[tuple[float | None, list[tuple[int, float]]]] | None = None  # prompt logprobs so far

    @property
    def length(self) -> int:
        return len(self.prompt) + self.generated


def new_sequence(
    request: Request, index: int, prompt: list[int], tokenizer: Any, device: torch.device
) -> SequenceState:
    """Sequence ``index`` of ``request``: its sampler (seeded with ``seed + index``, or at random),
    detokenizer, stop matcher, and a token buffer for the prompt and ``max_tokens`` more."""
    params = request.params
    seed = params.seed + index if params.seed is not None else random.SystemRandom().randrange(2**62)
    extra = []
    if params.presence_penalty or params.frequency_penalty:
        penalties = PresenceFrequencyProcessor(params.presence_penalty, params.frequency_penalty, len(prompt))
        extra.append(penalties)
    sampler = make_sampler(
        do_sample=params.temperature > 0,
        temperature=params.temperature if params.temperature > 0 else 1.0,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        generator=torch.Generator(device=device).manual_seed(seed),
        extra_processors=extra,
    )
    tokens = torch.empty(1, len(prompt) + params.max_tokens, dtype=torch.long, device=device)
    tokens[0, : len(prompt)] = torch.tensor(prompt)
    return SequenceState(
        request,
        index,
        prompt,
        sampler,
        StreamingDetokenizer(tokenizer, skip_special_tokens=True),
        StopMatcher(params.stops),
        tokens,
    )
