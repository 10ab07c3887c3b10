"""Train the reference model: a small GPT-NeoX-Japanese that has learned some Japanese, for the
benchmarks and demos that need one (quantisation quality, the server).

hidden 256, 4 layers, 4 heads, the real tokenizer (vocab 32000, tied head), sequence 128; trained
with ``neoxja.train`` on the training part of ``../shared/corpus`` (every file but the ones
``bench_tokenizer.py`` holds out: kokoro, gingatetsudou, gsd-test), one document per line,
1500 steps of 8 blocks (1.5M tokens), AdamW 3e-3, 50 warm-up steps, cosine; seed 0.
About 18 minutes on 2 cores (1064 s on 2026-12-02; the 32000-row head is most of the work).
Held-out loss and the report use the two smaller held-out files (gingatetsudou, gsd-test) to keep
the run short.
Deterministic: the same files and code give the same weights. The result goes to a cache
directory outside the repository (``$NEOXJA_CACHE`` or ``~/.cache/neoxja``), named after these
settings, and is reused when it is there. Prints the held-out perplexity, bits per character and a
greedy sample, for ``benchmarks/RESULTS.md``.

    python benchmarks/train_reference.py [--print-path]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import neoxja
from neoxja.configuration import GPTNeoXJapaneseConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_tokenizer import HELD_OUT  # noqa: E402  (the held-out files are bench_tokenizer's)

ASSETS = Path(os.environ.get("NEOXJA_ASSETS", HERE.parents[1] / "shared" / "assets" / "abeja-tokenizer"))
CORPUS = Path(os.environ.get("NEOXJA_CORPUS", HERE.parents[1] / "shared" / "corpus"))
ARCHITECTURE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)
TRAINING = dict(steps=1500, batch_size=8, lr=3e-3, warmup=50, schedule="cosine", weight_decay=0.01, seed=0)
SEQ_LEN = 128
# Prompts that do not end in 。, after which the model has learned to end the line (the document).
PROMPTS = ("吾輩は猫である。名前は", "私はその人を常に", "東京の")


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(training files, the held-out files that are scored) of the corpus."""
    files = sorted(CORPUS.glob("*.txt"))
    if not files:
        raise SystemExit(f"no corpus in {CORPUS} (set NEOXJA_CORPUS)")
    scored = [f for f in files if f.name in HELD_OUT and f.name != "kokoro.txt"]
    return [f for f in files if f.name not in HELD_OUT], scored


def cache_dir(train_files: list[Path]) -> Path:
    """Where these settings' model lives: a name from the settings and the training text."""
    digest = hashlib.sha256(json.dumps([ARCHITECTURE, TRAINING, SEQ_LEN], sort_keys=True).encode())
    for path in train_files:
        digest.update(path.name.encode() + path.read_bytes())
    root = Path(os.environ.get("NEOXJA_CACHE", Path.home() / ".cache" / "neoxja"))
    return root / f"reference-{digest.hexdigest()[:12]}"


def train_reference(out: Path, train_files: list[Path], held_out: list[Path]) -> None:
    tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(ASSETS)
    torch.manual_seed(TRAINING["seed"])
    config = GPTNeoXJapaneseConfig(
        vocab_size=32000,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **ARCHITECTURE,
    )
    model = neoxja.GPTNeoXJapaneseForCausalLM(config)
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    neoxja.train(
        model,
        train_files,
        partial,
        tokenizer=tokenizer,
        eval_data=held_out,
        seq_len=SEQ_LEN,
        per_line=True,
        eval_every=500,
        log_every=10,
        **TRAINING,
    )
    print(f"trained in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    partial.rename(out)  # only a finished model is ever found in the cache


def report(out: Path, held_out: list[Path]) -> None:
    from neoxja.evaluation.perplexity import perplexity

    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(out)
    print(f"reference model: {out}")
    print("| held-out file | tokens | token perplexity | bits per character |")
    print("|---|---:|---:|---:|")
    for path in held_out:
        result = perplexity(model, tokenizer, path.read_text(encoding="utf-8"), max_length=512, stride=512)
        print(
            f"| {path.name} | {result.tokens} | {result.perplexity:.2f} | {result.bits_per_character:.3f} |"
        )
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, return_tensors="pt")
        output = model.generate(ids, max_new_tokens=40, do_sample=False)
        print(f"greedy: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--print-path", action="store_true", help="only print the cache directory")
    args = parser.parse_args()
    train_files, held_out = corpus_files()
    out = cache_dir(train_files)
    if args.print_path:
        print(out)
        return
    if not out.is_dir():
        train_reference(out, train_files, held_out)
    report(out, held_out)


if __name__ == "__main__":
    main()
