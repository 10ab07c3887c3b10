"""Quantized checkpoints refuse what no real file holds: each bad file is crafted from a good one that
neoxja saved from a tiny random model, and its error must name the file and the key."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT, make_reference
from safetensors.torch import load_file, save_file

from neoxja import BitsAndBytesConfig, GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM
from neoxja.quantization import formats
from neoxja.quantization.layers import LinearNF4
from neoxja.quantization.loading import QuantizationPlan, QuantizingLoader

LAYER = "gpt_neox_japanese.layers.0.attention.query_key_value"
STATE = LAYER + ".weight.quant_state.bitsandbytes__nf4"
IDS = torch.tensor([[5, 17, 100, 2, 99, 31, 8, 64]])
SETTINGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good checkpoints: a tiny random dense model, and neoxja's nf4 (double-quantized), fp4 and int8
    saves of it."""
    root = tmp_path_factory.mktemp("formats")
    make_reference(NO_DROPOUT, seed=5).save_pretrained(root / "dense")
    dirs = {"dense": root / "dense"}
    for name, settings in SETTINGS.items():
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(
            root / "dense", quantization_config=BitsAndBytesConfig(**settings)
        )
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def crafted(good: Path, tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the checkpoint ``good`` whose tensors ``change`` edited in place."""
    out = tmp_path / "crafted"
    shutil.copytree(good, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def refused(directory: Path, key: str, message: str) -> str:
    """Load ``directory``, expect a ValueError naming its weights file and ``key``, return the message."""
    with pytest.raises(ValueError) as caught:
        GPTNeoXJapaneseForCausalLM.from_pretrained(directory)
    text = str(caught.value)
    assert str(directory / "model.safetensors") in text, text
    assert key in text, text
    assert re.search(message, text), text
    return text


def set_state(**changes) -> Callable[[dict[str, torch.Tensor]], None]:
    """A change that rewrites keys of the first layer's quant state (None removes one)."""

    def change(tensors: dict[str, torch.Tensor]) -> None:
        info = json.loads(bytes(tensors[STATE].tolist()))
        info.update(changes)
        info = {k: v for k, v in info.items() if v is not None}
        tensors[STATE] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)

    return change


def set_tensor(key: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = edit(tensors[key].clone())

    return change


def put(index: int, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[index] = value
        return tensor

    return edit


def test_the_good_files_load_to_the_logits_of_the_model_that_saved_them(saved: dict[str, Path]) -> None:
    for name, settings in SETTINGS.items():
        quantized = GPTNeoXJapaneseForCausalLM.from_pretrained(
            saved["dense"], quantization_config=BitsAndBytesConfig(**settings)
        )
        reloaded = GPTNeoXJapaneseForCausalLM.from_pretrained(saved[name])
        with torch.no_grad():
            assert torch.equal(reloaded(IDS).logits, quantized(IDS).logits), name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "Tensor"}, r"dtype='Tensor', not one of float32, float16, bfloat16"),
        ({"dtype": "float64"}, r"dtype='float64', not one of"),
        ({"blocksize": "64"}, r"blocksize='64'; it must be an integer"),
        ({"blocksize": 64.0}, r"blocksize=64\.0; it must be an integer"),
        ({"shape": [-96, -32]}, r"shape=\[-96, -32\]; it must be \[out_features, in_features\]"),
        ({"shape": [96.0, 32]}, r"shape=\[96\.0, 32\]"),
        ({"nested_offset": math.nan}, r"nested_offset=nan; .* finite number in \[0, "),
        ({"nested_offset": math.inf}, r"nested_offset=inf"),
        ({"nested_offset": 1e39}, r"nested_offset=1e\+39; .* in \[0, 3\.40282e\+38\]"),
        ({"nested_offset": -0.5}, r"nested_offset=-0\.5"),
        ({"nested_offset": "0.1"}, r"nested_offset='0\.1'"),
        ({"nested_offset": None}, r"lacks nested_offset, needed with double quantization"),
        ({"nested_blocksize": 128}, r"nested_blocksize=128, not 256"),
        ({"nested_dtype": "float16"}, r"nested_dtype='float16', not 'float32'"),
        ({"extra": 1}, r"has keys bitsandbytes does not know: extra"),
    ],
)
def test_quant_state_values_are_checked(saved, tmp_path, changes: dict, message: str) -> None:
    refused(crafted(saved["nf4"], tmp_path, set_state(**changes)), STATE, message)


