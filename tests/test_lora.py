"""LoRA: peft on neoxja equals peft on transformers; adapters travel both ways; merging; resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT, make_pair

import neoxja
from neoxja.tuner.data import PackedDataset
from neoxja.tuner.lora import LoraArguments, apply_lora, merge_adapter
from neoxja.tuner.trainer import TrainingArguments, token_loss_sum, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = NO_DROPOUT
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
ARGS = LoraArguments(r=4, alpha=8.0, dropout=0.0)


def randomise_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """peft starts B at zero (the adapter a no-op): give A and B values so that it does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def reference_lora(reference: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(
        r=ARGS.r, lora_alpha=ARGS.alpha, lora_dropout=0.0, target_modules=list(ARGS.target)
    )
    return peft.get_peft_model(reference, config)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_lora_forward_and_gradients_equal_peft_on_transformers(tmp_path: Path) -> None:
    reference, ours = make_pair(CONFIG, tmp_path)
    theirs, mine = reference_lora(reference), apply_lora(ours, ARGS)
    randomise_lora(theirs)
    randomise_lora(mine)
    torch.testing.assert_close(logits(mine), logits(theirs), atol=1e-5, rtol=1e-5)
    labels = IDS.clone()
    theirs(input_ids=IDS, labels=labels).loss.backward()
    summed, count = token_loss_sum(mine, IDS, labels)
    (summed / count).backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    my_grads = {n: p.grad for n, p in mine.named_parameters() if p.requires_grad}
    assert set(my_grads) == set(their_grads) and len(my_grads) == 2 * 4 * 2  # A, B x 4 targets x 2 layers
    for name, grad in my_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-5, rtol=1e-5)


def test_an_adapter_trained_by_neoxja_loads_in_peft_on_transformers(tmp_path: Path) -> None:
    reference, ours = make_pair(CONFIG, tmp_path / "base")
    data = PackedDataset(torch.randint(3, 128, (8, 16)), torch.randint(3, 128, (8, 16)))
    out = tmp_path / "adapter"
    args = TrainingArguments(str(out), steps=3, batch_size=4, lr=1e-2, lora=ARGS, progress=False)
    result = train(ours, data, args)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["base_model_name_or_path"] == str(
        (tmp_path / "base").resolve()
    )
    expected = logits(result.model)
    loaded = peft.PeftModel.from_pretrained(reference, out).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    # neoxja loads the adapter directory itself: the base with the adapter merged (plain layers)
    merged = neoxja.AutoModelForCausalLM.from_pretrained(out)
    assert all(type(m) is torch.nn.Linear for m in merged.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_trained_with_peft_on_transformers_merges_into_neoxja(tmp_path: Path) -> None:
    reference, ours = make_pair(CONFIG, tmp_path / "base")
    theirs = reference_lora(reference)
    randomise_lora(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "adapter")
    merge_adapter(ours, tmp_path / "adapter")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


def test_lora_resume_is_bit_identical(tmp_path: Path) -> None:
    data = PackedDataset(torch.randint(3, 128, (12, 16)), torch.randint(3, 128, (12, 16)))
    settings = dict(steps=4, batch_size=3, lr=1e-2, save_every=2, progress=False, seed=4)
    lora = LoraArguments(r=4, alpha=8.0, dropout=0.1)
    _, first = make_pair(CONFIG, tmp_path / "a")
    whole = train(first, data, TrainingArguments(str(tmp_path / "whole"), lora=lora, **settings))
    _, second = make_pair(CONFIG, tmp_path / "b")
    resume = str(tmp_path / "whole" / "checkpoint-2")
    resumed = train(
        second, data, TrainingArguments(str(tmp_path / "resumed"), lora=lora, resume=resume, **settings)
    )
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in whole.metrics[2:]]
    mine = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    for name, param in whole.model.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, mine[name]), name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
        ({"bias": "all"}, "bias='all' is not supported"),
    ],
)
def test_adapters_neoxja_cannot_merge_exactly_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    reference, ours = make_pair(CONFIG, tmp_path / "base")
    reference_lora(reference).save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    before = [p.clone() for p in ours.parameters()]
    with pytest.raises(ValueError, match=message):
        merge_adapter(ours, tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters(), strict=True))


def test_bad_lora_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="lora r must be a positive int"):
        LoraArguments(r=0).validate()
    with pytest.raises(ValueError, match="lora r must be a positive int, got True"):
        LoraArguments(r=True).validate()
    for alpha in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"lora alpha must be a finite number > 0, got {alpha}"):
            LoraArguments(alpha=alpha).validate()
    with pytest.raises(ValueError, match=r"lora target \['embed_out'\] is not among"):
        LoraArguments(target=("dense", "embed_out")).validate()


# exact: float32 products on the dequantized weights, so the gradients agree to float32 rounding;
# fast: the products round activations and weight tiles to bfloat16 (as bitsandbytes' compute dtype
# does), so they agree to bfloat16's relative precision.
@pytest.mark.parametrize(("arithmetic", "tolerance"), [("exact", (1e-5, 1e-4)), ("fast", (2e-3, 3e-2))])
def test_qlora_gradients_equal_lora_on_the_dequantized_weights(
    tmp_path: Path, arithmetic: str, tolerance: tuple[float, float]
) -> None:
    from neoxja.linear import restore_dense
    from neoxja.quantization.loading import quantize

    _, ours = make_pair(CONFIG, tmp_path)
    quantized = apply_lora(quantize(ours, "nf4", cpu_arithmetic=arithmetic, double_quant=True), ARGS)
    _, again = make_pair(CONFIG, tmp_path)
    dense = apply_lora(restore_dense(quantize(again, "nf4", double_quant=True)), ARGS)
    for model in (quantized, dense):
        randomise_lora(model)
        summed, count = token_loss_sum(model, IDS, IDS.clone())
        (summed / count).backward()
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert set(grads) == set(expected) and len(grads) == 2 * 4 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=tolerance[0], rtol=tolerance[1])


def test_qlora_command_trains_and_merges_into_the_float_base(
    tiny_checkpoint: Path, tmp_path: Path, corpus_dir: Path
) -> None:
    from neoxja.cli import main

    out = tmp_path / "qlora"
    data = str(corpus_dir / "gsd-test.txt")
    args = ["train", "--model", str(tiny_checkpoint), "--data", data, "--out", str(out), "--lora",
            "--quantize", "nf4", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2",
            "--merge", "--no-progress", "--line-per-document"]  # fmt: skip
    assert main(args) == 0
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert losses[-1] < losses[0]
    assert (out / "adapter_model.safetensors").is_file()
    merged = neoxja.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert all(type(m) is torch.nn.Linear for m in merged.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match="pass lora= too"):
        neoxja.train(str(tiny_checkpoint), corpus_dir / "gsd-test.txt", tmp_path / "x", quantize="nf4")
