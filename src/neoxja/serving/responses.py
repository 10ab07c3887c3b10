"""OpenAI's response shapes, built from the engine's events: completions and chat, whole or streamed.

A :class:`Collector` receives a request's :class:`~neoxja.serving.engine.Event` objects, keeps each
choice's text, tokens and log-probabilities, feeds the latency metrics, and turns what it has into
OpenAI's JSON: a whole response (:meth:`Collector.completion`, :meth:`Collector.chat`) or one stream
chunk per event (:meth:`Collector.chunks`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from neoxja.serving.engine import Event
from neoxja.serving.protocol import Parsed


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # completions' logprobs: token strings, their logprobs, top alternatives, text offsets
    lp_tokens: list[str] = field(default_factory=list)
    lp_values: list[float | None] = field(default_factory=list)
    lp_top: list[dict[str, float] | None] = field(default_factory=list)
    lp_offsets: list[int] = field(default_factory=list)
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    length: int = 0  # characters of text so far
    finish_reason: str | None = None
    error: str | None = None
    last_token_at: float | None = None


class Collector:
    """One request's choices, built up from its events (``kind`` is ``"completion"`` or ``"chat"``)."""

    def __init__(
        self, parsed: Parsed, tokenizer: Any, model: str, kind: str, metrics: Any, arrival: float
    ) -> None:
        self.parsed, self.tokenizer, self.model, self.kind, self.metrics = (
            parsed,
            tokenizer,
            model,
            kind,
            metrics,
        )
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.arrival = arrival
        self.first_token_at: float | None = None
        total = len(parsed.prompts) * parsed.n
        self.choices = [_Choice() for _ in range(total)]
        self.unfinished = total
        self.started: set[int] = set()  # stream: choices whose first chunk went out
        self.cancelled = False  # the client went away before the end
        self.cut = False  # the server's shutdown cancelled it (a stream has said so once)
        self._echo: dict[int, str] = {}

    def cancel(self) -> None:
        """The client went away: count it (the engine was told to stop the sequences)."""
        if not self.cancelled:
            self.cancelled = True
            self.metrics.cancelled.inc()

    # ------------------------------------------------------------------ events

    def _name(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token)

    def _top(
        self, chosen: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> dict[str, float]:
        pairs = {self._name(i): v for i, v in top or ()}
        if logprob is not None:
            pairs.setdefault(self._name(chosen), logprob)
        return pairs

    def prompt_of(self, index: int) -> list[int]:
        return self.parsed.prompts[index // self.parsed.n]

    def echo_text(self, index: int) -> str:
        """The prompt of choice ``index`` as text (decoded once per prompt)."""
        prompt = index // self.parsed.n
        if prompt not in self._echo:
            self._echo[prompt] = self.tokenizer.decode(self.parsed.prompts[prompt])
        return self._echo[prompt]

    def add(self, event: Event) -> None:
        """Record ``event`` (and observe its latencies)."""
        choice = self.choices[event.index]
        now = time.monotonic()
        if event.prompt_logprobs is not None:
            self._add_prompt_logprobs(choice, event)
        if event.token is not None:
            choice.tokens.append(event.token)
            if self.first_token_at is None:
                self.first_token_at = now
            if choice.last_token_at is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.itl.observe(now - choice.last_token_at)
            choice.last_token_at = now
            self.metrics.generation_tokens.inc()
            if event.logprob is not None:
                self._add_logprob(choice, event)
        if event.text:
            choice.text.append(event.text)
            choice.length += len(event.text)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            choice.error = event.error
            self.unfinished -= 1
            if self.unfinished == 0:
                self.metrics.e2e.observe(now - self.arrival)

    def _add_prompt_logprobs(self, choice: _Choice, event: Event) -> None:
        prompt = self.prompt_of(event.index)
        offset = 0
        for token, (logprob, top) in zip(prompt, event.prompt_logprobs or [], strict=True):
            choice.lp_tokens.append(self._name(token))
            choice.lp_values.append(logprob)
            choice.lp_top.append(None if logprob is None else self._top(token, logprob, top))
            choice.lp_offsets.append(offset)
            offset += len(self.tokenizer.decode([token]))

    def _add_logprob(self, choice: _Choice, event: Event) -> None:
        token = event.token
        if self.kind == "completion":
            choice.lp_tokens.append(self._name(token))
            choice.lp_values.append(event.logprob)
            choice.lp_top.append(self._top(token, event.logprob, event.top_logprobs))
            offset = choice.length + (len(self.echo_text(event.index)) if self.parsed.echo else 0)
            choice.lp_offsets.append(offset)
        else:
            name = self._name(token)
            choice.chat_logprobs.append(
                {
                    "token": name,
                    "logprob": event.logprob,
                    "bytes": list(name.encode()),
                    "top_logprobs": [
                        {"token": self._name(i), "logprob": v, "bytes": list(self._name(i).encode())}
                        for i, v in event.top_logprobs or ()
                    ],
                }
            )

    # ------------------------------------------------------------------ whole responses

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.parsed.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion_logprobs(self, choice: _Choice, start: int = 0) -> dict[str, Any] | None:
        if self.parsed.params.logprobs is None:
            return None
        return {
            "tokens": choice.lp_tokens[start:],
            "token_logprobs": choice.lp_values[start:],
            "top_logprobs": choice.lp_top[start:],
            "text_offset": choice.lp_offsets[start:],
        }

    def completion(self) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self.choices):
            text = "".join(choice.text)
            if self.parsed.echo:
                text = self.echo_text(index) + text
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": self._completion_logprobs(choice),
                    "finish_reason": choice.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def chat(self) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": {"content": choice.chat_logprobs}
                if self.parsed.params.logprobs is not None
                else None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(self.choices)
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    # ------------------------------------------------------------------ streams

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        """The stream chunks that ``event`` (already :meth:`add`-ed) makes."""
        index, choice = event.index, self.choices[event.index]
        out = []
        if self.kind == "completion":
            if self.parsed.echo and index not in self.started:
                if event.prompt_logprobs is None and self.parsed.params.prompt_logprobs:
                    return []  # the prompt's scores come first
                self.started.add(index)
                logprobs = self._completion_logprobs(choice) if self.parsed.params.prompt_logprobs else None
                if logprobs is not None and event.token is not None:  # the token's entry follows
                    logprobs = {k: v[:-1] for k, v in logprobs.items()}
                out.append(self.completion_piece(index, self.echo_text(index), logprobs, None))
                if event.token is None and event.finish_reason is None:
                    return out
            self.started.add(index)
            if event.token is None and event.finish_reason is None:
                return out
            logprobs = None
            if event.token is not None and event.logprob is not None:
                logprobs = self._completion_logprobs(choice, len(choice.lp_tokens) - 1)
            out.append(self.completion_piece(index, event.text, logprobs, event.finish_reason))
            return out
        if index not in self.started:
            self.started.add(index)
            out.append(
                self._chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if event.token is None and event.finish_reason is None:
            return out
        delta = {"content": event.text} if event.text or event.finish_reason is None else {}
        logprobs = None
        if event.token is not None and event.logprob is not None:
            logprobs = {"content": choice.chat_logprobs[-1:]}
        out.append(
            self._chunk(
                [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}]
            )
        )
        return out

    def completion_piece(self, index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        """One ``text_completion`` stream chunk of choice ``index``."""
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._chunk([]), "usage": self.usage()}
