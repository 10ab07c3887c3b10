"""lm-evaluation-harness backend ``neoxja``: run lm-eval's tasks on neoxja's model and tokenizer.

Importing this module registers :class:`NeoXJaLM` in lm-eval's model registry under ``neoxja``, so
``lm_eval.simple_evaluate(model="neoxja", model_args="pretrained=DIR,dtype=float32")`` works, as does
passing an instance (``simple_evaluate(model=NeoXJaLM(pretrained=model, tokenizer=tokenizer))``).

The three request types follow lm-eval's own ``hf`` model (``HFLM``) so that scores are comparable:

* ``loglikelihood``: lm-eval's ``TemplateLM`` splits each (context, continuation) into tokens (trailing
  spaces of the context move to the continuation; an empty context becomes the BOS token); the model
  sees ``(context + continuation)[-(max_length + 1):][:-1]``, i.e. long inputs lose tokens on the left;
  the answer is the summed log-probability of the continuation tokens and whether each of them is
  the argmax.
* ``loglikelihood_rolling``: the text is cut into lm-eval's disjoint rolling windows of ``max_length``
  tokens (the first one starts from the BOS token) and their log-likelihoods are summed.
* ``generate_until``: requests with the same generation settings are batched (longest first, left
  padded, each context keeping its last ``max_length - max_gen_toks`` tokens); decoding is greedy
  unless the task asks for sampling; a row stops at eos, after ``max_gen_toks`` tokens, or once its
  new text contains a stop sequence (``until``, plus the eos token's text); the text is cut at the
  first stop sequence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

try:
    # lm-eval fills its registry with its own model names only while the registry is empty; importing
    # lm_eval.models first keeps them ("hf", "vllm", ...) reachable after "neoxja" is registered.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    if err.name is None or not err.name.startswith("lm_eval"):
        raise
    raise ModuleNotFoundError(
        "neoxja.evaluation.harness needs lm-eval: pip install 'neoxja[eval]'", name=err.name
    ) from err

import torch
from tqdm import tqdm

from neoxja.evaluation.options import DEFAULT_MAX_GEN_TOKS, generation_settings
from neoxja.hub import DEFAULT_MODEL

__all__ = ["DEFAULT_MAX_GEN_TOKS", "NeoXJaLM"]


T = TypeVar("T")
# (cache key or None, context ids, continuation ids): what TemplateLM hands to _loglikelihood_tokens.
TokenRequest = tuple[Any, list[int], list[int]]


def _sorted_batches(items: Sequence[T], key: Callable[[T], Any], size: int) -> list[list[int]]:
    """Indices of ``items`` sorted by ``key``, in batches of ``size``; results are put back by index."""
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def _positive_int(name: str, value: int | str) -> int:
    """A count given as a model argument (an int, or digits from lm-eval's ``model_args`` string)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_model("neoxja")
class NeoXJaLM(TemplateLM):
    """neoxja's GPT-NeoX-Japanese as an lm-eval model.

    Args:
        pretrained: a Hub id or model directory, or an already loaded neoxja causal LM.
        tokenizer: a tokenizer (object, directory or Hub id); default: the model's own directory.
        device: where to load ``pretrained`` (``"cpu"``, ``"cuda:0"``, ``0``, ...; default: a GPU if
            there is one); a loaded model is moved there only when given.
        dtype: weights' dtype (``"float32"``, ``"bfloat16"``, ``"auto"``; default: float32 on the CPU,
            as stored elsewhere); a loaded model is cast only when given.
        batch_size: requests per forward pass / per ``generate`` call.
        max_length: context length in tokens (default: the model's ``max_position_embeddings``).
        max_gen_toks: new tokens for ``generate_until`` when the task does not say (default 256).
        quantize: load ``pretrained``'s linear layers in this format (``"nf4"``, ``"fp4"``, ``"int8"``,
            ``"bfloat16"``; ``weight_format=`` of ``from_pretrained``); default: as saved.
        progress: progress bars over the requests: True always (as lm-eval's own models), None only
            when stderr is a terminal (``neoxja eval``), False never.
    """

    def __init__(
        self,
        pretrained: Any = DEFAULT_MODEL,
        tokenizer: Any = None,
        device: Any = None,
        dtype: Any = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        quantize: str | None = None,
        progress: bool | None = True,
    ) -> None:
        super().__init__()
        from neoxja.devices import resolve_device
        from neoxja.pipelines import load_model_and_tokenizer

        self.batch_size = _positive_int("batch_size", batch_size)  # "auto" (HFLM's search) is not offered
        self._max_length = None if max_length is None else _positive_int("max_length", max_length)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.progress = progress
        extra = {} if quantize is None else {"weight_format": quantize}
        if isinstance(pretrained, (str, os.PathLike)):
            target = resolve_device(device, default="auto")
            dtype = dtype or ("float32" if target.type == "cpu" else "auto")
        else:
            if quantize is not None:
                raise ValueError(
                    "quantize= applies to a model loaded here: pass pretrained= a directory or Hub id"
                )
            target = None if device is None else resolve_device(device)
        model, self.tokenizer = load_model_and_tokenizer(
            pretrained, tokenizer, dtype=dtype, device=target, **extra
        )
        self.model = model.eval()
        self._device = self.model.device

    def _bar(self, total: int, description: str, disable_tqdm: bool) -> tqdm:
        """A bar over ``total`` requests, shown as ``progress`` and lm-eval's ``disable_tqdm`` say."""
        if disable_tqdm or self.progress is False:
            disable: bool | None = True
        else:
            disable = None if self.progress is None else False  # None: tqdm checks for a terminal
        return tqdm(total=total, disable=disable, desc=description)

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        """The end-of-text id (eos), added to every request's stop sequences."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS (eos if the tokenizer has none), as in HFLM."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        """Tokens the model sees at once."""
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        """Names the request cache of lm-eval's ``--cache_requests``."""
        name = str(getattr(self.tokenizer, "name_or_path", "") or "neoxja")
        return name.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the results' ``config`` by ``simple_evaluate``."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_name_or_path": getattr(self.model.config, "_name_or_path", None),
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Text -> ids. The tokenizer never adds BOS/EOS, so ``add_special_tokens`` changes nothing."""
        return self.tokenizer.encode(string)

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether it is the greedy one) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = _sorted_batches(
            requests, lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])), self.batch_size
        )
        pad = self.tokenizer.pad_token_id or 0
        with self._bar(len(requests), "neoxja loglikelihood", disable_tqdm) as bar:
            for batch in batches:
                rows, spans = [], []
                for i in batch:
                    _, context, continuation = requests[i]
                    if not context or not continuation:
                        raise ValueError("loglikelihood needs a non-empty context and continuation")
                    if len(continuation) > self.max_length:
                        raise ValueError(
                            f"a continuation of {len(continuation)} tokens does not fit in max_length "
                            f"{self.max_length}"
                        )
                    ids = (context + continuation)[-(self.max_length + 1) :][:-1]
                    rows.append(ids)
                    spans.append((len(ids) - len(continuation), len(ids)))
                width = max(len(ids) for ids in rows)
                inputs = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows], device=self.device)
                # Right padding cannot change a causal model's earlier logits; only the scored positions
                # (from the earliest continuation start to the end) go through the LM head.
                keep = width - min(start for start, _ in spans)
                logits = self.model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits
                for row, i in enumerate(batch):
                    start, end = spans[row]
                    scores = logits[row, start - width + keep : end - width + keep].float().log_softmax(-1)
                    target = torch.tensor(requests[i][2], device=self.device)
                    greedy = bool((scores.argmax(-1) == target).all())
                    answer = (float(scores.gather(-1, target[:, None]).sum()), greedy)
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, over disjoint windows of ``max_length`` tokens."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = self._loglikelihood_tokens(windows, disable_tqdm)
        for index, (logprob, _) in zip(owners, scores, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop sequence, eos or ``max_gen_toks`` new tokens."""
        results: list[str | None] = [None] * len(requests)
        groups: list[tuple[dict, list[int]]] = []  # requests that share their generation settings
        for index, request in enumerate(requests):
            settings = request.args[1]
            for known, members in groups:
                if known == settings:
                    members.append(index)
                    break
            else:
                groups.append((settings, [index]))
        with self._bar(len(requests), "neoxja generate_until", disable_tqdm) as bar:
            for settings, members in groups:
                until, generate_kwargs = self._generation_settings(settings)
                contexts = [requests[i].args[0] for i in members]
                encoded = [self.tok_encode(text) for text in contexts]
                for batch in _sorted_batches(
                    list(zip(encoded, contexts, strict=True)), lambda p: (-len(p[0]), p[1]), self.batch_size
                ):
                    texts = self._generate([encoded[j] for j in batch], until, generate_kwargs)
                    for j, text in zip(batch, texts, strict=True):
                        results[members[j]] = text
                        self.cache_hook.add_partial("generate_until", (contexts[j], settings), text)
                        bar.update(1)
        return results  # type: ignore[return-value]

    def _generation_settings(self, settings: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """A request's ``gen_kwargs`` -> (stop sequences, ``model.generate`` keyword arguments)."""
        until, kwargs = generation_settings(settings, self.max_gen_toks)
        eos = self.tokenizer.decode([self.eot_token_id])
        if eos not in until:
            until.append(eos)
        if self.max_length - kwargs["max_new_tokens"] <= 0:
            raise ValueError(
                f"max_gen_toks={kwargs['max_new_tokens']} leaves no room for a context in max_length "
                f"{self.max_length}"
            )
        return until, kwargs

    @torch.inference_mode()
    def _generate(self, encoded: list[list[int]], until: list[str], kwargs: dict[str, Any]) -> list[str]:
        """One batch: left-pad the contexts (each cut to its last tokens), generate, decode and cut."""
        keep = self.max_length - kwargs["max_new_tokens"]
        rows = [ids[-keep:] for ids in encoded]
        width = max(len(ids) for ids in rows)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eot_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=self.device)
        stop = _StopAtText(self.tokenizer, until, len(rows), width, self.eot_token_id)
        output = self.model.generate(
            input_ids,
            attention_mask=mask,
            pad_token_id=pad,
            eos_token_id=self.eot_token_id,
            logits_processor=[stop],
            **kwargs,
        )
        texts = []
        for ids in output[:, width:].tolist():
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for sequence in until:
                if sequence:
                    text = text.split(sequence)[0]
            texts.append(text)
        return texts


class _StopAtText:
    """Logits processor: once a row's new text holds a stop sequence, its next token is forced to eos.

    Only text generated after the prompt counts (a stop sequence that starts in the prompt does not), as
    in lm-eval's ``hf`` model; its text is what ``decode(new ids, skip_special_tokens=True)`` gives,
    built token by token with the tokenizer's streaming detokenizer.
    """

    def __init__(self, tokenizer: Any, stops: list[str], batch: int, prompt_width: int, eos_id: int) -> None:
        from neoxja.streamers import make_detokenizer

        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1  # text a match may start in
        self.width = prompt_width
        self.eos_id = eos_id
        self.detokenizers = [make_detokenizer(tokenizer, skip_special_tokens=True) for _ in range(batch)]
        self.tails = [""] * batch
        self.stopped = [False] * batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] <= self.width:  # the prompt: nothing generated yet
            return scores
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.stopped[row]:
                window = self.tails[row] + self.detokenizers[row].add(token)
                self.stopped[row] = any(s in window for s in self.stops)
                self.tails[row] = window[-self.keep :] if self.keep else ""
            if self.stopped[row]:
                scores[row] = -math.inf
                scores[row, self.eos_id] = 0.0
        return scores
