"""The HTTP server, driven by clients no one here wrote: the official ``openai`` client (completions,
chat, streaming with usage, logprobs, errors), raw HTTP for what the client does not send (oversized
or broken bodies, a missing key), Prometheus metrics, the tokenizer endpoints, and lm-eval's
``local-completions`` model pointed at the server, whose loglikelihoods must equal neoxja's
in-process lm-eval model's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import SERVING_PROMPTS as PROMPTS
from server_helpers import Gate, Served, connect, http_request, wait_until

from neoxja.serving.app import ServerConfig, create_app

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tiny_loaded: tuple) -> Iterator[Served]:
    config = ServerConfig(
        served_model_name=NAME, max_batch=4, max_queue=64, max_model_len=256, max_body_bytes=4096
    )
    server = Served(create_app(lambda: tiny_loaded, config))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_completions_with_the_openai_client_equal_generate(client: openai.OpenAI, tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
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


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, tiny_loaded: tuple) -> None:
    model, tokenizer = tiny_loaded
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


def test_errors_have_openais_shape_and_status(client: openai.OpenAI, served: Served) -> None:
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


def test_a_custom_chat_template_and_its_refusals(tiny_loaded: tuple, tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}"
        "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    )
    config = ServerConfig(served_model_name=NAME, max_batch=2, max_model_len=128, chat_template=template)
    served = Served(create_app(lambda: tiny_loaded, config))
    try:
        served.wait_ready()
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no system messages here"):
            client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "x"}])
        user = [{"role": "user", "content": "こんにちは"}]
        tokens = httpx.post(served.url + "/tokenize", json={"messages": user}).json()["tokens"]
        assert tokens == tiny_loaded[1].encode("Q: こんにちは\nA:")
        out = client.chat.completions.create(model=NAME, messages=user, max_tokens=3, temperature=0)
        assert out.usage.prompt_tokens == len(tokens)
        assert httpx.get(served.url + "/tokenizer_info").json()["chat_template"] == template
    finally:
        served.stop()


def test_the_tokenizers_own_chat_template_is_served(tiny_loaded: tuple) -> None:
    # A tokenizer with its own template (tokenizer_config.json's chat_template): the server renders
    # chat prompts with it, as `neoxja chat` and apply_chat_template do, and adds no default stops.
    import copy

    model, tokenizer = tiny_loaded
    own = copy.copy(tokenizer)
    own.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    served = Served(create_app(lambda: (model, own), ServerConfig(served_model_name=NAME, max_model_len=128)))
    try:
        served.wait_ready()
        user = [{"role": "user", "content": "こんにちは"}]
        tokens = httpx.post(served.url + "/tokenize", json={"messages": user}).json()["tokens"]
        assert tokens == own.apply_chat_template(user, add_generation_prompt=True)
        assert tokens == tokenizer.encode("<user>こんにちは<assistant>")
        assert httpx.get(served.url + "/tokenizer_info").json()["chat_template"] == own.chat_template
        assert served.app_server.chat_stops == []
    finally:
        served.stop()


def test_models_health_metrics_and_tokenizer_endpoints(
    client: openai.OpenAI, served: Served, tiny_loaded: tuple
) -> None:
    _, tokenizer = tiny_loaded
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


def test_retrieve_model_by_id_and_404_for_another(tiny_loaded: tuple) -> None:
    """OpenAI's GET /v1/models/{id}: the card of the served name (which may hold a slash, as Hub ids
    do), a 404 in OpenAI's error shape for any other id."""
    name = "abeja/gpt-neox-japanese-2.7b"
    served = Served(create_app(lambda: tiny_loaded, ServerConfig(served_model_name=name, max_model_len=128)))
    try:
        served.wait_ready()
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        card = client.models.retrieve(name)
        assert (card.id, card.object, card.owned_by) == (name, "model", "neoxja")
        assert card.model_dump() == client.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as raised:
            client.models.retrieve("tiny")
        assert raised.value.body["code"] == "model_not_found" and "'tiny' does not exist" in str(raised.value)
        response = httpx.get(served.url + "/v1/models/abeja/other")
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        served.stop()


def test_a_client_that_goes_away_is_cancelled(served: Served, tiny_loaded: tuple) -> None:
    """A stream whose client closes after its first chunk, and a whole answer whose client closes
    while it waits, are cancelled before the engine runs them to their end. The engine is held by a
    gate, so the requests cannot finish first, whatever the machine's speed."""
    engine = served.app_server.engine
    cancelled = "neoxja_requests_cancelled_total"
    before, tokens = served.metric(cancelled), served.metric("neoxja_generation_tokens_total")
    gate = Gate(engine, tiny_loaded[1].encode(PROMPTS[1]), 256)
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}) as response:
            gate.step()  # the step that prefills the stream's prompt: its first token
            assert next(response.iter_lines()).startswith("data: ")
        steps = 0
        while served.metric(cancelled) == before:  # each step writes a chunk to the closed socket
            assert steps < 100, "the stream was not cancelled"
            gate.step()
            steps += 1
            time.sleep(0.05)
        # The whole answer: sent, then the client closes its socket before any step ran the request.
        sock = connect(served.port)
        sock.sendall(http_request("/v1/completions", body))
        wait_until(lambda: engine.queue_depth == 1, "the request to be queued")
        sock.close()
        wait_until(lambda: served.metric(cancelled) == before + 2, "the whole answer to be cancelled")
    finally:
        gate.open()
    wait_until(lambda: engine.pool.used == 0, "the slots to be freed")
    assert served.metric("neoxja_generation_tokens_total") - tokens < 100  # not 240, nor 480


def test_api_key_loading_queue_full_and_draining(tiny_loaded: tuple) -> None:
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_loaded

    config = ServerConfig(
        served_model_name=NAME, api_key="sekret", max_batch=1, max_queue=1, max_model_len=256
    )
    served = Served(create_app(slow_load, config))
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
    served: Served, tiny_checkpoint: Path, tmp_path: Path
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
