"""generate() against transformers' generate on the same weights (tiny random checkpoints).

Every test runs once per decoding backend of :mod:`neoxja.decoding` (the PyTorch step that GPU and
half-precision users run, and the C step of CPU float32), each checked token for token.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import force_backend

import neoxja
from neoxja import decoding
from neoxja.generation import GenerationConfig

VOCAB = 384
CONFIGS = {
    "base": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "partial-rotary": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, rotary_pct=0.5),
    "relu-one-layer": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, hidden_act="relu"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, neoxja model) with the same random weights, loaded from one save_pretrained."""
    torch.manual_seed(len(request.param))
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        **CONFIGS[request.param],
    )
    reference = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init give varied, non-repeating continuations
        for param in reference.parameters():
            param.normal_(0.0, 0.5 if param.dim() > 1 else 1.0)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    return reference, neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(autouse=True, params=[b.name for b in decoding.BACKENDS])
def backend(request, monkeypatch) -> str:
    """Run the test with this decoding backend first in line, and check that generate() chose it
    ("default": leave the choice to generate())."""
    if request.param == "default":
        yield request.param
        return
    used = force_backend(monkeypatch, request.param)
    yield request.param
    assert set(used) <= {request.param}, f"generate() decoded with {used}, not {request.param}"


def _prompts(lengths: list[int], pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths (ids >= 2, so no eos/bos inside) and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(2, VOCAB, (length,), generator=g)
        mask[row, width - length :] = 1
    return ids, mask


def _reference(model: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(*args, **kwargs)


def _eos_that_occurs(continuation: torch.Tensor) -> int:
    """The token of row 0's greedy continuation that appears for the first time latest (so stopping on it
    is visible and happens at a different step than a random row's)."""
    row = continuation[0].tolist()
    firsts = {token: row.index(token) for token in row}
    return max(firsts, key=firsts.__getitem__)


def test_greedy_single_prompt_matches_transformers(models) -> None:
    reference, ours = models
    ids, _ = _prompts([9], pad=1)
    expected = _reference(reference, ids, max_new_tokens=80, do_sample=False)
    assert expected.shape[1] == 9 + 80
    assert torch.equal(ours.generate(ids, max_new_tokens=80), expected)


def test_greedy_left_padded_batch_matches_transformers(models) -> None:
    reference, ours = models
    ids, mask = _prompts([11, 3, 7, 1], pad=5, seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=70, pad_token_id=5)
    expected = _reference(reference, ids, do_sample=False, **kwargs)
    assert torch.equal(ours.generate(ids, **kwargs), expected)


def test_eos_stops_each_row_like_transformers(models) -> None:
    reference, ours = models
    ids, mask = _prompts([6, 10, 2], pad=1, seed=2)
    free = _reference(reference, ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=1)
    eos = _eos_that_occurs(free[:, ids.shape[1] :])
    kwargs = dict(attention_mask=mask, max_new_tokens=64, eos_token_id=eos, pad_token_id=3)
    expected = _reference(reference, ids, do_sample=False, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    row0 = got[0, ids.shape[1] :].tolist()
    assert eos in row0 and set(row0[row0.index(eos) + 1 :]) <= {3}  # padded after its eos


def test_all_rows_finished_ends_generation(models) -> None:
    reference, ours = models
    ids, _ = _prompts([8], pad=1, seed=3)
    free = _reference(reference, ids, max_new_tokens=64, do_sample=False)
    eos = _eos_that_occurs(free[:, 8:])
    got = ours.generate(ids, max_new_tokens=64, eos_token_id=[VOCAB - 1, eos])
    assert got[0, -1].item() == eos and got.shape[1] < 8 + 64
    assert torch.equal(got, _reference(reference, ids, max_new_tokens=64, eos_token_id=[VOCAB - 1, eos]))


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_default_length_matches_transformers(models) -> None:
    reference, ours = models
    ids, _ = _prompts([5], pad=1, seed=4)
    expected = _reference(reference, ids)
    with pytest.warns(UserWarning, match="max_new_tokens"):
        got = ours.generate(ids)
    assert torch.equal(got, expected)
    assert torch.equal(ours.generate(ids, max_length=12), _reference(reference, ids, max_length=12))


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.8),
        dict(no_repeat_ngram_size=2),
        dict(min_new_tokens=30, repetition_penalty=0.7),
    ],
)
def test_processors_in_greedy_decoding_match_transformers(models, settings) -> None:
    reference, ours = models
    ids, mask = _prompts([7, 12, 4], pad=2, seed=5)
    free = _reference(reference, ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=40, pad_token_id=2, **settings)
    if "min_new_tokens" in settings:
        kwargs["eos_token_id"] = int(free[0, 12 + 5])  # an eos the model wants early, forbidden until 30
    expected = _reference(reference, ids, do_sample=False, **kwargs)
    assert torch.equal(ours.generate(ids, **kwargs), expected)


