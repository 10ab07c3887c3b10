"""``neoxja tokenize``: print the ids (or tokens) of a text as JSON, for checking what the model sees."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  neoxja tokenize --model ./abeja-tokenizer "吾輩は猫である🐯"
  echo "慶應大学" | neoxja tokenize --model abeja/gpt-neox-japanese-2.7b --tokens -
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tokenize`` sub-command."""
    from neoxja.hub import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "tokenize",
        help="print the token ids (or tokens) of a text as JSON",
        description="Encode TEXT with the model's tokenizer and print the ids (or tokens) as a JSON list.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"directory or Hub id with vocab.txt and emoji.json (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--tokens", action="store_true", help="print the token strings instead of the ids")
    parser.add_argument(
        "--clean", action="store_true", help="do_clean_text: tag URLs, e-mails, dates, prices, ..."
    )
    parser.add_argument(
        "text", metavar="TEXT", help="the text, or - to read it from standard input (less its final newline)"
    )
    parser.set_defaults(func=run_tokenize)


def run_tokenize(args: argparse.Namespace) -> int:
    """Encode the text and print the JSON list; returns the exit status."""
    from neoxja.commands.generate import check_directories, read_text
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    check_directories(args)
    text = read_text(args.text)
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(args.model, do_clean_text=args.clean)
    result = tokenizer.tokenize(text) if args.tokens else tokenizer.encode(text)
    print(json.dumps(result, ensure_ascii=False))
    return 0
