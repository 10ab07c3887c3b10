"""``neoxja visualize-mask``: print which tokens may attend to which, optionally as a PNG."""

from __future__ import annotations

import argparse
import sys

from neoxja.commands.generate import add_model_arguments, check_directories, device_and_dtype
from neoxja.hub import HubUnavailableError

EPILOG = """\
examples:
  neoxja visualize-mask "吾輩は猫である。"
  neoxja visualize-mask --model ./tiny-model "短い文" "もう少し長い文です。"   # a left-padded batch
  neoxja visualize-mask --model ./tiny-model --png attn.png --layer 0 --head 3 "吾輩は猫である。"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``visualize-mask`` sub-command."""
    parser = subparsers.add_parser(
        "visualize-mask",
        help="print the attention mask of some text (and draw it as a PNG)",
        description=(
            "Print, for each TEXT, the grid of which tokens may attend to which under the model's causal "
            "mask. Several TEXTs form one left-padded batch, one grid per row. --png draws the mask, or with "
            "--layer and --head that head's attention weights (this loads the weights; needs neoxja[viz])."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("texts", metavar="TEXT", nargs="+", help="text(s) to tokenize and show")
    add_model_arguments(parser, quantize=False)
    parser.add_argument("--png", default=None, help="also write an image to this file")
    parser.add_argument("--layer", type=int, default=None, help="layer whose attention weights --png draws")
    parser.add_argument("--head", type=int, default=None, help="head whose attention weights --png draws")
    parser.add_argument("--no-color", action="store_true", help="no ANSI colours even on a terminal")
    parser.set_defaults(func=run_visualize)


def run_visualize(args: argparse.Namespace) -> int:
    """``neoxja visualize-mask``: print the grid(s), then write the PNG if asked."""
    from neoxja.utils.attention_visualizer import AttentionMaskVisualizer

    if (args.layer is None) != (args.head is None):
        raise ValueError("--layer and --head go together (they pick the attention weights that --png draws)")
    if args.layer is not None and args.png is None:
        raise ValueError("--layer/--head choose what --png draws; give --png FILE too")
    check_directories(args)
    device, dtype = device_and_dtype(args)
    try:
        visualizer = AttentionMaskVisualizer(
            args.model, args.tokenizer, dtype=dtype, device=device, color=False if args.no_color else None
        )
    except HubUnavailableError as err:
        raise HubUnavailableError(
            f"{err} For example: neoxja visualize-mask --model /path/to/model TEXT"
        ) from err
    texts = args.texts[0] if len(args.texts) == 1 else args.texts
    try:
        visualizer(texts, png=args.png, layer=args.layer, head=args.head)
    except ImportError as err:
        print(f"neoxja visualize-mask: error: {err}", file=sys.stderr)
        return 2
    if args.png is not None:
        print(f"wrote {args.png}", file=sys.stderr)
    return 0
