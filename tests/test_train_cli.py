"""``neoxja train`` from the command line: one process and torchrun DDP agree; LoRA + merge; errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_reference
from safetensors.torch import load_file

from neoxja.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    """A tiny model without dropout (processes would draw different masks) and the real tokenizer."""
    directory = tmp_path_factory.mktemp("train-cli") / "model"
    make_reference({**TINY, "attention_dropout": 0.0}).save_pretrained(directory)
    tokenizer = transformers.GPTNeoXJapaneseTokenizer(
        str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json")
    )
    tokenizer.save_pretrained(directory)
    return directory


def common(model_dir: Path, corpus_dir: Path, out: Path) -> list[str]:
    data = str(corpus_dir / "gsd-dev.txt")
    return [
        "--model",
        str(model_dir),
        "--data",
        data,
        "--line-per-document",
        "--out",
        str(out),
        "--seq-len",
        "32",
    ]


def run_cli(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else []
    )
    command = [sys.executable, *launcher, "-m", "neoxja", "train", *args, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_ddp_and_fsdp_processes_equal_one_process_and_checkpoints_cross_world_sizes(
    model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """1 process with batch 4 = 2 DDP processes with batch 2 = 2 FSDP processes with batch 2; and
    an FSDP checkpoint resumes in 1 process to the same weights (checkpoints are whole, not shards)."""
    steps = ["--steps", "4", "--save-every", "2"]
    runs = {
        "one": ([*steps, "--batch-size", "4"], 0),
        "ddp": ([*steps, "--batch-size", "2"], 2),
        "fsdp": ([*steps, "--batch-size", "2", "--fsdp"], 2),
        "back": ([*steps, "--batch-size", "4", "--resume", str(tmp_path / "fsdp" / "checkpoint-2")], 0),
    }
    for name, (extra, processes) in runs.items():
        done = run_cli([*common(model_dir, corpus_dir, tmp_path / name), *extra], torchrun=processes)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert done.stderr.count("trained 4 steps") == 1, name  # rank 0 alone reports, logs and saves
        assert "trained" not in done.stdout  # the summary is on stderr: stdout stays for results
    expected = weights(tmp_path / "one")
    for name in ("ddp", "fsdp", "back"):
        got = weights(tmp_path / name)
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=0, msg=f"{name}: {key}")
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("one", "ddp", "fsdp")
    }
    assert all(len(values) == 4 for values in losses.values())
    for name in ("ddp", "fsdp"):
        assert max(abs(x - y) for x, y in zip(losses[name], losses["one"], strict=True)) <= 1e-5, name


def test_lora_with_merge_and_resume(model_dir: Path, corpus_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    lora = ["--steps", "4", "--batch-size", "2", "--lora", "--lora-r", "4", "--no-progress", "--lr", "1e-2"]
    args = [*common(model_dir, corpus_dir, out), *lora]
    assert main(["train", *args, "--save-every", "2", "--merge"]) == 0
    assert "trained 4 steps; adapter written to" in capsys.readouterr().err
    assert (out / "adapter_config.json").is_file() and (
        out / "checkpoint-2" / "adapter_model.safetensors"
    ).is_file()
    merged = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(out / "merged").eval()
    from neoxja import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(out)  # the adapter directory: base + merged adapter
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    # resuming from checkpoint-2 gives the uninterrupted run's last two losses
    again = tmp_path / "again"
    resumed = [*common(model_dir, corpus_dir, again), *lora, "--resume", str(out / "checkpoint-2")]
    assert main(["train", *resumed]) == 0
    first = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    second = [json.loads(line)["loss"] for line in (again / "metrics.jsonl").open()]
    assert second == first[2:]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"prompt": "q"}\n', r"bad\.jsonl:2: a prompt/completion record needs completion"),
        (b'{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
        (b'{"text": "\xff"}\n', r"bad\.jsonl:1: not UTF-8 text"),
    ],
)
def test_bad_data_stops_before_any_step_with_file_and_line(
    model_dir: Path, tmp_path: Path, capsys, content: bytes, message: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert (
        main(["train", "--model", str(model_dir), "--data", str(bad), "--out", str(out), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("neoxja train: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists()  # nothing ran, nothing written


def test_option_errors_are_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "a.txt"
    data.write_text("吾輩は猫である。")
    base = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*base, "--merge"]) == 2
    assert "--merge merges a LoRA adapter: add --lora" in capsys.readouterr().err
    assert main([*base, "--eval-every", "5"]) == 2  # not silently ignored
    assert "--eval-every sets how often the held-out loss is computed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--batch-size", "0"])
    assert "--batch-size: must be > 0, got 0" in capsys.readouterr().err
    assert main([*base, "--mixed-precision", "fp16", "--device", "cpu"]) == 2
    assert "mixed precision fp16 needs a CUDA GPU" in capsys.readouterr().err


# ----- --out equal to --model -------------------------------------------------------------------------


@pytest.fixture
def own_model(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model (with its tokenizer) that a test may train in place."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def in_place(own_model: Path, corpus_dir: Path, *extra: str) -> list[str]:
    args = common(own_model, corpus_dir, own_model)
    return ["train", *args, "--steps", "1", "--batch-size", "2", "--no-progress", "--overwrite", *extra]


def test_out_equal_to_model_replaces_the_model_whole_and_keeps_the_rest(
    own_model: Path, corpus_dir: Path, capsys
) -> None:
    before = weights(own_model)
    tokenizer_files = sorted(p.name for p in own_model.iterdir() if p.name != "model.safetensors")
    assert main(in_place(own_model, corpus_dir)) == 0, capsys.readouterr().err
    after = weights(own_model)
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[key], before[key]) for key in before)  # trained
    names = {p.name for p in own_model.iterdir()}  # the tokenizer's files are written again, and kept
    assert set(tokenizer_files) | {"metrics.jsonl", "training_args.json", "model.safetensors"} <= names
    assert sorted(p.name for p in own_model.parent.iterdir()) == ["model"]  # nothing left beside it
    from neoxja import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(own_model)


def test_an_interrupted_final_save_into_the_model_directory_leaves_the_old_model(
    own_model: Path, corpus_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    original = (own_model / "model.safetensors").read_bytes()

    def half_then_fail(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(original[: len(original) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    assert main(in_place(own_model, corpus_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("neoxja train: error: ") and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert (own_model / "model.safetensors").read_bytes() == original
    assert sorted(p.name for p in own_model.parent.iterdir()) == ["model"]
    monkeypatch.undo()
    from neoxja import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(own_model)  # loadable, as it was


def test_a_lora_adapter_cannot_be_written_over_its_base(own_model: Path, corpus_dir: Path, capsys) -> None:
    listing = sorted(p.name for p in own_model.iterdir())
    link = own_model.parent / "same"
    link.symlink_to(own_model)
    args = common(own_model, corpus_dir, link)  # the same directory by another name
    assert main(["train", *args, "--steps", "1", "--lora", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is the model directory: the LoRA adapter written there would replace the base model" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in own_model.iterdir()) == listing
