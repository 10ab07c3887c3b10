"""What one request at the server's work budget costs: engine time, building its JSON, peak memory.

``neoxja serve`` refuses a request that may score more than ``--max-work`` tokens (default 2**19;
:func:`neoxja.serving.protocol.request_work`). This script submits one request near that budget to a
:class:`~neoxja.serving.engine.Engine` (no HTTP; 8 KV slots of 2048 positions, 2 threads) over a
random-weight model of the ``tiny`` or ``small`` preset with the real tokenizer's 32,000-token
vocabulary, collects its events as the server does (``Collector``), and builds the completion's JSON.
The cases (random prompt ids, greedy):

- ``loglikelihood``: lm-eval's ``local-completions`` loglikelihood batch: 64 prompts of 2047 tokens,
  ``echo``, ``logprobs=1``, ``max_tokens=1``;
- ``n8-logprobs20``: one prompt of 48 tokens, ``n=8``, ``max_tokens=2000``, ``logprobs=20``;
- ``echo-logprobs20``: the most echoed-prompt scores the budget admits: 11 prompts of 2000 tokens,
  ``echo``, ``logprobs=20``, ``max_tokens=1``;
- ``plain``: no log-probabilities: 64 prompts of 1024 tokens, ``n=4``, ``max_tokens=1024`` (256
  sequences of 2048 positions, the default ``--max-queue``).

``--scale N`` runs 1/N of the request (the prompts, or ``max_tokens`` for ``n8-logprobs20``), for slow
models. Run one case per process (the peak RSS is the process's); it prints one line: the case, its
tokens scored, seconds in the engine (submit to last event), seconds building the JSON, its size,
and the peak RSS above the process's before the request.

    python benchmarks/server_work_budget.py {tiny|small} CASE [--scale N] [--assets DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer
from neoxja.serving.engine import Engine
from neoxja.serving.metrics import Metrics
from neoxja.serving.protocol import Limits, parse_completion, request_work
from neoxja.serving.responses import Collector

ROOT = Path(__file__).resolve().parent.parent
CASES = ("loglikelihood", "n8-logprobs20", "echo-logprobs20", "plain")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def request(case: str, scale: int, ids: Callable[[int], list[int]]) -> dict:
    """The completion body of ``case`` at 1/``scale`` of its size; ``ids(n)`` gives n random prompt ids."""
    if case == "loglikelihood":
        return dict(prompt=[ids(2047) for _ in range(64 // scale)], max_tokens=1, logprobs=1, echo=True)
    if case == "n8-logprobs20":
        return dict(prompt=ids(48), n=8, max_tokens=2000 // scale, logprobs=20, ignore_eos=True)
    if case == "echo-logprobs20":
        return dict(prompt=[ids(2000) for _ in range(11 // scale)], max_tokens=1, logprobs=20, echo=True)
    return dict(prompt=[ids(1024) for _ in range(64 // scale)], n=4, max_tokens=1024, ignore_eos=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("tiny", "small"), help="the preset (random weights)")
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--scale", type=int, default=1, help="run 1/N of the request (default 1)")
    parser.add_argument(
        "--assets", default=os.environ.get("NEOXJA_ASSETS", ROOT.parent / "shared/assets/abeja-tokenizer")
    )
    args = parser.parse_args()
    if args.scale < 1:
        parser.error("--scale must be >= 1")

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = GPTNeoXJapaneseConfig.from_preset(args.model, vocab_size=32000)
    model = GPTNeoXJapaneseForCausalLM(config).eval()
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(args.assets)
    engine = Engine(model, tokenizer, max_batch=8, max_queue=256, max_model_len=2048)
    limits = Limits(max_model_len=2048, vocab_size=32000, max_tokens=2048)
    rng = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 30000, (n,), generator=rng).tolist()

    body = {**request(args.case, args.scale, ids), "temperature": 0}
    parsed = parse_completion(body, tokenizer, limits)
    work = request_work(parsed.prompts, parsed.params, parsed.n)
    before = peak_rss_mb()
    engine.start()
    events: queue.Queue = queue.Queue()
    start = time.monotonic()
    engine.submit(parsed.prompts, parsed.params, events.put, n=parsed.n)
    collector = Collector(parsed, tokenizer, "m", "completion", Metrics(), start)
    while collector.unfinished:
        collector.add(events.get())
    engine_s = time.monotonic() - start
    start = time.monotonic()
    answer = json.dumps(collector.completion(), ensure_ascii=False).encode()
    build_s = time.monotonic() - start
    engine.shutdown(0)
    print(
        f"{args.model} {args.case} scale=1/{args.scale}: work {work:,} tokens scored; "
        f"engine {engine_s:.1f} s; response built in {build_s:.2f} s, {len(answer) / 1e6:.1f} MB of JSON; "
        f"peak RSS +{peak_rss_mb() - before:.0f} MB (of {peak_rss_mb():.0f} MB)"
    )


if __name__ == "__main__":
    main()
