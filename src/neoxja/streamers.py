"""Streamers: see generated text while ``generate`` runs.

``generate(streamer=...)`` calls ``streamer.put(ids)`` with the prompt, then with each new token, and
``streamer.end()`` at the end (transformers' protocol). The streamers here turn ids into text with the
tokenizer's streaming detokenizer, so a piece is emitted as soon as its characters are complete and
never holds half a character (byte-fallback tokens wait for the rest of their character).
"""

from __future__ import annotations

import sys
from queue import Queue
from typing import Any, TextIO

import torch


def make_detokenizer(tokenizer: Any, **decode_kwargs: Any) -> Any:
    """A fresh streaming detokenizer for ``tokenizer``: ``add(id) -> str`` and ``finish() -> str``."""
    from neoxja.tokenizer_utils import StreamingDetokenizer

    return StreamingDetokenizer(tokenizer, **decode_kwargs)


class TextStreamer:
    """Print text to ``file`` (stdout) as tokens arrive; ``skip_prompt=True`` leaves the prompt out.

    ``decode_kwargs`` (e.g. ``skip_special_tokens=True``) are passed to the detokenizer.
    Only a single sequence can be streamed.
    """

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = False, file: TextIO | None = None, **decode_kwargs: Any
    ):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.file = file
        self._detokenizer = make_detokenizer(tokenizer, **decode_kwargs)
        self._expect_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Receive token ids ([1, n] or [n]); the first call is the prompt."""
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError(
                    f"{type(self).__name__} streams a single sequence, got a batch of {value.shape[0]}"
                )
            value = value[0]
        is_prompt, self._expect_prompt = self._expect_prompt, False
        if is_prompt and self.skip_prompt:
            return
        text = "".join(self._detokenizer.add(token) for token in value.tolist())
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        """Flush whatever the detokenizer still holds and signal the end of the stream."""
        self.on_finalized_text(self._detokenizer.finish(), stream_end=True)
        self._detokenizer = make_detokenizer(self.tokenizer, **self.decode_kwargs)
        self._expect_prompt = True

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Write ``text`` now (a newline after the last piece); override to send it elsewhere."""
        print(text, flush=True, end="\n" if stream_end else "", file=self.file or sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """Collect the text pieces in a queue and hand them out by iteration, e.g. to another thread.

    Run ``generate(..., streamer=streamer)`` in a thread and ``for piece in streamer: ...`` in the
    caller. ``timeout`` (seconds) bounds each wait; when it passes, iteration raises ``queue.Empty``.
    """

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any
    ):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue[str | None] = Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text)
        if stream_end:
            self.text_queue.put(None)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        piece = self.text_queue.get(timeout=self.timeout)
        if piece is None:
            raise StopIteration
        return piece
