"""Sliding-window perplexity of a causal LM over a token sequence, as transformers' guide defines it.

The guide ("Perplexity of fixed-length models") cuts the ids ``x_0 .. x_{n-1}`` into windows of
``max_length`` tokens whose starts advance by ``stride``: window ``w`` covers ``[b_w, e_w)`` with
``b_w = w * stride`` and ``e_w = min(b_w + max_length, n)``; the last window is the first that
reaches ``n``. Each window is one forward pass from position 0 (no state carries over) and scores
only its new tokens, the ones after the previous window's end ``e_{w-1}`` (``e_{-1} = 0``); the
earlier ones are context only. A token needs at least one token of context inside its window, so
window ``w`` scores the tokens ``t`` in ``[max(e_{w-1}, b_w + 1), e_w)``, each by
``-log p(x_t | x_{b_w} .. x_{t-1})``. Hence:

* ``stride < max_length``: every token but ``x_0`` is scored exactly once (``n - 1`` tokens);
* ``stride == max_length``: the windows do not overlap and the first token of each window is
  context for the rest of it but is never scored itself (``n - ceil(n / max_length)`` tokens);
* a sequence shorter than ``max_length`` is one window: ``x_1 .. x_{n-1}`` are scored.

The result is exact: total NLL = the sum of the scored tokens' NLLs, perplexity = exp(total NLL /
scored tokens). The guide's loop instead weights each window's mean loss by its labelled tokens
minus one, which is that window's scored count only when its first token is labelled (the first
window, and every window when ``stride == max_length``) and one less otherwise; the two agree
exactly in those cases and differ slightly for ``stride < max_length``.

Memory stays bounded for long inputs: the windows are batched ``batch_size`` per forward (only
windows of the same length share a batch, so there is no padding), logits are computed only for
the positions that predict scored tokens, and only each window's NLL sum is kept (besides the
ids themselves).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured.

    ``tokens``: tokens scored; ``nll``: their total negative log-likelihood in nats;
    ``perplexity``: ``exp(nll / tokens)``; ``characters``: characters (Unicode code points,
    ``len(text)``) of the text, None when ids were given; ``bits_per_character``:
    ``nll / ln 2 / characters`` (None without characters).
    """

    tokens: int
    nll: float
    characters: int | None = None

    @property
    def perplexity(self) -> float:
        """Token perplexity, ``exp(nll / tokens)`` (inf if that overflows)."""
        try:
            return math.exp(self.nll / self.tokens)
        except OverflowError:
            return math.inf

    @property
    def bits_per_character(self) -> float | None:
        """Total NLL in bits per character of the text, or None when the characters are unknown."""
        if self.characters is None:
            return None
        return self.nll / math.log(2) / self.characters

    def as_dict(self) -> dict[str, Any]:
        """The fields and derived values, for JSON."""
        return {
            "tokens": self.tokens,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "characters": self.characters,
            "bits_per_character": self.bits_per_character,
        }


def combine(results: Iterable[PerplexityResult]) -> PerplexityResult:
    """The aggregate of several texts scored separately: their tokens, NLLs and characters added up
    (so perplexity and bits per character are per token and per character over all of them)."""
    results = list(results)
    if not results:
        raise ValueError("combine needs at least one result")
    counts = [r.characters for r in results]
    return PerplexityResult(
        tokens=sum(r.tokens for r in results),
        nll=math.fsum(r.nll for r in results),
        characters=None if None in counts else sum(counts),
    )


