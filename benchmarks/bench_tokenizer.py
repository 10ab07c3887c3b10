"""Tokenizer speed: neoxja vs transformers on the Japanese corpus, in one run.

    python benchmarks/bench_tokenizer.py [--assets DIR] [--corpus DIR] [--repeat N] [--workers N]

Prints load time, tokens/s line by line and for whole documents (single process, best of --repeat
for both libraries), the ratio, neoxja's first pass on a fresh tokenizer (its chunk cache empty:
"cold"), a linear-time check on adversarial inputs, and the multi-process batch API's speed.
Both tokenizers must produce the same ids; the script stops if they do not.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--assets", default=os.environ.get("NEOXJA_ASSETS", ROOT.parent / "shared/assets/abeja-tokenizer")
    )
    parser.add_argument("--corpus", default=os.environ.get("NEOXJA_CORPUS", ROOT.parent / "shared/corpus"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    assets, corpus = Path(args.assets), Path(args.corpus)
    vocab, emoji = str(assets / "vocab.txt"), str(assets / "emoji.json")
    docs = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt")) if p.name != "README.md"]
    lines = [line for doc in docs for line in doc.split("\n")]

    from transformers import GPTNeoXJapaneseTokenizer as Reference

    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    load_ref = best_of(args.repeat, lambda: Reference(vocab, emoji))
    load_ours = best_of(args.repeat, lambda: GPTNeoXJapaneseTokenizer(vocab, emoji))
    ref, ours = Reference(vocab, emoji), GPTNeoXJapaneseTokenizer(vocab, emoji)

    ref_ids = [ref.encode(line) for line in lines]
    if [ours.encode(line) for line in lines] != ref_ids:
        raise SystemExit("ids differ from transformers: fix parity before measuring speed")
    n_line_tokens = sum(map(len, ref_ids))
    n_doc_tokens = sum(len(ours.encode(doc)) for doc in docs)

    cold_line = GPTNeoXJapaneseTokenizer(vocab, emoji)
    cold_line = best_of(1, lambda: [cold_line.encode(line) for line in lines])
    cold_doc = GPTNeoXJapaneseTokenizer(vocab, emoji)
    cold_doc = best_of(1, lambda: [cold_doc.encode(doc) for doc in docs])
    rows = []
    for name, tok in (("transformers", ref), ("neoxja", ours)):
        per_line = best_of(args.repeat, lambda tok=tok: [tok.encode(line) for line in lines])
        whole = best_of(args.repeat, lambda tok=tok: [tok.encode(doc) for doc in docs])
        rows.append((name, n_line_tokens / per_line, n_doc_tokens / whole))
    print(f"corpus: {len(docs)} documents, {len(lines)} lines, {n_line_tokens} tokens (line by line)")
    print(f"{'':14}{'load s':>9}{'tok/s per line':>17}{'tok/s whole doc':>17}")
    for (name, per_line, whole), load in zip(rows, (load_ref, load_ours), strict=True):
        print(f"{name:14}{load:9.3f}{per_line:17,.0f}{whole:17,.0f}")
    (_, ref_line, ref_doc), (_, our_line, our_doc) = rows
    print(f"{'ratio':14}{load_ref / load_ours:8.1f}x{our_line / ref_line:16.1f}x{our_doc / ref_doc:16.1f}x")
    cold = (n_line_tokens / cold_line, n_doc_tokens / cold_doc)
    print(f"{'neoxja cold':14}{'':9}{cold[0]:17,.0f}{cold[1]:17,.0f}   (first pass, empty cache)")
    print(f"{'ratio cold':14}{'':9}{cold[0] / ref_line:16.1f}x{cold[1] / ref_doc:16.1f}x")

    # Linear time: characters per second must not drop as adversarial inputs grow 10x.
    # Each text on a fresh tokenizer, so that no cache has seen it.
    print("\nlinear time (neoxja, do_clean_text=True, fresh tokenizer), chars/s at 100k and 1M characters:")
    for label, unit, tail in (
        ("digits", "1234567890", ""),
        ("'<'", "<", ""),
        ("prices", "1,0001,000", "万円"),  # one long number run that ends in a unit
        ("dates", "2000/", "13/1"),  # a long chain of years that never reaches a month
        ("e-mail-ish", "a.b+c_", "@x.y"),  # a long local part, then the "@"
        ("japanese", "\n".join(docs), ""),  # the corpus itself
    ):
        rates = []
        for size in (100_000, 1_000_000):
            text = (unit * (size // len(unit) + 1))[: size - len(tail)] + tail
            clean = GPTNeoXJapaneseTokenizer(vocab, emoji, do_clean_text=True)
            rates.append(size / best_of(1, lambda text=text, clean=clean: clean.encode(text)))
        print(f"  {label:12}{rates[0]:14,.0f}{rates[1]:14,.0f}   ({rates[1] / rates[0]:.2f}x)")

    # The batch API on fresh tokenizers (nothing cached to inherit), wall and CPU time: the CPU
    # split shows the work spread over processes even when other jobs share the cores.
    print(f"\nencode_batch of {len(lines)} lines, fresh tokenizer:")
    for workers in (1, args.workers):
        tok = GPTNeoXJapaneseTokenizer(vocab, emoji)
        before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = best_of(1, lambda tok=tok, workers=workers: tok.encode_batch(lines, num_workers=workers))
        after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = [a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True)]
        print(
            f"  {workers} process(es): {wall:.2f}s wall, "
            f"CPU {cpu[0]:.2f}s in this process + {cpu[1]:.2f}s in workers"
        )


if __name__ == "__main__":
    main()
