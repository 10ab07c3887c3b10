"""Issue 24's generate/chat items: --stop, --min-p, --num-return-sequences, the summary, --max-tokens,
chat through the chat template (--system, --chat-template, --raw), and the sampling defaults of every
entry point (the README's table)."""

from __future__ import annotations

import argparse
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_checkpoint

import neoxja.commands.generate as generate_command
import neoxja.commands.textgen as textgen
from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer
from neoxja.cli import build_parser, main
from neoxja.commands.textgen import StreamedText
from neoxja.generation_config import TEXT_GENERATION_DEFAULTS
from neoxja.tokenizer.chat import DEFAULT_CHAT_STOPS

PROMPT = "人とAIが協調するためには、"
GREEDY = ["--temperature", "0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), assets_dir, seed=2)


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path) -> tuple[GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer]:
    return GPTNeoXJapaneseForCausalLM.from_pretrained(
        tiny_dir
    ).eval(), GPTNeoXJapaneseTokenizer.from_pretrained(tiny_dir)


def continuation(loaded, prompt: str, max_new_tokens: int, **kwargs) -> str:
    model, tokenizer = loaded
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_stop_cuts_the_text_before_the_first_stop_string(tiny_dir: Path, loaded, capsys) -> None:
    full = continuation(loaded, PROMPT, 20)
    first, second = full[6], full[3]  # two characters the greedy text reaches: the earlier one wins
    status, out, _ = run(capsys, "generate", "--model", str(tiny_dir), "--max-new-tokens", "20", *GREEDY,
                         "--stop", first, "--stop", second, PROMPT)  # fmt: skip
    assert status == 0
    assert out == full[: min(full.index(first), full.index(second))] + "\n"


def test_streamed_text_holds_back_what_may_begin_a_stop(loaded) -> None:
    _, tokenizer = loaded
    written: list[str] = []
    output = StreamedText(tokenizer, ["\nユーザー:"], written.append)
    output.put(torch.tensor([tokenizer.encode("質問")]))  # the prompt: timed, not shown
    ids = tokenizer.encode("はい。\nユーザー: 次")
    for token in ids:  # the stop string arrives over several tokens
        output.put(torch.tensor([[token]]))
        assert "".join(written) == "はい。"[: len("".join(written))]
    output.end()
    assert "".join(written) == "はい。" and output.shown == written and output.stopped
    assert (output.timing.prompt_tokens, output.timing.generated_tokens) == (
        len(tokenizer.encode("質問")),
        len(ids),
    )


def test_min_p_one_keeps_only_the_most_likely_token(tiny_dir: Path, loaded, capsys) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "12", "--top-k", "0", PROMPT]
    status, out, _ = run(capsys, *args, "--temperature", "5", "--min-p", "1", "--seed", "3")
    assert status == 0 and out == continuation(loaded, PROMPT, 12) + "\n"
    assert run(capsys, *args, "--min-p", "1.5")[:1] == (2,)


def test_num_return_sequences_prints_each_after_a_header(tiny_dir: Path, loaded, capsys) -> None:
    args = ["--max-new-tokens", "8", "--temperature", "1.5", "--top-k", "30", "--seed", "5"]
    status, out, _ = run(
        capsys, "generate", "--model", str(tiny_dir), *args, "--num-return-sequences", "3", PROMPT
    )
    assert status == 0
    parts = re.split(r"^--- (\d)/3 ---\n", out, flags=re.M)
    assert parts[0] == "" and parts[1::2] == ["1", "2", "3"]
    model, tokenizer = loaded
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    expected = model.generate(
        ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=30, num_return_sequences=3, seed=5,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    texts = [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in expected.tolist()]
    assert [text.removesuffix("\n") for text in parts[2::2]] == texts
    status, _, err = run(
        capsys, "generate", "--model", str(tiny_dir), *GREEDY, "--num-return-sequences", "2", "x"
    )
    assert status == 2 and "--num-return-sequences 2 needs sampling" in err


def test_summary_on_stderr_with_verbose_none_with_quiet(tiny_dir: Path, loaded, capsys) -> None:
    _, tokenizer = loaded
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "5", *GREEDY, PROMPT]
    status, out, err = run(capsys, *args, "--verbose")
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert status == 0 and out == continuation(loaded, PROMPT, 5) + "\n"  # stdout: the text alone
    assert re.fullmatch(
        rf"prompt: {prompt_tokens} tokens, [\d.]+ tokens/s \| generation: 5 tokens, [\d.]+ tokens/s"
        r" \| peak memory: [\d.]+ GB \(process RSS\)\n",
        err,
    )
    assert run(capsys, *args, "--quiet")[1:] == (out, "")
    assert run(capsys, *args)[2] == ""  # stderr is no terminal here: no summary by default
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--verbose", "--quiet"])  # one or the other
    assert exit_.value.code == 2 and "not allowed with argument --verbose" in capsys.readouterr().err


def test_max_tokens_is_an_alias_of_max_new_tokens(tiny_dir: Path, capsys) -> None:
    args = ["generate", "--model", str(tiny_dir), *GREEDY, PROMPT]
    assert run(capsys, *args, "--max-tokens", "7") == run(capsys, *args, "--max-new-tokens", "7")


