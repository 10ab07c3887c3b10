"""The fast CPU kernels (int8 activations for nf4, fp4 and int8 weights; bfloat16 activations for
bfloat16 weights) and the whole-step C decoder over quantized models, on every instruction set.

Each check runs in a child of the fuzz workers (``fuzz_isolation``), one per kernel variant
(AVX-512, AVX-VNNI, AVX2, portable C: the extensions pick their kernels at import), against
``quant_reference``, a PyTorch model of the same arithmetic: the integer parts are exact there and
here, so a kernel may differ from the model only by its float32 fold. The fast products must also
stay within the arithmetic's own error of the exact ones, each row's result must not depend on
the rows beside it, and a row whose activation holds an infinity or NaN gives NaN in that row only.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_isolation import POOL, VARIANTS, Workers
from quant_reference import (
    assert_fold,
    block_scales,
    fast_reference_model,
    linear_4bit,
    linear_bf16,
    linear_int8,
)

from neoxja import cpu_decode
from neoxja.cache import KVCache
from neoxja.configuration import GPTNeoXJapaneseConfig
from neoxja.modeling import GPTNeoXJapaneseForCausalLM
from neoxja.quantization import formats, kernels
from neoxja.quantization.loading import quantize

MODULE = "test_quant_kernels"

pytestmark = pytest.mark.skipif(
    not (kernels.extension_available() and cpu_decode.extension_available())
    and os.environ.get("CI", "").lower() != "true",
    reason="neoxja._quant or neoxja._decode is not built",
)


@pytest.fixture(scope="module")
def workers() -> Workers:
    POOL.start(*VARIANTS)
    return POOL


def _cpu_flags() -> set[str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def expected_kernels(variant: str) -> dict[str, str] | None:
    """The kernels a variant must pick on this CPU (None where /proc/cpuinfo does not say)."""
    flags = _cpu_flags()
    if not flags:
        return None
    cap = {"native": 3, "avxvnni": 2, "avx2": 1, "scalar": 0}[variant]
    avx2 = {"avx2", "fma"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    ints = "scalar"
    if cap >= 1 and avx2:
        ints = "avx2"
    if cap >= 2 and avx2 and "avx_vnni" in flags:
        ints = "avx-vnni"
    if cap >= 3 and avx512 and "avx512_vnni" in flags:
        ints = "avx512-vnni"
    f32 = "avx512" if cap >= 3 and avx512 else "avx2" if cap >= 1 and avx2 else "scalar"
    bf16 = "avx512-bf16" if cap >= 3 and avx512 and "avx512_bf16" in flags else f32
    return {"int8": ints, "bfloat16": bf16, "float32": f32}


# ----- the kernels alone (in the workers' children) ----------------------------------------------


def _x(rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Rows with outliers, a zero block and a tail, as activations have them."""
    x = torch.randn(rows, n, generator=g) * torch.rand(rows, 1, generator=g).add(0.2)
    x[:, ::17] *= 8.0
    x[0, : min(n, 64)] = 0.0
    return x


def _product(fn: str, x: torch.Tensor, arithmetic: str, out: int, *tables) -> torch.Tensor:
    from neoxja import _quant

    y = torch.full((x.shape[0], out), float("nan"))
    if fn == "4bit":
        w, code, absmax, qabsmax, nabs, ncode, offset, blocksize = tables
        _quant.linear_4bit(
            x.numpy(), x.shape[0], x.shape[1], out, w, code, absmax, qabsmax, nabs, ncode, offset, blocksize,
            y.numpy(), 2, arithmetic,
        )  # fmt: skip
    else:
        w, scale = tables
        _quant.linear_dense(x.numpy(), x.shape[0], x.shape[1], out, w, scale, y.numpy(), 2, arithmetic)
    return y


def _check_rows_alone(fn: str, x: torch.Tensor, out: int, y: torch.Tensor, *tables) -> None:
    for r in range(x.shape[0]):
        alone = _product(fn, x[r : r + 1].clone(), "fast", out, *tables)
        assert torch.equal(alone[0], y[r]), f"{fn}: row {r} alone differs from the same row in a batch"


