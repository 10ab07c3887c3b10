"""What the models' forwards return: transformers' output classes, by attribute, key or index."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from neoxja.cache import KVCache


class ModelOutput:
    """Dataclass base that also reads like transformers' outputs: ``out.logits``, ``out["logits"]``,
    ``out[0]`` (fields that are None are skipped, as in transformers) and ``out.to_tuple()``."""

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in declaration order."""
        return tuple(value for _, value in self.items())

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def items(self) -> list[tuple[str, Any]]:
        pairs = ((f.name, getattr(self, f.name)) for f in fields(self))
        return [(name, value) for name, value in pairs if value is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            value = getattr(self, key, None) if key in {f.name for f in fields(self)} else None
            if value is None:
                raise KeyError(f"{type(self).__name__} has no {key!r} (fields set: {', '.join(self.keys())})")
            return value
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    @property
    def cache(self) -> KVCache | None:
        """transformers-5 name of ``past_key_values``."""
        return getattr(self, "past_key_values", None)


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    """Output of :class:`GPTNeoXJapaneseModel`.

    ``hidden_states`` holds the input of every layer plus the final (normalised) output;
    ``attentions`` the softmax weights of every layer, ``[batch, heads, query, key]``.
    """

    last_hidden_state: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    """Output of :class:`GPTNeoXJapaneseLMHeadModel`; ``loss`` only when ``labels`` were given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ----- masks ----------------------------------------------------------------------------------------
