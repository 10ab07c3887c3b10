"""Text generation: ``model.generate(input_ids, ...)`` with transformers' arguments and defaults.

The decoding loop is built for speed on small batches:

* the prompt goes through the model once (prefill) into a preallocated :class:`~neoxja.cache.KVCache`
  sized for the whole generation, then each step feeds exactly one token per row;
* the output ids, the attention mask and the position ids live in buffers allocated once; each step
  passes views of them, so nothing is concatenated and the Python work per step does not grow with
  the sequence;
* without padding the model gets ``attention_mask=None`` (its fast causal path); with left padding it
  gets the 2-D mask over past + current tokens and position ids counted from the first real token;
* only the last position's logits are computed (``logits_to_keep=1``);
* on the CPU in float32, every step after the prompt is one C call over the whole model
  (:mod:`neoxja.cpu_decode`), which for greedy decoding also writes the chosen ids in place.

The choice of the next token is a :class:`~neoxja.sample_utils.Sampler` (processors + picker), so
the same loop serves greedy decoding, sampling and custom processors.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from neoxja.sample_utils import Processor, Sampler, greedy, make_sampler

GENERATION_CONFIG_NAME = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 20  # what transformers generates when neither max_length nor max_new_tokens is set


@dataclass
class GenerationConfig:
    """Decoding settings, named and defaulted as in transformers' ``GenerationConfig``.

    ``max_length`` counts prompt + new tokens, ``max_new_tokens`` only new ones (it wins when both are
    set). With neither set, 20 new tokens are generated (capped at ``max_position_embeddings``).
    ``top_k``/``top_p``/``temperature`` only act when ``do_sample=True``. Keys this class does not know
    (e.g. from a transformers ``generation_config.json``) are kept in ``extra`` and written back.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The settings ``generate`` accepts as keyword arguments."""
        return frozenset(f.name for f in fields(cls)) - {"extra"}

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The special token ids of a model config (what transformers does without generation_config.json)."""
        return cls(
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        """Build from a dict; unknown keys go to ``extra``."""
        known = cls.field_names()
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.extra = {k: v for k, v in values.items() if k not in known and k != "extra"}
        return config

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> GenerationConfig:
        """Read ``generation_config.json`` from a directory or Hub id (Hub options as in from_pretrained)."""
        from neoxja.hub import HubOptions, resolve_file

        options = HubOptions.pop_from(kwargs)
        path = resolve_file(name_or_path, GENERATION_CONFIG_NAME, options)
        if path is None:
            raise OSError(f"{name_or_path} has no {GENERATION_CONFIG_NAME}")
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        return cls.from_dict({**values, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting plus the ``extra`` keys."""
        values = asdict(self)
        extra = values.pop("extra")
        return {**values, **extra}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``generation_config.json`` (only the settings that differ from the defaults)."""
        default = GenerationConfig().to_dict()
        values = {k: v for k, v in self.to_dict().items() if k not in default or default[k] != v}
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / GENERATION_CONFIG_NAME
        path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known settings in place and return the keyword arguments that are not settings."""
        known = self.field_names()
        for key, value in kwargs.items():
            if key in known:
                setattr(self, key, value)
        return {k: v for k, v in kwargs.items() if k not in known}

    def validate(self) -> None:
        """Raise ValueError naming the first setting whose value cannot work."""
        if self.temperature is None or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.do_sample and self.temperature == 0:
            raise ValueError(
                "temperature must be > 0 when do_sample=True; for greedy decoding use do_sample=False"
            )
        if self.top_p is None or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.repetition_penalty is None or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}"
            )
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("min_length", "min_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(
                f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}"
            )
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs do_sample=True: "
                "greedy decoding would return the same sequence each time"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _warn_unused_sampling_flags(config: GenerationConfig) -> None:
    if config.do_sample:
        return
    default = GenerationConfig()
    unused = [
        name for name in ("temperature", "top_p", "top_k") if getattr(config, name) != getattr(default, name)
    ]
    if unused:
        warnings.warn(
            f"do_sample=False, so these sampling settings are ignored: {', '.join(unused)}. "
            "Set do_sample=True to sample.",
            UserWarning,
            stacklevel=4,
        )


@dataclass
class _Plan:
    """Everything the decoding loop needs, checked and resolved once per call."""

    input_ids: torch.Tensor  # [batch, prompt_len], already repeated for num_return_sequences
    attention_mask: torch.Tensor | None  # None when no row is padded
    max_length: int  # total length of the output buffer
    sampler: Sampler
    eos: torch.Tensor | None  # [n_eos]
    pad_token_id: int
    stop_strings: _StopStrings | None


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _plan(
    model: Any,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    logits_processor: Sequence[Processor] = (),
) -> _Plan:
    device = model.device
    if input_ids is None:
        bos = config.bos_token_id
        if bos is None:
            raise ValueError("input_ids is required (the model config has no bos_token_id to start from)")
        input_ids = torch.tensor([[bos]], dtype=torch.long, device=device)
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    batch, prompt_len = input_ids.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt token"
        )
    vocab_size = model.config.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    context = model.config.max_position_embeddings
    if prompt_len > context:
        raise ValueError(
            f"input_ids has {prompt_len} tokens, more than the model's max_position_embeddings ({context})"
        )

    config.validate()
    _warn_unused_sampling_flags(config)

    # Total length, as transformers resolves it.
    if config.max_new_tokens is not None:
        if config.max_length is not None:
            warnings.warn(
                "both max_new_tokens and max_length are set; max_new_tokens wins", UserWarning, stacklevel=3
            )
        max_length = prompt_len + config.max_new_tokens
        if max_length > context:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} with a prompt of {prompt_len} tokens exceeds "
                f"the model's max_position_embeddings ({context}); at most {context - prompt_len} fit"
            )
    elif config.max_length is not None:
        max_length = config.max_length
        if max_length > context:
            raise ValueError(
                f"max_length={max_length} exceeds the model's max_position_embeddings ({context})"
            )
        if prompt_len >= max_length:
            raise ValueError(
                f"input_ids has {prompt_len} tokens but max_length is {max_length}: nothing left to "
                "generate; raise max_length or set max_new_tokens"
            )
    else:
        max_length = min(prompt_len + DEFAULT_MAX_NEW_TOKENS, context)
        warnings.warn(
            f"neither max_new_tokens nor max_length is set: generating at most {DEFAULT_MAX_NEW_TOKENS} "
            f"new tokens (max_length={max_length}). Set max_new_tokens to choose the length.",
            UserWarning,
            stacklevel=3,
        )
        if prompt_len >= max_length:
            raise ValueError(
                f"input_ids has {prompt_len} tokens, the whole context ({context}): no room for new tokens"
            )

    eos = _eos_tensor(config.eos_token_id, device)
    pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0

    if (
        attention_mask is None
        and config.pad_token_id is not None
        and (eos is None or pad_token_id not in eos)
    ):
        # Like transformers: a pad id that is not also eos marks padding when no mask is given.
        if bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}: they must match"
            )
        attention_mask = attention_mask.long()
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "attention_mask has padding at the end of a row: decoder-only generation needs left padding "
                "(tokenizer padding_side='left')"
            )
        if bool(attention_mask.all()):
            attention_mask = None

    copies = config.num_return_sequences
    if copies > 1:
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(copies, dim=0)

    min_length = config.min_length or 0
    if config.min_new_tokens is not None:
        min_length = prompt_len + config.min_new_tokens
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        generator = torch.Generator(device=device).manual_seed(seed)
    prompt_padding = None
    if attention_mask is not None and config.repetition_penalty != 1.0:
        prompt_padding = (attention_mask != 0).int().argmax(dim=1)
    sampler = make_sampler(
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        min_length=min_length,
        eos_token_id=eos,
        prompt_padding=prompt_padding,
        generator=generator,
        extra_processors=logits_processor,
    )

    stop_strings = None
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        stop_strings = _StopStrings(tokenizer, stops, input_ids, attention_mask)
    return _Plan(input_ids, attention_mask, max_length, sampler, eos, pad_token_id, stop_strings)


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
        from neoxja.streamers import make_detokenizer

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
    from neoxja.cache import KVCache
    from neoxja.cpu_decode import fused_decoder
    from neoxja.linear import no_auto_packing

    batch, prompt_len = plan.input_ids.shape
    max_length = plan.max_length
    device = tokens.device
    tokens[:, :prompt_len] = plan.input_ids
    cache = KVCache(model.config, batch, max_length, dtype=model.dtype, device=device)

    mask = positions = next_position = None
    if plan.attention_mask is not None:
        mask = torch.ones(batch, max_length, dtype=torch.long, device=device)
        mask[:, :prompt_len] = plan.attention_mask
        positions = (plan.attention_mask.cumsum(-1) - 1).masked_fill_(plan.attention_mask == 0, 0)
        next_position = plan.attention_mask.sum(-1, keepdim=True)  # position of the first new token

    # The stop bookkeeping is plain Python on one list of ids per step (one device sync, no small
    # kernels); the device mask that pads finished rows exists only once a row has finished.
    eos_ids = set(plan.eos.tolist()) if plan.eos is not None else set()
    may_stop = bool(eos_ids) or plan.stop_strings is not None
    unfinished = [True] * batch
    finished_mask = None  # [batch] bool on the device, True where the row still runs
    pad = torch.tensor(plan.pad_token_id, dtype=torch.long, device=device)
    sampler = plan.sampler

    # On the CPU in float32, each decoding step is one C call over the dense weights (see
    # neoxja.cpu_decode); the prompt then runs without packing them for oneDNN. For greedy decoding
    # the C step also writes the argmax straight into the output buffer.
    decoder = fused_decoder(model, cache, max_length)
    fused_greedy = decoder is not None and sampler.pick is greedy and not sampler.processors

    def scores_of(
        ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The PyTorch forward: float32 scores [batch, vocab] of the last position."""
        return (
            model(
                ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits.select(1, -1)
            .float()
        )

    with no_auto_packing() if decoder is not None else nullcontext():
        scores = scores_of(plan.input_ids, None if mask is None else mask[:, :prompt_len], positions)
    picked = False  # whether the last step already chose the tokens (into tokens[:, length])
    length = prompt_len
    while True:
        column = tokens.select(1, length)
        next_tokens = column if picked else sampler(tokens.narrow(1, 0, length), scores)
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
        if decoder is not None:
            scores = decoder.step(
                tokens.select(1, length - 1),
                positions=next_position,
                position_delta=length - 1 - prompt_len,
                mask=mask,
                argmax_out=tokens.select(1, length) if fused_greedy else None,
            )
            picked = fused_greedy
            continue
        scores = scores_of(
            tokens.narrow(1, length - 1, 1),
            None if mask is None else mask.narrow(1, 0, length),
            next_position,
        )
        if next_position is not None:
            next_position += 1


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
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``,
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
    from neoxja.streamers import make_detokenizer

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