def check_4bit(p: dict) -> str:
    g = torch.Generator().manual_seed(p["seed"])
    out, n, blocksize, rows = p["out"], p["in"], p["blocksize"], p["rows"]
    weight = torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g).add(0.1)
    q = formats.quantize_4bit(weight, blocksize, p["quant_type"], p["nested"])
    nested = q.nested
    absmax = q.absmax.numpy()
    tables = (
        q.packed.numpy(), q.code.numpy(), None if nested else absmax, absmax if nested else None,
        q.nested_absmax.numpy() if nested else None, q.nested_code.numpy() if nested else None,
        q.offset, blocksize,
    )  # fmt: skip
    x = _x(rows, n, g)
    y = _product("4bit", x, "fast", out, *tables)
    scales = q.block_absmax()
    reference = linear_4bit(x, q.packed, q.code, scales, blocksize, out)
    magnitude = x.abs().double() @ block_scales(scales, blocksize, out, n).abs().double().T
    assert_fold(y, reference, magnitude, f"4-bit {p}")
    _check_rows_alone("4bit", x, out, y, *tables)
    # within the arithmetic's own error of the exact product: |x - q d| <= d / 2 per element, and
    # |code - lut / 127| <= 1 / 254 of the block's absmax per weight
    exact = _product("4bit", x, "exact", out, *tables)
    dense = q.dequantize(torch.float32)
    step = x.abs().view(rows, -1, 64).amax(-1).repeat_interleave(64, 1)[:, :n] / 127
    per_weight = block_scales(scales, blocksize, out, n) / 254
    bound = (step / 2) @ dense.abs().T + x.abs() @ per_weight.T
    assert bool(((y - exact).abs() <= bound * 1.01 + 1e-5).all()), "4-bit fast beyond its error bound"
    return "ok"


def check_int8(p: dict) -> str:
    g = torch.Generator().manual_seed(p["seed"])
    out, n, rows = p["out"], p["in"], p["rows"]
    weight, scb = formats.quantize_int8(torch.randn(out, n, generator=g))
    scale = (scb / 127.0).contiguous()
    x = _x(rows, n, g)
    tables = (weight.numpy(), scale.numpy())
    y = _product("int8", x, "fast", out, *tables)
    reference = linear_int8(x, weight, scale)
    assert_fold(y, reference, linear_int8(x.abs(), weight.abs(), scale), f"int8 {p}")
    _check_rows_alone("int8", x, out, y, *tables)
    exact = _product("int8", x, "exact", out, *tables)
    step = x.abs().view(rows, -1, 64).amax(-1) if n % 64 == 0 else None
    if step is not None:
        bound = (step.repeat_interleave(64, 1) / 254) @ (weight.abs().float() * scale[:, None]).T
        assert bool(((y - exact).abs() <= bound * 1.01 + 1e-5).all()), "int8 fast beyond its error bound"
    return "ok"


def check_bf16(p: dict) -> str:
    from neoxja import _quant

    g = torch.Generator().manual_seed(p["seed"])
    out, n, rows = p["out"], p["in"], p["rows"]
    weight = torch.randn(out, n, generator=g).bfloat16()
    x = _x(rows, n, g)
    tables = (weight.view(torch.int16).numpy(), None)
    y = _product("bf16", x, "fast", out, *tables)
    native = _quant.kernels()["bfloat16"] == "avx512-bf16"
    reference = linear_bf16(x, weight) if native else (x.double() @ weight.double().T).float()
    assert_fold(y, reference, x.abs().double() @ weight.abs().double().T, f"bf16 {p}")
    _check_rows_alone("bf16", x, out, y, *tables)
    return "ok"


