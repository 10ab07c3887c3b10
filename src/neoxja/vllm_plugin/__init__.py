"""neoxja's vLLM plugin: serves GPT-NeoX-Japanese checkpoints with vLLM.

vLLM's plugin loader calls :func:`register` (entry point ``neoxja`` in the group
``vllm.general_plugins``, installed with neoxja) in every vLLM process. It only names the model
class; vLLM imports :mod:`neoxja.vllm_plugin.model` (which imports vLLM's model layers) when it
builds a model of this architecture. It also registers neoxja's tokenizer as vLLM's
``tokenizer_mode="neoxja"`` (:mod:`neoxja.vllm_plugin.tokenizer`). Nothing else in neoxja imports
this package, so neoxja never needs vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "GPTNeoXJapaneseForCausalLM"


def register() -> None:
    """Make vLLM load ``GPTNeoXJapaneseForCausalLM`` checkpoints with neoxja's vLLM model (lazily) and
    offer neoxja's tokenizer."""
    from vllm import ModelRegistry

    from neoxja.vllm_plugin.tokenizer import register_tokenizer

    ModelRegistry.register_model(ARCHITECTURE, f"neoxja.vllm_plugin.model:{ARCHITECTURE}")
    register_tokenizer()
