"""Training: steps equal transformers' (loss and every gradient), exact resume, saving, learning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT, make_pair

import neoxja
from neoxja.tuner import checkpoints
from neoxja.tuner.data import IGNORE_INDEX, PackedDataset, load_dataset
from neoxja.tuner.trainer import TrainingArguments, token_loss_sum, train

transformers = pytest.importorskip("transformers")

CONFIG = NO_DROPOUT  # only dropout-free steps can be compared across libraries


def batch(seed: int = 0, rows: int = 3, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, length), generator=generator)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, -4:] = IGNORE_INDEX  # padding
    return ids, labels


def max_grad_difference(ours: torch.nn.Module, reference: torch.nn.Module) -> float:
    theirs = dict(reference.named_parameters())
    return max((p.grad - theirs[name].grad).abs().max().item() for name, p in ours.named_parameters())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_a_step_has_transformers_loss_and_gradients(tmp_path: Path, checkpointing: bool) -> None:
    reference, ours = make_pair(CONFIG, tmp_path)
    reference.train()
    ours.train()
    if checkpointing:
        ours.gradient_checkpointing_enable()  # transformers has no checkpointing for this model
    ids, labels = batch()
    expected = reference(ids, labels=labels).loss
    expected.backward()
    summed, count = token_loss_sum(ours, ids, labels)
    (summed / count).backward()
    assert abs(summed.item() / count - expected.item()) <= 1e-5
    assert max_grad_difference(ours, reference) <= 1e-5


def test_checkpointing_gives_the_same_gradients_with_dropout(tmp_path: Path) -> None:
    """The recomputed forward replays the RNG: the same dropout masks, so the same gradients."""
    _, model = make_pair({**CONFIG, "attention_dropout": 0.3, "hidden_dropout": 0.2}, tmp_path)
    model.train()
    ids, labels = batch()
    grads = []
    for enable in (False, True):
        model.gradient_checkpointing_enable() if enable else model.gradient_checkpointing_disable()
        model.zero_grad()
        torch.manual_seed(5)
        loss, count = token_loss_sum(model, ids, labels)
        (loss / count).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def tiny_data(tokenizer: neoxja.GPTNeoXJapaneseTokenizer, corpus_dir: Path, name: str, seq_len: int = 32):
    return load_dataset([corpus_dir / name], tokenizer, seq_len, per_line=True)


@pytest.fixture(scope="module")
def tokenizer(assets_dir: Path) -> neoxja.GPTNeoXJapaneseTokenizer:
    return neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)


def fresh_model(seed: int = 0) -> neoxja.GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    config = neoxja.GPTNeoXJapaneseConfig.from_preset("tiny", vocab_size=32000, hidden_dropout=0.1)
    return neoxja.GPTNeoXJapaneseForCausalLM(config)


def test_resumed_run_is_bit_identical(tmp_path: Path, tokenizer, corpus_dir: Path) -> None:
    """2N steps in one go, and N steps resumed from the checkpoint at N: the same losses and weights
    (dropout on, gradient accumulation, warm-up and a cosine schedule, all restored)."""
    data = tiny_data(tokenizer, corpus_dir, "gsd-dev.txt")
    settings = dict(steps=6, batch_size=2, grad_accum=2, lr=1e-3, warmup=2, save_every=3, progress=False)
    whole = train(fresh_model(), data, TrainingArguments(str(tmp_path / "whole"), **settings))
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert checkpoint.is_dir() and (checkpoint / checkpoints.STATE_FILE).is_file()
    resumed = train(
        fresh_model(seed=9),
        data,
        TrainingArguments(str(tmp_path / "resumed"), resume=str(checkpoint), **settings),
    )
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in whole.metrics[3:]]
    for (name, a), b in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # --resume with the output directory picks its latest checkpoint
    assert checkpoints.find_checkpoint(tmp_path / "whole") == tmp_path / "whole" / "checkpoint-6"


def test_an_interrupted_save_leaves_the_last_checkpoint_alone(tmp_path: Path) -> None:
    checkpoints.save_checkpoint(tmp_path, 1, lambda d: (d / "w").write_text("good"), {"step": 1})

    def crash(directory: Path) -> None:
        (directory / "w").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path, 2, crash, {"step": 2})
    assert (tmp_path / "checkpoint-1" / "w").read_text() == "good"
    assert not (tmp_path / "checkpoint-2").exists()
    assert checkpoints.find_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_training_learns_and_the_result_loads_in_transformers(
    tmp_path: Path, tokenizer, corpus_dir: Path
) -> None:
    data = tiny_data(tokenizer, corpus_dir, "neko.txt")
    held_out = tiny_data(tokenizer, corpus_dir, "gsd-test.txt")
    out = tmp_path / "out"
    settings = dict(
        steps=300, batch_size=4, lr=1e-2, warmup=10, eval_every=150, progress=False, weight_decay=0.01
    )
    result = train(fresh_model(), data, TrainingArguments(str(out), **settings), held_out, tokenizer)
    evals = [m["eval_loss"] for m in result.metrics if "eval_loss" in m]
    assert len(evals) == 2
    first_step_loss = result.metrics[0]["loss"]
    assert first_step_loss > 10  # ln(32000) = 10.4: a random start
    assert evals[-1] < first_step_loss - 2, evals  # well below the start (e^2 = 7x less perplexed)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log == result.metrics
    assert (out / "vocab.txt").is_file()
    reference = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(out).eval()
    trained = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(out).eval()
    ids = held_out.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_training_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    data = PackedDataset(torch.randint(3, 100, (4, 8)), torch.randint(3, 100, (4, 8)))
    model = fresh_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, data, TrainingArguments(str(tmp_path), steps=1, batch_size=2, progress=False))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "batch_size must be a positive int"),
        ("steps", -1, "steps must be a positive int"),
        ("schedule", "cyclic", "schedule must be one of cosine, linear, constant"),
        ("mixed_precision", "fp8", "mixed_precision must be one of no, bf16, fp16"),
        ("lr", 0, "lr must be > 0"),
        ("max_grad_norm", -1.0, "max_grad_norm must be > 0"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, field: str, value: object, message: str) -> None:
    data = PackedDataset(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        train(fresh_model(), data, TrainingArguments(str(tmp_path), **{field: value}))


def test_float16_on_the_cpu_is_refused(tmp_path: Path) -> None:
    data = PackedDataset(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mixed precision fp16 needs a CUDA GPU"):
        train(fresh_model(), data, TrainingArguments(str(tmp_path), mixed_precision="fp16", progress=False))


# ----- resume states are checked whole before anything trains ----------------------------------------


def small_data() -> PackedDataset:
    ids = torch.randint(3, 100, (8, 8), generator=torch.Generator().manual_seed(0))
    return PackedDataset(ids, ids.clone())


def small_args(out: Path, **changes: object) -> TrainingArguments:
    return TrainingArguments(str(out), **{"steps": 2, "batch_size": 2, "progress": False, **changes})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 steps with its checkpoint-2."""
    out = tmp_path_factory.mktemp("saved-run")
    train(fresh_model(), small_data(), small_args(out, save_every=2))
    return out / "checkpoint-2"


