"""The vocabulary and its tables: reading vocab.txt and emoji.json, special tokens, id lookups."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from itertools import chain, repeat
from typing import Any

from neoxja.jsonfile import decode_utf8, read_json_object

VOCAB_FILES = {"vocab_file": "vocab.txt", "emoji_file": "emoji.json"}
# transformers' "no limit" value, so saved configs round-trip unchanged.
VERY_LARGE_INTEGER = int(1e30)

# How the rewrite tags and the fallback tags read when decoded.
TAG_TEXT = {
    "<SP>": " ",
    "<BR>": "\n",
    "<TAB>": "\t",
    "<BLOCK>": "\u2580",
    "<KIGOU>": "\u01c0",
    "<U2000U2BFF>": "\u2016",
}
_BYTE_TOKEN_RE = re.compile(r"<\|byte(\d{1,3})\|>")
# Candidates for vocabulary words of 3+ characters starting with "<" (kept if they are words).
_LT_WORD_RE = re.compile(r"<[^,\n]{2,}")


def load_vocab(path: str | os.PathLike) -> list[str]:
    """Read ``vocab.txt``: one line per id; commas separate spelling variants of one id.

    Returns the lines. Raises ValueError naming the file and line for an empty line or an empty
    variant (``a,,b``, ``a,``); a line that is just ``,`` is the comma token.
    """
    with open(path, "rb") as f:
        raw = f.read()
    text = decode_utf8(raw, path)  # a byte-order mark would be part of id 0, as in the reference
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: the vocabulary is empty")
    for number, line in _suspect_lines(text, lines):
        if not line or line != "," and (line[0] == "," or line[-1] == "," or ",," in line):
            raise ValueError(f"{path}: line {number} is malformed ({line!r}): empty token or variant")
    return lines


def load_emoji(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read ``emoji.json`` (``emoji``: character -> tag, ``emoji_inv``: tag -> representative).

    Raises ValueError naming the file and key when the structure is wrong.
    """
    data = read_json_object(path, "a JSON object with keys 'emoji' and 'emoji_inv'")
    for key in ("emoji", "emoji_inv"):
        table = data.get(key)
        if not isinstance(table, dict):
            raise ValueError(f"{path}: key {key!r} must be an object mapping strings to strings")
        for k, v in table.items():
            if not k or not isinstance(v, str) or not v:
                raise ValueError(f"{path}: entry {k!r} of {key!r} must map a non-empty string to one")
    for k, tag in data["emoji"].items():
        if tag not in data["emoji_inv"]:
            raise ValueError(f"{path}: emoji {k!r} maps to {tag!r}, which 'emoji_inv' lacks")
    return {"emoji": dict(data["emoji"]), "emoji_inv": dict(data["emoji_inv"])}


def _suspect_lines(text: str, lines: list[str]) -> Iterable[tuple[int, str]]:
    """(line number, line) for the lines that may be empty or hold an empty variant, found with
    C-level substring searches so that checking a good file costs almost nothing."""
    numbers = {1, len(lines)}
    for needle in ("\n\n", "\n,", ",\n", ",,"):
        at = text.find(needle)
        while at >= 0:
            numbers.add(text.count("\n", 0, at) + 1)
            numbers.add(text.count("\n", 0, at) + 2)
            at = text.find(needle, at + 1)
    return [(n, lines[n - 1]) for n in sorted(numbers) if n <= len(lines)]


