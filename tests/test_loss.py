"""The next-token loss without the whole logits: chunked, recomputed under gradient checkpointing,
equal to the loss from full logits (and to transformers'), and smaller in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT, make_pair

import neoxja.loss
from neoxja.loss import IGNORE_INDEX, chunked_loss_sum, logits_loss_sum, next_token_targets


def batch(rows: int = 3, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row without any target
    return ids, labels


@pytest.mark.parametrize("recompute", [False, True])
def test_chunks_equal_the_whole(recompute: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neoxja.loss, "CHUNK_ELEMENTS", 5 * 40)  # chunks of 5 positions
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 16, 8, generator=generator, requires_grad=True)
    head = torch.nn.Linear(8, 40, bias=False)
    targets = next_token_targets(torch.randint(0, 40, (3, 16), generator=generator))
    targets[1, :7] = IGNORE_INDEX
    whole = logits_loss_sum(head(hidden), targets)
    expected = torch.autograd.grad(whole, [hidden, head.weight])
    calls = []
    monkeypatch.setattr(
        neoxja.loss, "_head_loss", lambda *a: calls.append(1) or logits_loss_sum(a[0](a[1]), a[2])
    )
    chunked = chunked_loss_sum(hidden, head, targets, recompute)
    got = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert len(calls) == (20 if recompute else 10)  # 10 chunks, each recomputed once in backward


def test_skip_logits_matches_transformers_loss_and_gradients(tmp_path: Path) -> None:
    """``skip_logits`` and ``num_items_in_batch`` give transformers' loss (and its gradients), with and
    without gradient checkpointing."""
    reference, model = make_pair(NO_DROPOUT, tmp_path)
    reference.train(), model.train()
    ids, labels = batch()
    expected = reference(input_ids=ids, labels=labels, num_items_in_batch=17).loss
    expected.backward()
    expected_grads = {n: p.grad for n, p in reference.named_parameters()}
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(input_ids=ids, labels=labels, skip_logits=True, num_items_in_batch=17)
        assert out.logits is None
        torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-5)
        out.loss.backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-5, rtol=1e-4)
    plain = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(plain.loss, reference(input_ids=ids, labels=labels).loss, atol=1e-6, rtol=1e-5)


def test_skip_logits_needs_labels(tmp_path: Path) -> None:
    _, model = make_pair(NO_DROPOUT, tmp_path)
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(input_ids=batch()[0], skip_logits=True)


def test_recomputed_head_holds_less_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """What autograd keeps for backward: with recompute, about the hidden states; without, the logits."""
    monkeypatch.setattr(neoxja.loss, "CHUNK_ELEMENTS", 64 * 4000)
    hidden = torch.randn(1, 512, 16, requires_grad=True)
    head = torch.nn.Linear(16, 4000, bias=False)
    targets = torch.randint(0, 4000, (1, 512))
    sizes = {}
    for recompute in (False, True):
        saved = []

        def pack(tensor: torch.Tensor, saved: list = saved) -> torch.Tensor:
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            chunked_loss_sum(hidden, head, targets, recompute)
        sizes[recompute] = sum(saved)
    logits_bytes = 512 * 4000 * 4
    assert sizes[False] >= logits_bytes and sizes[True] < logits_bytes / 10
