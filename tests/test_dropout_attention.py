"""The blockwise CPU attention with dropout: the values and gradients of plain attention, masks
that repeat from the RNG state, and the model's training forward using it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import NO_DROPOUT, make_pair

import neoxja.dropout_attention as blockwise
from neoxja.dropout_attention import _DropoutAttention, dropout_attention


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so every test crosses block boundaries (and causal key skipping)."""
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 2**9)


def qkv(dtype: torch.dtype = torch.float32, length: int = 80) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, length, 8, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


def padding_mask(length: int) -> torch.Tensor:
    """Causal, the first row of the batch left-padded by 5, plus one row that sees no key at all."""
    mask = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
    mask[0, :, :, :5] = False
    mask |= torch.eye(length, dtype=torch.bool)
    mask[1, :, 3] = False
    return mask


def explicit(q, k, v, mask, keep) -> torch.Tensor:  # noqa: ANN001
    """The eager computation (masked_fill with the dtype's minimum, softmax, dropout factor, values)."""
    scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1) * keep, v)


def grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, torch.ones_like(out).cumsum(-2) / out.shape[-2])


@pytest.mark.parametrize("causal", [True, False])
def test_without_dropout_equals_sdpa(causal: bool) -> None:
    q, k, v = qkv()
    mask = None if causal else padding_mask(q.shape[2])
    ours = dropout_attention(q, k, v, mask, causal, 0.0)
    mask_for_reference = torch.ones(80, 80, dtype=torch.bool).tril() if causal else mask
    reference = explicit(q, k, v, mask_for_reference, 1.0)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads(ours, [q, k, v]), grads(reference, [q, k, v]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if causal:
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_masks_are_those_of_the_seeded_blocks(causal: bool) -> None:
    """Rebuilding every block's factor from its seed gives the explicit attention the same output
    and gradients, so forward and backward drop the same probabilities."""
    q, k, v = qkv()
    length = q.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool).tril() if causal else padding_mask(length)
    torch.manual_seed(3)
    ours = dropout_attention(q, k, v, None if causal else mask, causal, 0.3)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (1,)))
    keep = torch.zeros(2, 3, length, length)
    blocks = blockwise._blocks(q, length, causal)
    assert len(blocks) > 3 and (not causal or blocks[0][2] < length)  # several blocks, keys skipped
    for index, (start, end, key_end) in enumerate(blocks):
        block = torch.ones(2, 3, end - start, key_end)
        keep[:, :, start:end, :key_end] = blockwise.drop_(block, 0.3, seed + index)
    dropped = float((keep[mask.expand_as(keep)] == 0).float().mean())
    assert 0.25 < dropped < 0.35
    reference = explicit(q, k, v, mask, keep)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads(ours, [q, k, v]), grads(reference, [q, k, v]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_masks_equal_the_pytorch_fallback(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C kernel (several threads) and the integer-op fallback drop the same elements, about p of them."""
    if blockwise._dropout is None:  # pip install compiles it; CI must have it, elsewhere its absence skips
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("neoxja._dropout was not compiled (required in CI)")
        pytest.skip("neoxja._dropout is not built (no C compiler at install)")
    x = torch.rand(3, 70_001, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
    torch.set_num_threads(2)
    compiled = blockwise.drop_(x.clone(), 0.15, 2**62 + 9)
    monkeypatch.setattr(blockwise, "_dropout", None)
    fallback = blockwise.drop_(x.clone(), 0.15, 2**62 + 9)
    assert torch.equal(compiled, fallback)
    assert 0.145 < float((compiled == 0).to(dtype).mean()) < 0.155
    torch.testing.assert_close(compiled[compiled != 0], x[compiled != 0] * (1 / 0.85), rtol=0, atol=0)
    assert not torch.equal(compiled, blockwise.drop_(x.clone(), 0.15, 2**62 + 10))


def test_gradients_pass_gradcheck_in_float64() -> None:
    q, k, v = (t.detach()[:1, :2, :11].requires_grad_() for t in qkv(torch.float64))
    mask = padding_mask(11)[:1]
    for args in ((None, True, 0.4, 123), (mask, False, 0.4, 7), (mask, False, 0.0, 0)):
        function = lambda q, k, v, args=args: _DropoutAttention.apply(q, k, v, *args)  # noqa: E731
        assert torch.autograd.gradcheck(function, (q, k, v))


def test_masks_follow_the_rng_state() -> None:
    q, k, v = qkv()
    torch.manual_seed(5)
    first = dropout_attention(q, k, v, None, True, 0.2)
    second = dropout_attention(q, k, v, None, True, 0.2)
    torch.manual_seed(5)
    assert torch.equal(dropout_attention(q, k, v, None, True, 0.2), first)
    assert not torch.equal(first, second)


def test_bfloat16_autocast_scores_stay_float32() -> None:
    q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dropout_attention(q, k, v, None, True, 0.0)
    assert out.dtype == torch.bfloat16
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)
    dq, dk, dv = grads(out, [q, k, v])
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16 and bool(dq.isfinite().all())


def test_dropout_out_of_range_is_refused() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout must be in"):
        dropout_attention(q, k, v, None, True, 1.0)


def test_model_training_forward_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention dropout in CPU training goes through the blockwise function (once per layer), and
    evaluation mode and dropout-free models do not."""
    calls = []
    real = blockwise.dropout_attention
    monkeypatch.setattr("neoxja.network.dropout_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, NO_DROPOUT["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    _, model = make_pair({**NO_DROPOUT, "attention_dropout": 0.3}, tmp_path / "a")
    model.train()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == NO_DROPOUT["num_hidden_layers"]
    model.eval()
    model(ids)
    _, plain = make_pair(NO_DROPOUT, tmp_path / "b")
    plain.train()
    plain(ids)
    assert len(calls) == NO_DROPOUT["num_hidden_layers"]
