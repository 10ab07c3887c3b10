"""Auto classes load GPT-NeoX-Japanese directories written by transformers and refuse other model types.

The tiny checkpoints come from ``conftest.build_tiny_checkpoint``: a random model saved by
transformers, the oracle, next to the real tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_tiny_checkpoint

import neoxja
from neoxja.auto import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), assets_dir)


def _foreign(tmp_path: Path, model_type: str = "gpt2") -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "n_embd": 8}))
    return tmp_path


def test_auto_config_matches_transformers(tiny_dir: Path) -> None:
    import transformers

    ours = AutoConfig.from_pretrained(tiny_dir)
    theirs = transformers.AutoConfig.from_pretrained(tiny_dir)
    assert isinstance(ours, neoxja.GPTNeoXJapaneseConfig)
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_auto_models_give_the_reference_outputs(tiny_dir: Path) -> None:
    import transformers

    ids = torch.tensor([[31996, 100, 2000, 30014, 5]])
    causal = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base = AutoModel.from_pretrained(tiny_dir)
    assert isinstance(causal, neoxja.GPTNeoXJapaneseForCausalLM)
    assert isinstance(base, neoxja.GPTNeoXJapaneseModel)
    reference = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        torch.testing.assert_close(causal(ids).logits, expected.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            base(ids).last_hidden_state, expected.hidden_states[-1], rtol=1e-4, atol=1e-5
        )


def test_auto_model_dtype_argument(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_auto_tokenizer_matches_transformers(tiny_dir: Path) -> None:
    import transformers

    text = "吾輩は猫である🐯。実は慶応(慶應)大学出身"
    ours = AutoTokenizer.from_pretrained(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert isinstance(ours, neoxja.GPTNeoXJapaneseTokenizer)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_auto_tokenizer_accepts_a_bare_tokenizer_directory(tmp_path: Path, assets_dir: Path) -> None:
    for name in ("vocab.txt", "emoji.json"):
        (tmp_path / name).write_bytes((assets_dir / name).read_bytes())
    assert AutoTokenizer.from_pretrained(tmp_path).encode(
        "猫"
    ) == neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir).encode("猫")


@pytest.mark.parametrize("auto_class", [AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer])
def test_other_model_types_are_refused_by_name(auto_class: type, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type='gpt2'.*'gpt_neox_japanese'"):
        auto_class.from_pretrained(_foreign(tmp_path))


def test_other_tokenizer_classes_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(ValueError, match="tokenizer_class='GPT2Tokenizer'.*GPTNeoXJapaneseTokenizer"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_quantization_config_may_be_a_dict(tiny_dir: Path) -> None:
    # as in transformers: a dict is BitsAndBytesConfig.from_dict's input (4-bit defaults to fp4)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config={"load_in_4bit": True})
    assert type(model.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h).__name__ == "LinearFP4"


def test_unknown_path_and_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="does not exist"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "missing" / "model"))
    with pytest.raises(OSError, match="no config.json"):
        AutoConfig.from_pretrained(tmp_path)


def test_from_config_builds_a_random_model() -> None:
    config = AutoConfig.for_model("gpt_neox_japanese", **TINY)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.hidden_size == 64
    with pytest.raises(ValueError, match="'bert'"):
        AutoConfig.for_model("bert")
