"""GPT-NeoX-Japanese tokenizer: the reference's exact ids, lossless decoding, and a fast encoder.

How text becomes ids (this is the behaviour of Japanese-BPEEncoder_V2, which the checkpoints were
trained with, and of transformers' ``GPTNeoXJapaneseTokenizer``):

1. The text is split around special tokens written in it (``<|endoftext|>`` stays one id); every
   other piece is encoded on its own.
2. Fixed rewrites: space and U+3000 -> ``<SP>``, CRLF/LF/CR -> ``<BR>``, tab -> ``<TAB>``, ``—`` and
   ``−`` -> ``ー``; then each emoji (``emoji.json``, in file order) -> its group tag ``<|emojiN|>``;
   with ``do_clean_text`` URLs, e-mail addresses, phone numbers, dates, prices and box-drawing runs
   become ``<URL>``, ``<EMAIL>``, ``<TEL>``, ``<DATE>``, ``<PRICE>``, ``<BLOCK>``.
3. Segmentation, left to right. At ``<`` the longest vocabulary word of 3+ characters wins.
   Anywhere else the candidates are the vocabulary words among the next 1, 2 and 3 characters and
   the one with the *smallest id* wins (ties: the longer) -- not the longest match. A character with
   no candidate becomes ``<KIGOU>`` (some Latin-1/IPA symbols and combining marks),
   ``<U2000U2BFF>`` (U+2000..U+2BFF) or one byte token per UTF-8 byte.

Speed comes from doing the same thing with less work: the fixed rewrites are C-level
``str.replace`` calls; emoji are replaced in one pass with the reference's key-by-key result; the
``do_clean_text`` patterns are searched with linear-time scanners (the reference's regular
expressions backtrack quadratically on long digit runs); and step 3 runs in a small C extension,
``neoxja._segment`` (hash tables of the vocabulary's 1-3 character words and of its ``<`` words),
because in CPython every token of a per-position loop costs about a microsecond, 20x too much.
Without the extension (no compiler at install time, or ``NEOXJA_PURE_PYTHON=1``) step 3 runs in
Python with the same ids: a regex derived from the vocabulary cuts the text into chunks that no
token can cross, each distinct chunk is segmented once and then served from a cache, and inside a
new chunk the decision is cached per 3-character window (caches are bounded and start over when
full). Decoding joins byte tokens across tokens, so characters outside the vocabulary come back
intact, and keeps spaces; :func:`normalize` says exactly what comes back.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from functools import cached_property, reduce
from itertools import chain, repeat
from operator import iadd
from pathlib import Path
from typing import Any

from neoxja.jsonfile import read_json_object

try:
    from . import _segment as _compiled
except ImportError:  # built without a C compiler: the pure-Python segmentation is used
    _compiled = None

VOCAB_FILES = {"vocab_file": "vocab.txt", "emoji_file": "emoji.json"}
# transformers' "no limit" value, so saved configs round-trip unchanged.
VERY_LARGE_INTEGER = int(1e30)

# Step 2 of the module docstring, in the reference's order (the order matters for CRLF).
_FIXED_REWRITES = (
    (" ", "<SP>"),
    ("\u3000", "<SP>"),
    ("\r\n", "<BR>"),
    ("\n", "<BR>"),
    ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("\u2014", "\u30fc"),
    ("\u2212", "\u30fc"),
)
_FIXED_REWRITE_RE = re.compile("\r\n|[ \u3000\n\r\t\u2014\u2212]")
_FIXED_REWRITE_MAP = {"\r\n": "<BR>", **dict(_FIXED_REWRITES)}

# How the tags of step 2 and the fallback tags read when decoded.
_TAG_TEXT = {
    "<SP>": " ",
    "<BR>": "\n",
    "<TAB>": "\t",
    "<BLOCK>": "\u2580",
    "<KIGOU>": "\u01c0",
    "<U2000U2BFF>": "\u2016",
}
# Code-point ranges that fall back to <KIGOU> (their UTF-8 forms are C2A1-C2BF, C780-C783,
# CAB9-CBBF and CC80-CDA2 in the original encoder) and to <U2000U2BFF>.
_KIGOU_RANGES = ((0x00A1, 0x00BF), (0x01C0, 0x01C3), (0x02B9, 0x02FF), (0x0300, 0x0362))
_U2000_RANGE = (0x2000, 0x2BFF)
# decode(clean_up_tokenization_spaces=True): the space before these goes, in this order.
_CLEAN_UP_SPACES = tuple(
    (" " + s, s.strip()) for s in (".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re")
)
_BYTE_TOKEN_RE = re.compile(r"<\|byte(\d{1,3})\|>")
# Candidates for vocabulary words of 3+ characters starting with "<" (kept if they are words).
_LT_WORD_RE = re.compile(r"<[^,\n]{2,}")

_BOX_DRAWING = "".join(chr(c) for c in range(0x2500, 0x2580))
_BLOCK_ELEMENTS = "".join(chr(c) for c in range(0x2580, 0x25A0))
_BLOCK_CHARS = frozenset(_BOX_DRAWING + _BLOCK_ELEMENTS)
_BLOCK_TABLE = str.maketrans(dict.fromkeys(_BLOCK_CHARS, "<BLOCK>"))

# do_clean_text patterns. They match what the reference's patterns match; the scanners below
# decide *where* to try them so that a long run of digits is not re-read from every position.
_URL_RE = re.compile(r"(?:https?|ftp)://[-_.!~*'()a-zA-Z0-9;/?:@&=+$,%#]+")
_EMAIL_LOCAL_RUN_RE = re.compile(r"[A-Za-z0-9._+]+")
_EMAIL_DOMAIN_RE = re.compile(r"@[-_0-9A-Za-z]+(?:\.[A-Za-z]+)*")
_TEL_RE = re.compile(r"\(?[0-9]{2,4}[)\-(]?[0-9]{2,4}[)\-]?[0-9]{3,4}")
_WEEKDAY = r"\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯"
_DATE_TAIL = r"(?:\d{1,2}|:|\d{1,2}時|\d{1,2}分|" + _WEEKDAY + r")*"
_MONTH_SEP = r"(?:0?[1-9]|1[0-2])[/\-月]"
_YEAR_UNIT = r"[12]\d{3}[/\-年]"
# A month never starts where a year unit starts, so greedy year units never need to give one
# back: the scanner below calls this only where it succeeds, and it does so without backtracking.
_DATE_RE = re.compile(
    "(?:" + _YEAR_UNIT + ")*" + _MONTH_SEP + r"(?:(?:0?[1-9]|[12][0-9]|3[01])日?)*" + _DATE_TAIL
)
_YEAR_UNIT_AT = re.compile("(?=" + _YEAR_UNIT + ")")
_MONTH_SEP_AT = re.compile("(?=" + _MONTH_SEP + ")")
_ERA_DATE_RE = re.compile(
    "(?:明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)"
    r"\d{1,2}年(?:0?[1-9]|1[0-2])月(?:0?[1-9]|[12][0-9]|3[01])日" + _DATE_TAIL
)
_PRICE_UNITS = "千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ"
# The number phases never give characters back (possessive, as in the reference); written as
# "(?=(X*))\1" because Python 3.10 has no possessive quantifiers.
_PRICE_RE = re.compile(
    r"(?=((?:\d,\d{3}|[\d億])*))\1(?=((?:\d,\d{3}|[\d万])*))\2(?=((?:\d,\d{3}|[\d千])*))\3"
    "(?:" + _PRICE_UNITS + r")+(?:\(税込\)|\(税抜\)|\+tax)*"
)
_PRICE_UNIT_AT = re.compile("(?=" + _PRICE_UNITS + ")")
_PRICE_RUN_RE = re.compile(r"[\d,億万千]+")
# The number part of a price is read in three phases; each phase takes "d,ddd" groups, digits and
# its own magnitude character.
_PRICE_PHASE_CHARS = ("億", "万", "千")


def _is_kigou(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _KIGOU_RANGES)


def _char_bytes(ch: str) -> bytes:
    """UTF-8 bytes of one character; a lone surrogate (not encodable) stands for U+FFFD."""
    try:
        return ch.encode("utf-8")
    except UnicodeEncodeError:
        return "\ufffd".encode()


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class matching at least ``chars``, written as few ranges. Astral
    characters are merged into wide ranges (a superset): the regex engine tests a long list of
    astral ranges one by one for every character, which made this check the encoder's bottleneck."""
    ranges: list[list[int]] = []
    for cp in sorted(map(ord, chars)):
        gap = 256 if cp > 0xFFFF else 1
        if ranges and cp - ranges[-1][1] <= gap:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    body = "".join(
        re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in ranges
    )
    return f"[{body}]"


