"""Ids -> text: the one decoder that joins byte tokens into characters (used by ``decode``,
:func:`normalize` and the streaming detokenizer), and :func:`normalize`."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

from neoxja.tokenizer.batch import check_text
from neoxja.tokenizer.segment import char_bytes
from neoxja.tokenizer.vocab import TAG_TEXT

if TYPE_CHECKING:
    from neoxja.tokenizer.core import GPTNeoXJapaneseTokenizer

# decode(clean_up_tokenization_spaces=True): the space before these goes, in this order.
CLEAN_UP_SPACES = tuple(
    (" " + s, s.strip()) for s in (".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re")
)
_SINGLE_BYTES = [bytes((b,)) for b in range(256)]


class IdDecoder:
    """Ids to text, one at a time. A text token's text passes through; byte tokens are held until
    the character they spell is complete, across tokens, and decoded as UTF-8. Invalid bytes, and
    bytes still open when a text token or the end comes, become U+FFFD exactly where
    ``bytes.decode(errors="replace")`` of each run of byte tokens puts it."""

    def __init__(self, id_text: list[str | None], id_byte: list[int]) -> None:
        self._id_text, self._id_byte = id_text, id_byte
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._open = False  # whether bytes came since the last text

    def add(self, idx: int) -> str:
        """Feed one (valid) id; returns the text it completes ("" inside a character)."""
        byte = self._id_byte[idx]
        if byte >= 0:
            return self.add_bytes(_SINGLE_BYTES[byte])
        return self.add_text(self._id_text[idx])

    def add_bytes(self, data: bytes) -> str:
        """Feed raw bytes of a byte-token run; returns the characters they complete."""
        self._open = True
        return self._utf8.decode(data)

    def add_text(self, text: str) -> str:
        """Feed text: it ends the current byte run."""
        return self.finish() + text if self._open else text

    def finish(self) -> str:
        """End the current byte run: the text it still holds (an unfinished character as U+FFFD)."""
        if not self._open:
            return ""
        self._open = False
        piece = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return piece


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
    text = check_text(text)
    decoder = IdDecoder(*tokenizer._decoding)
    out: list[str] = []
    for piece, is_special in tokenizer._split_special(text):
        if is_special:
            out.append(decoder.add_text(piece))
            continue
        rewritten = tokenizer._rewrite(piece)
        pos = 0
        for idx, token, width in tokenizer._python.pieces(rewritten):
            if width == 0:
                continue
            if rewritten.startswith(token, pos):  # a vocabulary word: its first spelling
                out.append(decoder.add(idx))
            elif token in TAG_TEXT:
                out.append(decoder.add_text(TAG_TEXT[token]))
            else:  # a character outside the vocabulary survives through its bytes
                out.append(decoder.add_bytes(char_bytes(rewritten[pos])))
            pos += width
        out.append(decoder.finish())
    return "".join(out)
