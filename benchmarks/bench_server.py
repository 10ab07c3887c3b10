"""``neoxja serve`` on loopback: throughput and latency under concurrent streams, beside a minimal
transformers server, then a soak test of the server's robustness.

For each model (``small``: the small preset, hidden 768, 12 layers, random weights, float32; and
``reference``: benchmarks/train_reference.py's trained model, hidden 256, 4 layers, context 512),
``python -m neoxja serve`` runs in a subprocess (``--max-batch 32 --max-queue 4096 --max-model-len
512``) and this process is the client (httpx + asyncio, one connection per client).

Throughput: every request asks for ``--new`` tokens (``ignore_eos``, greedy, streamed) after a
distinct sentence of the corpus's gsd-test.txt (10-30 tokens). At each concurrency C of
``--levels``, C clients send requests back to back, max(2C, 4) requests in all. tok/s = the tokens
received in the streams / the wall time from the first request sent to the last stream ended.
TTFT: from sending a request to its first chunk carrying a token; ITL: the gaps between
consecutive token chunks of one stream (both client side, p50 and p99 over the level's requests).
One short request warms each server up before the levels.

Baseline, "what a user would write today": transformers' ``GPTNeoXJapaneseForCausalLM`` from the
same directory, ``generate()`` (greedy, ``min_new_tokens`` = ``max_new_tokens``, so it cannot stop
early) streaming its tokens through a ``BaseStreamer``, behind a minimal FastAPI app on uvicorn (this
script with ``--baseline-server``) that runs one generation at a time (a lock): the same client at
concurrency 1 and 16, max(C, 4) requests. Both servers keep torch's default thread count; they run
one after the other, never together. The baseline rows also say how many of their texts equal the
neoxja 1-stream texts of the same prompts (both greedy; they part where EOS is the top token, which
neoxja's ignore_eos emits and then continues, and min_new_tokens forbids).

Floors, per model: neoxja 16 streams / neoxja 1 stream >= 3, and neoxja 16 streams / the faster of
the baseline rows >= 6.

Soak (``--soak``, the default; reference model only): 32 clients send ``--soak-requests`` requests:
random slices of the corpus as prompts (1-200 tokens), random max_tokens (1-64), streamed or not,
greedy or sampled (seeded), some with ignore_eos; 10% of the streams are dropped by the client after
a few chunks, 5% of all requests are malformed (expect 4xx). Checks: no 5xx and no transport error;
every other request answered completely (finish_reason set, as many tokens as max_tokens unless it
stopped at EOS; a stream ends with [DONE]); /metrics back to 0 KV slots used and an empty queue within
5 s of the last answer; the server's RSS at the end no more than 10% above its RSS after the first
100 requests; the server exits 0 on SIGTERM. The exit status is 1 if a soak check fails (or a neoxja
server does not exit 0).

    python benchmarks/bench_server.py [--models small,reference] [--new 128] [--levels 1,4,16,32]
        [--soak/--no-soak] [--soak-requests 2000] [--quick] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request  # the baseline handler's annotation, which FastAPI resolves in this module

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_reference import ASSETS, CORPUS, cache_dir, corpus_files  # noqa: E402

MAX_BATCH, MAX_QUEUE, MAX_MODEL_LEN = 32, 4096, 512
BASELINE_LEVELS = (1, 16)
SOAK_CLIENTS, SOAK_WARMUP = 32, 100
MALFORMED = ("temperature", "no-prompt", "max_tokens", "json", "model", "too-long", "empty-prompt")


# ---------------------------------------------------------------------------------------------- models


def write_small(path: Path) -> None:
    """The small preset with random weights (seed 0), float32, and the tokenizer, in ``path``."""
    import torch

    import neoxja

    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig.from_preset("small", vocab_size=32000)
    neoxja.GPTNeoXJapaneseForCausalLM(config).eval().save_pretrained(path)
    neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(ASSETS).save_pretrained(path)


def model_dirs(names: list[str], scratch: Path) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "small":
            dirs[name] = scratch / "small"
            write_small(dirs[name])
        elif name == "reference":
            path = cache_dir(corpus_files()[0])
            if not path.is_dir():
                print(f"no reference model in {path}: run `python benchmarks/train_reference.py`; skipped\n")
                continue
            dirs[name] = path
        else:
            raise SystemExit(f"unknown model {name!r}: small or reference")
    return dirs


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


def neoxja_server(path: Path, name: str, logs: Path) -> ServerProcess:
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
    ]
    return ServerProcess(command, port, logs / f"{name}-neoxja.log")


def baseline_process(path: Path, name: str, logs: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--baseline-server",
        str(path),
        "--port",
        str(port),
        "--served-model-name",
        name,
    ]
    return ServerProcess(command, port, logs / f"{name}-transformers.log")


def run_baseline_server(path: str, port: int, name: str) -> None:
    """The baseline: transformers' model and generate() behind /v1/completions, one request at a time."""
    import threading

    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    model = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.GPTNeoXJapaneseTokenizer.from_pretrained(path)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        encoded = tokenizer(body["prompt"], return_tensors="pt")
        new = int(body.get("max_tokens", 16))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    loop.call_soon_threadsafe(events.put_nowait, int(token))

            def end(self) -> None:
                pass

        def work() -> None:
            try:
                with lock, torch.no_grad():
                    model.generate(
                        **encoded,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        streamer=Streamer(),
                        pad_token_id=tokenizer.eos_token_id,
                    )
                loop.call_soon_threadsafe(events.put_nowait, None)
            except Exception as err:
                loop.call_soon_threadsafe(events.put_nowait, err)

        threading.Thread(target=work, daemon=True).start()
        prompt_tokens = encoded["input_ids"].shape[1]

        def chunk(text: str, finish: str | None) -> bytes:
            piece = {
                "object": "text_completion",
                "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(piece, ensure_ascii=False).encode() + b"\n\n"

        async def tokens() -> Any:
            ids: list[int] = []
            sent = ""
            while True:
                item = await events.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    return
                ids.append(item)
                text = tokenizer.decode(ids)
                yield item, text[len(sent) :]
                sent = text

        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": new,
            "total_tokens": prompt_tokens + new,
        }
        if not body.get("stream"):
            text = "".join([piece async for _, piece in tokens()])
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            return JSONResponse(
                {"object": "text_completion", "model": name, "choices": [choice], "usage": usage}
            )

        async def stream() -> Any:
            async for _, piece in tokens():
                yield chunk(piece, None)
            yield chunk("", "length")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # uvicorn re-raises the SIGTERM that stopped it; ignoring it lets the process exit 0, as neoxja's does
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


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


