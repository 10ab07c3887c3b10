"""lm-evaluation-harness: the ``neoxja`` model gives lm-eval's own ``hf`` model's answers.

The oracle is ``lm_eval.models.huggingface.HFLM`` on transformers, loaded from the same tiny
checkpoint directory (float32, CPU). Every request type is compared request by request, with and
without batching and with a short ``max_length`` (left truncation, several rolling windows), and then
the metrics of ``simple_evaluate`` on tasks defined here (local JSONL, no network): a multiple-choice,
a generate_until and a loglikelihood_rolling task. ``neoxja eval`` runs the same tasks from the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer
from neoxja.cli import main
from neoxja.evaluation.harness import NeoXJaLM

LONG = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
CONTEXTS = ["吾輩は猫である。", "東京", "今日はいい天気ですね。明日は", LONG]
LL_PAIRS = [
    ("吾輩は猫である。", "名前はまだ無い。"),
    ("", "こんにちは"),  # empty context: scored after the BOS token
    ("今日は ", "いい天気"),  # the trailing space moves to the continuation
    ("東京", "は日本の首都です。"),
    (LONG, "ニャーニャー泣いていた"),  # longer than the short max_length: truncated on the left
]
ROLLING = [LONG * 2, "短い文。", ""]
# (batch size, max_length): one request at a time at full length; batches with a short context.
SETTINGS = [(1, None), (3, 16)]


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=args, idx=0) for args in arguments]


@pytest.fixture(scope="module", params=SETTINGS, ids=["batch1", "batch3-len16"])
def pair(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> tuple[HFLM, NeoXJaLM]:
    """(lm-eval's hf model on transformers, neoxja's model), same directory and settings."""
    batch_size, max_length = request.param
    common = {"batch_size": batch_size, "max_length": max_length, "device": "cpu", "dtype": "float32"}
    return HFLM(pretrained=str(tiny_checkpoint), **common), NeoXJaLM(
        pretrained=str(tiny_checkpoint), **common
    )


def test_registered_next_to_lm_evals_own_models() -> None:
    assert get_model("neoxja") is NeoXJaLM
    assert get_model("hf") is HFLM  # registering neoxja did not hide lm-eval's names


def test_a_loaded_model_and_tokenizer_score_as_the_directory(tiny_checkpoint: Path) -> None:
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint)
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tiny_checkpoint)
    loaded = NeoXJaLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    from_dir = NeoXJaLM(pretrained=str(tiny_checkpoint), device="cpu", batch_size=2)
    requests = _requests("loglikelihood", LL_PAIRS)
    assert loaded.loglikelihood(requests) == from_dir.loglikelihood(requests)


@pytest.mark.parametrize(
    "setting", [{"batch_size": "auto"}, {"batch_size": 0}, {"max_length": -1}, {"max_gen_toks": "many"}]
)
def test_counts_must_be_positive_integers(setting: dict) -> None:
    (name,) = setting
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):  # before any loading
        NeoXJaLM(pretrained="/nonexistent/model", device="cpu", **setting)


def test_loglikelihood_matches_hf(pair: tuple[HFLM, NeoXJaLM]) -> None:
    hf, ours = pair
    # Continuations the model itself would produce, so that is_greedy is True for some requests.
    greedy = ours.generate_until(
        _requests("generate_until", [(c, {"until": [], "max_gen_toks": 3}) for c in CONTEXTS])
    )
    requests = _requests("loglikelihood", LL_PAIRS + list(zip(CONTEXTS, greedy, strict=True)))
    expected, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    assert any(is_greedy for _, is_greedy in expected)
    for request, (want_ll, want_greedy), (ll, is_greedy) in zip(requests, expected, got, strict=True):
        assert ll == pytest.approx(want_ll, abs=1e-4), request.args
        assert is_greedy == want_greedy, request.args


def test_loglikelihood_rolling_matches_hf(pair: tuple[HFLM, NeoXJaLM]) -> None:
    hf, ours = pair
    requests = _requests("loglikelihood_rolling", [(text,) for text in ROLLING])
    assert ours.loglikelihood_rolling(requests) == pytest.approx(hf.loglikelihood_rolling(requests), abs=1e-4)


def test_generate_until_matches_hf(pair: tuple[HFLM, NeoXJaLM]) -> None:
    hf, ours = pair
    free = ours.generate_until(
        _requests("generate_until", [(c, {"until": [], "max_gen_toks": 6}) for c in CONTEXTS])
    )
    arguments = [(c, {"until": [], "max_gen_toks": 6}) for c in CONTEXTS]
    # A stop sequence from each row's own text, so that the cut happens; one given as a plain string.
    arguments += [
        (c, {"until": [text[1:2] or "。"], "max_gen_toks": 6}) for c, text in zip(CONTEXTS, free, strict=True)
    ]
    arguments += [
        (c, {"until": text[1:3] or "。", "max_gen_toks": 5}) for c, text in zip(CONTEXTS, free, strict=True)
    ]
    # A stop sequence that starts in the context and ends in the new text does not count, as in hf.
    arguments += [
        (c, {"until": [c[-1] + text[:1]], "max_gen_toks": 6}) for c, text in zip(CONTEXTS, free, strict=True)
    ]
    arguments += [
        (c, {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False, "temperature": 0.0}) for c in CONTEXTS
    ]
    requests = _requests("generate_until", arguments)
    expected = hf.generate_until(requests)
    assert ours.generate_until(requests) == expected
    assert any(len(text) < len(full) for text, full in zip(expected[4:8], free, strict=True))


# ---------------------------------------------------------------------- tasks and simple_evaluate

MC_DOCS = [
    {"question": "日本の首都は?", "choices": ["東京", "大阪", "京都"], "label": 0},
    {"question": "猫の鳴き声は?", "choices": ["ワン", "ニャー"], "label": 1},
    {"question": "一番大きい数は?", "choices": ["一", "十", "百", "千"], "label": 3},
    {"question": "富士山がある国は?", "choices": ["日本", "中国"], "label": 0},
]
GEN_DOCS = [{"question": c, "answer": "?"} for c in CONTEXTS]
GEN_KWARGS = {"until": ["。", "\n"], "max_gen_toks": 8}
TASKS = ["neoxja_test_mc", "neoxja_test_gen", "neoxja_test_rolling"]


def _task_yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        f"test_split: test\nfewshot_split: test\nmetadata:\n  version: 1.0\n{body}"
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """Three lm-eval tasks over local JSONL files; the first generate_until answer is the model's own."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    hf = HFLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32")
    first = hf.generate_until(_requests("generate_until", [(GEN_DOCS[0]["question"], dict(GEN_KWARGS))]))[0]
    docs = {
        "mc": MC_DOCS,
        "gen": [{**GEN_DOCS[0], "answer": first}, *GEN_DOCS[1:]],
        "rolling": [{"text": text} for text in ROLLING[:2]],
    }
    for name, rows in docs.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (directory / f"{name}.jsonl").write_text(lines, encoding="utf-8")
    bodies = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "質問: {{question}}\\n答え:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs: {json.dumps(GEN_KWARGS)}\nmetric_list:\n  - metric: exact_match\n",
        "rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    }
    for name, body in bodies.items():
        (directory / f"{name}.yaml").write_text(
            _task_yaml(f"neoxja_test_{name}", directory / f"{name}.jsonl", body)
        )
    return directory


