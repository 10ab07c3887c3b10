"""LoRA adapters refuse what no real adapter holds: each bad adapter is crafted from a good one saved
by neoxja (peft around a tiny random model); its error names the file and key, the model stays as it
was, and adapter bases that lead back to themselves are refused instead of recursing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT, make_reference
from safetensors.torch import load_file, save_file

from neoxja import AutoModelForCausalLM, GPTNeoXJapaneseForCausalLM
from neoxja.tuner.lora import MAX_ADAPTER_CHAIN, LoraArguments, adapter_base, apply_lora, merge_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
LAYER = "base_model.model.gpt_neox_japanese.layers.1.mlp.dense_4h_to_h"


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model directory, an adapter for it with every lora_A/lora_B random, saved by neoxja)."""
    root = tmp_path_factory.mktemp("adapters")
    make_reference(NO_DROPOUT, seed=2).save_pretrained(root / "base")
    wrapped = apply_lora(
        GPTNeoXJapaneseForCausalLM.from_pretrained(root / "base"), LoraArguments(r=4, dropout=0)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(wrapped.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    wrapped.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def copy_adapter(
    adapter: Path, tmp_path: Path, config: dict | None = None, tensors: dict | None = None
) -> Path:
    """A copy of ``adapter`` with ``config`` keys replaced (None removes one) and ``tensors`` set."""
    out = tmp_path / "adapter"
    shutil.copytree(adapter, out)
    if config:
        settings = json.loads((out / "adapter_config.json").read_text()) | config
        settings = {k: v for k, v in settings.items() if v is not None}
        (out / "adapter_config.json").write_text(json.dumps(settings))
    if tensors:
        save_file(load_file(out / "adapter_model.safetensors") | tensors, out / "adapter_model.safetensors")
    return out


def refused_unchanged(base: Path, adapter: Path, names: list[str], match: str) -> None:
    """merge_adapter refuses ``adapter`` with ``match`` naming every string in ``names``, and the
    model's weights are what they were."""
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(base)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as caught:
        merge_adapter(model, adapter)
    for name in names:
        assert name in str(caught.value), str(caught.value)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"lora_alpha": math.nan}, r"lora_alpha=nan; it must be a finite number > 0"),
        ({"lora_alpha": math.inf}, r"lora_alpha=inf"),
        ({"lora_alpha": "16"}, r"lora_alpha='16'"),
        ({"lora_alpha": True}, r"lora_alpha=True"),
        ({"lora_alpha": 0}, r"lora_alpha=0;"),
        ({"lora_alpha": -8}, r"lora_alpha=-8;"),
        ({"r": "4"}, r"r='4'; it must be a positive integer"),
        ({"r": 4.0}, r"r=4\.0;"),
        ({"r": 0}, r"r=0;"),
        ({"use_rslora": "yes"}, r"use_rslora='yes'; it must be true or false"),
        ({"rank_pattern": ["dense"]}, r"rank_pattern must be an object"),
        ({"rank_pattern": {"dense": 0}}, r"rank_pattern\['dense'\]=0; it must be a positive integer"),
        ({"alpha_pattern": {"dense": math.nan}}, r"alpha_pattern\['dense'\]=nan; it must be a finite number"),
        ({"alpha_pattern": {"(dense": 4}}, r"alpha_pattern key '\(dense' is not a valid pattern"),
    ],
)
def test_adapter_settings_are_checked(good, tmp_path, config: dict, match: str) -> None:
    base, adapter = good
    crafted = copy_adapter(adapter, tmp_path, config)
    refused_unchanged(base, crafted, [str(crafted / "adapter_config.json"), next(iter(config))], match)


def test_a_rank_the_weights_do_not_have_is_refused(good, tmp_path) -> None:
    base, adapter = good
    crafted = copy_adapter(adapter, tmp_path, {"r": 8})
    refused_unchanged(
        base, crafted, [str(crafted / "adapter_model.safetensors")], r"has rank 4, but .* says r=8"
    )
    layer = LAYER.removeprefix("base_model.model.")
    crafted = copy_adapter(adapter, tmp_path / "p", {"rank_pattern": {r"layers\.1\.mlp\.dense_4h_to_h": 2}})
    refused_unchanged(base, crafted, [layer], r"has rank 4, but .* says rank_pattern\[.*\]=2")


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (
            {f"{LAYER}.lora_A.weight": torch.full((4, 128), math.nan)},
            r"lora_A\.weight holds nan at index \[0, 0\]",
        ),
        ({f"{LAYER}.lora_B.weight": torch.full((32, 4), -math.inf)}, r"lora_B\.weight holds -inf"),
        ({f"{LAYER}.lora_A.weight": torch.ones(4, 128, dtype=torch.int32)}, r"must be a 2-d float tensor"),
        (
            {f"{LAYER}.lora_A.weight": torch.ones(4, 128, 1)},
            r"must be a 2-d float tensor, got .* \[4, 128, 1\]",
        ),
        ({f"{LAYER}.lora_B.weight": torch.ones(32, 3)}, r"do not fit the weight"),
        ({f"{LAYER}.lora_A.bias": torch.ones(4)}, r"unexpected tensor"),
    ],
)
def test_adapter_tensors_are_checked(good, tmp_path, tensors: dict, match: str) -> None:
    base, adapter = good
    crafted = copy_adapter(adapter, tmp_path, tensors=tensors)
    refused_unchanged(base, crafted, [str(crafted / "adapter_model.safetensors")], match)


