"""The serving engine: continuous batching of many requests over one model, in a thread of its own.

A request (:meth:`Engine.submit`) is one or more *sequences* (prompts times ``n``). Each sequence
waits in a FIFO queue for a free KV slot (:class:`~neoxja.serving.slots.SlotPool`), then its prompt
is prefilled into that slot in chunks of at most ``prefill_chunk`` tokens, then it decodes one token
per step until it stops. Every iteration of the engine's loop does, in this order:

1. drop cancelled sequences and free their slots (a client that went away costs at most one step);
2. give free slots to waiting sequences;
3. prefill at most ``prefill_chunk`` prompt tokens: a chunk of the oldest sequence still
   prefilling, then whole prompts that fit (so a long prompt delays the running streams by one
   chunk per step, never by the whole prompt, and many short ones start together);
4. one decoding step over every sequence that is decoding, each with its own sampler, seed and
   stopping rules, and hand each new token to its request's ``sink``.

Results do not depend on the company a request keeps: each sequence is prefilled alone, as
``generate()`` does, and decoded by a step whose rows do not interact
(:class:`~neoxja.serving.slots.FusedSlotStep`, bit for bit; :class:`~neoxja.serving.slots.TorchSlotStep`
within float rounding); a seeded sequence draws from its own generator.

The engine knows nothing of HTTP: ``sink`` is any callable taking :class:`Event` objects (the server
passes one that hands them to its event loop).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neoxja.sample_utils import PresenceFrequencyProcessor, Sampler, make_sampler
from neoxja.serving.slots import SlotPool, choose_step
from neoxja.tokenizer_utils import StreamingDetokenizer

logger = logging.getLogger("neoxja.serving")


@dataclass
class SamplingParams:
    """How one request's sequences are continued and stopped (OpenAI's fields, already checked)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives per token; None: no logprobs
    prompt_logprobs: bool = False  # also score the prompt's tokens (``echo`` with ``logprobs``)
    ignore_eos: bool = False


@dataclass
class Event:
    """What a sequence (``index`` within its request) produced.

    One per generated token (``token`` set; ``text`` the text it completes, possibly "" while a
    character or a possible stop string is held back), a last one with ``finish_reason``
    (``"stop"``/``"length"``/``"cancelled"``/``"error"``) and any text still held, and, before the
    tokens when asked for, one with ``prompt_logprobs``.
    """

    index: int
    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None
    error: str | None = None


