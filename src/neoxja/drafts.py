"""Where assisted decoding's draft tokens come from: the sequence itself, or a small assistant model.

A drafter proposes the next few tokens of the one sequence being generated; the model then checks
them all in one forward (:mod:`neoxja.assisted`). Drafts only decide how much work a verification
saves, never which tokens greedy decoding emits. Both drafters follow transformers 5.24
(``candidate_generator.py``):

* :class:`PromptLookupDrafter` (``prompt_lookup_num_tokens``): the tokens that followed the first
  earlier occurrence of the sequence's last n-gram, longest n first (``max_matching_ngram_size``);
* :class:`AssistantDrafter` (``assistant_model``): the assistant decodes a few tokens greedily (or
  samples them, when the call samples) with the call's processors, from its own KV cache, which it
  keeps across rounds and crops back to the tokens the model accepted.

Each drafter writes its drafts into the generation's ``tokens`` buffer after the current length
(positions the model overwrites with what it accepts) and returns their number.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from neoxja.cache import KVCache
from neoxja.decoding import DecodingBackend
from neoxja.sample_utils import Processor, Sampler


def independent_processors(processors: list[Processor]) -> list[Processor]:
    """Copies of ``processors`` whose state is their own: each stateful processor (one with
    ``reset``) is copied and reset, so that running it over another sequence (drafts, the assistant's
    own steps) leaves the generation's processors untouched; stateless callables are shared."""
    copies: list[Processor] = []
    for processor in processors:
        if callable(getattr(processor, "reset", None)):
            processor = copy.copy(processor)
            processor.reset()
        copies.append(processor)
    return copies


class PromptLookupDrafter:
    """Drafts copied from the sequence so far, as transformers' ``PromptLookupCandidateGenerator``.

    For n from ``max_matching_ngram_size`` (at most length - 1) down to 1, the earlier occurrences of
    the last n tokens are tried left to right; the first one followed by at least one token gives up
    to ``num_tokens`` of the tokens after it. With processors, a draft is cut before its first token
    that they forbid (score -inf from all-equal logits, given the draft before it), and an occurrence
    whose first token is forbidden is skipped. A draft is cut before its first eos.
    """

    def __init__(
        self,
        num_tokens: int,
        max_ngram: int,
        processors: list[Processor],
        eos_ids: list[int],
        vocab_size: int,
    ) -> None:
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.processors = processors
        self.eos_ids = set(eos_ids)
        self.vocab_size = vocab_size

    def draft(self, tokens: torch.Tensor, length: int, limit: int) -> tuple[int, None]:
        """Write up to ``min(num_tokens, limit)`` drafts into ``tokens[0, length:]``; return their number
        (no draft probabilities: the tokens are copied, not predicted)."""
        if limit <= 0:
            return 0, None
        sequence = tokens[0, :length]
        for size in range(min(self.max_ngram, length - 1), 0, -1):
            windows = sequence.unfold(0, size, 1)  # [length - size + 1, size]
            starts = (windows == sequence[length - size :]).all(dim=1).nonzero().flatten().tolist()
            for start in starts:
                begin = start + size
                end = min(begin + self.num_tokens, length, begin + limit)
                if begin >= end:
                    continue  # the n-gram itself, at the end: nothing follows it yet
                chosen = sequence[begin:end].tolist()
                if self.processors:
                    chosen = self._allowed_prefix(tokens, length, chosen)
                    if not chosen:
                        continue
                for i, token in enumerate(chosen):
                    if token in self.eos_ids:
                        chosen = chosen[:i]
                        break
                tokens[0, length : length + len(chosen)] = torch.tensor(chosen, dtype=tokens.dtype)
                return len(chosen), None
        return 0, None

    def _allowed_prefix(self, tokens: torch.Tensor, length: int, chosen: list[int]) -> list[int]:
        """The longest prefix of ``chosen`` whose every token the processors allow after the ones before."""
        processors = independent_processors(self.processors)
        history = tokens[:, :length]
        for i, token in enumerate(chosen):
            scores = torch.ones(1, self.vocab_size, dtype=torch.float32, device=tokens.device)
            for processor in processors:
                scores = processor(history, scores)
            if float(scores[0, token]) in (-float("inf"), torch.finfo(torch.float32).min):
                return chosen[:i]
            extra = torch.tensor([chosen[: i + 1]], dtype=tokens.dtype, device=tokens.device)
            history = torch.cat((tokens[:, :length], extra), dim=1)
        return chosen

    def update(self, accepted: int, drafted: int) -> None:
        """Prompt lookup keeps no draft length to adjust (None: no assistant's length to report)."""

    def forget(self) -> None:
        """Prompt lookup keeps no state about the rejected drafts."""


