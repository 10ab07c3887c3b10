"""vLLM runs neoxja's model plugin as neoxja runs the model: same greedy tokens, same log-probabilities.

Each random checkpoint (untied and tied head, float32) is served once by vLLM in this process and
once with ``tensor_parallel_size=2`` (a worker process per core); every check reads what those four
engines produced. The prompts go in as neoxja's token ids, so only the model is compared here (the
tokenizer has its own tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, engine, greedy, neoxja_greedy, prompt_ids, write_checkpoint

MAX_NEW_TOKENS = 24
TOP = 5  # prompt log-probabilities compared per position: the prompt's own token and the top 5


@dataclass
class Served:
    """What one vLLM engine produced for a checkpoint."""

    checkpoint: Path
    prompt_ids: list[list[int]]
    batched: list[list[int]]  # all prompts in one generate() call
    one_by_one: list[list[int]]  # one generate() call per prompt
    prompt_logprobs: list[list[dict | None]] | None  # per prompt position: {token id: Logprob}


@pytest.fixture(scope="module", params=["untied", "tied"])
def served_checkpoint(request: pytest.FixtureRequest) -> Path:
    """Each checkpoint in turn; every engine fixture of the module serves the same one."""
    return request.getfixturevalue(f"{request.param}_checkpoint")


def serve(checkpoint: Path) -> Served:
    """``checkpoint`` served by one vLLM process: greedy tokens in two batch sizes, prompt logprobs."""
    from vllm import SamplingParams

    ids = prompt_ids(checkpoint)
    with engine(checkpoint) as llm:
        batched = greedy(llm, ids, MAX_NEW_TOKENS)
        one_by_one = [greedy(llm, [prompt], MAX_NEW_TOKENS)[0] for prompt in ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP)
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    return Served(checkpoint, ids, batched, one_by_one, [out.prompt_logprobs for out in outputs])


def check_prompt_logprobs(served: Served) -> None:
    """vLLM's prompt_logprobs (each prompt token and the top 5 at each position) are neoxja's
    log-softmax of the same positions within 1e-4, and its top 5 are neoxja's."""
    from neoxja import GPTNeoXJapaneseForCausalLM

    model = GPTNeoXJapaneseForCausalLM.from_pretrained(served.checkpoint, dtype=torch.float32).eval()
    compared = 0
    for ids, positions in zip(served.prompt_ids, served.prompt_logprobs, strict=True):
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert positions[0] is None and len(positions) == len(ids)  # nothing predicts the first token
        for index, entries in enumerate(positions[1:]):
            want = logprobs[index]  # the distribution that predicts token index + 1
            assert ids[index + 1] in entries
            for token, entry in entries.items():
                assert abs(entry.logprob - want[token].item()) <= 1e-4, (index, token)
                compared += 1
            top = {token for token, entry in entries.items() if entry.rank <= TOP}
            assert top == set(want.topk(TOP).indices.tolist())
    assert compared >= TOP * sum(len(ids) - 1 for ids in served.prompt_ids)


@pytest.fixture(scope="module")
def one_process(served_checkpoint: Path) -> Served:
    """The checkpoint served by one vLLM process."""
    return serve(served_checkpoint)


@pytest.fixture(scope="module")
def two_processes(served_checkpoint: Path) -> Served:
    """The checkpoint served with tensor_parallel_size=2 on the CPU build, one worker bound per core."""
    ids = prompt_ids(served_checkpoint)
    with engine(served_checkpoint, tensor_parallel_size=2) as llm:
        batched = greedy(llm, ids, MAX_NEW_TOKENS)
    return Served(served_checkpoint, ids, batched, [], None)


def test_greedy_tokens_equal_neoxja_generate(one_process: Served) -> None:
    """Batched and one prompt at a time, vLLM's greedy tokens are neoxja's generate()'s."""
    want = neoxja_greedy(one_process.checkpoint, PROMPTS, MAX_NEW_TOKENS)
    assert all(len(tokens) > 1 for tokens in want)
    assert one_process.batched == want
    assert one_process.one_by_one == want


def test_prompt_logprobs_equal_neoxja_log_softmax(one_process: Served) -> None:
    check_prompt_logprobs(one_process)


def test_tensor_parallel_equals_one_process(one_process: Served, two_processes: Served) -> None:
    """Split over two workers (heads, MLP columns, vocabulary), the greedy tokens do not change."""
    assert two_processes.checkpoint == one_process.checkpoint
    assert two_processes.batched == one_process.batched


def test_pipeline_parallel_compiled_equals_neoxja(tied_checkpoint: Path) -> None:
    """pipeline_parallel_size=2 (a stage per core; the tied head makes the last stage hold the
    embedding too), on vLLM's default torch.compile path as GPUs run it: neoxja's greedy tokens.

    Compiled, because the CPU build's eager mode never allocates the buffers that stages hand over
    (its warm-up run, which does, is skipped without compilation)."""
    ids = prompt_ids(tied_checkpoint)
    with engine(tied_checkpoint, pipeline_parallel_size=2, enforce_eager=False) as llm:
        tokens = greedy(llm, ids, MAX_NEW_TOKENS)
    assert tokens == neoxja_greedy(tied_checkpoint, PROMPTS, MAX_NEW_TOKENS)


def test_the_real_models_head_size_partial_scaled_rope_and_another_activation(
    tmp_path: Path, assets_dir: Path
) -> None:
    """Heads of 80 (the 2.7B's), the config's RoPE settings (a quarter of each head rotated, another
    base, linear scaling) reaching vLLM's rotary embedding and hidden_act its MLP: tokens and
    logprobs still equal neoxja's."""
    checkpoint = write_checkpoint(
        tmp_path / "variant",
        assets_dir,
        tied=False,
        seed=2,
        hidden_size=160,
        num_attention_heads=2,
        rotary_pct=0.25,
        rotary_emb_base=500.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        hidden_act="gelu_new",
    )
    served = serve(checkpoint)
    assert served.batched == neoxja_greedy(checkpoint, PROMPTS, MAX_NEW_TOKENS)
    check_prompt_logprobs(served)


def test_dynamic_rope_is_refused_by_name(tmp_path: Path, assets_dir: Path) -> None:
    """vLLM's "dynamic" NTK scaling differs from transformers' at every length: refused at load, not
    served with other numbers."""
    checkpoint = write_checkpoint(
        tmp_path / "dynamic", assets_dir, tied=True, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        serve(checkpoint)


def test_vllm_finds_the_model_through_the_entry_point() -> None:
    """The installed entry point registers the architecture lazily, as neoxja's class (the tokens
    above then come from it: vLLM's transformers fallback cannot run this architecture)."""
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "neoxja"]
    assert plugin.value == "neoxja.vllm_plugin:register"
    load_general_plugins()
    registered = ModelRegistry.models["GPTNeoXJapaneseForCausalLM"]
    assert (registered.module_name, registered.class_name) == (
        "neoxja.vllm_plugin.model",
        "GPTNeoXJapaneseForCausalLM",
    )