def test_a_quant_state_must_be_json_bytes_nested_at_most_64_deep(saved, tmp_path) -> None:
    deep = json.dumps({"quant_type": "nf4", "x": [[]] * 1}).replace("[[]]", "[" * 100 + "]" * 100)
    raw = torch.tensor(list(deep.encode()), dtype=torch.uint8)
    refused(crafted(saved["nf4"], tmp_path, lambda t: t.update({STATE: raw})), STATE, "nested more than 64")
    as_floats = set_tensor(STATE, lambda state: state.float())
    refused(crafted(saved["nf4"], tmp_path / "f", as_floats), STATE, r"must be a 1-d uint8 tensor")
    not_json = torch.tensor(list(b"{'quant_type': 'nf4'}"), dtype=torch.uint8)
    refused(
        crafted(saved["nf4"], tmp_path / "j", lambda t: t.update({STATE: not_json})), STATE, "not valid JSON"
    )


@pytest.mark.parametrize(
    ("key", "edit", "message"),
    [
        ("weight.nested_absmax", put(0, math.nan), r"holds nan at index \[0\]; .* finite values in \[0, "),
        ("weight.nested_absmax", put(0, -0.5), r"holds -0\.5 at index \[0\]"),
        (
            "weight.nested_absmax",  # finite in float64, beyond float32: the kernels' arithmetic
            lambda t: torch.full_like(t, 1e39, dtype=torch.float64),
            r"holds inf at index \[0\]",
        ),
        ("weight.nested_quant_map", put(7, 2.0), r"holds 2\.0 at index \[7\]; .* in \[-1, 1\]"),
        ("weight.nested_quant_map", put(3, -math.inf), r"holds -inf at index \[3\]"),
        ("weight.nested_quant_map", lambda t: t[:255], r"has shape \[255\], the layer needs \[256\]"),
        ("weight.quant_map", put(3, math.nan), r"holds nan at index \[3\]"),
        ("weight.quant_map", put(15, 0.99), r"is not bitsandbytes' nf4 table"),
        ("weight.quant_map", lambda t: formats.code_4bit("fp4"), r"is not bitsandbytes' nf4 table"),
        ("weight.quant_map", lambda t: t[:8], r"has shape \[8\], the layer needs \[16\]"),
        ("weight.absmax", lambda t: t.float(), r"must be uint8 with double quantization"),
        (
            "weight",
            lambda t: t.reshape(-1).view(torch.int32).reshape(-1, 1),
            r"is torch\.int32, not a 4-bit storage dtype",
        ),
    ],
)
def test_double_quantized_tensors_are_checked(saved, tmp_path, key: str, edit, message: str) -> None:
    refused(crafted(saved["nf4"], tmp_path, set_tensor(f"{LAYER}.{key}", edit)), f"{LAYER}.{key}", message)


def test_an_offset_that_makes_block_absmax_negative_is_refused(saved, tmp_path) -> None:
    # The offset is the mean of the block absmax; without it the blocks below the mean come out
    # negative, which would flip their weights' signs.
    text = refused(
        crafted(saved["nf4"], tmp_path, set_state(nested_offset=0.0)),
        f"{LAYER}.weight.absmax",
        r"with nested_offset=0\.0 gives block \d+ the absmax -",
    )
    assert "lies in [0, 3.40282e+38]" in text


def test_nested_tensors_without_a_nested_state_are_refused(saved, tmp_path) -> None:
    # the nested offset went missing with its siblings: the nested tensors cannot be read
    change = set_state(nested_offset=None, nested_blocksize=None, nested_dtype=None)
    refused(
        crafted(saved["nf4"], tmp_path, change), STATE, r"lacks nested_blocksize, nested_dtype, nested_offset"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (put(0, math.nan), r"holds nan at index \[0\]"),
        (put(1, -0.5), r"holds -0\.5 at index \[1\]; the format needs finite values in \[0, 3\.40282e\+38\]"),
        (put(2, math.inf), r"holds inf at index \[2\]"),
        (lambda t: t.to(torch.int32), r"holds torch\.int32 values"),
    ],
)
def test_plain_absmax_is_finite_and_non_negative(saved, tmp_path, edit, message: str) -> None:
    key = f"{LAYER}.weight.absmax"
    refused(crafted(saved["fp4"], tmp_path, set_tensor(key, edit)), key, message)


def test_absmax_beyond_the_weight_dtype_is_refused(saved, tmp_path) -> None:
    state = STATE.replace("nf4", "fp4")

    def to_float16_with_a_huge_block(tensors: dict[str, torch.Tensor]) -> None:
        info = json.loads(bytes(tensors[state].tolist())) | {"dtype": "float16"}
        tensors[state] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
        tensors[f"{LAYER}.weight.absmax"][4] = 1e5  # no float16 weight is that large

    key = f"{LAYER}.weight.absmax"
    refused(
        crafted(saved["fp4"], tmp_path, to_float16_with_a_huge_block),
        key,
        r"holds 100000\.0 at .* \[0, 65504\]",
    )


