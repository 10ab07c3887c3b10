"""``neoxja eval``: run lm-evaluation-harness tasks on a neoxja model and print lm-eval's table.

lm-eval (``pip install 'neoxja[eval]'``) is used as a library: its task definitions, prompts and
metrics are the point of a benchmark, so they are not re-implemented here; only the model side is
neoxja's (:mod:`neoxja.evaluation.harness`). Every option is checked before lm-eval and the model
load, the task names before the model loads.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neoxja.evaluation.options import ResultsPaths

EPILOG = """\
examples:
  neoxja eval --tasks japanese_leaderboard --output results/
  neoxja eval --model ./my-model --tasks ja_leaderboard_jcommonsenseqa,ja_leaderboard_jnli \\
      --num-fewshot 3 --limit 100
  neoxja eval --model ./my-model --tasks ja_leaderboard_mgsm --gen-kwargs temperature=0,max_gen_toks=64 \\
      --log-samples --output results/mgsm.json
  neoxja eval --model ./my-model --tasks my_task --include-path ./my-tasks --quantize nf4 --seed 42

--output (lm-eval's --output_path): a path ending in .json is the results file; any other path is a
directory that gets a results_<timestamp>.json. --log-samples writes samples_<task>_<timestamp>.jsonl
beside the results. The results table goes to stdout, progress to stderr.

Japanese tasks need lm-eval's extra dependencies: pip install 'lm-eval[japanese-leaderboard]'.
lm-eval's own command line with this model: python -m neoxja.evaluation --model neoxja ... (see README).
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


class _SplitTasks(argparse.Action):
    """``--tasks a b`` and lm-eval's ``--tasks a,b`` (or both), into one list of names."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        names = [name.strip() for value in values for name in value.split(",")]
        if not all(names):
            parser.error(f"argument {option}: an empty task name in {' '.join(values)!r}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *names])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    from neoxja.commands.generate import add_model_arguments, positive
    from neoxja.evaluation.options import DEFAULT_SEEDS

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
        action=_SplitTasks,
        metavar="TASK",
        help="lm-eval task or group names, space- or comma-separated (globs allowed)",
    )
    parser.add_argument(
        "--num-fewshot",
        "--num_fewshot",
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
        "--batch-size", "--batch_size", metavar="B", type=positive(int), default=1, help="requests per batch"
    )
    parser.add_argument(
        "--output",
        "-o",
        "--output_path",
        dest="output",
        default=None,
        metavar="PATH",
        help="also write the results as JSON: PATH.json, or a directory for results_<timestamp>.json",
    )
    parser.add_argument(
        "--log-samples",
        "--log_samples",
        action="store_true",
        help="write each example's prompt, model outputs and scores beside the results (needs --output)",
    )
    parser.add_argument(
        "--gen-kwargs",
        "--gen_kwargs",
        default=None,
        metavar="K=V,...",
        help="generation settings for generate_until tasks, over the tasks' own "
        "(e.g. temperature=0,max_gen_toks=64, or a JSON object)",
    )
    parser.add_argument(
        "--seed",
        default=DEFAULT_SEEDS,
        metavar="SEEDS",
        help="lm-eval's seeds python,numpy,torch,fewshot (None leaves one unset; one integer sets all four)",
    )
    parser.add_argument(
        "--include-path",
        "--include_path",
        default=None,
        metavar="DIR",
        help="a directory of extra task YAML files",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (shown on a terminal)")
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


def _missing_requirements(task_manager: Any, names: list[str]) -> None:
    """ValueError naming a package that a task needs and that is not installed, with the pip command.

    A task's Python helpers (``!function module.fn`` in its YAML) are imported now, as lm-eval will
    import them, so that a missing package (lm-eval's japanese_leaderboard needs fugashi, emoji, ...
    for some tasks) is reported before the model loads rather than after; a group stands for its
    folder, whose ``requirements.txt`` (if any) lists what its tasks need.
    """
    import importlib.metadata

    from neoxja.evaluation.options import install_hint

    for name in names:
        entry = task_manager.task_index.get(name)
        path = getattr(entry, "yaml_path", None)
        if path is None:
            continue
        folder, missing = Path(path).parent, []
        requirements = folder / "requirements.txt"
        if getattr(entry.kind, "name", "") == "GROUP" and requirements.is_file():
            missing += _uninstalled(requirements)
        missing += _unimportable_helpers(Path(path))
        if missing:
            extras = importlib.metadata.metadata("lm_eval").get_all("Provides-Extra") or []
            hint = install_hint(folder.name, missing, extras)
            raise ValueError(f"task {name} needs {', '.join(dict.fromkeys(missing))}: {hint}")


def _uninstalled(requirements: Path) -> list[str]:
    """The distributions that ``requirements`` (a requirements.txt) names and that are not installed."""
    import importlib.metadata

    missing = []
    for line in requirements.read_text(encoding="utf-8").splitlines():
        package = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0])
        if package is None:
            continue
        try:
            importlib.metadata.distribution(package.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(package.group(1))
    return missing


def _unimportable_helpers(yaml_path: Path) -> list[str]:
    """The modules that the ``!function`` helpers of a task's YAML (modules beside it) fail to import."""
    import importlib.util

    missing = []
    for module in re.findall(r"!function\s+([A-Za-z_]\w*)\.", yaml_path.read_text(encoding="utf-8")):
        source = yaml_path.parent / f"{module}.py"
        spec = importlib.util.spec_from_file_location(module, source)
        if spec is None or spec.loader is None or not source.is_file():
            continue
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except ModuleNotFoundError as err:
            missing.append(err.name or getattr(err.__cause__, "name", None) or str(err))
    return missing


def _check_options(args: argparse.Namespace) -> tuple[ResultsPaths | None, dict | None, tuple]:
    """Everything about the options that can be wrong, checked before lm-eval and the model load:
    (where to write, the --gen-kwargs settings, the four seeds)."""
    from neoxja.commands.generate import check_directories
    from neoxja.evaluation.options import check_gen_kwargs, parse_gen_kwargs, parse_seed, results_paths

    check_directories(args)
    seeds = parse_seed(args.seed)
    gen_kwargs = None
    if args.gen_kwargs is not None:
        gen_kwargs = parse_gen_kwargs(args.gen_kwargs)
        check_gen_kwargs(gen_kwargs)
    if args.log_samples and args.output is None:
        raise ValueError("--log-samples writes beside the results: give --output PATH too")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path} is not a directory")
    paths = None if args.output is None else results_paths(args.output)
    return paths, gen_kwargs, seeds