def check_kernels(p: dict) -> dict:
    """Every product of the fast arithmetic on this process's kernels; returns their names."""
    from neoxja import _decode, _quant

    torch.set_num_threads(2)
    for case in p["4bit"]:
        check_4bit(case)
    for case in p["int8"]:
        check_int8(case)
    for case in p["bf16"]:
        check_bf16(case)
    # an activation holding an infinity or NaN: NaN in its row only
    g = torch.Generator().manual_seed(1)
    weight, scb = formats.quantize_int8(torch.randn(7, 128, generator=g))
    x = torch.randn(3, 128, generator=g)
    x[1, 5] = float("inf")
    x[2, 70] = float("nan")
    tables = (weight.numpy(), (scb / 127.0).numpy())
    y = _product("int8", x, "fast", 7, *tables)
    assert torch.isnan(y[1:]).all() and torch.isfinite(y[0]).all(), y
    assert torch.equal(y[0], _product("int8", x[:1].clone(), "fast", 7, *tables)[0])
    return {"quant": _quant.kernels(), "decode": _decode.kernels()}


KERNEL_CASES = {
    "4bit": [
        dict(seed=1, out=37, **{"in": 256}, blocksize=64, nested=False, rows=1, quant_type="nf4"),
        dict(seed=2, out=17, **{"in": 320}, blocksize=32, nested=True, rows=3, quant_type="fp4"),
        dict(seed=3, out=9, **{"in": 1024}, blocksize=256, nested=True, rows=9, quant_type="nf4"),
        dict(seed=4, out=21, **{"in": 192}, blocksize=64, nested=True, rows=17, quant_type="nf4"),
        dict(seed=5, out=300, **{"in": 640}, blocksize=128, nested=True, rows=2, quant_type="nf4"),
    ],
    "int8": [
        dict(seed=6, out=33, **{"in": 100}, rows=1),
        dict(seed=7, out=8, **{"in": 1280}, rows=5),
        dict(seed=8, out=19, **{"in": 64}, rows=12),
        dict(seed=9, out=5, **{"in": 37}, rows=3),
    ],
    "bf16": [
        dict(seed=10, out=33, **{"in": 100}, rows=1),
        dict(seed=11, out=12, **{"in": 512}, rows=9),
        dict(seed=12, out=3, **{"in": 7}, rows=2),
    ],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_kernels_compute_their_arithmetic(workers: Workers, variant: str) -> None:
    """On each instruction set: the fast products equal the integer model within the float fold,
    stay within the arithmetic's error of the exact ones, and never mix rows."""
    result = workers.run(variant, MODULE, "check_kernels", KERNEL_CASES)
    assert result["kind"] == "ok", result
    expected = expected_kernels(variant)
    if expected is not None:
        names = result["detail"]
        assert names["quant"]["int8"] == names["decode"]["int8"] == expected["int8"], names
        assert names["quant"]["bfloat16"] == names["decode"]["bfloat16"] == expected["bfloat16"], names
        assert names["decode"]["float32"] == expected["float32"], names


def test_fast_arguments_are_checked() -> None:
    """What only the fast arithmetic refuses, and a bad arithmetic, are named."""
    from neoxja import _quant

    x, y = np.ones((1, 64), np.float32), np.zeros((1, 2), np.float32)
    w, code, absmax = np.zeros(64, np.uint8), np.linspace(-1, 1, 16, dtype=np.float32), np.ones(2, np.float32)
    with pytest.raises(ValueError, match="arithmetic must be 'fast' or 'exact'"):
        _quant.linear_4bit(x, 1, 64, 2, w, code, absmax, None, None, None, 0.0, 64, y, 1, "medium")
    with pytest.raises(TypeError, match="arithmetic must be 'fast' or 'exact'"):
        _quant.linear_dense(x, 1, 64, 2, np.zeros(128, np.int8), np.ones(2, np.float32), y, 1, 1)
    with pytest.raises(ValueError, match="code must hold values in"):
        _quant.linear_4bit(x, 1, 64, 2, w, code * 2, absmax, None, None, None, 0.0, 64, y, 1, "fast")
    x96, y96 = np.ones((1, 96), np.float32), np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        _quant.linear_4bit(
            x96, 1, 96, 2, np.zeros(96, np.uint8), code, absmax, None, None, None, 0.0, 96, y96, 1, "fast"
        )
    _quant.linear_4bit(
        x96, 1, 96, 2, np.zeros(96, np.uint8), code, absmax, None, None, None, 0.0, 96, y96, 1, "exact"
    )
    assert np.allclose(y96, -96.0)  # code[0] = -1 times absmax 1 over 96 ones


# ----- the whole-step decoder over quantized models ------------------------------------------------

DECODER = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
FORMATS = [("nf4", {"double_quant": True}), ("fp4", {"blocksize": 32}), ("int8", {}), ("bfloat16", {})]


def _tiny(seed: int = 0) -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**DECODER)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.02)
    return model


