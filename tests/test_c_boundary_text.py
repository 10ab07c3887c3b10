"""Fuzzing the tokenizer's C segmenter (``neoxja._segment``) at its boundary, each case in a child
process (``fuzz_isolation``): a crash or hang fails the test and names the case.

* ``Segmenter(vocab, kigou_id, u2000_id, byte_ids)``: random vocabularies (words with ``<``, kana,
  kanji, astral and combining characters), ids at and beyond their limits, values of the wrong type,
  and ids whose ``__index__`` changes the dict or list being read. A valid vocabulary must segment
  random text exactly as the pure-Python segmenter does; an invalid one be refused naming it.
* ``pack(sequences)``: lists of ids with out-of-range and non-int items, and items whose
  ``__index__`` grows, empties or replaces the lists being packed (this overflowed the heap). The
  result must be what a Python loop reading the same lists in the same order gets, or the same
  refusal.
* ``Segmenter.unpack(lengths, ids)``: arbitrary and misaligned bytes, against a Python decoder.
"""

from __future__ import annotations

import copy
import operator
import os
import random
import struct

import pytest
from fuzz_isolation import POOL, Workers, check_outcome, fuzz
from hypothesis import given
from hypothesis import strategies as st

from neoxja.tokenizer.segment import PythonSegmenter, _compiled

MODULE = "test_c_boundary_text"
CHARS = list("ab<>xyあいう漢字") + ["\U0001f600", "\u00b0", "\u01c1", "\u0300", "\u2100", "\ud800", "\n"]

pytestmark = pytest.mark.skipif(
    _compiled is None and os.environ.get("CI", "").lower() != "true", reason="neoxja._segment is not built"
)


@pytest.fixture(scope="module")
def workers() -> Workers:
    return POOL


class Mutating:
    """An id whose first ``__index__`` changes a container (the way a hostile or buggy caller's
    object could while C code reads that container)."""

    def __init__(self, value: int, action: str, target: object, arg: object = None) -> None:
        self.value, self.action, self.target, self.arg, self.fired = value, action, target, arg, False

    def __index__(self) -> int:
        if not self.fired:
            self.fired = True
            if self.action == "append":
                self.target.extend(self.arg)
            elif self.action == "clear":
                self.target.clear()
            elif self.action == "insert":  # a dict: new words
                self.target.update(self.arg)
            elif self.action == "replace":  # a list of lists: its rows swapped for others
                self.target[:] = self.arg
        return self.value


# ----- Segmenter(...) and segment() ---------------------------------------------------------------

VOCAB_DEFECTS = {
    "negative_id": {"vocab"},
    "id_at_int32_max": {"ids"},
    "huge_id": {"vocab"},
    "float_id": {"vocab"},
    "bytes_word": {"vocab"},
    "byte_ids_short": {"byte_ids"},
    "byte_ids_float": {"byte_ids"},
    "kigou_negative": {"kigou_id"},
    "u2000_huge": {"u2000_id"},
}
VOCAB_MUTATIONS = ["vocab_grows", "vocab_empties", "byte_ids_empty", "byte_ids_grow"]


@st.composite
def segmenter_cases(draw: st.DrawFn) -> dict:
    word = st.text(st.sampled_from(CHARS), min_size=1, max_size=6)
    words = draw(st.dictionaries(word, st.integers(0, 3000), max_size=40))
    return {
        "words": words,
        "kigou": draw(st.integers(0, 3000)),
        "u2000": draw(st.integers(0, 3000)),
        "byte_base": draw(st.integers(0, 3000)),
        "texts": draw(st.lists(st.text(st.sampled_from(CHARS), max_size=40), min_size=1, max_size=4)),
        "defect": draw(st.one_of(st.none(), st.sampled_from(sorted(VOCAB_DEFECTS)))),
        "mutation": draw(st.one_of(st.none(), st.sampled_from(VOCAB_MUTATIONS))),
    }


