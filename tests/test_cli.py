"""The generate, chat, init and visualize-mask commands, run through neoxja.cli.main with capsys."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_checkpoint

import neoxja.commands.generate as generate_command
from neoxja import GPTNeoXJapaneseTokenizer
from neoxja.cli import main
from neoxja.commands.init import build_config
from neoxja.configuration import PRESETS

PROMPT = "人とAIが協調するためには、"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), assets_dir, seed=2)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def reference_continuation(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """transformers' greedy continuation of ``prompt``, decoded without special tokens."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_the_greedy_continuation(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "20", "--temperature", "0"]
    assert main([*args, PROMPT]) == 0
    out = capsys.readouterr().out
    assert out == reference_continuation(tiny_dir, PROMPT, 20) + "\n"


def test_generate_reads_the_prompt_from_stdin(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*args, PROMPT]) == 0
    direct = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))  # as `echo PROMPT |` gives it
    assert main([*args, "-"]) == 0
    assert capsys.readouterr().out == direct


def test_generate_sampling_is_reproducible_with_a_seed(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "8", "--seed", "7", "--top-k", "20"]
    args += ["--top-p", "0.9", "--temperature", "1.5", "--repetition-penalty", "1.2", PROMPT]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_unreachable_default_model_says_how_to_pass_a_directory(
    offline_hub: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["generate", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "abeja/gpt-neox-japanese-2.7b" in err and "not reachable" in err
    assert "--model /path/to" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-k", "-1"),
        ("--max-new-tokens", "0"),
        ("--repetition-penalty", "0"),
    ],
)
def test_bad_sampling_options_are_named(option: str, value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", option, value, PROMPT])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens", "5000", PROMPT], "max_new_tokens=5000"),
        (["猫。" * 2100], "max_position_embeddings"),
        (["   "], "PROMPT is empty"),
    ],
)
def test_bad_prompts_and_lengths(
    tiny_dir: Path, extra: list, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["generate", "--model", str(tiny_dir), "--temperature", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neoxja generate: error:") and message in err


def test_bad_model_paths(tmp_path: Path, assets_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(tmp_path / "missing" / "dir"), PROMPT]) == 2
    assert "does not exist" in capsys.readouterr().err
    bare = build_tiny_checkpoint(tmp_path / "bare", assets_dir, with_tokenizer=False)
    assert main(["generate", "--model", str(bare), PROMPT]) == 2
    assert "--tokenizer DIR" in capsys.readouterr().err
    args = ["generate", "--model", str(bare), "--tokenizer", str(assets_dir), "--max-new-tokens", "3", PROMPT]
    assert main(args) == 0


def test_chat_continues_each_line_until_an_empty_one(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n\nnot read\n"))
    args = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "10", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out == "> " + reference_continuation(tiny_dir, PROMPT, 10) + "\n> "


def test_chat_keeps_the_conversation_and_quits_on_eof(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    real_stream = generate_command.stream

    def recording_stream(model, tokenizer, input_ids, kwargs, shown):
        seen.append(input_ids[0].tolist())
        real_stream(model, tokenizer, input_ids, kwargs, shown)

    monkeypatch.setattr(generate_command, "stream", recording_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("吾輩は\n猫である\n"))  # then EOF
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert len(seen) == 2
    assert len(seen[1]) > len(seen[0]) + 4  # the first turn and its 4 generated tokens are context now


def test_chat_ctrl_c_stops_the_generation_not_the_program(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    real_stream = generate_command.stream

    def interrupted_once(model, tokenizer, input_ids, kwargs, shown):
        seen.append(input_ids[0].tolist())
        if len(seen) == 1:
            shown.append("途中")  # printed before Ctrl-C
            raise KeyboardInterrupt
        real_stream(model, tokenizer, input_ids, kwargs, shown)

    monkeypatch.setattr(generate_command, "stream", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("一行目\n二行目\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert len(seen) == 2 and "[stopped]" in capsys.readouterr().err
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tiny_dir)
    assert seen[1] == tokenizer.encode("一行目途中二行目")  # the interrupted turn's shown text is kept


def test_init_tiny_writes_a_checkpoint_transformers_loads(
    tmp_path: Path, assets_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import transformers

    out = tmp_path / "random-tiny"
    assert (
        main(["init", "--size", "tiny", "--tokenizer", str(assets_dir), "--out", str(out), "--seed", "3"])
        == 0
    )
    assert "tiny" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert config["vocab_size"] == 32000
    assert (out / "vocab.txt").is_file() and (out / "emoji.json").is_file()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reference.config.vocab_size == 32000
    assert main(["generate", "--model", str(out), "--max-new-tokens", "4", "--temperature", "0", PROMPT]) == 0
    assert capsys.readouterr().out == reference_continuation(out, PROMPT, 4) + "\n"
    # Same seed, same weights; an existing non-empty directory is refused.
    again = tmp_path / "again"
    assert main(["init", "--tokenizer", str(assets_dir), "--out", str(again), "--seed", "3"]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert main(["init", "--tokenizer", str(assets_dir), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err


def test_init_dtype_and_size_presets(tmp_path: Path, assets_dir: Path) -> None:
    from neoxja import AutoModelForCausalLM, GPTNeoXJapaneseTokenizer

    out = tmp_path / "bf16"
    assert main(["init", "--tokenizer", str(assets_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)
    small = build_config("small", tokenizer)
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (768, 12, 12)
    full = build_config("2.7b", tokenizer)
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads) == (2560, 32, 32)
    assert set(PRESETS) == {"tiny", "small", "2.7b"}


def test_visualize_mask_prints_a_grid_per_text(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["visualize-mask", "--model", str(tiny_dir), "猫", "吾輩は猫である"]) == 0
    out = capsys.readouterr().out
    assert out.count("batch row") == 2 and "'猫'" in out


def test_visualize_mask_png_and_argument_errors(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png = tmp_path / "attn.png"
    args = [
        "visualize-mask",
        "--model",
        str(tiny_dir),
        "--png",
        str(png),
        "--layer",
        "1",
        "--head",
        "3",
        "猫です",
    ]
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["visualize-mask", "--model", str(tiny_dir), "--layer", "1", "猫"]) == 2
    assert "--layer and --head go together" in capsys.readouterr().err
    assert (
        main(
            [
                "visualize-mask",
                "--model",
                str(tiny_dir),
                "--png",
                str(png),
                "--layer",
                "9",
                "--head",
                "0",
                "猫",
            ]
        )
        == 2
    )
    assert "layer=9 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "init", "visualize-mask"])
def test_help_says_what_it_does_with_an_example(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"neoxja {command}" in out
