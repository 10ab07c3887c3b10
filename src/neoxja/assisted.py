"""Assisted decoding: draft several tokens cheaply, verify them all in one forward of the model.

``generate(prompt_lookup_num_tokens=...)`` drafts from the sequence itself and
``generate(assistant_model=...)`` from a small model of the same vocabulary (:mod:`neoxja.drafts`).
Each round the model reads its last token and the k drafts in one call of its decoding backend
(:meth:`~neoxja.decoding.DecodingBackend.verify_logits`), which gives the k + 1 next-token logits
that k + 1 plain steps would have given; on a CPU, where a step is bound by reading the weights,
that call costs about one step. The call's processors are applied per position, then:

* greedy: the drafts are accepted while each equals the argmax before it, and the argmax after the
  last accepted one is emitted too, so the output is plain greedy decoding's, token for token;
* sampling with prompt lookup: every position is sampled, and drafts are accepted while equal;
* sampling with an assistant: speculative sampling (Leviathan et al., algorithm 1, as transformers'
  ``_speculative_sampling``): draft i is kept with probability min(1, p_i / q_i), and the token after
  the kept ones is drawn from max(p - q, 0) renormalised (from p when every draft was kept).

The KV cache keeps every emitted token but the last; the positions of rejected drafts are cropped
away (:meth:`~neoxja.cache.KVCache.crop`), and the stateful processors forget what they saw of them
(:meth:`~neoxja.sample_utils.Sampler.forget`). Tokens are yielded one at a time, so streaming,
stop strings and eos behave as in plain decoding. :class:`AssistedStats` counts drafts and
acceptances for one call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from neoxja.cache import KVCache
from neoxja.decoding import DecodingBackend, start_decoding
from neoxja.drafts import AssistantDrafter, PromptLookupDrafter, independent_processors
from neoxja.generation_config import GenerationConfig
from neoxja.generation_outputs import StepRecord
from neoxja.generation_plan import Plan
from neoxja.sample_utils import Sampler, greedy

DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2  # transformers' value when max_matching_ngram_size is None


@dataclass
class AssistedStats:
    """What one assisted generation did: ``rounds`` verification forwards of the model, ``drafted``
    tokens proposed in them, ``accepted`` drafts the model agreed with, ``emitted`` new tokens (the
    accepted drafts plus the model's own token of each round, fewer when eos, a stop string or the
    length ended a round), and ``num_assistant_tokens``, an assistant's draft length at the end
    (what the heuristic schedules adjusted it to; None for prompt lookup)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    num_assistant_tokens: int | None = None

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted tokens (0.0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per forward of the model (1.0 is plain decoding)."""
        return self.emitted / self.rounds if self.rounds else 0.0


class AssistedSteps(Iterator[tuple[int, torch.Tensor]]):
    """The ``(length, next_ids)`` steps of one assisted generation, with its :class:`AssistedStats`
    (``.stats``, filled as the steps run)."""

    def __init__(self, steps: Iterator[tuple[int, torch.Tensor]], stats: AssistedStats) -> None:
        self._steps = steps
        self.stats = stats

    def __iter__(self) -> AssistedSteps:
        return self

    def __next__(self) -> tuple[int, torch.Tensor]:
        return next(self._steps)


def assisted_steps(
    model: Any,
    plan: Plan,
    config: GenerationConfig,
    tokens: torch.Tensor,
    record: StepRecord,
    assistant_model: Any,
) -> AssistedSteps:
    """Generate into ``tokens`` [1, max_length] with drafts verified several at a time; yield
    ``(length, next_ids [1])`` once per new token, as :func:`neoxja.generation._decode_steps` does.

    Drafts come from ``assistant_model`` when given, else from prompt lookup
    (``config.prompt_lookup_num_tokens``). When ``record`` is active it gets one raw-logits/processed-
    scores row per emitted token. The returned iterator's ``stats`` count drafts and acceptances.
    """
    if plan.input_ids.shape[0] != 1:
        raise ValueError(
            f"assisted decoding continues one sequence, got a batch of {plan.input_ids.shape[0]}"
        )
    offset = 0 if plan.attention_mask is None else int((plan.attention_mask[0] == 0).sum())
    # Caches and backends are built as the loop that uses them runs: in inference mode.
    with torch.inference_mode():
        cache = KVCache(model.config, 1, plan.max_length, dtype=model.dtype, device=tokens.device)
        backend = start_decoding(model, cache, plan.max_length, plan.sampler)
        stats = AssistedStats()
        if assistant_model is not None:
            drafter: AssistantDrafter | PromptLookupDrafter = _assistant_drafter(
                assistant_model, plan, config, offset
            )
            stats.num_assistant_tokens = drafter.num_tokens
        else:
            drafter = PromptLookupDrafter(
                config.prompt_lookup_num_tokens,
                config.max_matching_ngram_size or DEFAULT_MAX_MATCHING_NGRAM_SIZE,
                plan.sampler.processors,
                plan.eos_ids,
                model.config.vocab_size,
            )
    steps = _verify_drafts(backend, plan, config.do_sample, tokens, record, drafter, offset, stats)
    return AssistedSteps(steps, stats)


def _assistant_drafter(assistant: Any, plan: Plan, config: GenerationConfig, offset: int) -> AssistantDrafter:
    """The assistant's drafter: its own cache and backend, its own copies of the call's processors."""
    context = assistant.config.max_position_embeddings
    if plan.max_length - offset > context:
        raise ValueError(
            f"assistant_model has max_position_embeddings={context}, fewer than the "
            f"{plan.max_length - offset} positions of this generation (prompt + max_new_tokens): "
            "give a shorter length or another assistant"
        )
    sampler = Sampler(independent_processors(plan.sampler.processors), plan.sampler.pick)
    cache = KVCache(assistant.config, 1, plan.max_length, dtype=assistant.dtype, device=assistant.device)
    backend = start_decoding(assistant, cache, plan.max_length, sampler)
    return AssistantDrafter(
        assistant,
        backend,
        sampler,
        num_tokens=config.num_assistant_tokens,
        schedule=config.num_assistant_tokens_schedule,
        confidence_threshold=float(config.assistant_confidence_threshold or 0.0),
        eos_ids=plan.eos_ids,
        max_length=plan.max_length,
        offset=offset,
        keep_scores=bool(config.do_sample),
    )


def _speculative_choice(
    drafts: torch.Tensor, draft_scores: torch.Tensor, scores: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Speculative sampling over k drafts: (accepted drafts n, the token after them).

    ``draft_scores`` [k, vocab] are the assistant's processed scores, ``scores`` [k + 1, vocab] the
    model's; each draft is kept with probability min(1, p/q) until the first that is not."""
    count = drafts.shape[0]
    q = torch.softmax(draft_scores.float(), dim=-1)
    p = torch.softmax(scores.float(), dim=-1)
    index = torch.arange(count, device=scores.device)
    ratio = p[index, drafts] / q[index, drafts]
    draws = torch.rand(count, generator=generator, device=scores.device)
    rejected = (draws > ratio).tolist()
    accepted = rejected.index(True) if True in rejected else count
    target = p[accepted]
    if accepted < count:
        residual = torch.clamp(target - q[accepted], min=0)
        total = residual.sum()
        if float(total) > 0:  # rounding can leave nothing where p <= q everywhere: draw from p then
            target = residual / total
    token = int(torch.multinomial(target, 1, generator=generator))
    return accepted, token


@torch.inference_mode()
def _verify_drafts(
    backend: DecodingBackend,
    plan: Plan,
    do_sample: bool,
    tokens: torch.Tensor,
    record: StepRecord,
    drafter: AssistantDrafter | PromptLookupDrafter,
    offset: int,
    stats: AssistedStats,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The loop of rounds: draft, verify in one forward, emit the accepted tokens one by one, roll back."""
    prompt_len = plan.input_ids.shape[1]
    max_length = plan.max_length
    tokens[:, :prompt_len] = plan.input_ids
    sampler = plan.sampler
    eos_ids = set(plan.eos_ids)
    # The cache holds every token but the last, which each round's forward reads with the drafts.
    if prompt_len - offset > 1:
        backend.prefill_logits(tokens[:, offset : prompt_len - 1], None, None)
    length = prompt_len
    while True:
        count, draft_scores = drafter.draft(tokens, length, max_length - length - 1)
        if count:
            logits = backend.verify_logits(tokens[:, length - 1 : length + count])[0]
        else:  # nothing drafted: a plain step (the backend's fastest one-token path)
            logits = backend.step_logits(tokens[:, offset:length], None, None)
        raw = logits.clone() if record.logits is not None else None
        if sampler.processors:
            for i in range(count + 1):
                logits[i : i + 1] = sampler.process(tokens[:, : length + i], logits[i : i + 1])
        drafts = tokens[0, length : length + count]
        if do_sample and draft_scores is not None:
            accepted, token = _speculative_choice(drafts, draft_scores, logits, plan.generator)
            chosen = drafts[:accepted].tolist() + [token]
        else:
            picks = greedy(logits) if not do_sample else sampler.pick(logits)
            mismatch = (picks[:count] != drafts).tolist()
            accepted = mismatch.index(True) if True in mismatch else count
            chosen = picks[: accepted + 1].tolist()
        stats.rounds += 1
        stats.drafted += count
        stats.accepted += accepted
        for i, token in enumerate(chosen):
            tokens[0, length] = token
            if record.active:
                record.add(None if raw is None else raw[i : i + 1], logits[i : i + 1])
            length += 1
            stats.emitted += 1
            yield length, tokens.select(1, length - 1)
            ended = token in eos_ids or length >= max_length
            if plan.stop_strings is not None and plan.stop_strings([token])[0]:
                ended = True
            if ended:
                return
        backend.cache.crop(length - offset - 1)
        if accepted < count:
            sampler.forget()
            drafter.forget()
        stats.num_assistant_tokens = drafter.update(accepted, count)