def run_segmenter(p: dict) -> str:
    vocab: dict = dict(p["words"])
    byte_ids: list = [p["byte_base"] + b for b in range(256)]
    kigou, u2000 = p["kigou"], p["u2000"]
    defect = p["defect"]
    if defect == "negative_id":
        vocab["<bad>"] = -1
    elif defect == "id_at_int32_max":
        vocab["<bad>"] = 2**31 - 1
    elif defect == "huge_id":
        vocab["<bad>"] = 2**40
    elif defect == "float_id":
        vocab["<bad>"] = 1.5
    elif defect == "bytes_word":
        vocab[b"bad"] = 3
    elif defect == "byte_ids_short":
        byte_ids.pop()
    elif defect == "byte_ids_float":
        byte_ids[7] = 7.0
    elif defect == "kigou_negative":
        kigou = -2
    elif defect == "u2000_huge":
        u2000 = 2**33
    snapshot, byte_snapshot = list(vocab.items()), list(byte_ids)
    mutation = p["mutation"]
    if mutation in ("vocab_grows", "vocab_empties") and vocab:
        first = next(iter(vocab))
        if isinstance(vocab[first], int):
            extra = {f"<{i}{first}>": i for i in range(500)}
            action = ("insert", extra) if mutation == "vocab_grows" else ("clear", None)
            vocab[first] = Mutating(vocab[first], action[0], vocab, action[1])
            snapshot = list(vocab.items())
    elif mutation in ("byte_ids_empty", "byte_ids_grow") and isinstance(byte_ids[0], int):
        action = ("clear", None) if mutation == "byte_ids_empty" else ("append", [0] * 10_000)
        byte_ids[0] = Mutating(byte_ids[0], action[0], byte_ids, action[1])
        byte_snapshot = list(byte_ids)
    segmenter = _compiled.Segmenter(vocab, kigou, u2000, byte_ids)
    reference_vocab = {word: operator.index(value) for word, value in snapshot}
    long_words = {w for w in reference_vocab if len(w) >= 3 and w[0] == "<"}
    reference = PythonSegmenter(
        reference_vocab, long_words, kigou, u2000, [operator.index(b) for b in byte_snapshot]
    )
    for text in p["texts"]:
        assert segmenter.segment(text) == reference.segment(text), f"segment({text!r}) differs"
    return f"{len(reference_vocab)} words"


@fuzz(60)
@given(case=segmenter_cases())
def test_segmenter_refuses_or_segments_like_python(workers: Workers, case: dict) -> None:
    result = workers.run("native", MODULE, "run_segmenter", case)
    check_outcome(result, VOCAB_DEFECTS.get(case["defect"], set()), case)


# ----- pack() ------------------------------------------------------------------------------------

ITEM = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 40_000),
    st.integers(0, 40_000),
    st.sampled_from([2**31, -(2**31) - 1, 2**63, 1.5, "7", None, True]),
    st.tuples(
        st.just("mutating"), st.sampled_from(["append", "clear", "replace", "grow_outer", "clear_outer"])
    ),
)


@st.composite
def pack_cases(draw: st.DrawFn) -> dict:
    rows = draw(st.lists(st.lists(ITEM, max_size=6), max_size=5))
    return {"rows": rows, "tuple_row": draw(st.booleans()) and bool(rows), "seed": draw(st.integers(0, 99))}


def _build(p: dict) -> list:
    """The case's lists, its mutating items wired to the lists they change."""
    rng = random.Random(p["seed"])
    outer: list = []
    for spec in p["rows"]:
        row: list = []
        outer.append(row)
        for item in spec:
            if not isinstance(item, tuple):
                row.append(item)
                continue
            action = item[1]
            if action == "append":
                row.append(
                    Mutating(1, "append", row, [rng.randrange(100) for _ in range(rng.randrange(1, 3000))])
                )
            elif action == "clear":
                row.append(Mutating(2, "clear", row))
            elif action == "replace":
                row.append(Mutating(3, "replace", outer, [[9] * rng.randrange(0, 5)]))
            elif action == "grow_outer":
                row.append(Mutating(4, "append", outer, [[5] * 1000 for _ in range(rng.randrange(1, 4))]))
            else:
                row.append(Mutating(5, "clear", outer))
    if p["tuple_row"]:
        outer[-1] = tuple(outer[-1])
    return outer


def _pack_in_python(sequences: list) -> tuple[bytes, bytes]:
    """What pack() must return: each list's size read afresh, items converted one by one."""
    lengths, ids = [], []
    i = 0
    while i < len(sequences):
        row = sequences[i]
        if not isinstance(row, list):
            raise TypeError(f"pack: item {i} is not a list")
        start, k = len(ids), 0
        while k < len(row):
            value = operator.index(row[k])
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"pack: item {k} of sequence {i} does not fit in int32")
            ids.append(value)
            k += 1
        lengths.append(len(ids) - start)
        i += 1
    return struct.pack(f"{len(lengths)}i", *lengths), struct.pack(f"{len(ids)}i", *ids)


