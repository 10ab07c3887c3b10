"""Text generation: ``model.generate(input_ids, ...)`` with transformers' arguments and defaults.

A call merges its settings (:class:`GenerationConfig`), plans the generation once
(:func:`~neoxja.generation_plan.plan_generation`: settings and arguments checked, prompt, length,
padding, processors), then runs one of three loops: beam search (``num_beams > 1``,
:mod:`neoxja.beam_search`), assisted decoding (``prompt_lookup_num_tokens`` or ``assistant_model``,
:mod:`neoxja.assisted`), or greedy decoding and sampling (:func:`_decode_steps`). Asked for
(``return_dict_in_generate``), the result is one of transformers' output classes with the per-step
scores (:mod:`neoxja.generation_outputs`). The greedy/sampling loop is built for speed on small
batches:

* the prompt goes through the model once (prefill) into a preallocated :class:`~neoxja.cache.KVCache`
  sized for the whole generation, then each step feeds exactly one token per row;
* the output ids, the attention mask and the position ids live in buffers allocated once; each step
  passes views of them, so nothing is concatenated and the Python work per step does not grow with
  the sequence;
* without padding the model gets ``attention_mask=None`` (its fast causal path); with left padding it
  gets the 2-D mask over past + current tokens and position ids counted from the first real token;
* how a step is computed is the decoding backend's business (:mod:`neoxja.decoding`: the PyTorch
  forward, or one C call per step on the CPU in float32); the loop only sees token ids.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from neoxja.assisted import assisted_steps
from neoxja.beam_search import beam_search
from neoxja.cache import KVCache
from neoxja.decoding import start_decoding
from neoxja.generation_config import GENERATION_CONFIG_NAME, GenerationConfig
from neoxja.generation_outputs import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    RecordingSampler,
    StepRecord,
    compute_transition_scores,
)
from neoxja.generation_plan import Plan, padding_views, plan_generation
from neoxja.sample_utils import Processor
from neoxja.streamers import make_detokenizer

__all__ = [
    "GENERATION_CONFIG_NAME",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "GenerationMixin",
    "stream_generate",
]


@torch.inference_mode()
def _decode_steps(model: Any, plan: Plan, tokens: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Run prefill + decode, writing into ``tokens`` [batch, max_length]; yield (length, next ids) per step.

    Stops when every row has produced an eos (or hit a stop string) or the buffer is full. Rows that
    finished earlier get ``pad_token_id`` from then on, as in transformers. Inference mode is on only
    while the generator runs, not while its consumer handles a step.
    """
    batch, prompt_len = plan.input_ids.shape
    max_length = plan.max_length
    device = tokens.device
    tokens[:, :prompt_len] = plan.input_ids
    cache = KVCache(model.config, batch, max_length, dtype=model.dtype, device=device)
    backend = start_decoding(model, cache, max_length, plan.sampler)

    mask, positions, prompt_mask, prompt_positions = padding_views(plan)

    # The stop bookkeeping is plain Python on one list of ids per step (one device sync, no small
    # kernels); the device mask that pads finished rows exists only once a row has finished.
    eos_ids = set(plan.eos_ids)
    may_stop = bool(eos_ids) or plan.stop_strings is not None
    unfinished = [True] * batch
    finished_mask = None  # [batch] bool on the device, True where the row still runs
    pad = torch.tensor(plan.pad_token_id, dtype=torch.long, device=device)

    length = prompt_len
    next_tokens = backend.prefill(plan.input_ids, prompt_mask, prompt_positions)
    while True:
        column = tokens.select(1, length)
        if finished_mask is not None:
            next_tokens = torch.where(finished_mask, next_tokens, pad)
        if next_tokens is not column:
            column.copy_(next_tokens)
        length += 1
        yield length, next_tokens
        if may_stop:
            ids = next_tokens.tolist()
            ended = [token in eos_ids for token in ids]
            if plan.stop_strings is not None:
                ended = [a or b for a, b in zip(ended, plan.stop_strings(ids), strict=True)]
            if any(still and end for still, end in zip(unfinished, ended, strict=True)):
                unfinished = [still and not end for still, end in zip(unfinished, ended, strict=True)]
                if not any(unfinished):
                    return
                finished_mask = torch.tensor(unfinished, dtype=torch.bool, device=device)
        if length >= max_length:
            return
        next_tokens = backend.step(
            tokens.narrow(1, 0, length),
            positions,
            None if mask is None else mask.narrow(1, 0, length),
            tokens.select(1, length),
        )
        if positions is not None:
            positions += 1


