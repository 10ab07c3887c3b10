"""neoxja.BitsAndBytesConfig against transformers': the same defaults and serialization, and a clear
error for settings that cannot apply."""

from __future__ import annotations

import pytest
import torch

from neoxja import BitsAndBytesConfig

SETTINGS = [
    {},
    {
        "load_in_4bit": True,
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "float16",
    },  # the seed's example
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.bfloat16, "bnb_4bit_quant_storage": "bfloat16"},
    {"load_in_8bit": True, "llm_int8_threshold": 4.0, "llm_int8_skip_modules": ["embed_out"]},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_same_dict_as_transformers(settings: dict) -> None:
    import transformers

    theirs = transformers.BitsAndBytesConfig(**settings)
    ours = BitsAndBytesConfig(**settings)
    # neoxja's one key of its own; the rest is transformers' dict, key for key
    assert {
        key: value for key, value in ours.to_dict().items() if key != "cpu_arithmetic"
    } == theirs.to_dict()
    assert ours.to_dict()["cpu_arithmetic"] == "fast"
    assert ours.quantization_method() == theirs.quantization_method()
    assert ours.is_quantizable() == theirs.is_quantizable()
    assert ours.bnb_4bit_compute_dtype == theirs.bnb_4bit_compute_dtype
    assert BitsAndBytesConfig.from_dict(theirs.to_dict()) == ours  # what a quantized config.json holds


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit and load_in_8bit"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
        ({"bnb_4bit_compute_dtype": "int8"}, "bnb_4bit_compute_dtype"),
        ({"bnb_4bit_quant_storage": "complex64"}, "bnb_4bit_quant_storage"),
        ({"load_in_4bit": "yes"}, "load_in_4bit"),
        ({"llm_int8_threshold": "6"}, "llm_int8_threshold"),
        ({"llm_int8_threshold": float("nan")}, "llm_int8_threshold must be a finite number, got nan"),
        ({"llm_int8_threshold": float("inf")}, "llm_int8_threshold must be a finite number, got inf"),
        ({"llm_int8_skip_modules": "embed_out"}, "llm_int8_skip_modules"),
        ({"cpu_arithmetic": "quick"}, "cpu_arithmetic must be one of 'fast', 'exact', got 'quick'"),
        ({"cpu_arithmetic": None}, "cpu_arithmetic must be one of"),
    ],
)
def test_bad_settings_name_the_field(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BitsAndBytesConfig(**settings)


def test_other_methods_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        BitsAndBytesConfig.from_dict({"quant_method": "gptq", "bits": 4})
    with pytest.warns(UserWarning, match="ignores unknown settings: bnb_4bit_blocksize"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_blocksize=64)


@pytest.mark.parametrize("arithmetic", ["fast", "exact"])
def test_cpu_arithmetic_round_trips_and_transformers_reads_the_rest(arithmetic: str) -> None:
    import transformers

    ours = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", cpu_arithmetic=arithmetic)
    saved = ours.to_dict()
    assert saved["cpu_arithmetic"] == arithmetic
    assert BitsAndBytesConfig.from_dict(saved) == ours
    assert BitsAndBytesConfig.from_dict(saved).cpu_arithmetic == arithmetic
    theirs = transformers.BitsAndBytesConfig.from_dict(saved)  # an unknown key: transformers drops it
    assert (
        theirs.to_dict()
        == transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
    )
    assert BitsAndBytesConfig.from_dict(theirs.to_dict()).cpu_arithmetic == "fast"  # transformers' files