def _ends_with_newline(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def word_ids(lines: list[str], vocab_file: str | os.PathLike) -> dict[str, int]:
    """Word -> id, for encoding; a word listed twice keeps its last id, as in the reference.

    Built with one split of the whole file and C-level dict(zip()) to keep loading fast.
    """
    words = ",".join(lines).split(",")
    counts = [line.count(",") + 1 for line in lines]
    vocab = dict(zip(words, chain.from_iterable(map(repeat, range(len(lines)), counts)), strict=True))
    # The reference reads the comma line as two empty variants, so "," itself is never matched
    # (it becomes byte 44); only an unterminated last line "," is the comma word.
    vocab.pop("", None)
    if lines[-1] == "," and not _ends_with_newline(vocab_file):
        vocab[","] = len(lines) - 1
    return vocab


def lt_words(lines: list[str], vocab: dict[str, int]) -> set[str]:
    """The vocabulary words of 3+ characters that start with "<" (they win outright there)."""
    return {w for w in _LT_WORD_RE.findall("\n".join(lines)) if w in vocab}


def special_tokens(
    tokens: Iterable[str | None], vocab: dict[str, int], first_new_id: int
) -> tuple[dict[str, int], re.Pattern | None]:
    """Special token -> id (a vocabulary word keeps its id, others get new ids from
    ``first_new_id``), and the regex that splits text around them (longest first)."""
    encoder: dict[str, int] = {}
    next_id = first_new_id
    for token in dict.fromkeys(tokens):
        if token is None:
            continue
        if token in vocab:
            encoder[token] = vocab[token]
        else:
            encoder[token] = next_id
            next_id += 1
    ordered = sorted(encoder, key=len, reverse=True)
    split = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
    return encoder, split


def decoding_tables(
    lines: list[str], emoji_inv: dict[str, str], added: dict[int, str]
) -> tuple[list[str | None], list[int]]:
    """Each id's text (its first spelling, a tag's character, a special token's content) or, for
    byte tokens, its byte value (-1 for the others)."""
    n = max(len(lines), max(added, default=-1) + 1)
    id_text: list[str | None] = [None] * n
    id_byte = [-1] * n
    id_text[: len(lines)] = [line.partition(",")[0] or line for line in lines]
    for idx, line in enumerate(lines):
        if line[0] == "<":
            word = line.partition(",")[0]
            m = _BYTE_TOKEN_RE.fullmatch(word)
            if m and int(m.group(1)) < 256:
                id_byte[idx] = int(m.group(1))
                id_text[idx] = None
            else:
                id_text[idx] = TAG_TEXT.get(word, emoji_inv.get(word, word))
    for idx, token in added.items():
        id_text[idx] = token
        id_byte[idx] = -1
    return id_text, id_byte


def as_id_list(ids: Any) -> list:
    """A sequence of ids (a list, a tuple, a tensor, one int) as a list."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"token ids must be integers, got {type(ids).__name__}")
    return list(ids)


def _special_token_id(name: str) -> property:
    """A property: the id of the special token held in attribute ``name`` (None without one)."""
    return property(
        lambda self: self.added_tokens_encoder.get(getattr(self, name)), doc=f"The id of ``{name}``."
    )


class VocabularyMixin:
    """The tokenizer's vocabulary API: sizes, special tokens, token <-> id conversions."""

    _lines: list[str]
    vocab: dict[str, int]
    raw_vocab: dict[str, int]
    emoji: dict[str, dict[str, str]]
    added_tokens_encoder: dict[str, int]
    added_tokens_decoder: dict[int, str]
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    _unk_id: int

    @cached_property
    def _decoding(self) -> tuple[list[str | None], list[int]]:
        """Decoding tables (see :func:`decoding_tables`), built on first use."""
        return decoding_tables(self._lines, self.emoji["emoji_inv"], self.added_tokens_decoder)

    @property
    def ids_to_tokens(self) -> list[list[str]]:
        """Id -> its spellings (the first is the one decoding gives)."""
        return [line.split(",") if "," in line and line != "," else [line] for line in self._lines]

    @property
    def vocab_size(self) -> int:
        """Number of distinct vocabulary lines (as the reference counts them)."""
        return len(self.raw_vocab)

    def __len__(self) -> int:
        return len(self.get_vocab())

    def get_vocab(self) -> dict[str, int]:
        """Comma-joined vocabulary line -> id, plus the special tokens."""
        return {**self.raw_vocab, **self.added_tokens_encoder}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = (self.bos_token, self.eos_token, self.unk_token, self.pad_token)
        return [t for t in dict.fromkeys(tokens) if t is not None]

    @property
    def all_special_ids(self) -> list[int]:
        return [self.added_tokens_encoder[t] for t in self.all_special_tokens]

    unk_token_id = _special_token_id("unk_token")
    pad_token_id = _special_token_id("pad_token")
    bos_token_id = _special_token_id("bos_token")
    eos_token_id = _special_token_id("eos_token")

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Token string(s) -> id(s); an unknown token gives the unk id, as in the reference."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return self.vocab.get(token, self._unk_id)

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        """Id(s) -> the reference's token strings: tags as text, byte tokens one by one (lossy).

        Use :meth:`decode` for text; this exists for parity with transformers.
        """
        if isinstance(ids, int):
            return self._id_to_token(self._check_id(ids))
        return [
            self._id_to_token(i)
            for i in map(self._check_id, as_id_list(ids))
            if not (skip_special_tokens and i in self.added_tokens_decoder)
        ]

    def _id_to_token(self, idx: int) -> str:
        id_text, id_byte = self._decoding
        if id_byte[idx] >= 0:
            return bytes([id_byte[idx]]).decode("utf-8", errors="replace")
        return id_text[idx]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Join token strings and strip surrounding whitespace (the reference's behaviour)."""
        return "".join(tokens).strip()

    def _check_id(self, idx: Any) -> int:
        """``idx`` as an int id of this vocabulary; TypeError or ValueError otherwise."""
        try:
            value = int(idx)
        except (TypeError, ValueError):
            raise TypeError(f"token ids must be integers, got {type(idx).__name__} {idx!r}") from None
        if not 0 <= value < len(self._decoding[0]):
            raise ValueError(f"token id {value} is outside the vocabulary (0..{len(self._lines) - 1})")
        return value