# ------------------------------------------------------------------------------------------------ soak


def soak_specs(count: int, text: str, tokenizer: Any, seed: int) -> list[dict]:
    """``count`` random requests (bodies and what to expect), the same for a seed."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        if rng.random() < 0.05:
            specs.append({"kind": "malformed", "what": MALFORMED[i % len(MALFORMED)]})
            continue
        while True:  # a slice of the corpus of 1-200 tokens that is not blank
            start = rng.randrange(len(text) - 400)
            prompt = text[start : start + rng.randint(1, 300)]
            if prompt.strip():
                ids = tokenizer.encode(prompt)
                if 1 <= len(ids) <= 200:
                    break
        max_tokens = rng.randint(1, 64)
        stream = rng.random() < 0.5
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(
                temperature=rng.choice([0.7, 1.0]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(2**31)
            )
        if rng.random() < 0.3:
            body["ignore_eos"] = True
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        drop = rng.randint(1, 4) if stream and rng.random() < 0.10 else None
        specs.append({"kind": "valid", "body": body, "drop": drop})
    return specs


def malformed_request(what: str, name: str) -> tuple[dict, bytes]:
    """(headers, body) of a request the server must refuse with a 4xx."""
    good = {"model": name, "prompt": "吾輩は猫である。", "max_tokens": 4}
    bodies = {
        "temperature": {**good, "temperature": "hot"},
        "no-prompt": {k: v for k, v in good.items() if k != "prompt"},
        "max_tokens": {**good, "max_tokens": -1},
        "model": {**good, "model": "no-such-model"},
        "too-long": {**good, "max_tokens": MAX_MODEL_LEN + 1},
        "empty-prompt": {**good, "prompt": ""},
    }
    raw = b'{"prompt": "x", "max_tokens": ' if what == "json" else json.dumps(bodies[what]).encode()
    return {"content-type": "application/json"}, raw


def check_answer(spec: dict, answer: Answer) -> str | None:
    """What is wrong with a valid request's complete answer (None: nothing)."""
    body = spec["body"]
    want = body["max_tokens"]
    if answer.status != 200:
        return f"status {answer.status}: {answer.error}"
    if answer.error:
        return f"error: {answer.error}"
    if body["stream"]:
        if not answer.done:
            return "no [DONE]"
        got = answer.tokens
        if answer.usage is not None and answer.usage.get("completion_tokens") != got:
            return f"usage says {answer.usage.get('completion_tokens')} tokens, the stream had {got}"
    else:
        choice = answer.body["choices"][0]
        answer.finish = choice.get("finish_reason")
        got = answer.body["usage"]["completion_tokens"]
    if answer.finish not in ("length", "stop"):
        return f"finish_reason {answer.finish!r}"
    if answer.finish == "stop" and body.get("ignore_eos"):
        return "finish_reason 'stop' with ignore_eos"
    if got > want or (got != want and answer.finish != "stop"):
        return f"{got} tokens for max_tokens={want} (finish_reason {answer.finish})"
    return None


