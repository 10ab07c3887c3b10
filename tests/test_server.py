"""The serving engine (continuous batching) and the HTTP server, driven by clients no one here wrote.

Engine: batching never changes a result (greedy tokens equal ``generate()`` alone, bit-identical
logits on the C step; a seeded sampled request equals itself alone and ``generate(seed=...)``),
chunked prefill, cancellation, caps. Server: the official ``openai`` client (completions, chat,
streaming with usage, logprobs, errors), raw HTTP for what the client does not send (oversized or
broken bodies, a missing key), Prometheus metrics, the tokenizer endpoints, and lm-eval's
``local-completions`` model pointed at the server, whose loglikelihoods must equal neoxja's
in-process lm-eval model's.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer
from neoxja.serving.app import ServerConfig, create_app
from neoxja.serving.engine import Engine, Event, QueueFull, SamplingParams, StopMatcher
from neoxja.serving.slots import FusedSlotStep, TorchSlotStep

PROMPTS = [
    "吾輩は猫である。名前はまだ無い。",
    "今日はいい天気ですね",
    "人とAIが協調するためには、",
    "東京",
    "むかしむかし",
]
NAME = "tiny"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> tuple[GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer]:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint).eval()
    return model, GPTNeoXJapaneseTokenizer.from_pretrained(tiny_checkpoint)


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
def engine(loaded: tuple) -> Iterator[Engine]:
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=3, max_queue=16, max_model_len=128)
    engine.start()
    yield engine
    engine.shutdown(0)


# ---------------------------------------------------------------------- engine


def test_greedy_in_a_crowd_equals_generate_alone(engine: Engine, loaded: tuple) -> None:
    model, tokenizer = loaded
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


def test_the_c_step_gives_each_row_the_logits_of_a_batch_of_one(loaded: tuple) -> None:
    """Bit for bit: what makes batching unable to change a greedy or seeded result."""
    model, tokenizer = loaded
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


def test_the_c_step_refuses_rows_it_cannot_place(loaded: tuple) -> None:
    model, tokenizer = loaded
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


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(engine: Engine, loaded: tuple) -> None:
    model, tokenizer = loaded
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


def test_the_pytorch_step_decodes_as_generate(loaded: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOXJA_FUSED_DECODE", "0")  # the step every other model (dtype, device) takes
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=96)
    assert isinstance(engine.step, TorchSlotStep)
    engine.start()
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
        results = _run(
            engine, [(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
        )
    finally:
        engine.shutdown(0)
    for prompt, (tokens, _, _) in zip(prompts, results, strict=True):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert tokens == alone[0, len(prompt) :].tolist()


def test_a_quantized_model_is_served(tiny_checkpoint: Path, loaded: tuple) -> None:
    _, tokenizer = loaded
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint, weight_format="nf4").eval()
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=96)
    engine.start()
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
        results = _run(
            engine, [(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
        )
    finally:
        engine.shutdown(0)
    for prompt, (tokens, _, _) in zip(prompts, results, strict=True):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert tokens == alone[0, len(prompt) :].tolist()


def test_chunked_prefill_scores_the_prompt_as_one_forward(loaded: tuple) -> None:
    model, tokenizer = loaded
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


def test_a_long_prompt_does_not_stall_the_running_streams(loaded: tuple) -> None:
    """With 8-token chunks, a 60-token prompt takes 8 steps to prefill; the running stream gets a
    token at every one of them."""
    model, tokenizer = loaded
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


def test_a_cancelled_request_frees_its_slot_within_a_step(engine: Engine, loaded: tuple) -> None:
    _, tokenizer = loaded
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


def test_a_failing_sink_cancels_its_own_request_only(engine: Engine, loaded: tuple) -> None:
    _, tokenizer = loaded

    def broken(event: Event) -> None:
        raise RuntimeError("the client's queue is gone")

    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine.submit([tokenizer.encode(PROMPTS[0])], params, broken)
    tokens, _, reason = _run(engine, [(tokenizer.encode(PROMPTS[1]), params)])[0]
    assert reason == "length" and len(tokens) == 20
    deadline = time.monotonic() + 10
    while engine.pool.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pool.used == 0


def test_a_full_queue_is_refused(loaded: tuple) -> None:
    model, tokenizer = loaded
    engine = Engine(
        model, tokenizer, max_batch=1, max_queue=2, max_model_len=64
    )  # not started: nothing moves
    params = SamplingParams(max_tokens=4)
    engine.submit([[1, 2], [3, 4]], params, lambda e: None)
    with pytest.raises(QueueFull):
        engine.submit([[5]], params, lambda e: None)
    with pytest.raises(ValueError, match="prompt 0, position 1: 32000 is not a token id"):
        engine.submit([[1, 32000]], params, lambda e: None)
    with pytest.raises(ValueError, match="max_model_len 64"):
        engine.submit([[1] * 60], SamplingParams(max_tokens=8), lambda e: None)


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start() -> None:
    matcher = StopMatcher(["。\n", "END"])
    assert matcher.feed("今日は") == ("今日は", False)
    assert matcher.feed("晴れ。") == ("晴れ", False)  # "。" may start "。\n"
    assert matcher.feed("です") == ("。です", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.feed("Dの後") == ("", True)
    assert StopMatcher(["。"]).feed("一。二。") == ("一", True)


def test_stop_and_eos_end_a_sequence_with_finish_reason_stop(engine: Engine, loaded: tuple) -> None:
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPTS[1])
    tokens, text, _ = _run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])[
        0
    ]
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = full[3:5]
    _, cut, reason = _run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=0, stop=[stop]))])[0]
    assert reason == "stop" and cut == full[: full.index(stop)]
    eos = model.generation_config.eos_ids()[0]
    ends = _run(
        engine, [([*prompt, *tokens[:2]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))]
    )[0]
    assert ends[2] == "length" and len(ends[0]) == 5
    assert eos in engine.eos_ids


# ---------------------------------------------------------------------- HTTP server


class _Served:
    """The app on uvicorn in a thread, on a free loopback port."""

    def __init__(self, app, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        for _ in range(600):
            if httpx.get(self.url + "/health").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(loaded: tuple) -> Iterator[_Served]:
    config = ServerConfig(
        served_model_name=NAME, max_batch=4, max_queue=64, max_model_len=256, max_body_bytes=4096
    )
    server = _Served(create_app(lambda: loaded, config))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def client(served: _Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_completions_with_the_openai_client_equal_generate(client: openai.OpenAI, loaded: tuple) -> None:
    model, tokenizer = loaded
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    out = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=9, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(ids, out.choices, strict=True):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False)[0, len(prompt) :]
        assert choice.text == tokenizer.decode(alone, skip_special_tokens=True)
    assert out.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=9, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in out.choices]
    single = client.completions.create(model=NAME, prompt=ids[0], max_tokens=9, temperature=0)
    assert single.choices[0].text == out.choices[0].text and single.choices[0].finish_reason == "length"


def test_n_seed_and_echo(client: openai.OpenAI) -> None:
    first = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=6, n=3, seed=7, temperature=1.0
    )
    again = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=6, n=3, seed=7, temperature=1.0
    )
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice draws from its own seed
    echoed = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPTS[0])


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, loaded: tuple) -> None:
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPTS[2])
    out = client.completions.create(
        model=NAME, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert (
        len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(logits[i, t]) for i, t in enumerate(ids[1:])] + [float(logits[-1].max())]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert all(len(top) >= 2 and max(top.values()) <= 0 for top in lp.top_logprobs[1:])
    assert lp.tokens[:2] == tokenizer.convert_ids_to_tokens(ids[:2])


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPTS[3],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("logprobs", [None, 1])
def test_an_echoed_stream_equals_the_whole_answer(client: openai.OpenAI, logprobs: int | None) -> None:
    settings = dict(model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True, logprobs=logprobs)
    whole = client.completions.create(**settings).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**settings, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    if logprobs is not None:
        streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
        assert streamed == whole.logprobs.token_logprobs


def test_chat_with_logprobs_and_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "丁寧に答えます。"}, {"role": "user", "content": "こんにちは"}]
    out = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in content)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    pieces = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == choice.message.content


def test_errors_have_openais_shape_and_status(client: openai.OpenAI, served: _Served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="position 1"):
        client.completions.create(model=NAME, prompt=[5, 10**9], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model=NAME, prompt="x", stop=[str(i) for i in range(9)])
    with pytest.raises(openai.NotFoundError, match="other-model"):
        client.completions.create(model="other-model", prompt="x")
    response = httpx.post(served.url + "/v1/completions", content=b'{"prompt": "x"')
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.post(served.url + "/v1/completions", json={"prompt": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.get(served.url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_a_request_larger_than_the_queue_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="72 sequences"):  # never satisfiable: not a 429
        client.completions.create(model=NAME, prompt=PROMPTS[:1] * 9, n=8, max_tokens=1)


def test_a_custom_chat_template_and_its_refusals(loaded: tuple, tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}"
        "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    )
    config = ServerConfig(served_model_name=NAME, max_batch=2, max_model_len=128, chat_template=template)
    served = _Served(create_app(lambda: loaded, config))
    try:
        served.wait_ready()
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no system messages here"):
            client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "x"}])
        user = [{"role": "user", "content": "こんにちは"}]
        tokens = httpx.post(served.url + "/tokenize", json={"messages": user}).json()["tokens"]
        assert tokens == loaded[1].encode("Q: こんにちは\nA:")
        out = client.chat.completions.create(model=NAME, messages=user, max_tokens=3, temperature=0)
        assert out.usage.prompt_tokens == len(tokens)
        assert httpx.get(served.url + "/tokenizer_info").json()["chat_template"] == template
    finally:
        served.stop()


def test_models_health_metrics_and_tokenizer_endpoints(
    client: openai.OpenAI, served: _Served, loaded: tuple
) -> None:
    _, tokenizer = loaded
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    tokens = httpx.post(served.url + "/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert tokens["tokens"] == tokenizer.encode(PROMPTS[0]) and tokens["count"] == len(tokens["tokens"])
    text = httpx.post(served.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == tokenizer.decode(tokens["tokens"])
    assert httpx.post(served.url + "/detokenize", json={"tokens": [-1]}).status_code == 400
    client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    metrics = httpx.get(served.url + "/metrics").text
    for name in (
        'neoxja_requests_total{endpoint="/v1/completions",status="200"}',
        "neoxja_generation_tokens_total",
        "neoxja_time_to_first_token_seconds_bucket",
        "neoxja_inter_token_latency_seconds_bucket",
        "neoxja_kv_slots_used 0.0",
        "neoxja_kv_slots_total 4.0",
        "neoxja_queue_depth 0.0",
    ):
        assert name in metrics, name


def test_a_client_that_goes_away_is_cancelled(served: _Served) -> None:
    app_server = served.server.config.app.state.server if hasattr(served.server.config.app, "state") else None
    body = {"prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    engine = app_server.engine
    while engine.pool.used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pool.used == 0
    assert engine.steps < 1000
    assert "neoxja_requests_cancelled_total 1.0" in httpx.get(served.url + "/metrics").text
    # A whole (not streamed) answer that the client stops waiting for: cancelled as well.
    body = {**body, "stream": False, "max_tokens": 240}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.05))
    deadline = time.monotonic() + 10
    while "neoxja_requests_cancelled_total 2.0" not in httpx.get(served.url + "/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.pool.used == 0


def test_api_key_loading_queue_full_and_draining(loaded: tuple) -> None:
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return loaded

    config = ServerConfig(
        served_model_name=NAME, api_key="sekret", max_batch=1, max_queue=1, max_model_len=256
    )
    served = _Served(create_app(slow_load, config))
    try:
        loading = httpx.get(served.url + "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="sekret", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=NAME, prompt="x")
        assert err.value.status_code == 503
        release.set()
        served.wait_ready()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(served.url + "/v1/models").status_code == 401
        # One slot, one place in the queue: of six requests sent at once, one decodes, one waits, and
        # the others are refused until those two are done (each takes 150 steps).
        long = {"prompt": PROMPTS[0], "max_tokens": 150, "temperature": 0, "ignore_eos": True}

        async def crowd() -> list[httpx.Response]:
            headers = {"Authorization": "Bearer sekret"}
            async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=60) as http:
                return await asyncio.gather(*(http.post("/v1/completions", json=long) for _ in range(6)))

        responses = asyncio.run(crowd())
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(r.status_code == 200 for r in responses if r not in refused)
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
        served.server.config.app.state.server.drain()  # what SIGTERM does first (neoxja serve)
        draining = httpx.post(
            served.url + "/v1/completions", json=long, headers={"Authorization": "Bearer sekret"}
        )
        assert draining.status_code == 503 and "shutting down" in draining.json()["error"]["message"]
        assert httpx.get(served.url + "/health").json() == {"status": "draining"}
    finally:
        release.set()
        served.stop()


def test_lm_eval_local_completions_scores_as_the_in_process_model(
    served: _Served, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from neoxja.evaluation.harness import NeoXJaLM

    docs = [
        {"question": "日本の首都は?", "choices": ["東京", "大阪", "京都"], "label": 0},
        {"question": "猫の鳴き声は?", "choices": ["ワン", "ニャー"], "label": 1},
        {"question": "一番大きい数は?", "choices": ["一", "十", "百", "千"], "label": 3},
    ]
    (tmp_path / "mc.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    (tmp_path / "mc.yaml").write_text(
        "task: neoxja_server_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(tmp_path / 'mc.jsonl'))}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "質問: {{question}}\\n答え:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    remote = lm_eval.api.registry.get_model("local-completions")(
        base_url=served.url + "/v1/completions",
        model=NAME,
        tokenized_requests=True,
        tokenizer_backend="remote",
        max_retries=1,
    )
    assert type(remote.tokenizer).__name__ == "RemoteTokenizer"  # our /tokenize, not a Hub download
    common = {"tasks": ["neoxja_server_mc"], "task_manager": manager, "log_samples": True}
    served_run = lm_eval.simple_evaluate(model=remote, **common)
    local_run = lm_eval.simple_evaluate(
        model=NeoXJaLM(pretrained=str(tiny_checkpoint), device="cpu"), **common
    )
    got = [s["resps"] for s in served_run["samples"]["neoxja_server_mc"]]
    expected = [s["resps"] for s in local_run["samples"]["neoxja_server_mc"]]
    assert len(got) == len(docs)
    for served_resps, local_resps in zip(got, expected, strict=True):
        for (served_ll, served_greedy), (local_ll, local_greedy) in zip(
            [r[0] for r in served_resps], [r[0] for r in local_resps], strict=True
        ):
            assert float(served_ll) == pytest.approx(float(local_ll), abs=1e-4)
            assert served_greedy == local_greedy
    assert (
        served_run["results"]["neoxja_server_mc"]["acc,none"]
        == local_run["results"]["neoxja_server_mc"]["acc,none"]
    )
