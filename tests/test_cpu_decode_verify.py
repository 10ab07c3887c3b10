"""The C step's several-token mode (``FusedDecoder.verify``, ``neoxja._decode.verify``): verifying
draft tokens in one call, against the PyTorch forward and against plain steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cpu_decode import VOCAB, _model, needs_extension, torch_threads

from neoxja import cpu_decode
from neoxja.cache import KVCache
from neoxja.cpu_decode import FusedDecoder
from neoxja.modeling import GPTNeoXJapaneseForCausalLM

# ----- several tokens per row in one call (verifying draft tokens) -----------------------------------

VERIFY_FORMATS = [
    "float32",
    "nf4-fast",
    "nf4-exact",
    "int8-fast",
    "int8-exact",
    "bfloat16-fast",
    "bfloat16-exact",
]


def _verify_pair(fmt: str) -> tuple[GPTNeoXJapaneseForCausalLM, torch.nn.Module]:
    """A model in ``fmt`` ("float32" or "<format>-<arithmetic>") and the PyTorch model its C step must
    agree with: itself, or for the fast arithmetic the PyTorch model of that arithmetic."""
    from quant_reference import fast_reference_model

    from neoxja.quantization.loading import quantize

    model = _model("threaded-layers-silu-yarn")
    if fmt == "float32":
        return model, model
    name, arithmetic = fmt.split("-")
    quantize(model, name, cpu_arithmetic=arithmetic, **({"blocksize": 64} if name == "nf4" else {}))
    if arithmetic == "exact":
        return model, model
    return model, fast_reference_model(model, cpu_decode._extension().kernels()["bfloat16"] == "avx512-bf16")


@needs_extension
@pytest.mark.parametrize(
    # (two threads for the quantized formats: test_verify_then_crop_continues_like_plain_steps)
    ("fmt", "threads"),
    [(fmt, 1) for fmt in VERIFY_FORMATS] + [("float32", 2)],
)
def test_verify_matches_the_pytorch_forward(fmt: str, threads: int) -> None:
    """verify() of 1..9 tokens after a prompt gives the logits of the PyTorch forward of the same
    tokens into a copy of the cache, and stores its keys and values (float32 rounding), and the
    logits of as many plain C steps, bit for bit; cropping the cache back and verifying again works.

    The fast arithmetic's reference is met within its own rounding on most counts only: an int8
    activation rounds the other way now and then on a last-bit float32 difference (the plain C step
    does the same, as the fuzz tests of test_c_boundary_decode allow), so there at least 7 of 9."""
    model, reference = _verify_pair(fmt)
    fast = reference is not model
    tolerance = 2e-3 if fast else 1e-4
    batch = 2 if fmt == "float32" else 1
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, VOCAB, (batch, 6), generator=g)
    close = []
    with torch_threads(threads):
        with torch.inference_mode():
            caches = [KVCache(model.config, batch, 20) for _ in range(3)]
            for cache in caches:
                reference(prompt, past_key_values=cache)
            decoder, stepper = FusedDecoder(model, caches[1], 20), FusedDecoder(model, caches[2], 20)
            for count in range(1, 10):
                new = torch.randint(0, VOCAB, (batch, count), generator=g)
                expected = reference(new, past_key_values=caches[0]).logits
                picked = torch.empty(batch, count, dtype=torch.long)
                logits = decoder.verify(new, argmax_out=picked)
                stepped = torch.stack([stepper.step(new[:, i]).clone() for i in range(count)], 1)
                assert torch.equal(logits, stepped)
                assert torch.equal(picked, logits.argmax(-1))
                assert caches[1].length == caches[0].length == 6 + count
                stored = [kv[:, :, : 6 + count] for kv in caches[1].keys + caches[1].values]
                forward = [kv[:, :, : 6 + count] for kv in caches[0].keys + caches[0].values]
                close.append(
                    torch.allclose(logits, expected, rtol=tolerance, atol=tolerance)
                    and all(
                        torch.allclose(a, b, rtol=tolerance, atol=tolerance)
                        for a, b in zip(stored, forward, strict=True)
                    )
                )
                if not fast:
                    torch.testing.assert_close(logits, expected, rtol=tolerance, atol=tolerance)
                    assert close[-1], f"count {count}: the stored keys or values differ"
                for cache in caches:
                    cache.crop(6)
    assert sum(close) >= 7, close


@needs_extension
@pytest.mark.parametrize(
    ("name", "fmt", "threads"),
    [
        ("gelu", "float32", 1),
        ("gelu", "float32", 2),  # its layers run on one thread for a step, on both for 8 tokens
        ("threaded-layers-silu-yarn", "float32", 2),
        ("threaded-layers-silu-yarn", "nf4-fast", 2),
        ("threaded-layers-silu-yarn", "int8-exact", 1),
    ],
)
def test_verify_then_crop_continues_like_plain_steps(name: str, fmt: str, threads: int) -> None:
    """Verifying k tokens gives, bit for bit, the logits of k plain steps (each row is computed as
    in a batch of one); after cropping to the j accepted tokens, plain steps continue with the
    logits of a plain step sequence over the accepted tokens, and a second verify does too."""
    model = _model(name) if fmt == "float32" else _verify_pair(fmt)[0]
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=g)
    drafts, accepted = torch.randint(0, VOCAB, (1, 8), generator=g), 3
    then = torch.randint(0, VOCAB, (1, 6), generator=g)
    with torch_threads(threads):
        with torch.inference_mode():
            caches = [KVCache(model.config, 1, 24) for _ in range(3)]
            for cache in caches:
                model(prompt, past_key_values=cache)
            all_steps, plain, verifying = (FusedDecoder(model, cache, 24) for cache in caches)
            stepped = torch.stack([all_steps.step(drafts[:, i]).clone() for i in range(8)], 1)
            verified = verifying.verify(drafts)
            assert torch.equal(verified, stepped)

            verifying.cache.crop(5 + accepted)
            expected = [plain.step(drafts[:, i]).clone() for i in range(accepted)]
            expected += [plain.step(then[:, i]).clone() for i in range(3)]
            got = [verifying.step(then[:, i]).clone() for i in range(3)]
            assert torch.equal(torch.stack(got), torch.stack(expected[accepted:]))
            again = verifying.verify(then[:, 3:])
            assert torch.equal(again, torch.stack([plain.step(then[:, i]).clone() for i in range(3, 6)], 1))


@needs_extension
def test_verify_refuses_bad_input_by_name() -> None:
    """verify()'s arguments are checked before anything is stored: the cache keeps its length."""
    model = _model("gelu")
    with torch.inference_mode():
        cache = KVCache(model.config, 2, 8)
        model(torch.tensor([[1, 2], [3, 4]]), past_key_values=cache)
        decoder = FusedDecoder(model, cache, 8)
        refusals = [
            (torch.tensor([5, 6]), None, r"tokens must be int64 \[rows, count\]"),
            (torch.tensor([[5, 6]], dtype=torch.int32), None, r"tokens must be int64 \[rows, count\]"),
            (torch.ones(3, 2, dtype=torch.long), None, "verify takes 1 to 2 rows, got 3"),
            (torch.ones(2, 7, dtype=torch.long), None, "7 tokens after the cache's 2 positions exceed the 8"),
            (
                torch.tensor([[5, 512]]),
                None,
                r"token id 512 at \[0, 1\] is outside the vocabulary \[0, 512\)",
            ),
            (torch.ones(1, 2, dtype=torch.long), torch.empty(2, dtype=torch.long), "argmax_out must be"),
        ]
        for tokens, argmax_out, message in refusals:
            with pytest.raises(ValueError, match=message):
                decoder.verify(tokens, argmax_out)
            assert cache.length == 2
        # the C entry points refuse outputs on the model's own arrays (weights, caches), which a step
        # would overwrite while reading them, and an argmax on the logits
        from neoxja import _decode

        weights = model.gpt_neox_japanese.embed_in.weight.detach()
        before, keys = weights.clone(), cache.keys[0].numpy().reshape(-1)  # 1024 values: two rows' logits
        two = np.array([[5, 6]])
        with pytest.raises(ValueError, match="verify: logits overlaps an array of the model"):
            _decode.verify(decoder._handle, two, 2, weights.numpy(), None, 1)
        with pytest.raises(ValueError, match="verify: t: 2 tokens at cache position 9223372036854775807"):
            _decode.verify(decoder._handle, two, 2**63 - 1, np.zeros((2, VOCAB), np.float32), None, 1)
        with pytest.raises(ValueError, match="step: logits overlaps an array of the model"):
            _decode.step(decoder._handle, 2, 2, two[0], None, 0, None, keys, None, 1)
        logits = np.zeros(2 * VOCAB + 2, np.float32)
        with pytest.raises(ValueError, match="step_slots: argmax overlaps logits"):
            argmax = logits.view(np.int64)[:2]
            _decode.step_slots(decoder._handle, 2, two[0], np.arange(2), np.full(2, 2), logits, argmax, 1)
        assert torch.equal(weights, before) and cache.length == 2
        decoder.verify(torch.ones(2, 6, dtype=torch.long))  # exactly up to max_length
        assert cache.length == 8


@needs_extension
def test_the_backend_verifies_in_c() -> None:
    """generate()'s C backend verifies drafts with one C call (explain_decoding says so), giving the
    logits of the PyTorch backend's forward."""
    from neoxja.decoding import CpuFusedBackend, TorchBackend, explain_decoding
    from neoxja.sample_utils import Sampler

    model = _model("threaded-layers-silu-yarn")
    assert "draft tokens verified in one C call" in explain_decoding(model)
    prompt, drafts = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7, 8, 9]])
    results = []
    calls = []
    original = FusedDecoder.verify
    with torch.inference_mode():
        for backend in (CpuFusedBackend, TorchBackend):
            cache = KVCache(model.config, 1, 16)
            decoding = backend(model, cache, 16, Sampler())
            decoding.prefill_logits(prompt, None, None)
            FusedDecoder.verify = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
            try:
                results.append(decoding.verify_logits(drafts).clone())
            finally:
                FusedDecoder.verify = original
            assert cache.length == 7
    assert calls == [1]
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