def read_metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(neoxja_\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


async def soak(server: ServerProcess, name: str, count: int, text: str, tokenizer: Any) -> list[tuple]:
    """Run the soak against ``server``; the checks as (name, passed, detail)."""
    specs = soak_specs(count, text, tokenizer, seed=0)
    before = read_metrics(server.base)
    url = server.base + "/v1/completions"
    statuses: dict[str, int] = {}
    failures: list[str] = []
    tally = {
        "malformed": 0,
        "dropped": 0,
        "complete": 0,
        "stream": 0,
        "transport": 0,
        "5xx": 0,
        "malformed wrong": 0,
    }
    finished = [0]
    rss: dict[str, int] = {}
    next_index = iter(range(count))

    def fail(i: int, message: str) -> None:
        if len(failures) < 20:
            failures.append(f"request {i} {json.dumps(specs[i], ensure_ascii=False)[:300]}: {message}")

    async def one(http: httpx.AsyncClient, i: int) -> None:
        spec = specs[i]
        if spec["kind"] == "malformed":
            tally["malformed"] += 1
            headers, raw = malformed_request(spec["what"], name)
            response = await http.post(url, content=raw, headers=headers)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if not 400 <= response.status_code < 500:
                tally["malformed wrong"] += 1
                fail(i, f"status {response.status_code} for a malformed request: {response.text[:300]}")
            return
        body = {"model": name, **spec["body"]}
        if body["stream"]:
            tally["stream"] += 1
            answer, dropped = await stream_request(http, url, body, spec["drop"])
        else:
            response = await http.post(url, json=body)
            answer, dropped = Answer(status=response.status_code), False
            if response.status_code == 200:
                answer.body = response.json()
            else:
                answer.error = response.text[:500]
        statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
        if dropped:
            tally["dropped"] += 1
            return
        problem = check_answer(spec, answer)
        if problem:
            fail(i, problem)
        else:
            tally["complete"] += 1

    async def worker(http: httpx.AsyncClient) -> None:
        for i in next_index:
            try:
                await one(http, i)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
                tally["transport"] += 1
                fail(i, f"{type(err).__name__}: {err}")
            finished[0] += 1
            if finished[0] == SOAK_WARMUP:
                rss["warm"] = server.rss()

    async with client(SOAK_CLIENTS) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(SOAK_CLIENTS)))
        seconds = time.perf_counter() - start

    idle_after = None
    polled = time.perf_counter()
    while time.perf_counter() - polled < 5:
        m = read_metrics(server.base)
        if m.get("neoxja_kv_slots_used") == 0 and m.get("neoxja_queue_depth") == 0:
            idle_after = time.perf_counter() - polled
            break
        await asyncio.sleep(0.1)
    rss["end"] = server.rss()
    m = read_metrics(server.base)
    server_counts = {
        re.search(r'status="(\d+)"', k).group(1): int(v - before.get(k, 0))
        for k, v in m.items()
        if k.startswith("neoxja_requests_total") and 'endpoint="/v1/completions"' in k
    }
    tally["5xx"] = sum(v for k, v in statuses.items() if k.startswith("5"))
    valid = count - tally["malformed"]
    expected_complete = valid - tally["dropped"]
    log_errors = [
        line
        for line in server.log.read_text(errors="replace").splitlines()
        if " ERROR " in line or "Traceback" in line
    ]
    growth = rss["end"] / rss["warm"] - 1 if "warm" in rss else math.nan

    print(
        f"soak: {count} requests from {SOAK_CLIENTS} clients in {seconds:.1f} s "
        f"({count / seconds:.1f} requests/s); {valid} valid ({tally['stream']} streamed, "
        f"{tally['dropped']} dropped by the client mid-stream), "
        f"{tally['malformed']} malformed"
    )
    print(f"status codes seen by the client: {dict(sorted(statuses.items()))}")
    counted = dict(sorted(server_counts.items()))
    print(
        f"/v1/completions statuses counted by the server during the soak (neoxja_requests_total): {counted}"
    )
    print(f"ERROR/Traceback lines in the server log: {len(log_errors)}")
    for line in log_errors[:10]:
        print(f"    {line}")
    for line in failures:
        print(f"  FAILED {line}")
    warm_mb = rss.get("warm", 0) / 1e6
    checks = [
        (
            "no 5xx, no transport error",
            tally["5xx"] == 0 and tally["transport"] == 0,
            f"{tally['5xx']} 5xx, {tally['transport']} transport errors",
        ),
        (
            "every malformed request answered 4xx",
            tally["malformed wrong"] == 0,
            f"{tally['malformed'] - tally['malformed wrong']} of {tally['malformed']}",
        ),
        (
            "every valid, not dropped request complete",
            tally["complete"] == expected_complete,
            f"{tally['complete']} of {expected_complete}",
        ),
        (
            "KV slots and queue back to 0 within 5 s",
            idle_after is not None,
            f"after {idle_after:.2f} s"
            if idle_after is not None
            else f"slots {m.get('neoxja_kv_slots_used')}, queue {m.get('neoxja_queue_depth')} after 5 s",
        ),
        (
            "RSS growth after warm-up <= 10%",
            growth <= 0.10,
            f"{warm_mb:.0f} MB after {SOAK_WARMUP} requests, {rss['end'] / 1e6:.0f} MB at the end "
            f"({growth * 100:+.1f}%)",
        ),
    ]
    return checks


