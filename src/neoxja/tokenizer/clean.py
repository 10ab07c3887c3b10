"""``do_clean_text``: URLs, e-mail addresses, phone numbers, dates, prices and box drawing become
tags, found by linear-time scanners (the reference's regular expressions backtrack quadratically
on long digit runs); and :class:`Traced`, a text being rewritten that keeps each character's
original span (for offsets)."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

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


def clean_text(text: str) -> str:
    """The ``do_clean_text`` replacements, in the reference's order, in linear time."""
    for finder, tag in clean_steps():
        spans = finder(text)
        if spans:
            text = splice(text, spans, tag)
    return text


def clean_steps() -> tuple:
    """(scanner, tag) in the reference's order: each scanner gives the spans its tag replaces."""
    return (
        (_find_urls, "<URL>"),
        (_find_emails, "<EMAIL>"),
        (_find_tels, "<TEL>"),
        (_find_dates, "<DATE>"),
        (_find_era_dates, "<DATE>"),
        (_find_prices, "<PRICE>"),
        (_find_blocks, "<BLOCK>"),
    )


def splice(text: str, spans: list[tuple[int, int]], repl: str | list[str]) -> str:
    """``text`` with each (start, end) span, in order, replaced by ``repl`` (or ``repl[k]``)."""
    parts, pos = [], 0
    for k, (start, end) in enumerate(spans):
        parts.append(text[pos:start])
        parts.append(repl if isinstance(repl, str) else repl[k])
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

    return _matches(_DATE_RE, text, sorted(months | years), succeeds)


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
    starts = (p for start, end in segments for p in range(start, end))
    return _matches(_PRICE_RE, text, starts, lambda p: number_end(p) in units)


def _matches(
    pattern: re.Pattern, text: str, starts: Iterable[int], succeeds: Callable[[int], bool]
) -> list[tuple[int, int]]:
    """The spans of ``pattern`` matched at ``starts`` (in order) where ``succeeds`` says it can
    match, skipping the starts inside the previous match."""
    spans, pos = [], 0
    for p in starts:
        if p < pos or not succeeds(p):
            continue
        m = pattern.match(text, p)
        if m is None:
            continue
        spans.append(m.span())
        pos = m.end()
    return spans


class Traced:
    """A string being rewritten that remembers, for each character, the original span it came from."""

    def __init__(self, text: str, offset: int) -> None:
        self.text = text
        self.spans = [(offset + i, offset + i + 1) for i in range(len(text))]

    def apply(self, edits: list[tuple[int, int]], repl: str | list[str]) -> None:
        """Replace each (start, end) span, in order, by ``repl`` (or ``repl[k]``)."""
        if not edits:
            return
        spans = self.spans
        new_spans, pos = [], 0
        for k, (start, end) in enumerate(edits):
            new_spans.extend(spans[pos:start])
            piece = repl if isinstance(repl, str) else repl[k]
            source = (spans[start][0], spans[end - 1][1]) if end > start else (spans[start][0],) * 2
            new_spans.extend([source] * len(piece))
            pos = end
        new_spans.extend(spans[pos:])
        self.text, self.spans = splice(self.text, edits, repl), new_spans

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
