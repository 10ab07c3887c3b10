"""Step 2 of the encoder: the fixed rewrites (space, newlines, tab, dashes), emoji -> group tags,
and, with ``do_clean_text``, the clean-up tags; on plain text, or traced for offsets."""

from __future__ import annotations

import re
from collections.abc import Iterable

from neoxja.tokenizer.clean import Traced, clean_steps, clean_text, splice

# The fixed rewrites, in the reference's order (the order matters for CRLF).
FIXED_REWRITES = (
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
_FIXED_REWRITE_MAP = {"\r\n": "<BR>", **dict(FIXED_REWRITES)}


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


class EmojiReplacer:
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
        # Where a key may start: a one-character key, or a first character followed by a second
        # one. The pattern starts with one character class, so the regex engine skips quickly
        # over the characters outside it (most of a text).
        singles = {key for key in table if len(key) == 1}
        seconds = {key[1] for key in table if len(key) > 1}
        checks = [f"(?<={_char_class(singles)})"] if singles else []
        if seconds:
            checks.append(f"(?={_char_class(seconds)})")
        pattern = (
            re.compile(f"{_char_class(key[0] for key in table)}(?:{'|'.join(checks)})") if table else None
        )
        self._starts = pattern.finditer if pattern else None
        self._any_start = pattern.search if pattern else None
        self._groups: dict[str, tuple[tuple[int, int, str], ...]] = {}

    def replace(self, text: str) -> str:
        """``text`` with every emoji replaced by its tag, as the reference replaces them."""
        if self._sequential:
            for key, tag in self.table.items():
                if key in text:
                    text = text.replace(key, tag)
            return text
        if self._any_start is None or self._any_start(text) is None:
            return text
        edits = self.edits(text)
        return splice(text, [(start, end) for start, end, _ in edits], [tag for _, _, tag in edits])

    def replace_traced(self, traced: Traced) -> None:
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


def _overlaps_tag(key: str, tags: set[str]) -> bool:
    """Whether an emoji key could match text that overlaps an inserted tag like ``<|emoji1|>``."""
    for tag in tags:
        if key in tag or tag in key:
            return True
        for i in range(1, min(len(key), len(tag))):
            if key[:i] == tag[-i:] or key[-i:] == tag[:i]:
                return True
    return False


def rewrite(text: str, emoji: EmojiReplacer, do_clean_text: bool) -> str:
    """Step 2: the fixed rewrites, emoji tags and (with ``do_clean_text``) the clean-up tags."""
    for old, new in FIXED_REWRITES:
        text = text.replace(old, new)
    text = emoji.replace(text)
    if do_clean_text:
        text = clean_text(text)
    return text


def rewrite_traced(text: str, offset: int, emoji: EmojiReplacer, do_clean_text: bool) -> Traced:
    """:func:`rewrite` of ``text`` (found at ``offset`` of the caller's text), traced: the result
    knows which original span each of its characters came from."""
    traced = Traced(text, offset)
    traced.sub(_FIXED_REWRITE_RE, lambda m: _FIXED_REWRITE_MAP[m.group()])
    emoji.replace_traced(traced)
    if do_clean_text:
        for finder, tag in clean_steps():
            traced.apply(finder(traced.text), tag)
    return traced
