"""The public model classes: the network of :mod:`neoxja.network`, and the causal LM with ``generate()``.

The network is defined once, in :mod:`neoxja.network` (which knows nothing of generation);
:class:`GPTNeoXJapaneseForCausalLM` adds :class:`~neoxja.generation.GenerationMixin` to its
language-model network. Keeping the two apart keeps the imports one-way: generation and its
decoding backends may look at the network's classes without importing this module.
"""

from __future__ import annotations

from neoxja.generation import GenerationMixin
from neoxja.network import (
    GPTNeoXJapaneseAttention,
    GPTNeoXJapaneseLayer,
    GPTNeoXJapaneseLMHeadModel,
    GPTNeoXJapaneseMLP,
    GPTNeoXJapaneseModel,
    GPTNeoXJapanesePreTrainedModel,
    build_attention_mask,
)
from neoxja.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, ModelOutput

__all__ = [
    "BaseModelOutputWithPast",
    "CausalLMOutputWithPast",
    "GPTNeoXJapaneseAttention",
    "GPTNeoXJapaneseForCausalLM",
    "GPTNeoXJapaneseLayer",
    "GPTNeoXJapaneseLMHeadModel",
    "GPTNeoXJapaneseMLP",
    "GPTNeoXJapaneseModel",
    "GPTNeoXJapanesePreTrainedModel",
    "ModelOutput",
    "build_attention_mask",
]


class GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseLMHeadModel, GenerationMixin):
    """GPT-NeoX-Japanese with its language-modelling head and ``generate()`` (transformers' class of
    the same name): same checkpoints, state-dict keys and logits."""