def record_prompts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], dict]]:
    seen: list[tuple[list[int], dict]] = []
    real_stream = textgen.stream_one

    def recording(model, tokenizer, input_ids, kwargs, output):
        seen.append((input_ids[0].tolist(), dict(kwargs)))
        return real_stream(model, tokenizer, input_ids, kwargs, output)

    monkeypatch.setattr(textgen, "stream_one", recording)
    return seen


def test_chat_renders_the_conversation_with_the_servers_template(
    tiny_dir: Path, loaded, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = loaded
    seen = record_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n元気？\n"))
    status, out, _ = run(capsys, "chat", "--model", str(tiny_dir), "--max-new-tokens", "4", *GREEDY,
                         "--system", "あなたは親切です。")  # fmt: skip
    assert status == 0 and len(seen) == 2
    replies = [line.removeprefix("> ") for line in out.split("\n")[:2]]
    messages = [
        {"role": "system", "content": "あなたは親切です。"},
        {"role": "user", "content": "こんにちは"},
    ]
    assert seen[0][0] == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    messages += [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "元気？"}]
    assert seen[1][0] == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert seen[0][1]["stop_strings"] == DEFAULT_CHAT_STOPS  # replies end before the next user turn


def test_chat_template_file_replaces_the_template_and_its_stops(
    tiny_dir: Path, loaded, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = loaded
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:\n", encoding="utf-8")
    seen = record_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n"))
    args = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "3", *GREEDY, "--stop", "。"]
    assert run(capsys, *args, "--chat-template", str(template))[0] == 0
    assert seen[0][0] == tokenizer.encode("Q: こんにちは\nA:") and seen[0][1]["stop_strings"] == ["。"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--chat-template", "{missing}"], "--chat-template {missing}: No such file"),
        (["--chat-template", "{bad}"], "--chat-template {bad}: Unexpected end of template"),
        (["--raw", "--system", "x"], "--raw continues plain text"),
        (["--stop", ""], "--stop must be a non-empty string"),
    ],
)
def test_chat_errors_come_before_the_model_loads(tmp_path: Path, capsys, extra: list, message: str) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}", encoding="utf-8")
    paths = {"missing": tmp_path / "none.jinja", "bad": bad}
    extra = [item.format(**paths) for item in extra]
    status, _, err = run(capsys, "chat", "--model", str(tmp_path / "no-model"), *extra)
    assert status == 2 and err.count("\n") == 1 and message.format(**paths) in err


def test_chat_drops_the_oldest_turns_to_fit_the_context(loaded) -> None:
    _, tokenizer = loaded
    system = {"role": "system", "content": "システム"}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"発言{i}" * 5} for i in range(5)]
    whole = tokenizer.apply_chat_template([system, *turns], add_generation_prompt=True)
    ids, kept = generate_command.chat_prompt(
        tokenizer, tokenizer.get_chat_template(), [system, *turns], len(whole) - 1
    )
    assert kept[0] == system and kept[-1] == turns[-1] and len(kept) < 6 and len(ids) < len(whole)
    assert ids == tokenizer.apply_chat_template(kept, add_generation_prompt=True)
    with pytest.raises(ValueError, match="room for 3"):
        generate_command.chat_prompt(tokenizer, tokenizer.get_chat_template(), [system, *turns], 3)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_shows_defaults_aliases_and_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--max-new-tokens N, --max-tokens N",
        "(default: 256)",
        "(default: 0.7)",
        "--min-p P",
        "--stop STR",
    ):
        assert shown in text
    assert "(default: the model's generation_config.json, else 50)" in text and "examples:" in text
    assert ("--num-return-sequences N" in text) == (command == "generate")
    assert "--prompt-lookup N" in text and "--assistant-model PATH_OR_ID" in text
    assert "--max-matching-ngram-size N" in text and "(default: 2, transformers')" in text
    beams = ("--num-beams N", "(default: 1)", "--early-stopping {true,false,never}", "not streamed")
    assert all((shown in text) == (command == "generate") for shown in beams)
    assert ("--system TEXT" in text and "--chat-template FILE" in text) == (command == "chat")


# ---------------------------------------------------------------- sampling defaults: the README's table


def test_the_cli_defaults_are_the_pipelines() -> None:
    from neoxja.pipelines import PIPELINE_DEFAULTS

    args = build_parser().parse_args(["generate", "x"])
    assert PIPELINE_DEFAULTS == TEXT_GENERATION_DEFAULTS
    assert {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "do_sample": True} == (
        TEXT_GENERATION_DEFAULTS
    )
    settings = generate_command.generation_settings(args)
    assert settings == {
        "max_new_tokens": 256,
        "temperature": 0.7,
        "do_sample": True,
        "num_return_sequences": 1,
        "num_beams": 1,
    }
    assert (args.top_k, args.top_p, args.min_p, args.repetition_penalty) == (
        None,
        None,
        None,
        None,
    )  # model's


