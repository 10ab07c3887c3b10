"""neoxja's tokenizer inside vLLM (``tokenizer_mode="neoxja"``) against transformers' tokenizer,
which vLLM runs by default: the same prompt ids, the same generated ids and text.

The default mode's text is what vLLM's own incremental detokenizer makes of the ids with
transformers' tokenizer; it is computed here with that same vLLM function instead of starting a
second engine (a start costs ~20 s of the CI budget).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROMPTS, engine, neoxja_greedy

MAX_TOKENS = 16
# Text whose ids hold what a detokenizer can get wrong: byte tokens (ɐ, ʘ are spelt in bytes),
# spaces (also at both ends), a newline, an emoji and a special token.
TRICKY = " 吾輩は ɐ猫ʘ である\n 😀 終わり<|endoftext|> "


@pytest.fixture(scope="module")
def tokenizers(untied_checkpoint: Path):
    """(transformers' tokenizer as vLLM loads it by default, neoxja's as the plugin registers it)."""
    from vllm.plugins import load_general_plugins
    from vllm.tokenizers import get_tokenizer

    load_general_plugins()
    path = str(untied_checkpoint)
    return get_tokenizer(path), get_tokenizer(path, tokenizer_mode="neoxja")


@pytest.fixture(scope="module")
def llm(untied_checkpoint: Path):
    """vLLM with the plugin's model and neoxja's tokenizer, engine and worker in this process (a
    start of seconds instead of the ~20 s of spawning both)."""
    with engine(untied_checkpoint, tokenizer_mode="neoxja", max_model_len=512) as llm:
        yield llm


def incremental_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The text vLLM's engine streams for ``output_ids`` with ``tokenizer`` (its own detokenizer)."""
    from vllm.tokenizers.detokenizer_utils import convert_prompt_ids_to_tokens, detokenize_incrementally

    tokens, prefix, read = convert_prompt_ids_to_tokens(tokenizer, prompt_ids, skip_special_tokens=True)
    ids, text = list(prompt_ids), ""
    for idx in output_ids:
        ids.append(idx)
        new_tokens, piece, prefix, read = detokenize_incrementally(
            tokenizer, ids, tokens, prefix, read, skip_special_tokens=True
        )
        tokens.extend(new_tokens)
        text += piece
    return text


def test_default_mode_is_transformers_and_neoxja_mode_is_the_plugins(tokenizers) -> None:
    import transformers

    from neoxja.vllm_plugin.tokenizer import NeoXJaVllmTokenizer

    default, ours = tokenizers
    assert isinstance(default, transformers.GPTNeoXJapaneseTokenizer)
    assert isinstance(ours, NeoXJaVllmTokenizer)


def test_same_ids_and_special_tokens(tokenizers, corpus_dir: Path) -> None:
    default, ours = tokenizers
    corpus = (corpus_dir / "neko.txt").read_text(encoding="utf-8")[:20000]
    texts = [*PROMPTS, TRICKY, *corpus.splitlines()[:200]]
    for text in texts:
        assert ours.encode(text) == default.encode(text), text
        # What vLLM's renderer calls to tokenize a prompt, with truncation as it asks for it.
        kwargs = dict(truncation=True, max_length=8, add_special_tokens=True)
        assert ours(text, **kwargs)["input_ids"] == default(text, **kwargs)["input_ids"], text
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "all_special_ids", "all_special_tokens"):
        assert getattr(ours, name) == getattr(default, name), name
    assert ours.max_token_id == default.max_token_id == 31999
    assert ours.num_special_tokens_to_add() == default.num_special_tokens_to_add() == 0


def test_streamed_text_is_decode(tokenizers) -> None:
    """vLLM's detokenizer with neoxja's tokenizer streams exactly decode()'s text; with
    transformers' it agrees wherever transformers' token strings are exact (no byte tokens, no
    space at the ends)."""
    default, ours = tokenizers
    prompt = ours.encode("吾輩は猫である。")
    ids = ours.encode(TRICKY)
    assert any(ours.convert_ids_to_tokens(i).startswith("<|byte") for i in ids)
    assert incremental_text(ours, prompt, ids) == ours.decode(ids, skip_special_tokens=True)
    plain = ours.encode("名前はまだ無い。\nどこで生れたかとんと見当がつかぬ。")
    assert incremental_text(ours, prompt, plain) == incremental_text(default, prompt, plain)
    assert incremental_text(ours, prompt, plain) == default.decode(plain)


def test_generate_same_ids_and_text_as_transformers_tokenizer(llm, tokenizers, untied_checkpoint) -> None:
    from vllm import SamplingParams

    default, ours = tokenizers
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    expected = neoxja_greedy(untied_checkpoint, PROMPTS, MAX_TOKENS)
    for prompt, out, want in zip(PROMPTS, outputs, expected, strict=True):
        ids = list(out.outputs[0].token_ids)
        assert out.prompt_token_ids == default.encode(prompt)
        assert ids == want
        assert out.outputs[0].text == ours.decode(ids, skip_special_tokens=True)
        assert out.outputs[0].text == incremental_text(default, out.prompt_token_ids, ids)


def test_generated_byte_tokens_and_spaces_come_out_whole(llm, tokenizers) -> None:
    """Only byte tokens, a space and a newline allowed: the engine's text is decode()'s, with the
    characters the bytes spell (transformers' token strings would give U+FFFD for each byte)."""
    from vllm import SamplingParams

    _, ours = tokenizers
    allowed = sorted(set(ours.encode("ɐʘ \n")))
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, allowed_token_ids=allowed))
    ids = list(out[0].outputs[0].token_ids)
    assert set(ids) <= set(allowed)
    bytes_out = [i for i in ids if ours.convert_ids_to_tokens(i).startswith("<|byte")]
    assert bytes_out and len(bytes_out) < len(ids), ids  # bytes and text tokens both came
    assert out[0].outputs[0].text == ours.decode(ids)


def test_chat_renders_with_neoxjas_template(llm, tokenizers) -> None:
    """Without a chat template of the checkpoint's own, vLLM's chat with neoxja's tokenizer renders
    neoxja's default template (transformers' tokenizer has none: vLLM would need --chat-template)."""
    from vllm import SamplingParams

    _, ours = tokenizers
    messages = [
        {"role": "system", "content": "あなたは親切なアシスタントです。"},
        {"role": "user", "content": "日本の首都は?"},
    ]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4))
    assert out[0].prompt_token_ids == ours.apply_chat_template(messages, add_generation_prompt=True)
