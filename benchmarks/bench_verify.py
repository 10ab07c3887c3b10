"""What verifying draft tokens costs: one C verify of 8 tokens against one plain C step and 8 steps.

Assisted decoding gains when a verify of k + 1 tokens costs less than the tokens it accepts. Random
weights of the ``small`` preset and of the reference model's shape (hidden 256, 4 layers), vocab
32000, float32 and nf4 (fast arithmetic), a 100-token prompt in the cache (cropped back after each
call). The fastest of 20 interleaved rounds of: a plain step, a verify of 8 tokens, 8 plain steps.

    python benchmarks/bench_verify.py [threads]     # default 2
"""

from __future__ import annotations

import sys
import time

import torch

from neoxja.cache import KVCache
from neoxja.configuration import PRESETS, GPTNeoXJapaneseConfig
from neoxja.cpu_decode import FusedDecoder
from neoxja.modeling import GPTNeoXJapaneseForCausalLM
from neoxja.quantization.loading import quantize

SHAPES = {
    "small": dict(PRESETS["small"], vocab_size=32000),
    "4l-h256": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=32000),
}


def best_times(decoder: FusedDecoder, cache: KVCache, rounds: int = 20) -> tuple[float, float, float]:
    """Fastest ms of (a plain step, a verify of 8 tokens, 8 plain steps), interleaved so that each
    meets the same disturbances; the cache is cropped back to its 100 prompt positions after each."""
    token, drafts = torch.tensor([5]), torch.randint(0, 32000, (1, 8))

    def step() -> None:
        decoder.step(token)

    def verify() -> None:
        decoder.verify(drafts)

    def eight_steps() -> None:
        for i in range(8):
            decoder.step(drafts[:, i])

    runs = (step, verify, eight_steps)
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], 1000 * (time.perf_counter() - start))
            cache.crop(100)
    return best[0], best[1], best[2]


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print(f"{torch.get_num_threads()} threads\n")
    print("| shape | format | 1 step | verify of 8 | ratio | 8 steps |\n|---|---|---|---|---|---|")
    for shape, fields in SHAPES.items():
        for fmt in ("float32", "nf4"):
            torch.manual_seed(0)
            config = GPTNeoXJapaneseConfig(max_position_embeddings=512, **fields)
            model = GPTNeoXJapaneseForCausalLM(config).eval()
            if fmt == "nf4":
                quantize(model, "nf4", cpu_arithmetic="fast")
            with torch.inference_mode():
                cache = KVCache(config, 1, 256)
                model(torch.randint(0, 32000, (1, 100)), past_key_values=cache)
                s, v, e = best_times(FusedDecoder(model, cache, 256), cache)
            print(f"| {shape} | {fmt} | {s:.2f} ms | {v:.2f} ms | {v / s:.2f} | {e:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
