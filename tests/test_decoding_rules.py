"""The rule table of bad combinations (``_COMBINATIONS`` in generation_config.py), reached through every
entry point: ``generate()``, ``stream_generate()``, ``pipeline()`` and the CLI (one line, exit 2, before
the model loads where the rule does not need it). Each rule's valid neighbours are accepted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import NO_DROPOUT, make_reference

from neoxja import GPTNeoXJapaneseForCausalLM, TextStreamer, stream_generate
from neoxja.cli import main
from neoxja.generation_config import _COMBINATIONS
from neoxja.pipelines import TextGenerationPipeline

PROMPT = "吾輩は猫である。名前はまだ無い。"
SHORT = {"max_new_tokens": 2}

# One case per rule of the table: the settings that break it, what else the call needs ("stream": a
# streamer, "text": stream_generate, the only entry point that returns no output object,
# "assistant": an assistant model of the same vocabulary, "other-vocab": one of another, "batch": two
# prompts), and the words of its message, which name the arguments.
CASES = {
    "copies-need-sampling-or-beams": (
        {"num_return_sequences": 2, "do_sample": False},
        (),
        "num_return_sequences=2 needs do_sample=True or num_beams >= 2",
    ),
    "copies-beyond-beams": (
        {"num_beams": 2, "num_return_sequences": 3, "do_sample": False},
        (),
        "num_return_sequences=3 is more than num_beams=2",
    ),
    "beams-stream": ({"num_beams": 2, "do_sample": False}, ("stream",), "num_beams=2 cannot stream"),
    "text-with-dict": (
        {"return_dict_in_generate": True, "output_scores": True},
        ("stream", "text"),
        "return_dict_in_generate=True with stream_generate",
    ),
    "beams-stop-strings": (
        {"num_beams": 2, "do_sample": False, "stop_strings": "。"},
        (),
        "stop_strings with num_beams=2 is not supported",
    ),
    "two-drafters": (
        {"prompt_lookup_num_tokens": 3, "do_sample": False},
        ("assistant",),
        "pass either prompt_lookup_num_tokens or assistant_model, not both",
    ),
    "beams-prompt-lookup": (
        {"num_beams": 2, "prompt_lookup_num_tokens": 3, "do_sample": False},
        (),
        "num_beams=2 with prompt_lookup_num_tokens",
    ),
    "beams-assistant": (
        {"num_beams": 2, "do_sample": False},
        ("assistant",),
        "num_beams=2 with assistant_model",
    ),
    "assisted-batch": (
        {"prompt_lookup_num_tokens": 3, "do_sample": False},
        ("batch",),
        "prompt_lookup_num_tokens decodes one prompt at a time, got a batch of 2",
    ),
    "assisted-copies": (
        {"prompt_lookup_num_tokens": 3, "do_sample": True, "num_return_sequences": 2},
        (),
        "prompt_lookup_num_tokens with num_return_sequences=2",
    ),
    "assistant-vocabulary": (
        {"do_sample": False},
        ("other-vocab",),
        "assistant_model has another vocabulary (vocab_size 128, the model's 32000)",
    ),
}
# stream_generate always streams, so with beams the streaming rule (earlier in the table) is the one hit.
STREAMING_FIRST = {"beams-stop-strings", "beams-assistant", "beams-prompt-lookup"}


def test_every_rule_of_the_table_has_a_case() -> None:
    """A rule added to the table without a case here fails: each case breaks exactly one rule."""
    from neoxja.generation_config import DecodingRequest, GenerationConfig

    broken_by_case = []
    for settings, needs, _ in CASES.values():
        assistant = _FakeAssistant(128 if "other-vocab" in needs else 32000) if _assisted(needs) else None
        request = DecodingRequest(
            streaming="stream" in needs,
            yields_text="text" in needs,
            assistant_model=assistant,
            batch_size=2 if "batch" in needs else 1,
            vocab_size=32000,
        )
        config = GenerationConfig(**settings)
        broken_by_case.append([i for i, (broken, _) in enumerate(_COMBINATIONS) if broken(config, request)])
    assert {rules[0] for rules in broken_by_case} == set(range(len(_COMBINATIONS)))
    assert all(len(rules) == 1 for rules in broken_by_case)


class _FakeAssistant:
    def __init__(self, vocab_size: int) -> None:
        self.config = type("Config", (), {"vocab_size": vocab_size})()


def _assisted(needs: tuple) -> bool:
    return "assistant" in needs or "other-vocab" in needs


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with a 128-token vocabulary: an assistant that cannot draft for the model."""
    directory = tmp_path_factory.mktemp("other-vocab")
    make_reference(NO_DROPOUT).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def assistants(tiny_checkpoint: Path, other_vocab_dir: Path) -> dict[str, GPTNeoXJapaneseForCausalLM]:
    return {
        "assistant": GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint).eval(),
        "other-vocab": GPTNeoXJapaneseForCausalLM.from_pretrained(other_vocab_dir).eval(),
    }