# ----------------------------------------------------------------------------------------------- main


def gsd_prompts(tokenizer: Any, count: int) -> list[str]:
    """``count`` distinct sentences of gsd-test.txt of 10-30 tokens."""
    seen, prompts = set(), []
    for line in (CORPUS / "gsd-test.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and line not in seen and 10 <= len(tokenizer.encode(line)) <= 30:
            seen.add(line)
            prompts.append(line)
    if len(prompts) < count:
        raise SystemExit(f"only {len(prompts)} prompts of 10-30 tokens in gsd-test.txt, {count} needed")
    return prompts


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def print_table(title: str, rows: list[Level], reference_rate: float, notes: dict[str, str]) -> None:
    print(title)
    print()
    print(
        "| server | streams | requests | tokens | tok/s | vs neoxja 1 stream | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | server CPU | client CPU | |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.label} | {r.concurrency} | {r.requests} | {r.tokens} | {r.rate:.1f} | "
            f"{r.rate / reference_rate:.2f}x | {ms(pct(r.ttft, 50))} | {ms(pct(r.ttft, 99))} | "
            f"{ms(pct(r.gaps, 50))} | {ms(pct(r.gaps, 99))} | {r.server_cpu * 100:.0f}% | "
            f"{r.client_cpu * 100:.0f}% | {notes.get(f'{r.label} {r.concurrency}', '')} |"
        )
    print()


def print_checks(checks: list[tuple]) -> None:
    for what, passed, detail in checks:
        print(f"- {what}: {'PASS' if passed else 'FAIL'} ({detail})")
    print()


def bench_model(
    name: str, path: Path, args: argparse.Namespace, prompts: list[str], logs: Path, tokenizer: Any, text: str
) -> tuple[bool, list[tuple] | None]:
    """Throughput of both servers (and the soak for the reference model); (neoxja exited 0, soak checks)."""
    per_level = (lambda c: max(c, 2)) if args.quick else (lambda c: max(2 * c, 4))
    base_level = (lambda c: max(c, 2)) if args.quick else (lambda c: max(c, 4))
    config = json.loads((path / "config.json").read_text())
    shape = (
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"context {config['max_position_embeddings']}"
    )
    rows, checks = [], None
    with neoxja_server(path, name, logs) as server:
        loaded = server.wait_ready()
        asyncio.run(warm_up(server.base, name, prompts[-1]))
        for c in args.levels:
            rows.append(asyncio.run(run_level(server, name, "neoxja", c, per_level(c), prompts, args.new)))
            print(f"  [{name}] neoxja {c} streams: {rows[-1].rate:.1f} tok/s", file=sys.stderr, flush=True)
        if args.soak and name == "reference":
            print(f"### soak: {name} model, {args.soak_requests} requests\n")
            checks = asyncio.run(soak(server, name, args.soak_requests, text, tokenizer))
        neoxja_rss = server.rss()
        code = server.stop()
    if checks is not None:
        checks.append(("server exits 0 on SIGTERM", code == 0, f"exit status {code}"))
        print()
        print_checks(checks)

    with baseline_process(path, name, logs) as baseline:
        baseline.wait_ready()
        asyncio.run(warm_up(baseline.base, name, prompts[-1]))
        for c in BASELINE_LEVELS:
            rows.append(
                asyncio.run(run_level(baseline, name, "transformers", c, base_level(c), prompts, args.new))
            )
            print(
                f"  [{name}] transformers {c} streams: {rows[-1].rate:.1f} tok/s", file=sys.stderr, flush=True
            )
        baseline_rss = baseline.rss()
        baseline_code = baseline.stop()

    one = next((r for r in rows if r.label == "neoxja" and r.concurrency == 1), rows[0])
    notes = {}
    for r in rows:
        if r.label == "transformers":
            same = sum(a == b for a, b in zip(r.texts, one.texts, strict=False))
            compared = min(len(r.texts), len(one.texts))
            notes[f"transformers {r.concurrency}"] = f"same text as neoxja: {same}/{compared}"
    print_table(
        f"### {name}: {shape}; float32; {args.new} new tokens per request (ignore_eos, greedy, streamed), "
        f"prompts 10-30 tokens; neoxja serve --max-batch {MAX_BATCH} --max-model-len {MAX_MODEL_LEN} "
        f"(ready {loaded:.1f} s after start, RSS {neoxja_rss / 1e6:.0f} MB, SIGTERM exit status {code}); "
        f"transformers server RSS {baseline_rss / 1e6:.0f} MB, SIGTERM exit status {baseline_code}",
        rows,
        one.rate,
        notes,
    )
    sixteen = next((r for r in rows if r.label == "neoxja" and r.concurrency == 16), None)
    base_rows = [r for r in rows if r.label == "transformers"]
    if sixteen is not None and base_rows:
        best = max(base_rows, key=lambda r: r.rate)
        ratio1 = sixteen.rate / one.rate
        ratio2 = sixteen.rate / best.rate
        print(
            f"- neoxja 16 streams / neoxja 1 stream >= 3: {ratio1:.2f}x "
            f"({sixteen.rate:.1f} / {one.rate:.1f} tok/s): {'MET' if ratio1 >= 3 else 'NOT MET'}"
        )
        against = ", ".join(
            f"{sixteen.rate / r.rate:.2f}x against {r.concurrency} streams" for r in base_rows
        )
        print(
            f"- neoxja 16 streams / transformers baseline >= 6: {ratio2:.2f}x ({sixteen.rate:.1f} / "
            f"{best.rate:.1f} tok/s, the faster baseline row; {against}): "
            f"{'MET' if ratio2 >= 6 else 'NOT MET'}"
        )
        print()
    return code == 0, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,reference", help="comma-separated: small, reference")
    parser.add_argument(
        "--new", type=int, default=None, help="new tokens per request (default 128; 32 with --quick)"
    )
    parser.add_argument("--levels", default="1,4,16,32", help="concurrency levels of neoxja")
    parser.add_argument("--soak", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--soak-requests", type=int, default=None, help="default 2000 (200 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens: a smoke run")
    parser.add_argument(
        "--logs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench_server_logs",
        help="where the servers' output goes",
    )
    parser.add_argument("--baseline-server", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--served-model-name", default="model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline_server(args.baseline_server, args.port, args.served_model_name)
        return
    args.new = args.new or (32 if args.quick else 128)
    args.soak_requests = args.soak_requests or (200 if args.quick else 2000)
    args.levels = [int(c) for c in args.levels.split(",")]
    args.logs.mkdir(parents=True, exist_ok=True)

    import torch

    import neoxja

    tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(ASSETS)
    prompts = gsd_prompts(tokenizer, max(2 * max(args.levels), 4, max(BASELINE_LEVELS)))
    text = "".join(f.read_text(encoding="utf-8") for f in sorted(CORPUS.glob("*.txt")))
    scratch = Path(tempfile.mkdtemp(prefix="bench_server_"))
    ok = True
    started = time.perf_counter()
    try:
        dirs = model_dirs(args.models.split(","), scratch)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads (the default, in every "
            f"process), {os.cpu_count()} CPUs; client: httpx + asyncio in one process; "
            f"server logs in {args.logs}\n"
        )
        for name, path in dirs.items():
            exited, checks = bench_model(name, path, args, prompts, args.logs, tokenizer, text)
            ok &= exited and (checks is None or all(passed for _, passed, _ in checks))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
