"""What the server tests share: the app served in a thread as ``neoxja serve`` serves it, a gate that
holds the engine's thread (so a test decides how many steps it makes, instead of racing it), and raw
HTTP/1.1 over a socket (for what an HTTP client library will not do: trickle, half-close, idle)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Any

import httpx

from neoxja.serving.connections import ConnectionLimits
from neoxja.serving.engine import SamplingParams
from neoxja.serving.process import HTTPServer, listen

HANG = 20.0  # seconds after which a wait is a failure (a hang), never a measure of speed


class Served:
    """An app on :class:`HTTPServer` in a thread, on a free loopback port."""

    def __init__(self, app: Any, limits: ConnectionLimits | None = None, drain_timeout: float = 30.0) -> None:
        self.server = HTTPServer(app, listen("127.0.0.1", 0), limits or ConnectionLimits(), drain_timeout)
        self.app_server = app.state.server
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "the server to start")
        self.port = self.server.listeners[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        wait_until(lambda: httpx.get(self.url + "/health").status_code == 200, "the model to load")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def metric(self, name: str) -> float:
        """The value of the metric line ``name`` (with its labels) in ``/metrics``."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"no metric {name}")


def wait_until(condition: Any, what: str, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Gate:
    """Holds the engine: a request submitted straight to it whose sink waits for a permit at each of
    its events. It decodes first in every step, so each :meth:`step` lets the engine finish the step
    it is in (the other sequences' tokens) and make one more (new prompts prefilled, first tokens)."""

    def __init__(self, engine: Any, prompt: list[int], max_model_len: int) -> None:
        self.engine = engine
        self.permits, self.arrived = threading.Semaphore(0), threading.Semaphore(0)
        self.opened = False
        params = SamplingParams(max_tokens=max_model_len - len(prompt), temperature=0, ignore_eos=True)
        self.handle = engine.submit([prompt], params, self._sink)
        self._held()  # at its prefill's token
        self.step()  # now at its first decoding step's token: the end of an engine step

    def _sink(self, event: Any) -> None:
        if not self.opened:
            self.arrived.release()
            self.permits.acquire()

    def _held(self) -> None:
        assert self.arrived.acquire(timeout=HANG), "the engine did not reach the gate"

    def step(self) -> None:
        """One more engine step; returns when the engine is held again."""
        self.permits.release()
        self._held()

    def open(self) -> None:
        """Let the engine run freely, and end the holding request."""
        self.opened = True
        self.permits.release()
        self.engine.cancel(self.handle)


def http_request(path: str, body: Any = None, method: str = "POST", extra: str = "") -> bytes:
    """One HTTP/1.1 request's bytes; ``extra``: more header lines, each ending in CRLF."""
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(data)}\r\n{extra}\r\n".encode() + data


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=HANG)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """``(status, headers, body)`` of each response in ``data`` (bodies by Content-Length)."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(re.match(r"HTTP/1\.1 (\d{3})", lines[0]).group(1))
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        out.append((status, headers, data[:length]))
        data = data[length:]
    return out
