"""``neoxja serve`` as a process on 127.0.0.1 (a tiny random model), at the edges of its resources:
connections to the cap and past it with idle and slow clients, running out of file descriptors,
poisoned requests among normal ones, and SIGTERM at several moments of its life. Each time a normal
client must still get its exact completions, and the log must stay a few lines."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from conftest import SERVING_PROMPTS as PROMPTS
from server_helpers import HANG, connect, http_request, parse_responses, read_to_end, wait_until

NAME = "tiny"


class Process:
    """A ``neoxja serve`` process; its stderr (the log) goes to a file."""

    def __init__(self, model: Path, log: Path, flags: list[str], files: int | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "neoxja", "serve", "--model", str(model), "--port", str(self.port)]
        command += ["--served-model-name", NAME, "--max-model-len", "2048", *flags]

        def limit_files() -> None:
            if files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                command, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limit_files
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, what: str) -> None:
        wait_until(lambda: what in self.text() or self.proc.poll() is not None, f"{what!r} in the log")
        assert what in self.text(), self.text()

    def wait_ready(self) -> None:
        self.wait_log("serving tiny")

    def metrics(self) -> dict[str, float]:
        lines = httpx.get(self.url + "/metrics").text.splitlines()
        return {
            k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if not line.startswith("#"))
        }

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(HANG)


@contextmanager
def serving(
    model: Path, log: Path, *flags: str, files: int | None = None, ready: bool = True
) -> Iterator[Process]:
    process = Process(model, log, list(flags), files)
    try:
        if ready:
            process.wait_ready()
        yield process
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


@pytest.fixture(scope="module")
def expected(tiny_loaded: tuple) -> dict[str, str]:
    """Greedy 12-token completions of the prompts, by generate() in this process."""
    model, tokenizer = tiny_loaded
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        new = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
        out[prompt] = tokenizer.decode(new, skip_special_tokens=True)
    return out


def _complete(http: httpx.Client, prompt: str) -> str:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_connections_to_the_cap_and_past_it(tiny_checkpoint: Path, tmp_path: Path, expected: dict) -> None:
    """Idle and trickling connections fill the cap; the ones past it get 503 at once; a normal client
    (already connected) gets its completions all along; the idle and slow ones are closed at the head
    deadline, and then new connections are served again."""
    flags = ["--max-connections", "12", "--timeout-header", "2", "--timeout-keep-alive", "30"]
    with (
        serving(tiny_checkpoint, tmp_path / "log", *flags) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        assert _complete(http, PROMPTS[0]) == expected[PROMPTS[0]]  # its connection is now open
        before = _sockets(server.proc.pid)
        idle = [connect(server.port) for _ in range(6)]
        slow = [connect(server.port) for _ in range(5)]
        stop = threading.Event()

        def trickle() -> None:  # a byte per socket every 50 ms, until each is closed
            head = http_request("/v1/completions", {"prompt": "x" * 500})
            for i in range(len(head)):
                for sock in slow:
                    try:
                        sock.send(head[i : i + 1])
                    except OSError:
                        pass
                if stop.wait(0.05):
                    return

        trickler = threading.Thread(target=trickle)
        trickler.start()
        try:
            wait_until(lambda: _sockets(server.proc.pid) == before + 11, "the cap to be reached")
            for _ in range(4):  # past the cap: refused at once, in OpenAI's JSON shape
                sock = connect(server.port)
                sock.sendall(http_request("/v1/completions", {"model": NAME, "prompt": "x"}))
                [(status, headers, body)] = parse_responses(read_to_end(sock))
                assert status == 503 and headers["connection"] == "close"
                assert json.loads(body)["error"]["code"] == "too_many_connections"
            for prompt in PROMPTS[1:]:
                assert _complete(http, prompt) == expected[prompt]
            assert all(read_to_end(sock) == b"" for sock in idle)  # closed at the head deadline
            assert all(parse_responses(read_to_end(sock))[0][0] == 408 for sock in slow)
        finally:
            stop.set()
            trickler.join()
        with httpx.Client(base_url=server.url) as fresh:
            assert _complete(fresh, PROMPTS[0]) == expected[PROMPTS[0]]
        assert server.terminate() == 0
    log = _not_requests(server.text())
    assert sum("past --max-connections 12: 503" in line for line in log) <= 2  # counted, not a line each
    assert len(log) < 15 and "Traceback" not in server.text()


def _not_requests(log: str) -> list[str]:
    """The log's lines other than the one per request."""
    return [line for line in log.splitlines() if not re.search(r"neoxja.server: (GET|POST) /", line)]


def _sockets(pid: int) -> int:
    """The sockets the process has open."""
    return sum(
        os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd")
    )


