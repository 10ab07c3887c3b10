"""OpenVINO for bench_peers.py: optimum-intel's exporter (which knows gpt_neox_japanese) in a
virtual environment of its own in the cache directory, the checkpoint exported with int8 and int4
weights (its ``--weight-format``, nncf's data-free compression with optimum-intel's defaults), and
batch-1 greedy decoding and a long prompt timed through ``OVModelForCausalLM``.

The environment: optimum-intel pins transformers < 5.6, so it lives in a venv that sees this
Python's packages (torch among them) but has its own transformers, huggingface-hub, datasets,
openvino, openvino-tokenizers and nncf. torchvision, which optimum-intel lists, is left out: it
would pull a torch of its own, and exporting a text model does not import it.

Run as a script (with the venv's Python), it is the child that exports (``export``), times one
export (``measure``) or says what the weights became (``types``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PINS = [
    "transformers>=5.0,<5.6",
    "huggingface-hub<1.22",
    "datasets>=4,<5",
    "openvino>=2026.0",
    "openvino-tokenizers>=2026.0",
    "nncf>=3.3.0",
]
EXPORTERS = ["optimum==2.3.0", "optimum-intel==2.2.0"]


def ensure_installed(cache: Path) -> Path:
    """The venv's Python, the venv made and filled once (about a minute, a few hundred MB)."""
    venv = cache / "ov-venv"
    python = venv / "bin" / "python"
    if not (venv / "installed").is_file():
        import torch

        print(f"installing optimum-intel and OpenVINO into {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", *EXPORTERS], check=True)
        # the running torch pinned, so that pip keeps it rather than fetching another
        subprocess.run([*pip, *PINS, f"torch=={torch.__version__.split('+')[0]}"], check=True)
        (venv / "installed").write_text("\n".join(EXPORTERS + PINS) + "\n")
    return python


def child_export(checkpoint: Path, out: Path, weight_format: str) -> None:
    """optimum-cli's export with ``weight_format`` (int8 or int4, optimum-intel's defaults)."""
    partial = out.with_name(out.name + ".partial")
    command = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model"]
    command += [str(checkpoint), "--task", "text-generation-with-past", "--weight-format", weight_format]
    subprocess.run([*command, str(partial)], check=True, stdout=sys.stderr)  # stdout is for JSON
    partial.rename(out)


def child_types(path: Path) -> dict[str, str]:
    """The element types of the exported weights: of the vocabulary matrix (the head and, tied, the
    embedding) and of the first MLP matrix, found by their number of elements."""
    import openvino

    config = json.loads((path / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    inner = hidden * config.get("intermediate_multiple_size", 4)
    wanted = {vocab * hidden: "head", inner * hidden: "mlp"}
    found: dict[str, set[str]] = {"head": set(), "mlp": set()}
    for op in openvino.Core().read_model(path / "openvino_model.xml").get_ordered_ops():
        if op.get_type_name() == "Constant":
            size = shape_size(op.get_output_partial_shape(0).to_shape())
            if size in wanted:
                found[wanted[size]].add(op.get_output_element_type(0).get_type_name())
    return {name: "/".join(sorted(types)) or "?" for name, types in found.items()}


def shape_size(shape: object) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


def child_measure(path: Path, threads: int, new: int, prompt: int, repeats: int) -> dict:
    """Greedy decoding (median gap between streamed tokens after an 8-token prompt, the prefill
    excluded) and a ``prompt``-token prompt (``generate`` of one token, less one decoding step)."""
    import torch
    from optimum.intel import OVModelForCausalLM

    ov_config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
    model = OVModelForCausalLM.from_pretrained(path, ov_config=ov_config, compile=True)

    class Clock:  # a streamer that notes when each token arrives: the prompt, then one per step
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: object) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.arange(10, 18).unsqueeze(0)
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, **settings)
    intervals: list[float] = []
    for _ in range(repeats):
        clock = Clock()
        model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, streamer=clock, **settings)
        intervals += [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
    per_token = sorted(intervals)[len(intervals) // 2]
    long_ids = torch.randint(10, 31000, (1, prompt), generator=torch.Generator().manual_seed(0))
    model.generate(long_ids[:, :16], max_new_tokens=1, **settings)
    start = time.perf_counter()
    model.generate(long_ids, max_new_tokens=1, **settings)
    prefill = time.perf_counter() - start - per_token
    return {"s_per_token": per_token, "prefill": prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description="child process of bench_peers.py for OpenVINO")
    parser.add_argument("task", choices=("export", "measure", "types"))
    parser.add_argument("path", type=Path, help="export: the neoxja checkpoint; else the exported model")
    parser.add_argument("--out", type=Path, help="export: the directory to create")
    parser.add_argument("--weight-format", choices=("int8", "int4"), help="export: optimum-intel's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.task == "export":
        if args.out is None or args.weight_format is None:
            parser.error("export needs --out and --weight-format")
        child_export(args.path, args.out, args.weight_format)
    elif args.task == "types":
        print(json.dumps(child_types(args.path)))
    else:
        print(json.dumps(child_measure(args.path, args.threads, args.new, args.prompt, args.repeats)))


if __name__ == "__main__":
    main()
