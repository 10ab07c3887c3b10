"""The column-major inference layout (neoxja.linear): same parameters, same values, same output."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import neoxja
from neoxja.linear import (
    is_column_major,
    is_optimized_for_cpu_inference,
    optimize_for_cpu_inference,
    restore_row_major,
)

CONFIG = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
              eos_token_id=1, max_position_embeddings=128)


def _model(tie: bool = True) -> neoxja.GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig(tie_word_embeddings=tie, **CONFIG)
    model = neoxja.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters and buffers."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("batch", [1, 3])
def test_linear_parity(batch: int) -> None:
    linear = torch.nn.Linear(96, 200, bias=True).eval()
    x = torch.randn(batch, 5, 96)
    expected = linear(x)
    optimize_for_cpu_inference(linear)
    assert is_column_major(linear.weight)
    torch.testing.assert_close(linear(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_and_memory_unchanged(tie: bool) -> None:
    model = _model(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    bytes_before = _storage_bytes(model)
    optimize_for_cpu_inference(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [id(p) for p in model.parameters()] == params_before
    assert _storage_bytes(model) == bytes_before  # replaced, not copied
    assert is_column_major(model.embed_out.weight)
    assert (model.embed_out.weight is model.gpt_neox_japanese.embed_in.weight) == tie


def test_logits_and_save_pretrained_unchanged(tmp_path) -> None:
    model = _model()
    ids = torch.randint(2, 512, (2, 17))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "before")
    optimize_for_cpu_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "after")
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refused_in_training_and_undone() -> None:
    model = _model().train()
    with pytest.raises(RuntimeError, match="eval"):
        optimize_for_cpu_inference(model)
    optimize_for_cpu_inference(model.eval())
    assert is_optimized_for_cpu_inference(model)
    restore_row_major(model)
    assert not is_optimized_for_cpu_inference(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_generate_switches_layout_and_matches_transformers(tmp_path) -> None:
    torch.manual_seed(1)
    reference = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**CONFIG)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.5 if param.dim() > 1 else 1.0)
    reference.save_pretrained(tmp_path)
    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(2, 512, (1, 9))
    out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None)
    assert is_optimized_for_cpu_inference(model)
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None)
    assert torch.equal(out, expected)
    # The weights are ordinary tensors afterwards (not inference tensors): training still works.
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.embed_out.weight.grad is not None
