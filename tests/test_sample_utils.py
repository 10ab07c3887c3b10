"""Logits processors against transformers' processors on random scores, and the sampler's contract."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import logits_process as ref

import neoxja
from neoxja.generation_config import GenerationConfig
from neoxja.sample_utils import (
    MinLengthProcessor,
    MinPProcessor,
    NoRepeatNGramProcessor,
    PresenceFrequencyProcessor,
    RepetitionPenaltyProcessor,
    Sampler,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    greedy,
    make_multinomial,
    make_sampler,
)

VOCAB = 50


def _scores(seed: int, batch: int = 3, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=g) * 3
    scores[0, :5] = scores[0, 5]  # ties at the top-k / top-p boundaries
    return scores


def _ids(seed: int, batch: int = 3, length: int = 12, vocab: int = 8) -> torch.Tensor:
    # A small id range makes repeats (and repeated n-grams) frequent.
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_reference(seed: int, temperature: float) -> None:
    scores, ids = _scores(seed), _ids(seed)
    _same(
        TemperatureProcessor(temperature)(ids, scores.clone()),
        ref.TemperatureLogitsWarper(temperature)(ids, scores),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_k", [1, 3, 6, 49, 50, 80])
def test_top_k_matches_reference(seed: int, top_k: int) -> None:
    scores, ids = _scores(seed), _ids(seed)
    _same(TopKProcessor(top_k)(ids, scores.clone()), ref.TopKLogitsWarper(top_k)(ids, scores))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_reference(seed: int, top_p: float) -> None:
    scores, ids = _scores(seed), _ids(seed)
    ours = TopPProcessor(top_p)(ids, scores.clone())
    _same(ours, ref.TopPLogitsWarper(top_p)(ids, scores))
    assert (ours > -math.inf).sum(-1).min() >= 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_reference_while_decoding(seed: int, penalty: float) -> None:
    """Fed a growing sequence step by step, the incremental penalty equals the reference at each step."""
    ids = _ids(seed, length=20)
    ours = RepetitionPenaltyProcessor(penalty)
    for length in range(6, 21):
        scores = _scores(seed * 100 + length, vocab=10)
        _same(
            ours(ids[:, :length], scores.clone()),
            ref.RepetitionPenaltyLogitsProcessor(penalty)(ids[:, :length], scores),
        )


@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_ignores_left_padding_like_reference(seed: int) -> None:
    ids = _ids(seed, length=10)
    padding = torch.tensor([0, 3, 7])
    ours = RepetitionPenaltyProcessor(1.5, padding)
    for length in (10, 11, 12):
        full = torch.cat([ids, _ids(seed + 7, length=2)], dim=1)[:, :length]
        scores = _scores(seed + length, vocab=10)
        theirs = ref.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=padding)(full, scores.clone())
        _same(ours(full, scores.clone()), theirs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_reference_while_decoding(seed: int, n: int) -> None:
    ids = _ids(seed, length=24, vocab=4)
    ours = NoRepeatNGramProcessor(n)
    for length in [1, 2, 3, *range(5, 25)]:
        scores = _scores(seed + length, vocab=6)
        _same(
            ours(ids[:, :length], scores.clone()),
            ref.NoRepeatNGramLogitsProcessor(n)(ids[:, :length], scores),
        )


@pytest.mark.parametrize("eos", [3, [3, 7]])
def test_min_length_and_min_new_tokens_match_reference(eos: int | list[int]) -> None:
    ids = _ids(0, length=12)
    for length in range(8, 13):
        scores = _scores(length, vocab=10)
        theirs = ref.MinLengthLogitsProcessor(11, eos)(ids[:, :length], scores)
        _same(MinLengthProcessor(11, eos)(ids[:, :length], scores.clone()), theirs)
        theirs = ref.MinNewTokensLengthLogitsProcessor(8, 3, eos)(ids[:, :length], scores)
        _same(MinLengthProcessor(8 + 3, eos)(ids[:, :length], scores.clone()), theirs)


def test_chain_matches_reference_order() -> None:
    """The sampler's processor chain equals the reference's chain for the same settings."""
    settings = dict(temperature=0.7, top_k=9, top_p=0.8, repetition_penalty=1.2, no_repeat_ngram_size=2)
    ids = _ids(1, length=15)
    sampler = make_sampler(do_sample=True, min_length=20, eos_token_id=4, **settings)
    chain = ref.LogitsProcessorList(
        [
            ref.RepetitionPenaltyLogitsProcessor(1.2),
            ref.NoRepeatNGramLogitsProcessor(2),
            ref.MinLengthLogitsProcessor(20, 4),
            ref.TemperatureLogitsWarper(0.7),
            ref.TopKLogitsWarper(9),
            ref.TopPLogitsWarper(0.8),
        ]
    )
    scores = _scores(5, vocab=30)
    _same(sampler.process(ids, scores.clone()), chain(ids, scores))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.2, 0.5, 1.0])
def test_min_p_matches_reference(seed: int, min_p: float) -> None:
    scores, ids = _scores(seed), _ids(seed)
    ours = MinPProcessor(min_p)(ids, scores.clone())
    _same(ours, ref.MinPLogitsWarper(min_p)(ids, scores))
    assert (ours > -math.inf).sum(-1).min() >= 1


def test_min_p_comes_last_in_the_chain_like_reference() -> None:
    """generate()'s min_p acts after temperature, top-k and top-p, as transformers orders its warpers."""
    ids = _ids(2, length=10)
    sampler = make_sampler(do_sample=True, temperature=1.8, top_k=20, top_p=0.9, min_p=0.3)
    chain = ref.LogitsProcessorList(
        [
            ref.TemperatureLogitsWarper(1.8),
            ref.TopKLogitsWarper(20),
            ref.TopPLogitsWarper(0.9),
            ref.MinPLogitsWarper(0.3),
        ]
    )
    scores = _scores(6, vocab=40)
    _same(sampler.process(ids, scores.clone()), chain(ids, scores))
    assert not make_sampler(do_sample=False, min_p=0.3).processors  # greedy ignores it


