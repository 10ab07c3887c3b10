"""oneDNN-packed weights for CPU inference (neoxja.linear): same parameters, same values, same output."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors.torch import load_file

import neoxja
from neoxja.linear import (
    MIN_PACKED_ELEMENTS,
    Linear,
    is_optimized_for_cpu_inference,
    optimize_for_cpu_inference,
    packing_available,
    restore_dense,
)

# hidden 512 -> every projection and the head have >= MIN_PACKED_ELEMENTS weights and are packed.
CONFIG = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
              eos_token_id=1, max_position_embeddings=128)

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")


def _model(tie: bool = True) -> neoxja.GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig(tie_word_embeddings=tie, **CONFIG)
    model = neoxja.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters and buffers."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and tensor.stride() == (0, 0) and bool(tensor.isnan().all())


def _packed_layers(model: torch.nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.is_packed]


def test_ci_has_onednn() -> None:
    """The CPU wheel CI installs has oneDNN; the tests below would otherwise only check the fallback."""
    assert packing_available()


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_parity(rows: int, bias: bool) -> None:
    linear = Linear(512, 640, bias=bias).eval()
    x = torch.randn(2, rows, 512)
    with torch.no_grad():
        expected = linear(x)
        assert linear.pack()
        assert not _is_placeholder(linear.weight)  # reading .weight gives the dense weight back...
        assert not linear.is_packed  # ...and unpacks
        assert linear.pack()
        torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x[:, -1:]), expected[:, -1:], rtol=1e-5, atol=1e-5)  # a view


def test_small_or_non_float32_weights_are_not_packed() -> None:
    assert not Linear(64, 64).pack()  # below MIN_PACKED_ELEMENTS: oneDNN's call overhead would dominate
    assert not Linear(512, 1024).to(torch.bfloat16).pack()
    assert MIN_PACKED_ELEMENTS <= 512 * 512


@needs_onednn
@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_identity_and_memory(tie: bool) -> None:
    model = _model(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    bytes_before = _storage_bytes(model)
    optimize_for_cpu_inference(model)
    assert is_optimized_for_cpu_inference(model)
    assert len(_packed_layers(model)) == 4 * CONFIG["num_hidden_layers"] + 1
    # Untied weights were replaced, not copied: placeholders, their dense storage freed.
    assert [id(p) for p in model.parameters()] == params_before  # the same Parameter objects
    placeholders = {k for k, p in model.named_parameters() if _is_placeholder(p)}
    projections = ("query_key_value.weight", "dense.weight", "4h.weight", "4h_to_h.weight")
    linear_keys = {k for k in before if k.endswith(projections)}
    assert placeholders == linear_keys | (set() if tie else {"embed_out.weight"})
    freed = sum(before[k].numel() * 4 for k in placeholders)
    assert _storage_bytes(model) == bytes_before - freed + 4 * len(placeholders)  # one NaN each
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    restore_dense(model)
    assert [id(p) for p in model.parameters()] == params_before
    assert _storage_bytes(model) == bytes_before
    # The tied input embedding kept its dense weight (row lookups need it).
    assert not _is_placeholder(model.gpt_neox_japanese.embed_in.weight)


@needs_onednn
def test_logits_save_pretrained_and_deepcopy(tmp_path) -> None:
    model = _model(tie=False)
    ids = torch.randint(2, CONFIG["vocab_size"], (2, 17))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "before")
    optimize_for_cpu_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(model)(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "after")
    assert is_optimized_for_cpu_inference(model)  # saving did not unpack
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_onednn
def test_load_state_dict_into_packed_model() -> None:
    model, other = _model(tie=False), _model(tie=False)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)
    ids = torch.randint(2, CONFIG["vocab_size"], (1, 9))
    with torch.no_grad():
        expected = other(ids).logits
        optimize_for_cpu_inference(model)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


@needs_onednn
def test_writing_a_tied_weight_in_place_drops_the_stale_copy() -> None:
    model = _model(tie=True)
    optimize_for_cpu_inference(model)
    assert model.embed_out.is_packed
    ids = torch.randint(2, CONFIG["vocab_size"], (1, 9))
    with torch.no_grad():
        model.gpt_neox_japanese.embed_in.weight.mul_(2.0)
        logits = model(ids).logits
    assert not model.embed_out.is_packed
    restore_dense(model)
    with torch.no_grad():  # the other layers were still packed for `logits`: rounding differs
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_refused_in_training_train_and_to_unpack() -> None:
    model = _model().train()
    with pytest.raises(RuntimeError, match="eval"):
        optimize_for_cpu_inference(model)
    optimize_for_cpu_inference(model.eval())
    model.train()
    assert not is_optimized_for_cpu_inference(model)
    assert not any(_is_placeholder(p) for p in model.parameters())
    optimize_for_cpu_inference(model.eval())
    model.to(torch.float64)
    assert not _packed_layers(model) and model.dtype == torch.float64
    optimize_for_cpu_inference(model.float())
    restore_dense(model)
    assert not is_optimized_for_cpu_inference(model)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch-steps", "c-steps"])
def test_generate_packs_and_matches_transformers(tmp_path, monkeypatch, fused) -> None:
    """Decoding through PyTorch packs the weights; decoding in C (neoxja.cpu_decode) reads the dense
    ones, so generate() then leaves them unpacked. Either way the tokens are transformers'."""
    from neoxja.cpu_decode import fused_decoding_unsupported

    monkeypatch.setenv("NEOXJA_FUSED_DECODE", "1" if fused else "0")
    torch.manual_seed(1)
    reference = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**CONFIG)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.1 if param.dim() > 1 else 1.0)
    reference.save_pretrained(tmp_path)
    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(2, CONFIG["vocab_size"], (1, 9))
    assert (fused_decoding_unsupported(model, 73) is None) == fused
    out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None)
    assert is_optimized_for_cpu_inference(model) == (packing_available() and not fused)
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None)
    assert torch.equal(out, expected)
    # The weights are ordinary tensors afterwards (not inference tensors): training still works.
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.embed_out.weight.grad is not None
    assert model.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h.weight.grad is not None


