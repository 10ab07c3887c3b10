"""Issue 24's conventions in quantize, init, tokenize and the quantized loads: one rule for a format
asked of a pre-quantized checkpoint, ``--output/-o`` with ``--overwrite``, ``--tokenizer``, and the
files of a save following the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from neoxja import BitsAndBytesConfig, GPTNeoXJapaneseForCausalLM
from neoxja.cli import main
from neoxja.quantization.layers import Linear8bit, LinearNF4


@pytest.fixture(scope="module")
def nf4_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-quantized nf4 checkpoint, written by ``neoxja quantize``."""
    out = tmp_path_factory.mktemp("nf4") / "model"
    assert main(["quantize", "--model", str(tiny_checkpoint), "--quantize", "nf4", "-o", str(out)]) == 0
    return out


def dense_4h(model: GPTNeoXJapaneseForCausalLM) -> torch.nn.Module:
    return model.gpt_neox_japanese.layers[0].mlp.dense_4h_to_h


# ----- a format asked of a pre-quantized checkpoint --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, said",
    [
        ({"weight_format": "int8"}, "weight_format='int8' asks for int8"),
        ({"weight_format": "bfloat16"}, "weight_format='bfloat16' asks for bfloat16"),
        ({"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}, "quantization_config (int8) asks"),
        (
            {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}},
            "quantization_config (fp4) asks for fp4",
        ),
    ],
)
def test_another_format_than_the_checkpoints_is_an_error_naming_both(
    nf4_dir: Path, kwargs: dict, said: str
) -> None:
    with pytest.raises(ValueError) as raised:
        GPTNeoXJapaneseForCausalLM.from_pretrained(nf4_dir, **kwargs)
    message = str(raised.value)
    assert said in message and f"{nf4_dir} is already quantized to nf4" in message
    assert "quantize the float checkpoint" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_format": "nf4"},
        {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")},
        {"cpu_arithmetic": "exact"},  # another setting, not a format: allowed
    ],
)
def test_the_checkpoints_own_format_loads_as_saved(nf4_dir: Path, kwargs: dict) -> None:
    plain = GPTNeoXJapaneseForCausalLM.from_pretrained(nf4_dir)
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(nf4_dir, **kwargs)
    assert isinstance(dense_4h(model), LinearNF4)
    assert torch.equal(dense_4h(model).weight, dense_4h(plain).weight)
    assert dense_4h(model).arithmetic == kwargs.get("cpu_arithmetic", "fast")


