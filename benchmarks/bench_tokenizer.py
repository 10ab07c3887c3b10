"""Tokenizer speed: neoxja vs transformers on the Japanese corpus, in one run.

    python benchmarks/bench_tokenizer.py [--assets DIR] [--corpus DIR] [--repeat N] [--workers N]

Prints load time and tokens/s line by line and for whole documents (single process) on held-out
corpus files, with the ratio to transformers, for both neoxja segmentation paths: the compiled one
(the default when neoxja._segment is built; it keeps no cache, so every pass is on unseen text) and
the pure-Python one (NEOXJA_PURE_PYTHON=1) in three states of its window cache: cold (empty), warm
(filled by the other corpus files: a long-running process on unseen text) and seen (the measured
text encoded before). Then a linear-time check on adversarial inputs, emoji-dense text (encode
time against transformers, whose emoji step makes one pass per emoji.json key), and the
multi-process batch API: wall time for 1 and N processes on a large batch, next to what the
machine allows right now (N busy-loop processes against one: other jobs on the cores cap any
speed-up).
All tokenizers must produce the same ids; the script stops if they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Measured text; the other corpus files only warm the caches, so no number comes from re-encoding
# text the tokenizer has already seen (except the row that says so).
HELD_OUT = ("kokoro.txt", "gingatetsudou.txt", "gsd-test.txt")


@contextmanager
def pure_python(on: bool):
    """Tokenizers made inside use the pure-Python segmentation (on) or the default path (off)."""
    before = os.environ.pop("NEOXJA_PURE_PYTHON", None)
    if on:
        os.environ["NEOXJA_PURE_PYTHON"] = "1"
    try:
        yield
    finally:
        os.environ.pop("NEOXJA_PURE_PYTHON", None)
        if before is not None:
            os.environ["NEOXJA_PURE_PYTHON"] = before


def emoji_dense(keys: list[str], size: int, seed: int = 0) -> str:
    """About ``size`` characters: emoji.json keys (half of the pieces), keys cut short, skin tones,
    ZWJ and variation selectors, between Japanese and ASCII."""
    rng = random.Random(seed)
    extra = [chr(c) for c in range(0x1F3FB, 0x1F400)] + ["\u200d", "\ufe0f", "\u20e3"]
    plain = "吾輩は猫である。名前はまだ無い。abc 123"
    pieces, total = [], 0
    while total < size:
        roll = rng.random()
        if roll < 0.5:
            piece = rng.choice(keys)
        elif roll < 0.65:
            key = rng.choice(keys)
            piece = key[: rng.randint(1, len(key))]
        elif roll < 0.75:
            piece = rng.choice(extra)
        else:
            piece = rng.choice(plain)
        pieces.append(piece)
        total += len(piece)
    return "".join(pieces)


def busy(n: int = 3_000_000) -> None:
    total = 0
    for i in range(n):
        total += i


def parallel_wall(workers: int, fn) -> float:
    """Wall time of ``fn`` run in ``workers`` processes at once (this one and forked ones)."""
    start = time.perf_counter()
    pids = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            fn()
            os._exit(0)
        pids.append(pid)
    fn()
    for pid in pids:
        os.waitpid(pid, 0)
    return time.perf_counter() - start


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
    parser.add_argument("--emoji-chars", type=int, default=200_000, help="size of the emoji-dense text")
    parser.add_argument("--batch-copies", type=int, default=10, help="corpus lines repeated this often")
    args = parser.parse_args()
    assets, corpus = Path(args.assets), Path(args.corpus)
    vocab, emoji = str(assets / "vocab.txt"), str(assets / "emoji.json")
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))}
    held_out = [name for name in HELD_OUT if name in files]
    docs = [files[name] for name in held_out]
    lines = [line for doc in docs for line in doc.split("\n")]
    warmup_lines = [line for name, doc in files.items() if name not in held_out for line in doc.split("\n")]

    emoji_keys = list(json.loads(Path(emoji).read_text(encoding="utf-8"))["emoji"])

    from transformers import GPTNeoXJapaneseTokenizer as Reference

    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer, segment

    if segment._compiled is None:
        raise SystemExit("neoxja._segment is not built (pip install -e . compiles it): nothing to compare")
    paths = {"compiled": False, "python": True}  # label -> pure_python flag

    def make(path: str, **kwargs) -> GPTNeoXJapaneseTokenizer:
        with pure_python(paths[path]):
            return GPTNeoXJapaneseTokenizer(vocab, emoji, **kwargs)

    load_ref = best_of(args.repeat, lambda: Reference(vocab, emoji))
    load_ours = {path: best_of(args.repeat, lambda path=path: make(path)) for path in paths}
    ref = Reference(vocab, emoji)

    def fresh(path: str, warm: bool = False) -> GPTNeoXJapaneseTokenizer:
        tok = make(path)
        if warm:  # what a long-running process has seen before: other text, never the measured one
            for line in warmup_lines:
                tok.encode(line)
        return tok

    ref_ids = [ref.encode(line) for line in lines]
    for path in paths:
        if [fresh(path).encode(line) for line in lines] != ref_ids:
            raise SystemExit(f"{path} path: ids differ from transformers: fix parity before measuring speed")
    n_line = sum(map(len, ref_ids))
    n_doc = sum(len(ref.encode(doc)) for doc in docs)

    def rates(line_tok, doc_tok, repeat: int) -> tuple[float, float]:
        per_line = best_of(repeat, lambda: [line_tok.encode(line) for line in lines])
        whole = best_of(repeat, lambda: [doc_tok.encode(doc) for doc in docs])
        return n_line / per_line, n_doc / whole

    rows = [("transformers", *rates(ref, ref, args.repeat))]
    # The compiled path keeps no cache; still, each of its passes runs on tokenizers made for it.
    compiled = [rates(fresh("compiled"), fresh("compiled"), 1) for _ in range(args.repeat)]
    rows.append(("neoxja compiled", *map(max, zip(*compiled, strict=True))))
    # The pure-Python cold and warm rows run once, lines and documents each on a fresh tokenizer,
    # so that no pass reuses what an earlier pass over the same text cached.
    for label, warm in (("neoxja python cold", False), ("neoxja python warm", True)):
        rows.append((label, *rates(fresh("python", warm), fresh("python", warm), 1)))
    seen = fresh("python")
    for text in lines + docs:
        seen.encode(text)
    rows.append(("neoxja python seen", *rates(seen, seen, args.repeat)))

    print(f"held-out text: {', '.join(held_out)}: {len(lines)} lines, {n_line} tokens line by line")
    print(f"warm-up text (other files): {len(warmup_lines)} lines\n")
    print(
        f"load: transformers {load_ref:.3f}s, neoxja compiled {load_ours['compiled']:.3f}s "
        f"({load_ref / load_ours['compiled']:.1f}x), python {load_ours['python']:.3f}s "
        f"({load_ref / load_ours['python']:.1f}x)\n"
    )
    print("| tokenizer | tok/s per line | ratio | tok/s whole doc | ratio |")
    print("|---|---:|---:|---:|---:|")
    _, ref_line, ref_doc = rows[0]
    for name, per_line, whole in rows:
        line_ratio, doc_ratio = per_line / ref_line, whole / ref_doc
        print(f"| {name} | {per_line:,.0f} | {line_ratio:.1f}x | {whole:,.0f} | {doc_ratio:.1f}x |")
    print(
        "\ncompiled: neoxja._segment (no cache), best of the passes, each on a fresh tokenizer."
        "\npython cold: a fresh pure-Python tokenizer's first pass. warm: a fresh one after encoding the"
        "\nother corpus files (steady state of a long-running process on unseen text). seen: the same"
        "\ntext again."
    )

    # Linear time: characters per second must not drop as adversarial inputs grow 10x.
    # Each text on a fresh tokenizer, so that no cache has seen it.
    print(
        "\nlinear time (neoxja compiled, do_clean_text=True, fresh tokenizer), chars/s at 100k and 1M"
        " characters:"
    )
    for label, unit, tail in (
        ("digits", "1234567890", ""),
        ("'<'", "<", ""),
        ("prices", "1,0001,000", "万円"),  # one long number run that ends in a unit
        ("dates", "2000/", "13/1"),  # a long chain of years that never reaches a month
        ("e-mail-ish", "a.b+c_", "@x.y"),  # a long local part, then the "@"
        ("japanese", "\n".join(docs), ""),  # the corpus itself
        ("emoji", emoji_dense(emoji_keys, 10_000), ""),  # emoji-dense text (see below)
    ):
        speeds = []
        for size in (100_000, 1_000_000):
            text = (unit * (size // len(unit) + 1))[: size - len(tail)] + tail
            clean = make("compiled", do_clean_text=True)
            speeds.append(size / best_of(1, lambda text=text, clean=clean: clean.encode(text)))
        print(f"  {label:12}{speeds[0]:14,.0f}{speeds[1]:14,.0f}   ({speeds[1] / speeds[0]:.2f}x)")

    # Emoji-dense text: the reference replaces emoji key by key (4,314 passes over the text), neoxja
    # in one pass. Same text, same run, same ids.
    size = args.emoji_chars
    text = emoji_dense(emoji_keys, size)
    ours = make("compiled")
    if ours.encode(text) != ref.encode(text):
        raise SystemExit("emoji-dense text: ids differ from transformers")
    ref_s = best_of(1, lambda: ref.encode(text))
    ours_s = best_of(args.repeat, lambda: ours.encode(text))
    print(f"\nemoji-dense text ({len(text):,} characters), encode:")
    print(f"  transformers {ref_s:.2f}s, neoxja compiled {ours_s:.3f}s ({ref_s / ours_s:.0f}x)")

    # The batch API on a large batch (every corpus line, --batch-copies times over), compiled path.
    # Wall time for 1 and N processes, interleaved and repeated, next to the same comparison for a
    # busy loop: the speed-up the cores allow at this moment (other jobs on the machine take it).
    batch = [line for doc in files.values() for line in doc.split("\n")] * args.batch_copies
    chars = sum(map(len, batch))
    tok = make("compiled")
    expected = tok.encode_batch(batch)
    if tok.encode_batch(batch, num_workers=args.workers) != expected:
        raise SystemExit("encode_batch with workers differs from one process")
    n_batch = sum(map(len, expected))
    print(f"\nencode_batch of {len(batch)} lines ({chars:,} characters, {n_batch:,} tokens), compiled path:")
    walls: dict[int, list[float]] = {1: [], args.workers: []}
    loops: dict[int, list[float]] = {1: [], args.workers: []}
    cpu = {1: [0.0, 0.0], args.workers: [0.0, 0.0]}
    for _ in range(args.repeat + 1):
        for workers in walls:
            before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            walls[workers].append(best_of(1, lambda w=workers: tok.encode_batch(batch, num_workers=w)))
            after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            for k, (a, b) in enumerate(zip(after, before, strict=True)):
                cpu[workers][k] += a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime
            loops[workers].append(parallel_wall(workers, busy) / workers)
    runs = args.repeat + 1
    for workers, times in walls.items():
        print(
            f"  {workers} process(es): best {min(times):.3f}s wall ({n_batch / min(times):,.0f} tok/s), "
            f"median {sorted(times)[len(times) // 2]:.3f}s; CPU per run {cpu[workers][0] / runs:.2f}s "
            f"here + {cpu[workers][1] / runs:.2f}s in workers"
        )
    speedup = [one / many for one, many in zip(walls[1], walls[args.workers], strict=True)]
    allowed = [one / many for one, many in zip(loops[1], loops[args.workers], strict=True)]
    print(
        f"  speed-up with {args.workers} processes, per round: "
        + ", ".join(f"{x:.2f}x" for x in speedup)
        + f"\n  what the machine allowed (busy loop, {args.workers} processes vs 1, same rounds): "
        + ", ".join(f"{x:.2f}x" for x in allowed)
    )


if __name__ == "__main__":
    main()