@needs_onednn
def test_forward_packs_by_itself_only_without_autograd() -> None:
    model = _model(tie=False)
    ids = torch.randint(2, CONFIG["vocab_size"], (1, 9))
    logits = model(ids).logits  # eval mode, autograd on: stays dense
    assert not is_optimized_for_cpu_inference(model)
    with torch.inference_mode():
        packed_logits = model(ids).logits
    assert is_optimized_for_cpu_inference(model)
    torch.testing.assert_close(packed_logits, logits.detach(), rtol=1e-5, atol=1e-5)
    # A recorded forward (say, gradients of the input embeddings in eval mode) unpacks and works.
    embeds = model.gpt_neox_japanese.embed_in(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and not is_optimized_for_cpu_inference(model)
    # Weights packed and unpacked under inference_mode are ordinary tensors: training works.
    with torch.inference_mode():
        model(ids)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.dim() == 2)


@needs_onednn
def test_restore_dense_turns_automatic_packing_off_until_asked() -> None:
    model = _model()
    ids = torch.randint(2, CONFIG["vocab_size"], (1, 9))
    restore_dense(model)
    with torch.no_grad():
        model(ids)
        model.generate(ids, max_new_tokens=2)
    assert not is_optimized_for_cpu_inference(model)
    optimize_for_cpu_inference(model)
    dense = model.gpt_neox_japanese.layers[0].attention.dense
    assert not _is_placeholder(dense.weight)  # reading the weight unpacks that layer...
    assert not dense.is_packed
    with torch.no_grad():
        model(ids)  # ...and the next forward packs it again
    assert dense.is_packed


@needs_onednn
def test_bfloat16_model_packs_after_float() -> None:
    model = _model().to(torch.bfloat16)
    ids = torch.randint(2, CONFIG["vocab_size"], (1, 9))
    with torch.no_grad():
        model(ids)
        assert not is_optimized_for_cpu_inference(model)
        model.float()(ids)
    assert is_optimized_for_cpu_inference(model)


@needs_onednn
def test_optimizer_and_frozen_flags_set_while_packed_still_apply() -> None:
    """Fine-tuning set up right after an evaluation (weights packed) must train what it says."""
    model = _model(tie=False)
    ids = torch.randint(2, CONFIG["vocab_size"], (2, 9))
    with torch.no_grad():
        model(ids)  # packs
    assert is_optimized_for_cpu_inference(model)
    frozen = model.gpt_neox_japanese.layers[0].attention.query_key_value
    frozen._parameters["weight"].requires_grad_(False)  # as a freezing loop over parameters() does
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    key = "gpt_neox_japanese.layers.0.attention.query_key_value.weight"
    assert torch.equal(after[key], before[key])  # frozen stayed frozen
    assert not torch.equal(after["embed_out.weight"], before["embed_out.weight"])  # the rest trained
    assert not torch.equal(after[key.replace("0.attention.query_key_value", "1.mlp.dense_h_to_4h")],
                           before[key.replace("0.attention.query_key_value", "1.mlp.dense_h_to_4h")])
