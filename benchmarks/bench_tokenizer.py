"""Tokenizer speed: neoxja vs transformers on the Japanese corpus, in one run.

    python benchmarks/bench_tokenizer.py [--assets DIR] [--corpus DIR] [--repeat N] [--workers N]

Prints load time and tokens/s line by line and for whole documents (single process) on held-out
corpus files, with the ratio to transformers, for neoxja in three states of its chunk cache: cold
(empty), warm (filled by the other corpus files: a long-running process on unseen text) and seen
(the measured text encoded before). Then a linear-time check on adversarial inputs and the
multi-process batch API's speed.
Both tokenizers must produce the same ids; the script stops if they do not.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Measured text; the other corpus files only warm the caches, so no number comes from re-encoding
# text the tokenizer has already seen (except the row that says so).
HELD_OUT = ("kokoro.txt", "gingatetsudou.txt", "gsd-test.txt")


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
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))}
    held_out = [name for name in HELD_OUT if name in files]
    docs = [files[name] for name in held_out]
    lines = [line for doc in docs for line in doc.split("\n")]
    warmup_lines = [line for name, doc in files.items() if name not in held_out for line in doc.split("\n")]

    from transformers import GPTNeoXJapaneseTokenizer as Reference

    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    load_ref = best_of(args.repeat, lambda: Reference(vocab, emoji))
    load_ours = best_of(args.repeat, lambda: GPTNeoXJapaneseTokenizer(vocab, emoji))
    ref = Reference(vocab, emoji)

    def fresh(warm: bool) -> GPTNeoXJapaneseTokenizer:
        tok = GPTNeoXJapaneseTokenizer(vocab, emoji)
        if warm:  # what a long-running process has seen before: other text, never the measured one
            for line in warmup_lines:
                tok.encode(line)
        return tok

    ref_ids = [ref.encode(line) for line in lines]
    if [fresh(False).encode(line) for line in lines] != ref_ids:
        raise SystemExit("ids differ from transformers: fix parity before measuring speed")
    n_line = sum(map(len, ref_ids))
    n_doc = sum(len(ref.encode(doc)) for doc in docs)

    def rates(line_tok, doc_tok, repeat: int) -> tuple[float, float]:
        per_line = best_of(repeat, lambda: [line_tok.encode(line) for line in lines])
        whole = best_of(repeat, lambda: [doc_tok.encode(doc) for doc in docs])
        return n_line / per_line, n_doc / whole

    rows = [("transformers", *rates(ref, ref, args.repeat))]
    # The cold and warm rows run once, lines and documents each on a fresh tokenizer, so that no
    # pass reuses what an earlier pass over the same text cached.
    for label, warm in (("neoxja cold", False), ("neoxja warm", True)):
        rows.append((label, *rates(fresh(warm), fresh(warm), 1)))
    seen = fresh(False)
    for text in lines + docs:
        seen.encode(text)
    rows.append(("neoxja seen", *rates(seen, seen, args.repeat)))

    print(f"held-out text: {', '.join(held_out)}: {len(lines)} lines, {n_line} tokens line by line")
    print(f"warm-up text (other files): {len(warmup_lines)} lines\n")
    print(f"load: transformers {load_ref:.3f}s, neoxja {load_ours:.3f}s ({load_ref / load_ours:.1f}x)\n")
    print("| tokenizer | tok/s per line | ratio | tok/s whole doc | ratio |")
    print("|---|---:|---:|---:|---:|")
    _, ref_line, ref_doc = rows[0]
    for name, per_line, whole in rows:
        line_ratio, doc_ratio = per_line / ref_line, whole / ref_doc
        print(f"| {name} | {per_line:,.0f} | {line_ratio:.1f}x | {whole:,.0f} | {doc_ratio:.1f}x |")
    print(
        "\ncold: a fresh tokenizer's first pass. warm: a fresh tokenizer after encoding the other corpus"
        "\nfiles (steady state of a long-running process on unseen text). seen: the same text again."
    )

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
