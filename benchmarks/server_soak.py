"""bench_server.py's soak: many clients, random requests, dropped streams and malformed bodies,
and the checks that the server stayed whole (no 5xx, complete answers, slots freed, RSS flat); and
how many idle and how many active connections the server holds (``--connections``)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from server_client import MAX_MODEL_LEN, Answer, ServerProcess, client, pct, stream_request

SOAK_CLIENTS, SOAK_WARMUP = 32, 100
MALFORMED = ("temperature", "no-prompt", "max_tokens", "json", "model", "too-long", "empty-prompt")

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


# ----------------------------------------------------------------------------------------- connections


def server_sockets(server: ServerProcess) -> int:
    """The sockets the server process has open (its listener and self-pipe included)."""
    fds = Path(f"/proc/{server.proc.pid}/fd")
    return sum(os.readlink(fd).startswith("socket:") for fd in fds.iterdir())


PROBE = """
import sys, time, httpx
with httpx.Client() as http:  # one kept-alive connection
    while True:
        start = time.perf_counter()
        status = http.get(sys.argv[1] + "/health", timeout=60).status_code
        print(status, time.perf_counter() - start, flush=True)
        time.sleep(0.05)
"""


class HealthProbe:
    """GET /health every 50 ms from a process of its own (so that this client's own event loop, busy
    with thousands of connections, does not delay it): the seconds each answer took."""

    def __init__(self, base: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, base], stdout=subprocess.PIPE, text=True)

    def ready(self) -> None:
        self.proc.stdout.readline()  # its connection is open

    def stop(self) -> list[float]:
        self.proc.terminate()
        lines = self.proc.communicate()[0].split("\n")
        if any(line and not line.startswith("200 ") for line in lines):
            raise SystemExit(f"/health did not answer 200: {[line for line in lines if line][:5]}")
        return [float(line.split()[1]) for line in lines if line]


def latency_summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    p50, p99, top = (pct(values, q) * 1e3 for q in (50, 99, 100))
    return f"{len(values)} samples, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {top:.1f} ms"


async def hold_idle(server: ServerProcess, name: str, count: int, prompt: str) -> list[tuple]:
    """Open ``count`` connections that never send a byte; check the server accepted and holds them all
    while a client connected before gets completions and /health answers; (check, passed, detail)."""
    body = {"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    async with client(2) as http:
        await http.post(server.base + "/v1/completions", json=body)  # its connection is open
        probe = HealthProbe(server.base)
        probe.ready()
        before_rss, before_sockets = server.rss(), server_sockets(server)
        writers, refused, start = [], 0, time.perf_counter()
        for first in range(0, count, 256):  # in batches, so that the listen queue does not overflow
            opened = await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", server.port) for _ in range(min(256, count - first))),
                return_exceptions=True,
            )
            writers += [w for r in opened if not isinstance(r, BaseException) for w in r[1:]]
            refused += sum(isinstance(r, BaseException) for r in opened)
        opened_in = time.perf_counter() - start
        deadline = time.perf_counter() + 60
        while server_sockets(server) - before_sockets < len(writers) and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        held = server_sockets(server) - before_sockets
        answered = [
            (await http.post(server.base + "/v1/completions", json=body)).status_code for _ in range(5)
        ]
        await asyncio.sleep(1.0)
        latencies = probe.stop()
        rss = server.rss()
        still = sum(not w.is_closing() for w in writers)
        for writer in writers:
            writer.close()
    per = (rss - before_rss) / max(held, 1)
    print(
        f"idle: {count} connections opened in {opened_in:.1f} s ({refused} refused by the kernel), "
        f"{held} held by the server; RSS {before_rss / 1e6:.0f} MB before, {rss / 1e6:.0f} MB with them "
        f"({per / 1e3:.1f} kB each); /health meanwhile: {latency_summary(latencies)}; "
        f"completions on the connection opened before: {answered}"
    )
    return [
        (
            "every idle connection accepted and held",
            held >= count and still == len(writers),
            f"{held} of {count}",
        ),
        ("completions answered meanwhile", answered == [200] * 5, str(answered)),
        (
            "/health within 100 ms meanwhile",
            bool(latencies) and max(latencies) < 0.1,
            latency_summary(latencies),
        ),
    ]


async def hold_active(
    server: ServerProcess, name: str, count: int, prompts: list[str], new: int
) -> list[tuple]:
    """``count`` clients each stream one request at once (``new`` tokens, greedy, ignore_eos): all must
    complete while /health answers; (check, passed, detail)."""
    answers: list[Answer] = []
    rss_peak = [server.rss()]

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": name, "prompt": prompts[i % len(prompts)], "max_tokens": new, "temperature": 0}
        body.update(ignore_eos=True, stream=True)
        answers.append((await stream_request(http, server.base + "/v1/completions", body))[0])
        rss_peak[0] = max(rss_peak[0], server.rss())

    probe = HealthProbe(server.base)
    probe.ready()
    async with client(count) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(http, i) for i in range(count)))
        seconds = time.perf_counter() - start
    latencies = probe.stop()
    complete = sum(a.status == 200 and a.done and a.tokens == new and not a.error for a in answers)
    print(
        f"active: {count} streams of {new} tokens at once: {complete} complete in {seconds:.1f} s "
        f"({complete * new / seconds:.0f} tok/s); server RSS peak {rss_peak[0] / 1e6:.0f} MB; "
        f"/health meanwhile: {latency_summary(latencies)}"
    )
    return [
        ("every active stream complete", complete == count, f"{complete} of {count}"),
        (
            "/health within 100 ms meanwhile",
            bool(latencies) and max(latencies) < 0.1,
            latency_summary(latencies),
        ),
    ]
