"""``neoxja train``: fine-tune a model (every weight, or a LoRA adapter) on text files.

Runs as one process, or data-parallel under ``torchrun --nproc-per-node N -m neoxja train ...``
(DDP; ``--fsdp`` shards the model). Every option is checked, and every data file read and checked,
before the first step.
"""

from __future__ import annotations

import argparse
import sys

from neoxja.commands.generate import MODEL_EXAMPLE, check_directories, device_argument, hub_example, positive
from neoxja.hub import DEFAULT_MODEL
from neoxja.tuner import LORA_TARGETS, SCHEDULES

EPILOG = """\
data: .txt files (a document each, or one per line with --line-per-document), .jsonl with
{"text": ...}, {"prompt": ..., "completion": ...} (the loss covers the completion only) or
{"messages": [{"role": ..., "content": ...}, ...]} lines (rendered by the chat template that
neoxja chat and serve use; the loss covers the assistant's turns only).

--output must be new or empty: --resume DIR continues the run in DIR, --overwrite starts over
(removing the earlier run's checkpoints, metrics.jsonl and result).

examples:
  neoxja train --model ./tiny-model --data corpus/*.txt --line-per-document -o ./run --steps 300
  neoxja train --model ./my-model --data chats.jsonl --eval-data dev.jsonl --eval-every 100 \\
      --lora --lora-r 16 -o ./adapter --epochs 2 --merge
  neoxja train --model ./my-model --data train.jsonl --lora --quantize nf4 -o ./qlora   # QLoRA
  neoxja train --model ./my-model --data train.jsonl -o ./run --steps 2000 --save-every 200 \\
      --save-total-limit 2 --mixed-precision bf16
  neoxja train --model ./my-model --data train.jsonl -o ./run --steps 4000 --resume ./run
  torchrun --nproc-per-node 2 -m neoxja train --model ./my-model --data train.jsonl -o ./run
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (full or LoRA) on .txt/.jsonl data",
        description="Fine-tune --model on --data and write the result (model or adapter) into --output.",
        epilog=EPILOG,
    )
    where = parser.add_argument_group("model and data")
    where.add_argument("--model", default=DEFAULT_MODEL, help="model directory or Hub id to start from")
    where.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer directory, if the model directory has none",
    )
    where.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help=".txt/.jsonl files or directories"
    )
    where.add_argument("--eval-data", nargs="+", default=None, metavar="PATH", help="held-out data")
    where.add_argument(
        "--line-per-document", action="store_true", help="each line of a .txt file is a document"
    )
    where.add_argument(
        "--output",
        "-o",
        "--out",
        dest="output",
        required=True,
        metavar="DIR",
        help="output directory (checkpoints, metrics.jsonl, result): new or empty, unless --resume "
        "continues the run there or --overwrite starts over",
    )
    where.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty --output: remove its earlier run (checkpoints, metrics, result)",
    )
    where.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype the weights are loaded and trained in (any but float32 needs --mixed-precision as well)",
    )
    where.add_argument(
        "--device", type=device_argument, default=None, help="auto (default), cpu, cuda, cuda:N"
    )
    where.add_argument("--workers", type=positive(int), default=1, help="tokenizer processes")

    length = parser.add_argument_group("length and batches")
    length.add_argument(
        "--steps",
        type=positive(int),
        default=None,
        help="optimizer steps (default: those of --epochs); with --resume, more steps than the first "
        "run continue on the schedule of the longer run",
    )
    length.add_argument(
        "--epochs", type=positive(float), default=None, help="passes over the data (default: 1)"
    )
    length.add_argument(
        "--batch-size", type=positive(int), default=8, help="blocks per process and micro-batch"
    )
    length.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per step")
    length.add_argument("--seq-len", type=positive(int), default=512, help="tokens per block")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=positive(float), default=5e-5, help="peak learning rate")
    optim.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default: 0)")
    optim.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="after warm-up")
    optim.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW decay of the matrices (default: 0.0)"
    )
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    optim.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default=None,
        help="autocast the forward to bf16, or fp16 (GPUs, with a gradient scaler) (default: no); "
        "train's --dtype meant this before",
    )
    optim.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    optim.add_argument(
        "--seed", type=int, default=0, help="data order, dropout and initialisation (default: 0)"
    )

    lora = parser.add_argument_group("LoRA (needs pip install 'neoxja[train]')")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    lora.add_argument("--lora-r", type=positive(int), default=8, help="rank")
    lora.add_argument("--lora-alpha", type=positive(float), default=16.0, help="scale alpha / r")
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
        help="QLoRA: the base's linear layers in this format, frozen, under the adapter (needs --lora)",
    )

    runs = parser.add_argument_group("evaluation, checkpoints, scale-out")
    runs.add_argument(
        "--eval-every",
        type=positive(int),
        default=None,
        help="held-out loss every N steps, on stderr and in metrics.jsonl "
        "(default: 10 times a run with --eval-data)",
    )
    runs.add_argument(
        "--save-every", type=positive(int), default=None, help="checkpoint every N steps (default: none)"
    )
    runs.add_argument(
        "--save-total-limit",
        type=positive(int),
        default=None,
        metavar="N",
        help="keep the N newest checkpoints, removing older ones once a new one is written "
        "(default: keep all)",
    )
    runs.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="a checkpoint, or the --output of an earlier run (its latest); --output may be that run's",
    )
    runs.add_argument("--log-every", type=positive(int), default=1, help="metrics.jsonl line every N steps")
    runs.add_argument("--fsdp", action="store_true", help="shard the model over torchrun's processes (FSDP2)")
    runs.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train as the options say; say where the result is (on stderr: the result is the directory).

    Every check that needs no model or data comes first: the options and peft for --lora here,
    --output and the data files in :func:`neoxja.train`, before it loads the model.
    """
    from neoxja.tuner.distributed import is_main_process
    from neoxja.tuner.lora import LoraArguments, check_peft
    from neoxja.tuner.run import check_weight_dtype, train

    check_directories(args)
    if args.merge and not args.lora:
        raise ValueError("--merge merges a LoRA adapter: add --lora")
    if args.eval_every is not None and args.eval_data is None:
        raise ValueError("--eval-every sets how often the held-out loss is computed: add --eval-data")
    if args.quantize is not None and not args.lora:
        raise ValueError("--quantize trains a LoRA adapter on frozen quantized weights (QLoRA): add --lora")
    check_weight_dtype(args.dtype, args.mixed_precision is not None)
    lora = None
    if args.lora:
        try:
            check_peft()
        except ImportError as err:
            raise ValueError(str(err)) from None
        lora = LoraArguments(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_target))
        lora.validate()
    tokenizer = None
    if args.tokenizer is not None:
        from neoxja.auto import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with hub_example(f"neoxja train {MODEL_EXAMPLE}"):
        result = train(
            args.model,
            args.data,
            args.output,
            tokenizer=tokenizer,
            eval_data=args.eval_data,
            seq_len=args.seq_len,
            per_line=args.line_per_document,
            num_workers=args.workers,
            lora=lora,
            merge=args.merge,
            device=args.device,
            quantize=args.quantize,
            dtype=args.dtype,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            warmup=args.warmup,
            schedule=args.schedule,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None,
            mixed_precision=args.mixed_precision or "no",
            grad_checkpointing=args.grad_checkpointing,
            eval_every=args.eval_every,
            save_every=args.save_every,
            save_total_limit=args.save_total_limit,
            overwrite_output_dir=args.overwrite,
            log_every=args.log_every,
            seed=args.seed,
            resume=args.resume,
            fsdp=args.fsdp,
            progress=not args.no_progress,
        )
    what = "adapter" if lora is not None else "model"
    summary = f"trained {result.step} steps; {what} written to {args.output}"
    if result.eval_loss is not None:
        summary += f"; held-out loss {result.eval_loss:.4f}"
    if is_main_process():
        print(summary, file=sys.stderr)
    return 0
