"""Training-data preparation memory: peak RSS above the runtime, per token, in one run.

    python benchmarks/bench_data_memory.py [--size-mb 256] [--compare-mb 16] [--seq-len 2048]
        [--workers N] [--assets DIR] [--corpus DIR] [--tmp DIR] [--keep]

Builds a single-line text file of ``--size-mb`` MiB from the corpus (every corpus file with its line
breaks removed, joined and repeated) and its first ``--compare-mb`` MiB as a second file, then
prepares training data from them, each way in a fresh child process:

- neoxja (this checkout): ``neoxja.tuner.data.load_dataset`` (``neoxja train --data FILE``), on
  both files;
- neoxja before streaming (the ``tuner/data.py`` of commit 4b7fe20, read from git): the whole file
  as one string, the ids as Python lists, then two int64 tensors; on the smaller file (on the large
  one it needs about 60 times the memory of this version, more than a shared machine has to spare);
- transformers' ``GPTNeoXJapaneseTokenizer`` as a user would call it on a file (the text read
  whole, ``tokenizer(text)["input_ids"]``, then an int64 tensor); on the smaller file (it is pure
  Python, about 1 MB/s).

"runtime" is the child's resident memory once Python, torch and the tokenizer are loaded; the
peak is the kernel's high-water mark (VmHWM, reset to the current RSS through
``/proc/self/clear_refs`` just before the preparation starts), so no spike between samples is
missed. The per-token figure divides the peak above the runtime by the tokens prepared (the
end-of-text token included, padding excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE_STREAMING = "4b7fe20"  # the last commit whose tuner/data.py held whole files and int64 tensors
MIB = 1 << 20


def build_file(corpus: Path, path: Path, size: int) -> None:
    """A ``size``-byte single-line UTF-8 file of corpus text (line breaks removed, repeated)."""
    text = "".join(
        p.read_text(encoding="utf-8").replace("\r", "").replace("\n", "")
        for p in sorted(corpus.glob("*.txt"))
    )
    block = text.encode("utf-8")
    with open(path, "wb") as f:
        written = 0
        while written < size:
            piece = block[: size - written]
            piece = piece[: len(piece.decode("utf-8", errors="ignore").encode("utf-8"))]  # whole characters
            if not piece:
                break
            f.write(piece)
            written += len(piece)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, path: Path, assets: Path, seq_len: int, workers: int) -> dict:
    """Prepare ``path`` the ``method`` way in this process; its memory and time."""
    import torch

    if method == "transformers":
        import transformers

        tokenizer = transformers.GPTNeoXJapaneseTokenizer.from_pretrained(assets)
    else:
        from neoxja import GPTNeoXJapaneseTokenizer

        tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(assets)
    if method == "before":
        import importlib.util

        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE_STREAMING}:src/neoxja/tuner/data.py"],
            check=True,
            capture_output=True,
        ).stdout
        module_path = Path(tempfile.mkdtemp()) / "data_before_streaming.py"
        module_path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("data_before_streaming", module_path)
        old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    else:
        from neoxja.tuner.data import load_dataset
    runtime = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from the current RSS
    start = time.perf_counter()
    if method == "neoxja":
        data = load_dataset([path], tokenizer, seq_len, num_workers=workers)
        tokens, held = data.length, data.nbytes
    elif method == "before":
        data = old.load_dataset([path], tokenizer, seq_len, num_workers=workers)
        tokens, held = data.num_tokens, data.input_ids.nbytes + data.labels.nbytes
    else:
        ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
        tensor = torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.long)
        tokens, held = tensor.numel(), tensor.nbytes
    seconds = time.perf_counter() - start
    return {"runtime": runtime, "peak": _status("VmHWM"), "tokens": tokens, "held": held, "seconds": seconds}


def measure(method: str, path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method, str(path), "--assets", str(args.assets)]
    command += ["--seq-len", str(args.seq_len), "--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--assets", default=os.environ.get("NEOXJA_ASSETS", ROOT.parent / "shared/assets/abeja-tokenizer")
    )
    parser.add_argument("--corpus", default=os.environ.get("NEOXJA_CORPUS", ROOT.parent / "shared/corpus"))
    parser.add_argument("--size-mb", type=int, default=256, help="the large single-line file (MiB)")
    parser.add_argument("--compare-mb", type=int, default=16, help="the file every way is measured on (MiB)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (neoxja's --workers)")
    parser.add_argument("--tmp", default=None, help="where the text files are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the text files")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.assets = Path(args.assets)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.assets, args.seq_len, args.workers)))
        return

    import torch
    import transformers

    directory = Path(tempfile.mkdtemp(dir=args.tmp, prefix="bench_data_memory_"))
    large, small = (
        directory / f"single-line-{args.size_mb}mb.txt",
        directory / f"single-line-{args.compare_mb}mb.txt",
    )
    build_file(Path(args.corpus), large, args.size_mb * MIB)
    build_file(Path(args.corpus), small, args.compare_mb * MIB)
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    versions += f", transformers {transformers.__version__}"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {versions}; ", end="")
    print(f"seq_len {args.seq_len}, workers {args.workers}; files in {directory}\n")
    runs = [
        ("neoxja (this checkout)", "neoxja", large),
        ("neoxja (this checkout)", "neoxja", small),
        (f"neoxja before streaming ({BEFORE_STREAMING})", "before", small),
        ("transformers tokenizer, text read whole", "transformers", small),
    ]
    print(
        "| preparation | file | tokens | seconds | runtime MB | peak above runtime MB | bytes/token |", end=""
    )
    print(" kept MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    try:
        for name, method, path in runs:
            r = measure(method, path, args)
            results[(method, path)] = r
            above, size = r["peak"] - r["runtime"], path.stat().st_size / MIB
            cells = [name, f"{size:.0f} MiB", f"{r['tokens']:,}", f"{r['seconds']:.1f}"]
            cells += [f"{r['runtime'] / 1e6:.0f}", f"{above / 1e6:.0f}", f"{above / r['tokens']:.2f}"]
            print("| " + " | ".join([*cells, f"{r['held'] / 1e6:.0f}"]) + " |", flush=True)
    finally:
        if not args.keep:
            for path in (large, small):
                path.unlink(missing_ok=True)
            directory.rmdir()
    r = results[("neoxja", large)]
    per_token = (r["peak"] - r["runtime"]) / r["tokens"]
    verdict = "MET" if per_token <= 8 else "NOT MET"
    print(
        f"\n- neoxja, {args.size_mb} MiB single-line file: {per_token:.2f} bytes/token above the runtime",
        end="",
    )
    print(f" (<= 8): {verdict}")
    print("- 'kept MB': what the prepared data holds at the end (ids, labels or mask)")


if __name__ == "__main__":
    main()