def _write_samples(paths: ResultsPaths, samples: dict[str, list[dict]]) -> list[Path]:
    """One JSONL per task, each line an example as lm-eval's own CLI logs it: request arguments
    flattened to ``gen_args_i``/``arg_j`` and the responses as strings, so that the file loads as a
    dataset."""
    from lm_eval.utils import handle_non_serializable, sanitize_list

    written = []
    for task, rows in samples.items():
        path = paths.samples(task)
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                row = dict(row)
                row["arguments"] = {
                    f"gen_args_{i}": {f"arg_{j}": value for j, value in enumerate(request)}
                    for i, request in enumerate(row.get("arguments", ()))
                }
                for key in ("resps", "filtered_resps"):
                    if key in row:
                        row[key] = sanitize_list(row[key])
                row["target"] = str(row.get("target"))
                handle.write(json.dumps(row, ensure_ascii=False, default=handle_non_serializable) + "\n")
        written.append(path)
    return written


def run_eval(args: argparse.Namespace) -> int:
    """``neoxja eval``: evaluate, print lm-eval's table (and group table), write JSON if asked."""
    paths, gen_kwargs, seeds = _check_options(args)
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

    task_manager = TaskManager(include_path=args.include_path)
    tasks = _task_names(args, task_manager)
    _missing_requirements(task_manager, tasks)
    model, tokenizer = load(args)
    progress = False if args.no_progress else None
    lm = NeoXJaLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, progress=progress)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=task_manager,
        log_samples=args.log_samples,
        gen_kwargs=gen_kwargs,
        random_seed=seeds[0],
        numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2],
        fewshot_random_seed=seeds[3],
    )
    device, dtype = device_and_dtype(args)
    # What simple_evaluate cannot know about a model object: how it was loaded.
    results["config"].update(
        model="neoxja",
        model_args={
            "pretrained": args.model,
            "tokenizer": args.tokenizer,
            "dtype": dtype,
            "quantize": args.quantize,
        },
        device=str(device),
        batch_size=args.batch_size,
    )
    samples = results.pop("samples", None)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if paths is not None:
        text = json.dumps(results, indent=2, ensure_ascii=False, default=handle_non_serializable)
        paths.results.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {paths.results}", file=sys.stderr)
        if samples is not None:
            for path in _write_samples(paths, samples):
                print(f"wrote {path}", file=sys.stderr)
    return 0
