"""The C decoding step (neoxja.cpu_decode / neoxja._decode) against the PyTorch forward and transformers."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
import transformers

import neoxja
from neoxja import cpu_decode
from neoxja.cache import KVCache
from neoxja.configuration import GPTNeoXJapaneseConfig
from neoxja.cpu_decode import FusedDecoder, fused_decoding_unsupported
from neoxja.linear import optimize_for_cpu_inference, packing_available, restore_dense
from neoxja.modeling import GPTNeoXJapaneseForCausalLM

needs_extension = pytest.mark.skipif(
    not cpu_decode.extension_available(), reason="neoxja._decode is not built"
)

VOCAB = 512


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch.set_num_threads(threads) for the block (the C step takes as many), then the old count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# hidden 256 has enough weights per layer (x batch) for the layers to run on several threads;
# the others run their layers on one thread and share only the output head.
CONFIGS = {
    "gelu": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "partial-rotary-untied-tanh": dict(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=3,
        rotary_pct=0.5,
        hidden_act="gelu_new",
        tie_word_embeddings=False,
    ),
    "relu-quarter-rotary": dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, hidden_act="relu", rotary_pct=0.25
    ),
    "threaded-layers-silu-yarn": dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="silu",
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
    ),
}


def test_the_extension_is_built() -> None:
    """pip install compiles neoxja._decode; CI must have it, elsewhere its absence only skips."""
    if not cpu_decode.extension_available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("neoxja._decode was not compiled (required in CI)")
        pytest.skip("neoxja._decode is not compiled: generate() decodes through PyTorch")
    kernel = cpu_decode._extension().kernel()
    if os.environ.get("NEOXJA_DECODE_KERNEL") == "scalar":
        assert kernel == "scalar"
    elif os.path.exists("/proc/cpuinfo"):  # Linux: the CPU's flags say which kernel it must pick
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
        avx2 = {"avx2", "fma"} <= flags
        avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
        cap = os.environ.get("NEOXJA_DECODE_KERNEL")
        expected = "avx512" if avx512 and cap in (None, "avx512") else "avx2" if avx2 else "scalar"
        assert kernel == expected
    else:
        assert kernel in {"avx512", "avx2", "scalar"}


@needs_extension
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_kernel_alone(threads: int) -> None:
    """The step's matrix kernel on its own: every tile shape (1-9 vectors, row counts that are not
    multiples of 8, a column tail) against PyTorch; bad operands named."""
    g = torch.Generator().manual_seed(0)
    with torch_threads(threads):
        for rows, cols in [(1, 1), (37, 19), (64, 64), (203, 130)]:
            weight = torch.randn(rows, cols, generator=g)
            for vectors in range(1, 10):
                x = torch.randn(vectors, cols, generator=g)
                torch.testing.assert_close(cpu_decode.matmul(weight, x), x @ weight.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight must be a 2-d float32"):
        cpu_decode.matmul(torch.ones(3, 4, dtype=torch.float64), torch.ones(1, 4))
    with pytest.raises(ValueError, match="x must be contiguous"):
        cpu_decode.matmul(torch.ones(3, 4), torch.ones(4, 2).T)
    with pytest.raises(ValueError, match=r"cannot multiply x \[1, 5\] by weight \[3, 4\]"):
        cpu_decode.matmul(torch.ones(3, 4), torch.ones(1, 5))


PORTABLE_KERNEL_TESTS = (
    "test_the_extension_is_built",
    "test_matmul_kernel_alone",
    "test_step_matches_the_pytorch_forward",
    "test_argmax_takes_the_first_maximum_and_nan_like_torch",
    "test_cpu_decode_verify.py::test_verify_then_crop_continues_like_plain_steps",
)


@needs_extension
def test_the_portable_kernel_gives_the_same_results(tmp_path: Path) -> None:
    """NEOXJA_DECODE_KERNEL=scalar selects the plain-C matrix kernel (what CPUs without AVX2 run):
    the step and argmax tests pass on it too, in a fresh process (the kernel is chosen at import).
    The child's JUnit report proves that each of those tests ran there and passed."""
    report = tmp_path / "report.xml"
    here = Path(__file__)
    selection = [
        f"{here.with_name(name)}" if "::" in name else f"{here}::{name}" for name in PORTABLE_KERNEL_TESTS
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *selection],
        env={**os.environ, "NEOXJA_DECODE_KERNEL": "scalar"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): [child.tag for child in case] for case in cases}
    for name in (entry.split("::")[-1] for entry in PORTABLE_KERNEL_TESTS):
        ran = [test for test in outcomes if test.split("[")[0] == name]
        assert ran, f"{name} did not run under the portable kernel"
        assert all(outcomes[test] == [] for test in ran), {test: outcomes[test] for test in ran}


