"""Quality of each weight format on the reference model (benchmarks/train_reference.py): held-out
perplexity against float32, and transformers + bitsandbytes nf4 on the same model, in the same run;
then greedy continuations of a few prompts side by side.

Formats: neoxja float32, bfloat16, int8, nf4 and fp4 (both with double quantization, the seed's
settings), and transformers + bitsandbytes with the seed's nf4 config (its float16 compute on this
CPU). Perplexity: windows of 512 tokens, stride 512, on the held-out files train_reference scores.

    python benchmarks/quant_quality.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import neoxja
from neoxja.evaluation.perplexity import perplexity

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_reference import PROMPTS, cache_dir, corpus_files  # noqa: E402

SEED = dict(
    load_in_4bit=True,
    bnb_4bit_use_double_quant=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype="float16",
)


def neoxja_model(path: Path, name: str) -> torch.nn.Module:
    if name == "float32":
        return neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(path, dtype=torch.float32)
    if name in ("nf4", "fp4"):
        config = neoxja.BitsAndBytesConfig(**{**SEED, "bnb_4bit_quant_type": name})
        return neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=config
        )
    return neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(path, dtype=torch.float32, weight_format=name)


def transformers_nf4(path: Path) -> torch.nn.Module:
    import transformers

    config = transformers.BitsAndBytesConfig(**SEED)
    return transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(path, quantization_config=config).eval()


def main() -> None:
    torch.set_num_threads(2)
    train_files, held_out = corpus_files()
    path = cache_dir(train_files)
    if not path.is_dir():
        raise SystemExit(f"no reference model in {path}: run benchmarks/train_reference.py first")
    tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(path)
    texts = {f.name: f.read_text(encoding="utf-8") for f in held_out}
    rows, samples = [], {}
    names = ["float32", "bfloat16", "int8", "nf4", "fp4", "transformers+bnb nf4"]
    for name in names:
        model = transformers_nf4(path) if name.startswith("transformers") else neoxja_model(path, name)
        started = time.perf_counter()
        with torch.no_grad():
            scores = {
                f: perplexity(model, tokenizer, t, max_length=512, stride=512).perplexity
                for f, t in texts.items()
            }
            samples[name] = []
            for prompt in PROMPTS:
                ids = tokenizer.encode(prompt, return_tensors="pt")
                output = model.generate(ids, max_new_tokens=30, do_sample=False)
                samples[name].append(tokenizer.decode(output[0], skip_special_tokens=True))
        rows.append((name, scores, time.perf_counter() - started))
    base = rows[0][1]
    bnb = rows[-1][1]
    files = list(texts)
    print(f"reference model {path.name}; torch {torch.__version__}, 2 threads")
    print(
        "| weights | " + " | ".join(f"ppl {f}" for f in files) + " | vs float32 | vs transformers+bnb nf4 |"
    )
    print("|---|" + "---:|" * (len(files) + 2))
    for name, scores, _ in rows:
        rel = max(scores[f] / base[f] - 1 for f in files)
        vs_bnb = max(abs(scores[f] / bnb[f] - 1) for f in files)
        cells = " | ".join(f"{scores[f]:.2f}" for f in files)
        print(f"| {name} | {cells} | {rel * 100:+.2f}% | {vs_bnb * 100:.2f}% |")
    print("\n(vs float32: the larger relative change over the files; vs bnb: the larger absolute one)\n")
    for i, prompt in enumerate(PROMPTS):
        print(f"prompt {prompt!r}:")
        for name in names:
            print(f"- {name}: {samples[name][i]!r}")


if __name__ == "__main__":
    main()
