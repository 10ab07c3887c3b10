"""Beam search against transformers' generate(num_beams=...) on the same random weights.

Every test runs on the PyTorch step (what GPU and half-precision users run) and on the C step of CPU
float32 (which holds pointers into the KV cache, so it also proves that the beams are reordered
inside the cache's own buffers).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import force_backend

import neoxja

VOCAB = 384
PAD = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, neoxja model) with the same random weights, loaded from one save_pretrained."""
    torch.manual_seed(4)
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    reference = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init: varied continuations, real choices
        for param in reference.parameters():
            param.normal_(0.0, 0.5 if param.dim() > 1 else 1.0)
    directory = tmp_path_factory.mktemp("beam")
    reference.save_pretrained(directory)
    return reference, neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(autouse=True, params=["torch", "cpu-fused"])
def backend(request, monkeypatch) -> str:
    """Run the test with this decoding backend first in line and check that beam search chose it."""
    used = force_backend(monkeypatch, request.param)
    yield request.param
    assert used and set(used) == {request.param}, f"beam search decoded with {used}, not {request.param}"


def _prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random prompts (ids >= 6: no bos, eos or pad inside); with 2 rows the second is left-padded."""
    ids = torch.randint(6, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))[:batch]
    if batch == 1:
        return ids, None
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    return ids, mask


def _liked_token(reference, ids, mask, beams: int) -> int:
    """A token of transformers' best beam without eos that first appears latest: as an eos it is hit
    late in that beam, at other steps (or never) in the others."""
    with torch.no_grad():
        free = reference.generate(
            ids, attention_mask=mask, num_beams=beams, max_new_tokens=24, pad_token_id=PAD, eos_token_id=None
        )
    row = free[0, ids.shape[1] :].tolist()
    firsts = {token: row.index(token) for token in row}
    return max(firsts, key=firsts.__getitem__)


def _both(models, ids, mask, **kwargs):
    reference, ours = models
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=24,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **kwargs,
    )
    with torch.no_grad():
        expected = reference.generate(ids, do_sample=False, **kwargs)
    return expected, ours.generate(ids, **kwargs)


def _assert_same(expected, got) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.beam_indices, expected.beam_indices)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == len(expected.logits)
    for mine, theirs in zip(got.scores + got.logits, expected.scores + expected.logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


CASES = {  # batch, num_beams, early_stopping, length_penalty, num_return_sequences, eos
    "1x2-false-lp1-best": (1, 2, False, 1.0, 1, "liked"),
    "2x4-false-lp1-all": (2, 4, False, 1.0, 4, "liked"),
    "1x4-true-lp0": (1, 4, True, 0.0, 2, "liked"),
    "2x2-true-lp2-all": (2, 2, True, 2.0, 2, "liked"),
    "2x4-never-lpneg": (2, 4, "never", -1.0, 1, "liked"),
    "1x4-never-lp2-all": (1, 4, "never", 2.0, 4, "liked"),
    "2x4-false-lp0-no-eos": (2, 4, False, 0.0, 1, None),
    "2x2-never-lp1-eos-list": (2, 2, "never", 1.0, 2, "list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_beam_search_matches_transformers(models, case) -> None:
    batch, beams, early_stopping, length_penalty, returned, eos = CASES[case]
    ids, mask = _prompts(batch)
    liked = _liked_token(models[0], ids, mask, beams)
    eos_token_id = {"liked": liked, "list": [VOCAB - 1, liked], None: None}[eos]
    expected, got = _both(
        models,
        ids,
        mask,
        num_beams=beams,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        num_return_sequences=returned,
        eos_token_id=eos_token_id,
    )
    _assert_same(expected, got)
    assert got.sequences.shape[0] == batch * returned
    if eos is not None:  # the eos is actually hit: some hypothesis ends with it
        assert liked in got.sequences[:, 7:]


def test_processors_with_beams_match_transformers(models) -> None:
    """no_repeat_ngram_size, repetition_penalty and min_new_tokens act on the log-probs of every beam,
    rebuilt after each reorder."""
    ids, mask = _prompts(2)
    eos = _liked_token(models[0], ids, mask, 4)
    settings = dict(no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=12, eos_token_id=eos)
    expected, got = _both(models, ids, mask, num_beams=4, num_return_sequences=2, **settings)
    _assert_same(expected, got)


def test_transition_scores_reconstruct_sequences_scores(models) -> None:
    """transformers' documented recipe: the chosen tokens' scores summed over each beam's own length,
    divided by length ** length_penalty, give sequences_scores."""
    reference, ours = models
    ids, mask = _prompts(2)
    out = ours.generate(
        ids,
        attention_mask=mask,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=1.5,
        max_new_tokens=25,
        eos_token_id=_liked_token(reference, ids, mask, 3),
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )
    transition = ours.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    lengths = (out.beam_indices >= 0).sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # some beams ended early on the eos
    torch.testing.assert_close(transition.sum(dim=1) / lengths**1.5, out.sequences_scores)


def test_plain_call_returns_the_best_sequences(models) -> None:
    """Without return_dict_in_generate the result is the sequences tensor, as transformers'."""
    reference, ours = models
    ids, _ = _prompts(1)
    kwargs = dict(num_beams=3, max_new_tokens=20, pad_token_id=PAD)
    with torch.no_grad():
        expected = reference.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(ours.generate(ids, **kwargs), expected)


def test_beam_sampling_is_reproducible_and_scores_its_beams(models) -> None:
    """Beam sampling draws the candidates from plan.generator: the same seed gives the same beams,
    another seed others. transformers draws in another order, so its beams are not compared; the
    beams are checked for what they must be: distinct, sorted by score, and each score the sum of its
    tokens' processed log-probs over its length."""
    _, ours = models
    ids, mask = _prompts(2)
    kwargs = dict(
        attention_mask=mask,
        num_beams=3,
        num_return_sequences=3,
        do_sample=True,
        temperature=1.5,
        top_k=20,
        max_new_tokens=20,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )
    first = ours.generate(ids, seed=3, **kwargs)
    again = ours.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    assert torch.equal(first.sequences_scores, again.sequences_scores)
    assert not torch.equal(first.sequences, ours.generate(ids, seed=4, **kwargs).sequences)
    for prompt in range(2):
        rows = first.sequences[3 * prompt : 3 * prompt + 3]
        assert len({tuple(row.tolist()) for row in rows}) == 3
        scores = first.sequences_scores[3 * prompt : 3 * prompt + 3]
        assert torch.all(scores[:-1] >= scores[1:])
    transition = ours.compute_transition_scores(first.sequences, first.scores, first.beam_indices)
    assert torch.isfinite(transition).all()  # every chosen token was inside top_k
    torch.testing.assert_close(transition.sum(dim=1) / 20, first.sequences_scores)


def test_beam_sampling_keeps_a_token_beside_eos_as_transformers(models) -> None:
    """top_k=1 would leave one candidate per beam; beam sampling keeps eos ids + 1 (transformers'
    min_tokens_to_keep), so all beams get a finite score and differ."""
    _, ours = models
    ids, _ = _prompts(1)
    out = ours.generate(
        ids,
        num_beams=3,
        num_return_sequences=3,
        do_sample=True,
        top_k=1,
        max_new_tokens=8,
        seed=0,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert torch.isfinite(out.sequences_scores).all() and bool((out.sequences_scores > -1e8).all())
    assert len({tuple(row.tolist()) for row in out.sequences}) == 3