def _call_arguments(needs: tuple, tokenizer, assistants: dict) -> dict:
    extra = {}
    if "stream" in needs:
        extra["streamer"] = TextStreamer(tokenizer)
    for kind in ("assistant", "other-vocab"):
        if kind in needs:
            extra["assistant_model"] = assistants[kind]
    return extra


# The cases that generate() and pipeline() can reach (they return outputs, not text pieces).
RETURNING = [case for case, (_, needs, _) in CASES.items() if "text" not in needs]


@pytest.mark.parametrize("case", RETURNING)
def test_generate_refuses_each_bad_combination(case: str, tiny_loaded, assistants) -> None:
    model, tokenizer = tiny_loaded
    settings, needs, message = CASES[case]
    ids = torch.tensor([tokenizer.encode(PROMPT)] * (2 if "batch" in needs else 1))
    with pytest.raises(ValueError) as error:
        model.generate(
            ids, tokenizer=tokenizer, **settings, **SHORT, **_call_arguments(needs, tokenizer, assistants)
        )
    assert message in str(error.value)


@pytest.mark.parametrize("case", list(CASES))
def test_stream_generate_refuses_each_bad_combination(case: str, tiny_loaded, assistants) -> None:
    model, tokenizer = tiny_loaded
    settings, needs, message = CASES[case]
    if case in STREAMING_FIRST:
        message = CASES["beams-stream"][2]
    prompt = torch.tensor([tokenizer.encode(PROMPT)] * 2) if "batch" in needs else PROMPT
    extra = _call_arguments(tuple(n for n in needs if n != "stream"), tokenizer, assistants)
    with pytest.raises(ValueError) as error:
        next(iter(stream_generate(model, tokenizer, prompt, **settings, **SHORT, **extra)))
    assert message in str(error.value)


@pytest.mark.parametrize("case", RETURNING)
def test_pipeline_refuses_each_bad_combination(
    case: str, tiny_loaded, assistants, tiny_checkpoint: Path, other_vocab_dir: Path
) -> None:
    model, tokenizer = tiny_loaded
    settings, needs, message = CASES[case]
    pipe = TextGenerationPipeline(model, tokenizer)
    extra = _call_arguments(needs, tokenizer, assistants)
    if "other-vocab" in needs:
        extra["assistant_model"] = str(other_vocab_dir)  # by name, loaded by the pipeline
    settings = dict(settings)
    if "stop_strings" in settings:
        extra["stop_sequence"] = settings.pop("stop_strings")  # the pipeline's own name
    texts = [PROMPT, PROMPT] if "batch" in needs else PROMPT
    with pytest.raises(ValueError) as error:
        pipe(texts, batch_size=2 if "batch" in needs else 1, **settings, **SHORT, **extra)
    assert message in str(error.value)


# The CLI's spelling of each case (None: the CLI cannot ask for it: it prints beams at the end instead
# of streaming them, continues one prompt per run, and has no option for output objects) and its
# message in option words.
CLI_CASES = {
    "copies-need-sampling-or-beams": (
        ["--temperature", "0", "--num-return-sequences", "2"],
        "--num-return-sequences 2 needs sampling (--temperature > 0) or --num-beams >= 2",
    ),
    "copies-beyond-beams": (
        ["--temperature", "0", "--num-beams", "2", "--num-return-sequences", "3"],
        "--num-return-sequences 3 is more than --num-beams 2",
    ),
    "beams-stream": None,
    "text-with-dict": None,
    "beams-stop-strings": (
        ["--temperature", "0", "--num-beams", "2", "--stop", "。"],
        "--stop with --num-beams 2 is not supported",
    ),
    "two-drafters": (
        ["--prompt-lookup", "3", "--assistant-model", "{same}"],
        "pass either --prompt-lookup or --assistant-model, not both",
    ),
    "beams-prompt-lookup": (
        ["--temperature", "0", "--num-beams", "2", "--prompt-lookup", "3"],
        "--num-beams 2 with --prompt-lookup: assisted decoding works with greedy decoding and sampling "
        "only (--num-beams 1)",
    ),
    "beams-assistant": (
        ["--temperature", "0", "--num-beams", "2", "--assistant-model", "{same}"],
        "--num-beams 2 with --assistant-model",
    ),
    "assisted-batch": None,
    "assisted-copies": (
        ["--prompt-lookup", "3", "--num-return-sequences", "2"],
        "--prompt-lookup with --num-return-sequences 2",
    ),
    "assistant-vocabulary": (
        ["--temperature", "0", "--assistant-model", "{other}"],
        "--assistant-model has another vocabulary (vocab_size 128, the model's 32000)",
    ),
}


