"""Streaming text out of generate: whole characters only, pieces that join to tokenizer.decode."""

from __future__ import annotations

import io
import math
import queue
import threading

import pytest
import torch

import neoxja
from neoxja.generation import stream_generate
from neoxja.streamers import TextIteratorStreamer, TextStreamer

# Characters outside the vocabulary (byte-fallback tokens) between ordinary Japanese text.
CONTINUATION = "猫ŧです👍🏻。𠮷野家、ǅ"
PROMPT = "吾輩は"


@pytest.fixture(scope="module")
def tokenizer(assets_dir):
    return neoxja.GPTNeoXJapaneseTokenizer(str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json"))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = neoxja.GPTNeoXJapaneseConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    return neoxja.GPTNeoXJapaneseForCausalLM(config).eval()


def _forcing(ids: list[int]):
    """A logits processor that makes the model generate ``ids`` (then keeps repeating the last one)."""
    start: list[int] = []

    def force(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not start:
            start.append(input_ids.shape[1])
        step = min(input_ids.shape[1] - start[0], len(ids) - 1)
        scores.fill_(-math.inf)
        scores[:, ids[step]] = 0.0
        return scores

    return force


@pytest.fixture(scope="module")
def forced(tokenizer) -> list[int]:
    ids = tokenizer.encode(CONTINUATION)
    byte_tokens = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert len(byte_tokens) >= 6, "the continuation must exercise byte-fallback tokens"
    return ids


def test_stream_generate_yields_whole_characters(model, tokenizer, forced) -> None:
    pieces = list(
        stream_generate(
            model,
            tokenizer,
            PROMPT,
            max_new_tokens=len(forced),
            eos_token_id=None,
            logits_processor=[_forcing(forced)],
        )
    )
    assert "".join(pieces) == tokenizer.decode(forced)  # == normalize(CONTINUATION)
    assert all(piece and "\ufffd" not in piece for piece in pieces)
    assert len(pieces) < len(forced)  # byte tokens were held back until their character was complete


def test_stream_generate_matches_generate_on_model_output(model, tokenizer) -> None:
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    out = model.generate(ids, max_new_tokens=24, eos_token_id=None)
    text = "".join(stream_generate(model, tokenizer, PROMPT, max_new_tokens=24, eos_token_id=None))
    assert text == tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_streamer_prints_as_generate_runs(model, tokenizer, forced, skip_prompt: bool) -> None:
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    sink = io.StringIO()
    writes: list[str] = []

    class Recording(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            writes.append(text)
            super().on_finalized_text(text, stream_end)

    streamer = Recording(tokenizer, skip_prompt=skip_prompt, file=sink, skip_special_tokens=True)
    out = model.generate(
        ids,
        max_new_tokens=len(forced),
        eos_token_id=None,
        streamer=streamer,
        logits_processor=[_forcing(forced)],
    )
    expected = tokenizer.decode(out[0].tolist() if not skip_prompt else forced)
    assert sink.getvalue() == expected + "\n"
    assert len(writes) > 3 and all("\ufffd" not in w for w in writes)


def test_text_iterator_streamer_from_a_thread(model, tokenizer, forced) -> None:
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=30)
    kwargs = dict(max_new_tokens=len(forced), eos_token_id=None, streamer=streamer)
    worker = threading.Thread(
        target=model.generate, args=(ids,), kwargs={**kwargs, "logits_processor": [_forcing(forced)]}
    )
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == tokenizer.decode(forced)
    assert all("\ufffd" not in piece for piece in pieces)


def test_text_iterator_streamer_times_out(tokenizer) -> None:
    streamer = TextIteratorStreamer(tokenizer, timeout=0.01)
    with pytest.raises(queue.Empty):
        next(iter(streamer))


def test_streamer_rejects_batches(model, tokenizer) -> None:
    ids = torch.tensor([tokenizer.encode(PROMPT)] * 2)
    with pytest.raises(ValueError, match="single sequence"):
        model.generate(ids, max_new_tokens=3, streamer=TextStreamer(tokenizer, file=io.StringIO()))


def test_stop_strings_end_generation_at_the_completing_token(model, tokenizer, forced) -> None:
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    out = model.generate(
        ids,
        max_new_tokens=len(forced),
        eos_token_id=None,
        stop_strings=["。", "zzz"],
        tokenizer=tokenizer,
        logits_processor=[_forcing(forced)],
    )
    new = out[0, ids.shape[1] :].tolist()
    assert tokenizer.decode(new).endswith("。") and tokenizer.decode(new).count("。") == 1
    # A stop string that starts inside byte-fallback tokens (ŧ) is found as well.
    out = model.generate(
        ids,
        max_new_tokens=len(forced),
        eos_token_id=None,
        stop_strings="ŧで",
        tokenizer=tokenizer,
        logits_processor=[_forcing(forced)],
    )
    new = out[0, ids.shape[1] :].tolist()
    assert "ŧで" in tokenizer.decode(new) and "ŧで" not in tokenizer.decode(new[:-1])


def test_stream_generate_rejects_an_empty_prompt(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="prompt"):
        next(stream_generate(model, tokenizer, "", max_new_tokens=3))
