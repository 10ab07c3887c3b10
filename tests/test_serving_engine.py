"""The serving engine (continuous batching) without HTTP: batching never changes a result (greedy
tokens equal ``generate()`` alone, bit-identical logits on the C step; a seeded sampled request
equals itself alone and ``generate(seed=...)``), chunked prefill, cancellation, stop strings, caps.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SERVING_PROMPTS as PROMPTS

from neoxja import GPTNeoXJapaneseForCausalLM
from neoxja.serving.engine import Engine, Event, QueueFull, SamplingParams, StopMatcher
from neoxja.serving.slots import FusedSlotStep, TorchSlotStep


def _collect(sink: queue.Queue) -> tuple[list[int], str, str]:
    """(tokens, text, finish_reason) of one sequence's events."""
    tokens, text = [], []
    while True:
        event: Event = sink.get(timeout=60)
        if event.token is not None:
            tokens.append(event.token)
        text.append(event.text)
        if event.finish_reason is not None:
            return tokens, "".join(text), event.finish_reason


def _run(
    engine: Engine, requests: list[tuple[list[int], SamplingParams]]
) -> list[tuple[list[int], str, str]]:
    """Submit every request at once, then collect each one's sequence."""
    sinks = []
    for prompt, params in requests:
        sink: queue.Queue = queue.Queue()
        engine.submit([prompt], params, sink.put)
        sinks.append(sink)
    return [_collect(sink) for sink in sinks]


@pytest.fixture
def engine(tiny_loaded: tuple) -> Iterator[Engine]:
    model, tokenizer = tiny_loaded
    engine = Engine(model, tokenizer, max_batch=3, max_queue=16, max_model_len=128)
    engine.start()
    yield engine
    engine.shutdown(0)


