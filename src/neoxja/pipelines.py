"""``pipeline("text-generation", ...)``: prompt in, ``[{"generated_text": ...}]`` out, as in the seed.

The pipeline is a thin layer over the tokenizer and ``model.generate``: it loads both (from a Hub
id, a directory or objects you pass), moves the model to ``device``, encodes each prompt, calls
``generate`` with your keyword arguments and decodes. Its results have the shape transformers'
pipeline returns: one list of dicts per prompt, one dict per returned sequence.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from neoxja.devices import resolve_device, resolve_dtype
from neoxja.generation_config import TEXT_GENERATION_DEFAULTS
from neoxja.hub import DEFAULT_MODEL

SUPPORTED_TASKS = ("text-generation",)

# What the pipeline passes to ``generate`` unless the call sets it (transformers' pipeline uses the
# same defaults for free-form text generation); sampling-only values are dropped when not sampling.
PIPELINE_DEFAULTS: dict[str, Any] = dict(TEXT_GENERATION_DEFAULTS)
SAMPLING_ARGS = ("temperature", "top_k", "top_p")


def load_model_and_tokenizer(
    model: Any, tokenizer: Any = None, *, dtype: Any = None, device: Any = None, **model_kwargs: Any
) -> tuple[Any, Any]:
    """Load (or take) a causal LM and its tokenizer; ``model`` is a Hub id, a directory or a model.

    A model directory without ``vocab.txt``/``emoji.json`` is an error that says to pass
    ``tokenizer=`` (or ``--tokenizer``) rather than a failure deep inside the tokenizer.
    """
    from neoxja.auto import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    target = resolve_device(device) if device is not None else None
    if isinstance(model, (str, os.PathLike)):
        source = model
        kwargs = dict(model_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if target is not None:
            kwargs["device"] = target
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    else:
        source = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
        if isinstance(dtype, torch.dtype) or target is not None:
            model = model.to(device=target, dtype=dtype if isinstance(dtype, torch.dtype) else None)
    if tokenizer is None:
        if not source:
            raise ValueError("tokenizer= is required when model= is a model object without a name_or_path")
        tokenizer = source
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of a directory or Hub id, or an error saying how to pass one if it has none."""
    from neoxja.auto import AutoTokenizer
    from neoxja.hub import resolve_file

    if resolve_file(name_or_path, "vocab.txt") is None:
        raise OSError(
            f"{str(name_or_path)!r} has no tokenizer files (vocab.txt, emoji.json); pass the tokenizer "
            f"explicitly (tokenizer= in Python, --tokenizer DIR on the command line)"
        )
    return AutoTokenizer.from_pretrained(name_or_path)


