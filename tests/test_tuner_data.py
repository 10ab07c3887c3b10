"""Training data: reading .txt/.jsonl, errors that name file and line, tokenising, packing, order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neoxja.tuner.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    load_dataset,
    pack,
    read_records,
    tokenize_records,
)


class CharTokenizer:
    """One id per character (its code point modulo 1000, + 10): enough to check what goes where."""

    eos_token_id = 2
    pad_token_id = 3

    def encode_batch(self, texts: list[str], num_workers: int = 1) -> list[list[int]]:
        return [[10 + ord(ch) % 1000 for ch in text] for text in texts]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_txt_is_one_document_or_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "吾輩は猫である。\n\n名前はまだ無い。\n")
    assert [r.text for r in read_records([path])] == ["吾輩は猫である。\n\n名前はまだ無い。\n"]
    per_line = read_records([path], per_line=True)
    assert [(r.text, r.source) for r in per_line] == [
        ("吾輩は猫である。", f"{path}:1"),
        ("名前はまだ無い。", f"{path}:3"),
    ]


def test_jsonl_text_and_prompt_completion(tmp_path: Path) -> None:
    lines = [{"text": "本文"}, {"prompt": "問:", "completion": "答"}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    assert read_records([path]) == [
        Record("本文", source=f"{path}:1"),
        Record("答", prompt="問:", source=f"{path}:2"),
    ]


def test_a_directory_is_read_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "二")
    write(tmp_path / "a.jsonl", '{"text": "一"}')
    assert [r.text for r in read_records([tmp_path])] == ["一", "二"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "no end"\n', r"bad\.jsonl:2: not a JSON line"),
        ("bad.jsonl", '{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object, found a list"),
        ("bad.jsonl", '{"txt": "typo"}\n', r"bad\.jsonl:1: needs \"text\", or \"prompt\" and \"completion\""),
        ("bad.jsonl", '{"prompt": "q"}\n', r"bad\.jsonl:1: a prompt/completion record needs completion"),
        ("bad.jsonl", '{"text": 5}\n', r"bad\.jsonl:1: 'text' must be a string, found int"),
        ("bad.jsonl", '{"prompt": "q", "completion": ""}\n', r"bad\.jsonl:1: empty 'completion'"),
        ("empty.txt", "\n  \n", r"empty\.txt: empty"),
        ("empty.jsonl", "", r"empty\.jsonl: empty"),
        ("bytes.txt", b"ok\nok\n\xff\xfe", r"bytes\.txt:3: not UTF-8 text \(byte 6 is 0xff\)"),
        ("data.csv", "a,b", r"data\.csv: unknown kind of data file"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        read_records([path])


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.txt: no such file"):
        read_records([tmp_path / "nothing.txt"])


def test_prompt_tokens_carry_no_loss_and_documents_end_with_eos() -> None:
    tok = CharTokenizer()
    pairs = tokenize_records([Record("ab"), Record("c", prompt="xy")], tok)
    a, b, c, x, y = (10 + ord(ch) for ch in "abcxy")
    assert pairs == [([a, b, 2], [a, b, 2]), ([x, y, c, 2], [IGNORE_INDEX, IGNORE_INDEX, c, 2])]


def test_packing_keeps_every_token_and_pads_the_last_block() -> None:
    pairs = [([5, 6, 2], [5, 6, 2]), ([7, 8, 9, 2], [-100, 8, 9, 2])]
    data = pack(pairs, seq_len=3, pad_id=0)
    assert data.input_ids.tolist() == [[5, 6, 2], [7, 8, 9], [2, 0, 0]]
    assert data.labels.tolist() == [[5, 6, 2], [-100, 8, 9], [2, -100, -100]]
    assert data.num_tokens == 6
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        pack(pairs, seq_len=1, pad_id=0)


def test_order_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "あいうえおかきくけこさしすせそたちつてと" * 5)
    data = load_dataset([tmp_path / "a.txt"], CharTokenizer(), seq_len=4)
    first = data.order(seed=1, epoch=0)
    assert sorted(first.tolist()) == list(range(len(data)))
    assert torch.equal(first, data.order(seed=1, epoch=0))
    assert not torch.equal(first, data.order(seed=1, epoch=1))
    assert not torch.equal(first, data.order(seed=2, epoch=0))


def test_real_tokenizer_ids_match_encode(tmp_path: Path, assets_dir: Path) -> None:
    from neoxja import GPTNeoXJapaneseTokenizer

    tok = GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)
    write(tmp_path / "a.jsonl", '{"prompt": "質問:", "completion": "吾輩は猫である。"}\n')
    data = load_dataset([tmp_path / "a.jsonl"], tok, seq_len=64)
    prompt, text = tok.encode("質問:"), tok.encode("吾輩は猫である。")
    n = len(prompt) + len(text) + 1
    assert data.input_ids[0, :n].tolist() == prompt + text + [tok.eos_token_id]
    assert data.labels[0, :n].tolist() == [IGNORE_INDEX] * len(prompt) + text + [tok.eos_token_id]
