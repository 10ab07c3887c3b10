"""The one JSON reader: errors that name their source, and a bound on nesting that holds before parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoxja.jsonfile import MAX_DEPTH, loads, nesting_depth_exceeds, read_json_object


def nested(depth: int, inner: str = "1") -> str:
    text = inner
    for level in range(depth):
        text = f"[{text}]" if level % 2 else '{"k": ' + text + "}"
    return text


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def test_depth_at_the_limit_loads_and_one_more_is_refused_by_name():
    assert depth_of(loads(nested(MAX_DEPTH), "x.json")) == MAX_DEPTH
    with pytest.raises(ValueError, match=rf"^x\.json: JSON nested more than {MAX_DEPTH} levels deep$"):
        loads(nested(MAX_DEPTH + 1), "x.json")


def test_a_million_levels_are_refused_without_recursion():
    with pytest.raises(ValueError, match="the request body: JSON nested more than"):
        loads("[" * 1_000_000 + "]" * 1_000_000, "the request body")
    # Unbalanced openers alone still end in a ValueError, never a RecursionError.
    with pytest.raises(ValueError, match="the request body"):
        loads("[" * 100_000, "the request body", max_depth=10**6)


def test_brackets_inside_strings_do_not_count():
    text = json.dumps({"a": "[" * 500 + '\\"{{{' + "]" * 3, "b": ["[[[", "\\"]})
    assert loads(text, "s") == json.loads(text)


def test_invalid_json_and_bytes_name_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"^data\.jsonl:3: not valid JSON"):
        loads("{", "data.jsonl:3")
    with pytest.raises(ValueError, match=r"^body:1: not UTF-8 text"):
        loads(b'{"a": "\xff"}', "body")
    path = tmp_path / "config.json"
    path.write_text(nested(200), encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{path}: JSON nested more than"):
        read_json_object(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet="[{x"), inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=12))
def test_the_scan_agrees_with_the_parsed_depth(value, limit):
    text = json.dumps(value)
    assert nesting_depth_exceeds(text, limit) == (depth_of(value) > limit)
