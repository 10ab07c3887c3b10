"""What ``generate(..., return_dict_in_generate=True)`` returns, and the per-step scores behind it.

The output classes have transformers' names and fields (``sequences``, ``scores``, ``logits``,
``sequences_scores``, ``beam_indices``), read by attribute, key or index like every
:class:`~neoxja.outputs.ModelOutput`. ``scores`` are the processed scores each step picked from
(after the logits processors, the sampling warpers, and for beam search the log-softmax), ``logits``
the model's raw float32 logits; one [rows, vocab] tensor per generated position.
:func:`compute_transition_scores` reads the chosen tokens' entries back out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from neoxja.cache import KVCache
from neoxja.outputs import ModelOutput
from neoxja.sample_utils import Sampler


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """Greedy decoding, sampling and assisted decoding: the sequences and, when asked, each step's
    processed ``scores`` and raw ``logits`` (tuples of [batch, vocab] float32 tensors). Assisted
    decoding also fills ``assisted_stats`` (neoxja's own field, last so that transformers' positions
    hold): verification rounds, drafted and accepted tokens, :class:`neoxja.assisted.AssistedStats`."""

    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: KVCache | None = None
    assisted_stats: Any = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """Beam search: the best ``num_return_sequences`` beams per prompt with their length-penalised
    ``sequences_scores`` (when ``output_scores``), each step's ``scores``/``logits`` over every running
    beam ([batch * num_beams, vocab]), and ``beam_indices`` [rows, new tokens]: which running beam
    each generated token came from (-1 past a beam's end)."""

    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: KVCache | None = None


class StepRecord:
    """The per-step tensors a generation was asked to keep: ``scores`` and/or ``logits`` (None when
    not asked), each a list of [rows, vocab] float32 copies."""

    def __init__(self, scores: bool, logits: bool) -> None:
        self.scores: list[torch.Tensor] | None = [] if scores else None
        self.logits: list[torch.Tensor] | None = [] if logits else None

    @property
    def active(self) -> bool:
        """Whether anything is recorded."""
        return self.scores is not None or self.logits is not None

    def add(self, logits: torch.Tensor | None, scores: torch.Tensor | None) -> None:
        """Keep copies of one step's raw ``logits`` and processed ``scores`` (those asked for)."""
        if self.logits is not None and logits is not None:
            self.logits.append(logits.clone())
        if self.scores is not None and scores is not None:
            self.scores.append(scores.clone())

    def as_tuples(self) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """(scores, logits) as the output classes hold them."""
        return (
            None if self.scores is None else tuple(self.scores),
            None if self.logits is None else tuple(self.logits),
        )


class RecordingSampler(Sampler):
    """A sampler that also keeps each call's raw logits and processed scores in a :class:`StepRecord`.

    It never counts as plain greedy, so a backend hands it the logits instead of picking itself.
    """

    def __init__(self, sampler: Sampler, record: StepRecord) -> None:
        super().__init__(sampler.processors, sampler.pick)
        self.record = record

    @property
    def plain_greedy(self) -> bool:
        return False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.record.add(scores, None)  # copied before the processors change the scores in place
        scores = self.process(input_ids, scores)
        self.record.add(None, scores)
        return self.pick(scores)


def compute_transition_scores(
    sequences: torch.Tensor,
    scores: tuple[torch.Tensor, ...] | list[torch.Tensor],
    beam_indices: torch.Tensor | None = None,
    normalize_logits: bool = False,
) -> torch.Tensor:
    """The score of each generated token at the step that chose it, [rows, steps], as transformers'
    ``compute_transition_scores``.

    ``sequences`` [rows, length] end with the generated tokens, one per entry of ``scores`` (each
    [scored rows, vocab]); without ``beam_indices`` row ``r`` was scored in row ``r`` of every step,
    with them (beam search: [rows, steps], -1 where a beam had already ended) in the row they name, and
    the steps a beam did not run score 0. ``normalize_logits`` applies a log-softmax over the
    vocabulary first (log-probabilities from raw scores).
    """
    if not scores:
        raise ValueError("scores is empty: generate with return_dict_in_generate=True and output_scores=True")
    stacked = torch.stack(tuple(scores)).float()  # [steps, scored rows, vocab]
    steps, scored_rows, _ = stacked.shape
    if normalize_logits:
        stacked = torch.log_softmax(stacked, dim=-1)
    if beam_indices is None:
        beam_indices = torch.arange(scored_rows, device=stacked.device).view(-1, 1).expand(-1, steps)
    beam_indices = beam_indices.to(stacked.device).long()
    if beam_indices.dim() != 2 or beam_indices.shape[0] != sequences.shape[0]:
        raise ValueError(
            f"beam_indices must be [rows, steps] with the {sequences.shape[0]} rows of sequences, got "
            f"{tuple(beam_indices.shape)}"
        )
    ended = beam_indices < 0
    length = int((~ended).sum(-1).max()) if beam_indices.numel() else 0
    if length > steps or length > sequences.shape[1]:
        raise ValueError(
            f"beam_indices run for {length} steps but there are {steps} scores and sequences of "
            f"length {sequences.shape[1]}"
        )
    rows = beam_indices[:, :length].masked_fill(ended[:, :length], 0)
    tokens = sequences[:, sequences.shape[1] - length :].to(stacked.device).long()
    step_ids = torch.arange(length, device=stacked.device).expand_as(rows)
    result = stacked[step_ids, rows, tokens]
    return result.masked_fill(ended[:, :length], 0.0)
