"""The server at the edges of its resources, in a thread as ``neoxja serve`` runs it: deadlines for
heads and bodies, half-closed clients, what reaches the log, ``/health`` while big requests are being
worked on or the engine is stuck, and the shutdown's drain. Raw sockets do what clients should not;
the engine is held by a gate where a test must not race it."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import SERVING_PROMPTS as PROMPTS
from server_helpers import HANG, Gate, Served, connect, http_request, parse_responses, read_to_end, wait_until

from neoxja.serving.app import ServerConfig, create_app, printable
from neoxja.serving.connections import ConnectionLimits
from neoxja.serving.engine import SamplingParams

NAME = "tiny"
SHORT = 0.5  # seconds: the deadlines of the server under test


@pytest.fixture(scope="module")
def strict(tiny_loaded: tuple) -> Iterator[Served]:
    """A server with half-second deadlines."""
    config = ServerConfig(
        served_model_name=NAME, max_batch=2, max_model_len=256, timeout_body=SHORT, max_work=2000
    )
    limits = ConnectionLimits(timeout_keep_alive=SHORT, timeout_header=SHORT, timeout_body=SHORT)
    served = Served(create_app(lambda: tiny_loaded, config), limits)
    served.wait_ready()
    yield served
    served.stop()


def _greedy(served: Served, prompt: str, max_tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(served.url + "/v1/completions", json=body).json()["choices"][0]["text"]


def test_a_half_closed_client_gets_its_answer(strict: Served) -> None:
    expected = _greedy(strict, PROMPTS[0], 8)
    sock = connect(strict.port)
    sock.sendall(http_request("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}))
    sock.shutdown(socket.SHUT_WR)  # "I have said everything": the answer must still come
    responses = parse_responses(read_to_end(sock))
    assert [status for status, _, _ in responses] == [100, 200]  # the interim one tells it from a close
    assert json.loads(responses[-1][2])["choices"][0]["text"] == expected


def test_a_request_head_must_arrive_in_time(strict: Served) -> None:
    silent = connect(strict.port)  # sends nothing at all
    partial = connect(strict.port)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
    trickled = connect(strict.port)
    head = http_request("/v1/completions", {"prompt": "x" * 200})
    sent = 0
    while not _closed_or_answered(trickled):  # one byte at a time: the deadline does not move
        assert sent < len(head), "the trickled head was taken whole"
        trickled.send(head[sent : sent + 1])
        sent += 1
    assert read_to_end(silent) == b""
    for sock in (partial, trickled):
        [(status, headers, body)] = parse_responses(read_to_end(sock))
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"


def _closed_or_answered(sock: socket.socket) -> bool:
    """Whether the server has answered or closed (waits 50 ms for it)."""
    sock.settimeout(0.05)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return False
    finally:
        sock.settimeout(HANG)
    return True


def test_a_body_must_arrive_in_time_and_an_unread_one_is_not_waited_for(strict: Served) -> None:
    sock = connect(strict.port)
    sock.sendall(http_request("/v1/completions", {"prompt": "x"})[:-4])  # the last bytes never come
    [(status, headers, body)] = parse_responses(read_to_end(sock))
    assert status == 408 and headers["connection"] == "close"
    assert "did not arrive within 0.5 s" in json.loads(body)["error"]["message"]
    # /health answers without reading a body; the rest of it, never sent, is not waited for forever.
    sock = connect(strict.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789")
    [(status, _, body)] = parse_responses(read_to_end(sock))
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_an_idle_kept_alive_connection_is_closed(strict: Served) -> None:
    sock = connect(strict.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
    [(status, headers, _)] = parse_responses(read_to_end(sock))  # ends when the idle timeout closes it
    assert status == 200 and "close" not in headers.get("connection", "")


def test_the_work_budget_is_the_servers(strict: Served) -> None:
    body = {"prompt": [5] * 240, "n": 8, "max_tokens": 11}  # 8 x (240 + 11) positions: 2008
    error = httpx.post(strict.url + "/v1/completions", json=body).json()["error"]
    assert (
        error["param"] == "prompt, n, max_tokens"
        and "more than this server allows one request (2,000)" in error["message"]
    )
    body["max_tokens"] = 10  # 2000
    assert httpx.post(strict.url + "/v1/completions", json=body).status_code == 200


def test_a_deeply_nested_body_is_a_400(strict: Served) -> None:
    nested = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = httpx.post(strict.url + "/v1/completions", content=nested)
    assert response.status_code == 400
    assert "the request body: JSON nested more than 64 levels" in response.json()["error"]["message"]


def test_what_the_client_sent_is_logged_escaped(tiny_loaded: tuple, caplog: pytest.LogCaptureFixture) -> None:
    config = ServerConfig(served_model_name=NAME, max_batch=1, max_model_len=64, api_key="sekret")
    served = Served(create_app(lambda: tiny_loaded, config))
    try:
        served.wait_ready()
        caplog.set_level(logging.INFO, logger="neoxja.server")
        forged = "/v1/models%0A2030-01-01%20INFO%20neoxja.server:%20POST%20/v1/completions%20200%1B[2J"
        sock = connect(served.port)
        sock.sendall(f"GET {forged} HTTP/1.1\r\nHost: test\r\n\r\n".encode())  # unauthenticated: 401
        assert parse_responses(sock.recv(65536))[0][0] == 401
        wait_until(lambda: any("401" in r.getMessage() for r in caplog.records), "the request's log line")
    finally:
        served.stop()
    [line] = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert line.startswith(f"GET {forged} 401") and "\n" not in line and "\x1b" not in line
    assert printable("/x\n\x1b[2J\\") == "/x\\n\\x1b[2J\\\\" and printable("/東京") == "/東京"


class _GatedTokenizer:
    """The tokenizer, whose ``encode`` and ``convert_ids_to_tokens`` wait at a gate when it is shut."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.shut = False
        self.gate, self.entered = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def _wait(self) -> None:
        if self.shut:
            self.entered.set()
            assert self.gate.wait(30)

    def encode(self, text: str) -> list[int]:
        self._wait()
        return self.tokenizer.encode(text)

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        self._wait()
        return self.tokenizer.convert_ids_to_tokens(ids)


