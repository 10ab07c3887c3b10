"""Reading training data files as a stream: ``.txt`` and ``.jsonl`` files read a megabyte at a time,
checked (UTF-8, JSON, fields, empty files) with errors that name the file and line, and handed out
as :class:`Text` parts, so that no file is ever held whole.

What a line is: text up to a ``"\\n"``; a ``"\\r"`` just before it is part of the line end (CRLF
files read like LF files). No other character ends a line: a JSON string may hold U+2028, U+2029 or
U+0085, and a ``.txt`` line keeps a lone ``"\\r"`` (the tokenizer reads it as a line break).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from neoxja import jsonfile

# chat(messages, "file:line"): the Text parts of a {"messages": [...]} record (see tuner.chat_data).
Chat = Callable[[object, str], Iterator["Text"]]
READ_BYTES = 1 << 20  # bytes read from a file at a time
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Training data that cannot be used, with the file (and line) that holds the problem."""


@dataclass(frozen=True)
class Text:
    """A part of a document as read. A document is one or two segments (a prompt without loss, then
    text with loss), and a long segment comes in several parts; ``segment_ends`` marks a segment's
    last part, ``document_ends`` the document's."""

    text: str
    loss: bool = True
    segment_ends: bool = True
    document_ends: bool = True
    source: str = ""  # "file:line" where the document starts, for messages


def data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The ``.txt``/``.jsonl`` files of ``paths``: files as given, directories searched (sorted).

    Raises :class:`DataError` for a missing path, a directory without data or another kind of file.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise DataError(f"{path}: a directory with no .txt or .jsonl file")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise DataError(f"{path}: unknown kind of data file (use .txt or .jsonl)")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def read_texts(path: Path, per_line: bool = False, chat: Chat | None = None) -> Iterator[Text]:
    """The documents of one file as :class:`Text` parts, checked as they are read.

    A ``.txt`` file is one document, or with ``per_line`` one per non-blank line; a ``.jsonl``
    line is ``{"text": ...}``, ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``
    (rendered by ``chat``; blank lines skipped). Raises :class:`DataError` naming the file and
    line of a problem, or the file when it holds no document.
    """
    if path.suffix == ".jsonl":
        parts = _jsonl_texts(path, chat)
    elif per_line:
        parts = _line_texts(path)
    else:
        parts = _file_text(path)
    empty = True
    for part in parts:
        empty = False
        yield part
    if empty:
        raise DataError(f"{path}: empty (no document in it)")


def _decoded(path: Path) -> Iterator[str]:
    """The text of ``path``, ``READ_BYTES`` at a time (each piece ends between characters), without
    a leading byte-order mark; bytes that are not UTF-8 raise naming the line and byte."""
    offset, lines, carry = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            data = carry + raw
            if offset == 0 and data.startswith(_BOM):
                data, offset = data[len(_BOM) :], len(_BOM)
            end = len(data) if not raw else _complete(data)
            try:
                text = data[:end].decode("utf-8")
            except UnicodeDecodeError as err:
                at, byte = offset + err.start, data[err.start]
                line = lines + data.count(b"\n", 0, err.start) + 1
                raise DataError(f"{path}:{line}: not UTF-8 text (byte {at} is {byte:#04x})") from None
            if text:
                yield text
            if not raw:
                return
            lines += data.count(b"\n", 0, end)
            offset += end
            carry = data[end:]


def _complete(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 sequence cut short at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # the first byte of a sequence: does the sequence fit?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)  # continuation bytes only: not UTF-8, and the decoder says where


def _file_text(path: Path) -> Iterator[Text]:
    """A whole ``.txt`` file as one document (nothing when it is blank)."""
    source = f"{path}:1"
    held: list[str] = []  # blank text read before the first visible character
    started = False
    for text in _decoded(path):
        if not started:
            if not text.strip():
                held.append(text)
                continue
            started, text = True, "".join(held) + text
            held.clear()
        yield Text(text, segment_ends=False, document_ends=False, source=source)
    if started:
        yield Text("", source=source)


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, the line ends here)`` pieces of the lines of ``path``: a line split on
    ``"\\n"`` only, without a ``"\\r"`` right before it; a long line comes in several pieces."""
    number = 1
    held_cr = False  # a "\r" at the end of the previous piece: a line end if "\n" follows
    for text in _decoded(path):
        if held_cr:
            text, held_cr = "\r" + text, False
        lines = text.split("\n")
        for line in lines[:-1]:
            yield number, line[:-1] if line.endswith("\r") else line, True
            number += 1
        last = lines[-1]
        if last.endswith("\r"):
            last, held_cr = last[:-1], True
        if last:
            yield number, last, False
    yield number, "\r" if held_cr else "", True


def _line_texts(path: Path) -> Iterator[Text]:
    """A ``.txt`` file with a document per non-blank line."""
    held: list[str] = []  # the blank start of the current line
    started = False
    for number, text, ends in _lines(path):
        source = f"{path}:{number}"
        if not started:
            if text.strip():
                started, text = True, "".join(held) + text
                held.clear()
            elif ends:
                held.clear()
                continue
            else:
                held.append(text)
                continue
        yield Text(text, segment_ends=ends, document_ends=ends, source=source)
        if ends:
            started = False


def _jsonl_texts(path: Path, chat: Chat | None) -> Iterator[Text]:
    """A ``.jsonl`` file: a record per non-blank line (a line is held whole to parse it)."""
    pieces: list[str] = []
    for number, text, ends in _lines(path):
        pieces.append(text)
        if not ends:
            continue
        line = "".join(pieces)
        pieces.clear()
        if line.strip():
            yield from _jsonl_record(path, number, line, chat)


def _jsonl_record(path: Path, number: int, line: str, chat: Chat | None) -> Iterator[Text]:
    where = f"{path}:{number}"
    try:
        item = jsonfile.loads(line, where)
    except ValueError as err:
        raise DataError(str(err)) from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, found a {type(item).__name__}")
    if "text" in item:
        fields = {"text": item["text"]}
    elif "prompt" in item or "completion" in item:
        missing = [key for key in ("prompt", "completion") if key not in item]
        if missing:
            raise DataError(f"{where}: a prompt/completion record needs {' and '.join(missing)}")
        fields = {"prompt": item["prompt"], "completion": item["completion"]}
    elif "messages" in item:
        if chat is None:
            raise DataError(f"{where}: a chat record needs a tokenizer's chat template to be read")
        yield from chat(item["messages"], where)
        return
    else:
        keys = ", ".join(map(repr, item)) or "none"
        raise DataError(
            f'{where}: needs "text", "prompt" and "completion", or "messages" (keys found: {keys})'
        )
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, found {type(value).__name__}")
    if "text" in fields:
        yield Text(fields["text"], source=where)
        return
    if not fields["completion"]:
        raise DataError(f"{where}: empty 'completion' (nothing to learn from)")
    if fields["prompt"]:
        yield Text(fields["prompt"], loss=False, document_ends=False, source=where)
    yield Text(fields["completion"], source=where)
