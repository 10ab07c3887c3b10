"""Step 3 of the encoder, segmentation: rewritten text -> tokens, left to right.

At ``<`` the longest vocabulary word of 3+ characters wins. Anywhere else the candidates are the
vocabulary words among the next 1, 2 and 3 characters and the one with the *smallest id* wins
(ties: the longer) -- not the longest match. A character with no candidate becomes ``<KIGOU>``
(some Latin-1/IPA symbols and combining marks), ``<U2000U2BFF>`` (U+2000..U+2BFF) or one byte token
per UTF-8 byte.

The ids come from the C extension ``neoxja._segment`` when it is built (in CPython every token of
a per-position loop costs about a microsecond, 20x too much); :class:`PythonSegmenter` is the same
rule in Python: the fallback without the extension (no compiler at install time, or
``NEOXJA_PURE_PYTHON=1``), and the source of token strings and character widths (``tokenize``,
offsets, ``normalize``) on both paths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

try:
    from neoxja import _segment as _compiled
except ImportError:  # built without a C compiler: the pure-Python segmentation is used
    _compiled = None

# Code-point ranges that fall back to <KIGOU> (their UTF-8 forms are C2A1-C2BF, C780-C783,
# CAB9-CBBF and CC80-CDA2 in the original encoder) and to <U2000U2BFF>.
_KIGOU_RANGES = ((0x00A1, 0x00BF), (0x01C0, 0x01C3), (0x02B9, 0x02FF), (0x0300, 0x0362))
_U2000_RANGE = (0x2000, 0x2BFF)

# A piece of segmented text: (id, token string, characters of the text it covers). The 2nd, 3rd,
# ... byte token of one character covers none.
Piece = tuple[int, str, int]


def char_bytes(ch: str) -> bytes:
    """UTF-8 bytes of one character; a lone surrogate (not encodable) stands for U+FFFD."""
    try:
        return ch.encode("utf-8")
    except UnicodeEncodeError:
        return "\ufffd".encode()


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


def compiled_segmenter(vocab: dict[str, int], kigou_id: int, u2000_id: int, byte_ids: list[int]) -> Any:
    """The C segmenter for this vocabulary, or None (not built, or ``NEOXJA_PURE_PYTHON=1``)."""
    if _compiled is None or os.environ.get("NEOXJA_PURE_PYTHON", "0") not in ("", "0"):
        return None
    return _compiled.Segmenter(vocab, kigou_id, u2000_id, byte_ids)


class PythonSegmenter:
    """Step 3 in Python, with the C segmenter's ids. Each decision made away from ``<`` depends
    only on the next three characters, so it is cached per 3-character window (the cache is
    bounded and starts over when full)."""

    _CACHE_LIMIT = 200_000

    def __init__(
        self,
        vocab: dict[str, int],
        lt_words: Iterable[str],
        kigou_id: int,
        u2000_id: int,
        byte_ids: list[int],
    ) -> None:
        self._vocab = vocab
        words = list(lt_words)
        self._lt_match = re.compile(_trie_regex(words)).match if words else None
        self._kigou_id, self._u2000_id, self._byte_ids = kigou_id, u2000_id, byte_ids
        self._windows: dict[str, tuple[tuple[Piece, ...], int]] = {}

    def segment(self, text: str) -> list[int]:
        """Rewritten text -> ids (what ``neoxja._segment.Segmenter.segment`` returns)."""
        return [piece[0] for piece in self.pieces(text)]

    def pieces(self, text: str) -> list[Piece]:
        """Rewritten text -> its pieces (id, token string, width), in order."""
        out: list[Piece] = []
        append, extend = out.append, out.extend
        windows, vocab, lt_match = self._windows, self._vocab, self._lt_match
        if len(windows) > self._CACHE_LIMIT:
            windows.clear()
        pos, n = 0, len(text)
        while pos < n:
            if lt_match is not None and text[pos] == "<":
                m = lt_match(text, pos)
                if m is not None:
                    word = m.group()
                    append((vocab[word], word, len(word)))
                    pos = m.end()
                    continue
            window = text[pos : pos + 3]
            decided = windows.get(window)
            if decided is None:
                decided = windows[window] = self._decide(window)
            extend(decided[0])
            pos += decided[1]
        return out

    def _decide(self, window: str) -> tuple[tuple[Piece, ...], int]:
        """The pieces at the start of ``window`` (its next 1..3 characters) and how far they go.
        Among vocabulary words the smallest id wins; on a tie the longer."""
        vocab = self._vocab
        best_id, best_len = None, 0
        for length in range(len(window), 0, -1):
            idx = vocab.get(window[:length])
            if idx is not None and (best_id is None or idx < best_id):
                best_id, best_len = idx, length
        if best_id is not None:
            return ((best_id, window[:best_len], best_len),), best_len
        cp = ord(window[0])
        if any(lo <= cp <= hi for lo, hi in _KIGOU_RANGES):
            return ((self._kigou_id, "<KIGOU>", 1),), 1
        if _U2000_RANGE[0] <= cp <= _U2000_RANGE[1]:
            return ((self._u2000_id, "<U2000U2BFF>", 1),), 1
        data = char_bytes(window[0])
        return tuple((self._byte_ids[b], f"<|byte{b}|>", int(k == 0)) for k, b in enumerate(data)), 1