def rename_first_parameter(state: dict) -> None:
    group = state["optimizer"]["param_groups"][0]
    group["params"][0] = "gpt_neox_japanese.not_a_parameter"


def reshape_a_moment(state: dict) -> None:
    moments = state["optimizer"]["state"]["gpt_neox_japanese.final_layer_norm.weight"]
    moments["exp_avg"] = torch.zeros(3)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(step=10**12), "'step' is 1000000000000, beyond this run's 2 steps"),
        (lambda s: s.update(step=-1), "'step' is -1, below 0"),
        (lambda s: s.update(step=1), "'step' is 1, but the checkpoint is checkpoint-2"),
        (lambda s: s.update(step="2"), "'step' is a str, not an int"),
        (lambda s: s.update(step=2.0), "'step' is a float, not an int"),
        (lambda s: s.pop("optimizer"), "'optimizer' is missing"),
        (lambda s: s.update(scheduler=[1]), "'scheduler' is a list, not a dict"),
        (lambda s: s.update(world_size=0), "'world_size' is 0, not a positive int"),
        (lambda s: s["rng"].update(cpu=torch.zeros(3)), r"rng\['cpu'\] is not a uint8 random-number state"),
        (lambda s: s["scheduler"].update(last_epoch=7), r"scheduler\['last_epoch'\] is 7, not the step 2"),
        (lambda s: s["optimizer"].pop("state"), "'optimizer' lacks its 'state' dict"),
        (rename_first_parameter, r"optimizer\['param_groups'\]\[0\] names parameters the model lacks"),
        (reshape_a_moment,
         r"optimizer\['state'\]\['gpt_neox_japanese.final_layer_norm.weight'\]\['exp_avg'\] has shape \[3\], "
         r"the parameter \[64\]"),
    ],
    ids=[
        "step-1e12", "negative-step", "step-of-another-folder", "step-str", "step-float", "no-optimizer",
        "scheduler-list", "world-size-0", "rng", "scheduler-step", "optimizer-no-state", "optimizer-names",
        "optimizer-shapes",
    ],
)  # fmt: skip
def test_a_bad_resume_state_is_named_before_any_step(
    saved_run: Path, tmp_path: Path, change, message: str
) -> None:
    checkpoint = tmp_path / "edited" / "checkpoint-2"
    shutil.copytree(saved_run, checkpoint)
    path = checkpoint / checkpoints.STATE_FILE
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    out = tmp_path / "resumed"
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        train(fresh_model(), small_data(), small_args(out, resume=str(checkpoint)))
    assert not (out / "metrics.jsonl").exists()  # not one step ran


def test_a_state_that_is_not_a_dict_and_a_step_beyond_steps(saved_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'step' is 2, beyond this run's 1 steps"):
        train(fresh_model(), small_data(), small_args(tmp_path / "a", steps=1, resume=str(saved_run)))
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(saved_run, checkpoint)
    torch.save([1, 2], checkpoint / checkpoints.STATE_FILE)
    with pytest.raises(ValueError, match="trainer_state.pt: expected a dict of training state, found a list"):
        train(fresh_model(), small_data(), small_args(tmp_path / "b", resume=str(checkpoint)))


def test_resuming_weights_of_another_shape_names_file_and_key(saved_run: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig.from_preset("tiny", vocab_size=32001)
    other = neoxja.GPTNeoXJapaneseForCausalLM(config)
    message = (
        r"model.safetensors: gpt_neox_japanese.embed_in.weight has shape \[32000, 64\], the model's \[32001"
    )
    with pytest.raises(ValueError, match=message):
        train(other, small_data(), small_args(tmp_path / "out", resume=str(saved_run)))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_removes_what_killed_saves_left_in_its_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stale, live = out / f".checkpoint-4.partial-{dead_pid()}", out / f".checkpoint-6.partial-{os.getppid()}"
    for directory in (stale, live):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"half")
    train(fresh_model(), small_data(), small_args(out, steps=1, overwrite_output_dir=True))
    assert not stale.exists() and live.exists()  # another live process may still be writing that one
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
