"""neoxja's vLLM plugin: serves GPT-NeoX-Japanese checkpoints with vLLM.

vLLM's plugin loader calls :func:`register` (entry point ``neoxja`` in the group
``vllm.general_plugins``, installed with neoxja) in every vLLM process. It only names the model
class; vLLM imports :mod:`neoxja.vllm_plugin.model` (which imports vLLM) when it builds a model of
this architecture. Nothing else in neoxja imports this package, so neoxja never needs vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "GPTNeoXJapaneseForCausalLM"


def register() -> None:
    """Make vLLM load ``GPTNeoXJapaneseForCausalLM`` checkpoints with neoxja's vLLM model (lazily)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"neoxja.vllm_plugin.model:{ARCHITECTURE}")
