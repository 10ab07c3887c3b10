"""Key/value cache for incremental decoding.

Design
------
One pair of preallocated buffers per layer, ``keys[i]`` and ``values[i]`` of shape ``[batch, heads,
capacity, head_dim]``, all views of one allocation ``[layers, 2, batch, heads, capacity, head_dim]``
(each view contiguous), so that a row operation over every layer (beam search's
:meth:`KVCache.reorder`) is a few tensor operations, not a few per layer. A forward pass over ``T``
new tokens writes them at ``[:, :, length : length + T]`` (an in-place slice copy, no concatenation)
and attends to the view ``[:, :, : length + T]``; after the last layer the model calls
:meth:`KVCache.advance` once, so every layer of one forward sees the same offset. A decoding step
therefore costs the same Python work whatever the sequence length. If ``length + T`` exceeds the
capacity, the buffers are reallocated at (at least) twice the capacity, so appends are amortised
O(1). A cache created without ``max_length`` (what the model makes for a plain
``forward(use_cache=True)``) allocates nothing up front and adopts each layer's first keys/values as
its buffers, so a single forward pays no copy (its buffers are then separate tensors); it grows into
one allocation on the first append like any other.

The layout is chosen so that two later extensions need no change to the model:

* static cache for ``torch.compile``: allocate ``capacity`` once, never grow, write with
  ``index_copy_`` at ``cache_position`` and attend to the whole buffer under a mask built from
  ``cache_position`` (the model already derives its masks from absolute key positions);
* slot-based cache for a batching server: each batch row is a slot with its own length; the
  row operations here (:meth:`select`, :meth:`reorder`) are the primitives such a server needs.
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """Preallocated per-layer key/value buffers with a shared filled length.

    ``KVCache(config, batch_size, max_length, dtype, device)`` allocates everything up front;
    ``max_length`` is a capacity hint, not a limit (the cache doubles when it is exceeded).
    ``max_length=None`` allocates lazily (see the module docstring).
    """

    def __init__(
        self,
        config: Any,
        batch_size: int,
        max_length: int | None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size <= 0 or (max_length is not None and max_length <= 0):
            raise ValueError(f"KVCache needs batch_size, max_length > 0, got {batch_size}, {max_length}")
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self._storage: torch.Tensor | None = None  # [layers, 2, batch, heads, capacity, head_dim]
        if max_length is not None:
            self._use_storage(self._new_storage(batch_size, max_length))

    def _new_storage(self, batch_size: int, capacity: int) -> torch.Tensor:
        shape = (self.num_layers, 2, batch_size, self.num_heads, capacity, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _use_storage(self, storage: torch.Tensor) -> None:
        """Make ``storage`` the cache's one allocation, ``keys[i]``/``values[i]`` its views."""
        self._storage = storage
        self.keys = [storage[i, 0] for i in range(self.num_layers)]
        self.values = [storage[i, 1] for i in range(self.num_layers)]

    @classmethod
    def from_config(cls, config: Any, *args: Any, **kwargs: Any) -> KVCache:
        """Same as the constructor; mirrors the ``from_config`` spelling used elsewhere."""
        return cls(config, *args, **kwargs)

    @property
    def capacity(self) -> int:
        """Number of positions the buffers hold before they must grow (0 before a lazy cache's first use)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of positions already stored (the same for every layer between forwards)."""
        return self.length

    def __len__(self) -> int:
        return self.num_layers

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``[batch, heads, T, head_dim]`` after the filled part of layer
        ``layer_idx`` and return views of everything stored so far,
        ``[batch, heads, length + T, head_dim]``.

        Does not advance the length: the model calls :meth:`advance` once after all layers.
        """
        if key.shape != value.shape or key.dim() != 4:
            raise ValueError(
                f"key and value must have the same 4-d shape, got {tuple(key.shape)}, {tuple(value.shape)}"
            )
        batch, heads, new, head_dim = key.shape
        if (batch, heads, head_dim) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(
                f"KVCache holds [batch={self.batch_size}, heads={self.num_heads}, *, "
                f"head_dim={self.head_dim}], "
                f"got key of shape {tuple(key.shape)}"
            )
        if self.keys[layer_idx] is None:  # lazy cache, first block: adopt it instead of copying
            self.keys[layer_idx], self.values[layer_idx] = key.contiguous(), value.contiguous()
            return self.keys[layer_idx], self.values[layer_idx]
        end = self.length + new
        if end > self.keys[layer_idx].shape[2]:
            self._grow(end)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # narrow() rather than slicing syntax: the same views with a fraction of the Python overhead
        keys.narrow(2, self.length, new).copy_(key)
        values.narrow(2, self.length, new).copy_(value)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (called once per forward by the model)."""
        self.length += num_tokens

    def _grow(self, needed: int) -> None:
        old_keys, old_values = self.keys, self.values
        self._use_storage(self._new_storage(self.batch_size, max(needed, 2 * self.capacity)))
        for old_buffers, buffers in ((old_keys, self.keys), (old_values, self.values)):
            for old, new in zip(old_buffers, buffers, strict=True):
                if old is not None:
                    new.narrow(2, 0, self.length).copy_(old.narrow(2, 0, self.length))

    def reset(self) -> None:
        """Forget every stored position; the buffers are kept for reuse."""
        self.length = 0

    def crop(self, max_length: int) -> None:
        """Keep only the first ``max_length`` positions (a negative value drops that many from the end)."""
        if max_length < 0:
            max_length = self.length + max_length
        if max_length < 0:
            raise ValueError(f"cannot crop a cache of length {self.length} to {max_length}")
        self.length = min(self.length, max_length)

    def fill_repeated(self, source: KVCache, repeats: int) -> None:
        """Become ``source``'s filled positions with each of its rows repeated ``repeats`` times in a
        row (row ``r`` holds source row ``r // repeats``), in this cache's own buffers: beam search runs
        each prompt once and gives its keys and values to all its beams."""
        if self._storage is None or source._storage is None:
            raise ValueError("fill_repeated needs two preallocated caches (made with max_length)")
        if source.batch_size * repeats != self.batch_size or source.length > self.capacity:
            raise ValueError(
                f"a cache of {self.batch_size} rows and {self.capacity} positions cannot hold {source!r} "
                f"repeated {repeats} times"
            )
        filled = source._storage.narrow(4, 0, source.length)
        self._storage.narrow(4, 0, source.length).copy_(filled.repeat_interleave(repeats, dim=2))
        self.length = source.length

    def select(self, indices: torch.Tensor | list[int]) -> None:
        """Keep (repeat, reorder) batch rows ``indices``: drop finished sequences, follow beams."""
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        if indices.dim() != 1:
            raise ValueError(f"select expects a 1-d list of batch rows, got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.batch_size):
            raise IndexError(
                f"batch rows {indices.tolist()} out of range for a cache of batch size {self.batch_size}"
            )
        if self._storage is not None:
            self._use_storage(self._storage.index_select(2, indices))
        else:
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    if old is not None:
                        buffers[i] = old.index_select(0, indices)
        self.batch_size = indices.numel()

    def reorder(self, beam_idx: torch.Tensor | list[int]) -> None:
        """Make row ``i`` hold what row ``beam_idx[i]`` held (beam search following its beams), in place.

        Unlike :meth:`select`, the batch size stays and the buffers stay the same tensors (a decoder
        holding pointers into them, such as the C step, keeps working): only the filled positions of
        the rows that change are written, from copies of their source rows read first, so a row that
        two beams continue is read before it is overwritten.
        """
        indices = beam_idx.tolist() if isinstance(beam_idx, torch.Tensor) else list(beam_idx)
        if len(indices) != self.batch_size or not all(isinstance(i, int) for i in indices):
            raise ValueError(
                f"reorder expects one source row per batch row ({self.batch_size} integers), got "
                f"{beam_idx!r}; use select() to change the batch size"
            )
        if indices and (min(indices) < 0 or max(indices) >= self.batch_size):
            raise IndexError(f"batch rows {indices} out of range for a cache of batch size {self.batch_size}")
        if self.length == 0:
            return
        if self._storage is not None:  # every layer's keys and values at once
            reorder_rows_(self._storage.narrow(4, 0, self.length), indices, dim=2)
            return
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                if buffer is not None:
                    reorder_rows_(buffer.narrow(2, 0, self.length), indices)

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, heads={self.num_heads}, "
            f"length={self.length}, capacity={self.capacity}, dtype={self.dtype})"
        )


def reorder_rows_(tensor: torch.Tensor, indices: list[int], dim: int = 0) -> bool:
    """Make index ``i`` of ``tensor`` along ``dim`` hold what index ``indices[i]`` held, in place; return
    whether anything moved. Only the indices that change are written, from copies of their sources
    read first (so a source that is also a target is safe); each run of consecutive targets is one
    slice copy (on the CPU, several times faster than ``index_copy_`` into a strided view)."""
    targets = [i for i, source in enumerate(indices) if source != i]
    if not targets:
        return False
    sources = torch.tensor([indices[i] for i in targets], dtype=torch.long, device=tensor.device)
    rows = tensor.index_select(dim, sources)
    start = 0
    for end in range(1, len(targets) + 1):
        if end == len(targets) or targets[end] != targets[end - 1] + 1:
            tensor.narrow(dim, targets[start], end - start).copy_(rows.narrow(dim, start, end - start))
            start = end
    return True
