"""Reading text files strictly: UTF-8 with errors that name file, line and byte; JSON with a bound
on nesting (the one JSON reader of the package: model-directory files, quant states, shard indexes,
training data, request bodies)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

MAX_DEPTH = 64  # arrays/objects inside one another; real files and requests nest fewer than 10
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = str.maketrans("{}", "[]")


def nesting_depth_exceeds(text: str, limit: int) -> bool:
    """Whether arrays/objects in the JSON ``text`` nest more than ``limit`` deep (strings ignored).

    Linear in the text for any input: innermost ``[]`` pairs are removed level by level, at most
    ``limit + 1`` times, each a C-level pass; text with fewer openers than ``limit`` is not scanned.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    skeleton = "".join(re.findall(r"[\[\]{}]", _STRING.sub("", text))).translate(_BRACKETS)
    for _ in range(limit):
        shorter = skeleton.replace("[]", "")
        if len(shorter) == len(skeleton):
            return False  # nothing left to open (or unbalanced: json.loads names the error)
        skeleton = shorter
    return "[]" in skeleton


def loads(text: str | bytes, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)`` that names ``source`` (a file, "file:line" or "the request body") in its
    ``ValueError``: invalid JSON, or arrays/objects nested more than ``max_depth`` deep (refused
    before parsing, so a crafted input can never reach Python's recursion limit)."""
    if isinstance(text, bytes | bytearray):
        text = decode_utf8(bytes(text), source)
    if nesting_depth_exceeds(text, max_depth):
        raise ValueError(f"{source}: JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON: {err}") from None
    except RecursionError:  # only with a max_depth above the interpreter's own limit
        raise ValueError(f"{source}: JSON nested too deeply") from None


def decode_utf8(raw: bytes, path: str | os.PathLike, *, drop_bom: bool = False) -> str:
    """``raw`` (the contents of ``path``) as UTF-8 text; ``drop_bom`` removes a leading byte-order mark.

    Bytes that are not UTF-8 raise ``ValueError`` naming the file, the line and the byte.
    """
    try:
        return raw.decode("utf-8-sig" if drop_bom and raw.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError as err:
        line, byte = raw[: err.start].count(b"\n") + 1, raw[err.start]
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {err.start} is {byte:#04x})") from None


def read_json_object(path: str | os.PathLike, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path`` (UTF-8).

    Raises ``ValueError`` naming the file when it is not UTF-8, not valid JSON or not an object, so
    that a damaged or foreign file never surfaces as a bare decoding error.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError as err:
        raise ValueError(f"{path} is a directory, not {what}") from err
    data = loads(decode_utf8(raw, path, drop_bom=True), str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}, found a JSON {type(data).__name__}")
    return data
