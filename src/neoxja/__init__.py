"""neoxja: GPT-NeoX-Japanese in plain PyTorch — same checkpoints, same ids, same logits as transformers.

Names are imported lazily, so ``import neoxja`` stays cheap (the tokenizer does not need torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPTNeoXJapaneseConfig": "neoxja.configuration",
    "GPTNeoXJapanesePreTrainedModel": "neoxja.modeling",
    "GPTNeoXJapaneseModel": "neoxja.modeling",
    "GPTNeoXJapaneseForCausalLM": "neoxja.modeling",
    "KVCache": "neoxja.cache",
    "CheckpointError": "neoxja.checkpoint",
    "GPTNeoXJapaneseTokenizer": "neoxja.tokenizer",
    "normalize": "neoxja.tokenizer",
    "StreamingDetokenizer": "neoxja.tokenizer_utils",
    "GenerationConfig": "neoxja.generation",
    "stream_generate": "neoxja.generation",
    "explain_decoding": "neoxja.decoding",
    "optimize_for_cpu_inference": "neoxja.linear",
    "restore_dense": "neoxja.linear",
    "TextStreamer": "neoxja.streamers",
    "TextIteratorStreamer": "neoxja.streamers",
    "pipeline": "neoxja.pipelines",
    "TextGenerationPipeline": "neoxja.pipelines",
    "AutoConfig": "neoxja.auto",
    "AutoTokenizer": "neoxja.auto",
    "AutoModel": "neoxja.auto",
    "AutoModelForCausalLM": "neoxja.auto",
    "BitsAndBytesConfig": "neoxja.quantization.config",
    "AttentionMaskVisualizer": "neoxja.utils.attention_visualizer",
    "train": "neoxja.tuner.run",
    "TrainingArguments": "neoxja.tuner.trainer",
    "LoraArguments": "neoxja.tuner.lora",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neoxja' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
