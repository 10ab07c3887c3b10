"""``neoxja train``: fine-tune a model (every weight, or a LoRA adapter) on text files.

Runs as one process, or data-parallel under ``torchrun --nproc-per-node N -m neoxja train ...``
(DDP; ``--fsdp`` shards the model). Every option is checked, and every data file read and checked,
before the first step.
"""

from __future__ import annotations

import argparse

from neoxja.commands.generate import check_directories, device_argument, positive
from neoxja.tuner import LORA_TARGETS, SCHEDULES

EPILOG = """\
data: .txt files (a document each, or one per line with --line-per-document), .jsonl with
{"text": ...} or {"prompt": ..., "completion": ...} lines (the loss covers the completion only).

examples:
  neoxja train --model ./tiny-model --data corpus/*.txt --line-per-document --out ./run --steps 300
  neoxja train --model ./my-model --data train.jsonl --eval-data dev.jsonl --eval-every 100 \\
      --lora --lora-r 16 --out ./adapter --epochs 2 --merge
  torchrun --nproc-per-node 2 -m neoxja train --model ./my-model --data train.jsonl --out ./run
  neoxja train --model ./my-model --data train.jsonl --out ./run --resume ./run
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (full or LoRA) on .txt/.jsonl data",
        description="Fine-tune --model on --data and write the result (model or adapter) into --out.",
        epilog=EPILOG,
    )
    where = parser.add_argument_group("model and data")
    where.add_argument("--model", required=True, help="model directory or Hub id to start from")
    where.add_argument(
        "--tokenizer", default=None, help="tokenizer directory, if the model directory has none"
    )
    where.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help=".txt/.jsonl files or directories"
    )
    where.add_argument("--eval-data", nargs="+", default=None, metavar="PATH", help="held-out data")
    where.add_argument(
        "--line-per-document", action="store_true", help="each line of a .txt file is a document"
    )
    where.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, result)")
    where.add_argument(
        "--device", type=device_argument, default=None, help="auto (default), cpu, cuda, cuda:N"
    )
    where.add_argument("--workers", type=positive(int), default=1, help="tokenizer processes (default: 1)")

    length = parser.add_argument_group("length and batches")
    length.add_argument("--steps", type=positive(int), default=None, help="optimizer steps")
    length.add_argument(
        "--epochs", type=positive(float), default=None, help="passes over the data (default: 1)"
    )
    length.add_argument(
        "--batch-size", type=positive(int), default=8, help="blocks per process and micro-batch"
    )
    length.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per step")
    length.add_argument("--seq-len", type=positive(int), default=512, help="tokens per block (default: 512)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=positive(float), default=5e-5, help="peak learning rate (default: 5e-5)")
    optim.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default: 0)")
    optim.add_argument(
        "--schedule", choices=SCHEDULES, default="cosine", help="after warm-up (default: cosine)"
    )
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of the matrices")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    optim.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="autocast dtype"
    )
    optim.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    optim.add_argument("--seed", type=int, default=0, help="data order, dropout and initialisation")

    lora = parser.add_argument_group("LoRA (needs pip install 'neoxja[train]')")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    lora.add_argument("--lora-r", type=positive(int), default=8, help="rank (default: 8)")
    lora.add_argument(
        "--lora-alpha", type=positive(float), default=16.0, help="scale alpha / r (default: 16)"
    )
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input")
    lora.add_argument(
        "--lora-target",
        nargs="+",
        choices=LORA_TARGETS,
        default=list(LORA_TARGETS),
        help="layers to adapt (default: all)",
    )
    lora.add_argument("--merge", action="store_true", help="also write the base with the adapter merged")
    lora.add_argument(
        "--quantize",
        choices=("nf4", "fp4", "int8", "bfloat16"),
        default=None,
        help="QLoRA: the base's linear layers in this format, frozen, under the adapter",
    )

    runs = parser.add_argument_group("evaluation, checkpoints, scale-out")
    runs.add_argument("--eval-every", type=positive(int), default=None, help="held-out loss every N steps")
    runs.add_argument("--save-every", type=positive(int), default=None, help="checkpoint every N steps")
    runs.add_argument("--resume", default=None, help="a checkpoint, or --out of an earlier run (its latest)")
    runs.add_argument("--log-every", type=positive(int), default=1, help="metrics.jsonl line every N steps")
    runs.add_argument("--fsdp", action="store_true", help="shard the model over torchrun's processes (FSDP2)")
    runs.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train as the options say; print where the result is."""
    from neoxja.tuner.distributed import is_main_process
    from neoxja.tuner.lora import LoraArguments
    from neoxja.tuner.run import train

    check_directories(args)
    lora = None
    if args.lora:
        lora = LoraArguments(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_target))
    elif args.merge:
        raise ValueError("--merge merges a LoRA adapter: add --lora")
    tokenizer = None
    if args.tokenizer is not None:
        from neoxja.auto import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    result = train(
        args.model,
        args.data,
        args.out,
        tokenizer=tokenizer,
        eval_data=args.eval_data,
        seq_len=args.seq_len,
        per_line=args.line_per_document,
        num_workers=args.workers,
        lora=lora,
        merge=args.merge,
        device=args.device,
        quantize=args.quantize,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None,
        dtype=args.dtype,
        grad_checkpointing=args.grad_checkpointing,
        eval_every=args.eval_every,
        save_every=args.save_every,
        log_every=args.log_every,
        seed=args.seed,
        resume=args.resume,
        fsdp=args.fsdp,
        progress=not args.no_progress,
    )
    what = "adapter" if lora is not None else "model"
    summary = f"trained {result.step} steps; {what} written to {args.out}"
    if result.eval_loss is not None:
        summary += f"; held-out loss {result.eval_loss:.4f}"
    if is_main_process():
        print(summary)
    return 0

