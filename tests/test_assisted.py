"""Assisted decoding (prompt lookup, assistant models) against plain greedy decoding and transformers.

The same tiny random checkpoints as test_generation: transformers saves them, neoxja loads them.
Every test runs on the PyTorch backend and on the C step (cpu-fused); greedy assisted output must be
plain greedy decoding's, token for token, whatever was drafted.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import force_backend

import neoxja
from neoxja import decoding
from neoxja.assisted import assisted_steps
from neoxja.generation_outputs import StepRecord
from neoxja.generation_plan import plan_generation

VOCAB = 384
MAIN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
ASSISTANT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


def _pair(directory, seed: int, shape: dict, context: int = 256) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=VOCAB, max_position_embeddings=context, bos_token_id=0, eos_token_id=1, **shape
    )
    reference = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init give varied continuations
        for param in reference.parameters():
            param.normal_(0.0, 0.5 if param.dim() > 1 else 1.0)
    reference.save_pretrained(directory)
    return reference, neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers main, neoxja main, transformers assistant, neoxja assistant, neoxja copy of main)."""
    main_dir = tmp_path_factory.mktemp("main")
    reference, ours = _pair(main_dir, 0, MAIN)
    reference_assistant, assistant = _pair(tmp_path_factory.mktemp("assistant"), 1, ASSISTANT)
    twin = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(main_dir).eval()
    return reference, ours, reference_assistant, assistant, twin


@pytest.fixture(autouse=True, params=["torch", "cpu-fused"])
def backend(request, monkeypatch) -> str:
    used = force_backend(monkeypatch, request.param)
    yield request.param
    assert used and set(used) <= {request.param}, f"assisted decoding used {used}, not {request.param}"


@pytest.fixture
def verifications(monkeypatch) -> list[int]:
    """The number of tokens of each verify_logits call of the decoding backends (main model and
    assistant alike: an assistant's catch-up of 2 tokens counts too)."""
    widths: list[int] = []
    for cls in {decoding.DecodingBackend, *decoding.BACKENDS}:
        if "verify_logits" in cls.__dict__:
            original = cls.__dict__["verify_logits"]

            def spy(self, new_ids, _original=original):
                widths.append(new_ids.shape[1])
                return _original(self, new_ids)

            monkeypatch.setattr(cls, "verify_logits", spy)
    return widths


