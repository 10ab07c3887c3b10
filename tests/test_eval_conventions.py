"""``neoxja eval`` speaks lm-eval's dialect (issue 24): ``--tasks a,b``, ``--output`` a file or a
directory (``--output_path``), ``--log-samples``, ``--gen-kwargs``, ``--seed``, the convention flags
and one-line errors before anything loads; and ``python -m neoxja.evaluation`` is lm-eval's own
command line with ``--model neoxja``.

The tasks are defined here over local JSONL files (no network); the model is the tiny checkpoint.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lm_eval.tasks
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from neoxja.cli import main
from neoxja.commands import eval as eval_command
from neoxja.evaluation.harness import NeoXJaLM
from neoxja.evaluation.options import parse_gen_kwargs, parse_seed

MC_DOCS = [
    {"question": "日本の首都は?", "choices": ["東京", "大阪", "京都"], "label": 0},
    {"question": "猫の鳴き声は?", "choices": ["ワン", "ニャー"], "label": 1},
    {"question": "一番大きい数は?", "choices": ["一", "十", "百", "千"], "label": 3},
]
GEN_DOCS = [{"question": q, "answer": "東京"} for q in ("吾輩は猫である。", "今日はいい天気ですね。")]
TASK_GEN_KWARGS = {"until": ["\n"], "max_gen_toks": 6}
AS_RUN = {"dtype": "bfloat16", "quantize": "bfloat16"}  # how the run below loads the model


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval tasks: multiple choice (loglikelihood) and generate_until, over local JSONL."""
    directory = tmp_path_factory.mktemp("eval-conventions-tasks")
    bodies = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "質問: {{question}}\\n答え:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n',
        "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs: {json.dumps(TASK_GEN_KWARGS)}\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, rows in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (directory / f"{name}.yaml").write_text(
            f"task: conv_{name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\nmetadata:\n  version: 1.0\n{bodies[name]}"
        )
    return directory


def _eval(tiny_checkpoint: Path, task_dir: Path, *extra: str) -> int:
    argv = ["eval", "--model", str(tiny_checkpoint), "--device", "cpu", "--include-path", str(task_dir)]
    return main([*argv, *extra])


