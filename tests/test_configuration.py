"""GPTNeoXJapaneseConfig: defaults, config.json in both transformers generations, validation, activations."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from neoxja.configuration import ACTIVATIONS, ROPE_TYPES, GPTNeoXJapaneseConfig, get_activation

Reference = transformers.GPTNeoXJapaneseConfig

# Keys only transformers' own config has (generic PreTrainedConfig fields, writer stamps).
_REFERENCE_ONLY = {
    "_name_or_path",
    "transformers_version",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "problem_type",
}


def _assert_same_config(ours: GPTNeoXJapaneseConfig, theirs: Reference) -> None:
    """Every field neoxja has equals transformers' field, and transformers has nothing else of substance."""
    ours_dict, theirs_dict = ours.to_dict(), theirs.to_dict()
    for key, value in ours_dict.items():
        assert key in theirs_dict, f"transformers lacks {key!r}"
        assert theirs_dict[key] == value, f"{key}: neoxja {value!r} vs transformers {theirs_dict[key]!r}"
    assert set(theirs_dict) - set(ours_dict) <= _REFERENCE_ONLY


def _write(directory: Path, data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}

LEGACY_SCALINGS = [
    None,
    {"type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"type": "yarn", "factor": 4.0},  # original_max_position_embeddings defaults to max_position_embeddings
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
     "original_max_position_embeddings": 256},
]  # fmt: skip


def test_defaults_are_the_seeds_and_transformers() -> None:
    config = GPTNeoXJapaneseConfig()
    seed = dict(
        vocab_size=32000, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
        intermediate_multiple_size=4, hidden_act="gelu", rotary_pct=1.0, rotary_emb_base=10000,
        max_position_embeddings=2048, initializer_range=0.02, layer_norm_eps=1e-5, use_cache=True,
        bos_token_id=31996, eos_token_id=31999, rope_scaling=None, attention_dropout=0.1, hidden_dropout=0.0,
    )  # fmt: skip
    for key, value in seed.items():
        assert getattr(config, key) == value, key
    assert config.tie_word_embeddings is True
    assert config.model_type == "gpt_neox_japanese"
    assert (config.head_dim, config.intermediate_size, config.rotary_ndims) == (80, 10240, 80)
    _assert_same_config(config, Reference())


@pytest.mark.parametrize("rope_scaling", LEGACY_SCALINGS)
def test_reads_config_written_by_transformers_4(tmp_path: Path, rope_scaling: dict | None) -> None:
    legacy = {
        **TINY,
        "architectures": ["GPTNeoXJapaneseForCausalLM"],
        "model_type": "gpt_neox_japanese",
        "rotary_pct": 0.5,
        "rotary_emb_base": 5000,
        "rope_scaling": rope_scaling,
        "torch_dtype": "float16",
        "tie_word_embeddings": False,
        "transformers_version": "4.46.0",
        "unknown_setting": {"kept": [1, 2]},
    }
    directory = _write(tmp_path, legacy)
    ours = GPTNeoXJapaneseConfig.from_pretrained(directory)
    _assert_same_config(ours, Reference.from_pretrained(directory))
    assert ours.rotary_pct == 0.5 and ours.rotary_emb_base == 5000 and ours.rotary_ndims == 8
    assert ours.torch_dtype == ours.dtype == torch.float16
    assert ours.tie_word_embeddings is False
    assert ours.unknown_setting == {"kept": [1, 2]}
    if rope_scaling is None:
        assert ours.rope_scaling is None
    else:
        assert {k: v for k, v in ours.rope_scaling.items() if k in rope_scaling} == rope_scaling


@pytest.mark.parametrize("rope_scaling", LEGACY_SCALINGS)
def test_reads_config_written_by_transformers_5(tmp_path: Path, rope_scaling: dict | None) -> None:
    rope_scaling = copy.deepcopy(rope_scaling)
    theirs = Reference(
        **TINY, rotary_pct=0.5, rotary_emb_base=300, rope_scaling=rope_scaling, dtype=torch.bfloat16
    )
    theirs.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    ours = GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    _assert_same_config(ours, Reference.from_pretrained(tmp_path))
    assert ours.dtype == torch.bfloat16
    assert ours.rotary_ndims == 8 and ours.rotary_emb_base == 300


