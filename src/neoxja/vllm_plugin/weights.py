"""Which checkpoint tensor goes where in the vLLM model, and the checks that make a bad checkpoint fail.

transformers' GPT-NeoX-Japanese checkpoints name every tensor after its module
(``gpt_neox_japanese.layers.3.attention.dense.weight``), so most keys are the vLLM model's own
parameter names. Three things differ:

- ``attention.query_key_value.weight`` is laid out per head, ``[heads, (q | k | v), head_size]`` on
  its output dimension; vLLM's ``QKVParallelLinear`` takes q, k and v one by one (each then split over
  the tensor-parallel ranks by head), so :func:`split_qkv` regroups it.
- the last layer's ``attention.dense_bias`` is the bias of vLLM's ``attention.dense``, which adds it
  once, after its matrix product (on rank 0 before the all-reduce under tensor parallelism).
- a tied head (``tie_word_embeddings``) has no weight of its own; a checkpoint may still carry
  ``embed_out.weight``, which transformers ignores too.

transformers 4 also saved buffers (each attention's rotary ``inv_freq``, the causal mask ``bias``
and ``masked_bias``), recomputed here and skipped by name. Anything else, a tensor of the wrong
shape, or a parameter that no tensor filled is a :class:`CheckpointKeyError` naming the key: vLLM's
own check for weights left uninitialised skips linear layers, which would otherwise keep garbage.

This module imports neither vLLM nor torch, so its rules are usable (and testable) anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

PREFIX = "gpt_neox_japanese."
HEAD = "embed_out.weight"

# transformers 4's saved buffers: recomputed by the model, never loaded.
_BUFFERS = re.compile(r"gpt_neox_japanese\.layers\.\d+\.attention\.(rotary_emb\.inv_freq|bias|masked_bias)")
_LAYER_KEY = re.compile(r"gpt_neox_japanese\.layers\.(\d+)\.(.+)")


class CheckpointKeyError(ValueError):
    """A checkpoint that the vLLM model cannot load; the message names the key."""


def is_buffer(key: str) -> bool:
    """True for the buffers transformers 4 saved beside the weights, which are skipped."""
    return _BUFFERS.fullmatch(key) is not None


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """``{checkpoint key: full (unsharded) shape}`` of every tensor a checkpoint of ``config`` holds.

    ``config`` is the transformers (or neoxja) config vLLM read from config.json; a tied head's
    ``embed_out.weight`` is listed too (a checkpoint may carry it; it is checked and skipped).
    """
    hidden, vocab = config.hidden_size, config.vocab_size
    intermediate = int(hidden * config.intermediate_multiple_size)
    layer = {
        "input_layernorm.weight": (hidden,),
        "input_layernorm.bias": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "post_attention_layernorm.bias": (hidden,),
        "attention.query_key_value.weight": (3 * hidden, hidden),
        "attention.dense.weight": (hidden, hidden),
        "mlp.dense_h_to_4h.weight": (intermediate, hidden),
        "mlp.dense_4h_to_h.weight": (hidden, intermediate),
    }
    shapes = {
        f"{PREFIX}embed_in.weight": (vocab, hidden),
        f"{PREFIX}final_layer_norm.weight": (hidden,),
        f"{PREFIX}final_layer_norm.bias": (hidden,),
        HEAD: (vocab, hidden),
    }
    for index in range(config.num_hidden_layers):
        shapes.update({f"{PREFIX}layers.{index}.{name}": shape for name, shape in layer.items()})
    shapes[f"{PREFIX}layers.{config.num_hidden_layers - 1}.attention.dense_bias"] = (hidden,)
    return shapes


def parameter_name(key: str) -> str:
    """The vLLM model's parameter that checkpoint ``key`` fills."""
    if key.endswith(".attention.dense_bias"):
        return key.removesuffix("_bias") + ".bias"
    return key


def checkpoint_key(name: str) -> str:
    """The checkpoint key that fills the vLLM model's parameter ``name`` (:func:`parameter_name` reversed)."""
    if name.endswith(".attention.dense.bias"):
        return name.removesuffix(".bias") + "_bias"
    return name


def check_tensor(key: str, shape: Sequence[int], expected: dict[str, tuple[int, ...]]) -> None:
    """:class:`CheckpointKeyError` for a key the model has no place for, or a shape not the config's."""
    if key not in expected:
        layer = _LAYER_KEY.fullmatch(key)
        hint = ""
        if layer and layer[2] == "attention.dense_bias":
            hint = " (only the last layer's attention has a dense_bias)"
        elif layer:
            hint = f" (num_hidden_layers says layers 0 to {_last_layer(expected)})"
        raise CheckpointKeyError(
            f"checkpoint key {key!r} has no place in GPTNeoXJapaneseForCausalLM{hint}; "
            "is this a GPT-NeoX-Japanese checkpoint of this config (and not a quantized one)?"
        )
    if tuple(shape) != expected[key]:
        raise CheckpointKeyError(
            f"checkpoint key {key!r} has shape {list(shape)}, but config.json's sizes make it "
            f"{list(expected[key])}"
        )


def missing_keys(unloaded: set[str]) -> list[str]:
    """The checkpoint keys (sorted) that would have filled the parameters named in ``unloaded``."""
    return sorted(checkpoint_key(name) for name in unloaded)


def split_qkv(weight: Any, num_heads: int) -> tuple[Any, Any, Any]:
    """q, k and v (each ``[heads * head_size, hidden]``) of the per-head fused ``query_key_value.weight``
    ``[heads * 3 * head_size, hidden]``, whose rows go head by head, each as its q, k then v rows."""
    rows, hidden = weight.shape
    per_head = weight.reshape(num_heads, 3, rows // (3 * num_heads), hidden)
    q, k, v = (per_head[:, part].reshape(rows // 3, hidden) for part in range(3))
    return q, k, v


def _last_layer(expected: dict[str, tuple[int, ...]]) -> int:
    return max(int(m[1]) for key in expected if (m := _LAYER_KEY.fullmatch(key)))
