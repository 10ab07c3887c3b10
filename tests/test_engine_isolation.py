"""One sequence's failure stays its own: a failure injected into one sequence's sampler, penalties,
log-probabilities, detokenizer, stop check, sink or prefill ends that sequence with an error event
and frees its slot, while the other sequences of the same steps give exactly ``generate()``'s
tokens; a failing decoding step fails its rows and the engine serves the next requests; a dead
engine thread is reported (``stalled_for() == inf``) and answers what it held.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import SERVING_PROMPTS as PROMPTS

import neoxja.serving.engine as engine_module
from neoxja.sample_utils import Sampler
from neoxja.serving.engine import Engine, EngineClosed, Event, SamplingParams
from neoxja.serving.sequences import SequenceState

GREEDY = dict(temperature=0, ignore_eos=True)
NEW = 12  # tokens per healthy sequence


class Injected(RuntimeError):
    """The failure a test plants in one sequence."""


def _events(sink: queue.Queue) -> list[Event]:
    """Every event of one single-sequence request, up to its last."""
    out = []
    while True:
        out.append(sink.get(timeout=60))
        if out[-1].finish_reason is not None:
            return out


def _tokens(events: list[Event]) -> list[int]:
    return [e.token for e in events if e.token is not None]


@pytest.fixture(scope="module")
def alone(tiny_loaded: tuple) -> dict[int, list[int]]:
    """generate()'s greedy continuation of each prompt, by prompt number."""
    model, tokenizer = tiny_loaded
    out = {}
    for i, text in enumerate(PROMPTS):
        prompt = torch.tensor([tokenizer.encode(text)])
        ids = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        out[i] = ids[0, prompt.shape[1] :].tolist()
    return out


@pytest.fixture
def engine(tiny_loaded: tuple) -> Iterator[Engine]:
    """Not started: a test submits its requests first, so that they share their steps."""
    model, tokenizer = tiny_loaded
    engine = Engine(model, tokenizer, max_batch=3, max_queue=16, max_model_len=96)
    yield engine
    engine.shutdown(0)


