"""neoxja.pipeline("text-generation") gives what transformers' pipeline gives on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_checkpoint

import neoxja
from neoxja.pipelines import TextGenerationPipeline, pipeline, resolve_device, resolve_dtype

PROMPTS = ["人とAIが協調するためには、", "吾輩は猫である。名前はまだ無い。"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), assets_dir, seed=1)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> TextGenerationPipeline:
    return pipeline("text-generation", model=str(tiny_dir))


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):
    import transformers

    return transformers.pipeline("text-generation", model=str(tiny_dir), device="cpu")


def test_greedy_outputs_match_transformers(pipe: TextGenerationPipeline, reference) -> None:
    for kwargs in ({}, {"return_full_text": False}):
        ours = pipe(PROMPTS[0], do_sample=False, max_new_tokens=24, **kwargs)
        assert ours == reference(PROMPTS[0], do_sample=False, max_new_tokens=24, **kwargs)
        assert len(ours) == 1 and set(ours[0]) == {"generated_text"}
    ours = pipe(PROMPTS, do_sample=False, max_new_tokens=16)
    assert ours == reference(PROMPTS, do_sample=False, max_new_tokens=16)
    assert [len(row) for row in ours] == [1, 1]
    assert ours[1][0]["generated_text"].startswith(PROMPTS[1])


def record_generate_kwargs(pipe: TextGenerationPipeline, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace ``pipe.model.generate`` by one that returns its input; the dict holds the keyword
    arguments of the latest call."""
    seen: dict = {}

    def fake_generate(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        seen.clear()
        seen.update(kwargs)
        return input_ids

    monkeypatch.setattr(pipe.model, "generate", fake_generate)
    return seen


def test_defaults_are_those_of_the_transformers_pipeline(
    pipe: TextGenerationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.pipelines.text_generation import TextGenerationPipeline as Reference

    seen = record_generate_kwargs(pipe, monkeypatch)
    expected = Reference._default_generation_config
    pipe(PROMPTS[0])
    assert (seen["max_new_tokens"], seen["do_sample"], seen["temperature"]) == (
        expected.max_new_tokens,
        expected.do_sample,
        expected.temperature,
    )
    assert seen["pad_token_id"] == pipe.tokenizer.pad_token_id
    pipe(PROMPTS[0], do_sample=False)  # sampling-only defaults are not passed to greedy decoding
    assert seen["do_sample"] is False and "temperature" not in seen
    pipe(PROMPTS[0], max_length=40)  # a total length replaces the default number of new tokens
    assert seen["max_length"] == 40 and "max_new_tokens" not in seen


def test_sampling_returns_several_reproducible_sequences(pipe: TextGenerationPipeline) -> None:
    first = pipe(
        PROMPTS[0], max_new_tokens=8, num_return_sequences=3, top_k=5, seed=123, return_full_text=False
    )
    again = pipe(
        PROMPTS[0], max_new_tokens=8, num_return_sequences=3, top_k=5, seed=123, return_full_text=False
    )
    assert len(first) == 3 and first == again
    assert all(isinstance(record["generated_text"], str) for record in first)


def test_stop_sequence_matches_transformers(pipe: TextGenerationPipeline, reference) -> None:
    full = pipe(PROMPTS[0], do_sample=False, max_new_tokens=24, return_full_text=False)[0]["generated_text"]
    stop = full[len(full) // 2 : len(full) // 2 + 1]
    args = {"do_sample": False, "max_new_tokens": 24, "return_full_text": False, "stop_sequence": stop}
    ours = pipe(PROMPTS[0], **args)
    assert ours == reference(PROMPTS[0], **args)
    # Generation stops at the token that completes the stop text (which may run past it).
    assert len(ours[0]["generated_text"]) < len(full) and stop in ours[0]["generated_text"]


def test_stop_sequence_may_begin_in_the_prompt(pipe: TextGenerationPipeline, reference) -> None:
    args = {"do_sample": False, "max_new_tokens": 8, "return_full_text": False}
    full = pipe(PROMPTS[0], **args)[0]["generated_text"]
    for stop in (PROMPTS[0][-1] + full[0], PROMPTS[0][-1]):  # straddling the prompt end; only in it
        ours = pipe(PROMPTS[0], stop_sequence=stop, **args)
        assert ours == reference(PROMPTS[0], stop_sequence=stop, **args), stop
    assert pipe(PROMPTS[0], stop_sequence=PROMPTS[0][-1] + full[0], **args)[0]["generated_text"] != full


def test_construction_kwargs_are_call_defaults(tiny_dir: Path) -> None:
    pipe = pipeline("text-generation", model=tiny_dir, max_new_tokens=3, do_sample=False)
    ids = pipe(PROMPTS[0], return_tensors=True)[0]["generated_token_ids"]
    prompt_length = len(pipe.tokenizer.encode(PROMPTS[0]))
    assert len(ids) == prompt_length + 3
    assert (
        len(pipe(PROMPTS[0], max_new_tokens=5, return_tensors=True)[0]["generated_token_ids"])
        == prompt_length + 5
    )


def test_loaded_model_and_tokenizer_objects(tiny_dir: Path, pipe: TextGenerationPipeline) -> None:
    model = neoxja.AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = neoxja.AutoTokenizer.from_pretrained(tiny_dir)
    objects = pipeline("text-generation", model=model, tokenizer=tokenizer, device=-1)
    args = {"do_sample": False, "max_new_tokens": 6}
    assert objects(PROMPTS[0], **args) == pipe(PROMPTS[0], **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", "bf16"])
def test_dtype_argument(tiny_dir: Path, dtype) -> None:
    pipe = pipeline("text-generation", model=tiny_dir, dtype=dtype)
    assert next(pipe.model.parameters()).dtype == resolve_dtype(dtype)
    assert pipe(PROMPTS[0], max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith(PROMPTS[0])


def test_device_argument_forms() -> None:
    # Every form is covered in test_devices.py; here: the pipeline reads them through that policy.
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(-1) == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu-please' is not a torch device"):
        pipeline("text-generation", model="unused", device="gpu-please")


def test_unknown_task_lists_supported_ones() -> None:
    with pytest.raises(ValueError, match="task='summarization'.*text-generation"):
        pipeline("summarization", model="unused")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0, "do_sample": True}, "temperature"),
        ({"top_p": 0.0, "do_sample": True}, "top_p"),
        ({"top_p": 1.5, "do_sample": True}, "top_p"),
        ({"top_k": -1, "do_sample": True}, "top_k"),
        ({"max_new_tokens": 5000}, "max_new_tokens"),
    ],
)
def test_bad_generation_arguments_are_named(pipe: TextGenerationPipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe(PROMPTS[0], **kwargs)


def test_bad_prompts(pipe: TextGenerationPipeline) -> None:
    with pytest.raises(ValueError, match="text_inputs: the prompt is empty"):
        pipe("")
    with pytest.raises(ValueError, match="text_inputs is an empty list"):
        pipe([])
    with pytest.raises(TypeError, match="text_inputs must be a string"):
        pipe(42)
    with pytest.raises(ValueError, match="prompt at index 1 is empty"):
        pipe(["猫", "", "犬"], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipe(PROMPTS, batch_size=0)
    too_long = "猫。" * 2100
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe(too_long, max_new_tokens=1)


def test_bad_model_paths(tmp_path: Path, assets_dir: Path) -> None:
    with pytest.raises(OSError, match="does not exist"):
        pipeline("text-generation", model=str(tmp_path / "no" / "such-model"))
    bare = build_tiny_checkpoint(tmp_path / "bare", assets_dir, with_tokenizer=False)
    with pytest.raises(OSError, match="no tokenizer files.*tokenizer="):
        pipeline("text-generation", model=bare)
    pipe = pipeline("text-generation", model=bare, tokenizer=assets_dir)
    assert pipe(PROMPTS[0], max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith(PROMPTS[0])


def test_batched_lists_give_what_one_at_a_time_gives(pipe: TextGenerationPipeline) -> None:
    """Left-padded batches of prompts of different lengths, one row ending early at its eos."""
    prompts = [*PROMPTS, "猫", "今日は良い天気ですね。散歩に行きましょう。"]
    free = pipe(prompts[0], do_sample=False, max_new_tokens=12, eos_token_id=None, return_tensors=True)
    prompt_ids = pipe.tokenizer(prompts[0])["input_ids"]
    eos = free[0]["generated_token_ids"][len(prompt_ids) + 3]  # prompt 0 will stop within 4 tokens
    for kwargs in ({}, {"return_full_text": False}, {"return_tensors": True}):
        settings = dict(do_sample=False, max_new_tokens=12, eos_token_id=eos, **kwargs)
        one_by_one = pipe(prompts, **settings)
        for batch_size in (2, 4):
            assert pipe(prompts, batch_size=batch_size, **settings) == one_by_one, (batch_size, kwargs)
    generated = one_by_one[0][0]["generated_token_ids"][len(prompt_ids) :]
    assert generated[-1] == eos and generated.count(eos) == 1 and len(generated) <= 4  # it did end early


def test_batch_size_at_construction(tiny_dir: Path, pipe: TextGenerationPipeline) -> None:
    settings = dict(do_sample=False, max_new_tokens=6)
    batched = pipeline("text-generation", model=str(tiny_dir), batch_size=2, **settings)
    assert batched(PROMPTS + ["猫"]) == pipe(PROMPTS + ["猫"], **settings)


def test_batched_sampling_groups_sequences_per_prompt(pipe: TextGenerationPipeline) -> None:
    out = pipe(PROMPTS + ["猫"], batch_size=3, do_sample=True, num_return_sequences=2, max_new_tokens=5)
    assert [len(row) for row in out] == [2, 2, 2]
    for prompt, row in zip(PROMPTS + ["猫"], out, strict=True):
        assert all(record["generated_text"].startswith(prompt) for record in row)


def test_return_dict_in_generate_adds_per_sequence_outputs_as_transformers(
    pipe: TextGenerationPipeline, reference
) -> None:
    args = {"do_sample": False, "max_new_tokens": 3, "return_dict_in_generate": True}
    args.update(output_scores=True, output_logits=True)
    ours, theirs = pipe(PROMPTS, **args), reference(PROMPTS, **args)
    assert [[set(record) for record in row] for row in ours] == [[{"generated_text", "scores", "logits"}]] * 2
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine[0]["generated_text"] == expected[0]["generated_text"]
        for key in ("scores", "logits"):  # one [vocab] list per new token
            assert len(mine[0][key]) == 3
            torch.testing.assert_close(torch.tensor(mine[0][key]), torch.tensor(expected[0][key]))
    plain = pipe(PROMPTS[0], return_tensors=True, do_sample=False, max_new_tokens=3)
    assert pipe(PROMPTS[0], return_tensors=True, **args) == plain  # token ids only, as in transformers


@pytest.mark.parametrize(("num_beams", "copies"), [(2, 1), (4, 2)])
def test_beam_search_matches_transformers(pipe: TextGenerationPipeline, reference, num_beams, copies) -> None:
    """The best ``copies`` beams per prompt, as records; batched beams (left-padded) give the same."""
    args = {"do_sample": False, "max_new_tokens": 8, "num_beams": num_beams, "num_return_sequences": copies}
    expected = reference(PROMPTS, **args)
    assert [len(row) for row in expected] == [copies, copies]
    assert pipe(PROMPTS, **args) == expected
    assert pipe(PROMPTS, batch_size=2, **args) == expected
    scored = {**args, "return_dict_in_generate": True, "output_scores": True}
    ours, theirs = pipe(PROMPTS[1], **scored), reference(PROMPTS[1], **scored)
    assert [set(record) for record in ours] == [
        {"generated_text", "sequences_scores", "beam_indices"}
    ] * copies
    for mine, record in zip(ours, theirs, strict=True):
        assert mine["generated_text"] == record["generated_text"]
        assert mine["sequences_scores"] == pytest.approx(record["sequences_scores"], abs=1e-5)
        assert mine["beam_indices"] == record["beam_indices"]


def test_beams_take_the_pipeline_defaults_as_transformers_does(
    pipe: TextGenerationPipeline, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipe(text, num_beams=4)`` is beam sampling at the pipeline's temperature in both libraries;
    ``do_sample=False`` makes it beam search."""
    seen = record_generate_kwargs(pipe, monkeypatch)
    for call in ({"num_beams": 4}, {"num_beams": 4, "do_sample": False}):
        pipe(PROMPTS[0], **call)
        expected = reference._prepare_generate_kwargs(dict(call))
        assert {key: seen[key] for key in expected} == expected
        assert set(seen) - set(expected) <= {"attention_mask", "input_ids"}
    assert seen["do_sample"] is False and "temperature" not in seen


def test_assisted_decoding_gives_greedy_text_and_loads_a_named_assistant_once(
    tiny_dir: Path, pipe: TextGenerationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = PROMPTS[1] * 3  # the text repeats itself: prompt lookup finds drafts
    args = {"do_sample": False, "max_new_tokens": 12}
    greedy = pipe(prompt, **args)
    assert pipe(prompt, prompt_lookup_num_tokens=4, **args) == greedy
    assert pipe(prompt, prompt_lookup_num_tokens=2, max_matching_ngram_size=3, **args) == greedy
    loads = []
    load = neoxja.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        neoxja.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(k) or load(*a, **k)
    )
    assisted = pipeline(
        "text-generation", model=str(tiny_dir), dtype=torch.bfloat16, assistant_model=str(tiny_dir)
    )
    assert len(loads) == 2 and loads[1]["dtype"] == torch.bfloat16  # the assistant, as the model
    plain = assisted(prompt, assistant_model=None, **args)  # the call's None replaces the default
    assert assisted(prompt, **args) == plain
    assert assisted(prompt, assistant_model=tiny_dir, **args) == plain  # named again: the one loaded
    assert len(loads) == 2
