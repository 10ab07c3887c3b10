"""``neoxja quantize``: write a checkpoint whose linear layers are stored in a smaller format.

The weights are quantized one layer at a time as they are read (the float model is never
resident); 4-bit and int8 checkpoints are in transformers + bitsandbytes' serialization, with the
``quantization_config`` in config.json, so neoxja and transformers both load them without
quantizing again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neoxja.commands.generate import add_model_arguments, check_directories, device_and_dtype, hub_example

FORMATS = ("nf4", "fp4", "int8", "bfloat16")
EPILOG = """\
examples:
  neoxja quantize --model ./gpt-neox-japanese-2.7b --quantize nf4 -o ./gpt-neox-japanese-2.7b-nf4
  neoxja generate --model ./gpt-neox-japanese-2.7b-nf4 "人とAIが協調するためには、"
  neoxja quantize --model ./my-model --quantize int8 --output ./my-model-int8 --overwrite
"""


def add_output_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--output/-o`` (alias ``--out``) and ``--overwrite``, for a command that writes a model directory."""
    parser.add_argument(
        "--output",
        "-o",
        "--out",
        dest="output",
        required=True,
        metavar="DIR",
        help=f"directory to write {what} into (created; an existing one must be empty, or see --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output: the model and tokenizer files there are replaced, other "
        "files are kept",
    )


def check_output(args: argparse.Namespace) -> Path:
    """``--output`` as a path, refused (before anything loads) when it is a file, or a non-empty
    directory without ``--overwrite``: writing there would replace a model unasked."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(
            f"--output {out} is not empty: pass --overwrite to replace the model there, or give another "
            "directory"
        )
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` sub-command."""
    parser = subparsers.add_parser(
        "quantize",
        help="write a 4-bit, 8-bit or bfloat16 copy of a model",
        description="Quantize a model's linear layers (all but the output head) and save the result.",
        epilog=EPILOG,
    )
    add_model_arguments(parser, quantize=False)
    parser.add_argument(
        "--quantize",
        "--format",
        dest="quantize",
        required=True,
        choices=FORMATS,
        metavar="FORMAT",
        help=f"weight format of the linear layers: {', '.join(FORMATS)}",
    )
    parser.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="4-bit: store the block scales in 8 bits too (bitsandbytes' double quantization)",
    )
    add_output_argument(parser, "the quantized model")
    parser.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """``neoxja quantize``: load with quantization, save model and tokenizer into ``--output``."""
    from neoxja.auto import AutoModelForCausalLM
    from neoxja.pipelines import load_tokenizer
    from neoxja.quantization.loading import QuantizationPlan, check_requested_format, quantized_bytes
    from neoxja.saving import replace_directory, write_pretrained

    check_directories(args)
    out = check_output(args)
    device, dtype = device_and_dtype(args)
    plan = QuantizationPlan.from_format(args.quantize, double_quant=args.double_quant)
    kwargs = (
        {"quantization_config": plan.config} if plan.config is not None else {"weight_format": args.quantize}
    )
    example = f"neoxja quantize --model /path/to/gpt-neox-japanese-2.7b --quantize {args.quantize} -o DIR"
    with hub_example(example):
        check_requested_format(args.model, args.quantize, "--quantize")  # before any weight is read
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, **kwargs)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError):
        pass  # a model directory without tokenizer files: the weights alone are written
    with replace_directory(out) as staging:  # a failed or killed save leaves no half-written --output
        write_pretrained(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    size = quantized_bytes(model) / 1e6
    print(
        f"wrote {args.model} with {args.quantize} linear layers ({size:.1f} MB of weights) to {out}",
        file=sys.stderr,
    )
    return 0
