"""tokenizer.apply_chat_template against transformers' (the oracle), its template's sources and saving."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from neoxja import GPTNeoXJapaneseTokenizer
from neoxja.serving.chat import compile_chat_template
from neoxja.tokenizer.chat import DEFAULT_CHAT_STOPS, DEFAULT_CHAT_TEMPLATE, chat_stops, compile_template

CONVERSATION = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "日本の首都は？"},
    {"role": "assistant", "content": "東京です。"},
    {"role": "user", "content": "人口は 😀 どのくらい？"},
]
CUSTOM = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}{{ eos_token }}"


@pytest.fixture(scope="module")
def ours(assets_dir: Path) -> GPTNeoXJapaneseTokenizer:
    return GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)


@pytest.fixture(scope="module")
def theirs(assets_dir: Path):
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    return Reference.from_pretrained(str(assets_dir))


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, CUSTOM], ids=["default", "custom"])
@pytest.mark.parametrize(
    ("options", "messages"),
    [
        ({"add_generation_prompt": True}, CONVERSATION),
        ({"add_generation_prompt": False}, CONVERSATION[:3]),
        ({"continue_final_message": True}, CONVERSATION[:3]),
    ],
)
def test_text_and_ids_match_transformers(ours, theirs, template: str, options: dict, messages: list) -> None:
    expected_text = theirs.apply_chat_template(messages, chat_template=template, tokenize=False, **options)
    expected_ids = theirs.apply_chat_template(messages, chat_template=template, return_dict=False, **options)
    assert (
        ours.apply_chat_template(messages, chat_template=template, tokenize=False, **options) == expected_text
    )
    assert ours.apply_chat_template(messages, chat_template=template, **options) == expected_ids


def test_default_template_is_the_servers_transcript(ours) -> None:
    assert ours.chat_template is None
    text = ours.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == "あなたは親切なアシスタントです。\nユーザー: 日本の首都は？\nアシスタント: "
    assert text == compile_chat_template(DEFAULT_CHAT_TEMPLATE)(CONVERSATION[:2])
    assert chat_stops(DEFAULT_CHAT_TEMPLATE) == DEFAULT_CHAT_STOPS and chat_stops(CUSTOM) == []


def test_return_dict_tensors_and_batches(ours) -> None:
    one = ours.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    encoded = ours.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=True)
    assert encoded["input_ids"] == one and encoded["attention_mask"] == [1] * len(one)
    tensor = ours.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(tensor, torch.tensor([one]))
    batch = ours.apply_chat_template(
        [CONVERSATION[:2], CONVERSATION[:1]], padding=True, return_tensors="pt", return_dict=True
    )
    short = ours.apply_chat_template(CONVERSATION[:1])
    assert batch["input_ids"].shape == (2, len(ours.apply_chat_template(CONVERSATION[:2])))
    assert batch["attention_mask"][1].sum() == len(short)
    texts = ours.apply_chat_template([CONVERSATION[:1], CONVERSATION[1:2]], tokenize=False)
    assert texts == ["あなたは親切なアシスタントです。\n", "ユーザー: 日本の首都は？\n"]


def test_template_from_tokenizer_config_and_jinja_file(assets_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.txt", "emoji.json"):
        shutil.copy(assets_dir / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "KEY {{ messages[0].content }}"})
    )
    assert (
        GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path).apply_chat_template(
            CONVERSATION[:1], tokenize=False
        )
        == "KEY " + CONVERSATION[0]["content"]
    )
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages[0].content }}\n")  # transformers 5's file
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)
    assert (
        tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False)
        == "FILE " + CONVERSATION[0]["content"]
    )
    tokenizer.chat_template = CUSTOM
    tokenizer.save_pretrained(tmp_path)  # the key, and the .jinja file that would win on loading
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CUSTOM
    assert GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path).chat_template == CUSTOM


def test_saved_template_loads_in_transformers(ours, tmp_path: Path) -> None:
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(
        ours.vocab_file.rsplit("/", 1)[0], chat_template=CUSTOM
    )
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert Reference.from_pretrained(str(tmp_path)).chat_template == CUSTOM
    plain = tmp_path / "plain"
    ours.save_pretrained(plain)  # no template set: none written, the default stays the default
    assert "chat_template" not in json.loads((plain / "tokenizer_config.json").read_text())


def test_bad_conversations_are_named(ours) -> None:
    with pytest.raises(ValueError, match="conversation is empty"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="message 1 must be a dict with a 'role'"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match="do not go together"):
        ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(TypeError, match="chat_template must be a string"):
        ours.apply_chat_template(CONVERSATION, chat_template=3)
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no system here"):
        ours.apply_chat_template(CONVERSATION, chat_template="{{ raise_exception('no system here') }}")


def test_missing_jinja2_names_what_to_install(ours, monkeypatch: pytest.MonkeyPatch) -> None:
    compile_template.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)
    try:
        with pytest.raises(ImportError, match="pip install jinja2"):
            ours.apply_chat_template(CONVERSATION, tokenize=False)
    finally:
        compile_template.cache_clear()