def _metrics(results: dict) -> dict[str, dict[str, object]]:
    return {
        task: {key: value for key, value in metrics.items() if key not in ("alias", "name")}
        for task, metrics in results["results"].items()
    }


def _assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for task, metrics in expected.items():
        assert got[task].keys() == metrics.keys(), task
        for key, value in metrics.items():
            if isinstance(value, float):
                assert got[task][key] == pytest.approx(value, rel=1e-4), (task, key)
            else:
                assert got[task][key] == value, (task, key)


def test_simple_evaluate_metrics_match_hf(task_dir: Path, tiny_checkpoint: Path) -> None:
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    common = {"tasks": TASKS, "task_manager": manager, "num_fewshot": 1, "log_samples": False}
    hf = HFLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32", batch_size=2)
    expected = _metrics(lm_eval.simple_evaluate(model=hf, **common))
    assert expected["neoxja_test_gen"]["exact_match,none"] == pytest.approx(1 / len(GEN_DOCS))
    ours = NeoXJaLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32", batch_size=2)
    _assert_same_metrics(_metrics(lm_eval.simple_evaluate(model=ours, **common)), expected)
    # By its registered name, with model_args as lm-eval's own CLI passes them.
    by_name = lm_eval.simple_evaluate(
        model="neoxja",
        model_args=f"pretrained={tiny_checkpoint},device=cpu,dtype=float32",
        batch_size=3,
        **common,
    )
    _assert_same_metrics(_metrics(by_name), expected)


# ---------------------------------------------------------------------- neoxja eval


def test_cli_prints_the_table_and_writes_json(
    task_dir: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "results.json"
    argv = ["eval", "--model", str(tiny_checkpoint), "--device", "cpu", "--include-path", str(task_dir)]
    argv += ["--tasks", "neoxja_test_mc", "neoxja_test_g*", "--limit", "2", "--batch-size", "2"]
    assert main([*argv, "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("|") and "Tasks" in table.splitlines()[0]
    for task, metric in [("neoxja_test_mc", "acc"), ("neoxja_test_gen", "exact_match")]:
        assert any(task in line and metric in line for line in table.splitlines()), table
    written = json.loads(output.read_text(encoding="utf-8"))
    assert set(written["results"]) == {"neoxja_test_mc", "neoxja_test_gen"}
    assert written["n-samples"]["neoxja_test_mc"]["effective"] == 2
    assert written["config"]["model"] == "neoxja"
    assert written["config"]["model_args"]["pretrained"] == str(tiny_checkpoint)


def test_cli_names_an_unknown_task_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "/nonexistent/model", "--tasks", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err
    assert "unknown task no_such_task_xyz" in err and len(err.strip().splitlines()) == 1


def test_cli_without_lm_eval_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if not installed
    assert main(["eval", "--tasks", "japanese_leaderboard"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "neoxja eval: error: lm-eval is not installed: pip install 'neoxja[eval]'"
