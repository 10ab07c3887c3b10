"""The 8-bit output head, opt-in as in transformers: ``llm_int8_skip_modules`` without ``embed_out``
makes the head an int8 layer (the tied one quantized from the embedding, which stays float32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_reference
from safetensors.torch import load_file, save_file
from torch import nn

from neoxja import BitsAndBytesConfig, GPTNeoXJapaneseForCausalLM
from neoxja.linear import restore_dense
from neoxja.quantization import formats
from neoxja.quantization.layers import Linear8bit, LinearNF4

IDS = torch.tensor([[5, 17, 300, 2, 999, 31000, 8, 64]])
INT8_HEAD = dict(load_in_8bit=True, llm_int8_skip_modules=[])
NF4_HEAD = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tied")
    make_reference(TINY, seed=7).save_pretrained(directory)
    return directory


def load(directory: Path, **settings) -> GPTNeoXJapaneseForCausalLM:
    return GPTNeoXJapaneseForCausalLM.from_pretrained(
        directory, quantization_config=BitsAndBytesConfig(**settings)
    )


def head_logits(model: GPTNeoXJapaneseForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """(the final hidden states, the logits) of :data:`IDS`."""
    with torch.no_grad():
        hidden = model.base_model(IDS).last_hidden_state
        return hidden, model(IDS).logits


@pytest.mark.parametrize("settings", [INT8_HEAD, {**NF4_HEAD, "llm_int8_skip_modules": []}])
def test_a_tied_head_becomes_int8_beside_a_float32_embedding(tied_dir: Path, settings: dict) -> None:
    skipped = load(tied_dir, **{**settings, "llm_int8_skip_modules": None})
    model = load(tied_dir, **settings)
    assert type(skipped.embed_out) is nn.Linear and skipped.config.tie_word_embeddings
    assert type(model.embed_out) is Linear8bit  # in every format: int8, never 4 bits
    embedding = model.gpt_neox_japanese.embed_in.weight
    assert type(model.gpt_neox_japanese.embed_in) is nn.Embedding and embedding.dtype == torch.float32
    assert not model.config.tie_word_embeddings  # two tensors now: config.json says so
    assert model.embed_out.arithmetic == "fast"
    # The body is the same in both; the head's int8 rows (of float16-rounded weights, as bitsandbytes
    # takes them) are within half a step of the row's absmax / 127 of the embedding.
    hidden, logits = head_logits(model)
    _, dense_logits = head_logits(skipped)
    step = model.embed_out.SCB[:, None] / 127
    error = step / 2 + embedding.abs() * 2.0**-11 + 1e-8
    assert ((model.embed_out.dense_weight() - embedding).abs() <= error).all()
    bound = hidden.abs() @ error.T + 1e-5
    assert ((logits - dense_logits).abs() <= bound).all()
    assert not torch.equal(logits, dense_logits)


def test_the_8bit_head_saves_and_reloads_to_the_same_logits(tied_dir: Path, tmp_path: Path) -> None:
    model = load(tied_dir, **NF4_HEAD, llm_int8_skip_modules=[], cpu_arithmetic="exact")
    _, logits = head_logits(model)
    model.save_pretrained(tmp_path / "saved")
    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    assert tensors["embed_out.weight"].dtype == torch.int8
    assert tensors["embed_out.SCB"].shape == (TINY["vocab_size"],)
    assert tensors["gpt_neox_japanese.embed_in.weight"].dtype == torch.float32
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["llm_int8_skip_modules"] == []
    reloaded = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(reloaded.embed_out) is Linear8bit and reloaded.embed_out.arithmetic == "exact"
    assert type(reloaded.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h) is LinearNF4
    assert torch.equal(head_logits(reloaded)[1], logits)
    # restore_dense gives the dequantized head back as its own (untied) float weight
    dense = restore_dense(reloaded)
    assert type(dense.embed_out) is nn.Linear
    assert dense.embed_out.weight.data_ptr() != dense.gpt_neox_japanese.embed_in.weight.data_ptr()
    torch.testing.assert_close(head_logits(dense)[1], logits, atol=1e-4, rtol=1e-4)


def test_transformers_loads_the_int8_model_with_its_int8_head(tied_dir: Path, tmp_path: Path) -> None:
    """int8 with the head: an untied bitsandbytes int8 head in transformers, same logits within its
    float16 arithmetic (4-bit models with an int8 head are neoxja's own: transformers would read the
    head as 4-bit)."""
    import transformers

    model = load(tied_dir, **INT8_HEAD)
    model.save_pretrained(tmp_path / "int8")
    theirs = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "int8")
    assert type(theirs.embed_out).__name__ == "Linear8bitLt"
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits.float(), model(IDS).logits, atol=0.05, rtol=0.01)


def test_which_settings_quantize_the_head(tied_dir: Path, tmp_path: Path) -> None:
    for settings in ({"load_in_8bit": True}, {"load_in_8bit": True, "llm_int8_skip_modules": ["embed_out"]}):
        model = load(tied_dir, **settings)
        assert type(model.embed_out) is nn.Linear and model.config.tie_word_embeddings
        assert model.embed_out.weight is model.gpt_neox_japanese.embed_in.weight
    only_head = load(tied_dir, load_in_8bit=True, llm_int8_skip_modules=["dense_h_to_4h"])
    assert type(only_head.embed_out) is Linear8bit
    assert type(only_head.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h) is nn.Linear
    weight_format = GPTNeoXJapaneseForCausalLM.from_pretrained(tied_dir, weight_format="nf4")
    assert type(weight_format.embed_out) is nn.Linear  # weight_format= keeps transformers' default skip
    # An untied head is quantized from its own weight, not from the embedding.
    untied = make_reference({**TINY, "tie_word_embeddings": False}, seed=8)
    untied.save_pretrained(tmp_path / "untied")
    model = load(tmp_path / "untied", **INT8_HEAD)
    expected, _ = formats.quantize_int8(untied.embed_out.weight.detach().to(torch.float16))
    assert torch.equal(model.embed_out.weight, expected)


def test_a_damaged_int8_head_is_refused_by_name(tied_dir: Path, tmp_path: Path) -> None:
    load(tied_dir, **NF4_HEAD, llm_int8_skip_modules=[]).save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "model.safetensors"
    tensors = load_file(path)
    tensors["embed_out.SCB"] = tensors["embed_out.SCB"][:-1]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"embed_out\.SCB has shape \[31999\], the layer needs \[32000\]"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "saved")
