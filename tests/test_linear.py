"""Weight formats as explicit module swaps (neoxja.linear): PackedLinear, the oneDNN layout.

A swap is the only way a model's layers change; the swapped layers say what they hold, compute what
``nn.Linear`` computes, and save in transformers' format.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_pair
from torch import nn

import neoxja
from neoxja.linear import (
    FORMATS,
    LinearFormat,
    PackedLinear,
    is_optimized_for_cpu_inference,
    optimize_for_cpu_inference,
    packing_available,
    restore_dense,
    swap_linear_layers,
)

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")

# Layers of 256 x 1024 and a 2048 x 256 head: above PackedLinear's size floor.
CONFIG = {"vocab_size": 2048, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_packed_layer_computes_what_nn_linear_does_and_holds_no_placeholder() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(512, 768, bias=True)
    packed = PackedLinear.from_linear(dense)
    x = torch.randn(3, 5, 512)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
    weights = dict(packed.named_parameters())
    assert set(weights) == {"weight", "bias"}
    assert weights["weight"].layout == torch._mkldnn and not weights["weight"].requires_grad
    assert torch.equal(packed.state_dict()["weight"], dense.weight.detach())  # lossless, dense layout
    assert torch.equal(packed.to_linear().weight, dense.weight)
    assert FORMATS[PackedLinear.format_name] is PackedLinear and issubclass(PackedLinear, LinearFormat)


def test_small_or_non_float32_layers_are_refused_with_the_reason() -> None:
    assert "fewer than" in PackedLinear.supports(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="not float32 on the CPU"):
        PackedLinear.from_linear(nn.Linear(1024, 1024).double())


def test_swap_round_trip_saves_in_transformers_format(tmp_path: Path) -> None:
    reference, model = make_pair(CONFIG, tmp_path / "base")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize_for_cpu_inference(model) is model
    assert is_optimized_for_cpu_inference(model)
    assert isinstance(model.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h, PackedLinear)
    assert not any(
        torch.isnan(p.to_dense() if p.layout == torch._mkldnn else p).any() for p in model.parameters()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)

    model.save_pretrained(tmp_path / "saved")
    back = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    restore_dense(model)
    assert not is_optimized_for_cpu_inference(model)
    assert all(type(m) is not PackedLinear for m in model.modules())
    assert model.embed_out.weight is model.gpt_neox_japanese.embed_in.weight  # tied again
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_packed_model_generates_the_dense_tokens_through_pytorch(tmp_path: Path) -> None:
    _, model = make_pair(CONFIG, tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    dense = model.generate(ids, max_new_tokens=12)
    optimize_for_cpu_inference(model)
    assert neoxja.explain_decoding(model).startswith("torch: ")
    assert "packed" in neoxja.explain_decoding(model)
    assert torch.equal(model.generate(ids, max_new_tokens=12), dense)


def test_packed_layers_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    _, model = make_pair(CONFIG, tmp_path)
    with pytest.raises(RuntimeError, match="eval mode"):
        optimize_for_cpu_inference(model.train())
    optimize_for_cpu_inference(model.eval())
    for call in (model.half, model.train, lambda: model.to("meta")):
        with pytest.raises(RuntimeError, match="restore_dense"):
            call()
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    with pytest.raises(RuntimeError, match="no backward"):
        model(inputs_embeds=torch.randn(1, 3, 256, requires_grad=True))
    with pytest.raises(RuntimeError, match="do not load state dicts"):
        model.load_state_dict(model.state_dict())


def test_swap_takes_a_filter_and_leaves_the_rest(tmp_path: Path) -> None:
    _, model = make_pair(CONFIG, tmp_path)
    swap_linear_layers(model, "onednn-packed", where=lambda name, _: name.endswith("dense_h_to_4h"))
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["gpt_neox_japanese.layers.1.mlp.dense_h_to_4h"] is PackedLinear
    assert kinds["gpt_neox_japanese.layers.1.mlp.dense_4h_to_h"] is nn.Linear
    assert kinds["embed_out"] is nn.Linear