# Character classes for cutting text into chunks (see _chunk_pattern). Any partition is correct;
# this one follows the scripts so that chunks come out word-sized.
_CHUNK_CLASSES = {
    "H": "\u3041-\u3096",  # hiragana
    "T": "\u30a1-\u30fa",  # katakana
    "M": "\u3099-\u309f\u30fb-\u30ff",  # kana marks and signs (゛, ー, ・, ゝ, ...)
    # ideographs, radicals, 々〆〇, compatibility forms; astral characters (one range keeps the
    # regex engine's class test fast)
    "K": "\u2e80-\u2fdf\u3005-\u3007\u3190-\u319f\u3200-\u33ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\U00010000-\U0010ffff",
    "A": "\x21-\x7e",  # ASCII (the tags <SP>, <BR>, ... included)
    "F": "\uff01-\uff9f",  # full-width and half-width forms
}
_OTHER_CLASS = "[^" + "".join(_CHUNK_CLASSES.values()) + "]"


def _chunk_pattern(lines: list[str]) -> str:
    """A regex whose matches cut (rewritten) text into chunks that segment independently.

    A token never spans two chunks: a chunk ends between characters x and y only when no
    vocabulary word has a character of x's class followed by one of y's class, so segmenting each
    chunk alone gives the same tokens, whatever the vocabulary. All words are looked at, whether
    they can be candidates or not (being too careful only makes chunks longer); words within one
    class say nothing new, so a regex picks out the few that mix classes.
    """
    classes = {name: f"[{body}]" for name, body in _CHUNK_CLASSES.items()}
    classes["O"] = _OTHER_CLASS
    pure = "|".join(f"{cls}+" for cls in classes.values())
    mixed = re.compile(rf"(?<![^,\n])(?!(?:{pure})(?:[,\n]|\Z))[^,\n]+")
    matchers = [(name, re.compile(cls).match) for name, cls in classes.items()]

    def class_of(ch: str) -> str:
        return next(name for name, match in matchers if match(ch))

    follows = {name: {name} for name in classes}
    for m in mixed.finditer("\n".join(lines)):
        labels = [class_of(ch) for ch in m.group()]
        for x, y in zip(labels, labels[1:], strict=False):
            follows[x].add(y)
    # Reading a chunk: classes that can follow each other both ways (a strongly connected set,
    # like kana and their marks) form runs; after a run the chunk may go on only into sets that
    # can follow it, in topological order, never back. Every place this stops is a safe cut.
    names = list(classes)
    reach = {x: set(follows[x]) for x in names}
    for k in names:
        for x in names:
            if k in reach[x]:
                reach[x] |= reach[k]
    components: list[list[str]] = []
    for x in names:
        if not any(x in c for c in components):
            components.append([y for y in names if y == x or (y in reach[x] and x in reach[y])])

    def atom(component: list[str]) -> str:
        ranges = "".join(classes[y][1:-1] for y in component if y != "O")
        parts = ([f"[{ranges}]"] if ranges else []) + ([_OTHER_CLASS] if "O" in component else [])
        return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"

    def later(a: list[str], b: list[str]) -> bool:  # b can follow a
        return b is not a and b[0] in reach[a[0]]

    order = sorted(components, key=lambda c: sum(later(o, c) for o in components))  # topological
    alternatives = []
    for component in order:
        tail = "".join(atom(c) + "*" for c in order if later(component, c))
        alternatives.append(atom(component) + "+" + tail)
    return "|".join(alternatives)


class _ChunkCache(dict):
    """chunk -> its ids, computed on first use (``map(cache.__getitem__, chunks)`` runs in C)."""

    def __init__(self, segment: Any) -> None:
        super().__init__()
        self._segment = segment

    limit = 200_000  # entries; the cache starts over when full, which bounds its memory

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        if len(self) >= self.limit:
            self.clear()
        ids = self[chunk] = self._segment(chunk)
        return ids


