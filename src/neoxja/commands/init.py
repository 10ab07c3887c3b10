"""``neoxja init``: write a randomly initialised model directory, to try things without a download.

The directory holds ``config.json``, the weights and the tokenizer files taken from ``--tokenizer``,
so every loader (``from_pretrained``, ``pipeline``, the CLI) treats it like a real checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neoxja.commands.quantize import add_output_argument, check_output
from neoxja.configuration import PRESETS, GPTNeoXJapaneseConfig

EPILOG = """\
examples:
  neoxja init --size tiny --tokenizer ./abeja-tokenizer -o ./tiny-model
  neoxja generate --model ./tiny-model --max-new-tokens 20 "こんにちは"
  neoxja init --size small --tokenizer ./abeja-tokenizer --dtype bfloat16 --output ./small --overwrite
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``init`` sub-command."""
    parser = subparsers.add_parser(
        "init",
        help="write a randomly initialised model directory (no download needed)",
        description=(
            "Write a model directory with random weights of the chosen size, the tokenizer files of "
            "--tokenizer and a matching config.json: for trying the package and for benchmarks."
        ),
        epilog=EPILOG,
    )
    parser.add_argument("--size", choices=tuple(PRESETS), default="tiny", help="architecture preset")
    parser.add_argument(
        "--tokenizer", required=True, help="directory (or Hub id) with vocab.txt and emoji.json"
    )
    add_output_argument(parser, "the model")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="the weights' dtype"
    )
    parser.set_defaults(func=run_init)


def build_config(size: str, tokenizer: Any) -> GPTNeoXJapaneseConfig:
    """The configuration preset ``size``, with the vocabulary and special ids of ``tokenizer``."""
    # abeja's vocabulary has 31998 entries but special ids up to 31999: the model has 32000 rows.
    special_ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    vocab_size = max([len(tokenizer)] + [token_id + 1 for token_id in special_ids if token_id is not None])
    return GPTNeoXJapaneseConfig.from_preset(
        size, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )


def init_model(config: Any, dtype: Any, seed: int) -> Any:
    """A randomly initialised causal LM, built directly in ``dtype`` (no float32 copy on the side)."""
    import torch

    from neoxja.modeling import GPTNeoXJapaneseForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = GPTNeoXJapaneseForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_init(args: argparse.Namespace) -> int:
    """``neoxja init``: build, initialise and save the model and tokenizer into ``--output``."""
    from neoxja.pipelines import load_tokenizer, resolve_dtype
    from neoxja.saving import replace_directory, write_pretrained

    out = check_output(args)
    tokenizer = load_tokenizer(args.tokenizer)
    config = build_config(args.size, tokenizer)
    model = init_model(config, resolve_dtype(args.dtype), args.seed)
    with replace_directory(out) as staging:  # a failed or killed save leaves no half-written --output
        write_pretrained(model, staging)
        tokenizer.save_pretrained(staging)
    count = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"wrote a random {args.size} model ({count / 1e6:.1f}M parameters, {args.dtype}) to {out}",
        file=sys.stderr,
    )
    return 0
