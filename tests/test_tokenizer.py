"""GPTNeoXJapaneseTokenizer against transformers' tokenizer (the oracle) on the real vocabulary:
API parity, lossless decoding, streaming, batches, offsets, loading/saving, errors and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hub import make_hub_cache

from neoxja.cli import main
from neoxja.tokenizer import GPTNeoXJapaneseTokenizer, normalize
from neoxja.tokenizer_utils import StreamingDetokenizer

SEED_TEXT = "吾輩は猫である🐯。実は慶応(慶應)大学出身"
SEED_IDS = [
    30014,
    26883,
    26638,
    27228,
    25,
    26650,
    31732,
    31679,
    27809,
    26638,
    17749,
    31592,
    17749,
    31593,
    321,
    1281,
]
SAMPLES = [
    SEED_TEXT,
    "人とAIが協調するためには、",
    "  前後に空白 ",
    "a<|endoftext|>b <|startoftext|>c<|endoftext|>",
    "ŧ 👍🏻 🏴‍☠️ 👨‍👩‍👧 🇯🇵 ©️ 1⃣ (^_^) ヽ(*´Д｀*)ﾉ",
    "改行\r\n\r\tタブ\u3000全角—−",
    "<SP><BR><|emoji3|><|byte227|><|byte129|><|byte130|><U2000U2BFF><<<>>",
    "─━│▀▁ ǀ‖ ¡¿ ˈ ̀ e\u0301 \u2028\x00\x1f\x7f",
    "𠮷野家の𩸽 ｶﾀｶﾅ ＡＢＣ１２３",
]


@pytest.fixture(scope="module")
def ref(assets_dir: Path):
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    return Reference(str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))


@pytest.fixture(scope="module")
def tok(assets_dir: Path) -> GPTNeoXJapaneseTokenizer:
    return GPTNeoXJapaneseTokenizer(assets_dir / "vocab.txt", assets_dir / "emoji.json")


def test_seed_example(tok: GPTNeoXJapaneseTokenizer) -> None:
    assert tok(SEED_TEXT)["input_ids"] == SEED_IDS
    assert tok.decode(tok(SEED_TEXT)["input_ids"]) == "吾輩は猫である🐯。実は慶応(慶応)大学出身"


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenize_encode_call_match_reference(tok, ref, text: str) -> None:
    assert tok.tokenize(text) == ref.tokenize(text)
    assert tok.encode(text) == ref.encode(text)
    assert dict(tok(text)) == dict(ref(text))
    ids = ref.encode(text)
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    tokens = ref.tokenize(text)
    assert tok.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    pieces = ref.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_string(pieces) == ref.convert_tokens_to_string(pieces)


def test_special_tokens_in_text_are_single_ids(tok, ref) -> None:
    ids = tok.encode("猫<|endoftext|>犬")
    assert ids == ref.encode("猫<|endoftext|>犬")
    assert ids.count(tok.eos_token_id) == 1 and tok.eos_token_id == 31999


def test_vocabulary_and_special_attributes_match_reference(tok, ref) -> None:
    assert tok.vocab_size == ref.vocab_size
    assert len(tok) == len(ref)
    assert tok.get_vocab() == ref.get_vocab()
    for name in ("unk", "pad", "bos", "eos"):
        assert getattr(tok, f"{name}_token") == str(getattr(ref, f"{name}_token"))
        assert getattr(tok, f"{name}_token_id") == getattr(ref, f"{name}_token_id")
    assert tok.all_special_ids == ref.all_special_ids
    assert tok.model_max_length == ref.model_max_length
    assert tok.padding_side == ref.padding_side == "right"
    assert tok.convert_tokens_to_ids("no such token") == ref.convert_tokens_to_ids("no such token")


# ---------------------------------------------------------------------- decoding


def test_decode_keeps_characters_and_spaces_where_the_reference_loses_them(tok, ref) -> None:
    for text in ("ŧ", "👍🏻", "  間 の 空白  ", "𠮷野家"):
        ids = tok.encode(text)
        assert tok.decode(ids) == normalize(text, tok)
        assert "\ufffd" not in tok.decode(ids)
    assert "\ufffd" in ref.decode(tok.encode("ŧ"))  # the reference's flaw this fixes
    assert tok.decode(tok.encode("  a b  ")) == "  a b  " and ref.decode(ref.encode("  a b  ")) == "a b"


def test_decode_matches_reference_where_the_reference_is_lossless(tok, ref) -> None:
    text = "吾輩は猫である。名前はまだ無い。<|endoftext|>慶應"
    ids = tok.encode(text)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_of_encode_is_normalize(tok, text: str) -> None:
    assert tok.decode(tok.encode(text)) == normalize(text, tok) == tok.normalize(text)


def test_normalize_applies_the_documented_mappings(tok) -> None:
    assert normalize("慶應", tok) == "慶応"
    assert normalize("a—b−c", tok) == "aーbーc"
    assert normalize("x\r\ny\rz\u3000w", tok) == "x\ny\nz w"
    assert normalize("🐱", tok) == tok.emoji["emoji_inv"][tok.emoji["emoji"]["🐱"]]
    assert normalize("<SP>", tok) == " "
    assert normalize("\ud800", tok) == "\ufffd"


def test_decode_skip_special_batch_and_errors(tok) -> None:
    ids = tok.encode("猫<|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "猫"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    batch = [tok.encode("吾輩"), tok.encode("猫である")]
    assert tok.batch_decode(batch) == ["吾輩", "猫である"]
    assert tok.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["猫", "猫"]
    with pytest.raises(ValueError, match="40000"):
        tok.decode([1, 40000])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_clean_up_tokenization_spaces_matches_reference(tok, ref) -> None:
    ids = tok.encode("I ' m here , is n't it ? yes . don 't 're")
    for flag in (True, False):
        assert tok.decode(ids, clean_up_tokenization_spaces=flag) == ref.decode(
            ids, clean_up_tokenization_spaces=flag
        )
    assert tok.batch_decode([ids], clean_up_tokenization_spaces=True) == [
        tok.decode(ids, clean_up_tokenization_spaces=True)
    ]


def test_streaming_detokenizer_aliases_for_streamers(tok) -> None:
    ids = tok.encode("ŧ猫👍🏻")
    detok = StreamingDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) + detok.finish() == tok.decode(ids)


def test_streaming_detokenizer_never_emits_partial_characters(tok) -> None:
    text = "ŧ吾輩👍🏻は 猫𠮷<|endoftext|>である\x00🇯🇵"
    ids = tok.encode(text)
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    assert "".join(pieces) == detok.text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    # An unfinished character is held back, then flushed as U+FFFD only at the end.
    partial = tok.encode("ŧ")[:1]
    detok.reset()
    assert detok.add_tokens(tok.encode("猫") + partial) == "猫"
    assert detok.finalize() == "\ufffd" == tok.decode(partial)
    skipper = StreamingDetokenizer(tok, skip_special_tokens=True)
    assert skipper.add_tokens(ids) + skipper.finalize() == tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- batches and offsets

BATCH = ["吾輩は猫である。", "名前は", "まだ無い。どこで生れたかとんと見当がつかぬ。"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": True},
        {"padding": "longest", "padding_side": "left"},
        {"padding": "max_length", "max_length": 12, "truncation": True},
        {"truncation": True, "max_length": 3},
        {"max_length": 3},
        {"padding": True, "return_tensors": "pt"},
        {"padding": True, "pad_to_multiple_of": 8},
    ],
)
def test_batch_padding_and_truncation_match_reference(tok, ref, kwargs: dict) -> None:
    ours, theirs = tok(BATCH, **kwargs), ref(BATCH, **kwargs)
    assert set(ours) == set(theirs)
    for key in ours:
        value = ours[key]
        if kwargs.get("return_tensors") == "pt":
            assert isinstance(value, torch.Tensor)
            assert value.tolist() == theirs[key].tolist()
        else:
            assert value == theirs[key]


def test_single_text_tensors_and_encode_tensors(tok, ref) -> None:
    assert (
        tok(SEED_TEXT, return_tensors="pt")["input_ids"].tolist()
        == ref(SEED_TEXT, return_tensors="pt")["input_ids"].tolist()
    )
    assert tok.encode(SEED_TEXT, return_tensors="pt").tolist() == [SEED_IDS]
    with pytest.raises(ValueError, match="padding"):
        tok(BATCH, return_tensors="pt")


def test_padding_side_attribute_is_used(assets_dir: Path) -> None:
    left = GPTNeoXJapaneseTokenizer(assets_dir / "vocab.txt", assets_dir / "emoji.json", padding_side="left")
    out = left(["吾輩", "吾輩は猫"], padding=True)
    assert out["attention_mask"][0][0] == 0 and out["input_ids"][0][0] == left.pad_token_id


def test_special_tokens_can_be_none(assets_dir: Path, tmp_path: Path) -> None:
    tok = GPTNeoXJapaneseTokenizer(assets_dir / "vocab.txt", assets_dir / "emoji.json", pad_token=None)
    assert tok.pad_token_id is None and tok.eos_token_id == 31999
    with pytest.raises(ValueError, match="pad token"):
        tok(["猫", "吾輩は猫"], padding=True)
    tok.save_pretrained(tmp_path)
    assert GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path).pad_token is None


def test_pickled_tokenizer_encodes_and_decodes_the_same(tok) -> None:
    """Pickling keeps the vocabulary and settings and builds the tables again (the C segmenter
    does not pickle)."""
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    text = "吾輩は猫である👍🏻 <|endoftext|>𠮷\n"
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(clone.encode(text)) == tok.decode(tok.encode(text))
    assert (clone._segmenter is None) == (tok._segmenter is None)


def test_encode_batch_with_workers_matches_single_process(tok, corpus_dir: Path, monkeypatch) -> None:
    from neoxja.tokenizer import batch

    monkeypatch.setattr(batch, "_FORK_MIN_CHARS", 0)  # fork even for this small batch
    lines = (corpus_dir / "gsd-test.txt").read_text(encoding="utf-8").split("\n")[:400]
    expected = [tok.encode(t) for t in lines]
    for workers in (2, 3):
        assert tok.encode_batch(lines, num_workers=workers) == expected
    assert tok(lines[:50], num_workers=2)["input_ids"] == expected[:50]
    assert tok.encode_batch(["", lines[0], ""], num_workers=3) == [[], expected[0], []]


@pytest.mark.parametrize("lengths", [[5, 5, 5, 5], [100, 1, 1, 1], [1, 1, 1, 100], [3], [0, 7, 0]])
@pytest.mark.parametrize("weights", [[1.0], [0.8, 1.0], [1.0, 1.0, 1.0]])
def test_batch_cuts_cover_the_batch_in_order(lengths: list[int], weights: list[float]) -> None:
    from neoxja.tokenizer.batch import _balanced_cuts

    texts = ["x" * n for n in lengths]
    cuts = _balanced_cuts(texts, weights, max(sum(lengths), 1))
    assert len(cuts) == len(weights) + 1 and cuts[0] == 0 and cuts[-1] == len(texts)
    assert cuts == sorted(cuts)


def test_batch_cuts_follow_the_weights() -> None:
    from neoxja.tokenizer.batch import _balanced_cuts

    texts = ["x" * 10] * 90
    assert _balanced_cuts(texts, [1.0, 1.0, 1.0], 900) == [0, 30, 60, 90]
    assert _balanced_cuts(texts, [0.8, 1.0], 900) == [0, 40, 90]


@pytest.mark.parametrize("text", SAMPLES + ["https://example.com/a 2020/1/2 3,000円 ─━│ a@b.jp"])
@pytest.mark.parametrize("clean", [False, True])
def test_offsets_tile_the_text_and_reencode(assets_dir: Path, text: str, clean: bool) -> None:
    tok = GPTNeoXJapaneseTokenizer(assets_dir / "vocab.txt", assets_dir / "emoji.json", do_clean_text=clean)
    out = tok(text, return_offsets_mapping=True)
    ids, spans = out["input_ids"], out["offset_mapping"]
    assert ids == tok.encode(text) and len(spans) == len(ids)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end == start  # contiguous, in order: the spans tile the text
    for token_id, (start, end) in zip(ids, spans, strict=True):
        piece = text[start:end]
        if start < end and normalize(piece, tok) == piece and len(tok.encode(piece)) == 1:
            assert tok.encode(piece) == [token_id]


# ---------------------------------------------------------------------- loading and saving


def test_save_pretrained_loads_in_transformers_and_neoxja(tok, ref, tmp_path: Path) -> None:
    from transformers import GPTNeoXJapaneseTokenizer as Reference

    written = tok.save_pretrained(tmp_path)
    assert sorted(Path(p).name for p in written) == [
        "emoji.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    theirs = Reference.from_pretrained(str(tmp_path))
    ours = GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert theirs.encode(text) == ref.encode(text) == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_token_id and theirs.bos_token_id == ours.bos_token_id


def test_from_pretrained_reads_the_reference_config(ref, tmp_path: Path) -> None:
    ref_dir = tmp_path / "ref"
    ref.save_pretrained(str(ref_dir))
    ours = GPTNeoXJapaneseTokenizer.from_pretrained(ref_dir, padding_side="left")
    assert ours.encode(SEED_TEXT) == SEED_IDS
    assert ours.model_max_length == ref.model_max_length and ours.padding_side == "left"
    cleaning = GPTNeoXJapaneseTokenizer.from_pretrained(ref_dir, do_clean_text=True)
    assert cleaning.do_clean_text and cleaning.encode("https://a.jp") == [cleaning.vocab["<URL>"]]


def test_from_pretrained_offline_hub_cache(assets_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    files = {name: (assets_dir / name).read_text(encoding="utf-8") for name in ("vocab.txt", "emoji.json")}
    make_hub_cache(cache, "someone/ja-model", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    tok = GPTNeoXJapaneseTokenizer.from_pretrained("someone/ja-model")
    assert tok.encode(SEED_TEXT) == SEED_IDS
    with pytest.raises(OSError):
        GPTNeoXJapaneseTokenizer.from_pretrained("someone/not-cached")
    with pytest.raises(OSError, match="emoji.json"):
        make_hub_cache(cache, "someone/no-emoji", {"vocab.txt": files["vocab.txt"]})
        GPTNeoXJapaneseTokenizer.from_pretrained("someone/no-emoji")


# ---------------------------------------------------------------------- bad input


def test_non_string_input_is_a_type_error_naming_the_type(tok) -> None:
    with pytest.raises(TypeError, match="int"):
        tok.encode(123)
    with pytest.raises(TypeError, match="bytes"):
        tok(b"abc")
    with pytest.raises(TypeError, match=r"texts\[1\].*NoneType"):
        tok(["ok", None])
    with pytest.raises(TypeError, match="list"):
        tok.tokenize(["a"])


def test_any_unicode_string_encodes_and_round_trips(tok) -> None:
    text = "a\ud800b\udfff" + "".join(chr(c) for c in range(0, 0x3000, 7))
    assert tok.decode(tok.encode(text)) == normalize(text, tok)


def copy_assets(assets_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("vocab.txt", "emoji.json"):
        shutil.copy(assets_dir / name, dst / name)
    return dst


@pytest.mark.parametrize("bad_line", ["", "a,,b", "a,", ",b"])
def test_malformed_vocab_line_is_named(assets_dir: Path, tmp_path: Path, bad_line: str) -> None:
    d = copy_assets(assets_dir, tmp_path / "t")
    lines = (d / "vocab.txt").read_text(encoding="utf-8").split("\n")
    lines[5] = bad_line
    (d / "vocab.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt: line 6 "):
        GPTNeoXJapaneseTokenizer(d / "vocab.txt", d / "emoji.json")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[1, 2]", "JSON object"),
        ('{"emoji": {}}', "emoji_inv"),
        ('{"emoji": {"x": 3}, "emoji_inv": {}}', "'x'"),
        ('{"emoji": {"x": "<|emoji99|>"}, "emoji_inv": {}}', "<|emoji99|>"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_emoji_json_is_named(assets_dir: Path, tmp_path: Path, content: str, needle: str) -> None:
    d = copy_assets(assets_dir, tmp_path / "t")
    (d / "emoji.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="emoji.json") as err:
        GPTNeoXJapaneseTokenizer(d / "vocab.txt", d / "emoji.json")
    assert needle in str(err.value)


def test_missing_files_are_named(assets_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_file"):
        GPTNeoXJapaneseTokenizer(tmp_path / "vocab.txt", assets_dir / "emoji.json")
    with pytest.raises(OSError, match="vocab.txt"):
        GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)


def test_importing_the_tokenizer_does_not_import_torch() -> None:
    code = "import sys, neoxja.tokenizer, neoxja.tokenizer_utils; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- CLI


def test_cli_prints_ids_and_tokens(assets_dir: Path, ref, capsys, monkeypatch) -> None:
    assert main(["tokenize", "--model", str(assets_dir), SEED_TEXT]) == 0
    assert json.loads(capsys.readouterr().out) == SEED_IDS
    assert main(["tokenize", "--model", str(assets_dir), "--tokens", "慶應 大学"]) == 0
    assert json.loads(capsys.readouterr().out) == ref.tokenize("慶應 大学")
    monkeypatch.setattr(sys, "stdin", io.StringIO("連絡先 a@b.jp"))
    assert main(["tokenize", "--model", str(assets_dir), "--clean", "-"]) == 0
    tokens = json.loads(capsys.readouterr().out)
    assert tokens[-1] == 31722  # <EMAIL>


def test_cli_reports_a_missing_model(tmp_path: Path, capsys) -> None:
    assert main(["tokenize", "--model", str(tmp_path / "nowhere"), "x"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_negative_max_length_and_unset_padding_length_raise(assets_dir):
    """A negative length would silently drop tokens; padding to an unset length would overflow."""
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(assets_dir)
    with pytest.raises(ValueError, match="max_length"):
        tok("こんにちは", truncation=True, max_length=-1)
    with pytest.raises(ValueError, match="max_length"):
        tok(["こんにちは"], padding="max_length")


def test_non_utf8_files_name_the_file(assets_dir, tmp_path):
    """A UTF-16 vocab.txt or emoji.json is a ValueError naming the file, not a UnicodeDecodeError."""
    import shutil

    for name in ("vocab.txt", "emoji.json"):
        d = tmp_path / name
        shutil.copytree(assets_dir, d)
        (d / name).write_bytes((d / name).read_text(encoding="utf-8").encode("utf-16"))
        with pytest.raises(ValueError, match=name):
            GPTNeoXJapaneseTokenizer.from_pretrained(d)