def _repeating_prompt(seed: int = 0, period: int = 12, copies: int = 3) -> torch.Tensor:
    """A prompt that repeats a random block, then starts it once more: lookup finds long matches."""
    block = torch.randint(2, VOCAB, (period,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([block] * copies + [block[:5]])[None]


def _reference(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, do_sample=False, **kwargs)


def _new(out: torch.Tensor, ids: torch.Tensor) -> list[int]:
    return out[0, ids.shape[1] :].tolist()


def test_prompt_lookup_is_plain_greedy_and_transformers(models, verifications) -> None:
    reference, ours, *_ = models
    ids = _repeating_prompt()
    plain = ours.generate(ids, max_new_tokens=60)
    verifications.clear()
    got = ours.generate(ids, max_new_tokens=60, prompt_lookup_num_tokens=6)
    assert torch.equal(got, plain)
    assert torch.equal(got, _reference(reference, ids, max_new_tokens=60, prompt_lookup_num_tokens=6))
    # The drafts were verified several at a time and accepted: fewer forwards than tokens.
    assert verifications and max(verifications) > 2
    assert len(verifications) < 60 - 10


def test_prompt_lookup_ngram_size_and_no_match(models) -> None:
    reference, ours, *_ = models
    ids = _repeating_prompt(seed=1)
    for size in (1, 3):
        kwargs = dict(max_new_tokens=30, prompt_lookup_num_tokens=4, max_matching_ngram_size=size)
        assert torch.equal(ours.generate(ids, **kwargs), _reference(reference, ids, **kwargs))
    single = torch.tensor([[7]])  # nothing to look up: plain steps
    assert torch.equal(
        ours.generate(single, max_new_tokens=12, prompt_lookup_num_tokens=3),
        ours.generate(single, max_new_tokens=12),
    )


def test_left_padded_prompt(models) -> None:
    """A single prompt with left padding: the drafts and the cache skip the padding, the processors and
    the lookup see the whole row, as in transformers."""
    reference, ours, _, _, twin = models
    ids = torch.cat([torch.full((1, 3), 5), _repeating_prompt(seed=12)], dim=1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=30, pad_token_id=5, repetition_penalty=1.2)
    plain = ours.generate(ids, **kwargs)
    assert torch.equal(plain, _reference(reference, ids, **kwargs))
    assert torch.equal(ours.generate(ids, prompt_lookup_num_tokens=4, **kwargs), plain)
    assert torch.equal(ours.generate(ids, assistant_model=twin, **kwargs), plain)


def test_assistant_is_plain_greedy_and_transformers(models) -> None:
    reference, ours, reference_assistant, assistant, _ = models
    ids = _repeating_prompt(seed=2)
    plain = ours.generate(ids, max_new_tokens=50)
    got = ours.generate(ids, max_new_tokens=50, assistant_model=assistant, num_assistant_tokens=5)
    assert torch.equal(got, plain)
    reference_assistant.generation_config.num_assistant_tokens = 5
    expected = _reference(reference, ids, max_new_tokens=50, assistant_model=reference_assistant)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("schedule", ["constant", "heuristic", "heuristic_transient"])
def test_assistant_accepts_what_the_model_agrees_with(models, schedule) -> None:
    """An assistant with the model's own weights drafts exactly the greedy continuation: every draft
    is accepted, and each round emits its drafts plus the model's token."""
    _, ours, _, _, twin = models
    ids = _repeating_prompt(seed=3)
    config = copy.deepcopy(ours.generation_config)
    config.update(max_new_tokens=40, num_assistant_tokens=4, num_assistant_tokens_schedule=schedule)
    config.assistant_confidence_threshold = 0.0
    plan = plan_generation(ours, ids, None, config, assistant_model=twin)
    tokens = torch.empty(1, plan.max_length, dtype=torch.long)
    steps = assisted_steps(ours, plan, config, tokens, StepRecord(False, False), twin)
    lengths = [length for length, _ in steps]
    assert lengths == list(range(ids.shape[1] + 1, ids.shape[1] + 41))
    assert torch.equal(tokens, ours.generate(ids, max_new_tokens=40))
    stats = steps.stats
    assert stats.accepted == stats.drafted > 0 and stats.acceptance_rate == 1.0
    assert stats.emitted == 40 and stats.rounds < 40 / 3
    if schedule == "constant":
        assert stats.num_assistant_tokens == 4
    else:  # +2 after each fully accepted round but the last, which max_new_tokens ended
        assert stats.num_assistant_tokens == 4 + 2 * (stats.rounds - 1)


def test_assistant_is_left_unchanged(models) -> None:
    _, ours, _, assistant, _ = models
    before_config = assistant.generation_config.to_dict()
    before_weights = {name: t.clone() for name, t in assistant.state_dict().items()}
    ids = _repeating_prompt(seed=4)
    ours.generate(
        ids, max_new_tokens=20, assistant_model=assistant, num_assistant_tokens_schedule="heuristic"
    )
    assert assistant.generation_config.to_dict() == before_config
    assert not assistant.training
    after = assistant.state_dict()
    assert after.keys() == before_weights.keys()
    assert all(torch.equal(after[name], t) for name, t in before_weights.items())


def _eos_inside_continuation(ours, ids, position: int) -> int:
    """A token of the greedy continuation that first appears at or after ``position``."""
    new = _new(ours.generate(ids, max_new_tokens=40), ids)
    for index in range(position, len(new)):
        if new[index] not in new[:index] and new[index] not in ids[0].tolist():
            return new[index]
    pytest.fail("no token appears for the first time late in the continuation")


def test_eos_inside_a_draft_ends_generation(models) -> None:
    reference, ours, _, _, twin = models
    ids = _repeating_prompt(seed=5)
    eos = _eos_inside_continuation(ours, ids, 6)
    kwargs = dict(max_new_tokens=40, eos_token_id=eos)
    plain = ours.generate(ids, **kwargs)
    assert plain[0, -1].item() == eos and plain.shape[1] < ids.shape[1] + 40
    # The twin drafts 7 tokens at a time, so the eos is accepted in the middle of a draft.
    for extra in (dict(assistant_model=twin, num_assistant_tokens=7), dict(prompt_lookup_num_tokens=7)):
        assert torch.equal(ours.generate(ids, **kwargs, **extra), plain)
    assert torch.equal(_reference(reference, ids, prompt_lookup_num_tokens=7, **kwargs), plain)


def test_max_new_tokens_ending_inside_a_draft(models) -> None:
    _, ours, _, assistant, twin = models
    ids = _repeating_prompt(seed=6)
    full = ours.generate(ids, max_new_tokens=13)
    for max_new_tokens in (1, 6, 13):
        plain = full[:, : ids.shape[1] + max_new_tokens]
        for extra in (
            dict(assistant_model=twin, num_assistant_tokens=5),
            dict(assistant_model=assistant, num_assistant_tokens=3),
            dict(prompt_lookup_num_tokens=5),
        ):
            got = ours.generate(ids, max_new_tokens=max_new_tokens, **extra)
            assert torch.equal(got, plain), (max_new_tokens, extra)


@pytest.mark.parametrize("settings", [dict(repetition_penalty=1.6), dict(no_repeat_ngram_size=2)])
def test_stateful_processors_across_rejections(models, settings) -> None:
    """Drafts from the repeated prompt are rejected where the processors forbid the repetition: the
    processors' state must forget the rejected tokens and rebuild from the kept ones."""
    reference, ours, _, assistant, _ = models
    ids = _repeating_prompt(seed=7)
    kwargs = dict(max_new_tokens=40, **settings)
    plain = ours.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, prompt_lookup_num_tokens=5, **kwargs), plain)
    assert torch.equal(_reference(reference, ids, prompt_lookup_num_tokens=5, **kwargs), plain)
    assert torch.equal(ours.generate(ids, assistant_model=assistant, num_assistant_tokens=4, **kwargs), plain)


