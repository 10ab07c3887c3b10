"""The generate, chat, init and visualize-mask commands, run through neoxja.cli.main with capsys."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_checkpoint

import neoxja.commands.textgen as textgen
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


def python_api_error(option: str, value: float) -> str:
    """What the Python API says of ``value`` for the setting of ``option``, after the setting's name,
    in the CLI's option words (``do_sample=True`` is ``--temperature > 0`` there)."""
    from neoxja.commands.generate import in_option_words
    from neoxja.generation_config import GenerationConfig, check_seed

    name = option.removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError) as info:
        if name == "seed":
            check_seed(value)
        else:
            GenerationConfig(**{name: value}).validate()
    return in_option_words(str(info.value).removeprefix(name))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--temperature", -1.0),
        ("--top-p", 0.0),
        ("--top-p", 1.5),
        ("--top-k", -1),
        ("--max-new-tokens", 0),
        ("--repetition-penalty", 0.0),
        ("--seed", 2**70),
        ("--seed", -(2**70)),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_sampling_options_get_the_python_apis_message_with_the_option_name(
    command: str, option: str, value: float, capsys: pytest.CaptureFixture
) -> None:
    # Checked by GenerationConfig.validate / check_seed before anything is loaded.
    args = [command, "--model", "never/loaded", f"{option}={value}"]
    assert main([*args, PROMPT] if command == "generate" else args) == 2
    message = python_api_error(option, value)
    assert capsys.readouterr().err == f"neoxja {command}: error: {option}{message}\n"


def test_in_range_negative_seed_is_accepted(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "3", "--seed", "-1", PROMPT]
    assert main(args) == 0
    assert capsys.readouterr().out.endswith("\n")


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


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("generate", "--model"),
        ("generate", "--tokenizer"),
        ("tokenize", "--model"),
        ("visualize-mask", "--model"),
        ("visualize-mask", "--tokenizer"),
    ],
)
def test_a_file_given_for_a_directory_says_to_pass_the_directory(
    tiny_dir: Path, command: str, option: str, capsys: pytest.CaptureFixture
) -> None:
    path = tiny_dir / ("model.safetensors" if option == "--model" else "vocab.txt")
    assert main([command, option, str(path), PROMPT]) == 2
    assert (
        capsys.readouterr().err == f"neoxja {command}: error: {option} {path} is a file: pass its directory\n"
    )


