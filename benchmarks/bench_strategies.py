"""Decoding strategies, neoxja vs transformers in the same run: beam search, prompt lookup, an
assistant model. The rows of ``bench_generate.py --strategies`` (this module is its second table).

* **beam search**: ``num_beams=4``, greedy, one 32-token random prompt, 32 new tokens, on random
  weights of the ``tiny`` and ``small`` presets (vocab 32000), float32, both libraries loading one
  save_pretrained. tokens/s = new tokens of the returned sequence / wall time; the sequences and
  ``sequences_scores`` are compared.
* **prompt lookup** (``prompt_lookup_num_tokens`` 3 and 10) on input-grounded tasks from held-out
  corpus text (kokoro.txt, 8 passages of 40 tokens): *continue* (the passage, a line break, its
  first 6 tokens: a model that copies writes the rest of the passage) and *extract* (the passage, a
  line break, 4 tokens from its middle: a model that copies goes on from there, as a summary or an
  extraction quotes its source). With the reference model (``train_reference.py``) and a random
  model of the ``small`` preset, against neoxja's own greedy decoding on the same prompts (the output
  must be identical) and transformers' greedy and prompt lookup. A third prompt, *long text* (the
  first 350 tokens of kokoro.txt, 64 new tokens), is where the random model falls into a loop of
  one phrase early, which lookup then drafts from: the rate of a round when nearly every draft is
  accepted. Neither model copies its input (the reference model loops on its own phrases, the random
  one on one token; an attempt to fine-tune the reference model into a copier failed), so the
  accepted drafts come from the models' own repetitions: the rows measure what a round costs and
  gains at the acceptance these models give, not the acceptance a model that copies would give.
* **assistant**: the reference model drafting for the random ``small`` model (12 layers, hidden 768:
  a larger model that shares nothing with it, so its drafts are rejected: the cost of drafts that
  fail), and the reference model quantized to nf4 drafting for itself in float32 (drafts that
  mostly agree: the case of a quantized copy as the assistant). No trained larger model exists
  here (nothing can be downloaded). The speed-up over the model's own greedy decoding and the
  acceptance rate (``assisted_stats``) are reported.

Every timing is the best of ``--repeats`` runs after a warm-up, the two sides of a row taking
turns.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers

import neoxja
from neoxja.configuration import PRESETS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_reference  # noqa: E402  (the reference model and its prompts are its)

BEAMS, BEAM_PROMPT, BEAM_NEW = 4, 32, 32
LOOKUP_TOKENS, PROMPTS_PER_TASK, PASSAGE = (3, 10), 8, 40


def _best(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each run over ``repeats`` rounds (after one warm-up round); runs take turns."""
    for run in runs:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def beam_rows(repeats: int) -> list[tuple]:
    rows = []
    for name in ("tiny", "small"):
        torch.manual_seed(0)
        config = transformers.GPTNeoXJapaneseConfig(vocab_size=32000, **PRESETS[name])
        reference = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
        with tempfile.TemporaryDirectory() as directory:
            reference.save_pretrained(directory)
            ours = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        ids = torch.randint(0, 31000, (1, BEAM_PROMPT), generator=torch.Generator().manual_seed(0))
        kwargs = dict(
            num_beams=BEAMS,
            do_sample=False,
            max_new_tokens=BEAM_NEW,
            return_dict_in_generate=True,
            output_scores=True,
        )
        with torch.no_grad():
            theirs = reference.generate(ids, **kwargs)
        mine = ours.generate(ids, **kwargs)
        with torch.no_grad():
            ref_time, our_time = _best(
                [partial(reference.generate, ids, **kwargs), partial(ours.generate, ids, **kwargs)], repeats
            )
        new = mine.sequences.shape[1] - BEAM_PROMPT
        same = torch.equal(theirs.sequences, mine.sequences)
        gap = (theirs.sequences_scores - mine.sequences_scores).abs().max().item()
        rows.append(
            (
                f"beam search, {BEAMS} beams",
                name,
                f"- / {new / ref_time:.1f}",
                f"- / {new / our_time:.1f}",
                f"{ref_time / our_time:.2f}x vs transformers",
                f"{'yes' if same else 'NO'} (scores within {gap:.1e})",
                "-",
            )
        )
    return rows


