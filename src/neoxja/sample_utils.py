"""Logits processors and token pickers: how the next token is chosen from the model's scores.

A processor is any callable ``(input_ids, scores) -> scores``: ``input_ids`` [batch, cur_len] is every
token so far (prompt included, left padding included) and ``scores`` [batch, vocab] the float32 logits
of the next position. Processors may modify ``scores`` in place and return it. They give the same
numbers as the reference's processors of the same name, but the stateful ones (repetition penalty,
no-repeat-ngram) only look at the tokens appended since their last call, so one decoding step costs
the same at position 10 and at position 2000. An instance therefore belongs to one generation: call
it with the same, growing ``input_ids``, or call its ``reset()`` (:meth:`Sampler.forget`) when the
rows were reordered (beam search) or shortened (assisted decoding's rejected drafts): the next call
then rebuilds the state from the whole ``input_ids``.

A :class:`Sampler` is a list of processors plus a pick function (argmax or multinomial). Everything
per request lives in the sampler, so a server can build one per request and swap it freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from neoxja.generation_config import check_setting, check_temperature

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Picker = Callable[[torch.Tensor], torch.Tensor]


def _as_id_tensor(ids: int | Sequence[int] | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).to(device=device, dtype=torch.long)
    if isinstance(ids, int):
        ids = [ids]
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def _check_switched_on(name: str, value: int, processor: str) -> int:
    """A setting whose 0 means off: its rule (:func:`check_setting`), and not 0 for its own processor."""
    if check_setting(name, value) == 0:
        raise ValueError(f"{name}=0 switches {processor} off: leave the processor out (it needs {name} >= 1)")
    return value


class TemperatureProcessor:
    """Divide the scores by ``temperature`` (> 0): below 1 sharpens, above 1 flattens the distribution.

    The quotient is the reference's (``scores / temperature`` in the scores' dtype, bit for bit)
    wherever that is finite at each row's best score. Where it is not (a row's best score over a
    tiny temperature overflows: 1e-40, or 1e-30 against a score of 1e9), or where the temperature
    itself is no normal number of the scores' dtype (below float32's 1.2e-38 or above its 3.4e38),
    the row is shifted so that its best score is 0 and divided in float64: the same distribution
    (softmax ignores a shift), every score finite or -inf, never the NaN of ``inf - inf`` or of
    ``-inf / inf``.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = check_temperature(temperature, do_sample=True)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        best = scores.amax(dim=-1, keepdim=True)
        info = torch.finfo(scores.dtype)
        if info.tiny <= t <= info.max:
            plain = torch.isfinite(best / t)  # the quotient's maximum: division is monotonic
            if bool(plain.all()):
                return scores.div_(t)
        else:
            plain = torch.zeros_like(best, dtype=torch.bool)
        shifted = ((scores.double() - best.double()) / t).to(scores.dtype)
        return torch.where(plain, scores / t, shifted)


