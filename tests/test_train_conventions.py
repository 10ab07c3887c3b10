"""Issue 24's conventions in ``neoxja train`` and :func:`neoxja.train`: the output directory
(refused when it holds a run, ``--resume`` into it, ``--overwrite``), peft missing, held-out loss as
training goes, ``--save-total-limit``, a longer schedule on resume, the flags and their help."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT

import neoxja
from neoxja.cli import build_parser, main
from neoxja.tuner import checkpoints
from neoxja.tuner.data import PackedDataset
from neoxja.tuner.optim import lr_factor
from neoxja.tuner.trainer import TrainingArguments, train

TEXT = (
    "吾輩は猫である。名前はまだ無い。\nどこで生れたかとんと見当がつかぬ。\n"
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。\n"
)


def small_model(seed: int = 0) -> neoxja.GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    return neoxja.GPTNeoXJapaneseForCausalLM(neoxja.GPTNeoXJapaneseConfig(**NO_DROPOUT))


def small_data(rows: int = 8, seed: int = 0) -> PackedDataset:
    ids = torch.randint(3, 128, (rows, 8), generator=torch.Generator().manual_seed(seed))
    return PackedDataset(ids, ids.clone())


def args(out: Path, **changes: object) -> TrainingArguments:
    return TrainingArguments(str(out), **{"steps": 2, "batch_size": 2, "progress": False, **changes})


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "neko.txt"
    path.parent.mkdir()
    path.write_text(TEXT, encoding="utf-8")
    return path


def cli(model: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--line-per-document", "-o", str(out),
            "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--no-progress", *extra]  # fmt: skip


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.startswith("neoxja train: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def listing(directory: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")
    }


# ----- the output directory ---------------------------------------------------------------------------


def an_earlier_run(out: Path) -> None:
    """What a run leaves (checkpoints, log, summary, a LoRA result, a merged model) and a user's file."""
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "trainer_state.pt").write_bytes(b"old")
    (out / "merged").mkdir()
    (out / "merged" / "config.json").write_text("{}")
    for name in ("metrics.jsonl", "training_args.json", "adapter_config.json", "adapter_model.safetensors"):
        (out / name).write_text("old\n")
    (out / "notes.txt").write_text("mine")


def test_an_output_holding_anything_is_refused_before_anything_loads(
    tmp_path: Path, text_file: Path, capsys
) -> None:
    out = tmp_path / "run"
    an_earlier_run(out)
    before = listing(out)
    # A model that does not exist and a data file that is not there: neither is ever looked at.
    for spelling in ("-o", "--out", "--output"):
        command = cli(tmp_path / "no-model", tmp_path / "no-data.txt", out)
        command[command.index("-o")] = spelling
        assert main(command) == 2
        err = one_error_line(capsys)
        assert (
            f"--output {out} is not empty: pass --resume {out} to continue the run there, or --overwrite"
            in err
        )
    assert listing(out) == before
    # the Python API refuses as the command does
    with pytest.raises(ValueError, match="is not empty"):
        neoxja.train(str(tmp_path / "no-model"), [tmp_path / "no-data.txt"], out)
    with pytest.raises(ValueError, match="is not empty"):
        train(small_model(), small_data(), args(out))
    assert listing(out) == before
    # a file is no output directory
    (tmp_path / "file").write_text("x")
    assert main(cli(tmp_path / "no-model", text_file, tmp_path / "file")) == 2
    assert "is a file, not a directory" in one_error_line(capsys)


