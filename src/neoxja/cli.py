"""The ``neoxja`` command line: one sub-command per module under :mod:`neoxja.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module named here defines ``register(subparsers)``, which adds its sub-command(s).
COMMAND_MODULES = ("tokenize", "generate", "init", "visualize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neoxja",
        description="GPT-NeoX-Japanese: tokenize, generate and inspect from the command line.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"neoxja.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"neoxja.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neoxja`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, TypeError) as err:
        print(f"neoxja {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