def test_sampling_is_reproducible(models) -> None:
    _, ours = models
    ids, _ = _prompts([6], pad=1, seed=6)
    kwargs = dict(
        max_new_tokens=30, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, num_return_sequences=3
    )
    first = ours.generate(ids, seed=7, **kwargs)
    assert first.shape == (3, 36)
    assert torch.equal(first, ours.generate(ids, generator=torch.Generator().manual_seed(7), **kwargs))
    assert not torch.equal(first, ours.generate(ids, seed=8, **kwargs))
    torch.manual_seed(3)
    global_rng = ours.generate(ids, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(global_rng, ours.generate(ids, **kwargs))


def test_sampling_respects_top_k(models) -> None:
    """With top_k=1 sampling has a single candidate per step: the greedy continuation."""
    _, ours = models
    ids, _ = _prompts([6], pad=1, seed=9)
    greedy = ours.generate(ids, max_new_tokens=20)
    assert torch.equal(ours.generate(ids, max_new_tokens=20, do_sample=True, top_k=1, seed=0), greedy)


def test_sampling_respects_min_p(models) -> None:
    """min_p=1 keeps only the most likely token (transformers' MinPLogitsWarper): the greedy
    continuation, at any temperature; a config's min_p round-trips through transformers' JSON."""
    _, ours = models
    ids, _ = _prompts([6], pad=1, seed=11)
    greedy = ours.generate(ids, max_new_tokens=20)
    sampled = ours.generate(
        ids, max_new_tokens=20, do_sample=True, temperature=5.0, top_k=0, min_p=1.0, seed=1
    )
    assert torch.equal(sampled, greedy)
    loose = ours.generate(ids, max_new_tokens=20, do_sample=True, temperature=5.0, top_k=0, min_p=0.0, seed=1)
    assert not torch.equal(loose, greedy)  # the same draw without min_p wanders off
    assert GenerationConfig.from_dict(transformers.GenerationConfig(min_p=0.05).to_dict()).min_p == 0.05
    with pytest.raises(ValueError, match="min_p must be a number in"):
        ours.generate(ids, max_new_tokens=2, do_sample=True, min_p=1.5)


def test_generation_config_object_and_model_default(models) -> None:
    reference, ours = models
    ids, _ = _prompts([4], pad=1, seed=10)
    config = GenerationConfig(max_new_tokens=25, repetition_penalty=1.5, eos_token_id=None)
    expected = _reference(reference, ids, max_new_tokens=25, repetition_penalty=1.5, do_sample=False)
    assert torch.equal(ours.generate(ids, generation_config=config), expected)
    assert ours.generation_config.eos_token_id == 1 and ours.generation_config.bos_token_id == 0


@pytest.mark.parametrize("backend", ["torch"], indirect=True)  # it spies on the PyTorch forward
def test_decoding_uses_one_preallocated_cache_and_the_causal_fast_path(models, monkeypatch) -> None:
    """Prefill once, then one token per step; no cache growth; no mask when no row is padded."""
    _, ours = models
    from neoxja.cache import KVCache

    def no_growth(self, needed):
        raise AssertionError(f"KV cache reallocated to {needed}")

    monkeypatch.setattr(KVCache, "_grow", no_growth)
    calls = []
    original = type(ours).forward

    def spy(self, input_ids=None, attention_mask=None, **kwargs):
        calls.append((tuple(input_ids.shape), attention_mask is None, kwargs.get("logits_to_keep")))
        return original(self, input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(type(ours), "forward", spy)
    ids, mask = _prompts([5, 5], pad=1, seed=11)
    ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert calls == [((2, 5), True, 1)] + [((2, 1), True, 1)] * 9
    calls.clear()
    ids, mask = _prompts([5, 3], pad=1, seed=11)
    ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert calls == [((2, 5), False, 1)] + [((2, 1), False, 1)] * 9


def test_custom_logits_processor_is_applied(models) -> None:
    _, ours = models
    ids, _ = _prompts([3], pad=1, seed=12)

    def only_seven(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores.fill_(-math.inf)
        scores[:, 7] = 0.0
        return scores

    out = ours.generate(ids, max_new_tokens=5, logits_processor=[only_seven])
    assert out[0, 3:].tolist() == [7] * 5


@pytest.mark.filterwarnings("ignore:neither max_new_tokens")
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.full((1, 257), 3)), "max_position_embeddings"),
        (dict(max_new_tokens=300), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_length=400), "max_length"),
        (dict(max_length=4), "max_length"),
        (dict(temperature=-0.5), "temperature"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(input_ids=torch.tensor([[3, VOCAB]])), "vocabulary"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0]])), "left padding"),
        (dict(stop_strings=["。"]), "tokenizer"),
        (dict(not_a_setting=1), "not_a_setting"),
    ],
)
def test_bad_input_raises_naming_the_argument(models, kwargs, name) -> None:
    _, ours = models
    kwargs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), **kwargs}
    with pytest.raises(ValueError, match=name):
        ours.generate(**kwargs)