def test_an_int8_checkpoint_accepts_transformers_8bit_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """BitsAndBytesConfig(load_in_8bit=True) leaves bnb_4bit_quant_type at transformers' fp4: the format is
    still int8's, the checkpoint's own (it used to be refused as "another format")."""
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(tiny_checkpoint), "--format", "int8", "--out", str(out)]) == 0
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(
        out, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert isinstance(dense_4h(model), Linear8bit)
    with pytest.raises(ValueError, match="weight_format='nf4' asks for nf4, but .* quantized to int8"):
        GPTNeoXJapaneseForCausalLM.from_pretrained(out, weight_format="nf4")


def test_quantize_refuses_another_format_of_a_quantized_checkpoint_before_loading(
    nf4_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import neoxja.auto

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(neoxja.auto.AutoModelForCausalLM, "from_pretrained", no_load)
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(nf4_dir), "--quantize", "int8", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize int8 asks for int8" in err
    assert "already quantized to nf4" in err
    assert not out.exists()


def test_generate_quantize_on_a_quantized_checkpoint(
    nf4_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--quantize`` goes through weight_format=: another format is refused, the same one loads."""
    args = ["generate", "--model", str(nf4_dir), "--max-new-tokens", "2", "--temperature", "0"]
    assert main([*args, "--quantize", "int8", "猫"]) == 2
    err = capsys.readouterr().err
    assert "--quantize int8 asks for int8" in err and "already quantized to nf4" in err
    assert err.count("\n") == 1
    assert main([*args, "--quantize", "nf4", "猫"]) == 0


def test_serve_refuses_another_format_of_a_quantized_checkpoint_before_opening_the_port(
    nf4_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import neoxja.serving.process

    def no_listen(host: str, port: int) -> None:
        raise AssertionError("the port was opened")

    monkeypatch.setattr(neoxja.serving.process, "listen", no_listen)
    assert main(["serve", "--model", str(nf4_dir), "--quantize", "fp4", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize fp4 asks for fp4" in err and "quantized to nf4" in err


# ----- --output, --overwrite -------------------------------------------------------------------------


def test_init_output_spellings_and_non_empty_output_refused_unless_overwrite(
    tmp_path: Path, assets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    base = ["init", "--tokenizer", str(assets_dir)]
    assert main([*base, "--output", str(out)]) == 0
    out_text, err = capsys.readouterr()
    assert "wrote a random tiny model" in err and out_text == ""  # a summary: stderr, stdout stays clean
    (out / "NOTES.md").write_text("mine")
    first = (out / "model.safetensors").read_bytes()
    for spelling in ("--output", "-o", "--out"):
        assert main([*base, spelling, str(out), "--seed", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--output {out} is not empty: pass --overwrite" in err
    assert (out / "model.safetensors").read_bytes() == first
    assert main([*base, "-o", str(out), "--seed", "1", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first  # replaced
    assert (out / "NOTES.md").read_text() == "mine"  # what init does not write stays


def test_quantize_output_refused_before_loading_and_overwrite_replaces(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import neoxja.auto

    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("x")
    real = neoxja.auto.AutoModelForCausalLM.from_pretrained
    loads: list[object] = []
    monkeypatch.setattr(
        neoxja.auto.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    argv = ["quantize", "--model", str(tiny_checkpoint), "--format", "int8", "--out", str(out)]
    assert main(argv) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err and loads == []
    (tmp_path / "file").write_text("x")
    assert main([*argv[:-2], "-o", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and loads == []
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    assert (out / "old.txt").read_text() == "x" and len(loads) == 1


# ----- tokenize --tokenizer --------------------------------------------------------------------------


def test_tokenize_takes_tokenizer(
    tiny_checkpoint: Path, assets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokenize", "--model", str(tiny_checkpoint), "吾輩は猫である"]) == 0
    expected = capsys.readouterr().out
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    assert main(["tokenize", "--model", str(weights_only), "吾輩は猫である"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no vocab.txt" in err and "--tokenizer DIR" in err
    argv = ["tokenize", "--model", str(weights_only), "--tokenizer", str(assets_dir), "吾輩は猫である"]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected
    assert main(["tokenize", "--tokenizer", str(tmp_path / "missing"), "猫"]) == 2
    assert f"--tokenizer {tmp_path / 'missing'}" in capsys.readouterr().err


# ----- file modes ------------------------------------------------------------------------------------


def test_every_file_init_and_quantize_write_follows_the_umask(
    tiny_checkpoint: Path, assets_dir: Path, tmp_path: Path
) -> None:
    """0666 less the umask, as a plain open() gives (the temporary directory and the library's own
    0600 safetensors file are not what the user sees)."""
    previous = os.umask(0o002)
    try:
        assert main(["init", "--tokenizer", str(assets_dir), "-o", str(tmp_path / "init")]) == 0
        argv = ["quantize", "--model", str(tiny_checkpoint), "--quantize", "nf4", "-o", str(tmp_path / "q")]
        assert main(argv) == 0
        model = GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "q")
        model.save_pretrained(tmp_path / "saved", max_shard_size="2MB")
    finally:
        os.umask(previous)
    for name in ("init", "q", "saved"):
        files = list((tmp_path / name).iterdir())
        assert len(files) >= 2 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664}, name
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o775
    assert len(list((tmp_path / "saved").glob("model-*-of-*.safetensors"))) > 1
