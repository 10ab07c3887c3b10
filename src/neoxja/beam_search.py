"""Beam search and beam sampling: transformers' ``_beam_search`` on neoxja's decoding backends.

Each prompt keeps ``num_beams`` running beams. A step scores every continuation of every beam
(log-softmax of the logits, then the processors, plus the beam's running score), keeps the best
``max(2, 1 + number of eos ids) * num_beams`` candidates (or samples them without replacement),
continues the best that did not end, and offers the best ``num_beams`` that ended (an eos, or the
length limit) to the prompt's finished hypotheses, whose scores are length-penalised. The search
stops as transformers' does (``early_stopping`` True, False or "never"). The selection is
transformers' vectorized formulation, so the chosen beams, their scores and their ties are the same.

What differs is the bookkeeping, built for the cost of a step:

* the running beams' KV cache is reordered in place (:meth:`~neoxja.cache.KVCache.reorder`: only
  the rows whose beam changed, only the filled positions), so the C decoding step keeps its
  pointers and nothing the size of the cache is allocated per step;
* no [batch, beams, max_length] sequences are gathered per step: each step writes one column of a
  trace (which running row each new beam came from, and its token), and a finished hypothesis is
  (step, row, token); sequences and ``beam_indices`` are read back from the trace once, at the end;
* the running token history (for the processors and the backends) is reordered like the cache;
* the only device sync of a step is one ``tolist()`` of the new beams' rows and the stop flag.
"""

from __future__ import annotations

from typing import Any

import torch

from neoxja.cache import KVCache, reorder_rows_
from neoxja.decoding import DecodingBackend, TorchBackend, start_decoding
from neoxja.generation_config import GenerationConfig
from neoxja.generation_outputs import GenerateBeamDecoderOnlyOutput, StepRecord
from neoxja.generation_plan import Plan, padding_views

_OUT = -1.0e9  # the score that keeps a beam or hypothesis out of a top-k, as in transformers


