"""A 512-token prompt on the 2.7B shape per weight format and CPU arithmetic, beside neoxja float32
and transformers' bfloat16 prompt, same run, 2 threads, each load in its own process.

The prompt is one forward (``logits_to_keep=1``, as ``generate()``'s prefill) over random token ids;
each row reports the best and the median of ``--repeats`` timed forwards after one untimed forward of
the same shape (oneDNN builds its kernels on the first call), and where the best one's time went: the
linear layers' products (quantized ops or ``nn.Linear``, timed around each call; of which dequantizing
4-bit tiles) and the rest of the forward (attention, norms, GELU, RoPE, copies). The quantized rows say
which path ran (``neoxja.quantization.describe`` of the first layer): bfloat16 tiles through oneDNN
where the CPU has AVX512_BF16 or AMX and the arithmetic is ``fast``, float32 tiles otherwise.

    python benchmarks/bench_prompt.py --checkpoint DIR [--prompt 512] [--repeats 3] [--formats nf4,int8]

``--checkpoint`` is a 2.7B-shaped bfloat16 checkpoint (``bench_quant.py --keep`` leaves one); without
it one is written (5.3 GB) into a temporary directory and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import functools, json, statistics, sys, time
import torch
torch.set_num_threads(2)
lib, path, fmt, arithmetic, prompt, repeats = sys.argv[1:5] + [int(v) for v in sys.argv[5:7]]
spent = {"products": 0.0, "dequantizing": 0.0}
def timed(function, part):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start
    return wrapper
if lib == "transformers":
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    path_text = "transformers bfloat16 (oneDNN)"
else:
    import neoxja
    from neoxja.quantization import describe, kernels, ops
    from neoxja.quantization.layers import QuantizedLinear
    kwargs = {} if fmt == "float32" else {"weight_format": fmt, "cpu_arithmetic": arithmetic}
    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    path_text = describe(layers[0]) if layers else "float32 BLAS (PyTorch)"
    for name in ("linear_4bit", "linear_int8", "linear_bf16"):  # the layers look them up per call
        setattr(ops, name, timed(getattr(ops, name), "products"))
    kernels.dequantize_4bit = timed(kernels.dequantize_4bit, "dequantizing")
torch.nn.Linear.forward = timed(torch.nn.Linear.forward, "products")  # dense layers, either library
ids = torch.randint(10, 31000, (1, prompt), generator=torch.Generator().manual_seed(0))
times, parts = [], []
with torch.no_grad():
    model(ids, logits_to_keep=1)
    for _ in range(repeats):
        spent.update(products=0.0, dequantizing=0.0)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        times.append(time.perf_counter() - start)
        parts.append(dict(spent))
best = min(range(repeats), key=times.__getitem__)
print(json.dumps({"best": times[best], "median": statistics.median(times), "path": path_text,
                  "parts": parts[best]}))
"""

ROWS_DEFAULT = "bfloat16,int8,nf4,fp4"


def run_row(lib: str, checkpoint: Path, fmt: str, arithmetic: str, prompt: int, repeats: int) -> dict:
    args = [sys.executable, "-c", CHILD, lib, str(checkpoint), fmt, arithmetic, str(prompt), str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("NEOXJA_CPU_ARITHMETIC", None)  # each row says its arithmetic itself
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="a 2.7B-shaped bf16 checkpoint")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per row (default 3)")
    parser.add_argument("--formats", default=ROWS_DEFAULT, help=f"formats (default {ROWS_DEFAULT})")
    parser.add_argument("--no-transformers", action="store_true", help="leave out transformers' row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from bench_model import write_checkpoint

            checkpoint = Path(tmp) / "bf16"
            write_checkpoint(checkpoint)
        rows = [("neoxja", "float32", "-")]
        rows += [("neoxja", fmt, ar) for fmt in args.formats.split(",") for ar in ("fast", "exact")]
        if not args.no_transformers:
            rows.append(("transformers", "bfloat16", "-"))
        results = {row: run_row(*row[:1], checkpoint, *row[1:], args.prompt, args.repeats) for row in rows}
    base = results[rows[0]].get("best")
    theirs = results.get(("transformers", "bfloat16", "-"), {}).get("best")
    print(
        f"\n{args.prompt}-token prompt (one forward, logits of the last position), 2.7B shape, 2 threads; "
        f"best and median of {args.repeats}; load average {os.getloadavg()[0]:.2f} at the end\n"
    )
    print(
        "| engine | weights | arithmetic | best s | median s | tokens/s | vs neoxja float32 | "
        "vs transformers bf16 | products s | of which dequantizing s | rest s | path |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for (lib, fmt, ar), result in results.items():
        if "error" in result:
            print(f"| {lib} | {fmt} | {ar} | failed: {result['error']} |")
            continue
        best, parts = result["best"], result["parts"]
        versus = f"{theirs / best:.2f}x" if theirs else "-"
        print(
            f"| {lib} | {fmt} | {ar} | {best:.2f} | {result['median']:.2f} | {args.prompt / best:.1f} | "
            f"{base / best:.2f}x | {versus} | {parts['products']:.2f} | {parts['dequantizing']:.2f} | "
            f"{best - parts['products']:.2f} | {result['path']} |"
        )


if __name__ == "__main__":
    main()