def test_generate_ctrl_c_ends_the_line_and_exits_130(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(model, tokenizer, input_ids, kwargs, output):
        print("途中", end="")
        raise KeyboardInterrupt

    monkeypatch.setattr(textgen, "stream_one", interrupted)
    assert main(["generate", "--model", str(tiny_dir), PROMPT]) == 130
    assert capsys.readouterr() == ("途中\n", "")


def test_chat_continues_each_line_until_an_empty_one(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n\nnot read\n"))
    args = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "10", "--temperature", "0", "--raw"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out == "> " + reference_continuation(tiny_dir, PROMPT, 10) + "\n> "


def test_chat_keeps_the_conversation_and_quits_on_eof(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    real_stream = textgen.stream_one

    def recording_stream(model, tokenizer, input_ids, kwargs, output):
        seen.append(input_ids[0].tolist())
        return real_stream(model, tokenizer, input_ids, kwargs, output)

    monkeypatch.setattr(textgen, "stream_one", recording_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("吾輩は\n猫である\n"))  # then EOF
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert len(seen) == 2
    assert len(seen[1]) > len(seen[0]) + 4  # the first turn and its 4 generated tokens are context now


def test_chat_ctrl_c_stops_the_generation_not_the_program(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    real_stream = textgen.stream_one

    def interrupted_once(model, tokenizer, input_ids, kwargs, output):
        seen.append(input_ids[0].tolist())
        if len(seen) == 1:
            output.shown.append("途中")  # printed before Ctrl-C
            raise KeyboardInterrupt
        return real_stream(model, tokenizer, input_ids, kwargs, output)

    monkeypatch.setattr(textgen, "stream_one", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("一行目\n二行目\n"))
    args = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "3", "--temperature", "0", "--raw"]
    assert main(args) == 0
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
    assert "tiny" in capsys.readouterr().err  # a summary: stderr (convention 9 of issue 24)
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


@pytest.mark.parametrize("command", ["tokenize", "generate", "chat", "init", "visualize-mask"])
def test_help_says_what_it_does_with_an_example(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"neoxja {command}" in out


@pytest.mark.parametrize("value", ["mps", "xpu", "meta", "cuda:7", "banana", "-2", "0"])
@pytest.mark.parametrize("command", ["generate", "visualize-mask"])
def test_unusable_devices_are_one_line_errors(
    value: str, command: str, capsys: pytest.CaptureFixture
) -> None:
    from neoxja.devices import available_devices

    if value == "0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU 0")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--device", value, PROMPT])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    shown = int(value) if value.lstrip("-").isdigit() else value
    assert error.startswith(f"neoxja {command}: error: argument --device: device={shown!r} ")
    assert error.endswith("available here: " + ", ".join(map(repr, available_devices())))


CPU_FORMS = [["--device", "-1"], ["--device=-1"], ["--device", "cpu"], ["--device=auto"]]


@pytest.mark.parametrize("device", CPU_FORMS)
def test_cpu_device_forms(tiny_dir: Path, device: list, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available() and device == ["--device=auto"]:
        pytest.skip("auto is the GPU here")
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "3", "--temperature", "0", *device]
    assert main([*args, PROMPT]) == 0
    assert capsys.readouterr().out == reference_continuation(tiny_dir, PROMPT, 3) + "\n"


def test_visualize_mask_takes_the_same_device_forms(tiny_dir: Path, tmp_path: Path) -> None:
    args = ["visualize-mask", "--model", str(tiny_dir), "--device=-1", "--png", str(tmp_path / "a.png")]
    assert main([*args, "--layer", "0", "--head", "0", "猫"]) == 0  # loads the weights on the CPU
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_tokenize_reads_stdin_without_its_final_newline(
    tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["tokenize", "--model", str(tiny_dir), "吾輩は猫である"]) == 0
    direct = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("吾輩は猫である\n"))  # as `echo TEXT |` gives it
    assert main(["tokenize", "--model", str(tiny_dir), "-"]) == 0
    assert capsys.readouterr().out == direct


def test_version(capsys: pytest.CaptureFixture) -> None:
    import neoxja

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"neoxja {neoxja.__version__}\n"


def neoxja_process(*args: str, **popen: Any) -> subprocess.CompletedProcess:
    """Run ``python -m neoxja ARGS`` in a fresh interpreter (stdout and stderr captured unless given)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "neoxja", *args], **popen)


def test_python_dash_m_runs_the_cli(tiny_dir: Path) -> None:
    done = neoxja_process("tokenize", "--model", str(tiny_dir), "猫")
    assert done.returncode == 0 and done.stderr == b""
    assert json.loads(done.stdout) == GPTNeoXJapaneseTokenizer.from_pretrained(tiny_dir).encode("猫")


@pytest.mark.parametrize("command", ["generate", "tokenize"])
def test_a_closed_pipe_ends_quietly(tiny_dir: Path, command: str) -> None:
    # The reader is gone before the first write, so every write meets the closed pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    args = [command, "--model", str(tiny_dir), PROMPT]
    try:
        done = neoxja_process(*args, stdout=write_end)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, b"")


@pytest.mark.parametrize(("command", "size"), [("generate --max-new-tokens 50", 10), ("tokenize", 1)])
def test_head_closing_the_pipe_early_is_quiet(tiny_dir: Path, command: str, size: int) -> None:
    line = f"{shlex.quote(sys.executable)} -m neoxja {command} --model {shlex.quote(str(tiny_dir))} {PROMPT}"
    done = subprocess.run(["bash", "-c", f"{line} | head -c {size}"], capture_output=True)
    assert len(done.stdout) == size and done.stderr == b""
