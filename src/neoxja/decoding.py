"""Decoding backends: how one generation step turns the newest tokens into the next ones.

``generate()``'s loop (:mod:`neoxja.generation`) calls one interface, :class:`DecodingBackend`:

* :meth:`~DecodingBackend.prefill` runs the prompt into the generation's
  :class:`~neoxja.cache.KVCache` and returns the first new token of each row;
* :meth:`~DecodingBackend.step` feeds one token per row (with its RoPE position and the padding
  mask over past + current keys) and returns the next token of each row;
* :meth:`~DecodingBackend.prefill_logits` and :meth:`~DecodingBackend.step_logits` are the same
  steps returning the float32 logits instead of picking (beam search, recorded scores);
* :meth:`~DecodingBackend.verify_logits` feeds several tokens per row at once and returns the logits
  after each (assisted decoding verifies its drafts so); the caller rolls the cache back
  (:meth:`~neoxja.cache.KVCache.crop`) past the tokens it rejects.

Each backend computes the logits its own way and hands them to the generation's
:class:`~neoxja.sample_utils.Sampler`; a backend that can also pick (the C step's greedy argmax)
does so itself and writes the ids straight into the output buffer. Backends in this module:

* :class:`TorchBackend` — the model's PyTorch forward; works for every model, device and dtype;
* :class:`CpuFusedBackend` — each step one C call over the whole model (:mod:`neoxja.cpu_decode`),
  for neoxja's own modules on the CPU, float32 or quantized (nf4, fp4, int8, bfloat16); the
  verification of several tokens too (one call, each weight read once for all of them);
* :class:`CpuHeadBackend` — the model's PyTorch layers, then the output head on neoxja's C kernels
  (a float32 head by the C step's matrix kernel, a quantized one by its own), on the CPU.

:func:`choose_backend` picks the first that applies, in :data:`BACKENDS` order, and says why each
one before it does not; :func:`explain_decoding` gives that answer to users, and ``generate()``
logs it at debug level (logger ``neoxja.decoding``). A new backend (compiled, quantized, GPU) is a
class with :meth:`~DecodingBackend.unsupported` and :meth:`~DecodingBackend.step`, added to
:data:`BACKENDS`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from torch import Tensor

from neoxja.cache import KVCache
from neoxja.cpu_decode import FusedDecoder, fused_decoding_unsupported, head_logits, head_matmul_unsupported
from neoxja.cpu_decode import describe as describe_fused
from neoxja.sample_utils import Sampler

logger = logging.getLogger("neoxja.decoding")


class DecodingBackend:
    """One generation's decoding steps for ``model`` into ``cache`` (sized for ``max_length``)."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for explain_decoding()

    @classmethod
    def describe(cls, model: Any) -> str:
        """What this backend runs for ``model`` (explain_decoding()'s line): its description."""
        return cls.description

    def __init__(self, model: Any, cache: KVCache, max_length: int, sampler: Sampler) -> None:
        self.model = model
        self.cache = cache
        self.sampler = sampler

    @classmethod
    def unsupported(cls, model: Any, max_length: int, sampler: Sampler) -> str | None:
        """Why this backend cannot decode ``model`` (None when it can)."""
        return None

    def _forward(self, ids: Tensor, mask: Tensor | None, positions: Tensor | None) -> Tensor:
        """The model's PyTorch forward into the cache: float32 logits [batch, vocab] of the last position."""
        out = self.model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits.select(1, -1).float()

    def prefill_logits(self, input_ids: Tensor, mask: Tensor | None, positions: Tensor | None) -> Tensor:
        """Run the prompt ``input_ids`` [batch, len] (``mask`` [batch, len] or None, ``positions``
        [batch, len] or None = 0..len-1) into the cache; return the float32 logits [batch, vocab] of
        its last position."""
        return self._forward(input_ids, mask, positions)

    def prefill(self, input_ids: Tensor, mask: Tensor | None, positions: Tensor | None) -> Tensor:
        """:meth:`prefill_logits`, then the first new id of each row [batch] by the sampler."""
        return self.sampler(input_ids, self.prefill_logits(input_ids, mask, positions))

    def step_logits(self, history: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        """Feed the last token of each row of ``history`` [batch, length]; return the float32 logits
        [batch, vocab] after it (a buffer the next call may overwrite).

        ``positions`` [batch, 1] are the RoPE positions of the fed tokens (None: the cache position);
        ``mask`` [batch, length] marks the keys each row may see (None: no padding).
        """
        last = history.narrow(1, history.shape[1] - 1, 1)
        return self._forward(last, mask, positions)

    def step(self, history: Tensor, positions: Tensor | None, mask: Tensor | None, out: Tensor) -> Tensor:
        """:meth:`step_logits`, then the next ids [batch] by the sampler. ``out`` [batch] is where the
        caller stores the result: a backend may write it there and return ``out``."""
        return self.sampler(history, self.step_logits(history, positions, mask))

    def verify_logits(self, new_ids: Tensor) -> Tensor:
        """Feed ``new_ids`` [batch, count] after the cache's filled positions (rows without padding) in
        one forward; return the float32 logits [batch, count, vocab] after each of them. The cache
        advances by ``count``; crop it to drop the positions of rejected tokens."""
        out = self.model(new_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=new_ids.shape[1])
        return out.logits.float()


class TorchBackend(DecodingBackend):
    """Each step through the model's PyTorch forward: any module, device and dtype."""

    name = "torch"
    description = "each step through the model's PyTorch forward"


class CpuFusedBackend(DecodingBackend):
    """Each step one C call over the whole model (:class:`neoxja.cpu_decode.FusedDecoder`); for greedy
    decoding without processors the C call also writes the argmax into ``out``. Verifying k draft
    tokens is one C call as well (:meth:`~neoxja.cpu_decode.FusedDecoder.verify`), every model this
    backend takes included: no fallback to PyTorch."""

    name = "cpu-fused"
    description = (
        "each step one C call over the whole model (neoxja.cpu_decode), draft tokens verified in one C call"
    )

    @classmethod
    def describe(cls, model: Any) -> str:
        """The description, then each format's arithmetic and kernel (:func:`neoxja.cpu_decode.describe`)."""
        return f"{cls.description}; {describe_fused(model)}"

    def __init__(self, model: Any, cache: KVCache, max_length: int, sampler: Sampler) -> None:
        super().__init__(model, cache, max_length, sampler)
        self.decoder = FusedDecoder(model, cache, max_length)
        self.picks_greedy = sampler.plain_greedy

    @classmethod
    def unsupported(cls, model: Any, max_length: int, sampler: Sampler) -> str | None:
        return fused_decoding_unsupported(model, max_length)

    def step_logits(self, history: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.decoder.step(history.select(1, history.shape[1] - 1), positions=positions, mask=mask)

    def step(self, history: Tensor, positions: Tensor | None, mask: Tensor | None, out: Tensor) -> Tensor:
        if not self.picks_greedy:
            return self.sampler(history, self.step_logits(history, positions, mask))
        last = history.select(1, history.shape[1] - 1)
        self.decoder.step(last, positions=positions, mask=mask, argmax_out=out)
        return out

    def verify_logits(self, new_ids: Tensor) -> Tensor:
        return self.decoder.verify(new_ids)


class CpuHeadBackend(TorchBackend):
    """Each step through the model's PyTorch layers, then the output head on neoxja's C kernels.

    For models on the CPU that the whole-step C decoder does not take (packed for oneDNN, another
    activation, ...): a float32 head (the 32000-row output embedding, which stays dense as in
    transformers unless the 8-bit head is asked for) is read by the C step's matrix kernel, about
    twice the speed of PyTorch's own product here (``bench_quant.py``); a quantized head runs its own
    forward. The logits are those of the LM forward within float32 rounding.
    """

    name = "cpu-head"
    description = "each step through the PyTorch layers, the output head on neoxja's C kernels"

    @classmethod
    def unsupported(cls, model: Any, max_length: int, sampler: Sampler) -> str | None:
        return head_matmul_unsupported(model)

    def _forward(self, ids: Tensor, mask: Tensor | None, positions: Tensor | None) -> Tensor:
        out = self.model.base_model(
            ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        return head_logits(self.model, out.last_hidden_state.select(1, -1))


BACKENDS: tuple[type[DecodingBackend], ...] = (CpuFusedBackend, CpuHeadBackend, TorchBackend)
"""Backends in order of preference; the last one applies to every model."""


def choose_backend(
    model: Any, max_length: int, sampler: Sampler | None = None
) -> tuple[type[DecodingBackend], list[str]]:
    """The first backend of :data:`BACKENDS` that can decode ``model``, and why each earlier one cannot."""
    sampler = sampler if sampler is not None else Sampler()
    reasons = []
    for backend in BACKENDS:
        reason = backend.unsupported(model, max_length, sampler)
        if reason is None:
            return backend, reasons
        reasons.append(f"{backend.name}: {reason}")
    raise RuntimeError("no decoding backend applies")  # TorchBackend always does


def explain_decoding(model: Any, max_length: int | None = None) -> str:
    """Which backend ``generate()`` would use for ``model`` and, for each faster one, why not.

    ``max_length`` (default: the model's context) matters for RoPE types whose frequencies switch
    with the length.
    """
    length = max_length if max_length is not None else model.config.max_position_embeddings
    backend, reasons = choose_backend(model, length)
    text = f"{backend.name}: {backend.describe(model)}"
    if reasons:
        text += "; not " + "; not ".join(reasons)
    return text


def start_decoding(model: Any, cache: KVCache, max_length: int, sampler: Sampler) -> DecodingBackend:
    """Build the chosen backend for one generation, logging the choice at debug level."""
    backend, reasons = choose_backend(model, max_length, sampler)
    if logger.isEnabledFor(logging.DEBUG):
        why = f" ({'; '.join(reasons)})" if reasons else ""
        logger.debug("decoding %s with the %s backend%s", type(model).__name__, backend.name, why)
    return backend(model, cache, max_length, sampler)
