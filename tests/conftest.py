"""Shared fixtures: where the real tokenizer files and the Japanese corpus live.

Both come from ``../shared`` beside the checkout (never from the repository). Outside CI a
missing directory skips the tests that need it, with the reason; inside CI (``CI=true``) it fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from shared_dirs import corpus, tokenizer_assets

from neoxja.configuration import PRESETS


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The real vocab.txt + emoji.json of abeja/gpt-neox-japanese-2.7b."""
    return tokenizer_assets()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Japanese text (Aozora Bunko novels, UD GSD sentences) for tests."""
    return corpus("neko.txt", "gsd-test.txt", "gsd-dev.txt")


# Tiny checkpoints and transformers/neoxja pairs, shared by every test file. transformers is the
# oracle: it builds and saves the random weights, neoxja loads what it saved.

# The "tiny" preset with abeja's full vocabulary: the shape of every shared test checkpoint.
TINY = {"vocab_size": 32000, **PRESETS["tiny"]}

# A very small config without dropout, for comparing training steps (two libraries, or two runs,
# draw different dropout masks).
NO_DROPOUT = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
)


def force_backend(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Make ``name`` (a backend of neoxja.decoding) the first choice of generate() for this test and
    return the list of backends it then starts (to assert that it used the one asked for)."""
    import neoxja
    from neoxja import decoding

    chosen = next(b for b in decoding.BACKENDS if b.name == name)
    if chosen.name == "cpu-fused" and not neoxja.cpu_decode.extension_available():
        pytest.fail("the C extension neoxja._decode is not built")
    monkeypatch.setattr(decoding, "BACKENDS", (chosen, decoding.TorchBackend))
    used: list[str] = []
    start = decoding.start_decoding

    def recording_start(*args, **kwargs):
        backend = start(*args, **kwargs)
        used.append(backend.name)
        return backend

    for module in ("neoxja.generation", "neoxja.beam_search", "neoxja.assisted"):
        if hasattr(sys.modules.get(module), "start_decoding"):
            monkeypatch.setattr(sys.modules[module], "start_decoding", recording_start)
    return used


def build_tiny_checkpoint(out: Path, assets_dir: Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a tiny random transformers GPT-NeoX-Japanese (and its real tokenizer) into ``out``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**TINY)).eval()
    model.save_pretrained(out)
    if with_tokenizer:
        tokenizer = transformers.GPTNeoXJapaneseTokenizer(
            str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json")
        )
        tokenizer.save_pretrained(out)
    return out


def make_reference(config: dict, seed: int = 0, jitter: float = 0.05):
    """A transformers causal LM of ``config`` with every weight (biases and norms too) randomised."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**config))
    if jitter:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * jitter)
    return model.eval()


def make_pair(config: dict, directory: Path, seed: int = 0, jitter: float = 0.05, **load_kwargs):
    """(transformers model, neoxja model loaded from what transformers saved into ``directory``)."""
    from neoxja import GPTNeoXJapaneseForCausalLM

    reference = make_reference(config, seed=seed, jitter=jitter)
    reference.save_pretrained(directory)
    return reference, GPTNeoXJapaneseForCausalLM.from_pretrained(directory, **load_kwargs).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    """One tiny random checkpoint with the real tokenizer, for tests that only read it."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), assets_dir)


# Prompts of the serving tests (test_serving_engine, test_server).
SERVING_PROMPTS = [
    "吾輩は猫である。名前はまだ無い。",
    "今日はいい天気ですね",
    "人とAIが協調するためには、",
    "東京",
    "むかしむかし",
]


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Path):
    """neoxja's model (eval mode) and tokenizer of :func:`tiny_checkpoint`, shared read-only."""
    from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(tiny_checkpoint).eval()
    return model, GPTNeoXJapaneseTokenizer.from_pretrained(tiny_checkpoint)