class AssistantDrafter:
    """Drafts decoded by ``assistant`` through its own decoding ``backend`` and KV cache.

    Each round drafts up to ``num_tokens`` (at most what still fits before ``max_length`` minus the
    model's own next token), stopping after an eos or after a token whose probability under the
    assistant's processed scores is below ``confidence_threshold`` (0: never). The ``schedule``
    "heuristic" and "heuristic_transient" add 2 to the draft length when every draft was accepted,
    else take 1 off (not below 1); "constant" keeps it. The adjusted length lives in this drafter only:
    the assistant's own ``generation_config`` is never written (transformers' "heuristic" stores it
    there for the next call), so both heuristic schedules start each call from ``num_tokens``.

    ``sampler`` holds the assistant's own copies of the call's processors (its state is not the
    model's) and the call's picker; ``offset`` is the number of left-padding positions in ``tokens``,
    which the assistant does not see.
    """

    def __init__(
        self,
        assistant: Any,
        backend: DecodingBackend,
        sampler: Sampler,
        *,
        num_tokens: int,
        schedule: str,
        confidence_threshold: float,
        eos_ids: list[int],
        max_length: int,
        offset: int,
        keep_scores: bool,
    ) -> None:
        self.assistant = assistant
        self.backend = backend
        self.cache: KVCache = backend.cache
        self.sampler = sampler
        self.num_tokens = num_tokens
        self.schedule = schedule
        self.confidence_threshold = confidence_threshold
        self.eos_ids = set(eos_ids)
        self.max_length = max_length
        self.offset = offset
        self.keep_scores = keep_scores

    def _catch_up(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Bring the assistant's cache to ``tokens[:, :length]`` and return its logits [1, vocab] after it.

        The cache holds the sequence up to the last draft the assistant fed; the positions after the
        accepted drafts are dropped, then the 1 or 2 tokens it has not seen (the model's own token, and
        the last draft when all were accepted) are fed in one forward."""
        offset, device = self.offset, self.assistant.device
        seen = min(self.cache.length, length - offset - 1)
        if seen == 0:
            self.cache.crop(0)
            return self.backend.prefill_logits(tokens[:, offset:length].to(device), None, None)
        self.cache.crop(seen)
        if length - offset - seen == 1:
            return self.backend.step_logits(tokens[:, offset:length].to(device), None, None)
        return self.backend.verify_logits(tokens[:, offset + seen : length].to(device))[:, -1]

    def draft(self, tokens: torch.Tensor, length: int, limit: int) -> tuple[int, torch.Tensor | None]:
        """Write up to ``limit`` drafts into ``tokens[0, length:]``; return their number and, when the
        call samples, the assistant's processed scores of each [count, vocab] (speculative sampling)."""
        budget = min(self.num_tokens, self.max_length - length - 1, limit)
        if budget <= 0:
            return 0, None
        logits = self._catch_up(tokens, length)
        kept: list[torch.Tensor] = []
        count = 0
        while True:
            history = tokens[:, : length + count]
            scores = self.sampler.process(history, logits)
            token = int(self.sampler.pick(scores)[0])
            tokens[0, length + count] = token
            count += 1
            if self.keep_scores:
                kept.append(scores.clone())
            if count == budget or token in self.eos_ids:
                break
            if self.confidence_threshold > 0:
                confidence = float(torch.softmax(scores[0].float(), dim=-1)[token])
                if confidence < self.confidence_threshold:
                    break
            logits = self.backend.step_logits(
                tokens[:, self.offset : length + count].to(self.assistant.device), None, None
            )
        return count, torch.cat(kept) if kept else None

    def update(self, accepted: int, drafted: int) -> int:
        """Adjust the draft length to how the last round went (the heuristic schedules); return it."""
        if self.schedule in ("heuristic", "heuristic_transient"):
            self.num_tokens = self.num_tokens + 2 if accepted == drafted else max(1, self.num_tokens - 1)
        return self.num_tokens

    def forget(self) -> None:
        """The model rejected drafts: the assistant's stateful processors rebuild from the whole
        sequence at their next call."""
        self.sampler.forget()
