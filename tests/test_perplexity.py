"""Sliding-window perplexity: neoxja.evaluation.perplexity against transformers' guide loop on the
same weights and the reference tokenizer's ids, and the ``neoxja perplexity`` command."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_pair

from neoxja.cli import main
from neoxja.evaluation.perplexity import PerplexityResult, combine, perplexity, windows

MAX_POSITIONS = 64
CONFIG = {**TINY, "max_position_embeddings": MAX_POSITIONS}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    return make_pair(CONFIG, tmp_path_factory.mktemp("perplexity-pair"))


@pytest.fixture(scope="module")
def tokenizers(assets_dir: Path):
    """(transformers' tokenizer, neoxja's), both from the real vocabulary."""
    import transformers

    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    reference = transformers.GPTNeoXJapaneseTokenizer(
        str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json")
    )
    return reference, GPTNeoXJapaneseTokenizer(str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))


@pytest.fixture(scope="module")
def text(corpus_dir: Path) -> str:
    """A few hundred tokens of a novel, several lines (so newlines are scored too)."""
    return (corpus_dir / "neko.txt").read_text(encoding="utf-8")[:500]


def guide_loop(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int, float]:
    """transformers' perplexity guide, run on the transformers model: (total NLL, tokens scored,
    the guide's own weighted NLL). Each window's mean loss is weighted by the number of targets
    the model's internal shift actually scores; the guide's weight (labelled tokens - 1) is kept
    beside it."""
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, guide_sum = 0.0, 0, 0.0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        scored = int((target_ids[:, 1:] != -100).sum())
        if scored:
            with torch.no_grad():
                loss = model(window, labels=target_ids).loss.item()
            nll_sum += loss * scored
            n_tokens += scored
            guide_sum += loss * (int((target_ids != -100).sum()) - 1)
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens, guide_sum


CASES = [
    pytest.param(64, 16, 1, id="stride<max_length"),
    pytest.param(64, 16, 3, id="stride<max_length-batch3"),
    pytest.param(64, 50, 3, id="stride<max_length-uneven-batch3"),
    pytest.param(64, 64, 1, id="stride==max_length"),
    pytest.param(64, 64, 3, id="stride==max_length-batch3"),
    pytest.param(32, 32, 3, id="short-windows-batch3"),
]


@pytest.mark.parametrize(("max_length", "stride", "batch_size"), CASES)
def test_equals_the_guide_loop_on_transformers(
    pair, tokenizers, text: str, max_length: int, stride: int, batch_size: int
) -> None:
    reference, model = pair
    reference_tokenizer, tokenizer = tokenizers
    ids = reference_tokenizer.encode(text)
    assert len(ids) > 4 * max_length
    nll, tokens, guide = guide_loop(reference, ids, max_length, stride)

    result = perplexity(model, tokenizer, text, max_length, stride, batch_size)
    assert result.tokens == tokens
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.characters == len(text)
    assert result.bits_per_character == pytest.approx(nll / math.log(2) / len(text), rel=1e-5)
    # Which tokens are scored: all but the first when windows overlap, all but each window's first
    # token when they do not.
    starts = len(range(0, len(ids) - 1, stride))
    assert tokens == (len(ids) - 1 if stride < max_length else len(ids) - starts)
    if stride == max_length:  # every window's first token is labelled: the guide's weighting is exact
        assert result.nll == pytest.approx(guide, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_text_shorter_than_one_window_scores_all_but_its_first_token(
    pair, tokenizers, batch_size: int
) -> None:
    reference, model = pair
    reference_tokenizer, tokenizer = tokenizers
    text = "吾輩は猫である。名前はまだ無い。"
    ids = reference_tokenizer.encode(text)
    assert 2 < len(ids) < MAX_POSITIONS
    nll, tokens, _ = guide_loop(reference, ids, MAX_POSITIONS, MAX_POSITIONS)
    with torch.no_grad():
        mean = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()

    result = perplexity(model, tokenizer, text, batch_size=batch_size)
    assert result.tokens == tokens == len(ids) - 1
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(mean), rel=1e-5)
    assert result.bits_per_character == pytest.approx(
        mean * (len(ids) - 1) / math.log(2) / len(text), rel=1e-5
    )


def test_defaults_are_the_models_context_without_overlap(pair, tokenizers, text: str) -> None:
    _, model = pair
    _, tokenizer = tokenizers
    assert perplexity(model, tokenizer, text) == perplexity(
        model, tokenizer, text, MAX_POSITIONS, MAX_POSITIONS
    )


def test_ids_score_like_their_text_and_have_no_characters(pair, tokenizers, text: str) -> None:
    _, model = pair
    _, tokenizer = tokenizers
    from_text = perplexity(model, tokenizer, text, 64, 16)
    ids = tokenizer.encode(text)
    for given in (ids, torch.tensor(ids), torch.tensor([ids])):
        from_ids = perplexity(model, None, given, 64, 16)
        assert (from_ids.tokens, from_ids.characters, from_ids.bits_per_character) == (
            from_text.tokens,
            None,
            None,
        )
        assert from_ids.nll == pytest.approx(from_text.nll, rel=1e-12)


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_left_training(pair, tokenizers) -> None:
    _, model = pair
    _, tokenizer = tokenizers
    expected = perplexity(model, tokenizer, "吾輩は猫である。")
    model.train()
    try:
        assert perplexity(model, tokenizer, "吾輩は猫である。") == expected
        assert model.training
    finally:
        model.eval()


def test_logits_are_computed_only_where_a_token_is_scored(pair, tokenizers, text: str) -> None:
    _, model = pair
    _, tokenizer = tokenizers
    shapes = []
    hook = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape[:2])))
    try:
        perplexity(model, tokenizer, text, 64, 16, batch_size=3)
    finally:
        hook.remove()
    # The first batch holds the first window (63 scored tokens); later windows score at most 16
    # tokens each, predicted from the 17 positions before them (the last position is unused).
    assert shapes[0] == (3, 64)
    assert max(length for _, length in shapes[1:]) == 17
    assert sum(rows for rows, _ in shapes) == len(windows(len(tokenizer.encode(text)), 64, 16))


def test_windows_and_what_they_score() -> None:
    assert windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # Without overlap a last window of one token has nothing to score and is left out.
    assert windows(9, 4, 4) == [(0, 1, 4), (4, 5, 8)]
    assert windows(3, 8, 8) == [(0, 1, 3)]
    assert windows(10, 4, 1)[-1] == (6, 9, 10)


def test_combine_adds_tokens_nll_and_characters() -> None:
    a, b = PerplexityResult(10, 20.0, 30), PerplexityResult(5, 4.0, 6)
    total = combine([a, b])
    assert (total.tokens, total.nll, total.characters) == (15, 24.0, 36)
    assert total.perplexity == pytest.approx(math.exp(24 / 15))
    assert total.bits_per_character == pytest.approx(24 / math.log(2) / 36)
    assert combine([a, PerplexityResult(1, 1.0)]).bits_per_character is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 65}, "max_length 65 is larger than the model's max_position_embeddings 64"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"max_length": 16, "stride": 17}, "stride 17 is larger than the window (max_length 16)"),
        ({"stride": 65}, "stride 65 is larger than the window (max_length 64)"),
        ({"stride": 0}, "stride must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ],
)
def test_bad_settings_are_named(pair, tokenizers, kwargs: dict, message: str) -> None:
    _, model = pair
    _, tokenizer = tokenizers
    with pytest.raises(ValueError) as err:
        perplexity(model, tokenizer, "吾輩は猫である。", **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "the text is empty"),
        ("猫", "the text is 1 token long; perplexity needs at least 2"),
        ([5], "1 token"),
    ],
)
def test_texts_too_short_to_score_are_named(pair, tokenizers, given, message: str) -> None:
    _, model = pair
    _, tokenizer = tokenizers
    with pytest.raises(ValueError, match=message):
        perplexity(model, tokenizer, given)


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> list[Path]:
    out = tmp_path_factory.mktemp("perplexity-files")
    novel = out / "neko.txt"
    novel.write_text((corpus_dir / "neko.txt").read_text(encoding="utf-8")[:500], encoding="utf-8")
    sentences = out / "gsd.txt"
    sentences.write_text((corpus_dir / "gsd-test.txt").read_text(encoding="utf-8")[:300], encoding="utf-8")
    return [novel, sentences]


def expected_results(
    checkpoint: Path, files: list[Path], max_length: int, stride: int
) -> list[PerplexityResult]:
    from neoxja import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(checkpoint)
    return [
        perplexity(model, tokenizer, path.read_bytes().decode("utf-8"), max_length, stride) for path in files
    ]


def test_cli_prints_each_file_and_the_total(
    tiny_checkpoint: Path, files: list[Path], capsys: pytest.CaptureFixture
) -> None:
    args = ["perplexity", "--model", str(tiny_checkpoint), "--max-length", "32", "--stride", "8"]
    assert main([*args, "--batch-size", "2", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = expected_results(tiny_checkpoint, files, 32, 8)
    assert lines[0] == "windows of 32 tokens, stride 8"
    assert lines[1].split() == ["file", "characters", "tokens", "perplexity", "bits/char"]
    rows = [*zip(map(str, files), expected, strict=True), ("total", combine(expected))]
    assert len(lines) == 2 + len(rows)
    for line, (name, result) in zip(lines[2:], rows, strict=True):
        assert line.split() == [
            name,
            str(result.characters),
            str(result.tokens),
            f"{result.perplexity:.4f}",
            f"{result.bits_per_character:.4f}",
        ]


def test_cli_json_parses_and_holds_the_apis_numbers(
    tiny_checkpoint: Path, files: list[Path], capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            ["perplexity", "--model", str(tiny_checkpoint), "--max-length", "32", "--json", *map(str, files)]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    expected = expected_results(tiny_checkpoint, files, 32, 32)
    assert (report["max_length"], report["stride"]) == (32, 32)
    assert [entry.pop("file") for entry in report["files"]] == list(map(str, files))
    for entry, result in zip(report["files"], expected, strict=True):
        assert entry == pytest.approx(result.as_dict(), rel=1e-9)
    assert report["total"] == pytest.approx(combine(expected).as_dict(), rel=1e-9)
    assert report["total"]["characters"] == sum(len(p.read_text(encoding="utf-8")) for p in files)


def test_cli_counts_the_files_characters_as_stored(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes("吾輩は猫である。\r\n名前はまだ無い。\r\n".encode())
    assert main(["perplexity", "--model", str(tiny_checkpoint), "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["characters"] == 20


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (None, [], "No such file or directory"),
        (b"\xe5\x90\xbe\xff", [], ":1: not UTF-8 text (byte 3 is 0xff)"),
        (b"", [], "is empty"),
        ("猫".encode(), [], "the text is 1 token long; perplexity needs at least 2"),
        (
            "吾輩は猫である。".encode(),
            ["--max-length", "4096"],
            "--max-length 4096 is larger than the model's",
        ),
        ("吾輩は猫である。".encode(), ["--stride", "0"], "--stride must be at least 1, got 0"),
        (
            "吾輩は猫である。".encode(),
            ["--max-length", "8", "--stride", "9"],
            "--stride 9 is larger than the window",
        ),
        ("吾輩は猫である。".encode(), ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ],
)
def test_cli_errors_are_one_line_naming_the_problem(
    tiny_checkpoint: Path, tmp_path: Path, make, extra: list, message: str, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "input.txt"
    if make is not None:
        path.write_bytes(make)
    assert main(["perplexity", "--model", str(tiny_checkpoint), *extra, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("neoxja perplexity: error: ")
    assert captured.err.count("\n") == 1
    assert message in captured.err


# ---------------------------------------------------------------------------- issue 24: conventions


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as tqdm asks before showing a bar."""

    def isatty(self) -> bool:
        return True


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys, terminal: bool) -> tuple[str, str]:
    """(stdout, stderr) of ``neoxja perplexity ...``, its stderr a terminal or not."""
    stderr = _Terminal() if terminal else io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", stderr)
        assert main(["perplexity", *argv]) == 0
    return capsys.readouterr().out, stderr.getvalue()


