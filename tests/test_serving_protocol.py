"""What a request may ask for: every sampling field at the edges of its accepted range is computed
(and right: a temperature of 1e-40 is the argmax), every value past them is a 400 naming the field,
and a request's tokens scored are bounded by ``Limits.max_work`` with a 400 naming what makes them up,
while lm-eval's loglikelihood batches and OpenAI clients' ``n=8`` requests fit the default.
"""

from __future__ import annotations

import json
import math
import queue
from collections.abc import Iterator

import pytest
import torch
from conftest import SERVING_PROMPTS as PROMPTS

from neoxja.serving.engine import Engine, Event, SamplingParams
from neoxja.serving.protocol import (
    DEFAULT_MAX_WORK,
    APIError,
    Limits,
    parse_chat,
    parse_completion,
    request_work,
)

VOCAB = 32000
LIMITS = Limits(max_model_len=2048, vocab_size=VOCAB, max_tokens=2048)


def _render(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages)


@pytest.fixture(scope="module")
def engine(tiny_loaded: tuple) -> Iterator[Engine]:
    model, tokenizer = tiny_loaded
    engine = Engine(model, tokenizer, max_batch=8, max_queue=64, max_model_len=64)
    engine.start()
    yield engine
    engine.shutdown(0)


def _serve(engine: Engine, body: dict, tokenizer) -> list[list[Event]]:
    """Parse ``body`` as /v1/completions does (with this engine's context), run it, and return each
    sequence's events."""
    limits = Limits(max_model_len=engine.max_model_len, vocab_size=VOCAB, max_tokens=engine.max_model_len)
    parsed = parse_completion(json.loads(json.dumps(body)), tokenizer, limits)
    sink: queue.Queue = queue.Queue()
    engine.submit(parsed.prompts, parsed.params, sink.put, n=parsed.n)
    events: list[list[Event]] = [[] for _ in range(len(parsed.prompts) * parsed.n)]
    open_ = len(events)
    while open_:
        event = sink.get(timeout=60)
        events[event.index].append(event)
        open_ -= event.finish_reason is not None
    return events


def _tokens(events: list[Event]) -> list[int]:
    return [e.token for e in events if e.token is not None]


EDGES = {
    "temperature 2": dict(temperature=2.0, seed=1),
    "top_p 1e-300": dict(top_p=1e-300, seed=1),
    "top_k -1 (off)": dict(top_k=-1, seed=1),
    "top_k the vocabulary": dict(top_k=VOCAB, seed=1),
    "min_p 1e-300": dict(min_p=1e-300, seed=1),
    "repetition_penalty 0.01": dict(repetition_penalty=0.01, temperature=0.5, seed=1),
    "repetition_penalty 10": dict(repetition_penalty=10, temperature=0.5, seed=1),
    "presence and frequency penalties 2": dict(presence_penalty=2, frequency_penalty=2, seed=1),
    "presence and frequency penalties -2": dict(presence_penalty=-2, frequency_penalty=-2, seed=1),
    "seed 0, n 8": dict(seed=0, n=8),
    "logprobs 20": dict(logprobs=20, temperature=0),
    "echo, logprobs 20, max_tokens 0": dict(echo=True, logprobs=20, max_tokens=0),
    "max_tokens to the context": dict(max_tokens=64 - 4, temperature=0),
}


@pytest.mark.parametrize("fields", EDGES.values(), ids=EDGES.keys())
def test_every_field_at_the_edge_of_its_range_is_computed(
    fields: dict, engine: Engine, tiny_loaded: tuple
) -> None:
    _, tokenizer = tiny_loaded
    body = {"prompt": [[5, 6, 7, 8]], "max_tokens": 6, "ignore_eos": True, **fields}
    for events in _serve(engine, body, tokenizer):
        last = events[-1]
        assert last.error is None and last.finish_reason == "length"
        assert len(_tokens(events)) == body["max_tokens"]
        for event in events:
            values = [event.logprob] if event.logprob is not None else []
            values += [v for _, v in event.top_logprobs or ()]
            values += [v for lp, top in event.prompt_logprobs or () for v in [lp, *(v for _, v in top)] if v]
            assert all(math.isfinite(v) and v <= 0 for v in values)
    assert engine.pool.used == 0


def test_the_edges_that_mean_the_argmax_give_the_argmax(engine: Engine, tiny_loaded: tuple) -> None:
    """temperature 1e-40 (it overflowed float32 and failed the step), top_p and min_p that leave
    only the best token: each sequence equals greedy decoding, as generate() gives it."""
    model, tokenizer = tiny_loaded
    prompt = tokenizer.encode(PROMPTS[0])
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = greedy[0, len(prompt) :].tolist()
    for fields in (dict(temperature=1e-40), dict(top_p=1e-9), dict(min_p=1.0), dict(temperature=5e-324)):
        body = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True, "seed": 3, "n": 2, **fields}
        for events in _serve(engine, body, tokenizer):
            assert _tokens(events) == expected, fields


def test_the_highest_seed_with_n_8_is_generate_with_seed_plus_i(engine: Engine, tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    prompt = tokenizer.encode(PROMPTS[1])
    body = {"prompt": prompt, "max_tokens": 5, "ignore_eos": True, "seed": 2**62, "n": 8, "top_k": VOCAB}
    for i, events in enumerate(_serve(engine, body, tokenizer)):
        alone = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=True,
            top_k=0,
            seed=2**62 + i,
        )
        assert _tokens(events) == alone[0, len(prompt) :].tolist()


