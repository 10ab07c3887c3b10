"""CTranslate2 for bench_peers.py: installed from PyPI into a cache directory, a decoder model
written through its spec API from a neoxja checkpoint's weights, and batch-1 greedy decoding and a
long prompt timed through ``ctranslate2.Generator``.

CTranslate2's converters know GPT-NeoX but not GPT-NeoX-Japanese; the spec is filled as its
GPT-NeoX converter fills it (pre-norm, GELU, rotary over the whole head without interleaving),
with a sequential residual and no MLP biases, which is this model's cost. The weights are stored
as int8 (``spec.optimize(quantization="int8")``, what ``ct2-transformers-converter --quantization
int8`` writes); ``compute_type`` then picks the arithmetic at load (``int8``, ``int8_float32``).

On AMD CPUs CTranslate2 leaves MKL (its choice on Intel) and picks the AVX2 ISA and oneDNN
("DNNL") for its int8 products (``CT2_VERBOSE=1`` says so); forcing MKL (``CT2_USE_MKL=1``) made a
2.7B decoding step 40x slower on the EPYC this was written on. Its defaults are what is timed.

Run as a script, it is the child process that times one compute type (``measure``) or writes the
model (``write``); bench_peers.py runs it with the cache's site directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VERSION = "4.8.5"


def ensure_installed(cache: Path) -> Path:
    """The site directory holding ``ctranslate2`` (a wheel from PyPI, installed there once)."""
    site = cache / "ct2-site"
    if not (site / "ctranslate2").is_dir():
        print(f"installing ctranslate2=={VERSION} into {site}", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--target",
                str(site),
                f"ctranslate2=={VERSION}",
            ],
            check=True,
        )
    return site


def vocabulary(size: int) -> list[str]:
    """Token strings for ``size`` ids (CTranslate2 speaks in strings): its special tokens, then t<id>."""
    return ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, size)]


def child_write(checkpoint: Path, out: Path) -> None:
    """Write ``checkpoint``'s weights as a CTranslate2 int8 decoder model into ``out``."""
    import numpy as np
    import torch
    from ctranslate2.specs import common_spec, transformer_spec
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    rotary = config.get("rope_parameters", {}).get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rotary_emb_base", 10000.0))
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        layers,
        heads,
        pre_norm=True,
        activation=common_spec.Activation.GELU,
        rotary_dim=int(rotary * config["hidden_size"] // heads),
        rotary_interleave=False,
        rotary_base=float(theta),
        parallel_residual=False,
        shared_layer_norm=False,
    )
    prefix = "gpt_neox_japanese."
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        names = set(f.keys())

        def get(name: str) -> np.ndarray:  # float16 halves the memory the spec holds before optimize
            return f.get_tensor(prefix + name).to(torch.float16).numpy()

        decoder = spec.decoder
        decoder.scale_embeddings = False
        decoder.embeddings.weight = get("embed_in.weight")
        decoder.projection.weight = decoder.embeddings.weight  # the tied head
        decoder.layer_norm.gamma = get("final_layer_norm.weight")
        decoder.layer_norm.beta = get("final_layer_norm.bias")
        for i, layer in enumerate(decoder.layer):
            p = f"layers.{i}."
            layer.self_attention.layer_norm.gamma = get(p + "input_layernorm.weight")
            layer.self_attention.layer_norm.beta = get(p + "input_layernorm.bias")
            layer.ffn.layer_norm.gamma = get(p + "post_attention_layernorm.weight")
            layer.ffn.layer_norm.beta = get(p + "post_attention_layernorm.bias")
            qkv = get(p + "attention.query_key_value.weight")  # per head (q, k, v) -> all q, all k, all v
            layer.self_attention.linear[0].weight = np.ascontiguousarray(
                qkv.reshape(heads, 3, -1, qkv.shape[-1]).swapaxes(0, 1).reshape(-1, qkv.shape[-1])
            )
            layer.self_attention.linear[1].weight = get(p + "attention.dense.weight")
            if prefix + p + "attention.dense_bias" in names:
                layer.self_attention.linear[1].bias = get(p + "attention.dense_bias")
            layer.ffn.linear_0.weight = get(p + "mlp.dense_h_to_4h.weight")
            layer.ffn.linear_1.weight = get(p + "mlp.dense_4h_to_h.weight")
    spec.register_vocabulary(vocabulary(config["vocab_size"]))
    spec.validate()
    spec.optimize(quantization="int8")
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    spec.save(str(partial))
    partial.rename(out)


def child_measure(path: Path, compute_type: str, threads: int, new: int, prompt: int, repeats: int) -> dict:
    """Greedy batch-1 decoding (median seconds between generated tokens after an 8-token prompt,
    the prefill excluded) and a ``prompt``-token prompt: ``generate_batch`` with the prompt forwarded
    at once (``include_prompt_in_result=False``) and one token generated, less one decoding step."""
    import ctranslate2
    import numpy as np

    generator = ctranslate2.Generator(
        str(path), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )
    words = json.loads((path / "vocabulary.json").read_text())
    start_ids = [words[i] for i in range(10, 18)]

    def generate(steps: int) -> list[float]:
        times = []
        for _ in generator.generate_tokens(
            start_ids, max_length=steps + 1, min_length=steps + 1, sampling_topk=1
        ):
            times.append(time.perf_counter())
        return [
            b - a for a, b in zip(times, times[1:], strict=False)
        ]  # from the first token on: the prefill excluded

    generate(2)
    intervals: list[float] = []
    for _ in range(repeats):
        intervals += generate(new)
    per_token = sorted(intervals)[len(intervals) // 2]
    long_ids = np.random.default_rng(0).integers(10, 31000, prompt).tolist()
    long_words = [words[i] for i in long_ids]
    generator.generate_batch([long_words[:16]], max_length=1, include_prompt_in_result=False)
    start = time.perf_counter()
    generator.generate_batch([long_words], max_length=1, include_prompt_in_result=False)
    prefill = time.perf_counter() - start - per_token
    return {"s_per_token": per_token, "prefill": prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description="child process of bench_peers.py for CTranslate2")
    parser.add_argument("task", choices=("measure", "write"))
    parser.add_argument("path", type=Path, help="measure: the model directory; write: the neoxja checkpoint")
    parser.add_argument("--out", type=Path, help="write: the model directory to create")
    parser.add_argument("--compute-type", default="int8", help="measure: int8 or int8_float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.task == "write":
        if args.out is None:
            parser.error("write needs --out")
        child_write(args.path, args.out)
    else:
        result = child_measure(
            args.path, args.compute_type, args.threads, args.new, args.prompt, args.repeats
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