def test_generate_defaults_to_greedy_20_tokens_like_transformers(loaded) -> None:
    model, tokenizer = loaded
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert not model.generation_config.do_sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, pad_token_id=tokenizer.pad_token_id)
    assert any("20" in str(w.message) for w in caught)
    assert torch.equal(out, model.generate(ids, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id))


def test_the_server_defaults_are_openais(loaded) -> None:
    from neoxja.serving.protocol import Limits, parse_chat, parse_completion

    _, tokenizer = loaded
    limits = Limits(max_model_len=2048, vocab_size=32000, max_tokens=2048)
    params = parse_completion({"prompt": "x"}, tokenizer, limits).params
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.max_tokens) == (
        1.0,
        1.0,
        0,
        0.0,
        16,
    )
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}]}, lambda m: "x", tokenizer, limits, [])
    assert (chat.params.temperature, chat.params.top_p) == (1.0, 1.0)
    assert chat.params.max_tokens == 2048 - len(tokenizer.encode("x"))  # what the context leaves


def test_every_command_with_the_shared_model_options_takes_tokenizer() -> None:
    """add_model_arguments gives --tokenizer (and --model's Hub default) to each command that uses it."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    using = {name: sub for name, sub in commands.items() if "--quantize" in sub._option_string_actions}
    assert {"generate", "chat"} <= set(using)
    for name, sub in using.items():
        options = sub._option_string_actions
        assert "--tokenizer" in options, name
        assert options["--model"].default == "abeja/gpt-neox-japanese-2.7b", name


# ---------------------------------------------------------------- beam search and assisted decoding


def test_num_beams_prints_model_generates_best_beams_at_the_end(
    tiny_dir: Path, loaded, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = loaded
    seen = record_prompts(monkeypatch)  # beams are not streamed
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    base = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "8", *GREEDY, PROMPT]
    for options, settings in (
        (["--num-beams", "4", "--num-return-sequences", "2"], {"num_beams": 4, "num_return_sequences": 2}),
        (["--num-beams", "2", "--length-penalty", "-1.5", "--early-stopping", "never"],
         {"num_beams": 2, "length_penalty": -1.5, "early_stopping": "never"}),
    ):  # fmt: skip
        status, out, _ = run(capsys, *base, *options)
        expected = model.generate(ids, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, **settings)
        texts = [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in expected.tolist()]
        assert status == 0
        if len(texts) == 1:
            assert out == texts[0] + "\n"
        else:
            assert out == "".join(f"--- {i}/{len(texts)} ---\n{text}\n" for i, text in enumerate(texts, 1))
    assert seen == []


def test_prompt_lookup_and_assistant_stream_what_model_generate_gives(
    tiny_dir: Path, loaded, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = loaded
    prompt = PROMPT * 3  # the text repeats itself: prompt lookup finds drafts
    seen = record_prompts(monkeypatch)
    ids = torch.tensor([tokenizer.encode(prompt)])
    greedy = continuation(loaded, prompt, 12)
    base = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "12", prompt]
    for options in (
        ["--prompt-lookup", "4"],
        ["--prompt-lookup", "2", "--max-matching-ngram-size", "3"],
        ["--assistant-model", str(tiny_dir)],
    ):
        assert run(capsys, *base, *GREEDY, *options)[:2] == (0, greedy + "\n"), options
    # sampling: the text model.generate samples with the same settings and seed
    status, out, _ = run(capsys, *base, "--prompt-lookup", "4", "--seed", "7", "--top-k", "20")
    sampled = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, seed=7,
                             prompt_lookup_num_tokens=4, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert (
        status == 0 and out == tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    )
    assert [kwargs.get("prompt_lookup_num_tokens") for _, kwargs in seen] == [4, 2, None, 4]  # all streamed
    assert type(seen[2][1]["assistant_model"]) is type(model)


def test_chat_takes_prompt_lookup(tiny_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n"))
    args = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "4", *GREEDY]
    status, plain, _ = run(capsys, *args)
    monkeypatch.setattr("sys.stdin", io.StringIO("こんにちは\n"))
    assert run(capsys, *args, "--prompt-lookup", "3")[:2] == (status, plain) == (0, plain)
    assert seen[1][1]["prompt_lookup_num_tokens"] == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--length-penalty", "2"], "--length-penalty only acts with --num-beams N (N > 1)"),
        (["--num-beams", "1", "--early-stopping", "never"], "--early-stopping only acts with --num-beams N"),
        (["--max-matching-ngram-size", "3"], "--max-matching-ngram-size only acts with --prompt-lookup N"),
        (["--num-beams", "0"], "--num-beams must be a positive integer (1: no beam search), got 0"),
        (["--prompt-lookup", "0"], "--prompt-lookup must be a positive integer"),
        (["--assistant-model", "{file}"], "--assistant-model {file} is a file: pass its directory"),
    ],
)
def test_decoding_options_that_cannot_act_fail_before_the_model_loads(
    tmp_path: Path, capsys, options: list, message: str
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    paths = {"file": str(tmp_path / "weights.bin")}
    options = [option.format(**paths) for option in options]
    status, out, err = run(capsys, "generate", "--model", str(tmp_path / "no-model"), *options, PROMPT)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"neoxja generate: error: {message.format(**paths)}")