def _model(name: str, seed: int = 0) -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXJapaneseConfig(vocab_size=VOCAB, max_position_embeddings=128, **CONFIGS[name])
    model = GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():  # varied weights, and a dense bias that is not zero
        for param in model.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 1.0)
    return model


def _padded(batch: int, length: int, capacity: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, capacity, dtype=torch.long)
    for row in range(batch):
        mask[row, : row * 2] = 0  # row r has 2r left pad positions
    mask[0, 3] = 0  # and a hole inside a prompt
    return ids, mask


@needs_extension
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_matches_the_pytorch_forward(name: str, batch: int, threads: int) -> None:
    """Logits of 6 successive steps agree with the model's forward (float32 rounding), with left
    padding, position ids and a mask with a hole; the argmax is that of the returned logits."""
    model = _model(name)
    prompt, capacity = 9, 20
    ids, mask = _padded(batch, prompt, capacity, seed=batch)
    positions = (mask[:, :prompt].cumsum(-1) - 1).clamp(min=0)
    next_position = mask[:, :prompt].sum(-1, keepdim=True)
    with torch_threads(threads):
        with torch.inference_mode():  # the C step reads the dense weights
            caches = [KVCache(model.config, batch, capacity) for _ in range(2)]
            for cache in caches:
                model(ids, attention_mask=mask[:, :prompt], position_ids=positions, past_key_values=cache)
            decoder = FusedDecoder(model, caches[1], capacity)
            tokens = torch.randint(0, VOCAB, (batch,))
            for step in range(6):
                expected = model(
                    tokens[:, None],
                    attention_mask=mask[:, : prompt + step + 1],
                    position_ids=next_position + step,
                    past_key_values=caches[0],
                ).logits[:, -1]
                picked = torch.empty(batch, dtype=torch.long)
                logits = decoder.step(tokens, next_position, step, mask, picked)
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
                assert torch.equal(picked, logits.argmax(-1))
                assert caches[1].length == caches[0].length
                tokens = picked.clone()
            # the keys and values it stored are the forward's
            for stored, reference in zip(
                caches[1].keys + caches[1].values, caches[0].keys + caches[0].values, strict=True
            ):
                torch.testing.assert_close(
                    stored[:, :, : prompt + 6], reference[:, :, : prompt + 6], rtol=1e-4, atol=1e-4
                )


@needs_extension
@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_takes_the_first_maximum_and_nan_like_torch(threads: int) -> None:
    """Ties go to the lowest index and NaN counts as the maximum, across the threads' halves of the
    vocabulary."""
    model = _model("partial-rotary-untied-tanh")
    head = model.embed_out.weight
    with torch_threads(threads):
        with torch.no_grad():
            head[400] = head[7] = head[5] * 50  # the same, largest logit at 7 and 400 (other half)
            results = []
            for nan_rows in ([], [300], [450, 20]):
                for row in nan_rows:
                    head[row] = float("nan")
                with torch.inference_mode():
                    cache = KVCache(model.config, 1, 8)
                    model(torch.tensor([[3, 4]]), past_key_values=cache)
                    picked = torch.empty(1, dtype=torch.long)
                    logits = FusedDecoder(model, cache, 8).step(torch.tensor([9]), argmax_out=picked)
                results.append((int(picked), int(torch.argmax(logits))))
    assert results == [(7, 7), (300, 300), (20, 20)]


def _transformers_pair(tmp_path, name: str) -> tuple[torch.nn.Module, GPTNeoXJapaneseForCausalLM]:
    torch.manual_seed(3)
    config = transformers.GPTNeoXJapaneseConfig(
        vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, **CONFIGS[name]
    )
    reference = transformers.GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.5 if param.dim() > 1 else 1.0)
    reference.save_pretrained(tmp_path)
    return reference, neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path).eval()


