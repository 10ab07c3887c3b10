"""Emoji replacement: one pass over the text, with exactly the reference's result.

transformers replaces the keys of emoji.json one after another in file order (``str.replace``),
so a key replaced earlier can break up a longer key's occurrence. The fuzz compares ids with
transformers on emoji-dense text; the long test compares with that sequential replacement."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer_parity import neoxja_paths

from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

ASSETS = Path(
    os.environ.get(
        "NEOXJA_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets" / "abeja-tokenizer"
    )
)


def _emoji_table() -> dict[str, str]:
    path = ASSETS / "emoji.json"
    if not path.is_file():
        return {"😀": "<|emoji1|>"}
    return json.loads(path.read_text(encoding="utf-8"))["emoji"]


KEYS = list(_emoji_table())
# Skin tones, ZWJ, variation selectors, keycap, regional indicators, tag characters, hair styles.
MODIFIERS = (
    [chr(c) for c in range(0x1F3FB, 0x1F400)]
    + ["\u200d", "\ufe0e", "\ufe0f", "\u20e3", "\U0001f1ef", "\U0001f1f5", "\U000e0067", "\U000e007f"]
    + ["\U0001f9b0", "\u2640", "\u2642", "\u2695"]
)
PLAIN = list("吾輩は猫である。名前はまだ無い。カタカナ漢字abcXYZ0123456789#*<|>") + ["<|emoji1|>", " ", "\n"]


def _sequential(text: str, table: dict[str, str]) -> str:
    """The reference's emoji step, written out: every key in file order, str.replace."""
    for key, tag in table.items():
        if key in text:
            text = text.replace(key, tag)
    return text


def _fragment(rng: random.Random) -> str:
    """A random piece of emoji-dense text: a key, a key cut short at either end, a modifier or
    plain Japanese/ASCII."""
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(KEYS)
    if roll < 0.6:
        key = rng.choice(KEYS)
        return key[: rng.randint(1, len(key))]
    if roll < 0.7:
        key = rng.choice(KEYS)
        return key[rng.randint(0, len(key) - 1) :]
    if roll < 0.85:
        return rng.choice(MODIFIERS)
    return rng.choice(PLAIN)


FRAGMENT = st.one_of(
    st.sampled_from(KEYS),
    st.tuples(st.sampled_from(KEYS), st.integers(1, 10)).map(lambda kn: kn[0][: kn[1]]),
    st.tuples(st.sampled_from(KEYS), st.integers(1, 9)).map(lambda kn: kn[0][kn[1] :] or kn[0]),
    st.sampled_from(MODIFIERS),
    st.sampled_from(PLAIN),
)
EMOJI_TEXT = st.lists(FRAGMENT, min_size=1, max_size=30).map("".join)


@pytest.fixture(scope="module")
def tokenizers(assets_dir: Path):
    """(neoxja tokenizers on both segmentation paths, transformers' tokenizer)."""
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    files = (str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))
    return neoxja_paths(*files), Reference(*files)


def test_an_earlier_shorter_key_breaks_up_a_longer_one(tokenizers) -> None:
    """👍 comes before 👍🏻 in emoji.json, so the reference never sees 👍🏻 whole."""
    paths, ref = tokenizers
    for text in ("👍🏻", "👍🏻👍🏻👍", "👨‍👩‍👧‍👦", "🇯🇵🇯🇵🇯", "1️⃣#️⃣*⃣", "👍🏻‍♂️🏻🏻"):
        for ours in paths.values():
            assert ours.encode(text) == ref.encode(text), text
            assert ours.tokenize(text) == ref.tokenize(text), text


@settings(max_examples=400, deadline=None)
@given(text=EMOJI_TEXT)
def test_fuzz_emoji_dense_text_matches_reference(tokenizers, text: str) -> None:
    paths, ref = tokenizers
    expected = ref.encode(text)
    for ours in paths.values():
        assert ours.encode(text) == expected
    ours = paths["python"]
    assert ours.tokenize(text) == ref.tokenize(text)
    assert ours.encode_with_offsets(text)[0] == expected


def test_a_million_characters_equal_the_sequential_replacement(assets_dir: Path) -> None:
    """1M characters of emoji-dense text in one call. The expected result comes from the
    sequential replacement run on each of 200 distinct samples: the long text joins those
    samples with "。", which no key contains, so no occurrence crosses a join."""
    tok = GPTNeoXJapaneseTokenizer(assets_dir / "vocab.txt", assets_dir / "emoji.json")
    table = tok.emoji["emoji"]
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        size = rng.randint(200, 800)
        pieces: list[str] = []
        while sum(map(len, pieces)) < size:
            pieces.append(_fragment(rng))
        samples.append("".join(pieces))
    expected_samples = [_sequential(s, table) for s in samples]
    order = []
    total = 0
    while total < 1_000_000:
        k = rng.randrange(len(samples))
        order.append(k)
        total += len(samples[k]) + 1
    text = "。".join(samples[k] for k in order)
    assert len(text) >= 1_000_000
    assert tok._emoji.replace(text) == "。".join(expected_samples[k] for k in order)


def test_keys_that_can_overlap_a_tag_are_replaced_one_after_another(assets_dir: Path, tmp_path: Path) -> None:
    """A key that can match across an inserted tag (">😃" after "<|emoji1|>") breaks the one-pass
    reasoning; such a table is replaced key after key, as the reference does."""
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    table = {"😀": "<|emoji1|>", ">😃": "<|emoji2|>", "😃": "<|emoji2|>"}
    inverse = {"<|emoji1|>": "😀", "<|emoji2|>": "😃"}
    (tmp_path / "emoji.json").write_text(json.dumps({"emoji": table, "emoji_inv": inverse}), encoding="utf-8")
    files = (str(assets_dir / "vocab.txt"), str(tmp_path / "emoji.json"))
    ours, ref = GPTNeoXJapaneseTokenizer(*files), Reference(*files)
    text = "😀😃 >😃 😃"
    expected = "<|emoji1|<|emoji2|> <|emoji2|> <|emoji2|>"
    assert ours._emoji.replace(text) == _sequential(text, table) == expected
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode_with_offsets(text)[0] == ref.encode(text)