class _Finished:
    """The best ``num_beams`` finished hypotheses of each prompt, best first: their length-penalised
    ``scores``, whether each slot really ``done`` (-1e9 placeholders are not), and ``ids`` [batch,
    beams, 3]: the step that ended it, the running row it continued, and its last token."""

    def __init__(self, batch: int, beams: int, device: torch.device) -> None:
        self.scores = torch.full((batch, beams), _OUT, device=device)
        self.done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        self.ids = torch.zeros(batch, beams, 3, dtype=torch.long, device=device)
        self.ids[:, :, 0] = -1  # step -1: an empty placeholder

    def offer(self, scores: torch.Tensor, ended: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge candidates (``scores`` already penalised and pushed out where they may not enter,
        ``ended`` [batch, keep], ``ids`` [batch, keep, 3]) and keep the best ``beams``."""
        merged = torch.cat((self.scores, scores), dim=1)
        best = torch.topk(merged, k=self.scores.shape[1]).indices
        self.scores = merged.gather(1, best)
        self.done = torch.cat((self.done, ended), dim=1).gather(1, best)
        self.ids = torch.cat((self.ids, ids), dim=1).gather(1, best.unsqueeze(-1).expand(-1, -1, 3))


def _continuations(
    totals: torch.Tensor, keep: int, sample: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best (or, sampling, drawn without replacement and then sorted) entries of each row
    of ``totals`` [batch, beams * vocab]: their scores and flat indices, best first."""
    if not sample:
        return torch.topk(totals, k=keep)
    drawn = torch.multinomial(torch.softmax(totals, dim=-1), num_samples=keep, generator=generator)
    scores, order = totals.gather(1, drawn).sort(dim=-1, descending=True)
    return scores, drawn.gather(1, order)


def _penalty(generated: int, length_penalty: float) -> float:
    """The divisor of a hypothesis of ``generated`` new tokens: ``generated ** length_penalty``."""
    return generated**length_penalty


def _prefill_once(
    model: Any,
    backend: DecodingBackend,
    plan: Plan,
    beams: int,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """Run each prompt once (its first beam's row) through the model's PyTorch forward into a cache
    of its own, then give its keys, values and logits to all its beams (the beams of a prompt start
    equal): the prompt's work is not multiplied by the beams."""
    first = slice(None, None, beams)
    prompts = plan.input_ids[first]
    single = KVCache(
        model.config, prompts.shape[0], prompts.shape[1], dtype=model.dtype, device=prompts.device
    )
    logits = TorchBackend(model, single, prompts.shape[1], plan.sampler).prefill_logits(
        prompts, None if mask is None else mask[first], None if positions is None else positions[first]
    )
    backend.cache.fill_repeated(single, beams)
    return logits.repeat_interleave(beams, dim=0)


@torch.no_grad()
def beam_search(
    model: Any, plan: Plan, config: GenerationConfig, record: StepRecord
) -> GenerateBeamDecoderOnlyOutput:
    """Beam search (``do_sample``: beam sampling) over ``plan`` (prompts repeated per beam); the best
    ``num_return_sequences`` hypotheses per prompt with their scores and beam indices, as transformers'
    ``generate(num_beams=...)``. ``record`` receives each step's raw logits and processed log-probs
    over all running beams ([batch * beams, vocab]) when asked for."""
    beams = config.num_beams
    rows, prompt_len = plan.input_ids.shape
    batch = rows // beams
    device = plan.input_ids.device
    max_length = plan.max_length
    length_penalty, early_stopping = config.length_penalty, config.early_stopping
    eos = torch.tensor(plan.eos_ids, dtype=torch.long, device=device) if plan.eos_ids else None
    keep = max(2, 1 + len(plan.eos_ids)) * beams
    top_beams = torch.arange(keep, device=device) < beams  # only these candidates may finish
    row_offset = torch.arange(batch, device=device).view(-1, 1) * beams

    history = torch.empty(rows, max_length, dtype=torch.long, device=device)
    history[:, :prompt_len] = plan.input_ids
    cache = KVCache(model.config, rows, max_length, dtype=model.dtype, device=device)
    backend = start_decoding(model, cache, max_length, plan.sampler)
    # The beams of one prompt share its padding, so reordering beams leaves these as they are.
    mask, positions, prompt_mask, prompt_positions = padding_views(plan)

    running = torch.zeros(batch, beams, device=device)
    running[:, 1:] = _OUT  # all beams start equal: only the first one's continuations count
    finished = _Finished(batch, beams, device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    trace_rows = torch.empty(max_length - prompt_len, rows, dtype=torch.long, device=device)
    trace_tokens = torch.empty_like(trace_rows)

    logits = _prefill_once(model, backend, plan, beams, prompt_mask, prompt_positions)
    length = prompt_len
    step = 0
    while True:
        log_probs = plan.sampler.process(history.narrow(1, 0, length), torch.log_softmax(logits, dim=-1))
        record.add(logits, log_probs)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running.unsqueeze(-1)).view(batch, beams * vocab)
        scores, flat = _continuations(totals, keep, config.do_sample, plan.generator)
        source_rows = flat // vocab + row_offset
        tokens = flat % vocab
        ended = torch.full_like(top_beams, length + 1 >= max_length).expand(batch, keep)
        if eos is not None:
            ended = ended | torch.isin(tokens, eos)

        # The beams that go on: the best candidates that did not end.
        alive = scores + ended.float() * _OUT
        chosen = torch.topk(alive, k=beams).indices
        running = alive.gather(1, chosen)
        new_rows = source_rows.gather(1, chosen).view(-1)
        new_tokens = tokens.gather(1, chosen).view(-1)

        # The hypotheses that end: among the top num_beams candidates, while the prompt may still improve.
        generated = step + 1
        entering = ended & top_beams
        offered = scores / _penalty(generated, length_penalty)
        if early_stopping is True:
            offered += finished.done.all(dim=-1, keepdim=True).float() * _OUT
        offered += (~improvable).float() * _OUT
        offered += (~entering).float() * _OUT
        ids = torch.stack((torch.full_like(tokens, step), source_rows, tokens), dim=-1)
        finished.offer(offered, entering, ids)

        # Can a running beam still beat the worst finished hypothesis (transformers' heuristic)?
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = generated
        best_running = running[:, :1] / _penalty(best_length, length_penalty)
        worst = torch.where(finished.done, finished.scores.min(dim=1, keepdim=True).values, _OUT)
        improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
        go_on = improvable.any() & ~ended.all()
        if early_stopping is True:
            go_on = go_on & ~finished.done.all()

        trace_rows[step] = new_rows
        trace_tokens[step] = new_tokens
        step += 1
        sources = torch.cat((new_rows, go_on.view(1).long())).tolist()  # the step's one sync
        if not sources.pop():
            break
        if reorder_rows_(history.narrow(1, 0, length), sources):
            cache.reorder(sources)
            plan.sampler.forget()  # the stateful processors rebuild from the reordered rows
        history.select(1, length).copy_(new_tokens)
        length += 1
        logits = backend.step_logits(
            history.narrow(1, 0, length), positions, None if mask is None else mask.narrow(1, 0, length)
        )
        if positions is not None:
            positions += 1
    return _results(plan, config, record, finished, trace_rows, trace_tokens)


def _results(
    plan: Plan,
    config: GenerationConfig,
    record: StepRecord,
    finished: _Finished,
    trace_rows: torch.Tensor,
    trace_tokens: torch.Tensor,
) -> GenerateBeamDecoderOnlyOutput:
    """The best ``num_return_sequences`` hypotheses per prompt, read back from the trace.

    A hypothesis that ended at step ``s`` from running row ``r`` has its token at ``s``; its token at
    ``s - 1`` is the one row ``r`` received then, from row ``trace_rows[s - 1, r]``, and so on back to
    the prompt. Positions past a hypothesis's end hold the pad id (as transformers: ``pad_token_id``,
    or the first eos id when the pad id is 0), its ``beam_indices`` -1.
    """
    count = config.num_return_sequences
    ids = finished.ids[:, :count].reshape(-1, 3)
    last_step, last_row, last_token = ids.unbind(-1)
    width = int(last_step.max()) + 1
    fill = plan.pad_token_id or (plan.eos_ids[0] if plan.eos_ids else 0)
    new_tokens = torch.full((ids.shape[0], width), fill, dtype=torch.long, device=ids.device)
    beam_indices = torch.full((ids.shape[0], width), -1, dtype=torch.long, device=ids.device)
    row = last_row.clone()
    for s in reversed(range(width)):
        traced_token = trace_tokens[s].gather(0, row)
        traced_row = trace_rows[s].gather(0, row)
        before_end, at_end = last_step > s, last_step == s
        new_tokens[:, s] = torch.where(at_end, last_token, torch.where(before_end, traced_token, fill))
        beam_indices[:, s] = torch.where(at_end, last_row, torch.where(before_end, traced_row, -1))
        row = torch.where(before_end, traced_row, row)
    prompts = plan.input_ids[:: config.num_beams].repeat_interleave(count, dim=0)
    scores, logits = record.as_tuples()
    return GenerateBeamDecoderOnlyOutput(
        sequences=torch.cat((prompts, new_tokens), dim=1),
        sequences_scores=finished.scores[:, :count].reshape(-1),
        scores=scores,
        logits=logits,
        beam_indices=beam_indices.int(),
    )
