"""The server's KV cache: a fixed pool of slots, and the two ways a step runs over them.

:class:`SlotPool` allocates, once, one cache row per slot (``[slots, heads, max_model_len,
head_dim]`` per layer, as a :class:`~neoxja.cache.KVCache`) and hands slots to sequences; nothing is
reallocated while serving. A sequence's prompt goes into its slot through :meth:`SlotPool.view`,
a batch-of-one cache over that row, by the model's own forward (one chunk at a time). Decoding
steps take every running sequence at once, each at its own length:

* :class:`FusedSlotStep` — one C call (:meth:`neoxja.cpu_decode.FusedDecoder.step_slots`) for
  neoxja's models on the CPU, float32 or quantized. Its kernels never mix rows, so each row's logits
  are, to the bit, those of ``generate()`` on that sequence alone: batching does not change any
  result; each weight is read once per step for all rows;
* :class:`TorchSlotStep` — the model's PyTorch forward over the gathered rows with a padding mask,
  for every other model (other dtypes, GPUs, what the C step does not reproduce); on the CPU the
  head goes through neoxja's C kernels, as in ``generate()``'s ``cpu-head`` backend. Its rows agree
  with a batch of one within floating-point rounding (matrix products of another shape sum in
  another order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neoxja.cache import KVCache
from neoxja.cpu_decode import FusedDecoder, fused_decoding_unsupported, head_logits, head_matmul_unsupported
from neoxja.sample_utils import greedy


class SlotPool:
    """``num_slots`` preallocated cache rows of ``capacity`` positions each, and which are free."""

    def __init__(self, model: Any, num_slots: int, capacity: int) -> None:
        self.config = model.config
        self.cache = KVCache(model.config, num_slots, capacity, dtype=model.dtype, device=model.device)
        # Zeros, not whatever the allocator had: the PyTorch step multiplies the values of masked
        # positions by 0, which must not meet a NaN; and the memory is committed now, not mid-serving.
        for buffer in self.cache.keys + self.cache.values:
            buffer.zero_()
        self.capacity = capacity
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def free(self) -> int:
        """How many slots no sequence holds."""
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    def acquire(self) -> int:
        """A free slot (the caller checks :attr:`free` first)."""
        return self._free.pop()

    def release(self, slot: int) -> None:
        """Give ``slot`` back; its contents are overwritten by the next sequence."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not held")
        self._free.append(slot)

    def view(self, slot: int, length: int) -> KVCache:
        """A batch-of-one cache over ``slot`` whose first ``length`` positions are filled: the model's
        forward writes a prompt chunk into the pool through it."""
        return _SlotView(self, slot, length)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.keys + self.cache.values)


class _SlotView(KVCache):
    """One pool row seen as a :class:`KVCache` of batch 1 (views, no copies); never grows."""

    def __init__(self, pool: SlotPool, slot: int, length: int) -> None:
        source = pool.cache
        super().__init__(pool.config, 1, None, dtype=source.dtype, device=source.device)
        self.keys = [k.narrow(0, slot, 1) for k in source.keys]
        self.values = [v.narrow(0, slot, 1) for v in source.values]
        self.length = length

    def _grow(self, needed: int) -> None:
        raise ValueError(f"a sequence of {needed} positions does not fit in its slot ({self.capacity})")


class FusedSlotStep:
    """Decoding steps of neoxja's CPU models (float32 or quantized) through the C decoder, rows at their
    own lengths."""

    name = "cpu-fused"

    def __init__(self, model: Any, pool: SlotPool) -> None:
        self.decoder = FusedDecoder(model, pool.cache, pool.capacity)
        self.argmax = torch.empty(pool.num_slots, dtype=torch.long)

    @staticmethod
    def unsupported(model: Any, pool: SlotPool) -> str | None:
        return fused_decoding_unsupported(model, pool.capacity)

    def __call__(self, tokens: Tensor, slots: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``[rows, vocab]`` (float32) and greedy ids ``[rows]`` after feeding ``tokens``."""
        argmax = self.argmax[: tokens.shape[0]]
        logits = self.decoder.step_slots(tokens, slots, lengths, argmax_out=argmax)
        return logits, argmax


class _GatheredRows(KVCache):
    """The pool rows of one PyTorch step: the new key of row ``b`` is stored at its slot's position
    ``lengths[b]`` and the attention sees ``[past keys of the slot, padding..., new key]``: the
    gathered rows end with the new key at position ``max(lengths)``, where the model puts it.

    Gathering copies each layer's keys and values of the running rows once per step (about as many
    bytes as the attention reads anyway); this fallback keeps the model's own attention unchanged,
    the C step reads the slots in place."""

    def __init__(self, pool: SlotPool, slots: Tensor, lengths: Tensor) -> None:
        source = pool.cache
        super().__init__(pool.config, slots.shape[0], None, dtype=source.dtype, device=source.device)
        self.pool = source  # no buffers of its own: update() reads and writes the pool's rows
        self.slots, self.lengths = slots, lengths
        self.length = int(lengths.max())

    def update(self, layer_idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        out = []
        for buffer, new in ((self.pool.keys[layer_idx], key), (self.pool.values[layer_idx], value)):
            buffer[self.slots, :, self.lengths] = new.select(2, 0)
            rows = buffer.index_select(0, self.slots).narrow(2, 0, self.length + 1)
            rows.select(2, self.length).copy_(new.select(2, 0))
            out.append(rows)
        return out[0], out[1]


class TorchSlotStep:
    """Decoding steps through the model's PyTorch forward: any module, dtype and device."""

    name = "torch"

    def __init__(self, model: Any, pool: SlotPool) -> None:
        self.model = model
        self.pool = pool
        # As generate()'s cpu-head backend: the head on the CPU runs on neoxja's C kernels (a float32
        # head by the C step's matrix kernel, about twice PyTorch's speed here).
        self.c_head = head_matmul_unsupported(model) is None

    @staticmethod
    def unsupported(model: Any, pool: SlotPool) -> str | None:
        return None

    def __call__(self, tokens: Tensor, slots: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        rows = _GatheredRows(self.pool, slots, lengths)
        width = rows.length + 1
        # Row b sees its own past (positions < lengths[b]) and the new key, gathered at the end.
        mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        mask[:, -1] = True
        inputs = dict(
            attention_mask=mask.long(), position_ids=lengths[:, None], past_key_values=rows, use_cache=True
        )
        if self.c_head:
            hidden = self.model.base_model(tokens[:, None], **inputs).last_hidden_state.select(1, -1)
            logits = head_logits(self.model, hidden)
        else:
            logits = self.model(tokens[:, None], logits_to_keep=1, **inputs).logits.select(1, -1).float()
        return logits, greedy(logits)


STEPS = (FusedSlotStep, TorchSlotStep)
"""Step implementations in order of preference; the last applies to every model."""


def choose_step(model: Any, pool: SlotPool) -> FusedSlotStep | TorchSlotStep:
    """The first of :data:`STEPS` that can run ``model``'s decoding steps over ``pool``."""
    for step in STEPS:
        if step.unsupported(model, pool) is None:
            return step(model, pool)
    raise RuntimeError("no decoding step applies")  # TorchSlotStep always does
