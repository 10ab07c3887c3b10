"""Greedy decoding speed, neoxja vs transformers, on the same random weights, plus the memory-bandwidth limit.

Setup: 2 threads, float32, 32-token random prompts, 128 new tokens, greedy, batch 1 and 8, for a tiny
config (hidden 64, 2 layers, 4 heads) and a small one (hidden 768, 12 layers, 12 heads), vocab 32000.
The weights are made by transformers, saved with save_pretrained and loaded by neoxja from the same
directory. tokens/s = batch * new tokens / wall time of one generate() call (prefill included), best of
``--repeats`` runs.

Bandwidth limit (batch 1): decoding one token must read every weight matrix once (all layers, final
norm, ``embed_out``; the input embedding is a row lookup). Dividing those bytes by the measured speed
of a large float32 matrix-vector product (the same access pattern, far larger than the caches) gives
the fastest a memory-bound decoder can go on this machine. The product is timed with PyTorch's
default kernel, with oneDNN's packed weights and with the kernel of neoxja's C decoding step
(neoxja.cpu_decode, what generate() runs on CPU in float32); the limit takes the fastest, the
header prints all, and "% of limit" also gives, in brackets, the share of the limit computed with
PyTorch's default kernel alone (how issue 4 defines it). The tiny model's weights (8 MB) fit in the
last-level cache, so it can beat a limit measured from memory. "step matvecs alone" times the
step's own matrix-vector products back to back with that same C kernel (packed oneDNN layers
without the extension), on fresh copies of the weights: the speed with every other operation of
the step removed.

    python benchmarks/bench_generate.py            # prints a markdown table
    python benchmarks/bench_generate.py --strategies   # beam search, prompt lookup, an assistant
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

import neoxja
from neoxja import cpu_decode
from neoxja.configuration import PRESETS
from neoxja.linear import PackedLinear, packing_available

PROMPT, NEW_TOKENS, VOCAB = 32, 128, 32000
CONFIGS = {name: PRESETS[name] for name in ("tiny", "small")}


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``run()``, after one warm-up run."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def matvec_gbps(rows: int = 16384, cols: int = 4096, repeats: int = 30) -> dict[str, float]:
    """GB/s of y = W x for a float32 W far larger than the last-level cache (median of ``repeats``):
    PyTorch's default kernel and oneDNN's packed one (neoxja.linear.PackedLinear), and neoxja's C kernel."""
    layer = torch.nn.Linear(cols, rows, bias=False).eval()
    x = torch.randn(1, cols)
    nbytes = rows * cols * 4
    result = {"torch default": nbytes / _median_seconds(lambda: layer(x), repeats) / 1e9}
    if cpu_decode.extension_available():
        weight = layer.weight.detach()
        seconds = _median_seconds(lambda: cpu_decode.matmul(weight, x), repeats)
        result["neoxja C kernel"] = nbytes / seconds / 1e9
    if packing_available():
        packed = PackedLinear.from_linear(layer)
        result["oneDNN packed"] = nbytes / _median_seconds(lambda: packed(x), repeats) / 1e9
    return result


@torch.no_grad()
def step_matvec_rate(model: torch.nn.Module, repeats: int = 10) -> float:
    """Tokens/s of a batch-1 step reduced to its matrix-vector products, back to back, on fresh
    copies of every weight matrix: with neoxja's C kernel, or PackedLinear layers without it."""
    products: list[Callable[[], object]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            x = torch.randn(1, in_features)
            if cpu_decode.extension_available():
                weight = torch.randn(out_features, in_features)
                products.append(lambda weight=weight, x=x: cpu_decode.matmul(weight, x))
            else:
                layer = PackedLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=False))
                products.append(lambda layer=layer, x=x: layer(x))

    def run() -> None:
        for product in products:
            product()

    return 1 / best_seconds(run, repeats)


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter except the input-embedding lookup
    (unless that matrix is also the output head)."""
    embed_in = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = 0
    for param in {id(p): p for p in model.parameters()}.values():
        if param is embed_in and param is not head:
            continue
        total += param.numel() * param.element_size()
    return total


def timed_generate(
    models: list[torch.nn.Module], input_ids: torch.Tensor, repeats: int
) -> list[tuple[float, torch.Tensor]]:
    """Best wall time of greedy generate() over ``repeats`` runs per model (after a warm-up run each).

    The models take turns in every repeat, so a busy machine slows all of them alike.
    """
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    best = [float("inf")] * len(models)
    outputs = []
    with torch.no_grad():
        for model in models:
            outputs.append(model.generate(input_ids, **kwargs))
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model.generate(input_ids, **kwargs)
                best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outputs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--strategies",
        action="store_true",
        help="print the decoding-strategies table instead (bench_strategies.py)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.strategies:
        from bench_strategies import strategy_table

        print(
            f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
            "float32\n"
        )
        strategy_table(args.repeats)
        return
    bandwidths = matvec_gbps()
    gbps = max(bandwidths.values())
    rows = []
    for name in args.configs:
        torch.manual_seed(0)
        config = transformers.GPTNeoXJapaneseConfig(vocab_size=VOCAB, **CONFIGS[name])
        reference = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
        with tempfile.TemporaryDirectory() as directory:
            reference.save_pretrained(directory)
            ours = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        limit = gbps * 1e9 / bytes_per_token(ours)
        default_limit = bandwidths["torch default"] * 1e9 / bytes_per_token(ours)
        matvec_rate = step_matvec_rate(ours)
        for batch in args.batches:
            # Token ids below the special tokens, so the prompt has no eos in it.
            input_ids = torch.randint(
                0, 31000, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)
            )
            (ref_time, ref_out), (our_time, our_out) = timed_generate(
                [reference, ours], input_ids, args.repeats
            )
            if our_out.shape != (batch, PROMPT + NEW_TOKENS):
                raise RuntimeError(f"neoxja stopped early: {tuple(our_out.shape)}")
            ref_tps, our_tps = batch * NEW_TOKENS / ref_time, batch * NEW_TOKENS / our_time
            rows.append(
                (
                    name,
                    batch,
                    f"{ref_tps:.1f}",
                    f"{our_tps:.1f}",
                    f"{our_tps / ref_tps:.2f}x",
                    "yes" if torch.equal(ref_out, our_out) else "NO",
                    f"{limit:.1f}" if batch == 1 else "-",
                    (
                        f"{100 * our_tps / limit:.0f}% ({100 * our_tps / default_limit:.0f}%)"
                        if batch == 1
                        else "-"
                    ),
                    f"{matvec_rate:.1f}" if batch == 1 else "-",
                    f"{100 * our_tps / matvec_rate:.0f}%" if batch == 1 else "-",
                )
            )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        "float32, "
        f"prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy; matvec bandwidth "
        + ", ".join(f"{v:.1f} GB/s ({k})" for k, v in bandwidths.items())
        + f"; the limit uses {gbps:.1f} GB/s\n"
    )
    header = (
        "config",
        "batch",
        "transformers tok/s",
        "neoxja tok/s",
        "ratio",
        "same tokens",
        "bandwidth limit tok/s",
        "% of limit (of the default-kernel limit)",
        "step matvecs alone tok/s",
        "% of those",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