def _after(count: int, fail: Callable, passthrough: Callable) -> Callable:
    """``passthrough``, but ``fail`` (which raises, or changes something) first at the ``count``-th call."""
    calls = [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            fail(*args, **kwargs)
        return passthrough(*args, **kwargs)

    return call


def _raise(*_args, **_kwargs) -> None:
    raise Injected("planted failure")


class _Wrapped:
    """``inner`` with one method replaced."""

    def __init__(self, inner: object, name: str, method: Callable) -> None:
        self._inner = inner
        setattr(self, name, method)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _plant_sampler(seq: SequenceState, at: int) -> None:
    # A failing processor: the penalties and filters run there (the greedy argmax of the step is
    # not used for a sampler with processors).
    seq.sampler = Sampler([_after(at, _raise, lambda ids, scores: scores)], seq.sampler.pick)


def _plant_detokenizer(seq: SequenceState, at: int) -> None:
    seq.detokenizer = _Wrapped(seq.detokenizer, "add_token", _after(at, _raise, seq.detokenizer.add_token))


def _plant_stops(seq: SequenceState, at: int) -> None:
    seq.stops = _Wrapped(seq.stops, "feed", _after(at, _raise, seq.stops.feed))


def _plant_finalize(seq: SequenceState, at: int) -> None:
    seq.detokenizer = _Wrapped(seq.detokenizer, "finalize", _raise)


def _plant_sink(seq: SequenceState, at: int) -> None:
    seq.request.sink = _after(at, _raise, seq.request.sink)


def _plant_logprobs(seq: SequenceState, at: int) -> None:
    # From the at-th token on, the request asks for more top log-probabilities than the vocabulary
    # has (past check_params): torch's topk raises while this sequence's scores are built.
    def ask_too_many(*_args) -> None:
        seq.request.params.logprobs = 10**6

    seq.sampler = Sampler([_after(at, ask_too_many, lambda ids, scores: scores)], seq.sampler.pick)


PLANTED = "Injected: planted failure"
PLANTS = {
    "sampler at the first token (prefill)": (_plant_sampler, 1, PLANTED),
    "sampler at the 5th token": (_plant_sampler, 5, PLANTED),
    "top logprobs at the 4th token": (_plant_logprobs, 4, "RuntimeError: selected index k out of range"),
    "detokenizer at the 1st token": (_plant_detokenizer, 1, PLANTED),
    "detokenizer at the 6th token": (_plant_detokenizer, 6, PLANTED),
    "stop check at the 3rd token": (_plant_stops, 3, PLANTED),
    "held text at the end": (_plant_finalize, 0, PLANTED),
    "sink at the 4th event": (_plant_sink, 4, PLANTED),
    "sink at the prompt's scores (prefill)": (
        _plant_sink,
        1,
        PLANTED,
        dict(logprobs=0, prompt_logprobs=True),
    ),
}


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_a_failure_in_one_sequence_fails_it_alone(
    plant: tuple, engine: Engine, tiny_loaded: tuple, alone: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = tiny_loaded
    planter, at, message, *extra = plant
    poisoned = SamplingParams(max_tokens=8, temperature=0.7, seed=5, ignore_eos=True, **(extra or [{}])[0])
    make = engine_module.new_sequence

    def new_sequence(request, *args):
        seq = make(request, *args)
        if request.params is poisoned:
            planter(seq, at)
        return seq

    monkeypatch.setattr(engine_module, "new_sequence", new_sequence)
    sinks = [queue.Queue() for _ in range(3)]
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    engine.submit([prompts[0]], SamplingParams(max_tokens=NEW, **GREEDY), sinks[0].put)
    engine.submit([prompts[1]], poisoned, sinks[1].put)  # shares every step with the two others
    engine.submit([prompts[2]], SamplingParams(max_tokens=NEW, **GREEDY), sinks[2].put)
    engine.start()
    results = [_events(sink) for sink in sinks]
    failed = results[1][-1]
    assert failed.finish_reason == "error" and failed.error == message
    for i in (0, 2):
        assert _tokens(results[i]) == alone[i] and results[i][-1].finish_reason == "length"
    assert engine.pool.used == 0
    # the engine goes on: a new request (into a slot a failure freed) is served as generate() alone
    again: queue.Queue = queue.Queue()
    engine.submit([tokenizer.encode(PROMPTS[3])], SamplingParams(max_tokens=NEW, **GREEDY), again.put)
    assert _tokens(_events(again)) == alone[3]
    assert engine.pool.used == 0


def test_a_failing_decoding_step_fails_its_rows_and_the_engine_goes_on(
    engine: Engine, tiny_loaded: tuple, alone: dict
) -> None:
    _, tokenizer = tiny_loaded
    engine.step = _after(3, _raise, engine.step)  # the third batched forward raises
    sinks = [queue.Queue() for _ in range(3)]
    for prompt, sink in zip(PROMPTS[:3], sinks, strict=True):
        engine.submit([tokenizer.encode(prompt)], SamplingParams(max_tokens=NEW, **GREEDY), sink.put)
    engine.start()
    for i, sink in enumerate(sinks):
        events = _events(sink)
        assert events[-1].finish_reason == "error"
        assert events[-1].error.startswith("the decoding step failed: Injected")
        assert _tokens(events) == alone[i][:3]  # the prefill's token and two decoding steps
    assert engine.pool.used == 0
    served: queue.Queue = queue.Queue()
    engine.submit([tokenizer.encode(PROMPTS[4])], SamplingParams(max_tokens=NEW, **GREEDY), served.put)
    assert _tokens(_events(served)) == alone[4] and engine.pool.used == 0


def test_max_batch_requests_at_a_tiny_temperature_do_not_wedge_the_engine(
    engine: Engine, tiny_loaded: tuple, alone: dict
) -> None:
    """The report that started it: temperature 1e-40 made the sampler raise inside the step, and the
    failing sequence kept its slot; three of them held every slot. Now it samples the argmax."""
    _, tokenizer = tiny_loaded
    engine.start()
    sinks = [queue.Queue() for _ in range(5)]
    for i, sink in enumerate(sinks):
        cold = SamplingParams(
            max_tokens=NEW, temperature=(1e-40, 1e-30, 5e-324)[i % 3], seed=i, ignore_eos=True
        )
        engine.submit([tokenizer.encode(PROMPTS[i])], cold, sink.put)
    for i, sink in enumerate(sinks):
        events = _events(sink)
        assert events[-1].finish_reason == "length" and _tokens(events) == alone[i]
    assert engine.pool.used == 0


class Fatal(BaseException):
    """Not an Exception: nothing in the engine's loop may catch it, so its thread ends."""


def _fatal(*_args) -> None:
    raise Fatal("out of luck")


def test_a_dead_engine_thread_is_reported_and_answers_what_it_held(
    engine: Engine, tiny_loaded: tuple
) -> None:
    _, tokenizer = tiny_loaded
    engine.step = _after(2, _fatal, engine.step)
    running: queue.Queue = queue.Queue()
    waiting: queue.Queue = queue.Queue()
    engine.submit(
        [tokenizer.encode(p) for p in PROMPTS[:3]], SamplingParams(max_tokens=NEW, **GREEDY), running.put
    )
    engine.submit([tokenizer.encode(PROMPTS[3])], SamplingParams(max_tokens=NEW, **GREEDY), waiting.put)
    engine.start()
    ends = []
    for sink, count in ((running, 3), (waiting, 1)):
        while len([e for e in ends if e[0] is sink]) < count:
            event = sink.get(timeout=60)
            if event.finish_reason is not None:
                ends.append((sink, event))
    for _, event in ends:
        assert event.finish_reason == "error" and event.error == "the engine stopped: Fatal: out of luck"
    deadline = time.monotonic() + 10
    while engine.alive and time.monotonic() < deadline:  # the last events precede the thread's end
        time.sleep(0.01)
    assert not engine.alive and engine.stalled_for() == math.inf and engine.pool.used == 0
    with pytest.raises(EngineClosed, match="the engine has stopped: Fatal: out of luck"):
        engine.submit([[5]], SamplingParams(max_tokens=1), lambda e: None)


def test_stalled_for_counts_while_a_step_hangs_and_is_zero_when_idle(
    engine: Engine, tiny_loaded: tuple
) -> None:
    _, tokenizer = tiny_loaded
    release, entered = threading.Event(), threading.Event()
    step = engine.step

    def hanging(*args):
        entered.set()
        release.wait(60)
        return step(*args)

    engine.step = hanging
    engine.start()
    assert engine.stalled_for() == 0.0 and engine.alive  # idle
    sink: queue.Queue = queue.Queue()
    engine.submit([tokenizer.encode(PROMPTS[0])], SamplingParams(max_tokens=2, **GREEDY), sink.put)
    assert entered.wait(60)
    time.sleep(0.3)
    stalled = engine.stalled_for()
    assert stalled >= 0.3  # no step has ended since the request arrived
    release.set()
    assert _events(sink)[-1].finish_reason == "length"
    deadline = time.monotonic() + 10
    while engine.pool.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stalled_for() == 0.0 and engine.alive