class TopKProcessor:
    """Keep the ``top_k`` highest scores (ties with the k-th included) and set the rest to -inf."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        self.top_k = max(_check_switched_on("top_k", top_k, "TopKProcessor"), min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        return scores.masked_fill_(scores < kth, -math.inf)


class TopPProcessor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches ``top_p``."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        self.top_p = float(check_setting("top_p", top_p))
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Ascending order: the tail whose cumulative mass stays within 1 - top_p is dropped. Summing from
        # the small end gives the reference's exact float results at the boundary.
        ordered, order = torch.sort(scores, dim=-1, descending=False)
        mass = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = mass <= 1.0 - self.top_p
        drop_sorted[:, -self.min_tokens_to_keep :] = False
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
        return scores.masked_fill_(drop, -math.inf)


class RepetitionPenaltyProcessor:
    """Scale down the scores of tokens already present (CTRL paper): negative * penalty, positive / penalty.

    ``prompt_ignore_length`` (int or [batch] tensor) skips the first positions of each row, which is
    how left padding is kept out of the penalty. The set of seen tokens is kept as a [batch, vocab]
    mask and updated with the new tokens only.
    """

    def __init__(self, penalty: float, prompt_ignore_length: int | torch.Tensor | None = None) -> None:
        self.penalty = float(check_setting("repetition_penalty", penalty))
        self.prompt_ignore_length = prompt_ignore_length
        self._seen: torch.Tensor | None = None
        self._consumed = 0

    def _observe(self, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        batch, cur_len = input_ids.shape
        if self._seen is None:
            # One spare column absorbs ids that must not count (ignored prompt positions, ids >= vocab).
            self._seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self._consumed :].clamp(max=vocab_size)
        ignore = self.prompt_ignore_length
        if ignore is not None and self._consumed == 0:
            positions = torch.arange(cur_len, device=input_ids.device)
            limit = ignore.to(input_ids.device)[:, None] if isinstance(ignore, torch.Tensor) else ignore
            new = new.masked_fill(positions < limit, vocab_size)
        self._seen.scatter_(1, new, True)
        self._consumed = cur_len
        return self._seen[:, :vocab_size]

    def reset(self) -> None:
        """Forget the tokens seen: the next call reads its whole ``input_ids``."""
        self._seen = None
        self._consumed = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = self._observe(input_ids, scores.shape[-1])
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalized, scores)


class PresenceFrequencyProcessor:
    """OpenAI's additive penalties on the generated tokens: each token's score loses
    ``frequency_penalty`` times the number of times it was generated, plus ``presence_penalty`` once
    if it was generated at all. The first ``prompt_length`` positions are the prompt and do not count.
    Counts are kept as a [batch, vocab] tensor, updated with the new tokens only."""

    def __init__(self, presence_penalty: float, frequency_penalty: float, prompt_length: int) -> None:
        self.presence = float(check_setting("presence_penalty", presence_penalty))
        self.frequency = float(check_setting("frequency_penalty", frequency_penalty))
        self.prompt_length = prompt_length
        self._counts: torch.Tensor | None = None
        self._consumed = prompt_length

    def reset(self) -> None:
        """Forget the counts: the next call counts every generated token of its ``input_ids``."""
        self._counts = None
        self._consumed = self.prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
        new = input_ids[:, self._consumed :]
        if new.shape[1]:
            self._counts.scatter_add_(1, new, torch.ones(new.shape, dtype=scores.dtype, device=scores.device))
        self._consumed = input_ids.shape[1]
        scores -= self._counts * self.frequency + (self._counts > 0).to(scores.dtype) * self.presence
        return scores


class MinPProcessor:
    """Keep the tokens whose probability is at least ``min_p`` times the most likely one's (and at
    least the ``min_tokens_to_keep`` most likely)."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1) -> None:
        self.min_p = float(check_setting("min_p", min_p))
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * self.min_p
        drop = probs < floor
        if self.min_tokens_to_keep > 1:
            kept = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
            drop.scatter_(-1, kept, False)
        return scores.masked_fill_(drop, -math.inf)


class NoRepeatNGramProcessor:
    """Forbid any token that would complete an n-gram (prompt included) that already occurred in its row.

    Each row keeps a table from (n-1)-token prefix to the tokens that followed it; each call adds the
    n-grams ending in the new tokens and looks up the current suffix, so the work per step is constant.
    """

    def __init__(self, ngram_size: int) -> None:
        self.n = _check_switched_on("no_repeat_ngram_size", ngram_size, "NoRepeatNGramProcessor")
        self._tables: list[dict[tuple[int, ...], set[int]]] = []
        self._consumed = 0

    def reset(self) -> None:
        """Forget the n-grams seen: the next call reads its whole ``input_ids``."""
        self._tables = []
        self._consumed = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch, cur_len = input_ids.shape
        n = self.n
        if not self._tables:
            self._tables = [{} for _ in range(batch)]
        if cur_len < n:
            self._consumed = cur_len
            return scores
        # Rows of the last n-1 old tokens plus the new ones: every n-gram ending in a new token.
        start = max(self._consumed - (n - 1), 0)
        rows = input_ids[:, start:].tolist()
        vocab_size = scores.shape[-1]
        for row, table, ids in zip(range(batch), self._tables, rows, strict=True):
            for end in range(max(n, self._consumed + 1) - start, len(ids) + 1):
                table.setdefault(tuple(ids[end - n : end - 1]), set()).add(ids[end - 1])
            banned = [t for t in table.get(tuple(ids[len(ids) - n + 1 :]), ()) if t < vocab_size]
            if banned:
                scores[row, banned] = -math.inf
        self._consumed = cur_len
        return scores