class TextGenerationPipeline:
    """Continue Japanese text: ``pipe("人とAIが協調するためには、")`` -> ``[{"generated_text": ...}]``.

    Keyword arguments given at construction are defaults for every call; those given to a call
    override them. Besides the pipeline's own ``return_full_text``, ``return_tensors``,
    ``skip_special_tokens``, ``clean_up_tokenization_spaces``, ``prefix`` and ``stop_sequence``
    (text that ends generation, kept in the output), every keyword goes to
    ``model.generate`` (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``num_return_sequences``, ``num_beams``, ``length_penalty``,
    ``early_stopping``, ``prompt_lookup_num_tokens``, ``max_matching_ngram_size``, ``streamer``, ...).
    ``assistant_model`` is a model or a directory/Hub id, loaded once on the model's device and dtype
    (as transformers' pipeline does). With ``return_dict_in_generate=True`` each text record also
    holds its sequence's share of the per-sequence outputs (``sequences_scores``, ``beam_indices``,
    ``scores``, ``logits``, as lists), as in transformers.
    """

    task = "text-generation"

    def __init__(self, model: Any, tokenizer: Any, device: Any = None, **kwargs: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if device is not None:
            self.model.to(resolve_device(device))
        self.model.eval()
        self._assistants: dict[str, Any] = {}
        if kwargs.get("assistant_model") is not None:
            kwargs["assistant_model"] = self._assistant(kwargs["assistant_model"])
        self._call_defaults = kwargs

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so the inputs) live."""
        return next(self.model.parameters()).device

    def _assistant(self, assistant: Any) -> Any:
        """An assistant model given by name loaded (once) like the model, on its device and dtype; a
        model object as it is."""
        if not isinstance(assistant, (str, os.PathLike)):
            return assistant
        key = os.fspath(assistant)
        if key not in self._assistants:
            # The model's float dtype (a quantized model's packed weights are not what to load in).
            loaded, _ = load_model_and_tokenizer(
                key, self.tokenizer, dtype=self.model.dtype, device=self.model.device
            )
            self._assistants[key] = loaded.eval()
        return self._assistants[key]

    def __call__(self, text_inputs: str | list[str], **kwargs: Any) -> list:
        """Generate for one prompt (-> list of dicts) or a list of prompts (-> list of lists of dicts).

        ``batch_size`` > 1 (default 1; also accepted by :func:`pipeline`) runs that many prompts of a
        list through ``generate`` together, left-padded; greedy results equal one at a time.
        """
        options = {**self._call_defaults, **kwargs}
        if options.get("assistant_model") is not None:
            options["assistant_model"] = self._assistant(options["assistant_model"])
        batch_size = options.pop("batch_size", 1)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(text_inputs, str):
            if not text_inputs:
                raise ValueError("text_inputs: the prompt is empty; give some text for the model to continue")
            return self._generate([text_inputs], **options)[0]
        if isinstance(text_inputs, (list, tuple)) and all(isinstance(text, str) for text in text_inputs):
            if not text_inputs:
                raise ValueError("text_inputs is an empty list; pass a prompt string or a list of them")
            empty = [i for i, text in enumerate(text_inputs) if not text]
            if empty:
                raise ValueError(
                    f"text_inputs: the prompt at index {empty[0]} is empty; give some text for the model "
                    "to continue"
                )
            results = []
            for start in range(0, len(text_inputs), batch_size):
                results.extend(self._generate(list(text_inputs[start : start + batch_size]), **options))
            return results
        raise TypeError(
            f"text_inputs must be a string or a list of strings, not {type(text_inputs).__name__}"
        )

    def _generate(
        self,
        prompts: list[str],
        *,
        return_full_text: bool = True,
        return_tensors: bool = False,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
        prefix: str = "",
        stop_sequence: str | list[str] | None = None,
        **generate_kwargs: Any,
    ) -> list[list[dict[str, Any]]]:
        """One ``generate`` call for ``prompts``; a list of records per prompt."""
        if stop_sequence is not None:
            generate_kwargs["stop_strings"] = stop_sequence
        if generate_kwargs.get("stop_strings") is not None:
            generate_kwargs.setdefault("tokenizer", self.tokenizer)
        texts = [prefix + prompt for prompt in prompts]
        if len(texts) == 1:
            encoded = self.tokenizer(texts[0], return_tensors="pt")
        else:
            encoded = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded["attention_mask"].to(self.device)
        generate_kwargs = self._with_defaults(generate_kwargs)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )
        sequences, per_row = output, {}
        if not isinstance(output, torch.Tensor):  # return_dict_in_generate
            sequences = output.sequences
            per_row = _per_sequence_outputs(output, sequences.shape[0])
        prompt_length = input_ids.shape[-1]
        padding = [prompt_length - int(n) for n in attention_mask.sum(-1).tolist()]
        copies = sequences.shape[0] // len(prompts)
        eos = self._eos_ids(generate_kwargs)
        results: list[list[dict[str, Any]]] = [[] for _ in prompts]
        for row, sequence in enumerate(sequences.tolist()):
            prompt = prompts[row // copies]
            new = sequence[prompt_length:]
            # generate() pads a row that ended before the others: keep it up to its eos.
            end = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
            new = new[:end]
            if return_tensors:
                unpadded_prompt = sequence[padding[row // copies] : prompt_length]
                results[row // copies].append({"generated_token_ids": unpadded_prompt + new})
                continue
            decode_kwargs = {"skip_special_tokens": skip_special_tokens}
            if clean_up_tokenization_spaces is not None:
                decode_kwargs["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
            text = self.tokenizer.decode(new, **decode_kwargs)
            record = {"generated_text": prompt + text if return_full_text else text}
            record.update({key: values[row] for key, values in per_row.items()})
            results[row // copies].append(record)
        return results

    def _eos_ids(self, generate_kwargs: dict[str, Any]) -> set[int]:
        """The end-of-sequence ids ``generate`` stops at with these arguments (as it resolves them)."""
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        ids = generate_kwargs.get("eos_token_id", config.eos_token_id)
        if ids is None:
            return set()
        return {ids} if isinstance(ids, int) else set(ids)

    def _with_defaults(self, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Add the pipeline's defaults for what the call leaves unset (cf. transformers' pipeline)."""
        added = {key: value for key, value in PIPELINE_DEFAULTS.items() if key not in generate_kwargs}
        if "max_length" in generate_kwargs:
            added.pop("max_new_tokens", None)
        if not {**added, **generate_kwargs}.get("do_sample"):
            added = {key: value for key, value in added.items() if key not in SAMPLING_ARGS}
        pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_token_id is not None and "pad_token_id" not in generate_kwargs:
            added["pad_token_id"] = pad_token_id
        return {**generate_kwargs, **added}


