"""Where a long document may be cut so that its pieces, encoded one at a time, give exactly the ids
of the whole document: the rule that lets training data be tokenised in bounded memory.

A cut between two characters ``a`` and ``b`` of the original text is *safe* when nothing the
tokenizer does reaches across it. GPT-NeoX-Japanese's encoder works in four stages (see
:mod:`neoxja.tokenizer`), and in each one the work that could reach across the cut must contain the
two characters that meet there (after the earlier stages have rewritten them) next to each other:

1. special tokens are split out of the text: none may contain ``ab``;
2. the fixed rewrites map one character to a tag (space -> ``<SP>``), except CRLF: ``ab`` is not
   ``"\\r\\n"``; after them the cut lies between ``A[-1]`` and ``B[0]`` (A, B: the rewritten a, b);
3. emoji keys are replaced by tags (``<|emojiN|>``): no key may contain the pair meeting at the cut,
   and a character that belongs to some key may become a tag's first or last character, so those
   pairs are checked too; with ``do_clean_text``, URLs, e-mails, phone numbers, dates and prices
   are contiguous runs of the characters their patterns name (:data:`CLEAN_CHARS`), so no match
   reaches across a cut where one side is outside that set; box drawing merges runs of
   ``<BLOCK>``, so box characters and a literal ``<BLOCK>`` are checked on their own;
4. segmentation goes left to right, each token a vocabulary word (or one character's fallback):
   if no vocabulary word contains the pair meeting at the cut, no token crosses it, every decision
   before it reads the same candidates as in the left piece alone, and the right piece starts
   where the whole text's segmentation arrives.

The rule is conservative: it refuses some cuts that would be fine, never accepts one that is not
(tests check it against whole-document encoding on the corpus and on text built from the
characters each stage treats specially). Japanese prose has a safe cut every few characters.
"""

from __future__ import annotations

from typing import Any

from neoxja.tokenizer.rewrite import FIXED_REWRITES

# Every character a do_clean_text pattern (URL, e-mail, phone, date, era date, price) can match,
# besides decimal digits of any script (their \d): printable ASCII but "<" and ">", and the CJK
# literals of the date, era and price patterns.
CLEAN_CHARS = frozenset(
    [chr(c) for c in range(0x21, 0x7F) if chr(c) not in "<>"]
    + list("年月日時分火水木金土㈰㈪㈫㈬㈭㈮㈯明治大正昭和平成令和㍾㍽㍼㍻\u32ff千万億円ドルユーロ税込抜")
)
BOX_CHARS = frozenset(chr(c) for c in range(0x2500, 0x25A0))  # box drawing and block elements
_SINGLE_REWRITES = {old: new for old, new in FIXED_REWRITES if len(old) == 1}


def _pairs(words: Any) -> set[str]:
    """Every two adjacent characters of every word."""
    return {word[i : i + 2] for word in words for i in range(len(word) - 1)}


class CutRule:
    """The safe cuts of text for one GPT-NeoX-Japanese tokenizer (see the module's docstring).

    Built from the tokenizer's public tables: its vocabulary, emoji table, special tokens and
    ``do_clean_text``. ``safe(a, b)`` depends on the two characters alone and is cached.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._special = _pairs(tokenizer.added_tokens_encoder)
        emoji = tokenizer.emoji["emoji"]
        self._emoji_pairs = _pairs(emoji)
        self._emoji_chars = frozenset("".join(emoji))
        tags = set(emoji.values())
        self._tag_firsts = {tag[0] for tag in tags if tag}
        self._tag_lasts = {tag[-1] for tag in tags if tag}
        self._clean = bool(tokenizer.do_clean_text)
        self._vocab_pairs = _pairs(tokenizer.vocab)
        self._known: dict[str, bool] = {}

    def safe(self, a: str, b: str) -> bool:
        """Whether text may be cut between the characters ``a`` and ``b``."""
        pair = a + b
        known = self._known.get(pair)
        if known is None:
            known = self._known[pair] = self._decide(a, b)
        return known

    def first_cut(self, text: str, start: int) -> int:
        """The first safe cut ``p`` of ``text`` with ``start <= p < len(text)`` (``text[:p]`` and
        ``text[p:]`` encode to the ids of ``text``), or 0 when there is none."""
        known, safe = self._known, self.safe
        for p in range(max(start, 1), len(text)):
            ok = known.get(text[p - 1 : p + 1])
            if ok or (ok is None and safe(text[p - 1], text[p])):
                return p
        return 0

    def _decide(self, a: str, b: str) -> bool:
        if a + b in self._special or a + b == "\r\n":
            return False
        left, right = _SINGLE_REWRITES.get(a, a), _SINGLE_REWRITES.get(b, b)
        xs, ys = {left[-1]}, {right[0]}
        # Emoji: a key across the cut holds the pair; a character of some key may become a tag.
        if left[-1] in self._emoji_chars:
            xs |= self._tag_lasts
        if right[0] in self._emoji_chars:
            ys |= self._tag_firsts
        if any(x + y in self._emoji_pairs for x in xs for y in ys):
            return False
        if self._clean:
            if any(_clean_char(x) and _clean_char(y) for x in xs for y in ys):
                return False
            # A literal "<BLOCK>" across the cut, or box characters / "<BLOCK>" on both sides (runs merge).
            if a + b in _BLOCK_PAIRS or ((a in BOX_CHARS or a == ">") and (b in BOX_CHARS or b == "<")):
                return False
            if any(_clean_char(x) or x in BOX_CHARS for x in xs):
                xs.add(">")  # the left piece may end with a tag
            if any(_clean_char(y) or y in BOX_CHARS for y in ys):
                ys.add("<")
        return not any(x + y in self._vocab_pairs for x in xs for y in ys)


_BLOCK_PAIRS = _pairs(["<BLOCK>"])


def _clean_char(ch: str) -> bool:
    return ch in CLEAN_CHARS or ch.isdecimal()


def cut_rule(tokenizer: Any) -> CutRule | None:
    """The :class:`CutRule` of a GPT-NeoX-Japanese tokenizer; None for any other tokenizer, whose
    documents are then encoded whole (nothing is known about what its rules reach across)."""
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer

    if isinstance(tokenizer, GPTNeoXJapaneseTokenizer):
        return CutRule(tokenizer)
    return None