def test_the_cli_cases_cover_the_table() -> None:
    assert set(CLI_CASES) == set(CASES)


@pytest.mark.parametrize("case", [case for case, spelt in CLI_CASES.items() if spelt is not None])
def test_cli_refuses_each_bad_combination_in_one_line(
    case: str, tiny_checkpoint: Path, other_vocab_dir: Path, tmp_path: Path, capsys
) -> None:
    options, message = CLI_CASES[case]
    needs_the_model = case == "assistant-vocabulary"  # the vocabulary is known once both are loaded
    model = tiny_checkpoint if needs_the_model else tmp_path / "not-loaded"
    paths = {"same": str(tiny_checkpoint), "other": str(other_vocab_dir)}
    options = [option.format(**paths) for option in options]
    status = main(["generate", "--model", str(model), "--max-new-tokens", "2", *options, PROMPT])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith(f"neoxja generate: error: {message}") and err.count("\n") == 1


# Each rule's valid neighbours: the nearest calls that break no rule, and run.
NEIGHBOURS = [
    ({"num_return_sequences": 2, "do_sample": True}, ()),
    ({"num_return_sequences": 2, "num_beams": 2, "do_sample": False}, ()),  # == num_beams
    ({"num_beams": 2, "do_sample": False}, ()),  # beams, not streamed
    ({"do_sample": False}, ("stream",)),  # streamed, no beams
    ({"do_sample": False, "stop_strings": "。"}, ()),  # stop strings without beams
    ({"prompt_lookup_num_tokens": 3, "do_sample": False}, ()),  # one drafter, no beams, one prompt
    ({"do_sample": False}, ("assistant",)),  # an assistant of the same vocabulary
    ({"prompt_lookup_num_tokens": 3, "do_sample": True, "seed": 0}, ()),  # assisted sampling, one copy
    ({"num_beams": 2, "do_sample": False}, ("batch",)),  # beams take a batch
]


@pytest.mark.parametrize(("settings", "needs"), NEIGHBOURS)
def test_the_neighbours_of_each_rule_are_accepted(
    settings: dict, needs: tuple, tiny_loaded, assistants
) -> None:
    model, tokenizer = tiny_loaded
    prompts = [tokenizer.encode(PROMPT)] * (2 if "batch" in needs else 1)
    ids = torch.tensor(prompts)
    extra = _call_arguments(needs, tokenizer, assistants)
    out = model.generate(ids, tokenizer=tokenizer, **settings, max_new_tokens=4, **extra)
    assert out.shape[0] == len(prompts) * settings.get("num_return_sequences", 1)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(out.shape[0] // len(prompts), dim=0))
    if not settings["do_sample"] and settings.get("num_beams", 1) == 1:  # greedy: assisted or not, the same
        stops = {"stop_strings": settings["stop_strings"]} if "stop_strings" in settings else {}
        assert torch.equal(
            out, model.generate(ids, tokenizer=tokenizer, do_sample=False, max_new_tokens=4, **stops)
        )


def test_stream_generate_streams_assisted_decoding(tiny_loaded, assistants) -> None:
    """Prompt lookup and an assistant stream their accepted tokens: the pieces join to the text of
    plain greedy decoding, and arrive one verified token at a time, not at the end."""
    model, tokenizer = tiny_loaded
    prompt = PROMPT * 3  # the text repeats itself: prompt lookup finds drafts
    ids = torch.tensor([tokenizer.encode(prompt)])
    greedy = model.generate(ids, do_sample=False, max_new_tokens=12)[0, ids.shape[1] :]
    expected = tokenizer.decode(greedy, skip_special_tokens=True)
    for extra in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": assistants["assistant"]}):
        pieces = list(stream_generate(model, tokenizer, prompt, do_sample=False, max_new_tokens=12, **extra))
        assert "".join(pieces) == expected and len(pieces) > 1, extra
