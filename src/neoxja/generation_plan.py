"""How one ``generate()`` call is planned: its settings checked and its inputs resolved, once.

:func:`plan_generation` goes through named steps: the settings are validated together with the
call's arguments (:meth:`GenerationConfig.validate`), the prompt is checked (:func:`_prompt_ids`),
the total length resolved (:func:`_total_length`), the padding mask worked out
(:func:`_padding_mask`), the prompts repeated (per returned sequence, or per beam), the processors
and picker built (:func:`_sampler`), and stop strings prepared (:class:`StopStrings`). Every
decoding loop (greedy and sampling, beam search, assisted decoding) starts from the resulting
:class:`Plan`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neoxja.generation_config import DecodingRequest, GenerationConfig, check_seed
from neoxja.network import check_token_ids
from neoxja.sample_utils import Processor, Sampler, make_sampler
from neoxja.streamers import make_detokenizer

DEFAULT_MAX_NEW_TOKENS = 20  # what transformers generates when neither max_length nor max_new_tokens is set


@dataclass
class Plan:
    """Everything the decoding loop needs, checked and resolved once per call."""

    input_ids: torch.Tensor  # [batch, prompt_len], repeated per returned sequence (per beam in beam search)
    attention_mask: torch.Tensor | None  # None when no row is padded
    max_length: int  # total length of the output buffer
    sampler: Sampler  # processors and picker (beam search uses the processors only)
    eos_ids: list[int]
    pad_token_id: int
    stop_strings: StopStrings | None
    generator: torch.Generator | None  # the RNG of sampling (None: torch's global one)


def padding_views(
    plan: Plan,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """What a decoding loop over left-padded rows passes the model (all None without padding):
    ``mask`` [rows, max_length] (the prompt's padding, then 1s for every new token; loops pass its
    first ``length`` columns), ``positions`` [rows, 1] (the next token's RoPE position, counted from
    each row's first real token; loops add 1 per step), and the prompt's own ``prompt_mask`` (a view
    of ``mask``) and ``prompt_positions`` for the prefill."""
    if plan.attention_mask is None:
        return None, None, None, None
    rows, prompt_len = plan.input_ids.shape
    mask = torch.ones(rows, plan.max_length, dtype=torch.long, device=plan.input_ids.device)
    mask[:, :prompt_len] = plan.attention_mask
    prompt_positions = (plan.attention_mask.cumsum(-1) - 1).masked_fill_(plan.attention_mask == 0, 0)
    positions = plan.attention_mask.sum(-1, keepdim=True)
    return mask, positions, mask[:, :prompt_len], prompt_positions


def _prompt_ids(model: Any, input_ids: Any, config: GenerationConfig) -> torch.Tensor:
    """The prompt as int64 [batch, len] on the model's device, every id inside the vocabulary."""
    device = model.device
    if input_ids is None:
        if config.bos_token_id is None:
            raise ValueError("input_ids is required (the model config has no bos_token_id to start from)")
        return torch.tensor([[config.bos_token_id]], dtype=torch.long, device=device)
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt token"
        )
    check_token_ids(input_ids, model.config.vocab_size)
    context = model.config.max_position_embeddings
    if input_ids.shape[1] > context:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens, more than the model's max_position_embeddings "
            f"({context})"
        )
    return input_ids


def _total_length(config: GenerationConfig, prompt_len: int, context: int) -> int:
    """Prompt + new tokens, as transformers resolves ``max_new_tokens`` / ``max_length``."""
    if config.max_new_tokens is not None:
        if config.max_length is not None:
            warnings.warn(
                "both max_new_tokens and max_length are set; max_new_tokens wins", UserWarning, stacklevel=4
            )
        if prompt_len + config.max_new_tokens > context:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} with a prompt of {prompt_len} tokens exceeds "
                f"the model's max_position_embeddings ({context}); at most {context - prompt_len} fit"
            )
        return prompt_len + config.max_new_tokens
    if config.max_length is not None:
        if config.max_length > context:
            raise ValueError(
                f"max_length={config.max_length} exceeds the model's max_position_embeddings ({context})"
            )
        if prompt_len >= config.max_length:
            raise ValueError(
                f"input_ids has {prompt_len} tokens but max_length is {config.max_length}: nothing left "
                "to generate; raise max_length or set max_new_tokens"
            )
        return config.max_length
    max_length = min(prompt_len + DEFAULT_MAX_NEW_TOKENS, context)
    warnings.warn(
        f"neither max_new_tokens nor max_length is set: generating at most {DEFAULT_MAX_NEW_TOKENS} "
        f"new tokens (max_length={max_length}). Set max_new_tokens to choose the length.",
        UserWarning,
        stacklevel=4,
    )
    if prompt_len >= max_length:
        raise ValueError(
            f"input_ids has {prompt_len} tokens, the whole context ({context}): no room for new tokens"
        )
    return max_length