def check_decoder(p: dict) -> str:
    """Per format and arithmetic: the C step's logits against the PyTorch forward of the same
    arithmetic (over a cache that forward filled), each row of a batch against that row alone (bit
    for bit), and the greedy tokens of generate() against the PyTorch path of the same arithmetic."""
    from neoxja import _decode

    torch.set_num_threads(2)
    native_bf16 = _decode.kernels()["bfloat16"] == "avx512-bf16"
    base = _tiny()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, DECODER["vocab_size"], (3, 6), generator=g)
    rows, length = ids.shape[0], ids.shape[1] - 1
    for fmt, options in FORMATS:
        for arithmetic in ("exact", "fast"):
            what = f"{fmt} {arithmetic}"
            model = quantize(copy.deepcopy(base), fmt, cpu_arithmetic=arithmetic, **options)
            assert cpu_decode.fused_decoding_unsupported(model, 16) is None, what
            reference = model if arithmetic == "exact" else fast_reference_model(model, native_bf16)
            cache = KVCache(model.config, rows, 16)
            with torch.inference_mode():
                expected = reference(ids).logits[:, -1]
                reference(ids[:, :-1], past_key_values=cache, use_cache=True)
            decoder = cpu_decode.FusedDecoder(model, cache, 16)
            logits = decoder.step(ids[:, -1]).clone()
            scale = float(expected.abs().max())
            tolerance = (2e-5 if arithmetic == "exact" else 2e-3) * scale
            torch.testing.assert_close(logits, expected, rtol=0, atol=tolerance, msg=what)
            lengths = torch.full((rows,), length)
            crowd = decoder.step_slots(ids[:, -1].contiguous(), torch.arange(rows), lengths).clone()
            assert torch.equal(crowd, logits), f"{what}: step_slots differs from step"
            for row in range(rows):
                token = ids[row : row + 1, -1].contiguous()
                alone = decoder.step_slots(token, torch.tensor([row]), lengths[:1])
                assert torch.equal(alone[0], logits[row]), f"{what}: row {row} alone differs"
            prompt = ids[:1, :4]
            ours = model.generate(prompt, max_new_tokens=8, do_sample=False)
            theirs = reference.generate(prompt, max_new_tokens=8, do_sample=False)
            assert torch.equal(ours, theirs), f"{what}: greedy tokens {ours} vs {theirs}"
    return "ok"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoder_on_quantized_models(workers: Workers, variant: str) -> None:
    """The whole-step decoder takes nf4, fp4, int8 and bfloat16 models in both arithmetics, on every
    instruction set: the PyTorch forward's logits (exact: float32 rounding; fast: that of its int8 or
    bfloat16 arithmetic, against a PyTorch model of it), rows independent of their batch, and the
    greedy tokens of the PyTorch path of the same arithmetic."""
    result = workers.run(variant, MODULE, "check_decoder", {})
    assert result["kind"] == "ok", result


def test_explain_decoding_names_each_format_and_kernel() -> None:
    import neoxja
    from neoxja import _decode

    names = _decode.kernels()
    model = quantize(_tiny(), "nf4", cpu_arithmetic="fast")
    text = neoxja.explain_decoding(model)
    assert text.startswith("cpu-fused: ")
    assert f"nf4 with int8 activations ({names['int8']}); head float32 ({names['float32']})" in text
    exact = quantize(_tiny(), "int8", cpu_arithmetic="exact")
    assert f"int8 in float32 ({names['exact']})" in neoxja.explain_decoding(exact)
