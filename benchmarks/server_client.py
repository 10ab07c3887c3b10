"""bench_server.py's client side: server subprocesses (start, readiness, CPU time, RSS, SIGTERM)
and streamed requests measured as a client sees them (time to first token, gaps between tokens)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
MAX_BATCH, MAX_QUEUE, MAX_MODEL_LEN = 32, 4096, 512

# --------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a subprocess, its output in ``log``."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.proc.kill()
        raise SystemExit(f"the server was not ready after {timeout:.0f} s:\n{self.tail()}")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # left early (an error): no drain, no report
            self.proc.kill()
            self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        """VmRSS of the server process, bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, then the exit status (None: killed after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def neoxja_server(path: Path, name: str, logs: Path, extra: tuple[str, ...] = ()) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "neoxja",
        "serve",
        "--model",
        str(path),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(MAX_BATCH),
        "--max-queue",
        str(MAX_QUEUE),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        *extra,
    ]
    return ServerProcess(command, port, logs / f"{name}-neoxja.log")


def baseline_process(path: Path, name: str, logs: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable,
        str(HERE / "server_baseline.py"),
        str(path),
        "--port",
        str(port),
        "--served-model-name",
        name,
    ]
    return ServerProcess(command, port, logs / f"{name}-transformers.log")


# ---------------------------------------------------------------------------------------------- client


@dataclass
class Answer:
    """What the client saw of one request."""

    status: int = 0
    tokens: int = 0  # stream: chunks carrying a token (finish_reason null)
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    usage: dict | None = None
    done: bool = False  # stream: [DONE] came
    error: str | None = None  # an error chunk or body
    body: Any = None  # non-stream: the JSON answer


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict, drop_after: int | None = None
) -> tuple[Answer, bool]:
    """Send a streamed request; (what came, whether the client dropped it after ``drop_after`` chunks)."""
    answer, texts, chunks = Answer(), [], 0
    start = last = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        answer.status = response.status_code
        if response.status_code != 200:
            answer.error = (await response.aread()).decode(errors="replace")[:500]
            return answer, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                answer.done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                answer.error = json.dumps(chunk, ensure_ascii=False)[:500]
                continue
            if chunk.get("usage"):
                answer.usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                texts.append(choice.get("text") or "")
                if choice.get("finish_reason") is None:
                    now = time.perf_counter()
                    if answer.tokens == 0:
                        answer.ttft = now - start
                    else:
                        answer.gaps.append(now - last)
                    last = now
                    answer.tokens += 1
                else:
                    answer.finish = choice["finish_reason"]
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                answer.text = "".join(texts)
                return answer, True  # leaving the block closes the connection mid-stream
    answer.text = "".join(texts)
    return answer, False


def pct(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Level:
    label: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]
    gaps: list[float]
    texts: list[str]
    server_cpu: float  # CPU seconds of the server process / wall seconds
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def client(limit: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0))


async def run_level(
    server: ServerProcess,
    name: str,
    label: str,
    concurrency: int,
    requests: int,
    prompts: list[str],
    new: int,
) -> Level:
    """``concurrency`` clients send ``requests`` streamed requests back to back."""
    base = server.base
    answers: list[Answer | None] = [None] * requests
    next_index = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        for i in next_index:
            body = {"model": name, "prompt": prompts[i % len(prompts)], "max_tokens": new}
            body.update(temperature=0, ignore_eos=True, stream=True, stream_options={"include_usage": True})
            answers[i], _ = await stream_request(http, base + "/v1/completions", body)

    async with client(concurrency) as http:
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
    done = [a for a in answers if a is not None]
    for i, a in enumerate(done):
        if a.status != 200 or a.error or not a.done or a.tokens != new:
            raise SystemExit(f"{label}: request {i} came back wrong: {a}")
        if a.usage and a.usage.get("completion_tokens") != new:
            raise SystemExit(f"{label}: request {i}: usage {a.usage} but {new} tokens asked for")
    return Level(
        label,
        concurrency,
        requests,
        sum(a.tokens for a in done),
        seconds,
        [a.ttft for a in done if a.ttft is not None],
        [g for a in done for g in a.gaps],
        [a.text for a in done],
        server_cpu / seconds,
        client_cpu / seconds,
    )


async def warm_up(base: str, name: str, prompt: str) -> None:
    async with client(1) as http:
        body = {
            "model": name,
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        answer, _ = await stream_request(http, base + "/v1/completions", body)
        if answer.status != 200 or not answer.done:
            raise SystemExit(f"warm-up request failed: {answer}")
