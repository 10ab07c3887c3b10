"""OpenAI's request bodies, checked field by field into engine inputs, and its error shape.

Every field is checked by hand, so that a bad one is answered with a 400 that names it (``param``) in
OpenAI's JSON shape, and every cap of :class:`Limits` is enforced before anything reaches the engine.
Fields that OpenAI defines but this server does not implement (``suffix``, ``logit_bias``,
``best_of`` above ``n``, tools) are refused by name rather than ignored; ``user`` is accepted and
not used.

Every sampling value a field's range admits is computed (a temperature of 1e-40 samples the argmax:
see :class:`~neoxja.sample_utils.TemperatureProcessor`), so the ranges below are the whole rule.
What one request may cost is bounded by :attr:`Limits.max_work` (see :func:`request_work`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neoxja.serving.engine import SamplingParams


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


DEFAULT_MAX_WORK = 1 << 19
"""The default of :attr:`Limits.max_work` (524,288 tokens scored): lm-eval's loglikelihood batches
(``echo`` + ``logprobs=1``, ``max_tokens=1``) of 64 prompts filling a 2048-token context, and
chat or completion requests of ``n=8`` over a whole 2048-token context with ``logprobs=20``, fit."""


@dataclass
class Limits:
    """The server's caps on what one request may ask for.

    ``max_work`` caps a request's *tokens scored* (:func:`request_work`): the positions its sequences
    may run through the model plus the log-probabilities they may return."""

    max_model_len: int
    vocab_size: int
    max_tokens: int  # cap on max_tokens (and the chat default)
    max_n: int = 8
    max_stop: int = 8
    max_stop_length: int = 256
    max_logprobs: int = 20
    max_prompts: int = 64
    max_work: int = DEFAULT_MAX_WORK

    def __post_init__(self) -> None:
        for name in ("max_model_len", "vocab_size", "max_tokens", "max_n", "max_prompts", "max_work"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class Parsed:
    """A checked request: token-id prompts, sampling settings and how to answer."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def _number(body: dict, name: str, default: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


def _refuse_unsupported(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, {}, [], ""):
            raise _bad(name, "is not supported by this server")


def _ids(value: list, param: str, limits: Limits) -> list[int]:
    if not value:
        raise _bad(param, "is empty")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < limits.vocab_size:
            raise _bad(param, f"position {i}: {token!r} is not a token id in [0, {limits.vocab_size})")
    return list(value)


def _prompts(body: dict, tokenizer: Any, limits: Limits) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "is required")
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of lists")
    if len(items) > limits.max_prompts:
        raise _bad("prompt", f"has {len(items)} prompts, at most {limits.max_prompts} are allowed")
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise _bad(param, "is an empty string")
            out.append(tokenizer.encode(item))
        elif isinstance(item, list):
            out.append(_ids(item, param, limits))
        else:
            raise _bad(param, f"must be a string or a list of token ids, got {type(item).__name__}")
    return out


def _stop(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stops) > limits.max_stop:
        raise _bad("stop", f"has {len(stops)} strings, at most {limits.max_stop} are allowed")
    if any(len(s) > limits.max_stop_length for s in stops):
        raise _bad("stop", f"strings may have at most {limits.max_stop_length} characters")
    return stops


def _sampling(body: dict, limits: Limits, max_tokens_default: int | None) -> SamplingParams:
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "must be a string")
    top_k = _number(body, "top_k", 0, -1, limits.vocab_size, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens_default, 0, limits.max_tokens, integer=True)
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0:
        raise _bad("top_p", "must be > 0")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else limits.max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=top_p,
        top_k=max(top_k, 0),
        min_p=float(_number(body, "min_p", 0.0, 0.0, 1.0)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 10.0)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        stop=_stop(body, limits),
        seed=_number(body, "seed", None, 0, 2**62, integer=True),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def _common(body: dict, limits: Limits) -> tuple[int, bool, bool]:
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict):
            raise _bad("stream_options", "must be an object")
        include_usage = _flag(options, "include_usage")
    return n, stream, include_usage


def _check_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def parse_completion(body: Any, tokenizer: Any, limits: Limits) -> Parsed:
    """A ``/v1/completions`` body: ``prompt`` in any of its four forms plus the sampling fields."""
    body = _check_body(body)
    _refuse_unsupported(body, ("suffix", "logit_bias"))
    n, stream, include_usage = _common(body, limits)
    if body.get("best_of") not in (None, n):
        raise _bad("best_of", "is not supported by this server (other than equal to n)")
    prompts = _prompts(body, tokenizer, limits)
    params = _sampling(body, limits, 16)
    params.logprobs = _number(body, "logprobs", None, 0, limits.max_logprobs, integer=True)
    echo = _flag(body, "echo")
    params.prompt_logprobs = echo and params.logprobs is not None
    if params.max_tokens == 0 and not params.prompt_logprobs:
        raise _bad("max_tokens", "must be >= 1 (0 is only allowed with echo and logprobs, to score a prompt)")
    _check_lengths(prompts, params, limits)
    _check_work(prompts, params, n, limits, "prompt", ("logprobs",))
    return Parsed(prompts, params, n, stream, include_usage, echo)