def _trie_regex(words: Iterable[str]) -> str:
    """A regex alternation of ``words`` shaped as a trie that prefers the longest word."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if "" in node:
            branches.append("")
        if len(branches) == 1:
            return branches[0]
        return "(?:" + "|".join(branches) + ")"

    return build(trie)


def load_vocab(path: str | os.PathLike) -> list[str]:
    """Read ``vocab.txt``: one line per id; commas separate spelling variants of one id.

    Returns the lines. Raises ValueError naming the file and line for an empty line or an empty
    variant (``a,,b``, ``a,``); a line that is just ``,`` is the comma token.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start} is {raw[err.start]:#04x})") from err
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


class _EmojiReplacer:
    """Step 2's emoji tags in one pass, with exactly the reference's result.

    The reference runs ``text.replace(key, tag)`` for each key of ``emoji.json`` in file order.
    No key can match or overlap a tag (checked here), so an inserted tag only separates text and
    the result is: key number r takes, left to right and without overlap, its occurrences in the
    original text that no earlier key took. That is what this computes, in one pass: it finds
    every occurrence of every key (the keys starting at one position are the prefixes of the
    longest one there) and takes them in (file order, start) order when they are still free. An
    occurrence overlapping no other one is simply taken by the earliest key among those starting
    there; a group of overlapping occurrences is resolved once per distinct text and cached. The
    work is linear in the text (n log n within one group). If a key could overlap a tag, the
    replacements run key after key, as in the reference.
    """

    _CACHE_LIMIT = 100_000  # resolved groups; the cache starts over when full

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self._rank = {key: i for i, key in enumerate(table)}
        self._prefixes = {key[:j] for key in table for j in range(1, len(key) + 1)}
        self._max_len = max(map(len, table), default=0)
        tags = set(table.values())
        tag_chars = set("".join(tags))
        self._sequential = any(_overlaps_tag(key, tags) for key in table if tag_chars.intersection(key))
        # The earliest key (file order) among the keys that are prefixes of each key.
        first: dict[str, str | None] = {}
        for word in sorted(self._prefixes, key=len):
            best = first.get(word[:-1]) if len(word) > 1 else None
            if word in self._rank and (best is None or self._rank[word] < self._rank[best]):
                best = word
            first[word] = best
        self._first = {key: first[key] for key in table}
        # Where a key may start: a one-character key, or a first character followed by a second one.
        singles = {key for key in table if len(key) == 1}
        firsts = {key[0] for key in table if len(key) > 1} - singles
        seconds = {key[1] for key in table if len(key) > 1}
        alternatives = [_char_class(singles)] if singles else []
        if firsts:
            alternatives.append(f"{_char_class(firsts)}(?={_char_class(seconds)})")
        self._starts = re.compile("|".join(alternatives)).finditer if alternatives else None
        self._groups: dict[str, tuple[tuple[int, int, str], ...]] = {}

    def replace(self, text: str) -> str:
        """``text`` with every emoji replaced by its tag, as the reference replaces them."""
        if self._sequential:
            for key, tag in self.table.items():
                if key in text:
                    text = text.replace(key, tag)
            return text
        edits = self.edits(text)
        if not edits:
            return text
        parts, pos = [], 0
        for start, end, tag in edits:
            parts.append(text[pos:start])
            parts.append(tag)
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def replace_traced(self, traced: _Traced) -> None:
        """:meth:`replace` on a traced text, so that each tag keeps the span it came from."""
        if self._sequential:
            for key, tag in self.table.items():
                if key in traced.text:
                    traced.replace(key, tag)
            return
        edits = self.edits(traced.text)
        traced.apply([(start, end) for start, end, _ in edits], [tag for _, _, tag in edits])

    def edits(self, text: str) -> list[tuple[int, int, str]]:
        """The (start, end, tag) replacements in ``text``, in order (only without ``_sequential``)."""
        if self._starts is None:
            return []
        edits: list[tuple[int, int, str]] = []
        group_start = group_end = -1  # the group of overlapping occurrences being read
        longest = ""  # the longest key at group_start while the group has one start position
        for m in self._starts(text):
            p = m.start()
            key = self._longest_at(text, p)
            if not key:
                continue
            if p < group_end:  # overlaps the group: it has several start positions
                longest = ""
                group_end = max(group_end, p + len(key))
                continue
            self._close(text, group_start, group_end, longest, edits)
            group_start, group_end, longest = p, p + len(key), key
        self._close(text, group_start, group_end, longest, edits)
        return edits

    def _longest_at(self, text: str, p: int) -> str:
        prefixes, rank = self._prefixes, self._rank
        longest = ""
        for end in range(p + 1, min(p + self._max_len, len(text)) + 1):
            word = text[p:end]
            if word not in prefixes:
                break
            if word in rank:
                longest = word
        return longest

    def _close(self, text: str, start: int, end: int, longest: str, edits: list) -> None:
        """Add the replacements of the group text[start:end] to ``edits``."""
        if start < 0:
            return
        if longest:  # one start position: the earliest of its keys takes it, the others overlap it
            first = self._first[longest]
            edits.append((start, start + len(first), self.table[first]))
            return
        group = text[start:end]
        resolved = self._groups.get(group)
        if resolved is None:
            if len(self._groups) >= self._CACHE_LIMIT:
                self._groups.clear()
            resolved = self._groups[group] = self._resolve(group)
        edits.extend((start + s, start + e, tag) for s, e, tag in resolved)

    def _resolve(self, group: str) -> tuple[tuple[int, int, str], ...]:
        """The replacements within a group of overlapping occurrences, taken in (file order,
        start) order when none of their characters is taken yet."""
        occurrences = []
        for p in range(len(group)):
            key = self._longest_at(group, p)
            while key:
                if key in self._rank:
                    occurrences.append((self._rank[key], p, len(key)))
                key = key[:-1]
        taken = bytearray(len(group))
        chosen = []
        for _, p, n in sorted(occurrences):
            if taken.find(1, p, p + n) < 0:
                taken[p : p + n] = b"\x01" * n
                chosen.append((p, p + n, self.table[group[p : p + n]]))
        return tuple(sorted(chosen))


class BatchEncoding(dict):
    """The result of calling the tokenizer: a dict (``input_ids``, ``attention_mask``, ...).

    Keys are also attributes, and :meth:`to` moves tensors to a device, like transformers'.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor value to ``device`` (in place); returns self."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


class GPTNeoXJapaneseTokenizer:
    """Tokenizer of abeja/gpt-neox-japanese-2.7b; ids identical to transformers' tokenizer.

    Args:
        vocab_file: ``vocab.txt`` (one id per line, comma-separated spelling variants).
        emoji_file: ``emoji.json`` (emoji -> group tag, tag -> representative emoji).
        unk_token, pad_token, bos_token, eos_token: special tokens (the seed's defaults).
        do_clean_text: replace URLs, e-mails, phone numbers, dates, prices and box drawing by tags.
        model_max_length: length used by ``truncation=True``/``padding="max_length"`` without
            ``max_length``.
        padding_side: ``"right"`` or ``"left"``.
    """

    vocab_files_names = VOCAB_FILES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        emoji_file: str | os.PathLike,
        unk_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        do_clean_text: bool = False,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        **kwargs: Any,
    ) -> None:
        for name, path in (("vocab_file", vocab_file), ("emoji_file", emoji_file)):
            if not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {str(path)!r}")
        for side_name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{side_name} must be 'left' or 'right', got {side!r}")
        self.vocab_file = str(vocab_file)
        self.emoji_file = str(emoji_file)
        self._lines = load_vocab(vocab_file)
        self.emoji = load_emoji(emoji_file)
        self.do_clean_text = bool(do_clean_text)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.unk_token, self.pad_token, self.bos_token, self.eos_token = (
            unk_token,
            pad_token,
            bos_token,
            eos_token,
        )
        self.init_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}

        # word -> id, for encoding; a word listed twice keeps its last id, as in the reference.
        # Built with one split of the whole file and C-level dict(zip()) to keep loading fast.
        lines = self._lines
        words = ",".join(lines).split(",")
        counts = [line.count(",") + 1 for line in lines]
        vocab = dict(zip(words, chain.from_iterable(map(repeat, range(len(lines)), counts)), strict=True))
        # The reference reads the comma line as two empty variants, so "," itself is never matched
        # (it becomes byte 44); only an unterminated last line "," is the comma word.
        vocab.pop("", None)
        if lines[-1] == "," and not _ends_with_newline(vocab_file):
            vocab[","] = len(lines) - 1
        self.vocab = vocab
        self._lt_words = {w for w in _LT_WORD_RE.findall("\n".join(lines)) if w in vocab}
        # The vocabulary line -> id: get_vocab() and vocab_size, as the reference counts them.
        self.raw_vocab = dict(zip(lines, range(len(lines)), strict=True))
        self._build_special_tokens()
        self._build_tables()

    # ------------------------------------------------------------------ construction helpers

    def _build_special_tokens(self) -> None:
        """Special tokens are matched in the text before anything else; unknown ones get new ids."""
        self.added_tokens_encoder: dict[str, int] = {}
        next_id = len(self._lines)
        for token in dict.fromkeys((self.bos_token, self.eos_token, self.unk_token, self.pad_token)):
            if token is None:
                continue
            if token in self.vocab:
                self.added_tokens_encoder[token] = self.vocab[token]
            else:
                self.added_tokens_encoder[token] = next_id
                next_id += 1
        self.added_tokens_decoder = {i: t for t, i in self.added_tokens_encoder.items()}
        ordered = sorted(self.added_tokens_encoder, key=len, reverse=True)
        self._special_split_re = (
            re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        )

    def _build_tables(self) -> None:
        vocab = self.vocab
        # Words that win outright at "<": every vocabulary word of 3+ characters starting with "<".
        self._lt_match = re.compile(_trie_regex(self._lt_words)).match if self._lt_words else None
        self._window_cache: dict[str, tuple] = {}
        self._lt_cache: dict[str, tuple] = {}  # windows starting with "<" where no long word matched
        self._chunk_cache = _ChunkCache(self._segment)
        unk_id = vocab.get(self.unk_token, 0)
        self._kigou_id = vocab.get("<KIGOU>", unk_id)
        self._u2000_id = vocab.get("<U2000U2BFF>", unk_id)
        self._byte_ids = [vocab.get(f"<|byte{b}|>", unk_id) for b in range(256)]
        self._unk_id = unk_id  # (0 when there is no unk token, as unknown tokens need some id)
        # Step 3 in C when the extension is built (NEOXJA_PURE_PYTHON=1 forces the Python path).
        self._segmenter = None
        if _compiled is not None and os.environ.get("NEOXJA_PURE_PYTHON", "0") in ("", "0"):
            self._segmenter = _compiled.Segmenter(vocab, self._kigou_id, self._u2000_id, self._byte_ids)
        self._segment_text = self._segmenter.segment if self._segmenter is not None else self._segment_chunks

        self._special_ids = frozenset(self.added_tokens_decoder)

        self._emoji = _EmojiReplacer(self.emoji["emoji"])

    @cached_property
    def _chunk_findall(self) -> Any:
        """Cuts rewritten text into chunks (pure-Python path only; built on first use)."""
        return re.compile(_chunk_pattern(self._lines)).findall

    @cached_property
    def _decoding(self) -> tuple[list[str | None], list[int]]:
        """Decoding tables, built on first use: each id's text (its first spelling, a tag's
        character, a special token's content) or, for byte tokens, its byte value."""
        emoji_inv = self.emoji["emoji_inv"]
        lines = self._lines
        n = max(len(lines), max(self.added_tokens_decoder, default=-1) + 1)
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
                    id_text[idx] = _TAG_TEXT.get(word, emoji_inv.get(word, word))
        for idx, token in self.added_tokens_decoder.items():
            id_text[idx] = token
            id_byte[idx] = -1
        return id_text, id_byte

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> GPTNeoXJapaneseTokenizer:
        """Load from a model directory or a Hub id (``vocab.txt``, ``emoji.json``, optional configs).

        Hub options (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``)
        go to :func:`neoxja.hub.resolve_file`; other keyword arguments override the saved config.
        """
        from .hub import HubOptions, resolve_file

        options = HubOptions.pop_from(kwargs)
        files = {}
        for arg, filename in VOCAB_FILES.items():
            path = resolve_file(name_or_path, filename, options)
            if path is None:
                raise OSError(f"{str(name_or_path)!r} has no {filename} (needed by the tokenizer)")
            files[arg] = path
        config: dict[str, Any] = {}
        for filename in ("special_tokens_map.json", "tokenizer_config.json"):
            path = resolve_file(name_or_path, filename, options)
            if path is not None:
                config.update(read_json_object(path))
        init = {}
        for key in ("unk_token", "pad_token", "bos_token", "eos_token"):
            value = config.get(key)
            if isinstance(value, dict):  # AddedToken written as {"content": ...}
                value = value.get("content")
            if isinstance(value, str) or (key in config and value is None):
                init[key] = value
        for key, kind in (("do_clean_text", bool), ("model_max_length", int), ("padding_side", str)):
            if isinstance(config.get(key), kind):
                init[key] = config[key]
        init.update(kwargs)
        return cls(files["vocab_file"], files["emoji_file"], **init)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write vocab.txt, emoji.json, tokenizer_config.json and special_tokens_map.json.

        transformers' ``GPTNeoXJapaneseTokenizer.from_pretrained`` loads the result.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        path = directory / "vocab.txt"
        path.write_text("\n".join(self._lines) + "\n", encoding="utf-8")
        written.append(path)
        path = directory / "emoji.json"
        path.write_text(json.dumps(self.emoji, ensure_ascii=False), encoding="utf-8")
        written.append(path)
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        config = {
            "tokenizer_class": "GPTNeoXJapaneseTokenizer",
            **special,
            "do_clean_text": self.do_clean_text,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
        }
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            path = directory / name
            path.write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            written.append(path)
        return tuple(str(p) for p in written)

    # ------------------------------------------------------------------ vocabulary

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

    @property
    def unk_token_id(self) -> int | None:
        return self.added_tokens_encoder.get(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.added_tokens_encoder.get(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.added_tokens_encoder.get(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.added_tokens_encoder.get(self.eos_token)

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
            for i in map(self._check_id, _as_id_list(ids))
            if not (skip_special_tokens and i in self._special_ids)
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
        try:
            value = int(idx)
        except (TypeError, ValueError):
            raise TypeError(f"token ids must be integers, got {type(idx).__name__} {idx!r}") from None
        id_text, id_byte = self._decoding
        if not 0 <= value < len(id_text) or (id_text[value] is None and id_byte[value] < 0):
            raise ValueError(f"token id {value} is outside the vocabulary (0..{len(self._lines) - 1})")
        return value

    # ------------------------------------------------------------------ encoding

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings exactly as the reference's ``tokenize`` gives them."""
        tokens: list[str] = []
        for piece, is_special in self._split_special(_check_text(text)):
            if is_special:
                tokens.append(piece)
            else:
                tokens.extend(t for t, _ in self._pieces(self._rewrite(piece)))
        return tokens

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | Any:
        """Text -> ids (no BOS/EOS is added, as in the reference); ``return_tensors="pt"`` -> (1, n)."""
        ids = self._encode(_check_text(text))
        if _wants_truncation(truncation, max_length, padding=False):
            ids = self._truncate(ids, max_length)
        if return_tensors is not None:
            return _to_tensor([ids], return_tensors)
        return ids

    def _encode(self, text: str) -> list[int]:
        if self._special_split_re is None or "<" not in text:
            return self._segment_text(self._rewrite(text))
        ids: list[int] = []
        for piece, is_special in self._split_special(text):
            if is_special:
                ids.append(self.added_tokens_encoder[piece])
            else:
                ids.extend(self._segment_text(self._rewrite(piece)))
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        if self._special_split_re is None:
            return [(text, False)]
        parts = self._special_split_re.split(text)
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def _rewrite(self, text: str) -> str:
        """Step 2: the fixed rewrites, emoji tags and (with do_clean_text) the clean-up tags."""
        for old, new in _FIXED_REWRITES:
            text = text.replace(old, new)
        text = self._emoji.replace(text)
        if self.do_clean_text:
            text = clean_text(text)
        return text

    def _decide(self, window: str) -> tuple:
        """The choice at the start of ``window`` (its next 1..3 characters): (id, length) or
        (fallback ids, 0). Among vocabulary words the smallest id wins; on a tie the longer."""
        vocab = self.vocab
        best_id, best_len = None, 0
        for length in range(len(window), 0, -1):
            idx = vocab.get(window[:length])
            if idx is not None and (best_id is None or idx < best_id):
                best_id, best_len = idx, length
        if best_id is not None:
            return best_id, best_len
        ch = window[0]
        cp = ord(ch)
        if _is_kigou(cp):
            return (self._kigou_id,), 0
        if _U2000_RANGE[0] <= cp <= _U2000_RANGE[1]:
            return (self._u2000_id,), 0
        return tuple(self._byte_ids[b] for b in _char_bytes(ch)), 0

    def _segment_chunks(self, text: str) -> list[int]:
        """Step 3 on rewritten text -> ids without the C extension, chunk by chunk (see
        :func:`_chunk_pattern`); each distinct chunk is segmented once and then served from a cache."""
        # reduce(iadd) extends one list by each chunk's tuple: C-level, faster than chain().
        return reduce(iadd, map(self._chunk_cache.__getitem__, self._chunk_findall(text)), [])

    def _segment(self, text: str) -> tuple[int, ...]:
        """Step 3 on rewritten text -> ids. The hot loop: one cached decision per token."""
        ids: list[int] = []
        append, extend = ids.append, ids.extend
        cache = self._window_cache
        if len(cache) > 200_000:  # bound memory on huge, varied inputs
            cache.clear()
            self._lt_cache.clear()
        get = cache.get
        lt_match, lt_cache = self._lt_match, self._lt_cache
        vocab = self.vocab
        pos, n = 0, len(text)
        while pos < n:
            window = text[pos : pos + 3]
            hit = get(window)
            if hit is None:
                if window[0] == "<":
                    m = lt_match(text, pos) if lt_match is not None else None
                    if m is not None:
                        append(vocab[m.group()])
                        pos = m.end()
                        continue
                    # No long word here, so the 3-character window decides: cache it apart.
                    hit = lt_cache.get(window) or lt_cache.setdefault(window, self._decide(window))
                else:
                    hit = cache[window] = self._decide(window)
            tid, length = hit
            if length:
                append(tid)
                pos += length
            else:
                extend(tid)
                pos += 1
        return tuple(ids)

    def _pieces(self, text: str) -> list[tuple[str, int]]:
        """Step 3 as the reference's token strings, each with how many characters of ``text`` it
        covers (0 for the 2nd, 3rd, ... byte token of one character)."""
        pieces: list[tuple[str, int]] = []
        pos, n = 0, len(text)
        while pos < n:
            m = self._lt_match(text, pos) if text[pos] == "<" and self._lt_match is not None else None
            if m is not None:
                pieces.append((m.group(), m.end() - pos))
                pos = m.end()
                continue
            _, length = self._decide(text[pos : pos + 3])
            if length:
                pieces.append((text[pos : pos + length], length))
                pos += length
            else:
                tokens = self._fallback_tokens(text[pos])
                pieces.append((tokens[0], 1))
                pieces.extend((t, 0) for t in tokens[1:])
                pos += 1
        return pieces

    def _fallback_tokens(self, ch: str) -> list[str]:
        cp = ord(ch)
        if _is_kigou(cp):
            return ["<KIGOU>"]
        if _U2000_RANGE[0] <= cp <= _U2000_RANGE[1]:
            return ["<U2000U2BFF>"]
        return [f"<|byte{b}|>" for b in _char_bytes(ch)]

    def _truncate(self, ids: list[int], max_length: int | None) -> list[int]:
        limit = self.model_max_length if max_length is None else max_length
        if limit < 0:
            name = "model_max_length" if max_length is None else "max_length"
            raise ValueError(f"truncation needs a non-negative {name}, got {limit}")
        if len(ids) <= limit:
            return ids
        return ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit :]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        num_workers: int = 1,
    ) -> BatchEncoding:
        """Encode one text or a batch: ``input_ids`` and ``attention_mask`` (+ offsets, length).

        ``padding``: False, True/"longest" (to the longest in the batch) or "max_length";
        ``truncation=True`` cuts to ``max_length`` (default ``model_max_length``);
        ``return_tensors="pt"`` gives torch tensors (a batch must then be rectangular);
        ``return_offsets_mapping`` adds (start, end) character spans of every token in the
        original text; ``num_workers > 1`` encodes a batch in that many processes.
        """
        single = isinstance(text, str)
        texts = [text] if single else _check_batch(text)
        if return_offsets_mapping:
            encoded = [self.encode_with_offsets(t) for t in texts]
            all_ids = [ids for ids, _ in encoded]
            all_offsets = [offs for _, offs in encoded]
        else:
            all_ids = self.encode_batch(texts, num_workers=num_workers)
            all_offsets = None
        if _wants_truncation(truncation, max_length, padding):
            all_ids = [self._truncate(ids, max_length) for ids in all_ids]
            if all_offsets is not None:
                all_offsets = [
                    self._truncate(offs, max_length)
                    for offs in all_offsets  # type: ignore[arg-type]
                ]
        masks = [[1] * len(ids) for ids in all_ids]
        target = self._pad_target(all_ids, padding, max_length, pad_to_multiple_of)
        if target is not None:
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("padding needs a pad token: this tokenizer was created with pad_token=None")
            all_ids = [_pad(ids, target, pad_id, side) for ids in all_ids]
            masks = [_pad(mask, target, 0, side) for mask in masks]
            if all_offsets is not None:
                all_offsets = [_pad(offs, target, (0, 0), side) for offs in all_offsets]
        result = BatchEncoding()
        result["input_ids"] = all_ids
        if return_attention_mask:
            result["attention_mask"] = masks
        if all_offsets is not None:
            result["offset_mapping"] = all_offsets
        if return_length:
            result["length"] = [sum(m) for m in masks]
        if single:
            for key in list(result):
                result[key] = result[key][0]
        if return_tensors is not None:
            for key in list(result):
                value = result[key]
                result[key] = _to_tensor([value] if single else value, return_tensors)
        return result

    def _pad_target(
        self, all_ids: list[list[int]], padding: bool | str, max_length: int | None, multiple: int | None
    ) -> int | None:
        if padding is False or padding == "do_not_pad":
            return None
        if padding is True or padding == "longest":
            target = max((len(ids) for ids in all_ids), default=0)
        elif padding == "max_length":
            target = self.model_max_length if max_length is None else max_length
            if target >= VERY_LARGE_INTEGER:
                raise ValueError("padding='max_length' needs max_length (or model_max_length in the config)")
            if target < 0:
                name = "model_max_length" if max_length is None else "max_length"
                raise ValueError(f"padding='max_length' needs a non-negative {name}, got {target}")
        else:
            raise ValueError(
                f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
            )
        if multiple:
            target = -(-target // multiple) * multiple
        return target

    def encode_batch(self, texts: Sequence[str], num_workers: int = 1) -> list[list[int]]:
        """Encode many texts; with ``num_workers > 1`` a large batch is split over that many processes.

        The batch is cut into ``num_workers`` consecutive runs; this process encodes the first
        while forked workers encode the others and send their ids back as packed int32 arrays.
        Forking costs a few milliseconds, so batches under ``_FORK_MIN_CHARS`` characters (and
        every batch where ``os.fork`` does not exist) are encoded here in one process.
        """
        texts = _check_batch(texts)
        total = sum(map(len, texts))
        if num_workers <= 1 or total < _FORK_MIN_CHARS or not hasattr(os, "fork") or len(texts) < 2:
            return [self._encode(t) for t in texts]
        import gc
        import multiprocessing as mp

        context = mp.get_context("fork")
        workers_needed = min(num_workers, len(texts)) - 1
        bounds = _balanced_cuts(texts, [_PARENT_SHARE] + [1.0] * workers_needed, total)
        workers = []
        # Freezing the GC while forking keeps the workers' collector from touching (and so
        # copying) every inherited object.
        gc.freeze()
        try:
            for a, b in zip(bounds[1:-1], bounds[2:], strict=True):
                receiver, sender = context.Pipe(duplex=False)
                worker = context.Process(target=self._encode_to_pipe, args=(texts, a, b, sender), daemon=True)
                worker.start()
                sender.close()
                workers.append((worker, receiver))
        finally:
            gc.unfreeze()
        try:
            result = [self._encode(t) for t in texts[: bounds[1]]]
            for worker, receiver in workers:
                try:
                    lengths, flat = receiver.recv_bytes(), receiver.recv_bytes()
                except EOFError:
                    worker.join()
                    code = worker.exitcode
                    raise RuntimeError(f"encode_batch: a worker process died (exit code {code})") from None
                result.extend(self._unpack(lengths, flat))
        finally:
            for worker, receiver in workers:
                receiver.close()
                worker.join()
        return result

    def _encode_to_pipe(self, texts: list[str], start: int, end: int, sender: Any) -> None:
        """Worker side of :meth:`encode_batch`: encode ``texts[start:end]``, send (lengths, ids)."""
        encoded = [self._encode(t) for t in texts[start:end]]
        if self._segmenter is not None:
            lengths, flat = _compiled.pack(encoded)
        else:
            lengths, flat = array("i", map(len, encoded)).tobytes(), array("i", chain(*encoded)).tobytes()
        sender.send_bytes(lengths)
        sender.send_bytes(flat)
        sender.close()

    def _unpack(self, lengths: bytes, flat: bytes) -> list[list[int]]:
        """The lists of ids a worker packed (the compiled path shares one int object per id)."""
        if self._segmenter is not None:
            return self._segmenter.unpack(lengths, flat)
        sizes, ids = array("i"), array("i")
        sizes.frombytes(lengths)
        ids.frombytes(flat)
        out, start = [], 0
        for size in sizes:
            out.append(ids[start : start + size].tolist())
            start += size
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_lt_match", "_emoji", "_special_split_re", "_decoding"):
            state.pop(key, None)
        state["_window_cache"] = {}
        for key in ("_chunk_cache", "_chunk_findall", "_segmenter", "_segment_text"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_special_tokens()
        self._build_tables()

    # ------------------------------------------------------------------ offsets

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus the (start, end) span of ``text`` each token came from.

        Spans tile the text in order: a character split into several byte tokens gives its span
        to the first of them and empty spans (end, end) to the rest.
        """
        text = _check_text(text)
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for piece, is_special in self._split_special(text):
            if is_special:
                ids.append(self.added_tokens_encoder[piece])
                spans.append((offset, offset + len(piece)))
            else:
                traced = _Traced(piece, offset)
                traced.sub(_FIXED_REWRITE_RE, lambda m: _FIXED_REWRITE_MAP[m.group()])
                self._emoji.replace_traced(traced)
                if self.do_clean_text:
                    for finder, tag in _clean_steps():
                        traced.apply(finder(traced.text), tag)
                pos = 0
                for token, width in self._pieces(traced.text):
                    ids.append(self._token_to_id(token))
                    if width:
                        spans.append(traced.span(pos, pos + width))
                        pos += width
                    else:
                        spans.append((spans[-1][1],) * 2)
            offset += len(piece)
        return ids, _tile(spans)

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids: int | Sequence[int] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Ids -> text. Byte tokens are joined across tokens before UTF-8 decoding, spaces are kept;
        ``decode(encode(x)) == normalize(x)``. An id outside the vocabulary raises ValueError.

        ``clean_up_tokenization_spaces=True`` removes the space before English punctuation and
        contractions, like transformers' option (off by default, as there)."""
        text = self._decode(token_ids, skip_special_tokens)
        if clean_up_tokenization_spaces:
            for old, new in _CLEAN_UP_SPACES:
                text = text.replace(old, new)
        return text

    def _decode(self, token_ids: int | Sequence[int] | Any, skip_special_tokens: bool) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else _as_id_list(token_ids)
        (id_text, id_byte), check = self._decoding, self._check_id
        skip = self._special_ids if skip_special_tokens else ()
        parts: list[str] = []
        pending = bytearray()
        for idx in ids:
            if type(idx) is not int or not 0 <= idx < len(id_text):
                idx = check(idx)
            if idx in skip:
                continue
            byte = id_byte[idx]
            if byte >= 0:
                pending.append(byte)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            piece = id_text[idx]
            if piece is None:
                check(idx)
            parts.append(piece)
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(
        self,
        sequences: Iterable[Sequence[int]] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """:meth:`decode` for each sequence of a batch (list of lists or a 2-D tensor)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def normalize(self, text: str) -> str:
        """What :meth:`decode` gives back for ``encode(text)``; see the module-level :func:`normalize`."""
        return normalize(text, self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, do_clean_text={self.do_clean_text}, "
            f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r})"
        )


def normalize(text: str, tokenizer: GPTNeoXJapaneseTokenizer) -> str:
    """The text ``tokenizer`` keeps of ``text``: ``tokenizer.decode(tokenizer.encode(text))``.

    Encoding is lossy on purpose, and only in these ways:

    - every spelling variant the segmentation picks becomes its id's first spelling
      (``慶應`` -> ``慶応``, full-width ``（`` -> ``(`` where the vocabulary lists them together);
    - every emoji of ``emoji.json`` becomes its group's representative (``🐯`` stays, ``🐱`` -> ``🐯``);
    - ``—`` and ``−`` become ``ー``; U+3000 becomes a space; CRLF and CR become LF;
    - characters without a vocabulary entry in U+00A1..U+00BF, U+01C0..U+01C3, U+02B9..U+0362 become
      ``ǀ`` and those in U+2000..U+2BFF become ``‖``; any other character survives through byte tokens
      (a lone surrogate, which has no UTF-8 form, becomes U+FFFD);
    - a tag written in the text reads as what it stands for (``<SP>`` -> space, ``<|emoji4|>`` -> ``🐯``);
    - with ``do_clean_text``: URLs, e-mails, phone numbers, dates and prices become ``<URL>``,
      ``<EMAIL>``, ``<TEL>``, ``<DATE>``, ``<PRICE>``, and runs of box drawing become ``▀``.
    """
    text = _check_text(text)
    out: list[str] = []
    pending = bytearray()  # byte tokens join across tokens, as in decode()
    id_text, id_byte = tokenizer._decoding
    for piece, is_special in tokenizer._split_special(text):
        if is_special:
            out.append(piece)
            continue
        rewritten = tokenizer._rewrite(piece)
        pos = 0
        for token, width in tokenizer._pieces(rewritten):
            if width == 0:
                continue
            idx = tokenizer.vocab.get(token)
            if idx is not None and rewritten.startswith(token, pos):
                byte = id_byte[idx]
                if byte >= 0:  # a byte token written in the text
                    pending.append(byte)
                else:  # a vocabulary word: its first spelling
                    _flush(pending, out)
                    out.append(id_text[idx])
            elif token in _TAG_TEXT:
                _flush(pending, out)
                out.append(_TAG_TEXT[token])
            else:  # a character outside the vocabulary survives through its bytes
                pending += _char_bytes(rewritten[pos])
            pos += width
        _flush(pending, out)
    return "".join(out)


def _flush(pending: bytearray, out: list[str]) -> None:
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
        pending.clear()


# ---------------------------------------------------------------------- do_clean_text


def clean_text(text: str) -> str:
    """The ``do_clean_text`` replacements, in the reference's order, in linear time."""
    for finder, tag in _clean_steps():
        spans = finder(text)
        if spans:
            text = _apply_spans(text, spans, tag)
    return text


def _clean_steps() -> tuple:
    return (
        (_find_urls, "<URL>"),
        (_find_emails, "<EMAIL>"),
        (_find_tels, "<TEL>"),
        (_find_dates, "<DATE>"),
        (_find_era_dates, "<DATE>"),
        (_find_prices, "<PRICE>"),
        (_find_blocks, "<BLOCK>"),
    )


def _apply_spans(text: str, spans: list[tuple[int, int]], tag: str) -> str:
    parts, pos = [], 0
    for start, end in spans:
        parts.append(text[pos:start])
        parts.append(tag)
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _find_urls(text: str) -> list[tuple[int, int]]:
    if "://" not in text:
        return []
    return [m.span() for m in _URL_RE.finditer(text)]


def _find_tels(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _TEL_RE.finditer(text)]


def _find_era_dates(text: str) -> list[tuple[int, int]]:
    if "年" not in text:
        return []
    return [m.span() for m in _ERA_DATE_RE.finditer(text)]


def _find_blocks(text: str) -> list[tuple[int, int]]:
    # Each box-drawing or block character becomes <BLOCK>, then every run of <BLOCK> (literal ones
    # in the text included) becomes a single one: the replaced spans are those maximal runs.
    marks = []
    if text.translate(_BLOCK_TABLE) != text:
        marks = [(i, i + 1) for i, ch in enumerate(text) if ch in _BLOCK_CHARS]
    if not marks and "<BLOCK><BLOCK>" not in text:
        return []
    marks.extend(m.span() for m in re.finditer("<BLOCK>", text))
    marks.sort()
    runs: list[list[int]] = []
    for start, end in marks:
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(s, e) for s, e in runs]


def _find_emails(text: str) -> list[tuple[int, int]]:
    # A match is a run of local-part characters ending at an "@" that starts a domain; it starts
    # at the run's beginning, or where the previous match ended if that is later.
    if "@" not in text:
        return []
    run_start = {m.end(): m.start() for m in _EMAIL_LOCAL_RUN_RE.finditer(text)}
    spans, pos = [], 0
    for m in _EMAIL_DOMAIN_RE.finditer(text):
        at = m.start()
        spans.append((max(pos, run_start.get(at, at)), m.end()))
        pos = m.end()
    return spans


def _find_dates(text: str) -> list[tuple[int, int]]:
    # A date starts at a month ("1/", "12月") or at a chain of year units ("2020/", "1999年") that
    # is followed by one. Which positions succeed is decided once per position (memoised), then
    # the pattern is matched only where it is known to succeed.
    months = {m.start() for m in _MONTH_SEP_AT.finditer(text)}
    if not months:
        return []
    years = {m.start() for m in _YEAR_UNIT_AT.finditer(text)}
    known: dict[int, bool] = {}

    def succeeds(p: int) -> bool:
        path = []
        while True:
            if p in known:
                result = known[p]
                break
            if p in months:
                result = True
                break
            if p in years:
                path.append(p)
                p += 5
                continue
            result = False
            break
        for q in path:
            known[q] = result
        return result

    spans, pos = [], 0
    for p in sorted(months | years):
        if p < pos or not succeeds(p):
            continue
        m = _DATE_RE.match(text, p)
        if m is None:
            continue
        spans.append(m.span())
        pos = m.end()
    return spans


def _find_prices(text: str) -> list[tuple[int, int]]:
    # A price match is the number part (three possessive phases over [\d,億万千]) ending exactly
    # where a unit starts. Where each start's number part ends is memoised per (phase, position).
    if "円" not in text and "ドル" not in text and "ユーロ" not in text:
        return []
    units = {m.start() for m in _PRICE_UNIT_AT.finditer(text)}
    if not units:
        return []
    n = len(text)
    ends: dict[int, int] = {}  # 3 * position + phase -> where the number part ends

    def number_end(p: int) -> int:
        path = []
        phase, x = 0, p
        while True:
            state = 3 * x + phase
            if state in ends:
                result = ends[state]
                break
            path.append(state)
            if x < n and text[x].isdecimal():
                if x + 4 < n and text[x + 1] == "," and text[x + 2 : x + 5].isdecimal():
                    x += 5
                else:
                    x += 1
            elif x < n and text[x] == _PRICE_PHASE_CHARS[phase]:
                x += 1
            elif phase < 2:
                phase += 1
            else:
                result = x
                break
        for state in path:
            ends[state] = result
        return result

    # A start that succeeds is a unit itself or lies in a run of number characters that reaches
    # (or contains) a unit.
    unit_list = sorted(units)
    segments = [(u, u + 1) for u in unit_list]
    for m in _PRICE_RUN_RE.finditer(text):
        start, end = m.span()
        k = bisect_left(unit_list, start)
        if k < len(unit_list) and unit_list[k] <= end:
            segments.append((start, end))
    segments.sort()
    spans, pos = [], 0
    for start, end in segments:
        for p in range(max(start, pos), end):
            if p < pos or number_end(p) not in units:
                continue  # (p < pos: inside the match just found)
            m = _PRICE_RE.match(text, p)
            if m is None:
                continue
            spans.append(m.span())
            pos = m.end()
    return spans


# ---------------------------------------------------------------------- helpers


class _Traced:
    """A string being rewritten that remembers, for each character, the original span it came from."""

    def __init__(self, text: str, offset: int) -> None:
        self.text = text
        self.spans = [(offset + i, offset + i + 1) for i in range(len(text))]

    def apply(self, edits: list[tuple[int, int]], repl: str | list[str]) -> None:
        if not edits:
            return
        text, spans = self.text, self.spans
        new_text, new_spans, pos = [], [], 0
        for k, (start, end) in enumerate(edits):
            new_text.append(text[pos:start])
            new_spans.extend(spans[pos:start])
            piece = repl if isinstance(repl, str) else repl[k]
            source = (spans[start][0], spans[end - 1][1]) if end > start else (spans[start][0],) * 2
            new_text.append(piece)
            new_spans.extend([source] * len(piece))
            pos = end
        new_text.append(text[pos:])
        new_spans.extend(spans[pos:])
        self.text, self.spans = "".join(new_text), new_spans

    def sub(self, pattern: re.Pattern, repl: Any) -> None:
        matches = list(pattern.finditer(self.text))
        self.apply([m.span() for m in matches], [repl(m) for m in matches])

    def replace(self, old: str, new: str) -> None:
        edits, pos = [], self.text.find(old)
        while pos >= 0:
            edits.append((pos, pos + len(old)))
            pos = self.text.find(old, pos + len(old))
        self.apply(edits, new)

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self.spans[start][0], self.spans[end - 1][1]


def _tile(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Make consecutive spans non-overlapping: a token whose source was already covered by the
    previous one (several tokens from one rewritten piece) gets an empty span."""
    tiled, covered = [], 0
    for start, end in spans:
        start = max(start, covered)
        end = max(end, start)
        tiled.append((start, end))
        covered = end
    return tiled


def _overlaps_tag(key: str, tags: set[str]) -> bool:
    """Whether an emoji key could match text that overlaps an inserted tag like ``<|emoji1|>``."""
    for tag in tags:
        if key in tag or tag in key:
            return True
        for i in range(1, min(len(key), len(tag))):
            if key[:i] == tag[-i:] or key[-i:] == tag[:i]:
                return True
    return False


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


def _check_batch(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def _as_id_list(ids: Any) -> list:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"token ids must be integers, got {type(ids).__name__}")
    return list(ids)


def _wants_truncation(truncation: bool | str | None, max_length: int | None, padding: bool | str) -> bool:
    """transformers' rule: truncate when asked, or when only ``max_length`` is given."""
    if truncation is None:
        return max_length is not None and padding in (False, "do_not_pad")
    if truncation in (True, "longest_first", "only_first"):
        return True
    if truncation in (False, "do_not_truncate"):
        return False
    raise ValueError(f"truncation must be True, False, 'longest_first' or 'do_not_truncate': {truncation!r}")


def _pad(seq: list, target: int, value: Any, side: str) -> list:
    missing = target - len(seq)
    if missing <= 0:
        return seq
    return seq + [value] * missing if side == "right" else [value] * missing + seq


def _to_tensor(rows: list, kind: str) -> Any:
    if kind != "pt":
        raise ValueError(f"return_tensors must be 'pt' or None, got {kind!r}")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make a tensor of sequences of different lengths {sorted(lengths)}: pass padding=True"
        )
    import torch

    return torch.tensor(rows, dtype=torch.long)


# encode_batch forks workers only for batches at least this long (characters): below it, starting
# a process costs more than it saves.
_FORK_MIN_CHARS = 100_000
# The calling process also unpacks every worker's ids (about a fifth of what encoding them cost),
# so it takes a smaller run than each worker.
_PARENT_SHARE = 0.8


def _balanced_cuts(texts: list[str], weights: Sequence[float], total: int) -> list[int]:
    """Indices cutting ``texts`` into consecutive runs whose lengths are about proportional to
    ``weights``: ``cuts[k]:cuts[k + 1]`` is run k."""
    scale = total / sum(weights)
    goals = [scale * sum(weights[: k + 1]) for k in range(len(weights) - 1)]
    cuts, seen = [0], 0
    for i, text in enumerate(texts):
        if len(cuts) <= len(goals) and seen >= goals[len(cuts) - 1]:
            cuts.append(i)
        seen += len(text)
    while len(cuts) <= len(goals):  # (only when a few texts hold everything)
        cuts.append(len(texts))
    return cuts + [len(texts)]

