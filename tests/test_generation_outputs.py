"""return_dict_in_generate / output_scores / output_logits and compute_transition_scores for greedy
decoding and sampling, against transformers on the same random weights, on every decoding backend.
(Beam search and assisted decoding have their own tests.)"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import force_backend, make_pair

from neoxja import decoding
from neoxja.generation_outputs import GenerateDecoderOnlyOutput, compute_transition_scores

CONFIG = dict(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=1,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference, ours = make_pair(CONFIG, tmp_path_factory.mktemp("outputs"), jitter=0.3)
    return reference, ours.eval()


@pytest.fixture(autouse=True, params=[b.name for b in decoding.BACKENDS])
def backend(request, monkeypatch) -> str:
    used = force_backend(monkeypatch, request.param)
    yield request.param
    assert set(used) <= {request.param}, f"generate() decoded with {used}, not {request.param}"


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts (pad id 3) and their mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 256, (2, 8), generator=g)
    ids[1, :3] = 3
    mask = (ids != 3).long()
    mask[0] = 1
    return ids, mask


def _assert_close_steps(ours: tuple, theirs: tuple, atol: float = 1e-5) -> None:
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == torch.float32 and a.shape == b.shape, step
        assert torch.allclose(a, b, atol=atol, rtol=0), f"step {step}: {(a - b).abs().max()}"


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=4)],
    ids=["plain", "processors"],
)
def test_greedy_scores_and_logits_match_transformers(models, settings) -> None:
    reference, ours = models
    ids, mask = _prompts()
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=12,
        pad_token_id=3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **settings,
    )
    with torch.no_grad():
        expected = reference.generate(ids, do_sample=False, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, expected.sequences)
    _assert_close_steps(got.scores, expected.scores)
    _assert_close_steps(got.logits, expected.logits)
    if settings:  # the processors changed the scores, so scores and logits differ
        assert any(not torch.equal(s, raw) for s, raw in zip(got.scores, got.logits, strict=True))
    # Asking for scores does not change the tokens (the C step stops picking itself, the sampler picks).
    assert torch.equal(
        ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=3, **settings), got.sequences
    )


def test_sampling_scores_match_transformers_with_the_same_seed(models) -> None:
    """Sampling draws one multinomial per step from the same probabilities as transformers, so the
    same global seed gives the same tokens, and the warped scores match."""
    reference, ours = models
    ids, _ = _prompts()
    kwargs = dict(
        max_new_tokens=10,
        do_sample=True,
        temperature=0.8,
        top_k=30,
        top_p=0.9,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    torch.manual_seed(5)
    with torch.no_grad():
        expected = reference.generate(ids[:1], **kwargs)
    torch.manual_seed(5)
    got = ours.generate(ids[:1], **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _assert_close_steps(got.scores, expected.scores)
    _assert_close_steps(got.logits, expected.logits)
    assert any(torch.isinf(s).any() for s in got.scores)  # top-k/top-p masked tokens are -inf


@pytest.mark.parametrize("normalize", [False, True])
def test_transition_scores_match_transformers(models, normalize) -> None:
    reference, ours = models
    ids, mask = _prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=9, pad_token_id=3, return_dict_in_generate=True)
    got = ours.generate(ids, output_scores=True, **kwargs)
    ours_scores = ours.compute_transition_scores(got.sequences, got.scores, normalize_logits=normalize)
    theirs = reference.compute_transition_scores(got.sequences, got.scores, normalize_logits=normalize)
    assert ours_scores.shape == (2, 9)
    assert torch.allclose(ours_scores, theirs, atol=1e-6, rtol=0)
    new = got.sequences[:, ids.shape[1] :]
    by_hand = torch.stack([got.scores[i].gather(1, new[:, i : i + 1]).squeeze(1) for i in range(9)], dim=1)
    if normalize:
        by_hand = torch.stack(
            [got.scores[i].log_softmax(-1).gather(1, new[:, i : i + 1]).squeeze(1) for i in range(9)], dim=1
        )
        assert (ours_scores <= 0).all()  # log-probabilities
    assert torch.allclose(ours_scores, by_hand, atol=1e-6, rtol=0)


def test_outputs_read_like_transformers_and_default_to_a_tensor(models) -> None:
    _, ours = models
    ids, _ = _prompts()
    plain = ours.generate(ids[:1], max_new_tokens=5)
    assert isinstance(plain, torch.Tensor)
    out = ours.generate(ids[:1], max_new_tokens=5, return_dict_in_generate=True)
    assert (
        torch.equal(out.sequences, plain)
        and torch.equal(out[0], plain)
        and torch.equal(out["sequences"], plain)
    )
    assert out.scores is None and out.logits is None and list(out.keys()) == ["sequences"]
    with pytest.raises(KeyError, match="scores"):
        out["scores"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        still_a_tensor = ours.generate(ids[:1], max_new_tokens=5, output_scores=True)
    assert torch.equal(still_a_tensor, plain)
    assert any(
        "return_dict_in_generate=False" in str(w.message) and "output_scores" in str(w.message)
        for w in caught
    )


def test_transition_scores_name_bad_beam_indices() -> None:
    scores = (torch.zeros(2, 5), torch.zeros(2, 5))
    sequences = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="beam_indices must be \\[rows, steps\\]"):
        compute_transition_scores(sequences, scores, beam_indices=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="scores is empty"):
        compute_transition_scores(sequences, ())


def test_assisted_decoding_reports_its_drafts_in_the_output(models) -> None:
    """Prompt lookup on a prompt that repeats: the output carries the verification counts (neoxja's
    assisted_stats) and the greedy tokens; plain decoding has no such counts."""
    _, ours = models
    block = torch.randint(4, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    ids = block.repeat(1, 4)
    plain = ours.generate(ids, max_new_tokens=20, return_dict_in_generate=True)
    assisted = ours.generate(ids, max_new_tokens=20, prompt_lookup_num_tokens=5, return_dict_in_generate=True)
    assert torch.equal(assisted.sequences, plain.sequences)
    assert plain.assisted_stats is None and "assisted_stats" not in plain.keys()
    stats = assisted.assisted_stats
    assert stats.emitted == 20 and stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
    assert stats.emitted <= stats.accepted + stats.rounds  # a round emits its accepted drafts + 1