class QueueFull(RuntimeError):
    """More sequences wait than the engine's ``max_queue`` allows."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


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
class _Sequence:
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


@dataclass(eq=False)
class Request:
    """A submitted request: its sequences, its sink, and whether its client is gone."""

    params: SamplingParams
    sink: Callable[[Event], None]
    sequences: list[_Sequence] = field(default_factory=list)
    cancelled: bool = False
    sink_failed: bool = False


class Engine:
    """Continuous batching over ``model`` with ``max_batch`` KV slots of ``max_model_len`` positions.

    ``submit`` and ``cancel`` may be called from any thread; the model runs only on the engine's own
    thread, started by :meth:`start` and stopped by :meth:`shutdown`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 256,
        max_model_len: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        context = model.config.max_position_embeddings
        max_model_len = context if max_model_len is None else max_model_len
        if not 0 < max_model_len <= context:
            raise ValueError(
                f"max_model_len must be in [1, {context}] (the model's context), got {max_model_len}"
            )
        for name, value in (
            ("max_batch", max_batch),
            ("max_queue", max_queue),
            ("prefill_chunk", prefill_chunk),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if model.training:
            raise ValueError("the model is in training mode: call model.eval() before serving it")
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.eos_ids = set(model.generation_config.eos_ids())
        self.pool = SlotPool(model, max_batch, max_model_len)
        self.step = choose_step(model, self.pool)
        self.device = model.device
        self._incoming: deque[Request] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: deque[_Sequence] = deque()
        self._decoding: list[_Sequence] = []
        self._lock = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="neoxja-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sink: Callable[[Event], None],
        n: int = 1,
    ) -> Request:
        """Queue ``n`` sequences per prompt (index ``prompt * n + i``); raises :class:`QueueFull`,
        :class:`EngineClosed`, or ValueError when a prompt and ``max_tokens`` exceed ``max_model_len``."""
        if params.max_tokens < 0 or (params.max_tokens == 0 and not params.prompt_logprobs):
            raise ValueError(
                f"max_tokens must be >= 1 (0 only to score an echoed prompt), got {params.max_tokens}"
            )
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            bad = next((j for j, t in enumerate(prompt) if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(
                    f"prompt {i}, position {bad}: {prompt[bad]} is not a token id in [0, {vocab})"
                )
            if len(prompt) + params.max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens and max_tokens is {params.max_tokens}: together "
                    f"more than this server's max_model_len {self.max_model_len}"
                )
        if len(prompts) * n > self.max_queue:
            raise ValueError(
                f"{len(prompts)} prompts x n={n} are {len(prompts) * n} sequences, more than this server "
                f"queues at once (max_queue {self.max_queue})"
            )
        request = Request(params, sink)
        for p, prompt in enumerate(prompts):
            for i in range(n):
                request.sequences.append(self._sequence(request, p * n + i, list(prompt)))
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if self.queue_depth + len(request.sequences) > self.max_queue:
                raise QueueFull(f"{self.queue_depth} sequences are waiting (max_queue {self.max_queue})")
            self._incoming.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request``'s sequences; their slots are freed at the start of the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    @property
    def queue_depth(self) -> int:
        """Sequences not yet holding a slot."""
        return len(self._waiting) + sum(len(r.sequences) for r in self._incoming)

    @property
    def running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return self.pool.used

    @property
    def decoding(self) -> int:
        """Sequences in the running decoding batch."""
        return len(self._decoding)

    def close(self) -> None:
        """Take no new requests (:meth:`submit` raises :class:`EngineClosed`); running ones go on."""
        with self._lock:
            self._closed = True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Take no new requests; let running ones finish for up to ``timeout`` s, then cancel the rest."""
        self.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.running or self.queue_depth):
            time.sleep(0.01)
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ the engine thread

    def _sequence(self, request: Request, index: int, prompt: list[int]) -> _Sequence:
        params = request.params
        seed = params.seed + index if params.seed is not None else random.SystemRandom().randrange(2**62)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        extra = []
        if params.presence_penalty or params.frequency_penalty:
            extra.append(
                PresenceFrequencyProcessor(params.presence_penalty, params.frequency_penalty, len(prompt))
            )
        sampler = make_sampler(
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else 1.0,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            generator=generator,
            extra_processors=extra,
        )
        tokens = torch.empty(1, len(prompt) + params.max_tokens, dtype=torch.long, device=self.device)
        tokens[0, : len(prompt)] = torch.tensor(prompt)
        return _Sequence(
            request,
            index,
            prompt,
            sampler,
            StreamingDetokenizer(self.tokenizer, skip_special_tokens=True),
            StopMatcher(params.stop),
            tokens,
        )

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stop or self._incoming or self._waiting or self.pool.used):
                        self._lock.wait()
                    if self._stop:
                        break
                    while self._incoming:
                        self._waiting.extend(self._incoming.popleft().sequences)
                try:
                    self._iteration()
                except Exception as err:  # a failed step fails its sequences, not the server
                    logger.exception("engine step failed")
                    for seq in [*self._prefilling, *self._decoding]:
                        self._finish(seq, "error", error=f"{type(err).__name__}: {err}")
            for seq in [*self._prefilling, *self._decoding, *self._waiting]:
                self._finish(seq, "cancelled")
            for request in self._incoming:
                for seq in request.sequences:
                    self._finish(seq, "cancelled")

    def _iteration(self) -> None:
        for seq in [*self._waiting, *self._prefilling, *self._decoding]:
            if seq.request.cancelled:
                self._finish(seq, "cancelled")
        while self._waiting and self.pool.free:
            seq = self._waiting.popleft()
            seq.slot = self.pool.acquire()
            self._prefilling.append(seq)
        self._prefill_some()
        if self._decoding:
            self._decode()
        self.steps += 1

    def _prefill_some(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens before the next decoding step: one chunk of the oldest
        prompt, then whole prompts that still fit. A prompt no longer than the chunk is thus always
        prefilled in one forward, as ``generate()`` does; many short ones start in the same step."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            remaining = len(seq.prompt) - seq.filled
            if budget < self.prefill_chunk and remaining > budget:
                return
            budget -= self._prefill(seq, min(remaining, budget))

    def _prefill(self, seq: _Sequence, size: int) -> int:
        """The next ``size`` tokens of ``seq``'s prompt into its slot; after the last, its first token."""
        start = seq.filled
        end = start + size
        whole = seq.request.params.prompt_logprobs
        out = self.model(
            seq.tokens[:, start:end],
            past_key_values=self.pool.view(seq.slot, start),
            use_cache=True,
            logits_to_keep=0 if whole else 1,
        )
        seq.filled = end
        if whole:
            self._prompt_logprobs(seq, start, out.logits[0].float())
        if end < len(seq.prompt):
            return size
        self._prefilling.popleft()
        if seq.request.params.max_tokens == 0:
            self._finish(seq, "length")
            return size
        logits = out.logits[:, -1].float()
        self._emit(seq, logits, int(seq.sampler(seq.tokens[:, :end], logits.clone())[0]))
        if not seq.finished:
            self._decoding.append(seq)
        return size

    def _prompt_logprobs(self, seq: _Sequence, start: int, logits: torch.Tensor) -> None:
        """Scores of the prompt tokens start+1..end, from the chunk's logits (sent with the last chunk)."""
        prompt = seq.prompt
        end = start + logits.shape[0]
        logprobs = logits.log_softmax(-1)
        top = max(seq.request.params.logprobs or 0, 1)
        targets = torch.tensor(prompt[start + 1 : end + 1], device=logits.device)
        rows = logprobs[: targets.numel()]
        chosen = rows.gather(1, targets[:, None])[:, 0].tolist()
        values, ids = rows.topk(top, dim=-1)
        scored = seq.scored if seq.scored is not None else [(None, [])]
        scored.extend(
            (lp, list(zip(i, v, strict=True)))
            for lp, i, v in zip(chosen, ids.tolist(), values.tolist(), strict=True)
        )
        seq.scored = scored
        if end == len(prompt):
            self._send(seq, Event(seq.index, prompt_logprobs=scored))

    def _decode(self) -> None:
        rows = list(self._decoding)
        device = self.device
        tokens = torch.tensor([s.last for s in rows], dtype=torch.long, device=device)
        slots = torch.tensor([s.slot for s in rows], dtype=torch.long, device=device)
        lengths = torch.tensor([s.filled for s in rows], dtype=torch.long, device=device)
        logits, argmax = self.step(tokens, slots, lengths)
        greedy_ids = argmax.tolist()  # one device sync for every plain greedy row
        for b, seq in enumerate(rows):
            seq.filled += 1
            row = logits[b : b + 1]
            token = greedy_ids[b]
            if not seq.sampler.plain_greedy:
                token = int(seq.sampler(seq.tokens[:, : seq.length], row.clone())[0])
            self._emit(seq, row, token)

    def _emit(self, seq: _Sequence, logits: torch.Tensor, token: int) -> None:
        """Record ``seq``'s new token, send it, and finish the sequence if it stops here."""
        params = seq.request.params
        seq.tokens[0, seq.length] = token
        seq.generated += 1
        seq.last = token
        event = Event(seq.index, token=token)
        if params.logprobs is not None:
            logprobs = logits[0].log_softmax(-1)
            event.logprob = float(logprobs[token])
            if params.logprobs:
                values, ids = logprobs.topk(params.logprobs)
                event.top_logprobs = list(zip(ids.tolist(), values.tolist(), strict=True))
        reason = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        else:
            event.text, stopped = seq.stops.feed(seq.detokenizer.add_token(token))
            if stopped:
                reason, seq.hit_stop = "stop", True
        if reason is None and seq.generated >= params.max_tokens:
            reason = "length"
        self._send(seq, event)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.slot >= 0:
            self.pool.release(seq.slot)
            seq.slot = -1
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq in self._decoding:
            self._decoding.remove(seq)
        tail = ""
        if reason in ("length", "stop") and not seq.hit_stop:  # what the detokenizer and stop check held
            tail, seq.hit_stop = seq.stops.feed(seq.detokenizer.finalize())
            tail += "" if seq.hit_stop else seq.stops.flush()
        self._send(seq, Event(seq.index, text=tail, finish_reason=reason, error=error))

    @staticmethod
    def _send(seq: _Sequence, event: Event) -> None:
        """Hand ``event`` to its request's sink; a sink that fails cancels its own request only."""
        request = seq.request
        if request.sink_failed:
            return
        try:
            request.sink(event)
        except Exception:
            logger.exception("the sink of a request failed; cancelling the request")
            request.sink_failed = request.cancelled = True
