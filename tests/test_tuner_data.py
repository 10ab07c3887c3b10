"""Training data: reading .txt/.jsonl as a stream, errors that name file and line, what a line is,
tokenising into compact arrays, packing, loss masks, order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neoxja.tuner import data_files
from neoxja.tuner.data import (
    IGNORE_INDEX,
    DataError,
    PackedDataset,
    Text,
    id_storage,
    load_dataset,
    pack_texts,
)
from neoxja.tuner.data_files import read_texts


class CharTokenizer:
    """One id per character (its code point modulo 1000, + 10): enough to check what goes where."""

    eos_token_id = 2
    pad_token_id = 3

    def __init__(self, largest_id: int = 1009) -> None:
        self.largest_id = largest_id

    def get_vocab(self) -> dict[str, int]:
        return {"<eos>": 2, "<pad>": 3, "<last>": self.largest_id}

    def encode_batch(self, texts: list[str], num_workers: int = 1) -> list[list[int]]:
        return [[10 + ord(ch) % 1000 for ch in text] for text in texts]


def ids_of(text: str) -> list[int]:
    return CharTokenizer().encode_batch([text])[0]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def documents(path: Path, per_line: bool = False) -> list[tuple[str, str, str]]:
    """(prompt, text, source) of every document of ``path``, its parts joined."""
    docs, prompt, text = [], [], []
    for part in read_texts(path, per_line):
        (text if part.loss else prompt).append(part.text)
        if part.document_ends:
            docs.append(("".join(prompt), "".join(text), part.source))
            prompt, text = [], []
    return docs


def test_txt_is_one_document_or_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "\ufeff吾輩は猫である。\n\n名前はまだ無い。\n")
    assert documents(path) == [("", "吾輩は猫である。\n\n名前はまだ無い。\n", f"{path}:1")]
    assert documents(path, per_line=True) == [
        ("", "吾輩は猫である。", f"{path}:1"),
        ("", "名前はまだ無い。", f"{path}:3"),
    ]


def test_a_line_ends_at_newline_only(tmp_path: Path) -> None:
    # CRLF is a line end; a lone CR, U+2028, U+2029, U+0085 and form feeds stay inside the line.
    path = write(tmp_path / "a.txt", "一\r\n二\r三\u2028四\u2029五\x85六\x0c七\n \t\n\r\n八\r")
    assert documents(path, per_line=True) == [
        ("", "一", f"{path}:1"),
        ("", "二\r三\u2028四\u2029五\x85六\x0c七", f"{path}:2"),
        ("", "八\r", f"{path}:5"),
    ]


def test_jsonl_text_and_prompt_completion(tmp_path: Path) -> None:
    lines = [{"text": "本文"}, {"prompt": "問:", "completion": "答"}, {"prompt": "", "completion": "無"}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    assert documents(path) == [
        ("", "本文", f"{path}:1"),
        ("問:", "答", f"{path}:2"),
        ("", "無", f"{path}:3"),
    ]


def test_jsonl_strings_may_hold_unicode_line_breaks_and_lines_may_end_in_crlf(tmp_path: Path) -> None:
    texts = ["段落\u2028改行", "段\u2029落", "NEL\x85here", "縦\x0bタブ\x0c"]
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    path = write(tmp_path / "u.jsonl", body + '{"text": 1}\r\n')
    with pytest.raises(DataError, match=r"u\.jsonl:5: 'text' must be a string"):
        documents(path)  # the line count is right after lines holding those characters
    path = write(tmp_path / "u.jsonl", body)
    assert documents(path) == [("", t, f"{path}:{n}") for n, t in enumerate(texts, 1)]


def test_a_directory_is_read_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "二")
    write(tmp_path / "a.jsonl", '{"text": "一"}')
    write(tmp_path / "notes.md", "not data")
    files = data_files.data_files([tmp_path])
    assert [text for f in files for _, text, _ in documents(f)] == ["一", "二"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "no end"\n', r"bad\.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object, found a list"),
        (
            "bad.jsonl",
            '{"txt": "typo"}\n',
            r'bad\.jsonl:1: needs "text", "prompt" and "completion", or "messages"',
        ),
        ("bad.jsonl", '{"prompt": "q"}\n', r"bad\.jsonl:1: a prompt/completion record needs completion"),
        ("bad.jsonl", '{"text": 5}\n', r"bad\.jsonl:1: 'text' must be a string, found int"),
        ("bad.jsonl", '{"prompt": "q", "completion": ""}\n', r"bad\.jsonl:1: empty 'completion'"),
        (
            "deep.jsonl",
            '{"text": "ok"}\n{"text": "a", "x": ' + "[" * 70 + "]" * 70 + "}\n",
            r"deep\.jsonl:2: .*nested",
        ),
        ("empty.txt", "\n  \n", r"empty\.txt: empty"),
        ("empty.jsonl", "", r"empty\.jsonl: empty"),
        ("bytes.txt", b"ok\nok\n\xff\xfe", r"bytes\.txt:3: not UTF-8 text \(byte 6 is 0xff\)"),
        ("cut.txt", b"ok\n" + "猫".encode()[:2], r"cut\.txt:2: not UTF-8 text \(byte 3 is 0xe7\)"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = write(tmp_path / name, content)
    for per_line in (False, True):
        with pytest.raises(DataError, match=message):
            documents(path, per_line)


def test_undecodable_bytes_are_placed_across_read_boundaries(tmp_path: Path, monkeypatch) -> None:
    # Read 5 bytes at a time: characters split between reads decode whole, and an error still
    # names the line and the byte offset in the file.
    monkeypatch.setattr(data_files, "READ_BYTES", 5)
    text = "吾輩は\n猫である。\r\n名前は\nまだ無い"
    path = write(tmp_path / "a.txt", "\ufeff" + text)
    assert documents(path) == [("", text, f"{path}:1")]
    assert [t for _, t, _ in documents(path, per_line=True)] == ["吾輩は", "猫である。", "名前は", "まだ無い"]
    raw = ("\ufeff" + text).encode()
    write(path, raw + b"\n\x80tail")
    with pytest.raises(DataError, match=rf"a\.txt:5: not UTF-8 text \(byte {len(raw) + 1} is 0x80\)"):
        documents(path)


def test_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.txt: no such file"):
        data_files.data_files([tmp_path / "nothing.txt"])
    with pytest.raises(DataError, match=r"data\.csv: unknown kind of data file"):
        data_files.data_files([write(tmp_path / "data.csv", "a,b")])
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="dir: a directory with no .txt or .jsonl file"):
        data_files.data_files([tmp_path / "dir"])


def test_every_file_is_checked_before_any_is_tokenised(tmp_path: Path) -> None:
    class Counting(CharTokenizer):
        calls = 0

        def encode_batch(self, texts: list[str], num_workers: int = 1) -> list[list[int]]:
            Counting.calls += 1
            return super().encode_batch(texts, num_workers)

    good = write(tmp_path / "a.txt", "一" * 10)
    bad = write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2"):
        load_dataset([good, bad], Counting(), seq_len=4)
    assert Counting.calls == 0


def test_prompt_tokens_carry_no_loss_and_documents_end_with_eos() -> None:
    parts = [Text("ab"), Text("xy", loss=False, document_ends=False), Text("c")]
    data = pack_texts(parts, CharTokenizer(), seq_len=8)
    a, b, c, x, y = (10 + ord(ch) for ch in "abcxy")
    assert data.input_ids.tolist() == [[a, b, 2, x, y, c, 2, 3]]
    assert data.labels.tolist() == [[a, b, 2, IGNORE_INDEX, IGNORE_INDEX, c, 2, IGNORE_INDEX]]
    assert data.num_tokens == 5
    assert data.loss_mask is not None and data.ids.dtype == torch.uint16


def test_packing_keeps_every_token_and_pads_the_last_block() -> None:
    data = pack_texts([Text("ab"), Text("cde")], CharTokenizer(), seq_len=3)
    a, b, c, d, e = (10 + ord(ch) for ch in "abcde")
    assert data.input_ids.tolist() == [[a, b, 2], [c, d, e], [2, 3, 3]]
    assert data.labels.tolist() == [[a, b, 2], [c, d, e], [2, IGNORE_INDEX, IGNORE_INDEX]]
    assert (data.num_tokens, data.length, data.seq_len, len(data)) == (7, 7, 3, 3)
    assert data.loss_mask is None  # text only: nothing but the padding lacks a loss
    assert data.nbytes == 9 * 2  # uint16 ids and nothing else
    ids, labels = data.rows(torch.tensor([2, 0]))
    assert ids.dtype == labels.dtype == torch.long
    assert labels.tolist() == [[2, IGNORE_INDEX, IGNORE_INDEX], [a, b, 2]]
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        pack_texts([Text("ab")], CharTokenizer(), seq_len=1)
    with pytest.raises(DataError, match="no tokens to train on"):
        pack_texts([], CharTokenizer(), seq_len=4)
    with pytest.raises(DataError, match="the tokenizer has no end-of-text token"):
        pack_texts([Text("a")], type("NoEos", (CharTokenizer,), {"eos_token_id": None})(), seq_len=4)


def test_a_document_split_into_parts_is_one_document() -> None:
    parts = [
        Text("ab", segment_ends=False, document_ends=False),
        Text("c", segment_ends=False, document_ends=False),
    ]
    data = pack_texts([*parts, Text("d"), Text("e")], CharTokenizer(), seq_len=16)
    assert data.input_ids[0, : data.length].tolist() == ids_of("abcd") + [2] + ids_of("e") + [2]


def test_ids_that_do_not_fit_uint16_are_kept_as_int32_with_a_reason() -> None:
    with pytest.warns(UserWarning, match="int32.*ids go up to 70000"):
        data = pack_texts(
            [Text("a")], type("Big", (CharTokenizer,), {"eos_token_id": 70000})(70000), seq_len=2
        )
    assert data.ids.dtype == torch.int32 and data.input_ids.tolist() == [[10 + ord("a"), 70000]]
    assert id_storage(object())[0] == "i" and "no get_vocab()" in id_storage(object())[1]
    assert id_storage(CharTokenizer(65535)) == ("H", "")

    class Liar(CharTokenizer):  # declares 1010 ids, gives one beyond uint16
        def encode_batch(self, texts: list[str], num_workers: int = 1) -> list[list[int]]:
            return [[70000] for _ in texts]

    with pytest.raises(DataError, match=r"x\.txt:3: the tokenizer gave id 70000, which a uint16 id array"):
        pack_texts([Text("a", source="x.txt:3")], Liar(), seq_len=2)


def test_the_old_constructor_still_takes_explicit_labels() -> None:
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    labels = torch.tensor([[1, IGNORE_INDEX, 3], [4, 5, 6]])
    data = PackedDataset(ids, labels)
    assert torch.equal(data.rows(torch.tensor([0]))[1], labels[:1]) and data.num_tokens == 5
    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\), input_ids \(2, 3\)"):
        PackedDataset(ids, labels[:1])
    with pytest.raises(ValueError, match="input_ids must be a 2-D integer tensor"):
        PackedDataset(ids.float())
    with pytest.raises(ValueError, match="length must be within 0..6"):
        PackedDataset(ids, length=7)


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
    assert data.ids.dtype == torch.uint16
    assert data.input_ids[0, :n].tolist() == prompt + text + [tok.eos_token_id]
    assert data.labels[0, :n].tolist() == [IGNORE_INDEX] * len(prompt) + text + [tok.eos_token_id]
