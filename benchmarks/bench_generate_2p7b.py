"""Greedy decoding with the real 2.7B shape in float32 on CPU, neoxja vs transformers, same weights.

Two 2.7B float32 models (10.7 GB each) do not fit this machine's memory together, so each library
runs in its own subprocess, one after the other, and fills its weights from the same seeds (one
seeded generator per parameter name), so both hold identical weights; the generated tokens are
compared to prove it. neoxja runs twice: as generate() runs by default (each step one C call over
the dense weights, neoxja.cpu_decode) and with its weights packed for oneDNN
(optimize_for_cpu_inference, which keeps the PyTorch steps), the packing timed on its own.
Reported: seconds per token (prefill of ``--prompt`` tokens included, as in bench_generate.py), the
ratio, the peak RSS of each process, and the memory-bandwidth limit (weight bytes read per token /
the faster measured matrix-vector GB/s, as in bench_generate.py).

    python benchmarks/bench_generate_2p7b.py             # 8-token prompt, 16 new tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, zlib
import torch
lib, prompt, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if lib.startswith("neoxja"):
    from neoxja import GPTNeoXJapaneseConfig as Config, GPTNeoXJapaneseForCausalLM as Model
else:
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import GPTNeoXJapaneseConfig as Config, GPTNeoXJapaneseForCausalLM as Model
config = Config()  # the defaults are the 2.7B model
with torch.device("meta"):
    model = Model(config)
model = model.to_empty(device="cpu")
model.tie_weights()
rotary = model.gpt_neox_japanese.rotary_emb  # computed buffers: to_empty left them uninitialised
model.gpt_neox_japanese.rotary_emb = type(rotary)(config)
with torch.no_grad():
    for name, param in sorted(model.named_parameters()):
        if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
model.eval()
ids = torch.randint(0, 31000, (1, prompt), generator=torch.Generator().manual_seed(0))
kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
pack_seconds = None
if lib == "neoxja packed":  # oneDNN-packed weights and PyTorch steps, the packing timed on its own
    from neoxja.linear import optimize_for_cpu_inference
    start = time.perf_counter()
    optimize_for_cpu_inference(model)
    pack_seconds = time.perf_counter() - start
steps = "PyTorch"
if lib.startswith("neoxja"):
    from neoxja.cpu_decode import fused_decoding_unsupported
    steps = "C" if fused_decoding_unsupported(model, prompt + new) is None else "PyTorch"
with torch.no_grad():
    model.generate(ids, **dict(kwargs, max_new_tokens=2))  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    seconds = time.perf_counter() - start
weights = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
head = model.get_output_embeddings().weight
embed = model.get_input_embeddings().weight
if embed is not head:
    weights -= embed.numel() * 4
print(json.dumps({"seconds": seconds, "tokens": out[0, prompt:].tolist(), "bytes_per_token": weights,
                  "pack_seconds": pack_seconds, "steps": steps,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(lib: str, prompt: int, new: int, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, lib, str(prompt), str(new), str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from bench_generate import matvec_gbps

    torch.set_num_threads(args.threads)
    bandwidths = matvec_gbps()
    gbps = max(bandwidths.values())
    libraries = ("transformers", "neoxja", "neoxja packed")
    results = {lib: run(lib, args.prompt, args.new_tokens, args.threads) for lib in libraries}
    same = all(res["tokens"] == results["transformers"]["tokens"] for res in results.values())
    limit = results["neoxja"]["bytes_per_token"] / (gbps * 1e9)
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, 2.7B shape, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, greedy; matvec bandwidth "
        + ", ".join(f"{v:.1f} GB/s ({k})" for k, v in bandwidths.items())
        + f"; the limit uses {gbps:.1f} GB/s, "
        f"bandwidth limit {limit:.3f} s/token; same tokens: {'yes' if same else 'NO'}\n"
    )
    print(
        "| library | steps | s/token | tok/s | vs transformers | % of bandwidth limit | peak RSS GB "
        "| packing s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base = results["transformers"]["seconds"]
    for lib, res in results.items():
        per_token = res["seconds"] / args.new_tokens
        print(
            f"| {lib} | {res['steps']} | {per_token:.3f} | {1 / per_token:.2f} | "
            f"{base / res['seconds']:.2f}x | "
            f"{100 * limit / per_token:.0f}% | {res['peak_rss'] / 1e9:.2f} | "
            + ("-" if res["pack_seconds"] is None else f"{res['pack_seconds']:.1f}")
            + " |"
        )


if __name__ == "__main__":
    main()
