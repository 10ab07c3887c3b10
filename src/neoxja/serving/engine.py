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

Failures do not travel either. Whatever is computed for one sequence (its prefill, sampling,
penalties, log-probabilities, detokenizing, stop check, its sink) fails that sequence only: it ends
with ``finish_reason="error"`` and the error's text, its slot is freed, and the other rows of the
step go on. A decoding step that fails fails the sequences that were in it; the engine goes on with
the next requests. :meth:`Engine.stalled_for` tells a health check how long work has waited
without a step being finished (``inf`` once the engine's thread has died).

The engine knows nothing of HTTP: ``sink`` is any callable taking :class:`Event` objects (the server
passes one that hands them to its event loop).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from neoxja.serving.sequences import (
    Event,
    Request,
    SamplingParams,
    SequenceState,
    StopMatcher,
    check_params,
    new_sequence,
)
from neoxja.serving.slots import SlotPool, choose_step

__all__ = ["Engine", "EngineClosed", "Event", "QueueFull", "Request", "SamplingParams", "StopMatcher"]

logger = logging.getLogger("neoxja.serving")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _is_token_id(value: Any, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


class QueueFull(RuntimeError):
    """More sequences wait than the engine's ``max_queue`` allows."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


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
        self._incoming_sequences = 0  # of the requests in _incoming (read by other threads)
        self._waiting: deque[SequenceState] = deque()
        self._prefilling: deque[SequenceState] = deque()
        self._decoding: list[SequenceState] = []
        self._holding: dict[int, SequenceState] = {}  # slot -> the sequence holding it
        self._lock = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._progress = time.monotonic()  # when a step last ended (or work came to an idle engine)
        self._death: str | None = None  # why the engine's thread ended, if not by shutdown()
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
        :class:`EngineClosed`, or ValueError naming what is wrong: a field of ``params`` the engine
        cannot compute (:func:`~neoxja.serving.sequences.check_params`), a prompt that is empty or
        holds something other than a token id, or a prompt and ``max_tokens`` beyond ``max_model_len``."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        vocab = self.model.config.vocab_size
        check_params(params, vocab, len(prompts) * n)
        if params.max_tokens == 0 and not params.prompt_logprobs:
            raise ValueError("max_tokens must be >= 1 (0 only to score an echoed prompt), got 0")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            bad = next((j for j, t in enumerate(prompt) if not _is_token_id(t, vocab)), None)
            if bad is not None:
                raise ValueError(
                    f"prompt {i}, position {bad}: {prompt[bad]!r} is not a token id in [0, {vocab})"
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
                request.sequences.append(
                    new_sequence(request, p * n + i, list(prompt), self.tokenizer, self.device)
                )
        with self._lock:
            if self._death is not None:
                raise EngineClosed(f"the engine has stopped: {self._death}")
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if self.queue_depth + len(request.sequences) > self.max_queue:
                raise QueueFull(f"{self.queue_depth} sequences are waiting (max_queue {self.max_queue})")
            if not self._busy:
                self._progress = time.monotonic()  # an idle engine has not stalled before this
            self._incoming.append(request)
            self._incoming_sequences += len(request.sequences)
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
        return len(self._waiting) + self._incoming_sequences

    @property
    def running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return self.pool.used

    @property
    def decoding(self) -> int:
        """Sequences in the running decoding batch."""
        return len(self._decoding)

    @property
    def alive(self) -> bool:
        """Whether the engine's thread runs (False before :meth:`start`, after :meth:`shutdown`, and
        once the thread has died; :meth:`stalled_for` tells the last apart)."""
        return self._thread is not None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds since the engine last finished a step while sequences wait or run (counted from
        their arrival when the engine was idle); 0.0 when it has nothing to do; ``math.inf`` when its
        thread has died (every sequence it held was then ended with an error, and :meth:`submit`
        raises :class:`EngineClosed`). A health check calls the engine stuck when this exceeds the
        time one step may take."""
        if self._death is not None:
            return math.inf
        if not self._busy:
            return 0.0
        return max(time.monotonic() - self._progress, 0.0)

    @property
    def _busy(self) -> bool:
        return bool(self._incoming_sequences or self._waiting or self.pool.used)

    def close(self) -> None:
        """Take no new requests (:meth:`submit` raises :class:`EngineClosed`); running ones go on."""
        with self._lock:
            self._closed = True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Take no new requests; let running ones finish for up to ``timeout`` s, then cancel the rest."""
        self.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive and (self.running or self.queue_depth):
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

    def _run(self) -> None:
        death = None
        try:
            with torch.inference_mode():
                while self._take_incoming():
                    try:
                        self._iteration()
                    except Exception as err:  # a bug in the engine's own bookkeeping: fail what runs
                        logger.exception("engine iteration failed")
                        for seq in list(self._holding.values()):
                            self._finish(seq, "error", error=f"the engine failed: {_describe(err)}")
                    self._progress = time.monotonic()
        except BaseException as err:  # the thread ends: everything it holds or queues is answered
            death = _describe(err)
            logger.critical("the engine's thread died: %s", death, exc_info=True)
        finally:
            self._wind_down(death)

    def _take_incoming(self) -> bool:
        """Wait for work; move new requests' sequences to the queue. False once :meth:`shutdown` says stop."""
        with self._lock:
            while not (self._stop or self._incoming or self._waiting or self.pool.used):
                self._lock.wait()
            if self._stop:
                return False
            while self._incoming:
                request = self._incoming.popleft()
                self._waiting.extend(request.sequences)
                self._incoming_sequences -= len(request.sequences)
            return True

    def _wind_down(self, death: str | None) -> None:
        """End every sequence still queued or running: cancelled at shutdown, an error if the thread died."""
        with self._lock:
            self._closed = True
            self._death = death
            queued = [seq for request in self._incoming for seq in request.sequences]
            self._incoming.clear()
            self._incoming_sequences = 0
        reason, error = ("cancelled", None) if death is None else ("error", f"the engine stopped: {death}")
        for seq in [*self._holding.values(), *self._waiting, *queued]:
            self._finish(seq, reason, error=error)

    def _iteration(self) -> None:
        for seq in [*self._waiting, *self._prefilling, *self._decoding]:
            if seq.request.cancelled:
                self._finish(seq, "cancelled")
        while self._waiting and self.pool.free:
            seq = self._waiting.popleft()
            seq.slot = self.pool.acquire()
            self._holding[seq.slot] = seq
            self._prefilling.append(seq)
        self._prefill_some()
        if self._decoding:
            self._decode()
        self.steps += 1

    def _fail(self, seq: SequenceState, err: Exception) -> None:
        """``seq``'s own computation raised ``err``: end that sequence only."""
        logger.exception("sequence %d of a request failed", seq.index)
        self._finish(seq, "error", error=_describe(err))

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
            size = min(remaining, budget)
            budget -= size
            try:
                self._prefill(seq, size)
            except Exception as err:  # its forward, prompt scores, first token or sink
                self._fail(seq, err)

    def _prefill(self, seq: SequenceState, size: int) -> None:
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
            return
        self._prefilling.popleft()
        if seq.request.params.max_tokens == 0:
            self._finish(seq, "length")
            return
        self._decoding.append(seq)
        logits = out.logits[:, -1].float()
        self._emit(seq, logits, int(seq.sampler(seq.tokens[:, :end], logits.clone())[0]))

    def _prompt_logprobs(self, seq: SequenceState, start: int, logits: torch.Tensor) -> None:
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
            seq.request.sink(Event(seq.index, prompt_logprobs=scored))

    def _decode(self) -> None:
        rows = list(self._decoding)
        device = self.device
        try:
            tokens = torch.tensor([s.last for s in rows], dtype=torch.long, device=device)
            slots = torch.tensor([s.slot for s in rows], dtype=torch.long, device=device)
            lengths = torch.tensor([s.filled for s in rows], dtype=torch.long, device=device)
            logits, argmax = self.step(tokens, slots, lengths)
            greedy_ids = argmax.tolist()  # one device sync for every plain greedy row
        except Exception as err:  # the batched forward: every row of it fails, the engine goes on
            logger.exception("a decoding step of %d sequences failed", len(rows))
            for seq in rows:
                self._finish(seq, "error", error=f"the decoding step failed: {_describe(err)}")
            return
        for b, seq in enumerate(rows):
            seq.filled += 1
            try:
                row = logits[b : b + 1]
                token = greedy_ids[b]
                if not seq.sampler.plain_greedy:
                    token = int(seq.sampler(seq.tokens[:, : seq.length], row.clone())[0])
                self._emit(seq, row, token)
            except Exception as err:  # this row's sampling, scores, text, stop check or sink
                self._fail(seq, err)

    def _emit(self, seq: SequenceState, logits: torch.Tensor, token: int) -> None:
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
        seq.request.sink(event)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: SequenceState, reason: str, error: str | None = None) -> None:
        """End ``seq``: free its slot, take it off every queue, send its last event. Never raises: what
        fails here (the held text, the sink) is logged, and the slot is freed before anything else."""
        if seq.finished:
            return
        seq.finished = True
        slot, seq.slot = seq.slot, -1
        if slot >= 0:
            self._holding.pop(slot, None)
            try:
                self.pool.release(slot)
            except Exception:
                logger.exception("could not free slot %d", slot)
        for queue in (self._waiting, self._prefilling, self._decoding):
            if seq in queue:
                queue.remove(seq)
        tail = ""
        if reason in ("length", "stop") and not seq.hit_stop:  # what the detokenizer and stop check held
            try:
                tail, seq.hit_stop = seq.stops.feed(seq.detokenizer.finalize())
                tail += "" if seq.hit_stop else seq.stops.flush()
            except Exception as err:
                logger.exception("sequence %d of a request failed at its end", seq.index)
                tail, reason, error = "", "error", _describe(err)
        try:
            seq.request.sink(Event(seq.index, text=tail, finish_reason=reason, error=error))
        except BaseException:  # whatever a sink raises, the sequences ended after this one still end
            logger.exception("the sink of a request failed on its last event; its client gets nothing more")