def test_overwrite_removes_the_earlier_run_and_nothing_else(
    tiny_checkpoint: Path, tmp_path: Path, text_file: Path, capsys
) -> None:
    out = tmp_path / "run"
    an_earlier_run(out)
    assert main(cli(tiny_checkpoint, text_file, out, "--overwrite", "--save-every", "1")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-7" not in names and "merged" not in names
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(names)  # a full result now
    assert {"checkpoint-1", "checkpoint-2", "model.safetensors", "config.json", "vocab.txt"} <= set(names)
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the old log is gone, not appended to
    assert json.loads((out / "training_args.json").read_text())["step"] == 2
    assert "trained 2 steps; model written to" in capsys.readouterr().err


def test_resume_continues_in_its_own_output_and_overwrite_cannot_join_it(
    tiny_checkpoint: Path, tmp_path: Path, text_file: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(cli(tiny_checkpoint, text_file, out, "--save-every", "2")) == 0
    again = cli(tiny_checkpoint, text_file, out, "--resume", str(out))
    again[again.index("--steps") + 1] = "3"
    assert main(again) == 0
    assert "trained 3 steps" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one log, continued
    # a checkpoint inside the output names the same run
    inside = cli(tiny_checkpoint, text_file, out, "--resume", str(out / "checkpoint-2"), "--overwrite")
    assert main(inside) == 2
    err = one_error_line(capsys)
    assert f"--overwrite would remove the checkpoints in {out} that --resume {out / 'checkpoint-2'}" in err
    assert (out / "checkpoint-2").is_dir()


# ----- LoRA without peft ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--quantize", "nf4")], ids=["lora", "qlora"])
def test_lora_without_peft_is_one_line_before_model_or_data(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails, as where it is not installed
    command = cli(tmp_path / "no-model", tmp_path / "no-data.txt", tmp_path / "out", "--lora", *extra)
    assert main(command) == 2
    assert "LoRA training needs peft: pip install 'neoxja[train]'" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImportError, match=re.escape("pip install 'neoxja[train]'")):
        neoxja.train(str(tmp_path / "no-model"), [tmp_path / "no-data.txt"], tmp_path / "out", lora=True)


# ----- held-out loss as training goes -----------------------------------------------------------------


def test_held_out_loss_is_printed_and_logged_as_training_goes(tmp_path: Path, capsys) -> None:
    result = train(small_model(), small_data(), args(tmp_path / "a", steps=4, eval_every=2), small_data(4, 1))
    logged = [m["step"] for m in result.metrics if "eval_loss" in m]
    assert logged == [2, 4]
    lines = [line for line in capsys.readouterr().err.splitlines() if "held-out loss" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    evals = {m["step"]: m["eval_loss"] for m in result.metrics if "eval_loss" in m}
    assert (
        lines[0] == f"step 2/4: held-out loss {evals[2]:.4f}, perplexity {torch.tensor(evals[2]).exp():.2f}"
    )
    # without eval_every: ten times a run (and at the end)
    result = train(small_model(), small_data(), args(tmp_path / "b", steps=20), small_data(4, 1))
    assert [m["step"] for m in result.metrics if "eval_loss" in m] == list(range(2, 21, 2))
    result = train(small_model(), small_data(), args(tmp_path / "c", steps=5), small_data(4, 1))
    assert [m["step"] for m in result.metrics if "eval_loss" in m] == [1, 2, 3, 4, 5]


# ----- --save-total-limit -----------------------------------------------------------------------------


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_model(), small_data(), args(out, steps=5, save_every=1, save_total_limit=2))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4",
        "checkpoint-5",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-removed left
    assert checkpoints.find_checkpoint(out) == out / "checkpoint-5"


def test_the_checkpoint_just_written_is_never_removed(tmp_path: Path) -> None:
    """A run resumed from checkpoint-3 in a directory that holds checkpoint-9 (of the run it left):
    with a limit of 1, the new checkpoint-4 stays and checkpoint-9 goes."""
    for step in (3, 9, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    removed = checkpoints.prune_checkpoints(tmp_path, 1, tmp_path / "checkpoint-4")
    assert sorted(p.name for p in removed) == ["checkpoint-3", "checkpoint-9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


# ----- a longer --steps on resume ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_resuming_with_more_steps_follows_the_longer_schedule(tmp_path: Path, schedule: str) -> None:
    """4 steps saved, resumed for 8: steps 5-8 get the learning rates of an 8-step run (no step at
    the 4-step schedule's final lr of 0, no jump after it), and the 4 first of the resumed run's
    metrics.jsonl are those of the 4-step run."""
    settings = dict(lr=1e-2, warmup=1, schedule=schedule, batch_size=2, progress=False)
    first = train(
        small_model(), small_data(), TrainingArguments(str(tmp_path / "a"), steps=4, save_every=4, **settings)
    )
    resumed = train(
        small_model(9),
        small_data(),
        TrainingArguments(str(tmp_path / "a"), steps=8, resume=str(tmp_path / "a"), **settings),
    )
    longer = train(small_model(), small_data(), TrainingArguments(str(tmp_path / "b"), steps=8, **settings))
    lrs = [m["lr"] for m in resumed.metrics]
    assert [m["step"] for m in resumed.metrics] == [5, 6, 7, 8]
    assert lrs == [m["lr"] for m in longer.metrics[4:]]
    assert lrs == [1e-2 * lr_factor(schedule, 1, 8)(step) for step in range(4, 8)]
    assert min(lrs) > 0 and [m["lr"] for m in first.metrics][-1] < lrs[0]
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 9))


# ----- flags, dtypes and the Python API ---------------------------------------------------------------


def test_flags_spellings_and_help(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no help text broken at a hyphen
    parser = build_parser()
    for spelling in ("-o", "--out", "--output"):
        parsed = parser.parse_args(["train", "--data", "x.txt", spelling, "run"])
        assert parsed.output == "run" and parsed.model == "abeja/gpt-neox-japanese-2.7b"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--output DIR, -o DIR, --out DIR",
        "(default: abeja/gpt-neox-japanese-2.7b)",
        "(default: keep all)",
        "peak learning rate (default: 5e-05)",
        "tokens per block (default: 512)",
        "rank (default: 8)",
        "--mixed-precision {no,bf16,fp16}",
        "(default: no)",
        "(default: 10 times a run with --eval-data)",
        "(any but float32 needs --mixed-precision as well) (default: float32)",
        "linear warm-up steps (default: 0)",
    ):
        assert shown in text, shown
    assert "(default: 512) (default" not in text  # no default said twice
    assert "--save-total-limit 2" in text and '{"messages": [{"role": ..., "content": ...}, ...]}' in text


def test_dtype_is_the_weights_dtype_and_its_old_meaning_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, text_file: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(cli(tiny_checkpoint, text_file, out, "--dtype", "bfloat16")) == 2
    err = one_error_line(capsys)
    assert "dtype bfloat16 is the dtype of the weights now" in err and "--mixed-precision bf16" in err
    assert not out.exists()
    assert main(cli(tiny_checkpoint, text_file, out, "--dtype", "float16", "--mixed-precision", "no")) == 2
    assert "float16 weights cannot be trained" in one_error_line(capsys)
    assert main(cli(tiny_checkpoint, text_file, out, "--dtype", "bfloat16", "--mixed-precision", "no")) == 0
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="for the autocast it meant before, use mixed precision bf16"):
        neoxja.train(str(tiny_checkpoint), [text_file], tmp_path / "api", dtype="bfloat16")


def test_the_old_trainingarguments_dtype_still_means_autocast() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = TrainingArguments("run", dtype="bfloat16")
    assert old.mixed_precision == "bf16" and old.dtype is None
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    with pytest.raises(ValueError, match="contradicts mixed_precision='fp16'"):
        TrainingArguments("run", dtype="bfloat16", mixed_precision="fp16")


def test_without_network_the_default_model_says_how_to_pass_one(
    tmp_path: Path, text_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    command = cli("unused", text_file, tmp_path / "out")
    del command[1:3]  # no --model: the default, which is not in the (empty) Hub cache
    assert "--model" not in command
    assert main(command) == 2
    err = one_error_line(capsys)
    assert (
        "abeja/gpt-neox-japanese-2.7b" in err
        and "neoxja train --model /path/to/gpt-neox-japanese-2.7b" in err
    )