REFUSED = [
    ("temperature", 2.01),
    ("temperature", -1e-9),
    ("temperature", "NaN"),
    ("temperature", "Infinity"),
    ("top_p", 0),
    ("top_p", 1.0000001),
    ("top_k", -2),
    ("top_k", VOCAB + 1),
    ("top_k", 1.5),
    ("min_p", -1e-9),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0099),
    ("repetition_penalty", 10.01),
    ("presence_penalty", 2.0001),
    ("frequency_penalty", -2.0001),
    ("seed", -1),
    ("seed", 2**62 + 1),
    ("seed", "7"),
    ("logprobs", 21),
    ("logprobs", -1),
    ("n", 0),
    ("n", 9),
    ("max_tokens", -1),
    ("max_tokens", 2049),
    ("max_tokens", True),
]


@pytest.mark.parametrize(("field", "value"), REFUSED)
def test_a_value_past_its_range_is_a_400_naming_the_field(field: str, value, tiny_loaded: tuple) -> None:
    text = json.dumps({"prompt": [1, 2, 3], field: value})
    if value in ("NaN", "Infinity"):  # Python's JSON reader accepts these words as numbers
        text = text.replace(f'"{value}"', value)
    with pytest.raises(APIError) as caught:
        parse_completion(json.loads(text), tiny_loaded[1], LIMITS)
    assert caught.value.status == 400 and caught.value.param == field
    assert caught.value.message.startswith(f"{field}: ")


def test_request_work_counts_positions_and_returned_log_probabilities() -> None:
    plain = SamplingParams(max_tokens=4)
    assert request_work([[1] * 3, [2] * 5], plain, n=2) == 2 * ((3 + 4) + (5 + 4))
    # logprobs=2: each generated token returns its own and two alternatives
    assert request_work([[1] * 3], SamplingParams(max_tokens=4, logprobs=2), n=1) == 3 + 4 + 4 * 3
    # echo + logprobs=0: each prompt token still returns its top alternative
    echo = SamplingParams(max_tokens=1, logprobs=0, prompt_logprobs=True)
    assert request_work([[1] * 10], echo, n=3) == 3 * (10 + 1 + 10 * 2 + 1 * 1)


def test_the_default_budget_lets_lm_eval_and_openai_clients_through(tiny_loaded: tuple) -> None:
    tokenizer = tiny_loaded[1]
    # lm-eval local-completions, loglikelihood: 64 prompts filling the context (the most prompts a
    # request may have), echo, logprobs=1, max_tokens=1
    loglikelihood = {"prompt": [[7] * 2047] * 64, "max_tokens": 1, "logprobs": 1, "echo": True}
    parsed = parse_completion(loglikelihood, tokenizer, LIMITS)
    assert request_work(parsed.prompts, parsed.params, parsed.n) <= DEFAULT_MAX_WORK
    # lm-eval generate_until: 64 prompts and max_gen_toks 256
    parse_completion({"prompt": [[7] * 1792] * 64, "max_tokens": 256, "stop": ["\n\n"]}, tokenizer, LIMITS)
    # OpenAI clients: n=8 over the whole context, the most logprobs
    parse_completion({"prompt": [7] * 48, "n": 8, "max_tokens": 2000, "logprobs": 20}, tokenizer, LIMITS)
    chat = {
        "messages": [{"role": "user", "content": "日本の首都は？"}],
        "n": 8,
        "logprobs": True,
        "top_logprobs": 20,
    }
    parsed = parse_chat(chat, _render, tokenizer, LIMITS, [])
    assert parsed.params.max_tokens + len(parsed.prompts[0]) == 2048  # the default fills the context


def test_a_request_past_the_budget_is_a_400_naming_what_makes_it_up(tiny_loaded: tuple) -> None:
    tokenizer = tiny_loaded[1]
    body = {"prompt": [[7] * 1000] * 4, "n": 2, "max_tokens": 24, "logprobs": 3, "echo": True}
    parsed = parse_completion(body, tokenizer, LIMITS)
    work = request_work(parsed.prompts, parsed.params, parsed.n)
    assert parse_completion(body, tokenizer, Limits(2048, VOCAB, 2048, max_work=work)).n == 2  # at the limit
    with pytest.raises(APIError) as caught:
        parse_completion(body, tokenizer, Limits(2048, VOCAB, 2048, max_work=work - 1))
    err = caught.value
    assert err.status == 400 and err.param == "prompt, n, max_tokens, echo, logprobs"
    assert f"may score {work:,} tokens" in err.message and f"({work - 1:,})" in err.message
    chat = {"messages": [{"role": "user", "content": "こんにちは"}], "n": 8, "max_tokens": 100}
    with pytest.raises(APIError) as caught:
        parse_chat(chat, _render, tokenizer, Limits(2048, VOCAB, 2048, max_work=800), [])
    assert caught.value.param == "messages, n, max_tokens"


@pytest.mark.parametrize("value", [0, -5, 1.5, True])
def test_limits_refuse_a_budget_that_admits_nothing(value) -> None:
    with pytest.raises(ValueError, match="max_work must be an integer >= 1"):
        Limits(2048, VOCAB, 2048, max_work=value)