def test_generation_config_json_round_trips_with_transformers(tmp_path) -> None:
    theirs = transformers.GenerationConfig(max_new_tokens=33, do_sample=True, top_p=0.9, eos_token_id=[1, 2])
    theirs.save_pretrained(tmp_path / "ref")
    ours = GenerationConfig.from_pretrained(tmp_path / "ref")
    assert (ours.max_new_tokens, ours.do_sample, ours.top_p, ours.eos_token_id) == (33, True, 0.9, [1, 2])
    assert "transformers_version" in ours.extra  # unknown keys are kept
    ours.temperature = 0.6
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert (back.max_new_tokens, back.top_p, back.temperature, back.eos_token_id) == (33, 0.9, 0.6, [1, 2])
    with pytest.raises(OSError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)


def test_model_reads_its_checkpoint_generation_config(tmp_path) -> None:
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    reference = transformers.GPTNeoXJapaneseForCausalLM(config)
    reference.generation_config.max_new_tokens = 7
    reference.generation_config.pad_token_id = 3
    reference.save_pretrained(tmp_path)
    ours = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert (ours.generation_config.max_new_tokens, ours.generation_config.pad_token_id) == (7, 3)
    assert ours.generation_config.eos_token_id == 1
    ids, _ = _prompts([4], pad=1, seed=13)
    assert ours.generate(ids, eos_token_id=None).shape == (1, 4 + 7)


@pytest.mark.parametrize("backend", ["default"], indirect=True)
def test_explain_decoding_names_the_backend_and_why_not_the_faster_one(models, caplog) -> None:
    _, ours = models
    assert neoxja.explain_decoding(ours).startswith("cpu-fused: ")
    doubled = neoxja.GPTNeoXJapaneseForCausalLM(ours.config).double().eval()
    text = neoxja.explain_decoding(doubled)
    assert text.startswith("torch: ") and "not cpu-fused: parameter" in text and "float64" in text
    with caplog.at_level("DEBUG", logger="neoxja.decoding"):
        doubled.generate(torch.tensor([[3, 4]]), max_new_tokens=2)
    assert any("torch backend" in r.message and "float64" in r.message for r in caplog.records)