def test_cli_shows_progress_on_a_terminal_on_stderr_only(
    tiny_checkpoint: Path, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tiny_checkpoint)
    args = ["--model", str(tiny_checkpoint), "--max-length", "32", "--stride", "8", *map(str, files)]
    output = tmp_path / "out" / "ppl.json"
    table, progress = _run([*args, "--output", str(output)], monkeypatch, capsys, terminal=True)
    for path in files:  # a bar per file: its windows done of its total, and the throughput
        total = len(windows(len(tokenizer.encode(path.read_text(encoding="utf-8"))), 32, 8))
        assert re.search(rf"{re.escape(str(path))}: 100%.*\b{total}/{total} .*tokens/s", progress), progress
    assert f"wrote {output}" in progress
    # --no-progress: nothing on stderr, even on a terminal, and the same results on stdout.
    assert _run([*args, "--no-progress"], monkeypatch, capsys, terminal=True) == (table, "")
    # --output holds the --json object of the same numbers.
    report = json.loads(output.read_text(encoding="utf-8"))
    rows = [*report["files"], {"file": "total", **report["total"]}]
    assert [line.split() for line in table.splitlines()[2:]] == [
        [
            r["file"],
            str(r["characters"]),
            str(r["tokens"]),
            f"{r['perplexity']:.4f}",
            f"{r['bits_per_character']:.4f}",
        ]
        for r in rows
    ]