_rope_parameters = st.sampled_from(
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 3.0},
        {"rope_type": "dynamic", "factor": 1.5},
        {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16.0, "original_max_position_embeddings": 128},
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0},
    ]
)


@settings(max_examples=15, deadline=None)
@given(
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 16]),
    rotary_pct=st.sampled_from([0.25, 0.5, 1.0]),
    rope=_rope_parameters,
    hidden_act=st.sampled_from(ACTIVATIONS),
    tie=st.booleans(),
    dtype=st.sampled_from([None, "float32", "float16", "bfloat16"]),
    extra=st.dictionaries(st.sampled_from(["alpha", "beta_note", "gamma"]), st.integers(-5, 5), max_size=2),
)
def test_transformers_loads_what_neoxja_writes(
    tmp_path_factory: pytest.TempPathFactory,
    heads: int,
    head_dim: int,
    rotary_pct: float,
    rope: dict,
    hidden_act: str,
    tie: bool,
    dtype: str | None,
    extra: dict,
) -> None:
    kwargs = dict(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_hidden_layers=2,
        rotary_pct=rotary_pct,
        rope_parameters=copy.deepcopy(rope),
        hidden_act=hidden_act,
        tie_word_embeddings=tie,
        dtype=dtype,
        pad_token_id=0,
        architectures=["GPTNeoXJapaneseForCausalLM"],
        **extra,
    )
    ours = GPTNeoXJapaneseConfig(**copy.deepcopy(kwargs))
    directory = tmp_path_factory.mktemp("saved")
    ours.save_pretrained(directory)
    loaded_by_transformers = Reference.from_pretrained(directory)
    _assert_same_config(ours, loaded_by_transformers)
    direct = Reference(**copy.deepcopy(kwargs)).to_dict()
    via_file = loaded_by_transformers.to_dict()
    for key in ("_name_or_path", "transformers_version"):
        direct.pop(key, None), via_file.pop(key, None)
    assert via_file == direct
    assert GPTNeoXJapaneseConfig.from_pretrained(directory) == ours


def test_round_trip_keeps_unknown_keys_and_later_attributes(tmp_path: Path) -> None:
    config = GPTNeoXJapaneseConfig(**TINY, quantization_note={"bits": 4, "layers": [0, 1]})
    config.added_later = "yes"
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["quantization_note"] == {"bits": 4, "layers": [0, 1]} and data["added_later"] == "yes"
    reloaded = GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    assert reloaded == config
    assert reloaded.to_dict() == config.to_dict()
    assert GPTNeoXJapaneseConfig.from_dict(json.loads(config.to_json_string())) == config


def test_legacy_names_read_and_write_rope_parameters() -> None:
    config = GPTNeoXJapaneseConfig(**TINY)
    config.rotary_pct = 0.5
    config.rotary_emb_base = 1234.0
    config.rope_scaling = {"type": "dynamic", "factor": 2.0}
    assert config.rope_parameters == {
        "type": "dynamic",
        "factor": 2.0,
        "rope_type": "dynamic",
        "rope_theta": 1234.0,
        "partial_rotary_factor": 0.5,
    }
    assert config.rotary_ndims == 8
    assert config.rope_scaling == {"type": "dynamic", "factor": 2.0, "rope_type": "dynamic"}
    config.torch_dtype = torch.float16
    assert config.dtype == torch.float16 and config.to_dict()["dtype"] == "float16"


def test_rope_scaling_beats_rope_parameters_as_in_transformers() -> None:
    kwargs = dict(
        **TINY,
        rotary_pct=0.5,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
        rope_scaling={"rope_type": "dynamic", "factor": 3.0},
    )
    ours = GPTNeoXJapaneseConfig(**copy.deepcopy(kwargs))
    _assert_same_config(ours, Reference(**copy.deepcopy(kwargs)))
    assert ours.rope_parameters["rope_type"] == "dynamic"