def test_half_a_pair_and_an_unreadable_file_are_refused(good, tmp_path) -> None:
    base, adapter = good
    crafted = copy_adapter(adapter, tmp_path)
    tensors = load_file(crafted / "adapter_model.safetensors")
    del tensors[f"{LAYER}.lora_B.weight"]
    save_file(tensors, crafted / "adapter_model.safetensors")
    refused_unchanged(
        base, crafted, [LAYER.removeprefix("base_model.model.")], r"has lora_A without its other half"
    )
    (crafted / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    refused_unchanged(
        base, crafted, [str(crafted / "adapter_model.safetensors")], "not a readable safetensors file"
    )


def test_an_alpha_that_overflows_the_merged_weights_is_refused(good, tmp_path) -> None:
    # finite, but alpha / r times B @ A leaves float32's range: every earlier layer merged fine, and
    # the model must still be untouched
    base, adapter = good
    crafted = copy_adapter(adapter, tmp_path, {"alpha_pattern": {"layers.1.mlp.dense_4h_to_h": 1e300}})
    refused_unchanged(
        base, crafted, [LAYER.removeprefix("base_model.model.")], r"beyond torch\.float32's range"
    )


def test_peft_rank_and_alpha_patterns_merge_as_peft_applies_them(good, tmp_path) -> None:
    """peft's patterns are regular expressions for the end of a layer name: a peft adapter that uses
    them merges to peft's own logits."""
    base, _ = good
    reference = make_reference(NO_DROPOUT, seed=2)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value", "dense_4h_to_h"],
        rank_pattern={r"layers\.0\.\w+\.query_key_value": 2},
        alpha_pattern={r"layers\.1\.\w+\.dense_4h_to_h": 3},
    )  # fmt: skip
    theirs = peft.get_peft_model(reference, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(theirs.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(GPTNeoXJapaneseForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(merged), logits(theirs), atol=1e-5, rtol=1e-5)


def test_stacked_adapters_load_and_cycles_are_refused_naming_the_chain(good, tmp_path) -> None:
    base, adapter = good
    first = copy_adapter(adapter, tmp_path / "1", {"base_model_name_or_path": str(base)})
    second = copy_adapter(adapter, tmp_path / "2", {"base_model_name_or_path": str(first)})
    expected = merge_adapter(merge_adapter(GPTNeoXJapaneseForCausalLM.from_pretrained(base), first), second)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(second)), logits(expected))

    own = copy_adapter(adapter, tmp_path / "own")
    (own / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(own), "r": 4}))
    # A -> B -> A
    first_config = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(
        json.dumps(first_config | {"base_model_name_or_path": str(second)})
    )
    for start, chain in [(own, f"{own} -> {own}"), (second, f"{second} -> {first} -> {second}")]:
        for load in (
            adapter_base,
            GPTNeoXJapaneseForCausalLM.from_pretrained,
            AutoModelForCausalLM.from_pretrained,
        ):
            with pytest.raises(ValueError, match="leads back to") as caught:
                load(start)
            assert f"adapter already on the chain {chain};" in str(caught.value)


def test_a_chain_longer_than_the_limit_is_refused(good, tmp_path) -> None:
    base, adapter = good
    below = str(base)
    for i in range(MAX_ADAPTER_CHAIN + 1):
        link = tmp_path / f"link{i}"
        link.mkdir()
        (link / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": below}))
        below = str(link)
    with pytest.raises(ValueError, match=f"more than {MAX_ADAPTER_CHAIN} adapters stacked"):
        adapter_base(below)
    assert adapter_base(tmp_path / "link1") == str(tmp_path / "link0")  # a short chain is fine


def test_a_base_that_is_not_a_string_is_named(good, tmp_path) -> None:
    _, adapter = good
    crafted = copy_adapter(adapter, tmp_path, {"base_model_name_or_path": 5})
    with pytest.raises(
        ValueError, match=r"adapter_config\.json: base_model_name_or_path must be a path or Hub id"
    ):
        adapter_base(crafted)
