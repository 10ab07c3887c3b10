"""llama.cpp for bench_peers.py: build ``llama-cpp-python`` from its source package into a cache
directory, write a GPT-NeoX GGUF of a neoxja checkpoint's weights, quantize it with llama.cpp's own
quantizer, and time batch-1 greedy decoding and a long prompt through its C API.

Run as a script, it is the child process that times one GGUF (``measure``) or quantizes one
(``quantize``); bench_peers.py runs it with the cache's site directory on ``PYTHONPATH``.

The build: ``pip download --no-binary :all: llama-cpp-python==VERSION`` and ``pip install --target``
with ``CMAKE_ARGS`` for this CPU (``-DGGML_NATIVE=ON``: every instruction set the CPU reports,
OpenMP threads). On a CPU with AMX, gcc 12 drops the stores that fill ggml's AMX tile
configuration before ``ldtilecfg`` reads it (the struct is a local whose address only the
intrinsic takes), and quantized models die with an illegal instruction; ``llama_amx_tile.patch``
makes that struct static, and is applied only when ``/proc/cpuinfo`` lists ``amx_tile`` (without
AMX, a native build compiles none of that code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "0.3.36"
PATCH = HERE / "llama_amx_tile.patch"
CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
)
# llama.cpp's file types (llama.h's llama_ftype) for the formats compared
FTYPES = {"Q4_0": 2, "Q8_0": 7, "BF16": 32}


def cpu_has_amx() -> bool:
    """Whether the CPU reports AMX tiles (the build then needs the tile-config patch)."""
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def source_dir(cache: Path) -> Path:
    """The unpacked source package (downloaded once): its vendored llama.cpp holds gguf-py too."""
    src = cache / "src" / f"llama_cpp_python-{VERSION}"
    if not src.is_dir():
        (cache / "src").mkdir(parents=True, exist_ok=True)
        print(
            f"downloading llama-cpp-python {VERSION} (source package) into {cache / 'src'}", file=sys.stderr
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d",
             str(cache / "src"), f"llama-cpp-python=={VERSION}"],
            check=True,
        )  # fmt: skip
        with tarfile.open(cache / "src" / f"llama_cpp_python-{VERSION}.tar.gz") as archive:
            archive.extractall(cache / "src", filter="data")
    return src


def ensure_built(cache: Path) -> Path:
    """The site directory holding the built ``llama_cpp`` package (built here once, minutes)."""
    site = cache / "llama-site"
    if (site / "llama_cpp" / "lib").is_dir():
        return site
    src = source_dir(cache)
    if cpu_has_amx():
        print(f"CPU has AMX: applying {PATCH.name}", file=sys.stderr)
        subprocess.run(["patch", "-N", "-p1", "-d", str(src), "-i", str(PATCH)], check=True)
    print(f"building llama-cpp-python into {site} (CMAKE_ARGS={CMAKE_ARGS})", file=sys.stderr)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(src)],
        env=env,
        check=True,
    )
    # llama_cpp's own imports beyond numpy, typing_extensions and jinja2 (already there with torch)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), "diskcache"], check=True
    )
    return site


def write_gguf(checkpoint: Path, out: Path, cache: Path) -> None:
    """A GPT-NeoX GGUF (bfloat16 matrices, float32 norms and biases) of ``checkpoint``'s weights.

    GPT-NeoX-Japanese is GPT-NeoX in cost: sequential residual, rotary over the whole head, GELU
    MLP. llama.cpp's GPT-NeoX wants a bias on every linear layer and an untied output matrix: the
    biases are zeros (the last layer's attention bias is the checkpoint's), the output matrix a copy
    of the tied embedding. The query/key/value rows keep neoxja's per-head order, so the logits
    are not the same model's (this GGUF is for timing); the vocabulary is llama.cpp's "none" type
    with the model's 32000 ids.
    """
    import numpy as np
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(source_dir(cache) / "vendor" / "llama.cpp" / "gguf-py"))
    import gguf

    config = json.loads((checkpoint / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, vocab = config["num_attention_heads"], config["vocab_size"]
    inner = hidden * config.get("intermediate_multiple_size", 4)
    rotary = config.get("rope_parameters", {}).get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rotary_emb_base", 10000.0))
    prefix = "gpt_neox_japanese."
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        names = set(f.keys())

        def weight(name: str) -> torch.Tensor:
            return f.get_tensor(prefix + name)

        tensors: list[tuple[str, tuple[int, ...], object]] = []  # (gguf name, shape, how to read it)
        matrix = [
            ("token_embd", (vocab, hidden), "embed_in.weight"),
            ("output", (vocab, hidden), "embed_in.weight"),
        ]
        vector = [
            ("output_norm.weight", "final_layer_norm.weight"),
            ("output_norm.bias", "final_layer_norm.bias"),
        ]
        for i in range(layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            matrix += [
                (b + "attn_qkv", (3 * hidden, hidden), p + "attention.query_key_value.weight"),
                (b + "attn_output", (hidden, hidden), p + "attention.dense.weight"),
                (b + "ffn_up", (inner, hidden), p + "mlp.dense_h_to_4h.weight"),
                (b + "ffn_down", (hidden, inner), p + "mlp.dense_4h_to_h.weight"),
            ]
            vector += [
                (b + "attn_norm.weight", p + "input_layernorm.weight"),
                (b + "attn_norm.bias", p + "input_layernorm.bias"),
                (b + "ffn_norm.weight", p + "post_attention_layernorm.weight"),
                (b + "ffn_norm.bias", p + "post_attention_layernorm.bias"),
                (b + "attn_qkv.bias", 3 * hidden),
                (b + "attn_output.bias", p + "attention.dense_bias"),
                (b + "ffn_up.bias", inner),
                (b + "ffn_down.bias", hidden),
            ]
        for name, shape, source in matrix:
            tensors.append((name + ".weight", shape, source))
        for name, source in vector:
            if isinstance(source, str) and prefix + source not in names:
                source = hidden  # a layer without an attention bias: zeros
            tensors.append((name, (source if isinstance(source, int) else hidden,), source))

        def data(shape: tuple[int, ...], source: object) -> np.ndarray:
            if isinstance(source, int):
                return np.zeros(shape, dtype=np.float32)
            t = weight(source)
            if len(shape) == 2:  # bfloat16 bits as uint16, llama.cpp's BF16
                return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            return t.float().numpy()

        writer = gguf.GGUFWriter(out.with_suffix(".partial"), "gptneox")
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(inner)
        writer.add_head_count(heads)
        writer.add_rope_dimension_count(int(rotary * hidden // heads))
        writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_eps(config.get("layer_norm_eps", 1e-5))
        writer.add_parallel_residual(False)
        writer.add_vocab_size(vocab)
        writer.add_tokenizer_model("none")
        writer.add_file_type(FTYPES["BF16"])
        for name, shape, _ in tensors:
            dtype = np.uint16 if len(shape) == 2 else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = gguf.GGMLQuantizationType.BF16 if len(shape) == 2 else None
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, shape, source in tensors:  # one tensor in memory at a time
            writer.write_tensor_data(data(shape, source))
        writer.close()
    out.with_suffix(".partial").rename(out)


def tensor_types(path: Path, cache: Path) -> dict[str, str]:
    """{GGUF tensor name: llama.cpp type name} of a GGUF file, to say what the quantizer chose."""
    sys.path.insert(0, str(source_dir(cache) / "vendor" / "llama.cpp" / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def child_quantize(source: Path, out: Path, ftype: str, threads: int) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``, the library call behind llama-quantize)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    partial = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {ftype}")
    partial.rename(out)


def child_measure(path: Path, threads: int, new: int, prompt: int, repeats: int) -> dict:
    """Greedy batch-1 decoding (median seconds of a step after an 8-token prompt, prefill excluded)
    and one ``prompt``-token forward, through llama.cpp's C API with its default context settings
    but for the thread count and a batch that takes the whole prompt at once."""
    import ctypes

    import llama_cpp
    import numpy as np

    quiet = llama_cpp.llama_log_callback(lambda *_: None)  # kept referenced while llama.cpp may call it
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = max(1024, prompt + 64)
    params.n_batch = params.n_ubatch = max(512, prompt)
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    memory = llama_cpp.llama_get_memory(ctx)

    def decode(ids: list[int]) -> int:
        array = (llama_cpp.llama_token * len(ids))(*ids)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(ids))) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    def generate(steps: int) -> tuple[list[float], list[int]]:
        llama_cpp.llama_memory_clear(memory, True)
        token, times, tokens = decode(list(range(10, 18))), [], []
        for _ in range(steps):
            start = time.perf_counter()
            token = decode([token])
            times.append(time.perf_counter() - start)
            tokens.append(token)
        return times, tokens

    generate(2)
    intervals: list[float] = []
    for _ in range(repeats):
        intervals += generate(new)[0]
    long_ids = np.random.default_rng(0).integers(10, 31000, prompt).tolist()
    llama_cpp.llama_memory_clear(memory, True)
    decode(long_ids[:16])
    llama_cpp.llama_memory_clear(memory, True)
    start = time.perf_counter()
    decode(long_ids)
    prefill = time.perf_counter() - start
    info = llama_cpp.llama_print_system_info().decode()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"s_per_token": sorted(intervals)[len(intervals) // 2], "prefill": prefill, "system": info}


def main() -> None:
    parser = argparse.ArgumentParser(description="child process of bench_peers.py for llama.cpp")
    parser.add_argument("task", choices=("measure", "quantize"))
    parser.add_argument("path", type=Path, help="the GGUF to time, or to quantize")
    parser.add_argument("--out", type=Path, help="quantize: the GGUF to write")
    parser.add_argument("--ftype", choices=tuple(FTYPES), help="quantize: llama.cpp's file type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.task == "quantize":
        if args.out is None or args.ftype is None:
            parser.error("quantize needs --out and --ftype")
        child_quantize(args.path, args.out, args.ftype, args.threads)
    else:
        print(json.dumps(child_measure(args.path, args.threads, args.new, args.prompt, args.repeats)))


if __name__ == "__main__":
    main()
