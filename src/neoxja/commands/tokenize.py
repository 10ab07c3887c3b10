"""``neoxja tokenize``: print the ids (or tokens) of a text as JSON, for checking what the model sees."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  neoxja tokenize --tokenizer ./abeja-tokenizer "吾輩は猫である🐯"
  neoxja tokenize --model ./my-model "吾輩は猫である🐯"     # the model directory's tokenizer files
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
        "--model", default=DEFAULT_MODEL, help="model directory or Hub id whose tokenizer files are used"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer directory or Hub id (vocab.txt and emoji.json), used instead of --model's",
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
    from neoxja.hub import HubUnavailableError
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    check_directories(args)
    text = read_text(args.text)
    option = "--model" if args.tokenizer is None else "--tokenizer"
    source = args.model if args.tokenizer is None else args.tokenizer
    try:
        tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(source, do_clean_text=args.clean)
    except HubUnavailableError as err:
        raise HubUnavailableError(f"{err} For example: neoxja tokenize --tokenizer DIR TEXT") from err
    except OSError as err:
        hint = "; give the tokenizer's directory with --tokenizer DIR" if args.tokenizer is None else ""
        raise OSError(f"{option} {source}: {err}{hint}") from err
    result = tokenizer.tokenize(text) if args.tokens else tokenizer.encode(text)
    print(json.dumps(result, ensure_ascii=False))
    return 0
