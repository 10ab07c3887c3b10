"""What ``neoxja generate`` and ``neoxja chat`` share once the model is loaded: one generation, its text
cut before the first stop string, and the summary printed after it.

The text goes to stdout as it is decoded (one sequence) or sequence by sequence (several); the
summary (prompt and generated tokens, each with tokens/s, and peak memory) goes to stderr, as mlx_lm
and llama.cpp print it. The prompt's rate counts from the call until the first new token is out
(the prompt's forward pass and the first pick); the generation's rate counts the tokens after it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from neoxja.serving.sequences import StopMatcher
from neoxja.streamers import TextStreamer


@dataclass
class Timing:
    """When the prompt went in, when the first new token and the last came, and how many there were."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    end: float | None = None

    def summary(self, device: torch.device) -> str:
        """One line: ``prompt: N tokens, X tokens/s | generation: M tokens, Y tokens/s | peak memory: Z``."""
        end = self.end if self.end is not None else time.perf_counter()
        first = self.first if self.first is not None else end
        parts = [f"prompt: {self.prompt_tokens} tokens" + _rate(self.prompt_tokens, first - self.start)]
        generation = f"generation: {self.generated_tokens} tokens"
        if self.generated_tokens > 1:
            generation += _rate(self.generated_tokens - 1, end - first)
        parts.append(generation)
        memory = peak_memory(device)
        if memory is not None:
            parts.append(f"peak memory: {memory}")
        return " | ".join(parts)


def _rate(tokens: int, seconds: float) -> str:
    return f", {tokens / seconds:.1f} tokens/s" if seconds > 0 and tokens else ""


def peak_memory(device: torch.device) -> str | None:
    """The peak memory of this run where it is known: CUDA's allocator on a GPU, else the process's
    peak resident set (Linux and macOS)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (CUDA)"
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return f"{peak * scale / 1e9:.2f} GB (process RSS)"


class StreamedText(TextStreamer):
    """``generate()``'s streamer for one sequence (:class:`~neoxja.streamers.TextStreamer`, the prompt
    skipped): writes the new text as it is decoded, cut before the first stop string (the text that
    could begin one is held back until it is decided), and times the run. ``shown`` is the text
    written so far, complete even after a Ctrl-C."""

    def __init__(self, tokenizer: Any, stops: list[str], write: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.matcher = StopMatcher(stops)
        self.write = write
        self.shown: list[str] = []
        self.stopped = False
        self.timing: Timing | None = None

    def put(self, value: torch.Tensor) -> None:
        """The prompt (first call), then the new tokens."""
        if self.timing is None:
            self.timing = Timing(prompt_tokens=value.numel())
        else:
            self.timing.first = self.timing.first or time.perf_counter()
            self.timing.generated_tokens += value.numel()
        super().put(value)

    def end(self) -> None:
        """The run is over: write what the detokenizer and the stop check still hold."""
        if self.timing is not None:
            self.timing.end = time.perf_counter()
        super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        if text:
            text, self.stopped = self.matcher.feed(text)
            self._emit(text)
        if stream_end and not self.stopped:
            self._emit(self.matcher.flush())

    def _emit(self, text: str) -> None:
        if text:
            self.shown.append(text)
            self.write(text)


class StepClock:
    """A logits processor that changes nothing and notes when the scores of each step arrive (the
    first: the prompt is through), for the summary of a batch, which generate() does not stream."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.timing.first = self.timing.first or time.perf_counter()
        return scores


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout at once (a reader sees each piece as it is decoded)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def stream_one(
    model: Any, tokenizer: Any, input_ids: torch.Tensor, kwargs: dict[str, Any], output: StreamedText
) -> Timing:
    """Generate from ``input_ids`` (1 x T) into ``output``; the run's timing."""
    model.generate(input_ids.to(model.device), streamer=output, tokenizer=tokenizer, **kwargs)
    assert output.timing is not None  # generate() hands the streamer the prompt first
    return output.timing


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first place where one of ``stops`` begins."""
    hits = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return text[: min(hits)] if hits else text


def generate_several(
    model: Any, tokenizer: Any, input_ids: torch.Tensor, kwargs: dict[str, Any], stops: list[str]
) -> tuple[list[str], Timing]:
    """``num_return_sequences`` continuations of ``input_ids`` (1 x T) in one batched run: each text
    up to its end of sequence or first stop string, and the run's timing."""
    timing = Timing(prompt_tokens=input_ids.shape[1])
    clock = StepClock(timing)
    out = model.generate(input_ids.to(model.device), tokenizer=tokenizer, logits_processor=[clock], **kwargs)
    timing.end = time.perf_counter()
    eos = set(model.generation_config.eos_ids())
    texts = []
    for row in out[:, input_ids.shape[1] :].tolist():
        length = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        timing.generated_tokens += length
        texts.append(cut_at_stops(tokenizer.decode(row[:length], skip_special_tokens=True), stops))
    return texts, timing