def run_pack(p: dict) -> str:
    sequences = _build(p)
    twin = copy.deepcopy(sequences)
    try:
        expected = _pack_in_python(twin)
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error), match="^pack: "):
            _compiled.pack(sequences)
        return f"refused alike: {error}"
    assert _compiled.pack(sequences) == expected, "pack() differs from reading the lists in Python"
    return f"{len(expected[1]) // 4} ids"


@fuzz(80)
@given(case=pack_cases())
def test_pack_reads_lists_that_change_under_it(workers: Workers, case: dict) -> None:
    check_outcome(workers.run("native", MODULE, "run_pack", case), set(), case)


# ----- unpack() ----------------------------------------------------------------------------------


@st.composite
def unpack_cases(draw: st.DrawFn) -> dict:
    ids = draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=30))
    cuts = sorted(draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    honest = [b - a for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]  # they cover the ids
    lengths = draw(st.one_of(st.just(honest), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6)))
    small = st.sampled_from([0, 0, 0, 1, 2, 3])
    return {
        "lengths": lengths,
        "ids": ids,
        "trim": draw(st.tuples(small, small)),  # bytes cut off the ends
        "offset": draw(st.tuples(small, small)),  # misalignment
        "initialised": draw(st.booleans()),
    }


def _unpack_in_python(lengths: bytes, ids: bytes) -> list[list[int]]:
    if len(lengths) % 4 or len(ids) % 4:
        raise ValueError("unpack: not int32 values")
    sizes, values = struct.unpack(f"{len(lengths) // 4}i", lengths), struct.unpack(f"{len(ids) // 4}i", ids)
    out, used = [], 0
    for size in sizes:
        if size < 0 or size > len(values) - used:
            raise ValueError("unpack: overrun")
        out.append(list(values[used : used + size]))
        used += size
    if used != len(values):
        raise ValueError("unpack: ids left over")
    return out


def run_unpack(p: dict) -> str:
    segmenter = _compiled.Segmenter.__new__(_compiled.Segmenter)
    if p["initialised"]:
        segmenter.__init__({"a": 1, "<ab>": 5}, 2, 3, list(range(10, 266)))
    raw = []
    for i, values in enumerate((p["lengths"], p["ids"])):
        offset, trim = p["offset"][i], p["trim"][i]
        data = struct.pack(f"{len(values)}i", *values)
        data = data[: max(0, len(data) - trim)]
        buffer = bytearray(offset) + bytearray(data)
        raw.append(memoryview(buffer)[offset:])
    try:
        expected = _unpack_in_python(bytes(raw[0]), bytes(raw[1]))
    except ValueError:
        with pytest.raises(ValueError, match="^unpack: "):
            segmenter.unpack(*raw)
        return "refused alike"
    assert segmenter.unpack(*raw) == expected, "unpack() differs from the Python decoder"
    return f"{len(expected)} sequences"


@fuzz(60)
@given(case=unpack_cases())
def test_unpack_refuses_or_decodes_any_bytes(workers: Workers, case: dict) -> None:
    check_outcome(workers.run("native", MODULE, "run_unpack", case), set(), case)


def test_a_segmenter_that_failed_to_build_is_not_used() -> None:
    """An __init__ that fails leaves no half-built table behind: segment() refuses, a new __init__
    can succeed."""
    segmenter = _compiled.Segmenter.__new__(_compiled.Segmenter)
    with pytest.raises(TypeError, match="vocab: an id must be an int, got float"):
        segmenter.__init__({"a": 1, "b": 2.5}, 0, 0, list(range(256)))
    with pytest.raises(RuntimeError, match="not initialised"):
        segmenter.segment("a")
    segmenter.__init__({"a": 1}, 0, 0, list(range(256)))
    assert segmenter.segment("ab") == [1, ord("b")]
    with pytest.raises(RuntimeError, match="already initialised"):
        segmenter.__init__({"a": 1}, 0, 0, list(range(256)))


def test_a_row_that_grows_while_packed(workers: Workers) -> None:
    """The heap overflow this module was written for: an id whose __index__ appends thousands of
    ids to its own row (and another that adds rows) while pack() reads them."""
    case = {
        "rows": [[7, ("mutating", "append"), 8], [("mutating", "grow_outer")], [1]],
        "tuple_row": False,
        "seed": 1,
    }
    result = workers.run("native", MODULE, "run_pack", case)
    check_outcome(result, set(), case)
    assert "refused" not in result["detail"]
