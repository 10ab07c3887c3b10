"""``neoxja quantize``: write a checkpoint whose linear layers are stored in a smaller format.

The weights are quantized one layer at a time as they are read (the float model is never
resident); 4-bit and int8 checkpoints are in transformers + bitsandbytes' serialization, with the
``quantization_config`` in config.json, so neoxja and transformers both load them without
quantizing again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neoxja.commands.generate import add_model_arguments, check_directories, device_and_dtype

FORMATS = ("nf4", "fp4", "int8", "bfloat16")
EPILOG = """\
example:
  neoxja quantize --model ./gpt-neox-japanese-2.7b --format nf4 --out ./gpt-neox-japanese-2.7b-nf4
  neoxja generate --model ./gpt-neox-japanese-2.7b-nf4 "人とAIが協調するためには、"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` sub-command."""
    parser = subparsers.add_parser(
        "quantize",
        help="write a 4-bit, 8-bit or bfloat16 copy of a model",
        description="Quantize a model's linear layers (all but the output head) and save the result.",
        epilog=EPILOG,
    )
    add_model_arguments(parser, quantize=False)
    parser.add_argument("--format", required=True, choices=FORMATS, help="weight format of the linear layers")
    parser.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="4-bit: store the block scales in 8 bits too (bitsandbytes' double quantization; default: on)",
    )
    parser.add_argument(
        "--out", required=True, help="directory to write (created; must be empty if it exists)"
    )
    parser.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """``neoxja quantize``: load with quantization, save model and tokenizer into ``--out``."""
    from neoxja.auto import AutoModelForCausalLM
    from neoxja.pipelines import load_tokenizer
    from neoxja.quantization.loading import QuantizationPlan, quantized_bytes
    from neoxja.saving import replace_directory, write_pretrained

    check_directories(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty directory")
    device, dtype = device_and_dtype(args)
    plan = QuantizationPlan.from_format(args.format, double_quant=args.double_quant)
    kwargs = (
        {"quantization_config": plan.config} if plan.config is not None else {"weight_format": args.format}
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, **kwargs)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError):
        pass  # a model directory without tokenizer files: the weights alone are written
    with replace_directory(out) as staging:  # a failed or killed save leaves no half-written --out
        write_pretrained(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    size = quantized_bytes(model) / 1e6
    print(f"wrote {args.model} with {args.format} linear layers ({size:.1f} MB of weights) to {out}")
    return 0