def test_out_of_file_descriptors_the_log_stays_small_and_open_connections_are_served(
    tiny_checkpoint: Path, tmp_path: Path, expected: dict
) -> None:
    """With RLIMIT_NOFILE at 48, 80 idle connections exhaust the descriptors: accept() fails with
    EMFILE thousands of times a second. The log gets one line for it (per 10 s), the memory stays
    flat, the client that was connected before is served, and once the idle ones go, new ones are."""
    flags = ["--max-connections", "16", "--timeout-header", "60", "--timeout-keep-alive", "60"]
    with serving(tiny_checkpoint, tmp_path / "log", *flags, files=48) as server:
        with httpx.Client(base_url=server.url) as http:
            assert _complete(http, PROMPTS[0]) == expected[PROMPTS[0]]
            rss = server.rss()
            flood = [connect(server.port) for _ in range(80)]  # the kernel queues what is not accepted
            server.wait_log("cannot accept connections")
            started = time.monotonic()
            for prompt in PROMPTS[1:] * 4:
                assert _complete(http, prompt) == expected[prompt]
            while time.monotonic() - started < 1.5:  # EMFILE, and asyncio's retry every second
                assert _complete(http, PROMPTS[0]) == expected[PROMPTS[0]]
            assert server.rss() - rss < 64 << 20
            assert server.text().count("cannot accept connections") <= 2  # one per 10 s
        for sock in flood:
            sock.close()
        wait_until(lambda: _answers(server.url), "new connections to be served again")
        assert server.terminate() == 0
    log = server.text()
    assert "Too many open files" in log and "Traceback" not in log and len(_not_requests(log)) < 15


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


POISONS = [  # each at the edge of what is accepted, or past it (a 400 naming the field)
    {"temperature": 1e-40},
    {"temperature": 2.0, "top_p": 1e-30},
    {"temperature": 1e-30, "min_p": 1.0},
    {"repetition_penalty": 0.01, "temperature": 0.5},
    {"repetition_penalty": 10.0, "frequency_penalty": 2.0, "presence_penalty": -2.0},
    {"temperature": 1e-40, "logprobs": 20, "echo": True},
    {"temperature": float("1e-320")},
    {"top_k": 1, "temperature": 1e-38, "seed": 2**62},
    {"temperature": float("nan")},
    {"top_p": 0.0},
    {"logprobs": 21},
]


def test_poisoned_requests_among_normal_ones_then_sigterm_cuts_a_stream(
    tiny_checkpoint: Path, tmp_path: Path, expected: dict
) -> None:
    """Requests at the edges of the sampling fields, sent among normal ones into the same batch: each
    gets a 400 naming its field or an answer; the normal ones get their exact completions; no request
    fails another, and the slots are all free at the end. Then eight sequences of 2000 tokens, which
    cannot finish in the half-second drain: after SIGTERM a newcomer gets 503 (not a refused
    connection), the stream ends with an error event and [DONE], and the process exits 0."""
    with serving(tiny_checkpoint, tmp_path / "log", "--max-batch", "4", "--drain-timeout", "0.5") as server:

        async def crowd() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=HANG) as http:
                poisoned = [  # json.dumps writes NaN, as some clients do
                    http.post(
                        "/v1/completions",
                        content=json.dumps({"prompt": PROMPTS[i % 5], "max_tokens": 24, **f}),
                    )
                    for i, f in enumerate(POISONS)
                ]
                normal = [
                    http.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0})
                    for p in PROMPTS * 2
                ]
                return await asyncio.gather(*poisoned, *normal)

        answers = asyncio.run(crowd())
        poisoned, normal = answers[: len(POISONS)], answers[len(POISONS) :]
        for fields, response in zip(POISONS, poisoned, strict=True):
            assert response.status_code in (200, 400), (fields, response.text)
            if response.status_code == 400:
                assert response.json()["error"]["param"] in fields, response.text
        assert [r.status_code for r in poisoned[-3:]] == [400] * 3
        assert [r.json()["choices"][0]["text"] for r in normal] == [expected[p] for p in PROMPTS * 2]
        wait_until(lambda: server.metrics()["neoxja_kv_slots_used"] == 0, "the slots to be freed")
        assert server.metrics()["neoxja_queue_depth"] == 0

        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 2000, "n": 8, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, "the drain to start")
            late = httpx.get(server.url + "/v1/models")
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
            rest = [line for line in lines if line.startswith("data: ")]
        assert server.proc.wait(HANG) == 0
    assert rest[-1] == "data: [DONE]"
    assert "drain timeout" in json.loads(rest[-2][6:])["error"]["message"]


def _sigterm_exits_0(server: Process) -> None:
    assert server.terminate() == 0, server.text()
    assert "Traceback" not in server.text()


def test_sigterm_at_several_moments_exits_0(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # While Python imports the server's modules: as soon as the process catches SIGTERM at all.
    with serving(tiny_checkpoint, tmp_path / "1", ready=False) as server:
        wait_until(lambda: _catches_sigterm(server.proc.pid), "a SIGTERM handler")
        _sigterm_exits_0(server)
    # Once the server runs, while the model loads. (Ready, idle or busy: the other tests.)
    with serving(tiny_checkpoint, tmp_path / "2", ready=False) as server:
        server.wait_log("listening on")
        _sigterm_exits_0(server)


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"SigCgt:\s+([0-9a-f]+)", status).group(1), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))
