"""Tokens/s of vLLM's OpenAI server with neoxja's plugin against ``neoxja serve``, 1 and 16 streams.

Run it with the vLLM venv's Python (``.ci/vllm-venv`` prints its path), which has both servers:
``$VENV/bin/python benchmarks/bench_vllm.py``. Not part of CI.

The model: the ``small`` preset (hidden 768, 12 layers, 12 heads: head size 64, which vLLM's CPU
attention takes; the 2.7B's 80 it takes too), random weights, float32, written by ``neoxja init``
with the real tokenizer. Each server runs alone in a subprocess, one after the other, on the same
directory: vLLM as ``python -m vllm.entrypoints.openai.api_server --enforce-eager --dtype float32
--tokenizer-mode neoxja --max-model-len 512`` (with ``VLLM_CPU_NUM_OF_RESERVED_CPU`` from
``--vllm-reserved``: 0 gives its worker every core, ``default`` leaves it unset: vLLM then keeps one
for its front end),
neoxja as ``python -m neoxja serve --dtype float32 --max-model-len 512 --max-batch 16``.

At each concurrency C of ``--streams``, C clients (httpx + asyncio, one connection each) send
streamed greedy completion requests back to back, ``--new`` tokens each (``ignore_eos``), after
distinct sentences of the corpus's gsd-test.txt, max(2C, 4) requests in all. tok/s = completion
tokens (the servers' own usage counts) / the wall time from the first request sent to the last
stream ended; TTFT p50: from sending a request to its first chunk with text. One short request warms
each server up first. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from server_client import ServerProcess, free_port  # noqa: E402

NAME = "small"


def start(command: list[str], env: dict[str, str], log: Path) -> ServerProcess:
    """Start a server process with ``env`` added to this one's environment and wait for its /health."""
    port = free_port()
    with mock.patch.dict(os.environ, env):
        server = ServerProcess([*command, "--port", str(port)], port, log)
    server.wait_ready()
    return server


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, new: int) -> tuple[int, float]:
    """One streamed completion: (completion tokens, seconds to the first text)."""
    body = {
        "model": NAME,
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise SystemExit(f"{url}: {chunk['error']}")
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != new:
        raise SystemExit(f"a request got {tokens} tokens, not {new}")
    return tokens, first if first is not None else float("nan")


async def level(url: str, prompts: list[str], streams: int, new: int) -> tuple[float, float]:
    """(tok/s, TTFT p50 in seconds) of ``streams`` clients sending max(2C, 4) requests."""
    queue = list(prompts[: max(2 * streams, 4)])
    results: list[tuple[int, float]] = []

    async def client_loop() -> None:
        async with httpx.AsyncClient() as client:
            while queue:
                results.append(await one_request(client, url, queue.pop(), new))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(streams)))
    wall = time.perf_counter() - started
    return sum(t for t, _ in results) / wall, statistics.median(f for _, f in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new", type=int, default=128, help="tokens per request")
    parser.add_argument(
        "--vllm-reserved",
        nargs="+",
        default=["0"],
        help="VLLM_CPU_NUM_OF_RESERVED_CPU values to run ('default': unset)",
    )
    parser.add_argument(
        "--assets",
        type=Path,
        default=Path(os.environ.get("NEOXJA_ASSETS", REPO.parent / "shared/assets/abeja-tokenizer")),
    )
    parser.add_argument(
        "--corpus", type=Path, default=Path(os.environ.get("NEOXJA_CORPUS", REPO.parent / "shared/corpus"))
    )
    args = parser.parse_args()
    os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)  # only --vllm-reserved sets it

    lines = (args.corpus / "gsd-test.txt").read_text(encoding="utf-8").splitlines()
    prompts = [line for line in lines if 10 <= len(line) <= 40][: 2 * max(args.streams) + 4]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "neoxja",
                "init",
                "--size",
                "small",
                "--tokenizer",
                str(args.assets),
                "-o",
                str(model),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        common = [
            "--model",
            str(model),
            "--served-model-name",
            NAME,
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
        ]
        runs = [
            (
                f"vLLM {_vllm_version()} (VLLM_CPU_NUM_OF_RESERVED_CPU={reserved})",
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common, "--host", "127.0.0.1"]
                + ["--enforce-eager", "--tokenizer-mode", "neoxja", "--disable-log-stats"],
                {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2"}
                | ({} if reserved == "default" else {"VLLM_CPU_NUM_OF_RESERVED_CPU": reserved}),
            )
            for reserved in args.vllm_reserved
        ]
        runs.append(
            (
                "neoxja serve",
                [sys.executable, "-m", "neoxja", "serve", *common, "--max-batch", str(max(args.streams))],
                {},
            )
        )
        rows = []
        for number, (label, command, extra_env) in enumerate(runs):
            with start(command, extra_env, Path(tmp) / f"server-{number}.log") as server:
                url = server.base
                asyncio.run(one_request_warm(url))
                for streams in args.streams:
                    tps, ttft = asyncio.run(level(url, prompts, streams, args.new))
                    rows.append((label, streams, tps, ttft))
                    print(
                        f"{label}: {streams} streams {tps:.1f} tok/s, TTFT p50 {ttft * 1000:.0f} ms",
                        file=sys.stderr,
                    )
                server.stop()
    print(f"| server (small, {args.new} new tokens, float32) | streams | tok/s | TTFT p50 ms |")
    print("|---|---:|---:|---:|")
    for label, streams, tps, ttft in rows:
        print(f"| {label} | {streams} | {tps:.1f} | {ttft * 1000:.0f} |")


async def one_request_warm(url: str) -> None:
    async with httpx.AsyncClient() as client:
        await one_request(client, url, "こんにちは", 4)


def _vllm_version() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


if __name__ == "__main__":
    main()
