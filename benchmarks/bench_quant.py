"""Quantized weights on the 2.7B shape: memory when quantizing on load and when loading a
pre-quantized checkpoint, and decoding and prompt speed per format; neoxja beside transformers +
bitsandbytes, each load in its own process (peak RSS is per process), same weights, same run.

Memory: a random 2.7B-shaped bfloat16 checkpoint (bench_model.py's writer) is loaded with the
seed's nf4 config by each library (peak RSS, seconds, bytes the model holds, RSS after the load
against the runtime's RSS before it plus those bytes), saved, and the saved pre-quantized
directory loaded again (peak RSS against its file size).

Speed (``--speed``), batch 1, 2 threads, per format:
- decoding: greedy after an 8-token prompt, the median time of a decoding step over ``--repeats``
  runs of ``--new`` steps (prefill excluded; the host's noise is large); the ratio to neoxja float32,
  and the bandwidth limit: the weight bytes one step reads (the format's bytes of every linear
  layer, the float32 head and norms) / the float32 matrix-vector GB/s measured in this run;
- a 512-token prompt (one forward), its speed against neoxja float32's;
- neoxja float32 twice: with the whole-step C decoder (``neoxja.cpu_decode``, the default) and with
  ``NEOXJA_FUSED_DECODE=0`` (one PyTorch op per layer), the comparison that decides whether the
  whole-step decoder stays;
- transformers + bitsandbytes with the seed's nf4 config (its CPU path, float16 compute).
Then each format's C kernel alone (``neoxja.quantization.kernels``, batch 1) over 2.7B layer shapes
that together far exceed the cache: GB/s of its own bytes and weights multiplied per second, to
tell a bandwidth-bound format from a compute-bound one.

    python benchmarks/bench_quant.py [--speed] [--no-memory] [--new 8] [--repeats 3] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_model import write_checkpoint  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
task, lib, path, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seed = dict(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype="float16")
if lib == "neoxja":
    import neoxja
    Model, Config = neoxja.GPTNeoXJapaneseForCausalLM, neoxja.BitsAndBytesConfig
else:
    import transformers
    transformers.logging.set_verbosity_error()
    Model, Config = transformers.GPTNeoXJapaneseForCausalLM, transformers.BitsAndBytesConfig
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def held(model):
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr()); total += t.numel() * t.element_size()
    return total
def read_per_token(model):
    # what one decoding step reads: every weight but the input embedding's unused rows and RoPE tables
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or "rotary" in name or (t is embed and t is not head):
            continue
        seen.add(t.data_ptr()); total += t.numel() * t.element_size()
    return total
base = rss()
start = time.perf_counter()
if task == "quantize":
    model = Model.from_pretrained(path, dtype=torch.bfloat16, quantization_config=Config(**seed))
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak": peak(), "base": base, "after": rss(), "held": held(model)}
    model.save_pretrained(out)
elif task == "prequantized":
    model = Model.from_pretrained(path)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak": peak(), "base": base, "after": rss(), "held": held(model)}
    with torch.no_grad():  # a lazily (mmap) loaded model reads its weights only when used
        model(torch.arange(10, 18).unsqueeze(0))
    result["peak_used"] = peak()
else:  # decode: out = the format's name
    fmt, new, prompt, repeats, arithmetic, head = out, *map(int, sys.argv[5:8]), *sys.argv[8:10]
    settings = {} if arithmetic == "default" else {"cpu_arithmetic": arithmetic}
    if head == "int8":  # the head left out of the skip list: transformers' way to quantize it too
        settings["llm_int8_skip_modules"] = []
    kwargs = {}
    if lib == "transformers":
        kwargs = {"quantization_config": Config(**seed)} if fmt == "nf4" else {"dtype": torch.bfloat16}
    elif fmt in ("nf4", "fp4"):
        kwargs = {"quantization_config": Config(**dict(seed, bnb_4bit_quant_type=fmt), **settings)}
    elif fmt == "int8" and head == "int8":
        kwargs = {"quantization_config": Config(load_in_8bit=True, **settings)}
    elif fmt in ("bfloat16", "int8"):
        kwargs = {"weight_format": fmt, **settings}
    try:
        model = Model.from_pretrained(path, **{"dtype": torch.float32, **kwargs}).eval()
    except TypeError as error:  # an older from_pretrained without cpu_arithmetic=
        if not settings:
            raise
        print(json.dumps({"unavailable": f"{error}"}))
        sys.exit(0)
    # a setting the library does not have yet is reported, never assumed
    marks = {m.arithmetic for m in model.modules() if hasattr(m, "arithmetic")}
    head_dtype = getattr(model.get_output_embeddings(), "weight", torch.empty(0)).dtype
    missing = []
    if arithmetic != "default" and marks != {arithmetic}:
        missing.append(f"cpu_arithmetic={arithmetic!r}")
    if head == "int8" and head_dtype != torch.int8:
        missing.append("the 8-bit head")
    if missing:
        print(json.dumps({"unavailable": " and ".join(missing) + " not in this neoxja"}))
        sys.exit(0)
    if lib == "neoxja":
        explained = neoxja.explain_decoding(model)
        steps = explained.split(":")[0]
    else:
        steps = explained = "transformers"
    class Clock:  # a streamer that notes when each token arrives: the prompt, then one per step
        def __init__(self):
            self.times = []
        def put(self, value):
            self.times.append(time.perf_counter())
        def end(self):
            pass
    ids = torch.arange(10, 18).unsqueeze(0)
    long_ids = torch.randint(10, 31000, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        intervals = []
        for _ in range(repeats):
            clock = Clock()
            tokens = model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False,
                                    streamer=clock)
            intervals += [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # after the prefill
        per_token = sorted(intervals)[len(intervals) // 2]
        prefill = None
        if prompt:
            model(long_ids[:, :16], logits_to_keep=1)
            start = time.perf_counter()
            model(long_ids, logits_to_keep=1)
            prefill = time.perf_counter() - start
    result = {"s_per_token": per_token, "prefill": prefill, "peak": peak(), "held": held(model),
              "read": read_per_token(model), "steps": steps, "explained": explained,
              "arithmetic": "/".join(sorted(marks)) or "-", "head": str(head_dtype).replace("torch.", ""),
              "tokens": tokens[0, 8:].tolist()}
print(json.dumps(result))
"""