@pytest.fixture(scope="module")
def tokenizer(assets_dir):
    return neoxja.GPTNeoXJapaneseTokenizer(str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))


def test_stop_strings_end_inside_a_draft(models, tokenizer) -> None:
    _, ours, _, _, twin = models
    ids = _repeating_prompt(seed=8)
    new = _new(ours.generate(ids, max_new_tokens=40), ids)
    earlier = tokenizer.decode(ids[0].tolist())
    stop = None
    for index in range(5, len(new)):
        piece = tokenizer.decode([new[index]])
        if piece.strip() and piece not in earlier + tokenizer.decode(new[:index]):
            stop = piece
            break
    assert stop is not None, "no token of the continuation has a text of its own"
    kwargs = dict(max_new_tokens=40, stop_strings=[stop], tokenizer=tokenizer, eos_token_id=None)
    plain = ours.generate(ids, **kwargs)
    assert plain.shape[1] < ids.shape[1] + 40 and tokenizer.decode(_new(plain, ids)).endswith(stop)
    for extra in (dict(assistant_model=twin, num_assistant_tokens=8), dict(prompt_lookup_num_tokens=8)):
        assert torch.equal(ours.generate(ids, **kwargs, **extra), plain)


def test_scores_and_logits_are_plain_greedy_ones(models) -> None:
    _, ours, _, assistant, _ = models
    ids = _repeating_prompt(seed=9)
    kwargs = dict(
        max_new_tokens=25,
        repetition_penalty=1.3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    plain = ours.generate(ids, **kwargs)
    for extra in (dict(prompt_lookup_num_tokens=5), dict(assistant_model=assistant, num_assistant_tokens=3)):
        got = ours.generate(ids, **kwargs, **extra)
        assert torch.equal(got.sequences, plain.sequences)
        assert len(got.scores) == len(got.logits) == 25
        for name in ("scores", "logits"):
            for mine, theirs in zip(getattr(got, name), getattr(plain, name), strict=True):
                assert mine.shape == theirs.shape == (1, VOCAB)
                torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            ours.compute_transition_scores(got.sequences, got.scores, normalize_logits=True),
            ours.compute_transition_scores(plain.sequences, plain.scores, normalize_logits=True),
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("drafter", ["lookup", "assistant"])
def test_sampling_is_reproducible_and_keeps_to_the_processors(models, drafter) -> None:
    _, ours, _, assistant, _ = models
    ids = _repeating_prompt(seed=10)
    if drafter == "lookup":
        extra = dict(prompt_lookup_num_tokens=4)
    else:
        extra = dict(assistant_model=assistant, num_assistant_tokens=3)
    kwargs = dict(
        max_new_tokens=30, do_sample=True, top_k=3, no_repeat_ngram_size=3, return_dict_in_generate=True
    )
    first = ours.generate(ids, seed=5, output_scores=True, **kwargs, **extra)
    assert torch.equal(first.sequences, ours.generate(ids, seed=5, **kwargs, **extra).sequences)
    assert not torch.equal(first.sequences, ours.generate(ids, seed=6, **kwargs, **extra).sequences)
    # Every token had a finite processed score: inside the top 3, never completing a seen 3-gram.
    chosen = ours.compute_transition_scores(first.sequences, first.scores)
    assert torch.isfinite(chosen).all()
    assert all(int(torch.isfinite(row).sum()) <= 3 for row in first.scores)
    sequence = first.sequences[0].tolist()
    for end in range(ids.shape[1], len(sequence)):
        earlier = {tuple(sequence[i : i + 3]) for i in range(end - 2)}
        assert tuple(sequence[end - 2 : end + 1]) not in earlier
    # top_k=1 leaves one candidate per position: sampling is greedy decoding then.
    narrow = ours.generate(ids, max_new_tokens=20, do_sample=True, top_k=1, seed=0, **extra)
    assert torch.equal(narrow, ours.generate(ids, max_new_tokens=20))


def test_streamer_gets_each_token_once(models) -> None:
    _, ours, _, _, twin = models
    ids = _repeating_prompt(seed=11)

    class Collect:
        def __init__(self) -> None:
            self.puts: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.ended = True

    streamer = Collect()
    out = ours.generate(
        ids, max_new_tokens=15, assistant_model=twin, num_assistant_tokens=6, streamer=streamer
    )
    assert streamer.ended and streamer.puts[0] == ids[0].tolist()
    assert all(len(piece) == 1 for piece in streamer.puts[1:])
    assert [piece[0] for piece in streamer.puts[1:]] == _new(out, ids)


def test_assistant_with_a_shorter_context_is_refused(models, tmp_path) -> None:
    _, ours, _, _, _ = models
    _, short = _pair(tmp_path, 2, ASSISTANT, context=32)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        ours.generate(_repeating_prompt(), max_new_tokens=20, assistant_model=short)
