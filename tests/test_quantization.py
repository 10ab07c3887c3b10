"""Quantized weights against bitsandbytes (formats) and transformers + bitsandbytes (checkpoints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_reference
from safetensors.torch import load_file, save_file

import neoxja
from neoxja import BitsAndBytesConfig, GPTNeoXJapaneseForCausalLM
from neoxja.linear import restore_dense
from neoxja.quantization import formats
from neoxja.quantization.layers import Linear8bit, LinearBFloat16, LinearFP4, LinearNF4
from neoxja.quantization.loading import quantize

if os.environ.get("CI") == "true":
    import bitsandbytes  # noqa: F401  (CI installs it: a missing oracle must fail there)
bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

SEED_CONFIG = dict(
    load_in_4bit=True,
    bnb_4bit_use_double_quant=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype="float16",
)
IDS = torch.tensor([[5, 17, 300, 2, 999, 31000, 8, 64]])


def test_code_tables_are_bitsandbytes() -> None:
    assert torch.equal(formats.dynamic_code(), bnb_functional.create_dynamic_map())
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(
            formats.code_4bit(quant_type), bnb_functional.get_4bit_type(quant_type, device="cpu")
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(
    ("shape", "blocksize"), [((96, 128), 64), ((64, 256), 32), ((40, 512), 256), ((33, 70), 64)]
)
def test_quantize_4bit_equals_bitsandbytes(shape, blocksize, quant_type, dtype) -> None:
    torch.manual_seed(blocksize)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    weight[0, :3] = 0.0
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    ours = formats.quantize_4bit(weight, blocksize, quant_type)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    expected = state.code[torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1).long()]
    expected = expected[: weight.numel()] * state.absmax.repeat_interleave(blocksize)[: weight.numel()]
    assert torch.equal(ours.dequantize(torch.float32).view(-1), expected)
    if shape[1] % blocksize == 0:  # bitsandbytes' CPU kernel reads blocks per row
        assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantization_equals_bitsandbytes(quant_type: str) -> None:
    torch.manual_seed(1)
    weight = torch.randn(512, 256) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, compress_statistics=True, quant_type=quant_type)
    ours = formats.quantize_4bit(weight, 64, quant_type, double_quant=True)
    assert torch.equal(ours.packed, packed)
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    # bitsandbytes' CPU search rounds a few values next to a midpoint the other way (README): at most
    # one step, in at most 1% of the blocks.
    steps = (ours.absmax.long() - state.absmax.long()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() <= 0.01
    same = steps == 0
    assert torch.equal(
        ours.block_absmax()[same],
        bnb_functional.dequantize_blockwise(state.absmax, state.state2)[same] + state.offset,
    )


def test_int8_equals_bitsandbytes() -> None:
    weight = torch.randn(300, 200)
    expected_weight, expected_scb, _ = bnb_functional.int8_vectorwise_quant(weight.clone())
    ours, scb = formats.quantize_int8(weight)
    assert torch.equal(ours, expected_weight) and torch.equal(scb, expected_scb)


def test_bad_settings_name_the_problem() -> None:
    with pytest.raises(ValueError, match="blocksize=48"):
        formats.quantize_4bit(torch.randn(4, 96), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        formats.code_4bit("int4")
    with pytest.raises(ValueError, match="weight_format='q3'"):
        quantize(make_neoxja(), "q3")
    with pytest.raises(TypeError, match="BitsAndBytesConfig"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(_dense_dir(), quantization_config=object())


def make_neoxja() -> GPTNeoXJapaneseForCausalLM:
    return GPTNeoXJapaneseForCausalLM.from_pretrained(_dense_dir())


_DIRS: dict[str, Path] = {}


def _dense_dir() -> Path:
    return _DIRS["dense"]


@pytest.fixture(scope="module", autouse=True)
def dense_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dense")
    make_reference(TINY, seed=3).save_pretrained(directory)
    _DIRS["dense"] = directory
    return directory


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8", "bfloat16"])
def test_quantized_model_multiplies_by_its_dequantized_weights(name: str) -> None:
    options = {"double_quant": True} if name in ("nf4", "fp4") else {}
    model = quantize(make_neoxja(), name, **options)
    layer = model.gpt_neox_japanese.layers[0].attention.query_key_value
    assert (
        type(layer)
        is {"nf4": LinearNF4, "fp4": LinearFP4, "int8": Linear8bit, "bfloat16": LinearBFloat16}[name]
    )
    with torch.no_grad():
        logits = model(IDS).logits
        dense = restore_dense(quantize(make_neoxja(), name, **options))
        expected = dense.float()(IDS).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    reference = make_neoxja()(IDS).logits.detach()
    tolerance = {"bfloat16": 0.02, "int8": 0.05, "nf4": 0.5, "fp4": 1.0}[name]
    assert (logits - reference).abs().max() < tolerance  # near the float32 model, never equal
    assert not torch.equal(logits, reference)


def test_backward_reaches_the_input_not_the_weights() -> None:
    model = quantize(make_neoxja(), "nf4", double_quant=True)
    layer = model.gpt_neox_japanese.layers[1].mlp.dense_h_to_4h
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    dense_x = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(dense_x, layer.dense_weight()).square().sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in layer.parameters())


def _transformers_quantized(tmp_path: Path, **settings) -> tuple[Path, torch.Tensor]:
    """(directory, logits) of transformers + bitsandbytes quantizing the dense checkpoint on load."""
    import transformers

    model = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(
        _dense_dir(), quantization_config=transformers.BitsAndBytesConfig(**settings)
    )
    model.save_pretrained(tmp_path / "transformers")
    with torch.no_grad():
        return tmp_path / "transformers", model(IDS).logits.float()


@pytest.mark.parametrize(
    "settings", [SEED_CONFIG, {**SEED_CONFIG, "bnb_4bit_quant_type": "fp4"}, {"load_in_8bit": True}]
)
def test_checkpoints_load_both_ways(tmp_path: Path, settings: dict) -> None:
    import transformers

    written, expected = _transformers_quantized(tmp_path, **settings)
    ours = GPTNeoXJapaneseForCausalLM.from_pretrained(
        _dense_dir(), quantization_config=BitsAndBytesConfig(**settings)
    )
    loaded = GPTNeoXJapaneseForCausalLM.from_pretrained(written)  # pre-quantized: its config says how
    with torch.no_grad():
        ours_logits, loaded_logits = ours(IDS).logits, loaded(IDS).logits
    # transformers multiplies in float16 (the compute dtype) on this CPU, neoxja in float32
    torch.testing.assert_close(loaded_logits, expected, atol=0.05, rtol=0.01)
    torch.testing.assert_close(ours_logits, expected, atol=0.05, rtol=0.01)

    ours.save_pretrained(tmp_path / "neoxja")
    mine, theirs = (
        load_file(tmp_path / "neoxja" / "model.safetensors"),
        load_file(written / "model.safetensors"),
    )
    assert sorted(mine) == sorted(theirs)
    differing = [key for key in mine if not torch.equal(mine[key], theirs[key])]
    # only nested absmax indices may differ (the rounding above); everything else is byte-equal
    assert all(key.endswith("weight.absmax") for key in differing), differing
    config = json.loads((tmp_path / "neoxja" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] == settings.get("load_in_4bit", False)

    again = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "neoxja")
    reloaded = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "neoxja")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits.float(), expected, atol=0.05, rtol=0.01)
        assert torch.equal(reloaded(IDS).logits, ours_logits)  # no re-quantization, same numbers


def test_broken_prequantized_checkpoints_name_the_key(tmp_path: Path) -> None:
    written, _ = _transformers_quantized(tmp_path, **SEED_CONFIG)
    tensors = load_file(written / "model.safetensors")
    key = "gpt_neox_japanese.layers.1.attention.dense.weight.absmax"
    save_file({k: v for k, v in tensors.items() if k != key}, written / "model.safetensors")
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + " is missing"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(written)
    absmax = tensors[key]
    tensors[key] = absmax[:-1]
    save_file(tensors, written / "model.safetensors")
    with pytest.raises(ValueError, match=r"weight\.absmax has shape"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(written)
    tensors[key] = absmax
    state = key.replace("absmax", "quant_state.bitsandbytes__nf4")
    info = json.loads(bytes(tensors[state].tolist()))

    def with_state(**changes) -> dict:
        raw = json.dumps({**info, **changes}).encode()
        return {**tensors, state: torch.tensor(list(raw), dtype=torch.uint8)}

    for broken, message in [
        ({k: v for k, v in tensors.items() if k != state}, state.replace(".", r"\.") + " is missing"),
        (with_state(blocksize=48), "has blocksize 48"),
        (with_state(shape=[info["shape"][0] * 2, info["shape"][1] // 2]), "the model .* expects"),
        (with_state(quant_type="fp4"), "quant_type='fp4'"),
    ]:
        save_file(broken, written / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            GPTNeoXJapaneseForCausalLM.from_pretrained(written)


def test_generate_and_pipeline_take_quantized_models(tiny_checkpoint: Path) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint, weight_format="nf4")
    dense = restore_dense(GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint, weight_format="nf4"))
    prompt = torch.tensor([[10, 20, 30]])
    assert torch.equal(model.generate(prompt, max_new_tokens=6), dense.generate(prompt, max_new_tokens=6))
    pipe = neoxja.pipeline(
        "text-generation", model=model, tokenizer=neoxja.AutoTokenizer.from_pretrained(tiny_checkpoint)
    )
    assert pipe("こんにちは", max_new_tokens=4)[0]["generated_text"].startswith("こんにちは")


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_quantized_models_decode_with_the_c_step(tiny_checkpoint: Path, monkeypatch, name: str) -> None:
    from neoxja import cpu_decode, decoding

    if not cpu_decode.extension_available():
        if os.environ.get("CI") == "true":
            pytest.fail("neoxja._decode was not compiled (required in CI)")
        pytest.skip("neoxja._decode is not compiled: quantized models decode through PyTorch alone")
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint, weight_format=name)
    assert neoxja.explain_decoding(model).startswith("cpu-fused:")
    prompts = torch.tensor([[10, 20, 30, 40], [0, 0, 7, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    ours = model.generate(prompts, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    monkeypatch.setattr(decoding, "BACKENDS", (decoding.TorchBackend,))
    assert torch.equal(ours, model.generate(prompts, attention_mask=mask, max_new_tokens=8, pad_token_id=0))
    sampled = model.generate(prompts[:1], max_new_tokens=8, do_sample=True, seed=3)
    monkeypatch.undo()
    assert torch.equal(sampled, model.generate(prompts[:1], max_new_tokens=8, do_sample=True, seed=3))


def test_quantize_command_writes_a_checkpoint_that_loads_without_requantizing(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from neoxja.cli import main

    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(tiny_checkpoint), "--format", "nf4", "--out", str(out)]) == 0
    assert "nf4 linear layers" in capsys.readouterr().err  # a summary: stdout stays for results
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    )
    assert (out / "vocab.txt").is_file()
    loaded = GPTNeoXJapaneseForCausalLM.from_pretrained(out)
    fresh = GPTNeoXJapaneseForCausalLM.from_pretrained(
        tiny_checkpoint, quantization_config=BitsAndBytesConfig(**SEED_CONFIG)
    )
    assert torch.equal(
        loaded.gpt_neox_japanese.layers[0].mlp.dense_4h_to_h.weight,
        fresh.gpt_neox_japanese.layers[0].mlp.dense_4h_to_h.weight,
    )
    args = ["generate", "--model", str(out), "--max-new-tokens", "4", "--temperature", "0", "こんにちは"]
    assert main(args) == 0
    quantized_on_load = ["generate", "--model", str(tiny_checkpoint), "--quantize", "int8", *args[3:]]
    assert main(quantized_on_load) == 0
    assert main(["quantize", "--model", str(tiny_checkpoint), "--format", "int8", "--out", str(out)]) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err


KERNEL_CHECK = r"""
import torch
from neoxja.quantization import formats, kernels
torch.manual_seed(0)
for out_features, in_features, blocksize in [(96, 128, 64), (40, 256, 32), (64, 512, 256), (24, 96, 32),
                                               (33, 70, 64)]:
    weight = torch.randn(out_features, in_features) * 0.02
    for quant_type, nested in [("nf4", False), ("nf4", True), ("fp4", True)]:
        q = formats.quantize_4bit(weight, blocksize, quant_type, nested)
        dense = q.dequantize(torch.float32)
        args = (q.packed, q.absmax, q.code, blocksize, out_features)
        extra = dict(nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset)
        assert torch.equal(kernels.dequantize_4bit(*args, in_features, **extra), dense)
        assert torch.equal(kernels.dequantize_4bit(*args, in_features, **extra, rows=(3, 17)), dense[3:17])
        for rows in (1, 3, 8, 40):
            x = torch.randn(rows, in_features)
            y = kernels.linear_4bit(x, *args, **extra)
            torch.testing.assert_close(y, x @ dense.T, atol=1e-5, rtol=1e-4)
    int8, scb = formats.quantize_int8(weight)
    bf16 = weight.to(torch.bfloat16)
    for rows in (1, 5, 20):
        x = torch.randn(2, rows, in_features)
        expected = x @ formats.dequantize_int8(int8, scb).T
        torch.testing.assert_close(kernels.linear_int8(x, int8, scb), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kernels.linear_bf16(x, bf16), x @ bf16.float().T, atol=1e-5, rtol=1e-4)
print(kernels.kernel_name())
"""


@pytest.mark.parametrize("forced", ["", "avx2", "scalar"])
def test_cpu_kernels_multiply_by_the_dequantized_weights(forced: str) -> None:
    import subprocess
    import sys

    from neoxja.quantization import kernels

    if not kernels.extension_available():
        if os.environ.get("CI") == "true":
            pytest.fail("neoxja._quant was not compiled (required in CI)")
        pytest.skip("neoxja._quant is not compiled: quantized layers multiply through PyTorch")
    env = {**os.environ, "NEOXJA_QUANT_KERNEL": forced}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if forced:
        assert done.stdout.strip() == forced or (forced == "avx2" and done.stdout.strip() == "scalar")