@needs_extension
@pytest.mark.parametrize("name", ["gelu", "threaded-layers-silu-yarn"])
def test_generate_in_c_gives_transformers_tokens(tmp_path, name: str, monkeypatch) -> None:
    """Greedy generate() through the C step: transformers' tokens for a left-padded batch, 64 new
    tokens; and the same tokens as the PyTorch steps, also with a processor and with sampling."""
    reference, model = _transformers_pair(tmp_path, name)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    calls = []
    original_step = FusedDecoder.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(FusedDecoder, "step", counting_step)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None)
    assert len(calls) == 63  # every token after the prefill's
    with torch.no_grad():
        expected = reference.generate(
            ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=None
        )
    assert torch.equal(out, expected)

    settings = [
        dict(max_new_tokens=30, repetition_penalty=1.3, no_repeat_ngram_size=3),
        dict(max_new_tokens=30, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=11),
        dict(max_new_tokens=30, eos_token_id=_eos_from(out)),  # rows finish at different steps
        dict(max_new_tokens=30, do_sample=True, num_return_sequences=2, seed=4),
    ]
    for kwargs in settings:
        fused = model.generate(ids, attention_mask=mask, **kwargs)
        monkeypatch.setenv("NEOXJA_FUSED_DECODE", "0")
        plain = model.generate(ids, attention_mask=mask, **kwargs)
        monkeypatch.delenv("NEOXJA_FUSED_DECODE")
        assert torch.equal(fused, plain), kwargs


def _eos_from(out: torch.Tensor) -> int:
    """A token that row 0 generates somewhere in the middle."""
    return int(out[0, 7 + 20])


@needs_extension
def test_when_generate_falls_back_to_pytorch(tmp_path, monkeypatch) -> None:
    model = _model("threaded-layers-silu-yarn")  # layers large enough to be packed
    assert fused_decoding_unsupported(model, 64) is None
    monkeypatch.setenv("NEOXJA_FUSED_DECODE", "0")
    assert "NEOXJA_FUSED_DECODE" in fused_decoding_unsupported(model, 64)
    monkeypatch.delenv("NEOXJA_FUSED_DECODE")

    assert "training" in fused_decoding_unsupported(model.train(), 64)
    model.eval()
    assert "float64" in fused_decoding_unsupported(model.double(), 64)
    model.float()
    if packing_available():
        optimize_for_cpu_inference(model)
        assert "packed" in fused_decoding_unsupported(model, 64)
        restore_dense(model)
    handle = model.gpt_neox_japanese.layers[0].register_forward_hook(lambda *args: None)
    assert "hooks" in fused_decoding_unsupported(model, 64)
    handle.remove()
    assert fused_decoding_unsupported(model, 64) is None
    expected = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6)
    mlp = model.gpt_neox_japanese.layers[1].mlp
    dense = mlp.dense_h_to_4h.weight
    mlp.dense_h_to_4h.weight = torch.nn.Parameter(dense.detach().t().contiguous().t())  # same values
    assert "dense_h_to_4h.weight is not contiguous" in fused_decoding_unsupported(model, 64)
    assert torch.equal(model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6), expected)
    mlp.dense_h_to_4h.weight = dense

    class Patched(GPTNeoXJapaneseForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert "Patched" in fused_decoding_unsupported(Patched(model.config).eval(), 64)
    model.gpt_neox_japanese.layers[0].mlp.extra = torch.nn.Dropout(0.1)
    assert "Dropout" in fused_decoding_unsupported(model, 64)
    del model.gpt_neox_japanese.layers[0].mlp.extra

    mish = GPTNeoXJapaneseForCausalLM(
        GPTNeoXJapaneseConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, hidden_act="mish"
        )
    ).eval()
    assert "mish" in fused_decoding_unsupported(mish, 16)
    longrope = GPTNeoXJapaneseForCausalLM(
        GPTNeoXJapaneseConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0] * 4,
                "long_factor": [2.0] * 4,
                "original_max_position_embeddings": 32,
            },
        )
    ).eval()
    assert fused_decoding_unsupported(longrope, 32) is None
    assert "longrope" in fused_decoding_unsupported(longrope, 33)
    with pytest.raises(cpu_decode.FusedDecodingUnsupported, match="longrope"):
        FusedDecoder(longrope, KVCache(longrope.config, 1, 40), 40)


