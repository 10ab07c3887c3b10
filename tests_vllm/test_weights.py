"""The vLLM model's weight loading: transformers' checkpoints load as they are, and a checkpoint it
cannot load fails at load time with the key named, never as a model of garbage weights (vLLM's own
check for unloaded weights skips linear layers).

Engines here run inside the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor "uni"), so
the loader's exception reaches the test as itself, and a refused checkpoint costs about a second.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, TINY_VLLM, engine, greedy, neoxja_greedy, prompt_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neoxja.vllm_plugin.weights import HEAD, CheckpointKeyError, expected_shapes, split_qkv

LAST = "gpt_neox_japanese.layers.1"  # the tiny checkpoints have two layers


def vllm_greedy(checkpoint: Path, prompts: list[str], new: int) -> list[list[int]]:
    """The greedy continuations (ids) of ``prompts`` by an in-process vLLM engine on ``checkpoint``,
    prompted with neoxja's ids of the checkpoint's tokenizer."""
    with engine(checkpoint) as llm:
        return greedy(llm, prompt_ids(checkpoint, prompts), new)


def edited(source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint ``source`` in ``target`` whose tensors went through ``edit``."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_split_qkv_gives_each_heads_q_k_v() -> None:
    """transformers reads the fused projection's output as [heads, (q | k | v), head_size]; the rows
    split_qkv hands QKVParallelLinear compute the same q, k and v."""
    heads, head_size, hidden = 3, 4, 8
    weight = torch.randn(heads * 3 * head_size, hidden)
    x = torch.randn(5, hidden)
    fused = (x @ weight.T).view(5, heads, 3 * head_size)
    for part, rows in enumerate(split_qkv(weight, heads)):
        assert rows.shape == (heads * head_size, hidden)
        want = fused[..., part * head_size : (part + 1) * head_size]
        torch.testing.assert_close((x @ rows.T).view(5, heads, head_size), want)


def test_expected_shapes_describe_a_transformers_checkpoint(checkpoint: Path) -> None:
    """Every tensor transformers saves has its place and shape in the table (a tied head saves none)."""
    import transformers

    config = transformers.GPTNeoXJapaneseConfig.from_pretrained(checkpoint)
    with safe_open(checkpoint / "model.safetensors", "pt") as saved:
        shapes = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        del expected[HEAD]
    assert shapes == expected


def test_transformers4_buffers_and_a_tied_heads_copy_are_skipped(
    tmp_path: Path, tied_checkpoint: Path
) -> None:
    """transformers 4 saved each attention's rotary inv_freq, causal-mask bias and masked_bias, and
    some writers a tied head's copy: such a checkpoint loads and generates as the clean one."""

    def add_old_tensors(tensors: dict[str, torch.Tensor]) -> None:
        for layer in range(2):
            prefix = f"gpt_neox_japanese.layers.{layer}.attention"
            tensors[f"{prefix}.rotary_emb.inv_freq"] = torch.rand(32)
            tensors[f"{prefix}.bias"] = torch.ones(1, 1, 512, 512, dtype=torch.bool).tril()
            tensors[f"{prefix}.masked_bias"] = torch.tensor(-1e9)
        tensors[HEAD] = tensors["gpt_neox_japanese.embed_in.weight"].clone()

    old = edited(tied_checkpoint, tmp_path / "old", add_old_tensors)
    prompts = PROMPTS[:2]
    assert vllm_greedy(old, prompts, 12) == neoxja_greedy(tied_checkpoint, prompts, 12)


def test_a_checkpoint_neoxja_saved_loads(tmp_path: Path, assets_dir: Path) -> None:
    """neoxja's own save_pretrained (its config.json in transformers-5 form, a tied head) serves with
    the same greedy tokens as neoxja's generate()."""
    from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

    torch.manual_seed(3)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**TINY_VLLM, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for param in model.parameters():  # biases and norms off their initial zeros and ones
            param.add_(torch.randn_like(param) * 0.05)
    saved = tmp_path / "neoxja-saved"
    model.save_pretrained(saved)
    GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir).save_pretrained(saved)
    prompts = PROMPTS[:2]
    assert vllm_greedy(saved, prompts, 12) == neoxja_greedy(saved, prompts, 12)


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(key)


def _set(key: str, value: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Callable:
    return lambda tensors: tensors.__setitem__(key, value(tensors))


QKV0 = "gpt_neox_japanese.layers.0.attention.query_key_value.weight"
BAD = {
    "missing dense bias": (
        _drop(f"{LAST}.attention.dense_bias"),
        f"lacks 1 tensor.*{LAST}.attention.dense_bias",
    ),
    "missing linear weight": (
        _drop("gpt_neox_japanese.layers.0.mlp.dense_4h_to_h.weight"),
        "lacks 1 tensor.*gpt_neox_japanese.layers.0.mlp.dense_4h_to_h.weight",
    ),
    "missing untied head": (_drop(HEAD), f"lacks 1 tensor.*{HEAD}"),
    "wrong shape": (_set(QKV0, lambda t: t[QKV0][:-64]), rf"'{QKV0}' has shape \[320, 128\].*\[384, 128\]"),
    "dense bias on an inner layer": (
        _set("gpt_neox_japanese.layers.0.attention.dense_bias", lambda t: torch.zeros(128)),
        "'gpt_neox_japanese.layers.0.attention.dense_bias' has no place.*only the last layer",
    ),
    "a layer beyond the config": (
        _set("gpt_neox_japanese.layers.2.input_layernorm.weight", lambda t: torch.ones(128)),
        "'gpt_neox_japanese.layers.2.input_layernorm.weight' has no place.*layers 0 to 1",
    ),
    "unknown key": (_set("lm_head.weight", lambda t: t[HEAD].clone()), "'lm_head.weight' has no place"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_fails_at_load_naming_the_key(
    case: str, tmp_path: Path, untied_checkpoint: Path
) -> None:
    edit, message = BAD[case]
    bad = edited(untied_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(CheckpointKeyError, match=message), engine(bad):
        pass