def test_greedy_chain_skips_sampling_processors() -> None:
    sampler = make_sampler(do_sample=False, temperature=0.5, top_k=3, top_p=0.5)
    assert sampler.processors == [] and sampler.pick is greedy
    scores = _scores(3)
    _same(sampler(_ids(3), scores.clone()), scores.argmax(-1))


def test_multinomial_is_reproducible_with_a_generator() -> None:
    scores = _scores(2)

    def draw(seed: int) -> list[int]:
        pick = make_multinomial(torch.Generator().manual_seed(seed))
        return [pick(scores.clone()).tolist() for _ in range(10)]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_multinomial_never_picks_filtered_tokens() -> None:
    sampler = Sampler([TopKProcessor(2)], make_multinomial(torch.Generator().manual_seed(0)))
    scores = _scores(4)
    allowed = scores.topk(2).indices
    for _ in range(20):
        picked = sampler(_ids(4), scores.clone())
        assert (allowed == picked[:, None]).any(-1).all()


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: TemperatureProcessor(0.0), "temperature"),
        (lambda: TemperatureProcessor(-1.0), "temperature"),
        (lambda: TopKProcessor(0), "top_k"),
        (lambda: TopPProcessor(0.0), "top_p"),
        (lambda: TopPProcessor(1.5), "top_p"),
        (lambda: RepetitionPenaltyProcessor(0.0), "repetition_penalty"),
        (lambda: NoRepeatNGramProcessor(0), "no_repeat_ngram_size"),
        (lambda: MinLengthProcessor(-1, 0), "min_length"),
    ],
)
def test_bad_settings_name_the_argument(build, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build()


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    config = neoxja.GPTNeoXJapaneseConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    return neoxja.GPTNeoXJapaneseForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("name", "value", "build"),
    [
        ("temperature", -1.0, TemperatureProcessor),
        ("temperature", 0.0, TemperatureProcessor),
        ("temperature", "hot", TemperatureProcessor),
        ("top_k", -1, TopKProcessor),
        ("top_k", 2.5, TopKProcessor),
        ("top_k", True, TopKProcessor),
        ("top_p", 0.0, TopPProcessor),
        ("top_p", 1.5, TopPProcessor),
        ("top_p", float("nan"), TopPProcessor),
        ("repetition_penalty", 0.0, RepetitionPenaltyProcessor),
        ("repetition_penalty", None, RepetitionPenaltyProcessor),
        ("repetition_penalty", 1e-31, RepetitionPenaltyProcessor),  # a score of 3.4e7 would overflow
        ("repetition_penalty", math.inf, RepetitionPenaltyProcessor),
        ("temperature", math.inf, TemperatureProcessor),
        ("temperature", math.nan, TemperatureProcessor),
        ("no_repeat_ngram_size", -1, NoRepeatNGramProcessor),
        ("no_repeat_ngram_size", 1.5, NoRepeatNGramProcessor),
        ("min_length", -1, lambda value: MinLengthProcessor(value, 0)),
        ("min_length", "3", lambda value: MinLengthProcessor(value, 0)),
    ],
)
def test_a_bad_value_gets_one_message_from_config_generate_and_processor(
    tiny_model: torch.nn.Module, name: str, value, build
) -> None:
    settings = {"do_sample": True, name: value}
    messages = []
    for attempt in (
        lambda: GenerationConfig(**settings).validate(),
        lambda: tiny_model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, **settings),
        lambda: build(value),
    ):
        with pytest.raises(ValueError) as caught:
            attempt()
        messages.append(str(caught.value))
    assert messages == [messages[0]] * 3 and messages[0].startswith(f"{name} must be")