@pytest.fixture(scope="module")
def lm_eval_style_run(
    tiny_checkpoint: Path, task_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """One run with lm-eval's spellings: comma-separated tasks, --output_path a directory,
    --log_samples, --gen_kwargs, --seed, --num_fewshot, and --dtype/--quantize; (the output
    directory, stdout). stdout is captured by hand: capsys is per test."""
    out = tmp_path_factory.mktemp("eval-out") / "results"
    capture = tmp_path_factory.mktemp("eval-stdout") / "stdout.txt"
    saved = sys.stdout
    with pytest.MonkeyPatch.context() as patch, capture.open("w", encoding="utf-8") as sys.stdout:
        # Every task is in --include-path: lm-eval's own index (seconds to build) is left out.
        patch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
        try:
            status = _eval(
                tiny_checkpoint,
                task_dir,
                *("--tasks", "conv_mc,conv_gen", "--output_path", str(out), "--log_samples"),
                *("--gen_kwargs", "max_gen_toks=2,temperature=0", "--seed", "7,8,9", "--num_fewshot", "0"),
                *("--dtype", "bfloat16", "--quantize", "bfloat16", "--no-progress"),
            )
        finally:
            sys.stdout = saved
    assert status == 0
    return out, capture.read_text(encoding="utf-8")


def _results(out: Path) -> dict:
    (path,) = out.glob("results_*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _samples(out: Path, task: str) -> list[dict]:
    """The rows of ``task``'s one samples file in ``out``."""
    (path,) = out.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tasks_comma_separated_as_lm_eval_writes_them(lm_eval_style_run: tuple[Path, str]) -> None:
    out, table = lm_eval_style_run
    assert set(_results(out)["results"]) == {"conv_mc", "conv_gen"}
    assert any("conv_mc" in line and "acc" in line for line in table.splitlines()), table
    assert any("conv_gen" in line and "exact_match" in line for line in table.splitlines()), table
    assert "wrote" not in table  # where the files went is said on stderr: stdout is the table alone


def test_tasks_mix_of_spaces_and_commas_and_an_empty_name_is_refused(capsys: pytest.CaptureFixture) -> None:
    from neoxja.cli import build_parser

    args = build_parser().parse_args(["eval", "--tasks", "a,b", "c", "--tasks", "d"])
    assert args.tasks == ["a", "b", "c", "d"]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["eval", "--tasks", "a,,b"])
    assert exit_info.value.code == 2
    assert "empty task name" in capsys.readouterr().err


def test_output_directory_gets_timestamped_results_and_samples_beside(
    lm_eval_style_run: tuple[Path, str],
) -> None:
    out, _ = lm_eval_style_run
    (results_file,) = out.glob("results_*.json")
    date_id = results_file.stem.removeprefix("results_")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d+", date_id)
    samples = {p.name for p in out.glob("samples_*.jsonl")}
    assert samples == {f"samples_conv_mc_{date_id}.jsonl", f"samples_conv_gen_{date_id}.jsonl"}
    assert "samples" not in _results(out)  # the samples are beside the results, not in them


def test_log_samples_writes_each_example_as_lm_eval_logs_it(
    lm_eval_style_run: tuple[Path, str], tiny_checkpoint: Path
) -> None:
    out, _ = lm_eval_style_run
    rows = _samples(out, "conv_mc")
    assert [row["doc"] for row in rows] == MC_DOCS
    assert [row["target"] for row in rows] == [str(doc["label"]) for doc in MC_DOCS]
    first = rows[0]
    # lm-eval's layout: each request's arguments flattened to gen_args_i / arg_j.
    assert first["arguments"]["gen_args_0"] == {"arg_0": "質問: 日本の首都は?\n答え:", "arg_1": " 東京"}
    assert len(first["arguments"]) == len(MC_DOCS[0]["choices"])
    # The logged scores are the model's: the same loglikelihoods NeoXJaLM gives for those requests.
    lm = NeoXJaLM(pretrained=str(tiny_checkpoint), device="cpu", progress=False, **AS_RUN)
    requests = [
        Instance("loglikelihood", doc={}, arguments=(a["arg_0"], a["arg_1"]), idx=0)
        for a in first["arguments"].values()
    ]
    expected = lm.loglikelihood(requests)
    got = [(float(ll), greedy == "True") for ((ll, greedy),) in first["resps"]]  # strings, as lm-eval
    assert got == pytest.approx(expected, abs=1e-5)


def test_gen_kwargs_override_the_tasks_generation_settings(
    lm_eval_style_run: tuple[Path, str], tiny_checkpoint: Path
) -> None:
    out, _ = lm_eval_style_run
    rows = _samples(out, "conv_gen")
    settings = rows[0]["arguments"]["gen_args_0"]["arg_1"]
    assert settings["max_gen_toks"] == 2 and settings["until"] == TASK_GEN_KWARGS["until"]
    lm = NeoXJaLM(pretrained=str(tiny_checkpoint), device="cpu", progress=False, **AS_RUN)
    short = lm.generate_until(
        [
            Instance("generate_until", doc={}, arguments=(d["question"], dict(settings)), idx=0)
            for d in GEN_DOCS
        ]
    )
    long = lm.generate_until(
        [
            Instance("generate_until", doc={}, arguments=(d["question"], TASK_GEN_KWARGS), idx=0)
            for d in GEN_DOCS
        ]
    )
    assert [row["resps"][0][0] for row in rows] == short
    assert short != long  # two tokens instead of the task's six: the override took effect
    assert _results(out)["config"]["gen_kwargs"] == {"max_gen_toks": 2, "temperature": 0}


def test_seed_sets_lm_evals_four_seeds(lm_eval_style_run: tuple[Path, str]) -> None:
    config = _results(lm_eval_style_run[0])["config"]
    seeds = [config[key] for key in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")]
    assert seeds == [7, 8, 9, 1234]  # three given: the few-shot seed keeps lm-eval's default


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("42", (42, 42, 42, 42)), ("0,None,8,52", (0, None, 8, 52)), ("1,2,3", (1, 2, 3, 1234))],
)
def test_seed_is_parsed_as_lm_eval_parses_it(text: str, seeds: tuple) -> None:
    assert parse_seed(text) == seeds


def test_gen_kwargs_are_typed_as_lm_eval_types_them() -> None:
    assert parse_gen_kwargs("temperature=0,max_gen_toks=64") == {"temperature": 0, "max_gen_toks": 64}
    assert parse_gen_kwargs('until=["\\n\\n", "。"],do_sample=false,top_p=0.9') == {
        "until": ["\n\n", "。"],
        "do_sample": False,
        "top_p": 0.9,
    }
    assert parse_gen_kwargs('{"temperature": 0.5}') == {"temperature": 0.5}