class MinLengthProcessor:
    """Forbid the eos tokens while the sequence (prompt + new tokens) is shorter than ``min_length``.

    ``min_new_tokens`` is the same rule with ``min_length = prompt_length + min_new_tokens``.
    """

    def __init__(
        self,
        min_length: int,
        eos_token_id: int | Sequence[int] | torch.Tensor,
        device: torch.device | str | None = None,
    ) -> None:
        self.min_length = check_setting("min_length", min_length)
        self.eos = _as_id_tensor(eos_token_id, device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] < self.min_length:
            scores[:, self.eos[self.eos < scores.shape[-1]]] = -math.inf
        return scores


_ARGMAX_BLOCK = 128


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """The highest-scoring token of each row, [batch]: the first index of the maximum (NaN counts as
    the maximum), exactly as ``torch.argmax``.

    On CPU, torch's argmax walks the row one element at a time, while the maximum of each block of
    128 is vectorized: the first block holding the row's maximum, then the first maximum inside it,
    is the same index at a fraction of the cost (most for batches, whose rows the scalar loop
    walks one after another).
    """
    batch, vocab = scores.shape
    block = _ARGMAX_BLOCK
    if scores.device.type != "cpu" or vocab % block or vocab < 16 * block:
        return torch.argmax(scores, dim=-1)
    blocks = scores.reshape(batch, vocab // block, block)
    best = blocks.amax(-1).argmax(-1)
    inner = blocks.gather(1, best.view(batch, 1, 1).expand(batch, 1, block)).view(batch, block).argmax(-1)
    return best * block + inner


def make_multinomial(generator: torch.Generator | None = None) -> Picker:
    """A picker drawing from softmax(scores); ``generator`` (or torch's global RNG) makes it reproducible."""

    def pick(scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return pick


@dataclass
class Sampler:
    """Processors applied in order, then a picker: ``sampler(input_ids, logits) -> next ids [batch]``."""

    processors: list[Processor] = field(default_factory=list)
    pick: Picker = greedy

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits (no processors): a backend that computes the argmax may pick."""
        return self.pick is greedy and not self.processors

    def forget(self) -> None:
        """Reset every processor that keeps state between calls (see the module docstring): after
        the rows of ``input_ids`` were reordered or shortened."""
        for processor in self.processors:
            reset = getattr(processor, "reset", None)
            if callable(reset):
                reset()

    def process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Apply every processor to ``scores`` (float32 [batch, vocab], may be modified in place)."""
        for processor in self.processors:
            scores = processor(input_ids, scores)
        return scores

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.pick(self.process(input_ids, scores))


def make_sampler(
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_length: int = 0,
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    prompt_padding: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    extra_processors: Sequence[Processor] = (),
    min_tokens_to_keep: int = 1,
) -> Sampler:
    """Build the reference's processor chain for these settings.

    Order as in transformers: repetition penalty, no-repeat-ngram, min length, user processors, then,
    only when sampling, temperature, top-k, top-p, min-p. ``prompt_padding`` [batch] is the number of left
    pad positions per row (kept out of the repetition penalty). ``min_tokens_to_keep`` is the fewest
    tokens top-k, top-p and min-p leave (beam sampling keeps one more than there are eos ids, as
    transformers does, so a beam can always continue). Settings equal to their neutral value add no
    processor.
    """
    processors: list[Processor] = []
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyProcessor(repetition_penalty, prompt_padding))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramProcessor(no_repeat_ngram_size))
    if min_length > 0 and eos_token_id is not None:
        device = prompt_padding.device if prompt_padding is not None else None
        processors.append(MinLengthProcessor(min_length, eos_token_id, device))
    processors.extend(extra_processors)
    if not do_sample:
        return Sampler(processors, greedy)
    if temperature != 1.0:
        processors.append(TemperatureProcessor(temperature))
    if top_k:
        processors.append(TopKProcessor(top_k, min_tokens_to_keep))
    if top_p < 1.0:
        processors.append(TopPProcessor(top_p, min_tokens_to_keep))
    if min_p > 0.0:
        processors.append(MinPProcessor(min_p, min_tokens_to_keep))
    return Sampler(processors, make_multinomial(generator))
