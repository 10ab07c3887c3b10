"""Reading the small JSON files of a model directory (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
import os
from typing import Any


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
    try:
        text = raw.decode("utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start} is {raw[err.start]:#04x})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}, found a JSON {type(data).__name__}")
    return data
