"""``neoxja visualize-mask``: print which tokens may attend to which, optionally as a PNG."""

from __future__ import annotations

import argparse
import sys

from neoxja.commands.generate import (
    add_model_arguments,
    check_directories,
    device_and_dtype,
    hub_example,
    positive,
)

DEFAULT_DPI = 150  # neoxja.utils.attention_visualizer's (that module imports torch: not at start-up)
DEFAULT_FONT_SIZE = 10.0

EPILOG = """\
examples:
  neoxja visualize-mask "吾輩は猫である。"
  neoxja visualize-mask --model ./tiny-model "短い文" "もう少し長い文です。"   # a left-padded batch
  neoxja visualize-mask --model ./tiny-model -o attn.png --layer 0 --head 3 "吾輩は猫である。"
  neoxja visualize-mask --model ./tiny-model -o mask.png --dpi 300 --font-size 12 "吾輩は猫である。"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``visualize-mask`` sub-command."""
    parser = subparsers.add_parser(
        "visualize-mask",
        help="print the attention mask of some text (and draw it as a PNG)",
        description=(
            "Print, for each TEXT, the grid of which tokens may attend to which under the model's causal "
            "mask. Several TEXTs form one left-padded batch, one grid per row. --output draws the mask as a "
            "PNG, or with --layer and --head that head's attention weights (this loads the weights; needs "
            "neoxja[viz])."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("texts", metavar="TEXT", nargs="+", help="text(s) to tokenize and show")
    add_model_arguments(parser, quantize=False)
    parser.add_argument(
        "--output", "-o", "--png", dest="output", default=None, metavar="FILE", help="also write a PNG image"
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer whose attention weights --output draws (default: the mask)",
    )
    parser.add_argument("--head", type=int, default=None, help="head whose attention weights --output draws")
    parser.add_argument(
        "--dpi", type=positive(float), default=DEFAULT_DPI, help="the image's resolution, pixels per inch"
    )
    parser.add_argument(
        "--font-size",
        type=positive(float),
        default=DEFAULT_FONT_SIZE,
        help="points of the image's token labels; the image grows to fit them",
    )
    parser.add_argument("--no-color", action="store_true", help="no ANSI colours even on a terminal")
    parser.set_defaults(func=run_visualize)


def run_visualize(args: argparse.Namespace) -> int:
    """``neoxja visualize-mask``: print the grid(s), then write the PNG if asked."""
    from neoxja.utils.attention_visualizer import AttentionMaskVisualizer

    if (args.layer is None) != (args.head is None):
        raise ValueError("--layer and --head go together (they pick the attention weights that --png draws)")
    if args.layer is not None and args.output is None:
        raise ValueError("--layer/--head choose what --output draws; give --output FILE too")
    check_directories(args)
    device, dtype = device_and_dtype(args)
    with hub_example("neoxja visualize-mask --model /path/to/model TEXT"):
        visualizer = AttentionMaskVisualizer(
            args.model, args.tokenizer, dtype=dtype, device=device, color=False if args.no_color else None
        )
    texts = args.texts[0] if len(args.texts) == 1 else args.texts
    try:
        visualizer(
            texts,
            png=args.output,
            layer=args.layer,
            head=args.head,
            dpi=args.dpi,
            font_size=args.font_size,
        )
    except ImportError as err:
        print(f"neoxja visualize-mask: error: {err}", file=sys.stderr)
        return 2
    if args.output is not None:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
