"""Training: steps equal transformers' (loss and every gradient), exact resume, saving, learning."""

from __future__ import annotations

import json
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
        ("dtype", "int8", "dtype must be one of float32, bfloat16, float16"),
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
    with pytest.raises(ValueError, match="float16 trains on CUDA GPUs only"):
        train(fresh_model(), data, TrainingArguments(str(tmp_path), dtype="float16", progress=False))