def test_greedy_in_a_crowd_equals_generate_alone(engine: Engine, tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    assert isinstance(engine.step, FusedSlotStep)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    lengths = [20, 7, 33, 12, 25]  # sequences leave the batch at different steps; 5 prompts, 3 slots
    results = _run(
        engine,
        [
            (p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(prompts, lengths, strict=True)
        ],
    )
    for prompt, n, (tokens, _, reason) in zip(prompts, lengths, results, strict=True):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert tokens == alone[0, len(prompt) :].tolist()
        assert reason == "length"


def test_the_c_step_gives_each_row_the_logits_of_a_batch_of_one(tiny_loaded: tuple) -> None:
    """Bit for bit: what makes batching unable to change a greedy or seeded result."""
    model, tokenizer = tiny_loaded
    engine = Engine(model, tokenizer, max_batch=4, max_model_len=64)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    for slot, prompt in enumerate(prompts):
        assert engine.pool.acquire() == slot
        model(torch.tensor([prompt]), past_key_values=engine.pool.view(slot, 0), use_cache=True)
    tokens = torch.tensor([p[-1] for p in prompts])  # fed again at the next position: any id will do
    lengths = torch.tensor([len(p) for p in prompts])
    together, _ = engine.step(tokens, torch.tensor([0, 1, 2]), lengths)
    together = together.clone()
    for row in (2, 0, 1):
        alone, _ = engine.step(tokens[row : row + 1], torch.tensor([row]), lengths[row : row + 1])
        assert torch.equal(alone[0], together[row])


def test_the_c_step_refuses_rows_it_cannot_place(tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    step = Engine(model, tokenizer, max_batch=2, max_model_len=16).step
    one, two = torch.tensor([5]), torch.tensor([5, 6])
    with pytest.raises(ValueError, match="both use slot 1"):
        step(two, torch.tensor([1, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="slot 2 of row 0 is outside"):
        step(one, torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="length 16 of row 0 leaves no room"):
        step(one, torch.tensor([0]), torch.tensor([16]))
    with pytest.raises(ValueError, match="token id 32000"):
        step(torch.tensor([32000]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="lengths must be contiguous int64"):
        step(one, torch.tensor([0]), torch.tensor([0], dtype=torch.int32))


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(engine: Engine, tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    prompt = tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = _run(engine, [(prompt, params)])[0]
    crowd = [
        (tokenizer.encode(p), SamplingParams(max_tokens=10, temperature=1.0, seed=i))
        for i, p in enumerate(PROMPTS)
    ]
    mixed = _run(engine, [*crowd[:2], (prompt, params), *crowd[2:]])
    assert mixed[2] == alone
    reference = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=True,
        temperature=0.9,
        top_k=0,
        top_p=0.95,
        seed=1234,
    )
    assert alone[0] == reference[0, len(prompt) :].tolist()


def _greedy_as_generate(model: GPTNeoXJapaneseForCausalLM, tokenizer, new: int, **engine_options) -> Engine:
    """Serve three prompts at once (two slots) and check each against ``generate()`` alone."""
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=96, **engine_options)
    engine.start()
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        results = _run(engine, [(p, params) for p in prompts])
    finally:
        engine.shutdown(0)
    for prompt, (tokens, _, _) in zip(prompts, results, strict=True):
        alone = model.generate(
            torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        assert tokens == alone[0, len(prompt) :].tolist()
    return engine


def test_the_pytorch_step_decodes_as_generate(tiny_loaded: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOXJA_FUSED_DECODE", "0")  # the step every other model (dtype, device) takes
    engine = _greedy_as_generate(*tiny_loaded, new=12)
    assert isinstance(engine.step, TorchSlotStep)


def test_a_quantized_model_is_served(tiny_checkpoint: Path, tiny_loaded: tuple) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint, weight_format="nf4").eval()
    engine = _greedy_as_generate(model, tiny_loaded[1], new=8)
    assert isinstance(engine.step, FusedSlotStep)


def test_chunked_prefill_scores_the_prompt_as_one_forward(tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    prompt = tokenizer.encode("".join(PROMPTS))
    scores = []
    for chunk in (4, 512):
        engine = Engine(model, tokenizer, max_batch=2, max_model_len=128, prefill_chunk=chunk)
        engine.start()
        sink: queue.Queue = queue.Queue()
        engine.submit([prompt], SamplingParams(max_tokens=0, logprobs=0, prompt_logprobs=True), sink.put)
        event = sink.get(timeout=30)
        assert sink.get(timeout=30).finish_reason == "length"
        engine.shutdown(0)
        scores.append([lp for lp, _ in event.prompt_logprobs])
    assert scores[0][0] is None and len(scores[0]) == len(prompt)
    logits = model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    expected = logits.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    for got in scores:
        torch.testing.assert_close(torch.tensor(got[1:]), expected, rtol=0, atol=1e-5)


def test_a_long_prompt_does_not_stall_the_running_streams(tiny_loaded: tuple) -> None:
    """With 8-token chunks, a 60-token prompt takes 8 steps to prefill; the running stream gets a
    token at every one of them."""
    model, tokenizer = tiny_loaded
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=128, prefill_chunk=8)
    steps: list[int] = []
    started = threading.Event()

    def running(event: Event) -> None:
        if event.token is not None:
            steps.append(engine.steps)
            started.set()

    long_prompt = (tokenizer.encode("".join(PROMPTS)) * 3)[:60]
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    engine.start()
    try:
        engine.submit([tokenizer.encode(PROMPTS[3])], params, running)
        assert started.wait(30)
        first: list[int] = []
        sink: queue.Queue = queue.Queue()
        submitted = engine.steps
        engine.submit(
            [long_prompt],
            SamplingParams(max_tokens=1, temperature=0),
            lambda e: (first.append(engine.steps), sink.put(e)),
        )
        while sink.get(timeout=30).finish_reason is None:
            pass
    finally:
        engine.shutdown(0)
    during = [s for s in steps[1:] if s <= first[0]]  # steps[0]: the prefill's token, in step 0 too
    assert first[0] - submitted >= 7  # the long prompt's prefill spanned at least 8 steps...
    assert during == list(range(during[0], first[0] + 1))  # ...each with a token of the stream


def test_a_cancelled_request_frees_its_slot_within_a_step(engine: Engine, tiny_loaded: tuple) -> None:
    _, tokenizer = tiny_loaded
    sink: queue.Queue = queue.Queue()
    request = engine.submit(
        [tokenizer.encode(PROMPTS[0])],
        SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
        sink.put,
    )
    assert sink.get(timeout=30).token is not None  # decoding
    assert engine.pool.used == 1
    steps = engine.steps
    engine.cancel(request)
    while (event := sink.get(timeout=30)).finish_reason is None:
        pass
    assert event.finish_reason == "cancelled"
    assert engine.pool.used == 0 and engine.steps <= steps + 2


def test_a_broken_sink_ends_its_own_sequences_only(engine: Engine, tiny_loaded: tuple) -> None:
    _, tokenizer = tiny_loaded
    calls = []

    def broken(event: Event) -> None:
        calls.append(event)
        raise RuntimeError("the client's queue is gone")

    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine.submit([tokenizer.encode(PROMPTS[0])], params, broken, n=2)
    tokens, _, reason = _run(engine, [(tokenizer.encode(PROMPTS[1]), params)])[0]
    assert reason == "length" and len(tokens) == 20
    deadline = time.monotonic() + 10
    while engine.pool.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pool.used == 0
    # each sequence: its first token (which failed), then its last event, an error saying why
    ends = sorted((e.index, e.finish_reason or "") for e in calls)
    assert ends == [(0, ""), (0, "error"), (1, ""), (1, "error")]
    assert {e.error for e in calls if e.finish_reason} == {"RuntimeError: the client's queue is gone"}


def test_a_full_queue_is_refused(tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    engine = Engine(
        model, tokenizer, max_batch=1, max_queue=2, max_model_len=64
    )  # not started: nothing moves
    params = SamplingParams(max_tokens=4)
    engine.submit([[1, 2], [3, 4]], params, lambda e: None)
    with pytest.raises(QueueFull):
        engine.submit([[5]], params, lambda e: None)


@pytest.mark.parametrize(
    ("prompts", "fields", "n", "message"),
    [
        ([[1, 32000]], {}, 1, "prompt 0, position 1: 32000 is not a token id"),
        ([[1, 2.0]], {}, 1, "prompt 0, position 1: 2.0 is not a token id"),  # was cast to 2 silently
        ([[True]], {}, 1, "prompt 0, position 0: True is not a token id"),
        ([[]], {}, 1, "prompt 0 is empty"),
        ([[1] * 60], dict(max_tokens=8), 1, "max_model_len 64"),
        ([[1]], {}, 0, "n must be an integer >= 1"),
        ([[1]], dict(max_tokens=-1), 1, "max_tokens must be an integer >= 0"),
        ([[1]], dict(max_tokens=2.0), 1, "max_tokens must be an integer >= 0"),
        ([[1]], dict(max_tokens=0), 1, "max_tokens must be >= 1"),
        ([[1]], dict(temperature=math.inf), 1, "temperature must be a finite number >= 0"),
        ([[1]], dict(temperature=math.nan), 1, "temperature must be a finite number >= 0"),
        ([[1]], dict(temperature=-0.5), 1, "temperature must be"),
        ([[1]], dict(top_p=0.0), 1, "top_p must be a number in \\(0, 1\\]"),
        ([[1]], dict(top_k=-1), 1, "top_k must be an integer >= 0"),
        ([[1]], dict(min_p=1.5), 1, "min_p must be a number in \\[0, 1\\]"),
        ([[1]], dict(repetition_penalty=0.0), 1, "repetition_penalty must be a finite number >= 1e-30"),
        ([[1]], dict(repetition_penalty=math.inf), 1, "repetition_penalty must be a finite number"),
        ([[1]], dict(presence_penalty=2.5), 1, "presence_penalty must be a number in \\[-2, 2\\]"),
        ([[1]], dict(frequency_penalty=-3), 1, "frequency_penalty must be a number in \\[-2, 2\\]"),
        ([[1]], dict(stop=[3]), 1, "stop must be a string or a list of strings"),
        (
            [[1]],
            dict(seed=2**64 - 1),
            2,
            "seed must be an integer such that seed \\+ i, for each of the request's 2",
        ),
        ([[1]], dict(seed=-(2**63) - 1), 1, "seed must be an integer"),
        ([[1]], dict(seed=1.0), 1, "seed must be an integer"),
        ([[1]], dict(logprobs=32001), 1, "logprobs must be None or an integer in \\[0, 32000\\]"),
        ([[1]], dict(logprobs=-1), 1, "logprobs must be None"),
        ([[1]], dict(ignore_eos="yes"), 1, "ignore_eos must be True or False"),
    ],
)
def test_submit_refuses_what_it_cannot_compute_naming_it(
    tiny_loaded: tuple, prompts: list, fields: dict, n: int, message: str
) -> None:
    """Python callers reach the engine without the HTTP checks: submit applies the same rules."""
    model, tokenizer = tiny_loaded
    engine = Engine(model, tokenizer, max_batch=1, max_queue=4, max_model_len=64)  # not started
    with pytest.raises(ValueError, match=message):
        engine.submit(prompts, SamplingParams(**{"max_tokens": 4, **fields}), lambda e: None, n=n)
    assert engine.queue_depth == 0


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start() -> None:
    matcher = StopMatcher(["。\n", "END"])
    assert matcher.feed("今日は") == ("今日は", False)
    assert matcher.feed("晴れ。") == ("晴れ", False)  # "。" may start "。\n"
    assert matcher.feed("です") == ("。です", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.feed("Dの後") == ("", True)
    assert StopMatcher(["。"]).feed("一。二。") == ("一", True)


def test_stop_matching_follows_its_definition_on_random_text() -> None:
    """Sent text + held text = all text so far, cut at the first stop string; what is held is the
    longest end of the text that is the beginning of a stop string (checked the slow way)."""
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choices("ab。", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        matcher, sent, text = StopMatcher(stops), "", ""
        for _ in range(6):
            piece = "".join(rng.choices("abc。", k=rng.randint(0, 3)))
            text += piece
            out, stopped = matcher.feed(piece)
            sent += out
            first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if stopped:
                assert first >= 0 and sent == text[:first]
                break
            assert first < 0 and sent + matcher.pending == text
            longest = max(
                (k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                default=0,
            )
            assert len(matcher.pending) == longest


def test_stop_and_eos_end_a_sequence_with_finish_reason_stop(engine: Engine, tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
    prompt = tokenizer.encode(PROMPTS[1])
    tokens, text, _ = _run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])[
        0
    ]
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = full[3:5]
    _, cut, reason = _run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=0, stop=[stop]))])[0]
    assert reason == "stop" and cut == full[: full.index(stop)]
    # a bare string is one stop string (one per character would stop at full[3])
    alone = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=full[3] + "☃")
    _, text, reason = _run(engine, [(prompt, alone)])[0]
    assert reason == "length" and text == full
    # EOS: a seeded sampled run, then the same run with its latest new token taken for the eos id.
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    drawn = _run(engine, [(prompt, sampled)])[0][0]
    k = max(i for i in range(len(drawn)) if drawn[i] not in drawn[:i])
    assert k >= 2
    engine.eos_ids = {drawn[k]}  # the engine's own copy of the ids; the model is not touched
    ended, text, reason = _run(engine, [(prompt, replace(sampled, ignore_eos=False))])[0]
    assert reason == "stop" and ended == drawn[: k + 1]
    assert text == tokenizer.decode(drawn[:k], skip_special_tokens=True)  # the eos token adds no text
    ignored = _run(engine, [(prompt, sampled)])[0]
    assert ignored[2] == "length" and ignored[0] == drawn