@pytest.mark.parametrize("vocab", [32000, 4096, 1000])  # blocked path, blocked path, plain argmax
def test_greedy_is_torch_argmax_including_ties_and_nan(vocab: int) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, vocab, generator=generator)
    scores[1] = torch.randint(0, 3, (vocab,), generator=generator).float()  # many ties of the maximum
    scores[2, [7, vocab - 1]] = scores[2].max() + 1  # a tie between the first and the last block
    scores[3, [vocab // 2, 9]] = float("nan")  # NaN counts as the maximum; the first one wins
    scores[4] = float("-inf")
    scores[5, -1] = float("inf")
    assert torch.equal(greedy(scores), torch.argmax(scores, dim=-1))
    assert torch.equal(greedy(scores[:, :]), greedy(scores.clone()))
    assert torch.equal(greedy(scores[::2]), torch.argmax(scores[::2], dim=-1))  # rows not adjacent


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-45, 5e-324])
def test_a_tiny_temperature_leaves_the_best_tokens_and_no_nan(temperature: float) -> None:
    """Below float32's range the plain quotient is inf at the best score (softmax: NaN, the sampler
    raised): the row is shifted to a best score of 0 first. The limit is the argmax, ties shared."""
    scores = _scores(7, batch=4) * 1e9  # 1e-30 overflows these too
    scores[1, [3, 11]] = scores[1].max() + 1e9  # a tie for the best score
    scores[2] = torch.linspace(-1e-38, 1e-38, VOCAB)  # small enough for the plain quotient
    scores[3, 5] = -math.inf  # a token already forbidden stays forbidden
    out = TemperatureProcessor(temperature)(_ids(7, batch=4), scores.clone())
    assert not out.isnan().any() and (out[[0, 1, 3]].amax(-1) == 0).all()
    probs = out.softmax(-1)
    for row in (0, 3):
        assert probs[row].argmax() == scores[row].argmax() and probs[row].max() == 1.0
    assert probs[1, 3] == probs[1, 11] == 0.5
    assert probs[3, 5] == 0
    if temperature >= torch.finfo(torch.float32).tiny:  # a row that does not overflow: the reference's
        _same(out[2], ref.TemperatureLogitsWarper(temperature)(_ids(7), scores[2:3].clone())[0])
    else:  # a temperature float32 cannot hold (the reference divides by its rounding, or by 0)
        exact = (scores[2].double() / temperature).softmax(-1)
        torch.testing.assert_close(probs[2].double(), exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1e30, 1e300])