def check_settings(
    max_length: int | None, stride: int | None, batch_size: int = 1, max_positions: int | None = None
) -> None:
    """ValueError (TypeError for a non-int) naming the first bad window setting.

    ``max_positions`` is the model's ``max_position_embeddings``; without it (before a model is
    loaded) only the checks that do not need it are made.
    """
    for name, value in (("max_length", max_length), ("stride", stride), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if max_length is not None and max_length < 2:
        raise ValueError(
            f"max_length must be at least 2 (a token of context and a token to score), got {max_length}"
        )
    if max_length is not None and max_positions is not None and max_length > max_positions:
        raise ValueError(
            f"max_length {max_length} is larger than the model's max_position_embeddings {max_positions}"
        )
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    window = max_length if max_length is not None else max_positions
    if stride is not None and window is not None and stride > window:
        raise ValueError(
            f"stride {stride} is larger than the window (max_length {window}): "
            f"the tokens between windows would never be scored"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first scored, end)`` of each window over ``length`` ids (see the module's docstring).

    The window scores the tokens ``[first scored, end)`` given the context ``[begin, t)``. A window
    that scores nothing (a last window of one token when ``stride == max_length``) is left out.
    """
    spans = []
    previous_end = 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        first = max(previous_end, begin + 1)
        if first < end:
            spans.append((begin, first, end))
        previous_end = end
        if end == length:
            break
    return spans


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_ids: str | Sequence[int] | torch.Tensor,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool | None = None,
    description: str = "perplexity",
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on a text (tokenised whole by ``tokenizer.encode``) or
    on token ids (then ``tokenizer`` may be None and there are no characters).

    ``max_length`` (default: the model's ``max_position_embeddings``) is the window size and
    ``stride`` (default: ``max_length``) how far each window starts after the previous one; see the
    module's docstring for exactly which tokens are scored. ``batch_size`` windows go through the
    model per forward pass. ``progress`` shows a tqdm bar on stderr over the windows, with the tokens
    per second through the model (None: only when stderr is a terminal), labelled ``description``;
    it stays on the screen when done, so its last line is the text's throughput.
    The model is evaluated in eval mode (its mode is restored afterwards) without gradients.
    """
    max_positions = model.config.max_position_embeddings
    check_settings(max_length, stride, batch_size, max_positions)
    max_length = max_positions if max_length is None else max_length
    stride = max_length if stride is None else stride
    ids, characters = _ids(tokenizer, text_or_ids)
    spans = windows(len(ids), max_length, stride)
    ids = ids.to(model.device)

    from tqdm.auto import tqdm

    nll = 0.0
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(
            total=len(spans),
            desc=description,
            unit=" windows",
            disable=None if progress is None else not progress,
        )
        processed = 0  # tokens through the model (context included): the rate the bar shows
        start = time.perf_counter()
        with torch.inference_mode(), bar:
            for batch in _batches(spans, batch_size):
                nll += _batch_nll(model, ids, batch)
                tokens += sum(end - first for _, first, end in batch)
                processed += sum(end - begin for begin, _, end in batch)
                if not bar.disable:
                    rate = processed / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return PerplexityResult(tokens=tokens, nll=nll, characters=characters)


def _ids(tokenizer: Any, text_or_ids: str | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """The 1-D ids to score and the text's characters (None for ids); at least two ids."""
    if isinstance(text_or_ids, str):
        if not text_or_ids:
            raise ValueError("the text is empty")
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to score text (or pass token ids)")
        ids, characters = torch.tensor(tokenizer.encode(text_or_ids), dtype=torch.long), len(text_or_ids)
    else:
        ids, characters = torch.as_tensor(text_or_ids, dtype=torch.long), None
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D (or 1 x n), got shape {list(ids.shape)}")
    if len(ids) < 2:
        raise ValueError(
            f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; perplexity needs at least 2 "
            f"(the first token is only context)"
        )
    return ids, characters


def _batches(spans: list[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows, at most ``batch_size`` at a time, all of one length (no padding)."""
    batch: list[tuple[int, int, int]] = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[2] - span[0] != batch[0][2] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def _batch_nll(model: torch.nn.Module, ids: torch.Tensor, batch: list[tuple[int, int, int]]) -> float:
    """Total NLL (nats) of the scored tokens of a batch of equal-length windows, in one forward.

    Window ``[b, e)`` predicts token ``t`` at its position ``t - 1 - b``; only the last ``keep``
    positions' logits are computed, enough for the window that scores the most tokens.
    """
    inputs = torch.stack([ids[begin:end] for begin, _, end in batch])
    keep = max(end - first for _, first, end in batch) + 1
    logits = model(inputs, use_cache=False, logits_to_keep=keep).logits
    total = 0.0
    for row, (_, first, end) in enumerate(batch):  # a row at a time: no float32 copy of all logits
        predictions = logits[row, keep - 1 - (end - first) : keep - 1].float()
        total += F.cross_entropy(predictions, ids[first:end], reduction="sum").item()
    return total