def parse_chat(body: Any, render: Any, tokenizer: Any, limits: Limits, stops: list[str]) -> Parsed:
    """A ``/v1/chat/completions`` body: ``messages`` rendered by ``render`` (the chat template) into one
    prompt, ``stops`` (the template's turn markers) added to the request's own stop strings."""
    body = _check_body(body)
    _refuse_unsupported(body, ("logit_bias", "tools", "functions", "tool_choice", "response_format"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
        ):
            raise _bad(f"messages[{i}]", "needs a role: system, developer, user or assistant")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise _bad(f"messages[{i}].content", "parts must all be text parts")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        checked.append(
            {"role": "system" if message["role"] == "developer" else message["role"], "content": content}
        )
    n, stream, include_usage = _common(body, limits)
    prompt = tokenizer.encode(render(checked))
    if not prompt:
        raise _bad("messages", "render to an empty prompt")
    if body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    params = _sampling(body, limits, None)
    if body.get("max_tokens") is None:  # OpenAI's default: as much as the context leaves
        params.max_tokens = max(min(limits.max_tokens, limits.max_model_len - len(prompt)), 1)
    if params.max_tokens == 0:
        raise _bad("max_tokens", "must be >= 1")
    params.stop = [*params.stop, *stops]
    if _flag(body, "logprobs"):
        params.logprobs = _number(body, "top_logprobs", 0, 0, limits.max_logprobs, integer=True)
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "needs logprobs: true")
    _check_lengths([prompt], params, limits)
    _check_work([prompt], params, n, limits, "messages", ("logprobs", "top_logprobs"))
    return Parsed([prompt], params, n, stream, include_usage)


def request_work(prompts: list[list[int]], params: SamplingParams, n: int) -> int:
    """The tokens scored that a request may cost: for each of its sequences (each prompt ``n``
    times), its prompt's tokens plus ``max_tokens``, and for every token whose log-probabilities it
    returns, one more per value returned: the prompt's tokens when echoed with ``logprobs``
    (``1 + max(logprobs, 1)`` each: the token's own and its top alternatives, at least one), the
    generated ones with ``logprobs`` (``1 + logprobs`` each).

    The first part is the model's work (positions prefilled or decoded), the second the response's
    size (each returned value is a token string and a float, in Python and in the JSON)."""
    k = params.logprobs
    total = 0
    for prompt in prompts:
        total += len(prompt) + params.max_tokens
        if params.prompt_logprobs:
            total += len(prompt) * (1 + max(k or 0, 1))
        if k is not None:
            total += params.max_tokens * (1 + k)
    return total * n


def _check_work(
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    limits: Limits,
    prompt_field: str,
    logprob_fields: tuple[str, ...],
) -> None:
    """400 when the request's :func:`request_work` is over ``limits.max_work``, naming the fields
    that make it up (in this endpoint's terms)."""
    work = request_work(prompts, params, n)
    if work <= limits.max_work:
        return
    fields = [prompt_field, "n", "max_tokens"]
    if params.prompt_logprobs:
        fields.append("echo")
    if params.logprobs is not None:
        fields.extend(logprob_fields)
    named = ", ".join(fields)
    raise APIError(
        400,
        f"{named}: this request may score {work:,} tokens, more than this server allows one request "
        f"({limits.max_work:,}): {len(prompts)} prompt(s) of {sum(map(len, prompts)):,} tokens x n={n}, "
        f"plus max_tokens={params.max_tokens} each"
        + (", the prompt's tokens scored too (echo)" if params.prompt_logprobs else "")
        + (
            f", log-probabilities with {params.logprobs} alternatives per token"
            if params.logprobs is not None
            else ""
        )
        + "; send fewer or shorter prompts, a smaller n or max_tokens, or fewer logprobs",
        param=named,
    )


def _check_lengths(prompts: list[list[int]], params: SamplingParams, limits: Limits) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) + params.max_tokens > limits.max_model_len:
            raise _bad(
                "max_tokens" if len(prompt) < limits.max_model_len else "prompt",
                f"this model's maximum context length is {limits.max_model_len} tokens; prompt {i} has "
                f"{len(prompt)} and max_tokens asks for {params.max_tokens} more",
            )
