"""Training-step speed and memory: neoxja against transformers (and peft on transformers for LoRA).

Setup: the "small" preset (hidden 768, 12 layers, 12 heads, vocab 32000), float32, 2 threads, batch 1,
random token ids, AdamW (fused, as transformers' Trainer and neoxja train use it); one step =
forward, backward, optimizer step. Each row runs in a fresh process (so its peak RSS is its own): a
warm-up step, then the best of ``--repeats`` timed steps. The checkpointing table also prints the
bytes of weights, gradients and AdamW state, which every step holds at its peak whatever
activations it saves.
Rows: full fine-tuning at sequence 512 and 2048, with the model's attention dropout (0.1, as
abeja's config) and without it (0.0: neoxja's attention then runs through SDPA's fused kernel, which
keeps no score matrix); LoRA (r 8 on all four projections) at 512; neoxja with
``gradient_checkpointing`` at 2048; and DDP with 2 processes (torchrun, gloo) against 1.

    python benchmarks/bench_train.py [--repeats 2] [--skip-ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
ASSETS = os.environ.get("NEOXJA_ASSETS", str(HERE.parents[2] / "shared" / "assets" / "abeja-tokenizer"))


def child(library: str, seq: int, dropout: float, lora: bool, checkpointing: bool, repeats: int) -> dict:
    """Time training steps of one library in this process; returns tokens/s and peak RSS."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from neoxja.configuration import PRESETS

    fields = dict(PRESETS["small"], vocab_size=32000, attention_dropout=dropout, hidden_dropout=0.0)
    torch.manual_seed(0)
    if library == "transformers":
        import transformers

        model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**fields))
    else:
        import neoxja

        model = neoxja.GPTNeoXJapaneseForCausalLM(neoxja.GPTNeoXJapaneseConfig(**fields))
        if checkpointing:
            model.gradient_checkpointing_enable()
    if lora:
        import peft

        targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    model.train()
    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(1))
    if library == "transformers":
        # fused: what transformers' Trainer uses by default (optim="adamw_torch_fused")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        from neoxja.tuner.optim import make_optimizer
        from neoxja.tuner.trainer import token_loss_sum

        optimizer = make_optimizer(model, 1e-5, 0.0)

        def step() -> None:  # what neoxja train runs per micro-batch and step
            loss, count = token_loss_sum(model, ids, ids)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    from bench_generate import best_seconds

    best = best_seconds(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    return {"tokens_per_s": seq / best, "peak_rss_gb": peak}


def measure(
    library: str, seq: int, dropout: float, repeats: int, lora: bool = False, ckpt: bool = False
) -> dict:
    command = [
        sys.executable,
        str(HERE),
        "--child",
        library,
        str(seq),
        str(dropout),
        str(int(lora)),
        str(int(ckpt)),
    ]
    done = subprocess.run([*command, "--repeats", str(repeats)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def ddp_rows(repeats: int) -> tuple[float, float]:
    """Tokens/s of ``neoxja train`` with 1 process (2 threads) and with 2 DDP processes (1 thread each),
    the same global batch (4 blocks of 256 tokens per step), on the small preset without dropout."""
    import torch
    import transformers

    from neoxja.configuration import PRESETS

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        config = transformers.GPTNeoXJapaneseConfig(
            **PRESETS["small"], vocab_size=32000, attention_dropout=0.0
        )
        torch.manual_seed(0)
        transformers.GPTNeoXJapaneseForCausalLM(config).save_pretrained(model_dir)
        data = Path(tmp) / "data.txt"
        data.write_text("吾輩は猫である。名前はまだ無い。" * 2000, encoding="utf-8")
        for processes, batch in ((1, 4), (2, 2)):
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
            out = Path(tmp) / f"run{processes}"
            args = [
                "--model",
                str(model_dir),
                "--tokenizer",
                ASSETS,
                "--data",
                str(data),
            ]
            args += [
                "--out",
                str(out),
                "--steps",
                str(repeats + 1),
                "--batch-size",
                str(batch),
                "--seq-len",
                "256",
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
            command = [sys.executable, *(launcher if processes > 1 else []), "-m", "neoxja", "train", *args]
            subprocess.run([*command, "--no-progress"], check=True, capture_output=True, env=env)
            log = [json.loads(line) for line in (out / "metrics.jsonl").open()]
            results.append(max(record["tokens_per_s"] for record in log[1:]))
    return results[0], results[1]


def state_gb() -> float:
    """Float32 weights + gradients + AdamW's two moments of the small preset, in GB."""
    import torch

    import neoxja
    from neoxja.configuration import PRESETS

    with torch.device("meta"):
        model = neoxja.GPTNeoXJapaneseForCausalLM(
            neoxja.GPTNeoXJapaneseConfig(**PRESETS["small"], vocab_size=32000)
        )
    return 4 * 4 * sum(p.numel() for p in model.parameters()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ddp", action="store_true")
    args = parser.parse_args()
    if args.child:
        library, seq, dropout, lora, ckpt = args.child
        print(json.dumps(child(library, int(seq), float(dropout), lora == "1", ckpt == "1", args.repeats)))
        return

    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 2 threads, float32, batch 1")
    print(
        "\n| step | seq | attention dropout | neoxja tok/s | reference tok/s | speed ratio | "
        "neoxja peak RSS GB | reference peak RSS GB | RSS ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    plain = {}
    for seq, dropout in ((512, 0.1), (512, 0.0), (2048, 0.1), (2048, 0.0)):
        ours, theirs = (
            measure("neoxja", seq, dropout, args.repeats),
            measure("transformers", seq, dropout, args.repeats),
        )
        plain[seq, dropout] = ours
        print(
            f"| full | {seq} | {dropout} | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | "
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {ours['peak_rss_gb']:.2f} | "
            f"{theirs['peak_rss_gb']:.2f} | {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f} |",
            flush=True,
        )
    ours, theirs = (
        measure("neoxja", 512, 0.1, args.repeats, lora=True),
        measure("transformers", 512, 0.1, args.repeats, lora=True),
    )
    print(
        f"| LoRA (peft) | 512 | 0.1 | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | "
        f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {ours['peak_rss_gb']:.2f} | "
        f"{theirs['peak_rss_gb']:.2f} | {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f} |",
        flush=True,
    )
    print(
        f"\nweights + gradients + AdamW state (float32): {state_gb():.2f} GB, held at every step's peak"
        "\n\n| neoxja at seq 2048 | attention dropout | tok/s | peak RSS GB | peak vs without checkpointing |"
    )
    print("|---|---:|---:|---:|---:|")
    for dropout in (0.1, 0.0):
        ckpt = measure("neoxja", 2048, dropout, args.repeats, ckpt=True)
        without = plain[2048, dropout]
        print(
            f"| gradient_checkpointing | {dropout} | {ckpt['tokens_per_s']:.0f} | "
            f"{ckpt['peak_rss_gb']:.2f} | "
            f"{100 * (1 - ckpt['peak_rss_gb'] / without['peak_rss_gb']):.0f}% lower |",
            flush=True,
        )
    if not args.skip_ddp:
        one, two = ddp_rows(args.repeats)
        print("\n| neoxja train, small preset, 4 x 256 tokens per step | tok/s | vs 1 process |")
        print("|---|---:|---:|")
        print(f"| 1 process, 2 threads | {one:.0f} | 1.00x |")
        print(f"| 2 DDP processes (gloo), 1 thread each | {two:.0f} | {two / one:.2f}x (2 cores allow ~1x) |")


if __name__ == "__main__":
    main()
