"""Training data in the chat format (``{"messages": [...]}`` JSONL, as mlx_lm.lora and TRL read it):
rendered by the tokenizer's chat template, the loss on the assistant's turns, bad records named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import neoxja
from neoxja.cli import main
from neoxja.tuner.data import DataError, check_data, load_dataset

CHAT = [
    {"role": "system", "content": "あなたは猫です。"},
    {"role": "user", "content": "名前は？"},
    {"role": "assistant", "content": "まだ無い。"},
    {"role": "user", "content": "どこで生れた？"},
    {"role": "assistant", "content": "とんと見当がつかぬ。"},
]


@pytest.fixture(scope="module")
def tokenizer(assets_dir: Path) -> neoxja.GPTNeoXJapaneseTokenizer:
    return neoxja.GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)


def write_jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_conversation_is_the_chat_template_text_with_loss_on_the_assistant_turns(
    tokenizer, tmp_path: Path
) -> None:
    data = load_dataset([write_jsonl(tmp_path / "chat.jsonl", {"messages": CHAT})], tokenizer, 512)
    ids, labels = data.rows(torch.tensor([0]))
    kept = ids[0, : data.length].tolist()
    # The transcript as neoxja chat and serve render it: each assistant turn after its own prompt.
    first_prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    after_first = tokenizer.apply_chat_template(CHAT[:3], tokenize=False)
    second_prompt = tokenizer.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert first_prompt.endswith("ユーザー: 名前は？\nアシスタント: ")
    pieces = [
        (first_prompt, False),
        (after_first[len(first_prompt) :], True),  # "まだ無い。\n"
        (second_prompt[len(after_first) :], False),
        (whole[len(second_prompt) :], True),
    ]
    expected, loss = [], []
    for text, learnt in pieces:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        expected += encoded
        loss += [learnt] * len(encoded)
    expected.append(tokenizer.eos_token_id)  # end-of-text, with loss, as after any document
    loss.append(True)
    assert kept == expected
    assert (labels[0, : data.length] != -100).tolist() == loss
    learnt = tokenizer.decode([i for i, learnt in zip(kept, loss, strict=True) if learnt][:-1])
    assert learnt.replace(" ", "") == "まだ無い。\nとんと見当がつかぬ。\n"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": []}, r'"messages" must be a non-empty list of messages, found an empty list'),
        ({"messages": "hi"}, r'"messages" must be a non-empty list of messages, found a str'),
        ({"messages": ["hi"]}, r'messages\[0\] must be an object with "role" and "content", found a str'),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            r"messages\[0\]: role must be one of system, user, ",
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            r"messages\[0\]: content must be a string, found int",
        ),
        ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, r"messages\[0\] has keys other than"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"no assistant message \(nothing to learn from\)"),
        ({"messages": CHAT[2:]}, r"messages\[0\] is an assistant turn: start with a system or user message"),
    ],
    ids=["empty", "not-a-list", "not-an-object", "role", "content", "extra-key", "no-assistant", "starts"],
)
def test_bad_chat_records_name_file_and_line(tokenizer, tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", {"messages": CHAT}, record)
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}"):
        check_data([path], tokenizer)


def test_without_jinja2_the_error_names_the_line_and_what_to_install(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neoxja.tokenizer import chat

    monkeypatch.setitem(sys.modules, "jinja2", None)
    compile_template = getattr(chat, "compile_template", None)
    if hasattr(compile_template, "cache_clear"):
        compile_template.cache_clear()  # templates compiled by earlier tests would need no import
    path = write_jsonl(tmp_path / "chat.jsonl", {"messages": CHAT})
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*jinja2.*pip install"):
        check_data([path], tokenizer)
    monkeypatch.undo()
    if hasattr(compile_template, "cache_clear"):
        compile_template.cache_clear()


def test_neoxja_train_learns_from_chat_data(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", {"messages": CHAT}, {"messages": CHAT[:3]})
    out = tmp_path / "run"
    command = ["train", "--model", str(tiny_checkpoint), "--data", str(path), "-o", str(out),
               "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--no-progress"]  # fmt: skip
    assert main(command) == 0
    assert "trained 2 steps" in capsys.readouterr().err
    # a bad record stops the command before the model loads: one line, the file and line named
    bad = write_jsonl(tmp_path / "bad.jsonl", {"messages": CHAT}, {"messages": [{"role": "robot"}]})
    command[command.index("--model") + 1] = str(tmp_path / "no-model")
    command[command.index("--data") + 1] = str(bad)
    command[command.index("-o") + 1] = str(tmp_path / "other")
    command += ["--tokenizer", str(tiny_checkpoint)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("neoxja train: error: ") and len(err.strip().splitlines()) == 1
    assert "bad.jsonl:2: messages[0]: role must be one of system, user, assistant, found 'robot'" in err
