"""The ``neoxja`` command line: one sub-command per module under :mod:`neoxja.commands`."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys

from neoxja import __version__

# Each module named here defines ``register(subparsers)``, which adds its sub-command(s).
COMMAND_MODULES = (
    "tokenize",
    "generate",
    "init",
    "quantize",
    "visualize",
    "train",
    "perplexity",
    "eval",
    "serve",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every sub-command's help: examples keep their line breaks, and each option that has a value
    by default says it (``(default: ...)``) unless its help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = any(action.default is value for value in (None, False, argparse.SUPPRESS))
        if "default" in text or no_default or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``neoxja`` parser with every sub-command whose module is present."""
    parser = argparse.ArgumentParser(
        prog="neoxja",
        description="GPT-NeoX-Japanese: tokenize, generate and inspect from the command line.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    command_parser = functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=command_parser
    )
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"neoxja.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"neoxja.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def _exit_0(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neoxja`` console script; returns the process exit status.

    Errors the user can fix are one line on stderr (status 2); Ctrl-C is status 130; a reader that
    closes the pipe early (``neoxja generate ... | head``) ends the command quietly (status 1).
    """
    if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        # A server is stopped with SIGTERM at any moment, and stopping it is a success (exit 0),
        # also while the sub-commands are still being imported; `serve` takes over from here.
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, _exit_0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # so that a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # As Python's docs recommend: point stdout at devnull, so that the final flush is silent too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, TypeError) as err:
        print(f"neoxja {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status
