"""Streaming detokenization: turn ids into text one id at a time, never showing half a character.

GPT-NeoX-Japanese spells every character outside its vocabulary as UTF-8 byte tokens, so one
character can arrive over up to four ids. :class:`StreamingDetokenizer` holds such bytes back until
the character is complete and emits text only when it is final::

    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
    for token_id in generated_ids:
        piece = detok.add_token(token_id)  # "" while a character is still incomplete
        print(piece, end="", flush=True)
    print(detok.finalize(), end="")       # flushes an unfinished byte sequence (as U+FFFD)
    assert detok.text == tokenizer.decode(generated_ids, skip_special_tokens=True)

API: ``add_token(id) -> str`` (the new text), ``add_tokens(ids) -> str``, ``finalize() -> str``
(the rest; call once at the end), ``text`` (everything emitted so far) and ``reset()``.
``add`` and ``finish`` are the same as ``add_token`` and ``finalize`` (the names the streamers use).
The pieces always join to ``tokenizer.decode(all ids)``: a piece never ends inside a character, and
U+FFFD appears only where ``decode`` would put it (invalid bytes, or bytes left over at the end).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from neoxja.tokenizer.detokenize import IdDecoder

if TYPE_CHECKING:
    from neoxja.tokenizer import GPTNeoXJapaneseTokenizer


class StreamingDetokenizer:
    """Incremental :meth:`GPTNeoXJapaneseTokenizer.decode`: feed ids, get text pieces."""

    def __init__(self, tokenizer: GPTNeoXJapaneseTokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far."""
        self._decoder = IdDecoder(*self.tokenizer._decoding)
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add_token(self, token_id: int) -> str:
        """Feed one id; returns the text it completes ("" while a character is unfinished)."""
        tok = self.tokenizer
        idx = tok._check_id(token_id)
        if self.skip_special_tokens and idx in tok.added_tokens_decoder:
            return ""
        piece = self._decoder.add(idx)
        if piece:
            self._parts.append(piece)
        return piece

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; returns the text they complete."""
        return "".join([self.add_token(i) for i in token_ids])

    def finalize(self) -> str:
        """End of stream: returns the text still held back (an unfinished character as U+FFFD)."""
        piece = self._decoder.finish()
        if piece:
            self._parts.append(piece)
        return piece

    add = add_token
    finish = finalize