def test_overriding_rope_parameters_fills_in_the_rest(tmp_path: Path) -> None:
    GPTNeoXJapaneseConfig(**TINY, rotary_pct=0.5, rotary_emb_base=500).save_pretrained(tmp_path)
    config = GPTNeoXJapaneseConfig.from_pretrained(
        tmp_path, rope_parameters={"rope_type": "yarn", "factor": 2.0}
    )
    assert config.rope_parameters == {
        "rope_type": "yarn",
        "factor": 2.0,
        "rope_theta": 500.0,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 2048,
    }


def test_from_pretrained_overrides_and_hub_arguments(tmp_path: Path) -> None:
    _write(tmp_path / "sub", {**TINY, "model_type": "gpt_neox_japanese", "rotary_pct": 0.5})
    config = GPTNeoXJapaneseConfig.from_pretrained(
        tmp_path, subfolder="sub", revision=None, hidden_dropout=0.25, rotary_pct=0.25, new_key=7
    )
    assert config.hidden_dropout == 0.25 and config.rotary_pct == 0.25 and config.new_key == 7
    assert config.name_or_path == str(tmp_path)
    assert GPTNeoXJapaneseConfig.from_pretrained(tmp_path / "sub" / "config.json").rotary_pct == 0.5
    with pytest.raises(ValueError, match="attention_dropout"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path, subfolder="sub", attention_dropout=1.5)


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-neox-ja"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _write(repo / "snapshots" / commit, {**TINY, "model_type": "gpt_neox_japanese"})
    config = GPTNeoXJapaneseConfig.from_pretrained(
        "someone/tiny-neox-ja", cache_dir=tmp_path, local_files_only=True
    )
    assert config.hidden_size == 64


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="config.json"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    _write(tmp_path, {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="model_type"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    _write(tmp_path, {**TINY, "head_dim": 32})
    with pytest.raises(ValueError, match="head_dim"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)
    _write(tmp_path, {**TINY, "head_dim": 16, "intermediate_size": 256})  # consistent: accepted
    assert GPTNeoXJapaneseConfig.from_pretrained(tmp_path).head_dim == 16


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"hidden_size": 65}, "hidden_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_attention_heads": -2}, "num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 10.5}, "vocab_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"intermediate_multiple_size": 0}, "intermediate_multiple_size"),
        ({"hidden_act": "gelu_magic"}, "hidden_act"),
        ({"rotary_pct": 0.0}, "rotary_pct"),
        ({"rotary_pct": 1.5}, "rotary_pct"),
        ({"rotary_pct": 0.1}, "rotary_pct"),  # 1.6 rotary dims: not an even count
        ({"rotary_emb_base": -1}, "rotary_emb_base"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"hidden_dropout": 2}, "hidden_dropout"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
        ({"dtype": "int8"}, "dtype"),
        ({"rope_scaling": {"rope_type": "ntk-magic", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": -1.0}}, "factor"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
         "low_freq_factor"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                           "high_freq_factor": 1.0}}, "high_freq_factor"),
        ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 8}}, "short_factor"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}},
         "short_factor"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}},
         "original_max_position_embeddings"),
        ({"rope_parameters": [1, 2]}, "rope_parameters"),
    ],
)  # fmt: skip
def test_invalid_values_raise_value_error_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        GPTNeoXJapaneseConfig(**{**TINY, **kwargs})


def test_supported_rope_types_are_the_seeds() -> None:
    assert set(ROPE_TYPES) == {"default", "linear", "dynamic", "yarn", "longrope", "llama3"}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_match_transformers(name: str) -> None:
    x = torch.linspace(-12, 12, 1001, dtype=torch.float32)
    expected = ACT2FN[name](x)
    assert torch.equal(get_activation(name)(x), expected), name


def test_unknown_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="hidden_act"):
        get_activation("gelu_magic")