def test_tensors_a_layer_has_no_place_for_are_refused(saved, tmp_path) -> None:
    key = f"{LAYER}.weight.extra"
    stray = crafted(saved["nf4"], tmp_path, lambda t: t.update({key: torch.zeros(2)}))
    refused(stray, key, r"is not part of a .* layer's format")
    scb = crafted(saved["fp4"], tmp_path / "s", lambda t: t.update({f"{LAYER}.SCB": torch.ones(96)}))
    refused(scb, f"{LAYER}.SCB", r"is not part of a .* layer's format")
    # nested tensors in a file whose quant state has no double quantization
    nested = {f"{LAYER}.weight.nested_absmax": torch.ones(1)}
    with_nested = crafted(saved["fp4"], tmp_path / "n", lambda t: t.update(nested))
    refused(with_nested, STATE.replace("nf4", "fp4"), r"lacks nested_blocksize, nested_dtype, nested_offset")


@pytest.mark.parametrize(
    ("key", "edit", "message"),
    [
        ("SCB", put(0, math.nan), r"holds nan at index \[0\]"),
        ("SCB", put(1, -1.0), r"holds -1\.0 at index \[1\]; the format needs finite values in \[0, "),
        ("SCB", lambda t: t.double().index_fill(0, torch.tensor([2]), 1e300), r"holds inf at index \[2\]"),
        ("SCB", lambda t: t.to(torch.int32), r"holds torch\.int32 values"),
        ("weight", put(5, -128), r"holds -128 at index \[0, 5\]; int8 rows lie in \[-127, 127\]"),
        ("weight_format", lambda t: torch.zeros(2, dtype=torch.uint8), r"must be one integer"),
        ("weight_format", lambda t: torch.tensor(1, dtype=torch.uint8), r"is 1; only 0 \(row\)"),
    ],
)
def test_int8_values_are_checked(saved, tmp_path, key: str, edit, message: str) -> None:
    refused(crafted(saved["int8"], tmp_path, set_tensor(f"{LAYER}.{key}", edit)), f"{LAYER}.{key}", message)


def test_an_all_zero_int8_row_with_scale_zero_loads(saved, tmp_path) -> None:
    """bitsandbytes writes SCB 0 for a row of zeros (quantize_int8 does too): zero is a real scale."""

    def zero_row(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{LAYER}.weight"][3] = 0
        tensors[f"{LAYER}.SCB"][3] = 0.0

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(crafted(saved["int8"], tmp_path, zero_row))
    layer = model.gpt_neox_japanese.layers[0].attention.query_key_value
    assert torch.equal(layer.dense_weight()[3], torch.zeros(layer.in_features))
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_bitsandbytes_double_quantization_of_zero_blocks_loads() -> None:
    """bitsandbytes' own serialization (QuantState.as_dict) of a weight with all-zero blocks, whose
    double-quantized absmax may come back a rounding step below zero, loads to its dequantization."""
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    weight[:4] = 0
    packed, state = functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    tensors = {"weight." + key: value for key, value in state.as_dict(packed=True).items()}
    layer = LinearNF4.from_state({**tensors, "weight": packed}, "layer.", None)
    assert torch.equal(layer.dense_weight(), functional.dequantize_4bit(packed, state))


def test_a_layer_tensor_in_two_files_is_refused(saved) -> None:
    with torch.device("meta"):
        model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig.from_pretrained(saved["dense"]))
    plan = QuantizationPlan.from_config(BitsAndBytesConfig(**SETTINGS["int8"]))
    loader = QuantizingLoader(model, plan, True, torch.device("cpu"), torch.float32)
    scb = torch.ones(96)
    assert loader(f"{LAYER}.SCB", Path("a.safetensors"), scb)
    with pytest.raises(ValueError, match=rf"b\.safetensors: {LAYER}\.SCB is also in a\.safetensors"):
        loader(f"{LAYER}.SCB", Path("b.safetensors"), scb)


@pytest.mark.parametrize(
    ("saved_config", "message"),
    [
        (["load_in_4bit"], r"quantization_config must be an object, got a list"),
        ({"load_in_4bit": "yes"}, r"quantization_config: load_in_4bit must be True or False, got 'yes'"),
        ({"load_in_8bit": True, "llm_int8_threshold": math.nan}, r"llm_int8_threshold must be a finite"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": 4}, r"bnb_4bit_quant_type must be one of"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": ["float16"]}, r"bnb_4bit_compute_dtype must be"),
        ({"load_in_4bit": True, "quant_method": "gptq"}, r"quant_method='gptq'"),
    ],
)
def test_quantization_config_in_config_json_names_the_file_and_key(
    saved, tmp_path, saved_config, message
) -> None:
    directory = tmp_path / "model"
    shutil.copytree(saved["nf4"], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": saved_config}))
    with pytest.raises(ValueError, match=message) as caught:
        GPTNeoXJapaneseForCausalLM.from_pretrained(directory)
    assert str(directory / "config.json") in str(caught.value)