def _per_sequence_outputs(output: Any, rows: int) -> dict[str, list]:
    """The fields of a ``return_dict_in_generate`` output that have one entry per returned sequence,
    split by sequence (as transformers' pipeline adds them to its records): a tensor of ``rows``
    rows, or a tuple of per-step tensors of ``rows`` rows (stacked by step). Per-beam step scores of
    beam search (batch x beams rows) follow no returned sequence and are left out, as in transformers."""
    fields: dict[str, list] = {}
    for key, value in output.items():
        if key == "sequences" or value is None:
            continue
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            value = torch.stack(value, dim=1) if value[0].shape[0] == rows else None
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            fields[key] = value.tolist()
    return fields


def pipeline(
    task: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    *,
    dtype: Any = None,
    torch_dtype: Any = None,
    device: int | str | torch.device | None = None,
    **kwargs: Any,
) -> TextGenerationPipeline:
    """Build a pipeline for ``task`` (only ``"text-generation"``), as ``transformers.pipeline`` does.

    ``model`` is a Hub id, a local directory or a loaded model (default: the 2.7B Hub model);
    ``tokenizer`` likewise (default: the model's own). ``dtype`` (``torch.float16``, ``"bfloat16"``,
    ...) and ``device`` (``0`` -> ``cuda:0``, ``-1`` -> cpu, ``"cuda:1"``, ``"auto"``, ``torch.device``;
    ``None`` leaves the model where loading put it: the CPU) apply to the loaded model; see
    :mod:`neoxja.devices`. Other keywords become defaults for every call (e.g. ``max_new_tokens``).
    """
    task = task or "text-generation"
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"task={task!r} is not supported; neoxja supports: {', '.join(SUPPORTED_TASKS)}")
    if dtype is not None and torch_dtype is not None:
        raise ValueError("pass dtype= or its old name torch_dtype=, not both")
    dtype = dtype if dtype is not None else torch_dtype
    model_kwargs = kwargs.pop("model_kwargs", None) or {}
    model, tokenizer = load_model_and_tokenizer(
        DEFAULT_MODEL if model is None else model, tokenizer, dtype=dtype, device=device, **model_kwargs
    )
    return TextGenerationPipeline(model, tokenizer, **kwargs)
