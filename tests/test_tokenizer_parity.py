"""Zero mismatches against transformers' tokenizer: every corpus line and file, the do_clean_text
patterns (adversarial inputs included), and a hypothesis fuzz of mixed Japanese text -- for both
segmentation paths, the compiled one (neoxja._segment) and the pure-Python one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoxja.tokenizer import GPTNeoXJapaneseTokenizer, normalize
from neoxja.tokenizer import segment as segment_module

# The fuzz alphabets sample the real files at import time (the fixtures skip or fail without them).
ASSETS = Path(
    os.environ.get(
        "NEOXJA_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets" / "abeja-tokenizer"
    )
)


def neoxja_paths(*files: str, **kwargs) -> dict[str, GPTNeoXJapaneseTokenizer]:
    """neoxja tokenizers on each segmentation path: "python" always, "compiled" when it is built."""
    paths = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NEOXJA_PURE_PYTHON", "1")
        paths["python"] = GPTNeoXJapaneseTokenizer(*files, **kwargs)
        assert paths["python"]._segmenter is None
        if segment_module._compiled is not None:
            env.delenv("NEOXJA_PURE_PYTHON")
            paths["compiled"] = GPTNeoXJapaneseTokenizer(*files, **kwargs)
            assert paths["compiled"]._segmenter is not None
    return paths


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "clean"])
def pair(request, assets_dir: Path):
    """(neoxja tokenizers by path, transformers' tokenizer), all with the same do_clean_text."""
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    files = (str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))
    return neoxja_paths(*files, do_clean_text=request.param), Reference(*files, do_clean_text=request.param)


def test_the_compiled_path_is_built() -> None:
    """The C extension is optional for users, but CI must build and test it."""
    if segment_module._compiled is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("neoxja._segment was not compiled (required in CI)")
        pytest.skip("neoxja._segment is not compiled: only the pure-Python path is tested")


def test_corpus_lines_and_files(pair, corpus_dir: Path) -> None:
    paths, ref = pair
    files = sorted(p for p in corpus_dir.glob("*.txt"))
    assert len(files) >= 2
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        expected, expected_doc = [ref.encode(line) for line in lines], ref.encode(text)
        for name, ours in paths.items():
            mismatched = [line for line, ids in zip(lines, expected, strict=True) if ours.encode(line) != ids]
            where = f"{name} path, {path.name}"
            assert mismatched == [], f"{where}: {len(mismatched)} lines differ, first {mismatched[0]!r}"
            assert ours.encode(text) == expected_doc, where


CLEAN_CASES = [
    "詳細は https://example.com/a?b=1&c=2#x と ftp://f.jp/ へ",
    "連絡: taro.yamada+x@mail.example.co.jp, a@b, @c, x.@y.z..w, 1.+a@b.c.1x@y",
    "電話 03-1234-5678 (03)1234-5678 090(1234)5678 0312345678",
    "2020年1月2日(月)10時30分 1999/12/31 12-31 2000/2000/13/1 1/2000/3/ 3月 令和2年5月1日㈰",
    "1,000円 3万円 10千万ドル 5億3000万1200円(税込) 2ユーロ+tax 円 1,0001,000万円 1万1億円 ,000円",
    "─━│┃▀▁▂ <BLOCK><BLOCK> a─<BLOCK>─b",
    "2000/" * 30 + "13/1",
    "1,0001,000" * 30 + "万円",
    "1234567890" * 40,
    "a.b+c_" * 40 + "@x.y",
    "<" * 80 + ">" * 20,
    "1万" * 40 + "1億円",
]


@pytest.mark.parametrize("text", CLEAN_CASES)
def test_clean_text_patterns_and_adversarial_inputs(pair, text: str) -> None:
    paths, ref = pair
    expected = ref.encode(text)
    for ours in paths.values():
        assert ours.tokenize(text) == ref.tokenize(text)
        assert ours.encode(text) == expected
        assert ours.decode(ours.encode(text)) == normalize(text, ours)


# ---------------------------------------------------------------------- fuzz


def _vocab_words() -> list[str]:
    """Multi-character words and spelling variants from the real vocabulary (empty if absent)."""
    path = ASSETS / "vocab.txt"
    if not path.is_file():
        return ["日本"]
    lines = path.read_text(encoding="utf-8").split("\n")
    return [w for line in lines[::37] for w in line.split(",") if w and not w.startswith("<")][:3000]


def _emoji_keys() -> list[str]:
    path = ASSETS / "emoji.json"
    if not path.is_file():
        return ["😀"]
    return list(json.loads(path.read_text(encoding="utf-8"))["emoji"])[::3]


def chars(*ranges: tuple[int, int]) -> st.SearchStrategy[str]:
    return st.one_of(*(st.integers(lo, hi).map(chr) for lo, hi in ranges))


def runs(alphabet: st.SearchStrategy[str], max_size: int = 6) -> st.SearchStrategy[str]:
    return st.lists(alphabet, min_size=1, max_size=max_size).map("".join)