def run(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def bench_memory(checkpoint: Path, work: Path, weight_bytes: int) -> None:
    print(
        f"\n2.7B-shaped bfloat16 checkpoint: {weight_bytes / 1e9:.2f} GB of weights; the seed's nf4 config\n"
    )
    print(
        "| library | runtime GB | quantize on load: s | peak RSS GB | peak / bf16 bytes | model holds GB "
        "| (RSS after load - runtime) / held | saved GB | load pre-quantized: s | peak RSS GB "
        "| peak / file size | (peak - runtime) / file size | peak after a forward GB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lib in ("neoxja", "transformers"):
        saved = work / f"{lib}-nf4"
        q = run("quantize", lib, str(checkpoint), str(saved))
        p = run("prequantized", lib, str(saved), "-")
        file_bytes = size(saved)
        cells = [f"{q['base'] / 1e9:.2f}", f"{q['seconds']:.1f}", f"{q['peak'] / 1e9:.2f}"]
        cells += [f"{q['peak'] / weight_bytes:.2f}", f"{q['held'] / 1e9:.2f}"]
        cells += [f"{(q['after'] - q['base']) / q['held']:.2f}", f"{file_bytes / 1e9:.2f}"]
        cells += [f"{p['seconds']:.1f}", f"{p['peak'] / 1e9:.2f}", f"{p['peak'] / file_bytes:.2f}"]
        cells += [f"{(p['peak'] - p['base']) / file_bytes:.2f}", f"{p['peak_used'] / 1e9:.2f}"]
        print(f"| {lib} | " + " | ".join(cells) + " |")
    print("\n(runtime: RSS of the process before the load, after importing torch and the library)")


def kernel_rates(total_bytes: float = 6e8, repeats: int = 3) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (format, arithmetic), (GB/s of the format's bytes, G weights/s) of the C kernels alone
    (``neoxja._quant``, 2 threads) at batch 1 over 10240x2560 and 2560x10240 weights whose bytes add
    up to ``total_bytes`` (beyond any cache); random bytes, since the kernels' speed does not depend on
    the values. Both arithmetics where the C functions take one; only "exact" where they do not."""
    import numpy as np

    from neoxja import _quant
    from neoxja.quantization import formats

    rng = np.random.default_rng(0)
    code, nested_code = formats.code_4bit("nf4").numpy(), formats.dynamic_code().numpy()
    try:  # an older _quant takes no arithmetic argument
        _quant.linear_dense(np.ones((1, 64), np.float32), 1, 64, 1, np.ones((1, 64), np.int8),
                            np.ones(1, np.float32), np.empty((1, 1), np.float32), 1, "fast")  # fmt: skip
        arithmetics: tuple[str, ...] = ("fast", "exact")
    except TypeError:
        arithmetics = ("exact",)
    rates = {}
    for fmt, bytes_per_weight in (("bfloat16", 2.0), ("int8", 1.0), ("nf4", 0.5 + 1 / 64)):
        shapes = [(10240, 2560), (2560, 10240)] * int(total_bytes / (26214400 * bytes_per_weight) / 2 + 1)
        layers = []
        for out_features, in_features in shapes:
            n = out_features * in_features
            x = rng.standard_normal((1, in_features), dtype=np.float32)
            y = np.empty((1, out_features), np.float32)
            if fmt == "nf4":
                packed = rng.integers(0, 256, n // 2, dtype=np.uint8)
                absmax = rng.integers(0, 256, n // 64, dtype=np.uint8)
                arrays = (packed, absmax, rng.random(-(-n // 64 // 256), dtype=np.float32))
            elif fmt == "int8":
                arrays = (rng.integers(-127, 128, (out_features, in_features), dtype=np.int8),
                          rng.random(out_features, dtype=np.float32))  # fmt: skip
            else:  # bfloat16 bits, as the kernels take them (int16), of values of a normal size
                bits = rng.standard_normal((out_features, in_features), dtype=np.float32).view(np.int32) >> 16
                arrays = (bits.astype(np.int16), None)
            layers.append((out_features, in_features, x, y, arrays))
        for arithmetic in arithmetics:
            extra = (arithmetic,) if len(arithmetics) > 1 else ()

            def product(
                o: int, i: int, x: np.ndarray, y: np.ndarray, arrays: tuple, extra: tuple = extra
            ) -> None:
                if len(arrays) == 3:  # nf4: packed codes, nested absmax bytes, their float32 absmax
                    packed, absmax, nested = arrays
                    _quant.linear_4bit(
                        x, 1, i, o, packed, code, None, absmax, nested, nested_code, 0.01, 64, y, 2, *extra
                    )
                else:
                    _quant.linear_dense(x, 1, i, o, arrays[0], arrays[1], y, 2, *extra)

            weights = sum(o * i for o, i in shapes)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for layer in layers:
                    product(*layer)
                best = min(best, time.perf_counter() - start)
            rates[(fmt, arithmetic)] = (weights * bytes_per_weight / best / 1e9, weights / best / 1e9)
    return rates


# (library, format, arithmetic, head) of the speed table; "default": the library's own setting
SPEED_ROWS = [
    ("neoxja", "float32", "default", "float32"),
    ("neoxja", "float32-torch", "default", "float32"),
    *[
        ("neoxja", fmt, arithmetic, "float32")
        for fmt in ("bfloat16", "int8", "nf4")
        for arithmetic in ("fast", "exact")
    ],
    ("neoxja", "int8", "fast", "int8"),
    ("neoxja", "nf4", "fast", "int8"),
    ("neoxja", "fp4", "fast", "float32"),
    ("transformers", "nf4", "default", "float32"),
    ("transformers", "bfloat16", "default", "float32"),
]
# batch-1 decoding floors against neoxja float32 (issue 21), each also >= 75% of its bandwidth limit
DECODE_FLOORS = {"nf4": 5.0, "int8": 3.0, "bfloat16": 1.8}
LIMIT_FLOOR = 0.75


def c_kernels() -> str:
    """The C extensions' own account of the kernels each arithmetic runs, where they give one."""
    from neoxja import _decode, _quant

    names = {**getattr(_quant, "kernels", dict)(), **getattr(_decode, "kernels", dict)()}
    return "".join(f", {k} {v}" for k, v in names.items())


def decode_row(
    checkpoint: Path, lib: str, fmt: str, arithmetic: str, head: str, new: int, prompt: int, repeats: int
) -> dict:
    """One row of the speed table, timed in a fresh process: ``{"unavailable": why}`` when this neoxja
    lacks the setting asked for. NEOXJA_CPU_ARITHMETIC is left out of the child's environment so that
    the row's own setting is the one that runs; ``float32-torch`` turns the whole-step decoder off."""
    env = {k: v for k, v in os.environ.items() if k != "NEOXJA_CPU_ARITHMETIC"}
    env["NEOXJA_FUSED_DECODE"] = "0" if fmt == "float32-torch" else "1"
    args = ("decode", lib, str(checkpoint), fmt, str(new), str(prompt), str(repeats), arithmetic, head)
    return run(*args, env=env)


def row_name(lib: str, fmt: str, arithmetic: str, head: str) -> str:
    """How the tables name a row: library, format, and for neoxja's quantized formats the settings."""
    if lib != "neoxja" or fmt.startswith("float32"):
        return f"{lib} {fmt}"
    return f"{lib} {fmt} {arithmetic}" + (", 8-bit head" if head == "int8" else "")


def streaming_rate(matvec: dict[str, float], float32: dict) -> float:
    """The float32 streaming rate of the run, bytes/s: the fastest of the float32 matrix-vector
    products and the float32 decoder's own bytes per second (so float32 itself is within its limit)."""
    return max(max(matvec.values()) * 1e9, float32["read"] / float32["s_per_token"])


def bench_speed(checkpoint: Path, new: int, prompt: int, repeats: int) -> None:
    import torch
    from bench_generate import matvec_gbps

    from neoxja.quantization import kernels

    torch.set_num_threads(2)
    bandwidths = matvec_gbps()
    results = {}
    for row in SPEED_ROWS:
        results[row] = decode_row(checkpoint, *row, new=new, prompt=prompt, repeats=repeats)
    # float32 once more at the end: the ratios use the faster of its two runs (the host's noise is large)
    last = decode_row(checkpoint, *SPEED_ROWS[0], new=new, prompt=prompt, repeats=repeats)
    first = results[SPEED_ROWS[0]]
    base = min(first, last, key=lambda r: r["s_per_token"])
    base = dict(base, prefill=min(first["prefill"], last["prefill"]))
    rate = streaming_rate(bandwidths, base)
    print(
        f"\ngreedy decoding, batch 1, 2 threads, prompt 8, the median of {repeats} x {new} decoding steps "
        f"(the prefill excluded); a {prompt}-token prompt (one forward); "
        f"neoxja kernels: {kernels.kernel_name()}{c_kernels()}; float32 matvec "
        + ", ".join(f"{v:.1f} GB/s ({k})" for k, v in bandwidths.items())
        + f", neoxja float32 decoding {base['read'] / base['s_per_token'] / 1e9:.1f} GB/s; "
        f"the bandwidth limit uses {rate / 1e9:.1f} GB/s\n"
    )
    print(
        "| weights | arithmetic | head | decoding steps | s/token | tok/s | vs neoxja float32 "
        "| GB read per token | bandwidth limit s/token | % of limit | prompt s | prompt vs float32 "
        "| model holds GB |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, r in results.items():
        if "unavailable" in r:
            print(f"| {row_name(*row)} | not available: {r['unavailable']} |" + " |" * 11)
            continue
        limit = r["read"] / rate
        prefill = "-" if r["prefill"] is None else f"{r['prefill']:.2f}"
        prefill_ratio = "-" if r["prefill"] is None else f"{base['prefill'] / r['prefill']:.2f}x"
        print(
            f"| {row_name(*row)} | {r['arithmetic']} | {r['head']} | {r['steps']} | {r['s_per_token']:.3f} | "
            f"{1 / r['s_per_token']:.2f} | {base['s_per_token'] / r['s_per_token']:.2f}x | "
            f"{r['read'] / 1e9:.2f} | {limit:.3f} | {100 * limit / r['s_per_token']:.0f}% | {prefill} | "
            f"{prefill_ratio} | {r['held'] / 1e9:.2f} |"
        )
    print(
        f"\n(neoxja float32 timed again after the other rows: {last['s_per_token']:.3f} s/token, prompt "
        f"{last['prefill']:.2f} s; the ratios use the faster of the two runs)"
    )
    print("\nwhat ran (neoxja.explain_decoding):")
    for row, r in results.items():
        if "explained" in r and row[0] == "neoxja":
            print(f"- {row_name(*row)}: {r['explained']}")
    print_floors(results, base, rate)
    whole, per_layer = results[SPEED_ROWS[0]], results[SPEED_ROWS[1]]
    same = whole["tokens"] == per_layer["tokens"]
    print(
        f"\nfloat32, whole-step C decoder vs one PyTorch op per layer: "
        f"{per_layer['s_per_token'] / whole['s_per_token']:.2f}x (same tokens: {'yes' if same else 'NO'})"
    )
    print("\nC kernels alone, batch 1, 2.7B layer shapes beyond the cache:\n")
    print("| format | arithmetic | GB/s of its bytes | G weights/s | % of the float32 streaming rate |")
    print("|---|---|---:|---:|---:|")
    for (fmt, arithmetic), (gbps, weights) in kernel_rates().items():
        print(f"| {fmt} | {arithmetic} | {gbps:.1f} | {weights:.1f} | {100 * gbps * 1e9 / rate:.0f}% |")


def print_floors(results: dict, base: dict, rate: float) -> None:
    """Issue 21's floors for each format's default (fast, float32 head) row: decoding against neoxja
    float32 and against its own bandwidth limit; the prompt against neoxja float32 (this CPU has no
    AMX) and, for the record, against transformers' bfloat16 prompt (the floor on CPUs with AMX)."""
    torch_bf16 = results[("transformers", "bfloat16", "default", "float32")]
    print("\nfloors (fast path, float32 head):\n")
    print(
        "| format | vs float32 | floor | % of limit | floor | prompt vs float32 | floor "
        "| prompt vs transformers bfloat16 | met |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for fmt, floor in DECODE_FLOORS.items():
        r = results[("neoxja", fmt, "fast", "float32")]
        if "unavailable" in r:
            print(f"| {fmt} | not available: {r['unavailable']} |" + " |" * 7)
            continue
        speedup = base["s_per_token"] / r["s_per_token"]
        of_limit = r["read"] / rate / r["s_per_token"]
        prompt_ratio = base["prefill"] / r["prefill"]
        vs_torch = "-" if "unavailable" in torch_bf16 else f"{torch_bf16['prefill'] / r['prefill']:.2f}x"
        met = speedup >= floor and of_limit >= LIMIT_FLOOR and prompt_ratio >= 1.0
        print(
            f"| {fmt} | {speedup:.2f}x | {floor}x | {100 * of_limit:.0f}% | {100 * LIMIT_FLOOR:.0f}% | "
            f"{prompt_ratio:.2f}x | 1.0x | {vs_torch} | {'yes' if met else 'NO'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true", help="also time decoding and prompts per format")
    parser.add_argument("--no-memory", action="store_true", help="skip the loading measurements")
    parser.add_argument("--new", type=int, default=8, help="new tokens per decoding run (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per format (default 3)")
    parser.add_argument("--prompt", type=int, default=512, help="tokens of the timed prompt (default 512)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (tmp)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the 2.7B bf16 checkpoint")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-quant-"))
    checkpoint = work / "bf16"
    if (checkpoint / "model.safetensors").is_file():
        weight_bytes = size(checkpoint)
    else:
        weight_bytes = write_checkpoint(checkpoint)
    try:
        if not args.no_memory:
            bench_memory(checkpoint, work, weight_bytes)
        if args.speed:
            bench_speed(checkpoint, args.new, args.prompt, args.repeats)
    finally:
        for saved in work.glob("*-nf4"):
            shutil.rmtree(saved)
        if not args.keep:
            shutil.rmtree(checkpoint)


if __name__ == "__main__":
    main()