def test_equality_and_repr() -> None:
    assert GPTNeoXJapaneseConfig(**TINY) == GPTNeoXJapaneseConfig(**TINY)
    assert GPTNeoXJapaneseConfig(**TINY) != GPTNeoXJapaneseConfig(**{**TINY, "hidden_dropout": 0.5})
    text = repr(GPTNeoXJapaneseConfig(**TINY))
    assert text.startswith("GPTNeoXJapaneseConfig {") and '"hidden_size": 64' in text


def test_presets_build_valid_configs_and_unknown_names_are_listed() -> None:
    from neoxja.configuration import PRESETS

    tiny = GPTNeoXJapaneseConfig.from_preset("tiny", vocab_size=100)
    shape = (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.vocab_size)
    assert shape == (64, 2, 4, 100)
    assert GPTNeoXJapaneseConfig.from_preset("2.7b") == GPTNeoXJapaneseConfig()
    for name, fields in PRESETS.items():
        config = GPTNeoXJapaneseConfig.from_preset(name)
        assert {key: getattr(config, key) for key in fields} == fields
    with pytest.raises(ValueError, match="preset 'huge' is not one of tiny, small, 2.7b"):
        GPTNeoXJapaneseConfig.from_preset("huge")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
        ("use_cache", 1, "use_cache must be true or false, got 1"),
        ("return_dict", None, "return_dict must be true or false"),
        ("bos_token_id", "31996", "bos_token_id must be a token id"),
        ("pad_token_id", -1, "pad_token_id must be a token id"),
        ("eos_token_id", [1, "2"], "eos_token_id must be a token id or a list of them"),
        ("eos_token_id", True, "eos_token_id must be"),
        ("architectures", "GPTNeoXJapaneseForCausalLM", "architectures must be a list of class names"),
        ("architectures", [3], "architectures must be a list of class names"),
        ("torch_dtype", "int4", "torch_dtype='int4' is not one of the torch dtypes"),
        ("dtype", 16, "dtype=16 is not one of the torch dtypes"),
        ("num_hidden_layers", 10**9, "num_hidden_layers=1000000000 is beyond the limit of 1024"),
        ("hidden_size", 2**40, "hidden_size=1099511627776 is beyond the limit of 65536"),
        ("vocab_size", 10**30, "vocab_size=1000000000000000000000000000000 is beyond the limit"),
        ("max_position_embeddings", 2**40, "max_position_embeddings=1099511627776 is beyond the limit"),
        (
            "intermediate_multiple_size",
            1e300,
            r"intermediate_multiple_size=1e\+300 makes the MLP .* limit of 1048576",
        ),
        ("validate", False, "'validate' is a GPTNeoXJapaneseConfig method or class attribute, not a setting"),
        ("name_or_path", "x", "'name_or_path' is a GPTNeoXJapaneseConfig computed value, not a setting"),
        ("_dtype", "float32", "'_dtype' is the internal name of a GPTNeoXJapaneseConfig field"),
    ],
)
def test_wrong_types_and_sizes_in_config_json_name_file_and_key(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    _write(tmp_path, {**TINY, key: value})
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: {message}"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path)


def test_the_sizes_at_their_limits_are_accepted_and_overrides_are_checked_too(tmp_path: Path) -> None:
    from neoxja.configuration import SIZE_LIMITS

    config = GPTNeoXJapaneseConfig(**{**TINY, "num_hidden_layers": SIZE_LIMITS["num_hidden_layers"]})
    assert config.num_hidden_layers == 1024  # nothing is built: a config is only numbers
    _write(tmp_path, TINY)
    with pytest.raises(ValueError, match="num_hidden_layers=2048 is beyond the limit"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path, num_hidden_layers=2048)
    with pytest.raises(ValueError, match="'to_dict' is a GPTNeoXJapaneseConfig method"):
        GPTNeoXJapaneseConfig.from_pretrained(tmp_path, to_dict=None)
    assert GPTNeoXJapaneseConfig.from_pretrained(tmp_path, rotary_pct=0.5).rotary_pct == 0.5  # a property