@needs_extension
def test_bad_input_is_refused_with_its_name() -> None:
    model = _model("gelu")
    with torch.inference_mode():
        cache = KVCache(model.config, 2, 6)
        model(torch.tensor([[1, 2], [3, 4]]), past_key_values=cache)
        decoder = FusedDecoder(model, cache, 6)
        with pytest.raises(ValueError, match=r"token id 512 in row 1 is outside the vocabulary \[0, 512\)"):
            decoder.step(torch.tensor([5, 512]))
        with pytest.raises(ValueError, match="tokens must be int64 of shape \\[2\\]"):
            decoder.step(torch.tensor([5, 6], dtype=torch.int32))
        with pytest.raises(ValueError, match="position 130 of row 0 is outside the RoPE table"):
            decoder.step(torch.tensor([5, 6]), positions=torch.tensor([[2], [2]]), position_delta=128)
        with pytest.raises(ValueError, match="mask must be int64"):
            decoder.step(torch.tensor([5, 6]), mask=torch.ones(2, 2, dtype=torch.long))
        assert cache.length == 2  # nothing was stored by the refused steps
        for _ in range(4):
            decoder.step(torch.tensor([5, 6]))
        with pytest.raises(ValueError, match="cache position 6 outside the cache's capacity 6"):
            decoder.step(torch.tensor([5, 6]))
        cache.select([0, 1])
        with pytest.raises(RuntimeError, match="reallocated"):
            decoder.step(torch.tensor([5, 6]))
        with pytest.raises(ValueError, match="room for 9 positions"):
            FusedDecoder(model, KVCache(model.config, 1, 8), 9)


def _step_in_child(decoder: FusedDecoder, queue) -> None:
    # No PyTorch compute here: GNU OpenMP, which PyTorch's own kernels use, can hang after fork.
    torch.get_num_threads = lambda: 2  # the child's pool must start its workers afresh
    queue.put(decoder.step(torch.tensor([8])).tolist())


@needs_extension
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_threads_in_parallel_and_after_fork() -> None:
    """Two Python threads decoding at once get what each gets alone; a forked child (which has
    none of the parent's worker threads) still runs a step, with the parent's result."""
    models = [_model("threaded-layers-silu-yarn", seed) for seed in (1, 2)]
    prompt = torch.tensor([[5, 6, 7]])
    with torch_threads(2):
        alone = [m.generate(prompt, max_new_tokens=12).tolist() for m in models]
        together: list = [None, None]

        def run(i: int) -> None:
            together[i] = models[i].generate(prompt, max_new_tokens=12).tolist()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert together == alone

        with torch.inference_mode():
            cache = KVCache(models[0].config, 1, 8)
            models[0](prompt, past_key_values=cache)
            decoder = FusedDecoder(models[0], cache, 8)
            decoder.step(torch.tensor([9]))  # the parent's workers exist now
            context = multiprocessing.get_context("fork")
            queue = context.Queue()
            child = context.Process(target=_step_in_child, args=(decoder, queue))
            child.start()
            try:
                in_child = queue.get(timeout=60)
            finally:
                child.join(timeout=10)
                child.kill()
            assert in_child == decoder.step(torch.tensor([8])).tolist()


@needs_extension
def test_two_threads_stepping_one_model_get_what_each_gets_alone() -> None:
    """A step's rows and buffers become the C model's only under its run lock: two Python threads
    stepping one model at once, each with its own rows, cache slots and output arrays, get what each
    gets alone (before, one thread's row count could meet the other's smaller logits buffer)."""
    from neoxja import _decode

    model = _model("threaded-layers-silu-yarn")
    cache = KVCache(model.config, 3, 16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), past_key_values=cache)
    handle = _decode.new_model(*cpu_decode.model_arrays(model, cache, 16))
    work = {"one row": (np.array([5]), np.array([0])), "two rows": (np.array([6, 7]), np.array([2, 1]))}

    def run(name: str, results: dict) -> None:
        tokens, slots = work[name]
        lengths = np.full(len(slots), 3)
        for _ in range(100):  # the same token at the same place each time: the same logits
            logits = np.full((len(slots), VOCAB), np.nan, np.float32)
            _decode.step_slots(handle, len(slots), tokens, slots, lengths, logits, None, 2)
            results.setdefault(name, []).append(logits)

    alone: dict = {}
    for name in work:
        run(name, alone)
    together: dict = {}
    threads = [threading.Thread(target=run, args=(name, together)) for name in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for name in work:
        assert all(np.array_equal(logits, alone[name][0]) for logits in alone[name] + together[name]), name
