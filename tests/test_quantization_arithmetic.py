"""The quantized layers' CPU arithmetic: the ``cpu_arithmetic`` setting (config, layers, loads, the
``NEOXJA_CPU_ARITHMETIC`` override, ``set_arithmetic``) and the prompt path it selects, bfloat16 tiles
against the exact float32 path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_reference

from neoxja import BitsAndBytesConfig, GPTNeoXJapaneseForCausalLM
from neoxja.configuration import PRESETS
from neoxja.quantization import arithmetic, describe, formats, kernels, resolve, set_arithmetic
from neoxja.quantization.layers import QUANTIZED_FORMATS, QuantizedLinear
from neoxja.quantization.loading import plan_for

FORMATS = ("bfloat16", "int8", "nf4", "fp4")
UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-arithmetic")
    make_reference(TINY, seed=5).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(arithmetic.ENVIRONMENT_VARIABLE, raising=False)


def quantized_layers(model: torch.nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


@pytest.mark.parametrize("name", FORMATS)
def test_each_layer_carries_the_setting_it_was_built_with(name: str) -> None:
    linear = torch.nn.Linear(64, 48)
    fmt = QUANTIZED_FORMATS[name]
    assert fmt.from_linear(linear).arithmetic == "fast"  # the default
    layer = fmt.from_linear(linear, cpu_arithmetic="exact")
    assert layer.arithmetic == "exact" and resolve(layer) == "exact"
    assert "arithmetic=exact" in repr(layer)
    with pytest.raises(ValueError, match="cpu_arithmetic must be one of 'fast', 'exact', got 'quick'"):
        fmt.from_linear(linear, cpu_arithmetic="quick")


def test_from_pretrained_config_and_saved_files_keep_the_setting(tiny_dir: Path, tmp_path: Path) -> None:
    settings = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(
        tiny_dir, quantization_config=BitsAndBytesConfig(**settings, cpu_arithmetic="exact")
    )
    assert {layer.arithmetic for layer in quantized_layers(model)} == {"exact"}
    assert model.config.quantization_config["cpu_arithmetic"] == "exact"
    model.save_pretrained(tmp_path / "nf4")
    saved = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert saved["cpu_arithmetic"] == "exact"
    reloaded = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "nf4")  # pre-quantized: as saved
    assert {layer.arithmetic for layer in quantized_layers(reloaded)} == {"exact"}
    # asking for the same format with another arithmetic takes it: the setting is not the format
    fast = GPTNeoXJapaneseForCausalLM.from_pretrained(
        tmp_path / "nf4", quantization_config=BitsAndBytesConfig(**settings)
    )
    assert {layer.arithmetic for layer in quantized_layers(fast)} == {"fast"}
    assert fast.config.quantization_config["cpu_arithmetic"] == "fast"


def test_the_load_argument_wins_and_is_checked(tiny_dir: Path, tmp_path: Path) -> None:
    for weight_format in FORMATS:
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(
            tiny_dir, weight_format=weight_format, cpu_arithmetic="exact"
        )
        assert {layer.arithmetic for layer in quantized_layers(model)} == {"exact"}, weight_format
    # a pre-quantized file saved fast, loaded exact
    GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir, weight_format="nf4").save_pretrained(
        tmp_path / "nf4"
    )
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "nf4", cpu_arithmetic="exact")
    assert {layer.arithmetic for layer in quantized_layers(model)} == {"exact"}
    with pytest.raises(ValueError, match="cpu_arithmetic must be one of 'fast', 'exact', got 'fastest'"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir, weight_format="nf4", cpu_arithmetic="fastest")
    with pytest.raises(ValueError, match="cpu_arithmetic applies to quantized and bfloat16 layers"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir, cpu_arithmetic="exact")
    # the plan behind those loads
    config = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir).config
    for weight_format in FORMATS:
        plan, prequantized = plan_for(config, None, weight_format, "exact")
        assert plan.arithmetic == "exact" and not prequantized
        assert plan.config is None or plan.config.cpu_arithmetic == "exact"
    asked = BitsAndBytesConfig(load_in_8bit=True, cpu_arithmetic="fast")
    plan, _ = plan_for(config, asked, None, "exact")
    assert plan.arithmetic == "exact" and plan.config.cpu_arithmetic == "exact"
    assert asked.cpu_arithmetic == "fast"  # the caller's config is left as it was
    with pytest.raises(ValueError, match="cpu_arithmetic must be one of 'fast', 'exact', got 'fastest'"):
        plan_for(config, None, "nf4", "fastest")
    with pytest.raises(ValueError, match="cpu_arithmetic applies to quantized and bfloat16 layers"):
        plan_for(config, None, None, "exact")


def test_the_environment_overrides_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = QUANTIZED_FORMATS["nf4"].from_linear(torch.nn.Linear(128, 96))
    x = torch.randn(20, 128)
    monkeypatch.setattr(kernels, "bfloat16_matmul_feature", lambda: "AVX512_BF16")
    with torch.no_grad():
        fast = layer(x)
        layer.arithmetic = "exact"
        exact = layer(x)
        layer.arithmetic = "fast"
        assert not torch.equal(fast, exact)
        monkeypatch.setenv(arithmetic.ENVIRONMENT_VARIABLE, "exact")
        assert resolve(layer) == "exact" and layer.arithmetic == "fast"
        assert torch.equal(layer(x), exact)
        assert "(NEOXJA_CPU_ARITHMETIC)" in describe(layer)
        monkeypatch.setenv(arithmetic.ENVIRONMENT_VARIABLE, "")  # empty: unset
        assert resolve(layer) == "fast"
        for bad in ("Fast", "1", "float32"):
            monkeypatch.setenv(arithmetic.ENVIRONMENT_VARIABLE, bad)
            with pytest.raises(ValueError, match=f"variable NEOXJA_CPU_ARITHMETIC must be .*got '{bad}'"):
                layer(x)


def test_set_arithmetic_changes_the_model_in_place_and_says_so(tiny_dir: Path) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir, weight_format="int8")
    assert set_arithmetic(model, "exact") is model
    assert {layer.arithmetic for layer in quantized_layers(model)} == {"exact"}
    assert model.config.quantization_config["cpu_arithmetic"] == "exact"
    with pytest.raises(ValueError, match="cpu_arithmetic must be one of"):
        set_arithmetic(model, "EXACT")
    assert {layer.arithmetic for layer in quantized_layers(model)} == {"exact"}  # a refusal changes nothing
    dense = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="has no quantized layers"):
        set_arithmetic(dense, "fast")


def test_the_ops_refuse_an_unknown_arithmetic_by_name() -> None:
    weight, scb = formats.quantize_int8(torch.randn(8, 16))
    x = torch.randn(2, 16)
    assert torch.equal(
        torch.ops.neoxja.linear_int8(x, weight, scb), torch.ops.neoxja.linear_int8(x, weight, scb, "exact")
    )
    with pytest.raises(ValueError, match="arithmetic must be one of 'fast', 'exact', got 'slow'"):
        torch.ops.neoxja.linear_int8(x, weight, scb, "slow")
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        torch.ops.neoxja.linear_bf16(x, weight.to(torch.bfloat16), "bf16")


def test_describe_names_the_setting_and_the_prompt_path(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = QUANTIZED_FORMATS["nf4"].from_linear(torch.nn.Linear(64, 64))
    monkeypatch.setattr(kernels, "bfloat16_matmul_feature", lambda: "AMX")
    assert describe(layer).startswith("nf4 fast: decoding rows ")
    assert "prompts bfloat16 tiles through oneDNN (AMX)" in describe(layer)
    monkeypatch.setattr(kernels, "bfloat16_matmul_feature", lambda: None)
    assert "prompts float32 tiles through BLAS (the CPU has neither AVX512_BF16 nor AMX)" in describe(layer)
    layer.arithmetic = "exact"
    assert describe(layer).endswith("prompts float32 tiles through BLAS")


# ----- the prompt path: bfloat16 tiles against the exact float32 product ------------------------


def _layer(name: str, out_features: int, in_features: int, cpu_arithmetic: str) -> QuantizedLinear:
    torch.manual_seed(1)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    options = {"double_quant": True} if name in ("nf4", "fp4") else {}
    return QUANTIZED_FORMATS[name].from_linear(linear, cpu_arithmetic=cpu_arithmetic, **options)


@pytest.mark.parametrize("name", FORMATS)
def test_prompt_tiles_stay_within_bfloat16_rounding_of_the_exact_product(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = kernels.MATVEC_ROWS + 29  # a prompt: more rows than the decoding kernels take
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 96 * 256)  # several tiles, a short last one
    fast, exact = _layer(name, 300, 256, "fast"), _layer(name, 300, 256, "exact")
    dense = exact.dense_weight().float()
    x = torch.randn(2, rows, 256)
    monkeypatch.setattr(kernels, "bfloat16_matmul_feature", lambda: "AVX512_BF16")
    with torch.no_grad():
        y_fast, y_exact = fast(x), exact(x)
    torch.testing.assert_close(y_exact, x @ dense.T, atol=1e-5, rtol=1e-5)  # exact: float32 throughout
    # The activation and (but for int8, exact in bfloat16) the dequantized weight rounded to bfloat16,
    # float32 sums, the product rounded to bfloat16: each a relative error of at most one unit.
    bound = 3 * UNIT * (x.abs() @ dense.abs().T) + 1e-6
    assert ((y_fast - y_exact).abs() <= bound).all()
    assert not torch.equal(y_fast, y_exact)
    if name != "int8":  # oneDNN's bfloat16 product ran: every value is a bfloat16 (int8 scales it after)
        assert torch.equal(y_fast, y_fast.to(torch.bfloat16).float())
    # a CPU without AVX512_BF16 or AMX keeps float32 BLAS: then the fast prompt is the exact one
    monkeypatch.setattr(kernels, "bfloat16_matmul_feature", lambda: None)
    with torch.no_grad():
        assert torch.equal(fast(x), y_exact)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_prompt_logits_stay_far_within_each_formats_error(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt's logits through bfloat16 tiles against the exact path of the same format, measured
    against that format's own error (its exact logits against the float32 model's)."""
    directory = tmp_path / preset
    make_reference({"vocab_size": 32000, **PRESETS[preset]}, seed=3).save_pretrained(directory)
    monkeypatch.setattr(kernels, "bfloat16_matmul_feature", lambda: "AVX512_BF16")
    ids = torch.randint(10, 31000, (2, 24), generator=torch.Generator().manual_seed(1))
    dense = GPTNeoXJapaneseForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        reference = dense(ids).logits
    del dense
    # bfloat16 arithmetic adds about what bfloat16 weights cost; for the others it is a small part
    share = {"bfloat16": 2.0, "int8": 0.6, "nf4": 0.1, "fp4": 0.1}
    for name in FORMATS:
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(directory, weight_format=name)
        with torch.no_grad():
            fast = model(ids).logits
            exact = set_arithmetic(model, "exact")(ids).logits
        format_error = (exact - reference).abs().max()
        assert (fast - exact).abs().max() <= share[name] * format_error, name
        exact_log, fast_log = exact.log_softmax(-1), fast.log_softmax(-1)
        kl = (exact_log.exp() * (exact_log - fast_log)).sum(-1)
        assert kl.mean() < 1e-3, name  # issue 21's floor on the reference model is 0.002 nats