def _random_small(directory: Path) -> Path:
    """A random model of the ``small`` preset with the real tokenizer's vocabulary, saved in ``directory``."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXJapaneseConfig(vocab_size=32000, **PRESETS["small"])
    transformers.GPTNeoXJapaneseForCausalLM(config).save_pretrained(directory)
    return directory


def lookup_tasks(tokenizer: object) -> dict[str, list[tuple[list[int], int]]]:
    """(prompt ids, new tokens) per task, from held-out text (see the module docstring)."""
    lines = (train_reference.CORPUS / "kokoro.txt").read_text(encoding="utf-8").splitlines()
    passages = [ids[:PASSAGE] for ids in map(tokenizer.encode, lines) if len(ids) >= PASSAGE]
    newline = tokenizer.encode("\n")
    tasks: dict[str, list[tuple[list[int], int]]] = {"continue": [], "extract": []}
    for passage in passages[:PROMPTS_PER_TASK]:
        tasks["continue"].append((passage + newline + passage[:6], PASSAGE - 6))
        middle = PASSAGE // 2
        tasks["extract"].append((passage + newline + passage[middle : middle + 4], PASSAGE - middle - 4))
    text = "\n".join(lines)
    tasks["long text, 64 new"] = [(tokenizer.encode(text[:1500])[:350], 64)]
    return tasks


def _run_all(model: torch.nn.Module, prompts: list[tuple[list[int], int]], **kwargs: object) -> list:
    outputs = []
    with torch.no_grad():
        for ids, new in prompts:
            outputs.append(model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, **kwargs))
    return outputs


def lookup_rows(name: str, directory: Path, tokenizer: object, repeats: int) -> list[tuple]:
    reference = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(directory).eval()
    ours = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    rows = []
    for task, prompts in lookup_tasks(tokenizer).items():
        greedy = _run_all(ours, prompts)
        for drafts in LOOKUP_TOKENS:
            lookup = dict(prompt_lookup_num_tokens=drafts)
            same, stats = _check(ours, prompts, lookup, greedy)
            times = _best(
                [
                    partial(_run_all, ours, prompts),
                    partial(_run_all, ours, prompts, **lookup),
                    partial(_run_all, reference, prompts),
                    partial(_run_all, reference, prompts, **lookup),
                ],
                repeats,
            )
            new = sum(n for _, n in prompts)
            ours_plain, ours_lookup, ref_plain, ref_lookup = (new / t for t in times)
            rows.append(
                (
                    f"prompt lookup {drafts}, {task}",
                    name,
                    f"{ref_plain:.1f} / {ref_lookup:.1f}",
                    f"{ours_plain:.1f} / {ours_lookup:.1f}",
                    f"{ours_lookup / ours_plain:.2f}x vs own greedy",
                    "yes" if same else "NO",
                    stats,
                )
            )
    return rows


def _check(
    model: torch.nn.Module, prompts: list[tuple[list[int], int]], settings: dict, greedy: list[torch.Tensor]
) -> tuple[bool, str]:
    """One assisted run per prompt: whether every output equals ``greedy``'s, and the acceptance
    (accepted / drafted, new tokens per verifying forward) from its ``assisted_stats``."""
    outputs = [
        model.generate(
            torch.tensor([ids]), max_new_tokens=new, do_sample=False, return_dict_in_generate=True, **settings
        )
        for ids, new in prompts
    ]
    same = all(torch.equal(out.sequences, plain) for out, plain in zip(outputs, greedy, strict=True))
    stats = [out.assisted_stats for out in outputs]
    accepted = sum(s.accepted for s in stats) / max(sum(s.drafted for s in stats), 1)
    per_round = sum(s.emitted for s in stats) / sum(s.rounds for s in stats)
    return same, f"{accepted:.0%}, {per_round:.1f} tokens/round"


def assistant_rows(reference_dir: Path, small_dir: Path, repeats: int) -> list[tuple]:
    tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(reference_dir)
    load = partial(neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained, dtype=torch.float32)
    reference = load(reference_dir).eval()
    pairs = {
        "reference -> random small": (reference, load(small_dir).eval()),
        "reference nf4 -> reference": (
            load(reference_dir, quantization_config=neoxja.BitsAndBytesConfig(load_in_4bit=True)).eval(),
            reference,
        ),
    }
    prompts = [(tokenizer.encode(text), 32) for text in train_reference.PROMPTS]
    rows = []
    for name, (assistant, target) in pairs.items():
        helped = dict(assistant_model=assistant)
        same, stats = _check(target, prompts, helped, _run_all(target, prompts))
        plain, assisted = _best(
            [partial(_run_all, target, prompts), partial(_run_all, target, prompts, **helped)], repeats
        )
        new = sum(n for _, n in prompts)
        rows.append(
            (
                "assistant model",
                name,
                "-",
                f"{new / plain:.1f} / {new / assisted:.1f}",
                f"{plain / assisted:.2f}x vs own greedy",
                "yes" if same else "NO",
                stats,
            )
        )
    return rows


def strategy_table(repeats: int) -> None:
    """Print the strategies table: beam rows, and the prompt-lookup and assistant rows when the
    reference model (``train_reference.py``) is in its cache directory."""
    rows = beam_rows(repeats)
    train_files, _ = train_reference.corpus_files()
    reference_dir = train_reference.cache_dir(train_files)
    if reference_dir.is_dir():
        tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(reference_dir)
        with tempfile.TemporaryDirectory() as directory:
            small_dir = _random_small(Path(directory))
            rows += lookup_rows("reference", reference_dir, tokenizer, repeats)
            rows += lookup_rows("random small", small_dir, tokenizer, repeats)
            rows += assistant_rows(reference_dir, small_dir, repeats)
    else:
        print(
            f"(no reference model in {reference_dir}: run benchmarks/train_reference.py for the "
            "prompt-lookup and assistant rows)\n"
        )
    header = (
        "strategy",
        "model",
        "transformers tok/s (greedy / strategy)",
        "neoxja tok/s (greedy / strategy)",
        "speed-up",
        "same tokens",
        "drafts accepted",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