def test_a_huge_temperature_flattens_and_keeps_forbidden_tokens_out(temperature: float) -> None:
    """1e300 is inf in float32, and -inf / inf is NaN: the float64 path divides it exactly instead."""
    scores = _scores(8)
    scores[:, :4] = -math.inf  # forbidden (min length, top-k, ...)
    out = TemperatureProcessor(temperature)(_ids(8), scores.clone())
    probs = out.softmax(-1)
    torch.testing.assert_close(probs[:, 4:], torch.full((3, VOCAB - 4), 1 / (VOCAB - 4)))
    assert (probs[:, :4] == 0).all()
    if temperature < torch.finfo(torch.float32).max:
        _same(out, ref.TemperatureLogitsWarper(temperature)(_ids(8), scores))


def test_sampling_at_a_tiny_or_huge_temperature_runs_generate(tiny_model: torch.nn.Module) -> None:
    prompt = torch.tensor([[3, 4, 5]])
    greedy_ids = tiny_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, eos_token_id=2)
    for seed in range(3):
        cold = tiny_model.generate(
            prompt,
            max_new_tokens=6,
            min_new_tokens=6,
            eos_token_id=2,
            do_sample=True,
            temperature=1e-40,
            seed=seed,
        )
        assert cold.tolist() == greedy_ids.tolist()
        hot = tiny_model.generate(
            prompt,
            max_new_tokens=6,
            min_new_tokens=6,
            eos_token_id=2,
            do_sample=True,
            temperature=1e300,
            seed=seed,
        )
        assert 2 not in hot[0, 3:].tolist()  # the eos id, forbidden until the 6th token, is never drawn


def test_the_smallest_repetition_penalty_keeps_scores_finite() -> None:
    ids = torch.tensor([[1, 2, 3]])
    scores = torch.tensor([[0.0, 3.4e8, -3.4e8, 1.0, 9.0]])
    out = RepetitionPenaltyProcessor(1e-30)(ids, scores.clone())
    assert torch.isfinite(out).all() and out.argmax() == 1


@pytest.mark.parametrize(
    "build",
    [
        lambda: RepetitionPenaltyProcessor(1.5, prompt_ignore_length=2),
        lambda: NoRepeatNGramProcessor(2),
        lambda: PresenceFrequencyProcessor(0.5, 0.7, prompt_length=3),
    ],
    ids=["repetition", "no-repeat-ngram", "presence-frequency"],
)
def test_forget_after_reordered_or_shortened_rows_equals_a_fresh_processor(build) -> None:
    """Beam search reorders the rows, assisted decoding drops rejected tokens: after
    Sampler.forget() the stateful processors give what a new one gives on the new input_ids."""
    torch.manual_seed(0)
    ids = torch.randint(0, 12, (3, 9))
    sampler = Sampler([build()])
    for length in range(4, 9):
        sampler.process(ids[:, :length], torch.randn(3, 12))
    for changed in (ids[[2, 0, 0]], ids[:, :6]):
        sampler.forget()
        scores = torch.randn(3, 12)
        expected = build()(changed, scores.clone())
        assert torch.equal(sampler.process(changed, scores.clone()), expected)


@pytest.mark.parametrize("keep", [2, 3])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda keep: TopKProcessor(1, keep), lambda keep: ref.TopKLogitsWarper(1, min_tokens_to_keep=keep)),
        (
            lambda keep: TopPProcessor(1e-6, keep),
            lambda keep: ref.TopPLogitsWarper(1e-6, min_tokens_to_keep=keep),
        ),
        (
            lambda keep: MinPProcessor(1.0, keep),
            lambda keep: ref.MinPLogitsWarper(1.0, min_tokens_to_keep=keep),
        ),
    ],
    ids=["top-k", "top-p", "min-p"],
)
def test_min_tokens_to_keep_matches_reference(ours, theirs, keep: int) -> None:
    """Beam sampling keeps at least (eos ids + 1) tokens through every warper, as transformers does:
    at settings that would keep one token, ``keep`` survive."""
    scores, ids = _scores(0), _ids(0)
    got = ours(keep)(ids, scores.clone())
    _same(got, theirs(keep)(ids, scores))
    assert bool(((got > -math.inf).sum(-1) == keep).all())