def _resolve_config(
    model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> GenerationConfig:
    base = generation_config if generation_config is not None else model.generation_config
    config = copy.deepcopy(base)
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(
            f"generate() got arguments it does not use: {', '.join(sorted(unknown))}. "
            f"Known settings: {', '.join(sorted(GenerationConfig.field_names()))}"
        )
    return config


def _checkpoint_generation_config(model_config: Any) -> GenerationConfig:
    defaults = GenerationConfig.from_model_config(model_config)
    source = getattr(model_config, "name_or_path", "")
    if not source:
        return defaults
    try:
        config = GenerationConfig.from_pretrained(source, local_files_only=True)
    except OSError:  # no such file, or a Hub id whose files are not cached
        return defaults
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name) is None:
            setattr(config, name, getattr(defaults, name))
    return config


class GenerationMixin:
    """Adds :meth:`generate` to a causal LM whose forward follows neoxja's model contract."""

    @property
    def generation_config(self) -> GenerationConfig:
        """The model's default decoding settings: its checkpoint's ``generation_config.json`` when that is
        on disk (model directory or Hub cache; never downloaded here), else its config's special token ids.
        """
        config = self.__dict__.get("_generation_config")
        if config is None:
            config = _checkpoint_generation_config(self.config)
            self.__dict__["_generation_config"] = config
        return config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        if not isinstance(value, GenerationConfig):
            raise TypeError(f"generation_config must be a GenerationConfig, got {type(value).__name__}")
        self.__dict__["_generation_config"] = value

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        streamer: Any = None,
        tokenizer: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        logits_processor: Sequence[Processor] = (),
        assistant_model: Any = None,
        **kwargs: Any,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Continue ``input_ids`` [batch, len]; return prompt + continuation, [batch * copies, len'].

        Keyword settings are those of :class:`GenerationConfig` (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``no_repeat_ngram_size``,
        ``min_new_tokens``, ``eos_token_id``, ``pad_token_id``, ``num_return_sequences``,
        ``stop_strings`` (with ``tokenizer=``), ``num_beams``, ``length_penalty``, ``early_stopping``,
        ``prompt_lookup_num_tokens``, ``return_dict_in_generate``, ``output_scores``,
        ``output_logits``, ...); they override ``generation_config``, which defaults to
        ``model.generation_config``. Batched prompts must be left-padded with their
        ``attention_mask``. Rows that end early are filled with ``pad_token_id`` (eos if unset).
        ``num_return_sequences`` gives the number of copies per prompt (sampling, or the best beams).
        ``assistant_model`` (a model of the same vocabulary) drafts tokens that this model verifies
        several at a time. ``streamer`` (batch 1) receives the prompt, then each new token, then
        ``end()``. ``seed`` or ``generator`` make sampling reproducible; without them torch's global RNG
        is used. With ``return_dict_in_generate=True`` the result is a
        :class:`~neoxja.generation_outputs.GenerateDecoderOnlyOutput` (beam search:
        :class:`~neoxja.generation_outputs.GenerateBeamDecoderOnlyOutput`).
        """
        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompt once: either positionally (inputs) or as input_ids")
        config = _resolve_config(self, generation_config, kwargs)
        with torch.no_grad():
            plan = plan_generation(
                self,
                inputs if inputs is not None else input_ids,
                attention_mask,
                config,
                tokenizer=tokenizer,
                generator=generator,
                seed=seed,
                logits_processor=logits_processor,
                streaming=streamer is not None,
                assistant_model=assistant_model,
            )
        if streamer is not None and plan.input_ids.shape[0] != 1:
            raise ValueError(f"streamer supports a single sequence, got a batch of {plan.input_ids.shape[0]}")
        record = StepRecord(
            scores=config.return_dict_in_generate and config.output_scores,
            logits=config.return_dict_in_generate and bool(config.output_logits),
        )
        if config.is_beam_search:
            result = beam_search(self, plan, config, record)
            if not config.output_scores:
                result.sequences_scores = None
            return result if config.return_dict_in_generate else result.sequences
        tokens = torch.empty(plan.input_ids.shape[0], plan.max_length, dtype=torch.long, device=self.device)
        if streamer is not None:
            streamer.put(plan.input_ids.cpu())
        length = plan.input_ids.shape[1]
        steps = _steps(self, plan, config, tokens, record, assistant_model)
        try:
            for step_length, next_tokens in steps:
                length = step_length
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
        finally:
            if streamer is not None:
                streamer.end()
        sequences = tokens[:, :length].clone()
        if not config.return_dict_in_generate:
            return sequences
        scores, logits = record.as_tuples()
        stats = getattr(steps, "stats", None)
        return GenerateDecoderOnlyOutput(
            sequences=sequences, scores=scores, logits=logits, assisted_stats=stats
        )

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """Each generated token's score at the step that chose it, [rows, steps]: see
        :func:`neoxja.generation_outputs.compute_transition_scores`."""
        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)


def _steps(
    model: Any,
    plan: Plan,
    config: GenerationConfig,
    tokens: torch.Tensor,
    record: StepRecord,
    assistant_model: Any,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The token-by-token loop of these settings: assisted decoding, or greedy decoding/sampling."""
    if config.prompt_lookup_num_tokens is not None or assistant_model is not None:
        return assisted_steps(model, plan, config, tokens, record, assistant_model)
    if record.active:
        plan.sampler = RecordingSampler(plan.sampler, record)
    return _decode_steps(model, plan, tokens)


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | torch.Tensor | Sequence[int],
    *,
    skip_special_tokens: bool = True,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    logits_processor: Sequence[Processor] = (),
    assistant_model: Any = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` (text or ids) as text pieces, as soon as each is complete.

    Pieces never split a character (byte-fallback tokens are held until their character is whole);
    joined they equal ``tokenizer.decode(new_ids, skip_special_tokens=...)``. Settings as in
    ``generate``; assisted decoding streams the tokens of each verified draft as they are accepted.
    Beam search does not stream (the best beam is known only at the end): ``num_beams > 1`` is
    refused, as transformers refuses a streamer with beams.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty: give at least one character to continue")
        input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    else:
        input_ids = torch.as_tensor(prompt)
    config = _resolve_config(model, generation_config, kwargs)
    detokenizer = make_detokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    with torch.no_grad():
        plan = plan_generation(
            model,
            input_ids,
            None,
            config,
            tokenizer=tokenizer,
            generator=generator,
            seed=seed,
            logits_processor=logits_processor,
            streaming=True,
            yields_text=True,
            assistant_model=assistant_model,
        )
    if plan.input_ids.shape[0] != 1:
        raise ValueError(
            f"stream_generate continues a single prompt, got a batch of {plan.input_ids.shape[0]}"
        )
    tokens = torch.empty(1, plan.max_length, dtype=torch.long, device=model.device)
    record = StepRecord(scores=False, logits=False)
    for _, next_tokens in _steps(model, plan, config, tokens, record, assistant_model):
        piece = detokenizer.add(int(next_tokens[0]))
        if piece:
            yield piece
    tail = detokenizer.finish()
    if tail:
        yield tail
