"""Reading text files strictly: UTF-8 with errors that name file, line and byte, and the small JSON
files of a model directory (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
import os
from typing import Any


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
    text = decode_utf8(raw, path, drop_bom=True)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}, found a JSON {type(data).__name__}")
    return data
