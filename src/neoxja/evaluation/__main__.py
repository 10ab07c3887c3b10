"""``python -m neoxja.evaluation``: lm-eval's own command line, with ``--model neoxja`` available.

lm-eval (0.4.13) finds a model name only in its registry, which holds its own models and whatever
the running Python has imported; it loads no plugins (no entry-point group, and ``--include_path``
adds task YAML, not models). So ``lm_eval --model neoxja`` cannot find neoxja, and this module is
that command with neoxja imported first; its arguments are lm-eval's, except that ``--device``
defaults to ``auto`` (a GPU if there is one, else the CPU) rather than lm-eval's ``cuda:0``::

    python -m neoxja.evaluation --model neoxja --model_args pretrained=./my-model,dtype=float32 \\
        --tasks ja_leaderboard_jcommonsenseqa --num_fewshot 3 --output_path results/
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default: this process's arguments) with neoxja registered."""
    try:
        import lm_eval.__main__ as lm_eval_cli

        import neoxja.evaluation.harness  # noqa: F401  (registers "neoxja" in lm-eval's model registry)
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("lm_eval"):
            raise
        print(
            "python -m neoxja.evaluation: error: lm-eval is not installed: pip install 'neoxja[eval]'",
            file=sys.stderr,
        )
        sys.exit(2)
    args = list(sys.argv[1:] if argv is None else argv)
    given = {arg.split("=", 1)[0] for arg in args}
    if given.isdisjoint({"--device", "--config", "-C"}):
        # lm-eval's own default device is cuda:0, which its hf model quietly replaces by the CPU
        # where there is no GPU; neoxja's "auto" does that openly (a device named is still checked).
        args += ["--device", "auto"]
    sys.argv = [sys.argv[0], *args]  # lm-eval's CLI reads sys.argv itself
    lm_eval_cli.cli_evaluate()


if __name__ == "__main__":
    main()
