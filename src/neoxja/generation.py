"""Text generation: ``model.generate(input_ids, ...)`` with transformers' arguments and defaults.

A call goes through named steps: the settings are merged and validated (:class:`GenerationConfig`),
the prompt is checked (:func:`_prompt_ids`), the total length resolved (:func:`_total_length`), the
padding mask worked out (:func:`_padding_mask`), the processors and picker built
(:func:`_sampler`); then :func:`_decode_steps` runs the loop. The loop is built for speed on small
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
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neoxja.cache import KVCache
from neoxja.decoding import start_decoding
from neoxja.generation_config import GENERATION_CONFIG_NAME, GenerationConfig, check_seed
from neoxja.network import check_token_ids
from neoxja.sample_utils import Processor, Sampler, make_sampler
from neoxja.streamers import make_detokenizer

__all__ = ["GENERATION_CONFIG_NAME", "GenerationConfig", "GenerationMixin", "stream_generate"]

DEFAULT_MAX_NEW_TOKENS = 20  # what transformers generates when neither max_length nor max_new_tokens is set


@dataclass
class _Plan:
    """Everything the decoding loop needs, checked and resolved once per call."""

    input_ids: torch.Tensor  # [batch, prompt_len], already repeated for num_return_sequences
    attention_mask: torch.Tensor | None  # None when no row is padded
    max_length: int  # total length of the output buffer
    sampler: Sampler
    eos_ids: list[int]
    pad_token_id: int
    stop_strings: _StopStrings | None


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
    seed: int | None,
    logits_processor: Sequence[Processor],
) -> Sampler:
    """The processors and picker of these settings (seeded when ``seed`` or ``generator`` is given)."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        generator = torch.Generator(device=device).manual_seed(check_seed(seed))
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
    )


def _plan(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    config: GenerationConfig,
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    logits_processor: Sequence[Processor] = (),
) -> _Plan:
    """Check and resolve everything one generation needs, in the named steps above."""
    config.validate()
    config.warn_unused_sampling_flags(stacklevel=4)
    input_ids = _prompt_ids(model, input_ids, config)
    prompt_len = input_ids.shape[1]
    max_length = _total_length(config, prompt_len, model.config.max_position_embeddings)
    eos_ids = config.eos_ids()
    pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    attention_mask = _padding_mask(input_ids, attention_mask, config, eos_ids)
    copies = config.num_return_sequences
    if copies > 1:
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(copies, dim=0)
    sampler = _sampler(
        config, prompt_len, attention_mask, eos_ids, input_ids.device, generator, seed, logits_processor
    )
    stop_strings = None
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        stop_strings = _StopStrings(tokenizer, stops, input_ids, attention_mask)
    return _Plan(input_ids, attention_mask, max_length, sampler, eos_ids, pad_token_id, stop_strings)


class _StopStrings:
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


@torch.inference_mode()
def _decode_steps(model: Any, plan: _Plan, tokens: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
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

    mask = positions = prompt_mask = prompt_positions = None
    if plan.attention_mask is not None:
        mask = torch.ones(batch, max_length, dtype=torch.long, device=device)
        mask[:, :prompt_len] = plan.attention_mask
        prompt_mask = mask[:, :prompt_len]
        prompt_positions = (plan.attention_mask.cumsum(-1) - 1).masked_fill_(plan.attention_mask == 0, 0)
        positions = plan.attention_mask.sum(-1, keepdim=True)  # [batch, 1]: the next token's position

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
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Continue ``input_ids`` [batch, len]; return prompt + continuation, [batch * copies, len'].

        Keyword settings are those of :class:`GenerationConfig` (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``no_repeat_ngram_size``,
        ``min_new_tokens``, ``eos_token_id``, ``pad_token_id``, ``num_return_sequences``,
        ``stop_strings`` (with ``tokenizer=``), ...); they override ``generation_config``, which
        defaults to ``model.generation_config``. Batched prompts must be left-padded with their
        ``attention_mask``. Rows that end early are filled with ``pad_token_id`` (eos if unset).
        ``num_return_sequences`` gives the number of copies per prompt (sampling only).
        ``streamer`` (batch 1) receives the prompt, then each new token, then ``end()``. ``seed`` or
        ``generator`` make sampling reproducible; without them torch's global RNG is used.
        """
        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompt once: either positionally (inputs) or as input_ids")
        config = _resolve_config(self, generation_config, kwargs)
        with torch.no_grad():
            plan = _plan(
                self,
                inputs if inputs is not None else input_ids,
                attention_mask,
                config,
                tokenizer=tokenizer,
                generator=generator,
                seed=seed,
                logits_processor=logits_processor,
            )
        if streamer is not None and plan.input_ids.shape[0] != 1:
            raise ValueError(f"streamer supports a single sequence, got a batch of {plan.input_ids.shape[0]}")
        tokens = torch.empty(plan.input_ids.shape[0], plan.max_length, dtype=torch.long, device=self.device)
        if streamer is not None:
            streamer.put(plan.input_ids.cpu())
        length = plan.input_ids.shape[1]
        try:
            for step_length, next_tokens in _decode_steps(self, plan, tokens):
                length = step_length
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
        finally:
            if streamer is not None:
                streamer.end()
        return tokens[:, :length].clone()


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
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` (text or ids) as text pieces, as soon as each is complete.

    Pieces never split a character (byte-fallback tokens are held until their character is whole);
    joined they equal ``tokenizer.decode(new_ids, skip_special_tokens=...)``. Settings as in ``generate``.
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
        plan = _plan(
            model,
            input_ids,
            None,
            config,
            tokenizer=tokenizer,
            generator=generator,
            seed=seed,
            logits_processor=logits_processor,
        )
    if plan.input_ids.shape[0] != 1:
        raise ValueError(
            f"stream_generate continues a single prompt, got a batch of {plan.input_ids.shape[0]}"
        )
    tokens = torch.empty(1, plan.max_length, dtype=torch.long, device=model.device)
    for _, next_tokens in _decode_steps(model, plan, tokens):
        piece = detokenizer.add(int(next_tokens[0]))
        if piece:
            yield piece
    tail = detokenizer.finish()
    if tail:
        yield tail
