"""``neoxja eval``: run lm-evaluation-harness tasks on a neoxja model and print lm-eval's table.

lm-eval (``pip install 'neoxja[eval]'``) is used as a library: its task definitions, prompts and
metrics are the point of a benchmark, so they are not re-implemented here; only the model side is
neoxja's (:mod:`neoxja.evaluation.harness`). Task names, the output path and the options are checked
before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  neoxja eval --tasks japanese_leaderboard
  neoxja eval --model ./my-model --tasks ja_leaderboard_jcommonsenseqa --num-fewshot 3 --limit 100
  neoxja eval --model ./my-model --tasks my_task --include-path ./my-tasks --output results.json

Japanese tasks need lm-eval's extra dependencies: pip install 'lm-eval[japanese_leaderboard]'.
"""

INSTALL_HINT = "lm-eval is not installed: pip install 'neoxja[eval]'"


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _limit(text: str) -> int | float:
    """``--limit``: a number of examples per task (>= 1) or, below 1, a fraction of each task."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    if value >= 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"a count of examples must be whole, got {text}")
        return int(value)
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    from neoxja.commands.generate import add_model_arguments, positive

    parser = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks (needs neoxja[eval])",
        description="Evaluate the model on lm-evaluation-harness tasks and print the results table.",
        epilog=EPILOG,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="lm-eval task or group names (globs allowed)",
    )
    parser.add_argument(
        "--num-fewshot",
        metavar="K",
        type=_non_negative_int,
        default=None,
        help="examples in each prompt (default: the task's)",
    )
    parser.add_argument(
        "--limit",
        metavar="N",
        type=_limit,
        default=None,
        help="examples per task, or below 1 a fraction of each task",
    )
    parser.add_argument(
        "--batch-size", metavar="B", type=positive(int), default=1, help="requests per batch (default: 1)"
    )
    parser.add_argument(
        "--output", default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    parser.add_argument(
        "--include-path", default=None, metavar="DIR", help="a directory of extra task YAML files"
    )
    parser.set_defaults(func=run_eval)


def _task_names(args: argparse.Namespace, task_manager: Any) -> list[str]:
    """The names ``--tasks`` stands for (globs expanded); unknown ones are a ValueError naming them."""
    unknown = [name for name in args.tasks if not task_manager.match_tasks([name])]
    if unknown:
        where = (
            f" or in {args.include_path}" if args.include_path else " (add --include-path DIR for your own)"
        )
        raise ValueError(f"unknown task {', '.join(unknown)}: not among lm-eval's tasks{where}")
    return task_manager.match_tasks(args.tasks)


def _check_output(path: str | None) -> Path | None:
    """The ``--output`` path, its directory created now so that a long run cannot fail at its end."""
    if path is None:
        return None
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"--output {path} is a directory: give a file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def run_eval(args: argparse.Namespace) -> int:
    """``neoxja eval``: evaluate, print lm-eval's table (and group table), write JSON if asked."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table

        from neoxja.evaluation.harness import NeoXJaLM
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("lm_eval"):
            raise
        print(f"neoxja eval: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from neoxja.commands.generate import device_and_dtype, load

    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path} is not a directory")
    task_manager = TaskManager(include_path=args.include_path)
    tasks = _task_names(args, task_manager)
    output = _check_output(args.output)
    model, tokenizer = load(args)
    lm = NeoXJaLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=task_manager,
        log_samples=False,
    )
    device, dtype = device_and_dtype(args)
    # What simple_evaluate cannot know about a model object: how it was loaded.
    results["config"].update(
        model="neoxja",
        model_args={"pretrained": args.model, "tokenizer": args.tokenizer, "dtype": dtype},
        device=str(device),
        batch_size=args.batch_size,
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if output is not None:
        text = json.dumps(results, indent=2, ensure_ascii=False, default=handle_non_serializable)
        output.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    return 0