@pytest.mark.parametrize(
    ("option", "load"),
    [
        (["--quantize", "bfloat16"], {"weight_format": "bfloat16"}),
        (["--dtype", "bfloat16"], {"dtype": "bfloat16"}),
    ],
)
def test_cli_loads_the_model_as_quantize_and_dtype_say(
    tiny_checkpoint: Path, files: list[Path], option: list[str], load: dict, capsys
) -> None:
    from neoxja import GPTNeoXJapaneseForCausalLM
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    assert main(["perplexity", "--model", str(tiny_checkpoint), *option, "--json", str(files[0])]) == 0
    got = json.loads(capsys.readouterr().out)["total"]
    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint, **load).eval()
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tiny_checkpoint)
    text = files[0].read_text(encoding="utf-8")
    assert got == pytest.approx(perplexity(model, tokenizer, text).as_dict(), rel=1e-9)
    float32 = expected_results(tiny_checkpoint, files[:1], MAX_POSITIONS, MAX_POSITIONS)[0]
    assert got["nll"] != pytest.approx(float32.nll, rel=1e-6)  # the option changed the weights


def test_cli_output_errors_come_before_the_model_loads(tmp_path: Path, capsys) -> None:
    text = tmp_path / "a.txt"
    text.write_text("吾輩は猫である。", encoding="utf-8")
    assert main(["perplexity", "--model", "/nonexistent/model", "-o", str(tmp_path), str(text)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"neoxja perplexity: error: --output {tmp_path} is a directory: give a file name\n"