def _padding_mask(
    input_ids: torch.Tensor, attention_mask: Any, config: GenerationConfig, eos_ids: list[int]
) -> torch.Tensor | None:
    """The left-padding mask as int64 [batch, len], or None when no position is padding."""
    pad = config.pad_token_id
    if attention_mask is None and pad is not None and pad not in eos_ids:
        # Like transformers: a pad id that is not also eos marks padding when no mask is given.
        if bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
    if attention_mask is None:
        return None
    attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
            f"{tuple(input_ids.shape)}: they must match"
        )
    attention_mask = attention_mask.long()
    empty = (attention_mask == 0).all(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"row {int(empty.nonzero()[0])} of the batch is all padding (its attention_mask is all 0): "
            "give every row at least one prompt token"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "attention_mask has padding at the end of a row: decoder-only generation needs left padding "
            "(tokenizer padding_side='left')"
        )
    return None if bool(attention_mask.all()) else attention_mask


def _sampler(
    config: GenerationConfig,
    prompt_len: int,
    attention_mask: torch.Tensor | None,
    eos_ids: list[int],
    device: torch.device,
    generator: torch.Generator | None,
    logits_processor: Sequence[Processor],
) -> Sampler:
    """The processors and picker of these settings, drawing from ``generator`` when sampling."""
    min_length = config.min_length or 0
    if config.min_new_tokens is not None:
        min_length = prompt_len + config.min_new_tokens
    prompt_padding = None
    if attention_mask is not None and config.repetition_penalty != 1.0:
        prompt_padding = (attention_mask != 0).int().argmax(dim=1)
    return make_sampler(
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p or 0.0,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        min_length=min_length,
        eos_token_id=torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None,
        prompt_padding=prompt_padding,
        generator=generator,
        extra_processors=logits_processor,
        min_tokens_to_keep=max(len(eos_ids), 1) + 1 if config.is_beam_search else 1,
    )


def plan_generation(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    config: GenerationConfig,
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    logits_processor: Sequence[Processor] = (),
    streaming: bool = False,
    yields_text: bool = False,
    assistant_model: Any = None,
) -> Plan:
    """Check and resolve everything one generation needs, in the named steps above. ``streaming``,
    ``yields_text`` and ``assistant_model`` describe the call, for the rules between settings and
    arguments (:class:`~neoxja.generation_config.DecodingRequest`)."""
    input_ids = _prompt_ids(model, input_ids, config)
    request = DecodingRequest(
        streaming=streaming,
        yields_text=yields_text,
        assistant_model=assistant_model,
        batch_size=input_ids.shape[0],
        vocab_size=model.config.vocab_size,
    )
    config.validate(request)
    config.warn_unused_sampling_flags(stacklevel=4)
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        generator = torch.Generator(device=input_ids.device).manual_seed(check_seed(seed))
    prompt_len = input_ids.shape[1]
    max_length = _total_length(config, prompt_len, model.config.max_position_embeddings)
    eos_ids = config.eos_ids()
    pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    attention_mask = _padding_mask(input_ids, attention_mask, config, eos_ids)
    copies = config.num_beams if config.is_beam_search else config.num_return_sequences
    if copies > 1:
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(copies, dim=0)
    sampler = _sampler(
        config, prompt_len, attention_mask, eos_ids, input_ids.device, generator, logits_processor
    )
    stop_strings = None
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        stop_strings = StopStrings(tokenizer, stops, input_ids, attention_mask)
    return Plan(
        input_ids, attention_mask, max_length, sampler, eos_ids, pad_token_id, stop_strings, generator
    )


class StopStrings:
    """Per-row check that the text so far ends with (overlaps the newest token with) a stop string.

    Each row decodes its tokens through the tokenizer's streaming detokenizer and keeps only the last
    ``len(longest stop) - 1`` characters, so the check costs the same at every step. The prompt is
    decoded first, so a stop string may begin in the prompt and end in the new text (as in
    transformers); only a match that ends in a new token counts.
    """

    def __init__(
        self, tokenizer: Any, stops: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")

        self.stops = stops
        self.keep = max(len(s) for s in stops) - 1
        self.detokenizers = [make_detokenizer(tokenizer) for _ in range(input_ids.shape[0])]
        self.tails = []
        for row, detokenizer in enumerate(self.detokenizers):
            prompt = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row] != 0]
            text = "".join(detokenizer.add(token) for token in prompt.tolist())
            self.tails.append(text[-self.keep :] if self.keep else "")

    def __call__(self, next_tokens: list[int]) -> list[bool]:
        """Feed one token per row; True where a stop string now ends inside the new text."""
        hit = []
        for row, token in enumerate(next_tokens):
            piece = self.detokenizers[row].add(token)
            tail = self.tails[row]
            window = tail + piece
            # Only matches that end inside the new piece count; older ones were checked before.
            hit.append(
                bool(piece) and any(window.find(s, max(len(tail) - len(s) + 1, 0)) >= 0 for s in self.stops)
            )
            self.tails[row] = window[-self.keep :] if self.keep else ""
        return hit
