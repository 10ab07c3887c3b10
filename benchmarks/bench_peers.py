"""neoxja beside the engines a user would pick instead for a quantized 2.7B on the CPU: llama.cpp
(GPT-NeoX GGUF, Q4_0 / Q8_0 / BF16), CTranslate2 (int8 / int8_float32) and OpenVINO (int8 / int4),
on the 2.7B shape with the same random weights, batch-1 greedy decoding and a 512-token prompt,
2 threads, each engine and format timed in a fresh process of its own, one after the other in the
same run.

Optional, never part of CI: it downloads and builds what it needs into a cache directory outside
the repository (``--cache``, default ``$NEOXJA_PEERS_CACHE`` or ``~/.cache/neoxja-peers``), and says
so as it does: ``llama-cpp-python`` built from its source package with ``-DGGML_NATIVE=ON``
(minutes; peers_llama.py, with ``llama_amx_tile.patch`` on CPUs with AMX), the ``ctranslate2``
wheel (peers_ct2.py), and optimum-intel with OpenVINO in a venv of its own, since optimum-intel
pins transformers < 5.6 (peers_openvino.py). The models are written there too, once per
checkpoint: a GPT-NeoX GGUF of the checkpoint's weights quantized by llama.cpp's own quantizer, a
CTranslate2 int8 model written through its spec API, and optimum-intel's exports with
``--weight-format int8`` and ``int4`` (nncf's data-free weight compression, its defaults).

neoxja's rows are bench_quant.py's: float32 (whole-step C decoder), bfloat16, int8 and nf4 with
the fast and the exact arithmetic, int8 and nf4 also with the 8-bit head (llama.cpp quantizes its
output matrix too: the table says to which type). A setting this neoxja does not have is shown as
not available. Ratios compare like with like: nf4 against Q4_0 and int8 against Q8_0, each with
the 8-bit head (as llama.cpp) and with the float32 head.

Decoding: the median time of a step over ``--repeats`` runs of ``--new`` steps after an 8-token
prompt, the prefill excluded. Prompt: one forward of ``--prompt`` random token ids, the last
position's logits (CTranslate2 and OpenVINO: generating one token after the prompt, less one
decoding step).

    python benchmarks/bench_peers.py [--checkpoint DIR] [--cache DIR] [--engines llama,ct2,openvino,neoxja]
                                     [--new 8] [--repeats 3] [--prompt 512] [--prepare-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers_ct2  # noqa: E402
import peers_llama  # noqa: E402
import peers_openvino  # noqa: E402
from bench_quant import decode_row, row_name  # noqa: E402

THREADS = 2
ENGINES = ("llama", "ct2", "openvino", "neoxja")
LLAMA_FORMATS = ("Q4_0", "Q8_0", "BF16")
CT2_TYPES = ("int8", "int8_float32")
OPENVINO_FORMATS = ("int8", "int4")
# (format, arithmetic, head) of neoxja's rows
NEOXJA_ROWS = [("float32", "default", "float32")] + [
    (fmt, arithmetic, head)
    for fmt in ("bfloat16", "int8", "nf4")
    for head in (("float32",) if fmt == "bfloat16" else ("float32", "int8"))
    for arithmetic in ("fast", "exact")
]
# like with like: (neoxja format, llama.cpp type)
PAIRS = (("nf4", "Q4_0"), ("int8", "Q8_0"), ("bfloat16", "BF16"))


def checkpoint_key(checkpoint: Path) -> str:
    """A name for the models derived from ``checkpoint``: changes when its weights file does."""
    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    return hashlib.sha256(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]


def child(script: Path, site: Path | None, *args: str, python: Path | None = None) -> dict | None:
    """Run a peers_*.py child (with ``site`` on its path, by ``python`` if given: another venv's);
    its last stdout line as JSON, if any."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [str(python or sys.executable), str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {args[0]} failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def prepare_llama(cache: Path, checkpoint: Path) -> tuple[Path, dict[str, Path]]:
    """The built llama.cpp and a GGUF per format (written and quantized once per checkpoint)."""
    site = peers_llama.ensure_built(cache)
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    key = checkpoint_key(checkpoint)
    paths = {fmt: models / f"{key}-{fmt}.gguf" for fmt in LLAMA_FORMATS}
    if not paths["BF16"].is_file():
        print(f"writing {paths['BF16']}", file=sys.stderr)
        peers_llama.write_gguf(checkpoint, paths["BF16"], cache)
    for fmt, path in paths.items():
        if not path.is_file():
            print(f"quantizing to {fmt} with llama.cpp: {path}", file=sys.stderr)
            script = HERE / "peers_llama.py"
            child(script, site, "quantize", str(paths["BF16"]), "--out", str(path), "--ftype", fmt)
    return site, paths


def prepare_ct2(cache: Path, checkpoint: Path) -> tuple[Path, Path]:
    """The installed CTranslate2 and its int8 model of the checkpoint (written once)."""
    site = peers_ct2.ensure_installed(cache)
    path = cache / "models" / f"{checkpoint_key(checkpoint)}-ct2-int8"
    if not path.is_dir():
        print(f"writing {path}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        child(HERE / "peers_ct2.py", site, "write", str(checkpoint), "--out", str(path))
    return site, path


def prepare_openvino(cache: Path, checkpoint: Path) -> tuple[Path, dict[str, Path]]:
    """The OpenVINO venv's Python and an export per weight format (written once per checkpoint)."""
    python = peers_openvino.ensure_installed(cache)
    paths = {
        fmt: cache / "models" / f"{checkpoint_key(checkpoint)}-openvino-{fmt}" for fmt in OPENVINO_FORMATS
    }
    for fmt, path in paths.items():
        if not path.is_dir():
            print(f"exporting with optimum-intel, --weight-format {fmt}: {path}", file=sys.stderr)
            path.parent.mkdir(parents=True, exist_ok=True)
            child(HERE / "peers_openvino.py", None, "export", str(checkpoint), "--out", str(path),
                  "--weight-format", fmt, python=python)  # fmt: skip
    return python, paths


def timing_args(args: argparse.Namespace) -> list[str]:
    """The peers' children's timing flags, the same as neoxja's rows get."""
    flags = {"--threads": THREADS, "--new": args.new, "--prompt": args.prompt, "--repeats": args.repeats}
    return [str(part) for flag in flags.items() for part in flag]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="a 2.7B-shaped neoxja checkpoint (default: write one)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("NEOXJA_PEERS_CACHE", Path.home() / ".cache" / "neoxja-peers")),
        help="where the engines are built and their models written",
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"a subset of {','.join(ENGINES)}")
    parser.add_argument("--new", type=int, default=8, help="new tokens per decoding run (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per row (default 3)")
    parser.add_argument("--prompt", type=int, default=512, help="tokens of the timed prompt (default 512)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="build and write the models, time nothing"
    )
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines must name some of {', '.join(ENGINES)}, got {args.engines!r}")
    for name in ("new", "repeats", "prompt"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    checkpoint = args.checkpoint
    if checkpoint is None:
        from bench_model import write_checkpoint

        checkpoint = args.cache / "bf16"
        if not (checkpoint / "model.safetensors").is_file():
            print(f"writing a random 2.7B-shaped bfloat16 checkpoint into {checkpoint}", file=sys.stderr)
            write_checkpoint(checkpoint)
    elif not (checkpoint / "model.safetensors").is_file():
        parser.error(f"--checkpoint {checkpoint} has no model.safetensors")

    rows: list[dict] = []
    if "llama" in engines:
        site, paths = prepare_llama(args.cache, checkpoint)
        for fmt in () if args.prepare_only else LLAMA_FORMATS:
            types = peers_llama.tensor_types(paths[fmt], args.cache)
            r = child(HERE / "peers_llama.py", site, "measure", str(paths[fmt]), *timing_args(args))
            rows.append(
                dict(
                    r,
                    engine="llama.cpp",
                    format=fmt,
                    head=types["output.weight"],
                    kernel=types["blk.0.ffn_up.weight"],
                )
            )
    if "ct2" in engines:
        site, path = prepare_ct2(args.cache, checkpoint)
        for compute_type in () if args.prepare_only else CT2_TYPES:
            r = child(
                HERE / "peers_ct2.py",
                site,
                "measure",
                str(path),
                "--compute-type",
                compute_type,
                *timing_args(args),
            )
            rows.append(dict(r, engine="CTranslate2", format=compute_type, head="int8", kernel=compute_type))
    if "openvino" in engines:
        python, paths = prepare_openvino(args.cache, checkpoint)
        for fmt in () if args.prepare_only else OPENVINO_FORMATS:
            types = child(HERE / "peers_openvino.py", None, "types", str(paths[fmt]), python=python)
            r = child(
                HERE / "peers_openvino.py",
                None,
                "measure",
                str(paths[fmt]),
                *timing_args(args),
                python=python,
            )
            rows.append(
                dict(r, engine="OpenVINO", format=fmt, head=types["head"], kernel=f"weights {types['mlp']}")
            )
    if "neoxja" in engines and not args.prepare_only:
        for fmt, arithmetic, head in NEOXJA_ROWS:
            r = decode_row(
                checkpoint,
                "neoxja",
                fmt,
                arithmetic,
                head,
                new=args.new,
                prompt=args.prompt,
                repeats=args.repeats,
            )
            name = row_name("neoxja", fmt, arithmetic, head)
            rows.append(
                dict(r, engine="neoxja", format=fmt, name=name, head_asked=head, arithmetic_asked=arithmetic)
            )
    if not args.prepare_only:
        print_table(rows, checkpoint, args)


def print_table(rows: list[dict], checkpoint: Path, args: argparse.Namespace) -> None:
    """One table of every row, then the like-with-like ratios."""
    print(
        f"\n2.7B shape ({checkpoint}), batch-1 greedy decoding: the median of {args.repeats} x {args.new} "
        f"steps after an 8-token prompt; a {args.prompt}-token prompt; {THREADS} threads\n"
    )
    print("| engine | weights | head | what ran | decode tok/s | prompt tok/s |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        name = r.get("name", r["format"])
        if "unavailable" in r:
            print(f"| {r['engine']} | {name} | - | not available: {r['unavailable']} | - | - |")
            continue
        what = r.get("steps", r.get("kernel", "-"))
        print(
            f"| {r['engine']} | {name} | {r['head']} | {what} | {1 / r['s_per_token']:.2f} | "
            f"{args.prompt / r['prefill']:.1f} |"
        )
    llama = {r["format"]: r for r in rows if r["engine"] == "llama.cpp"}
    ours = {(r["format"], r["arithmetic_asked"], r["head_asked"]): r for r in rows if r["engine"] == "neoxja"}
    lines = []
    for fmt, peer in PAIRS:
        if peer not in llama:
            continue
        for arithmetic in ("fast", "exact"):
            for head in ("int8", "float32"):
                r = ours.get((fmt, arithmetic, head))
                if r is None or "unavailable" in r:
                    continue
                decode = llama[peer]["s_per_token"] / r["s_per_token"]
                prompt = llama[peer]["prefill"] / r["prefill"]
                peer_name = f"llama.cpp {peer} (head {llama[peer]['head']})"
                lines.append(f"| {r['name']} / {peer_name} | {decode:.2f}x | {prompt:.2f}x |")
    if lines:
        print("\n| like with like | decode | prompt |")
        print("|---|---:|---:|")
        print("\n".join(lines))
    for r in rows:
        if r["engine"] == "llama.cpp" and "system" in r:
            print(f"\nllama.cpp {peers_llama.VERSION} (llama-cpp-python), {r['system'].strip()}")
            break


if __name__ == "__main__":
    main()
