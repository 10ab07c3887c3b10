"""``neoxja serve`` on loopback: throughput and latency under concurrent streams, beside a minimal
transformers server, then a soak test of the server's robustness.

For each model (``small``: the small preset, hidden 768, 12 layers, random weights, float32;
``nf4-8l``, not by default: the 2.7B shape cut to 8 layers, random weights, nf4 with the seed's
config, saved pre-quantized so that both servers load the same weights; and ``reference``:
benchmarks/train_reference.py's trained model, hidden 256, 4 layers, context 512),
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
same directory, ``generate()`` (greedy, ``eos_token_id=None``: like ignore_eos, EOS is a token like
any other and never stops it) streaming its tokens through a ``BaseStreamer``, behind a minimal
FastAPI app on uvicorn (``server_baseline.py``) that runs one generation at a time (a lock): the
same client at concurrency 1 and 16, max(C, 4) requests. Both servers keep torch's default thread
count; they run one after the other, never together. The baseline rows also say how many of their
texts equal the neoxja 1-stream texts of the same prompts (both greedy, special tokens skipped).

Floors, per model: neoxja 16 streams / neoxja 1 stream >= 4.5 for small and >= 4 for nf4-8l
(issue 21), >= 3 for the others; and neoxja 16 streams / the faster of the baseline rows >= 6.

Soak (``--soak``, the default; reference model only): 32 clients send ``--soak-requests`` requests:
random slices of the corpus as prompts (1-200 tokens), random max_tokens (1-64), streamed or not,
greedy or sampled (seeded), some with ignore_eos; 10% of the streams are dropped by the client after
a few chunks, 5% of all requests are malformed (expect 4xx). Checks: no 5xx and no transport error;
every other request answered completely (finish_reason set, as many tokens as max_tokens unless it
stopped at EOS; a stream ends with [DONE]); /metrics back to 0 KV slots used and an empty queue within
5 s of the last answer; the server's RSS at the end no more than 10% above its RSS after the first
100 requests; the server exits 0 on SIGTERM. The exit status is 1 if a soak check fails (or a neoxja
server does not exit 0).

Connections (``--connections IDLE,ACTIVE``, instead of the above; the ``tiny`` preset, random weights,
as the model's speed is not what is measured): one server with ``--max-connections IDLE+ACTIVE+64
--timeout-header 600 --timeout-keep-alive 600`` (so nothing is timed out meanwhile). First IDLE
connections that never send a byte: all must be accepted and held (counted in the server's /proc
fd table) while a client connected before gets 5 completions and /health, asked every 50 ms by a
process of its own (not to count this client's delays), answers within 100 ms; the server's RSS per
idle connection is printed. Then ACTIVE
clients each stream one request at once (``--new`` tokens, greedy, ignore_eos; ``--max-batch 32
--max-queue 4096``): all must complete, /health again within 100 ms. The exit status is 1 if a check
fails. The client needs IDLE + ACTIVE descriptors too (``ulimit -n``).

    python benchmarks/bench_server.py [--models small,nf4-8l,reference] [--new 128] [--levels 1,4,16,32]
        [--soak/--no-soak] [--soak-requests 2000] [--quick] [--logs DIR] [--connections IDLE,ACTIVE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from server_client import (  # noqa: E402
    MAX_BATCH,
    MAX_MODEL_LEN,
    Level,
    baseline_process,
    neoxja_server,
    pct,
    run_level,
    warm_up,
)
from server_soak import hold_active, hold_idle, soak  # noqa: E402
from train_reference import ASSETS, CORPUS, cache_dir, corpus_files  # noqa: E402

BASELINE_LEVELS = (1, 16)
# neoxja 16 streams / neoxja 1 stream, per model: issue 21's for small (float32) and nf4-8l, 3 otherwise
CROWD_FLOORS = {"small": 4.5, "nf4-8l": 4.0}


# ---------------------------------------------------------------------------------------------- models


def write_preset(path: Path, preset: str = "small") -> None:
    """A preset with random weights (seed 0), float32, and the tokenizer, in ``path``."""
    import torch

    import neoxja

    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig.from_preset(preset, vocab_size=32000)
    neoxja.GPTNeoXJapaneseForCausalLM(config).eval().save_pretrained(path)
    neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(ASSETS).save_pretrained(path)


def write_nf4_cut(path: Path, layers: int = 8) -> None:
    """The 2.7B shape cut to ``layers`` layers, random weights (seed 0), quantized to nf4 with the
    seed's config (double quantization) and saved pre-quantized with the tokenizer in ``path``, so
    that both servers load the same quantized weights."""
    import torch

    import neoxja

    dense = path.with_name(path.name + "-dense")
    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig.from_preset("2.7b", vocab_size=32000, num_hidden_layers=layers)
    neoxja.GPTNeoXJapaneseForCausalLM(config).eval().save_pretrained(dense)
    nf4 = neoxja.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="float16",
    )
    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(dense, quantization_config=nf4)
    model.save_pretrained(path)
    neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(ASSETS).save_pretrained(path)
    shutil.rmtree(dense)


def model_dirs(names: list[str], scratch: Path) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "small":
            dirs[name] = scratch / "small"
            write_preset(dirs[name])
        elif name == "nf4-8l":
            dirs[name] = scratch / "nf4-8l"
            write_nf4_cut(dirs[name])
        elif name == "reference":
            path = cache_dir(corpus_files()[0])
            if not path.is_dir():
                print(f"no reference model in {path}: run `python benchmarks/train_reference.py`; skipped\n")
                continue
            dirs[name] = path
        else:
            raise SystemExit(f"unknown model {name!r}: small, nf4-8l or reference")
    return dirs


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
    quantization = config.get("quantization_config")
    weights = "float32" if quantization is None else quantization.get("bnb_4bit_quant_type", "quantized")
    if quantization is not None:
        weights += f" ({quantization.get('cpu_arithmetic', 'no cpu_arithmetic setting')})"
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
        f"### {name}: {shape}; {weights}; {args.new} new tokens per request (ignore_eos, greedy, streamed), "
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
        floor = CROWD_FLOORS.get(name, 3.0)
        print(
            f"- neoxja 16 streams / neoxja 1 stream >= {floor}: {ratio1:.2f}x "
            f"({sixteen.rate:.1f} / {one.rate:.1f} tok/s): {'MET' if ratio1 >= floor else 'NOT MET'}"
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


def bench_connections(
    idle: int, active: int, new: int, prompts: list[str], logs: Path, scratch: Path
) -> bool:
    """How many idle and active connections one server holds (see the module); whether all checks pass."""
    path = scratch / "tiny"
    write_preset(path, "tiny")
    flags = (
        "--max-connections",
        str(idle + active + 64),
        "--timeout-header",
        "600",
        "--timeout-keep-alive",
        "600",
    )
    with neoxja_server(path, "tiny", logs, flags) as server:
        server.wait_ready()
        asyncio.run(warm_up(server.base, "tiny", prompts[-1]))
        print(f"### connections: neoxja serve {' '.join(flags)} --max-batch {MAX_BATCH} --max-queue 4096\n")
        checks = asyncio.run(hold_idle(server, "tiny", idle, prompts[0]))
        checks += asyncio.run(hold_active(server, "tiny", active, prompts, new))
        code = server.stop()
    checks.append(("server exits 0 on SIGTERM", code == 0, f"exit status {code}"))
    print()
    print_checks(checks)
    return all(passed for _, passed, _ in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="small,reference", help="comma-separated: small, nf4-8l, reference"
    )
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
    parser.add_argument(
        "--connections",
        default=None,
        metavar="IDLE,ACTIVE",
        help="instead: how many idle and active connections the server holds (e.g. 8000,1000)",
    )
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--served-model-name", default="model", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads (the default, in every "
            f"process), {os.cpu_count()} CPUs; client: httpx + asyncio in one process; "
            f"server logs in {args.logs}\n"
        )
        if args.connections:
            idle, active = (int(n) for n in args.connections.split(","))
            ok = bench_connections(idle, active, args.new, prompts, args.logs, scratch)
        else:
            for name, path in model_dirs(args.models.split(","), scratch).items():
                exited, checks = bench_model(name, path, args, prompts, args.logs, tokenizer, text)
                ok &= exited and (checks is None or all(passed for _, passed, _ in checks))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