def test_health_is_answered_while_a_request_is_tokenized_or_its_answer_built(tiny_loaded: tuple) -> None:
    """Tokenizing a prompt and building an echoed, scored answer grow with the request: they run in
    worker threads. Here they wait at a gate: were they on the event loop, /health would hang too."""
    model, tokenizer = tiny_loaded
    gated = _GatedTokenizer(tokenizer)
    served = Served(
        create_app(lambda: (model, gated), ServerConfig(served_model_name=NAME, max_model_len=64))
    )
    bodies = [{"prompt": PROMPTS[0]}, {"prompt": tokenizer.encode(PROMPTS[0]), "echo": True, "logprobs": 2}]
    try:
        served.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            for body in bodies:
                gated.gate.clear()
                gated.entered.clear()
                gated.shut = True
                url, body = served.url + "/v1/completions", {**body, "max_tokens": 2}
                answer = pool.submit(httpx.post, url, json=body, timeout=30)
                assert gated.entered.wait(30)  # waiting at the gate, in a worker thread
                assert httpx.get(served.url + "/health", timeout=10).json() == {"status": "ok"}
                gated.gate.set()
                assert answer.result(30).status_code == 200
        scored = answer.result().json()["choices"][0]["logprobs"]["token_logprobs"]
        assert len(scored) == len(bodies[1]["prompt"]) + 2 and scored[0] is None
    finally:
        gated.gate.set()
        served.stop()


def test_health_reports_a_stalled_and_a_dead_engine(tiny_loaded: tuple) -> None:
    config = ServerConfig(served_model_name=NAME, max_model_len=64, stall_timeout=SHORT)
    served = Served(create_app(lambda: tiny_loaded, config))
    try:
        served.wait_ready()
        engine = served.app_server.engine
        gate = Gate(engine, tiny_loaded[1].encode(PROMPTS[0]), 64)  # no step ends while it is held
        try:
            wait_until(lambda: httpx.get(served.url + "/health").status_code == 503, "/health to say stalled")
            health = httpx.get(served.url + "/health").json()
            assert health["status"] == "stalled" and health["stalled_for"] > SHORT
        finally:
            gate.open()
        wait_until(lambda: httpx.get(served.url + "/health").status_code == 200, "/health to recover")

        class Fatal(BaseException):
            pass

        def sink(event: Any) -> None:
            if not fatal.is_set():  # once: the engine's wind-down calls it again
                fatal.set()
                raise Fatal("the thread's end")

        fatal = threading.Event()

        engine.submit([[5, 6]], SamplingParams(max_tokens=1), sink)
        wait_until(lambda: httpx.get(served.url + "/health").status_code == 503, "/health to say dead")
        assert httpx.get(served.url + "/health").json()["status"] == "dead"
    finally:
        served.stop()


def test_a_drain_answers_newcomers_503_and_ends_a_cut_stream_properly(
    tiny_loaded: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """After SIGTERM: new requests get 503 (their connections are accepted), and a stream still
    running at the drain timeout ends with an error event and [DONE]. The gate holds the engine so the
    stream cannot finish first."""
    caplog.set_level(logging.WARNING, logger="neoxja.server")
    config = ServerConfig(served_model_name=NAME, max_model_len=256)
    served = Served(create_app(lambda: tiny_loaded, config), drain_timeout=SHORT)
    served.wait_ready()
    gate = Gate(served.app_server.engine, tiny_loaded[1].encode(PROMPTS[1]), 256)
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as response:
            gate.step()
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            served.server.handle_exit(signal.SIGTERM, None)  # what the signal does
            late = httpx.post(served.url + "/v1/completions", json={"prompt": "x"})
            assert late.status_code == 503 and late.headers["connection"] == "close"
            assert httpx.get(served.url + "/health").json() == {"status": "draining"}
            timed_out = lambda: any("drain timeout" in r.getMessage() for r in caplog.records)  # noqa: E731
            wait_until(timed_out, "the drain timeout")
            gate.open()
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        gate.open()
        served.thread.join(60)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["type"] == "service_unavailable" and "drain timeout" in error["message"]
    assert not served.thread.is_alive()


@pytest.mark.parametrize(
    "key", ["", "schlüssel", "two words", "tab\there"], ids=["empty", "umlaut", "space", "tab"]
)
def test_an_api_key_no_client_can_send_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        ServerConfig(served_model_name=NAME, api_key=key)
