"""Training data tokenised in pieces: the ids are exactly those of each document encoded whole.

The cut rule is checked on the corpus, on random text built from what each encoder stage treats
specially (every cut the rule allows, with and without do_clean_text), and on cuts it must refuse.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from neoxja import GPTNeoXJapaneseTokenizer
from neoxja.tokenizer import clean
from neoxja.tuner import data, data_files
from neoxja.tuner.data_cuts import BOX_CHARS, CLEAN_CHARS, CutRule, cut_rule


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "do_clean_text"])
def tokenizer(request, assets_dir: Path) -> GPTNeoXJapaneseTokenizer:
    return GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir, do_clean_text=request.param)


# Characters and strings that some stage of the encoder treats specially (and some that it does not).
FRAGMENTS = (
    list("0123456789０１/-:.,()+@年月日時分円万千億ドルユーロ税込抜taxhpsf")
    + list(" \u3000—−\r\n\t<>|BLOCK┌─▀。、・ノヽ^_ーab吾輩猫平成㍻㈰")
    + [
        "https://",
        "http://a.jp/x?y=1",
        "ftp://",
        "foo.bar@example.com",
        "03-1234-5678",
        "(03)1234-5678",
        "2020年1月2日",
        "2020/12/31",
        "12:30",
        "(日)",
        "平成3年4月5日",
        "1,000円",
        "3万円",
        "千万ユーロ",
        "(税込)",
        "+tax",
        "<|endoftext|>",
        "<|startoftext|>",
        "<BLOCK>",
        "<SP>",
        "<BR>",
        "<URL>",
        "<|emoji1|>",
        "<|byte1|>",
        "\r\n",
        "  ",
        "<|",
        "|>",
        "endoftext",
        "\u200d",
        "\ufe0f",
        "👨\u200d👩\u200d👧",
        "(^^)",
        "m(_ _)m",
    ]
)


def test_every_allowed_cut_of_random_tricky_text_keeps_the_ids(tokenizer) -> None:
    rule = CutRule(tokenizer)
    rng = random.Random(20)
    keys = list(tokenizer.emoji["emoji"])
    cuts = 0
    for _ in range(500):
        pieces = [
            rng.choice(keys) if rng.random() < 0.2 else rng.choice(FRAGMENTS)
            for _ in range(rng.randint(1, 25))
        ]
        text = "".join(pieces)
        whole = tokenizer.encode(text)
        for p in range(1, len(text)):
            if rule.safe(text[p - 1], text[p]):
                cuts += 1
                assert tokenizer.encode(text[:p]) + tokenizer.encode(text[p:]) == whole, (text[:p], text[p:])
    assert cuts > 3000


@pytest.mark.parametrize(
    "left, right, needs_clean",
    [
        ("改行\r", "\n次", False),  # CRLF is one <BR>
        ("<|endof", "text|>", False),  # a special token
        ("A<S", "P>", False),  # a vocabulary word across the cut
        ("猫❤", "\ufe0fだ", False),  # an emoji with its variation selector
        ("目👁", "\u200d🗨\ufe0f", False),  # an emoji ZWJ sequence
        ("会議は2020年", "1月2日です", True),  # a date
        ("詳細はhttps://exam", "ple.com/a まで", True),  # a URL
        ("価格1,0", "00円", True),  # a price
        ("罫線┌", "─┐", True),  # box drawing runs merge into one <BLOCK>
        ("罫線<BLOCK>", "┐", True),  # ... with a literal <BLOCK> too
    ],
)
def test_cuts_that_change_the_ids_are_refused(tokenizer, left: str, right: str, needs_clean: bool) -> None:
    whole, apart = tokenizer.encode(left + right), tokenizer.encode(left) + tokenizer.encode(right)
    if needs_clean and not tokenizer.do_clean_text:
        assert whole == apart  # without do_clean_text this cut is harmless
        return
    assert whole != apart
    assert not CutRule(tokenizer).safe(left[-1], right[0])


@pytest.fixture(scope="module")
def odd_tokenizer(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> GPTNeoXJapaneseTokenizer:
    """A tokenizer whose tables hold what the real one lacks: a special token "<§§>" whose characters
    no word pairs, no "<BLOCK>" or "<BR>" word, and words running on from a tag or into one."""
    directory = tmp_path_factory.mktemp("odd-tokenizer")
    emoji = (assets_dir / "emoji.json").read_text(encoding="utf-8")
    tag = json.loads(emoji)["emoji"]["☺"]
    lines = (assets_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    lines = [{"<BLOCK>": "<XBLOCKX>", "<BR>": "<XBRX>"}.get(line, line) for line in lines]
    # "吾<" takes the id of 鰻 (smaller than 吾's, so it wins where it fits); "<" words win by length.
    lines = ["吾<" if line.startswith("鰻,") else line for line in lines] + ["<URL>吾", f"{tag}吾"]
    (directory / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "emoji.json").write_text(emoji, encoding="utf-8")
    return GPTNeoXJapaneseTokenizer(
        directory / "vocab.txt", directory / "emoji.json", bos_token="<§§>", do_clean_text=True
    )


@pytest.mark.parametrize(
    "left, right",
    [
        ("猫<§", "§>犬"),  # a special token no vocabulary word spells
        ("罫線┌<", "BLOCK>だ"),  # a literal <BLOCK> across the cut, merged with the box character
        ("見てhttp://a.jp/c", "吾輩"),  # the left piece ends with the tag <URL>, and "<URL>吾" is a word
        ("吾", "http://a.jp"),  # the right piece starts with <URL>, and "吾<" is a word
        ("猫☺", "吾"),  # the emoji becomes a tag, and the tag followed by 吾 is a word
    ],
)
def test_cuts_the_real_vocabulary_happens_to_protect_are_refused_anyway(
    odd_tokenizer: GPTNeoXJapaneseTokenizer, left: str, right: str
) -> None:
    tok = odd_tokenizer
    assert tok.encode(left + right) != tok.encode(left) + tok.encode(right)
    assert not CutRule(tok).safe(left[-1], right[0])


def test_every_allowed_cut_keeps_the_ids_with_odd_tables(odd_tokenizer: GPTNeoXJapaneseTokenizer) -> None:
    rule, rng = CutRule(odd_tokenizer), random.Random(7)
    fragments = [*FRAGMENTS, "§", "<§", "§>", "<§§>", "吾", "☺", "http://a.jp"]
    for _ in range(300):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 20)))
        whole = odd_tokenizer.encode(text)
        for p in range(1, len(text)):
            if rule.safe(text[p - 1], text[p]):
                assert odd_tokenizer.encode(text[:p]) + odd_tokenizer.encode(text[p:]) == whole, (
                    text[:p],
                    text[p:],
                )


def test_clean_chars_cover_every_character_the_clean_patterns_name() -> None:
    # Guards the rule against a do_clean_text pattern gaining a character CLEAN_CHARS lacks.
    patterns = [v.pattern for v in vars(clean).values() if isinstance(v, re.Pattern)]
    literals = "".join(patterns) + "".join(v for v in vars(clean).values() if isinstance(v, str))
    for ch in set(literals):
        if ch in "<>" or ch.isspace() or not ch.isprintable():
            continue
        assert ch in CLEAN_CHARS or ch.isdecimal() or ch in BOX_CHARS, repr(ch)


def test_only_the_gpt_neox_japanese_tokenizer_is_cut() -> None:
    assert cut_rule(object()) is None


# Documents tokenised in pieces by load_dataset.


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))}


def recording(tokenizer: GPTNeoXJapaneseTokenizer, seen: list[int]) -> GPTNeoXJapaneseTokenizer:
    """``tokenizer`` noting the length of every text it is given to encode."""
    encode_batch = tokenizer.encode_batch

    def noted(texts: list[str], num_workers: int = 1) -> list[list[int]]:
        seen.extend(map(len, texts))
        return encode_batch(texts, num_workers)

    tokenizer.encode_batch = noted
    return tokenizer


def test_streamed_corpus_ids_equal_whole_documents(
    tmp_path: Path, assets_dir: Path, corpus, monkeypatch
) -> None:
    # Each corpus file as one single-line document (the case that used to be held whole), read
    # 4 KiB at a time and encoded in pieces of about 2,000 characters.
    monkeypatch.setattr(data, "PIECE_CHARS", 2000)
    monkeypatch.setattr(data_files, "READ_BYTES", 4096)
    for clean_text in (False, True):
        seen: list[int] = []
        tok = recording(GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir, do_clean_text=clean_text), seen)
        expected, paths = [], []
        for name, text in corpus.items():
            document = text.replace("\n", "")
            paths.append(tmp_path / name)
            paths[-1].write_text(document, encoding="utf-8")
            expected += tok.encode(document) + [tok.eos_token_id]
        packed = data.load_dataset(paths, tok, seq_len=512)
        assert packed.input_ids.view(-1)[: packed.length].tolist() == expected
        assert len(seen) > 400 and max(seen) < 2000 + 50  # many pieces, none much over PIECE_CHARS


def test_line_documents_with_worker_processes(tmp_path: Path, assets_dir: Path, corpus) -> None:
    # Lines as documents, CRLF line ends, two processes (batches large enough to fork).
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)
    path = tmp_path / "lines.txt"
    path.write_bytes("".join(corpus.values()).replace("\n", "\r\n").encode())
    expected = []
    for line in "".join(corpus.values()).split("\n"):
        if line.strip():
            expected += tok.encode(line) + [tok.eos_token_id]
    one = data.load_dataset([path], tok, seq_len=256, per_line=True)
    two = data.load_dataset([path], tok, seq_len=256, per_line=True, num_workers=2)
    assert one.input_ids.view(-1)[: one.length].tolist() == expected
    assert (two.ids == one.ids).all() and two.length == one.length


def test_text_without_a_safe_cut_is_encoded_whole(tmp_path: Path, assets_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "PIECE_CHARS", 100)
    seen: list[int] = []
    tok = recording(GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir), seen)
    document = "1" * 5000 + "。吾輩は猫である。" * 100
    assert not CutRule(tok).safe("1", "1")
    path = tmp_path / "digits.txt"
    path.write_text(document, encoding="utf-8")
    packed = data.load_dataset([path], tok, seq_len=64)
    assert packed.input_ids.view(-1)[: packed.length].tolist() == tok.encode(document) + [tok.eos_token_id]
    assert seen[0] >= 5000 and len(seen) > 2  # the digits in one piece, the prose cut after them