FRAGMENTS = st.one_of(
    runs(chars((0x3041, 0x309F))),  # hiragana and kana marks
    runs(chars((0x30A0, 0x30FF))),  # katakana
    runs(chars((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF))),  # kanji, ext A and B
    st.sampled_from(_vocab_words()),  # words and spelling variants
    runs(chars((0xFF61, 0xFF9F), (0xFF01, 0xFF5E))),  # half-width kana, full-width ASCII
    st.sampled_from(_emoji_keys()),
    runs(chars((0x1F300, 0x1FAFF), (0x1F3FB, 0x1F3FF), (0x1F1E6, 0x1F1FF), (0x2600, 0x27BF)), 4),
    st.sampled_from(["\u200d", "\ufe0f", "\u20e3", "\U000e0067"]),  # ZWJ, VS16, keycap, tag
    runs(chars((0x2500, 0x259F))),  # box drawing, blocks
    runs(chars((0x2000, 0x2BFF), (0xA1, 0x2FF), (0x300, 0x36F))),  # symbols, Latin-1, IPA, combining
    runs(chars((0x00, 0x1F), (0x7F, 0x9F))),  # control characters
    st.sampled_from(
        [" ", "\t", "\n", "\r", "\r\n", "\u3000", "\xa0", "\u2028", "\u2029", "\x0b", "\x85", "—", "−"]
    ),
    runs(chars((0x20, 0x7E)), 8),  # ASCII
    st.text("0123456789", min_size=1, max_size=8),
    st.sampled_from(
        ["http://", "https://", "ftp://", "www.", ".com", "@", ".", "-", "/", "(", ")", ",", ":", "+tax"]
        + ["年", "月", "日", "時", "分", "(月)", "㈰", "明治", "令和", "㍻", "円", "万", "千", "億", "ドル"]
        + ["ユーロ", "(税込)", "(税抜)", "千円", "万円"]
    ),
    st.sampled_from(
        ["<", ">", "<|", "|>", "<SP>", "<BR", "<|endoftext|>", "<|startoftext|>", "<|endoftext"]
        + ["|endoftext|>", "<|byte12|>", "<|byte227|>", "<|emoji1|>", "<BLOCK>", "<URL>", "<KIGOU>"]
    ),
)
MIXED_TEXT = st.lists(FRAGMENTS, max_size=24).map("".join)


@settings(max_examples=250, deadline=None)
@given(text=MIXED_TEXT)
def test_fuzz_matches_reference(pair, text: str) -> None:
    paths, ref = pair
    expected = ref.encode(text)
    assert paths["python"].tokenize(text) == ref.tokenize(text)
    for ours in paths.values():
        assert ours.encode(text) == expected


@settings(max_examples=250, deadline=None)
@given(text=st.one_of(MIXED_TEXT, st.text(max_size=40)))
def test_fuzz_decode_of_encode_is_normalize(pair, text: str) -> None:
    paths, _ = pair
    ours = paths.get("compiled", paths["python"])
    ids = ours.encode(text)
    assert ours.decode(ids) == normalize(text, ours)
    spans = ours(text, return_offsets_mapping=True)["offset_mapping"]
    assert len(spans) == len(ids)
    assert "".join(text[s:e] for s, e in spans) == text


# ---------------------------------------------------------------------- step 3 alone, C against Python

SEGMENT_TEXT = st.one_of(
    st.lists(
        st.one_of(
            FRAGMENTS,
            st.text(max_size=8),  # any code point but surrogates: NUL, astral, unassigned, ...
            runs(chars((0xD800, 0xDFFF)), 2),  # lone surrogates
            st.sampled_from(["<SP>", "<BR>", "<TAB>", "<|emoji1|>", "<|byte255|>", "<|startoftext|>"]),
            st.sampled_from(["<U2000U", "<|byte", "<|emoji", "<"]),  # tag prefixes cut short
        ),
        max_size=30,
    ).map("".join),
    # Latin-1 only: Python stores these strings one byte per character
    st.lists(st.one_of(chars((0x00, 0xFF)), st.sampled_from(["<SP>", "<BR>"])), max_size=40).map("".join),
)


@pytest.fixture(scope="module")
def segmenters(assets_dir: Path) -> dict[str, GPTNeoXJapaneseTokenizer]:
    paths = neoxja_paths(str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))
    if "compiled" not in paths:
        pytest.skip("neoxja._segment is not compiled")
    return paths


@settings(max_examples=300, deadline=None)
@given(text=SEGMENT_TEXT)
def test_fuzz_compiled_segmentation_equals_python(segmenters, text: str) -> None:
    """The C segmenter gives the pure-Python segmenter's ids on any (rewritten or raw) text,
    tags cut anywhere included."""
    assert segmenters["compiled"]._segmenter.segment(text) == segmenters["python"]._python.segment(text)