def test_quantize_and_dtype_load_the_model_as_asked_and_are_recorded(lm_eval_style_run) -> None:
    config = _results(lm_eval_style_run[0])["config"]
    assert config["model_args"]["dtype"] == "bfloat16"
    assert config["model_args"]["quantize"] == "bfloat16"
    assert config["model_dtype"] == "torch.bfloat16"  # what lm-eval read off the loaded model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gen-kwargs", "temperature"], "--gen-kwargs: expected key=value, got 'temperature'"),
        (["--gen-kwargs", "num_beam_groups=4"], "--gen-kwargs: unknown generation setting num_beam_groups"),
        (["--gen-kwargs", "max_gen_toks=0"], "--gen-kwargs: max_gen_toks must be a positive integer"),
        (["--gen-kwargs", "do_sample=true,top_p=2"], "--gen-kwargs: top_p"),
        (["--seed", "1,2"], "--seed 1,2: give one integer, or 3 or 4"),
        (["--seed", "x"], "--seed x: 'x' is not an integer or None"),
        (["--log-samples"], "--log-samples writes beside the results: give --output PATH too"),
        (["--output", "{file}"], "is a file: give a directory or a file name ending in .json"),
    ],
)
def test_option_errors_are_one_line_before_lm_eval_or_the_model_loads(
    extra: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("x")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of lm-eval would fail differently
    extra = [value.replace("{file}", str(existing)) for value in extra]
    assert main(["eval", "--model", "/nonexistent/model", "--tasks", "t", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("neoxja eval: error: ") and message in captured.err


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("needs_mc", "task needs_mc needs neoxja_no_such_module: pip install neoxja_no_such_module"),
        ("needs_group", "task needs_group needs neoxja-no-such-package: pip install neoxja-no-such-package"),
    ],
)
def test_a_tasks_missing_package_is_named_before_the_model_loads(
    task: str, message: str, task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / "helper.py").write_text("import neoxja_no_such_module\n\ndef docs(d):\n    return d\n")
    (tmp_path / "requirements.txt").write_text("neoxja-no-such-package>=1.0  # for the group\n")
    mc = (task_dir / "mc.yaml").read_text().replace("task: conv_mc", "task: needs_mc")
    (tmp_path / "needs.yaml").write_text(mc + "process_docs: !function helper.docs\n")
    (tmp_path / "group.yaml").write_text("group: needs_group\ntask:\n  - needs_mc\n")
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    argv = ["eval", "--model", "/nonexistent/model", "--include-path", str(tmp_path), "--tasks", task]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"neoxja eval: error: {message}\n"


def test_a_task_folder_with_an_lm_eval_extra_is_installed_by_that_extra() -> None:
    from neoxja.evaluation.options import install_hint

    extras = importlib.metadata.metadata("lm_eval").get_all("Provides-Extra")
    assert (
        install_hint("japanese_leaderboard", ["emoji"], extras)
        == "pip install 'lm-eval[japanese-leaderboard]'"
    )
    assert install_hint("my_tasks", ["emoji", "fugashi"], extras) == "pip install emoji fugashi"


def test_the_japanese_extra_named_in_help_is_one_lm_eval_provides() -> None:
    named = re.findall(r"lm-eval\[([^\]]+)\]", eval_command.EPILOG)
    assert named == ["japanese-leaderboard"]
    provided = importlib.metadata.metadata("lm_eval").get_all("Provides-Extra")
    assert set(named) <= set(provided) and "api" in provided


def test_help_shows_every_default(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no line breaks inside a default
    for command in ("eval", "perplexity"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for default in ("(default: 1)", "(default: abeja/gpt-neox-japanese-2.7b)"):
            assert text.count(default) == 1, (command, default)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 0,1234,1234,1234)" in capsys.readouterr().out


# ---------------------------------------------------------------------- lm-eval's own command line


def test_python_m_neoxja_evaluation_is_lm_evals_cli_with_the_neoxja_model(
    tiny_checkpoint: Path, task_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run.json"
    command = [sys.executable, "-m", "neoxja.evaluation", "--model", "neoxja"]
    # No --device: lm-eval's default (cuda:0) would fail on a machine without a GPU; here it is "auto".
    command += ["--model_args", f"pretrained={tiny_checkpoint},progress=False"]
    command += ["--tasks", "conv_mc", "--include_path", str(task_dir), "--output_path", str(output)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any("conv_mc" in line and "acc" in line for line in done.stdout.splitlines()), done.stdout
    assert done.stdout.startswith("neoxja (")  # lm-eval's own summary line names the model
    (written,) = tmp_path.glob("run_*.json")  # lm-eval's rule for a .json output path
    assert json.loads(written.read_text(encoding="utf-8"))["config"]["model"] == "neoxja"


def test_python_m_neoxja_evaluation_without_lm_eval_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from neoxja.evaluation.__main__ import main as module_main

    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    with pytest.raises(SystemExit) as exit_info:
        module_main(["--model", "neoxja", "--tasks", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "python -m neoxja.evaluation: error: lm-eval is not installed: pip install 'neoxja[eval]'"
    )
