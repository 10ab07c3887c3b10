"""``neoxja perplexity``: sliding-window perplexity and bits per character of text files.

Each FILE is read as UTF-8 (exactly its bytes: no newline translation), tokenised whole and scored
on its own, with no context carried from one file to the next; the total adds up the files'
scored tokens, NLLs and characters. See :mod:`neoxja.evaluation.perplexity` for which tokens
each window scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neoxja.commands.generate import add_model_arguments, check_directories, load
from neoxja.jsonfile import decode_utf8

EPILOG = """\
Token perplexity is exp(total NLL / tokens scored); bits/char is the total NLL in bits divided by
the characters (Unicode code points) of the files as read. Windows of --max-length tokens start
every --stride tokens; each scores only the tokens after the previous window's end, with the
tokens before them as context (the first window scores all of its tokens but the first).

On a terminal a progress bar on stderr counts each file's windows and the tokens per second through
the model (--no-progress hides it); the results go to stdout.

examples:
  neoxja perplexity --model ./gpt-neox-japanese-2.7b neko.txt
  neoxja perplexity --model ./my-model --max-length 1024 --stride 512 --batch-size 4 a.txt b.txt
  neoxja perplexity --model ./my-model --json test.txt > ppl.json
  neoxja perplexity --model ./my-model --quantize nf4 --output ppl.json test.txt
"""

# The window options, by the names the Python API's messages use.
OPTIONS = {"max_length": "--max-length", "stride": "--stride", "batch_size": "--batch-size"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``perplexity`` sub-command."""
    parser = subparsers.add_parser(
        "perplexity",
        help="sliding-window perplexity and bits per character of text files",
        description="Score each FILE with the model: tokens, token perplexity and bits per character, "
        "per file and in total.",
        epilog=EPILOG,
    )
    parser.add_argument("files", metavar="FILE", nargs="+", help="UTF-8 text file to score")
    add_model_arguments(parser)
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per window (default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="tokens between window starts (default: --max-length)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--output", "-o", default=None, metavar="PATH", help="also write the JSON object to PATH"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal)")
    parser.set_defaults(func=run_perplexity)


def _check_output(path: str) -> Path:
    """The ``--output`` file, its directory created now so that a long run cannot fail at its end."""
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"--output {path} is a directory: give a file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def read_file(path: str) -> str:
    """The text of ``path`` decoded as UTF-8; ValueError naming the file if it is not UTF-8 or empty."""
    text = decode_utf8(Path(path).read_bytes(), path)  # as read: a byte-order mark counts as a character
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def check_options(args: argparse.Namespace, max_positions: int | None = None) -> None:
    """The Python API's checks of the window options, its messages naming the options."""
    from neoxja.evaluation.perplexity import check_settings

    try:
        check_settings(args.max_length, args.stride, args.batch_size, max_positions)
    except ValueError as err:
        message = str(err)
        for name, option in OPTIONS.items():
            message = message.replace(name, option)
        raise ValueError(message) from None


def run_perplexity(args: argparse.Namespace) -> int:
    """``neoxja perplexity``: score each FILE, print a table (or ``--json``), per file and total."""
    from neoxja.evaluation.perplexity import combine, perplexity

    check_options(args)
    check_directories(args)
    output = None if args.output is None else _check_output(args.output)
    texts = [(path, read_file(path)) for path in args.files]  # every file is checked before loading
    model, tokenizer = load(args)
    max_positions = model.config.max_position_embeddings
    check_options(args, max_positions)
    max_length = args.max_length or max_positions
    stride = args.stride or max_length
    results = []
    for path, text in texts:
        try:
            result = perplexity(
                model,
                tokenizer,
                text,
                max_length,
                stride,
                args.batch_size,
                progress=False if args.no_progress else None,
                description=path,
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        results.append((path, result))
    total = combine(result for _, result in results)
    report = {
        "model": args.model,
        "max_length": max_length,
        "stride": stride,
        "files": [{"file": path, **result.as_dict()} for path, result in results],
        "total": total.as_dict(),
    }
    text = json.dumps(report, ensure_ascii=False, indent=2)
    if output is not None:
        output.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    if args.json:
        print(text)
        return 0
    rows = results + ([("total", total)] if len(results) > 1 else [])
    width = max(len("file"), *(len(name) for name, _ in rows))
    print(f"windows of {max_length} tokens, stride {stride}")
    print(f"{'file':<{width}}  {'characters':>10}  {'tokens':>10}  {'perplexity':>12}  {'bits/char':>9}")
    for name, result in rows:
        print(
            f"{name:<{width}}  {result.characters:>10}  {result.tokens:>10}  "
            f"{result.perplexity:>12.4f}  {result.bits_per_character:>9.4f}"
        )
    return 0
