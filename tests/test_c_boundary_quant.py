"""Fuzzing the quantized matrix products at the C boundary.

Hypothesis draws shapes, dtypes, layouts (contiguous or strided), tables and at most one defect per
case; every case runs in a child process of a long-lived worker (``fuzz_isolation``), so a crash
fails the test and names the case. A case without a defect must give the PyTorch reference result
(the dequantized matrix product and its gradient); a case with one must be refused by a ValueError or
TypeError that names the argument. Covered: the public custom ops (``torch.ops.neoxja.linear_4bit``,
``linear_int8``, ``linear_bf16``) and the C functions of ``neoxja._quant`` called directly (they are
importable), on each of the quantized kernels (AVX-512, AVX2, portable C).
``NEOXJA_FUZZ_EXAMPLES=2000`` for a long run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import quant_reference
import torch
from fuzz_isolation import POOL, VARIANTS, Workers, check_outcome, fuzz
from hypothesis import given
from hypothesis import strategies as st

import neoxja.quantization.ops  # noqa: F401 - registers torch.ops.neoxja.*
from neoxja.quantization import kernels
from neoxja.quantization.formats import dequantize_blockwise

MODULE = "test_c_boundary_quant"

pytestmark = pytest.mark.skipif(
    not kernels.extension_available() and os.environ.get("CI", "").lower() != "true",
    reason="neoxja._quant is not built",
)


@pytest.fixture(scope="module")
def workers() -> Workers:
    POOL.start(*VARIANTS)  # every kernel's worker, importing at once
    return POOL


# ----- helpers of the child processes ------------------------------------------------------------

FLOATS = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a view that is not contiguous (every other element of a larger buffer)."""
    if t.numel() < 2:
        return t
    strides, step = [], 2
    for size in reversed(t.shape):
        strides.insert(0, step)
        step *= size
    view = torch.zeros(2 * t.numel(), dtype=t.dtype).as_strided(t.shape, strides)
    return view.copy_(t)


def _setup(p: dict) -> torch.Generator:
    torch.set_num_threads(p["threads"])
    return torch.Generator().manual_seed(p["seed"])


# ----- torch.ops.neoxja.linear_4bit -------------------------------------------------------------

OP_4BIT_DEFECTS = {
    "out_features_more": {"out_features", "packed"},
    "out_features_fewer": {"out_features", "packed"},
    "x_wider": {"x", "in_features", "packed"},
    "x_narrower": {"x", "in_features", "packed"},
    "x_integer": {"x"},
    "x_scalar": {"x"},
    "packed_int8": {"packed"},
    "packed_short": {"packed"},
    "code_short": {"code"},
    "code_float64": {"code"},
    "code_on_meta": {"code"},
    "absmax_float16": {"absmax"},
    "absmax_short": {"absmax"},
    "absmax_long": {"absmax"},
    "blocksize_zero": {"blocksize"},
}
NESTED_DEFECTS = {
    "nested_absmax_missing": {"nested_absmax", "nested_code"},
    "nested_code_missing": {"nested_absmax", "nested_code"},
    "nested_code_short": {"nested_code"},
    "nested_absmax_short": {"nested_absmax"},
    "nested_absmax_float16": {"nested_absmax"},
}
PLAIN_DEFECTS = {"stray_nested_tables": {"nested_absmax", "nested_code"}}
TABLES = ("x", "packed", "absmax", "code", "nested_absmax", "nested_code")


@st.composite
def op_4bit_cases(draw: st.DrawFn) -> dict:
    blocksize = draw(st.sampled_from([2, 16, 32, 64, 128, 256]))
    nested = draw(st.booleans())
    defects = {**OP_4BIT_DEFECTS, **(NESTED_DEFECTS if nested else PLAIN_DEFECTS)}
    return {
        "seed": draw(st.integers(0, 2**31)),
        "variant": draw(st.sampled_from(sorted(VARIANTS))),
        "threads": draw(st.integers(1, 3)),
        "blocksize": blocksize,
        "out": draw(st.integers(1, 40)),
        "in": draw(st.one_of(st.integers(1, 4).map(lambda k: k * blocksize), st.integers(1, 300))),
        "lead": draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)),
        "dtype": draw(st.sampled_from(sorted(FLOATS))),
        "nested": nested,
        "strided": draw(st.lists(st.sampled_from(TABLES), unique=True, max_size=3)),
        "defect": draw(st.one_of(st.none(), st.sampled_from(sorted(defects)))),
    }


def run_op_4bit(p: dict) -> str:
    g = _setup(p)
    out, in_, blocksize = p["out"], p["in"], p["blocksize"]
    n = out * in_
    blocks = -(-n // blocksize)
    args = {
        "x": torch.randn(*p["lead"], in_, generator=g).to(FLOATS[p["dtype"]]),
        "packed": torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8),
        "absmax": torch.rand(blocks, generator=g) + 0.1,
        "code": torch.rand(16, generator=g) * 2 - 1,
        "nested_absmax": None,
        "nested_code": None,
    }
    offset = 0.0
    if p["nested"]:
        args["absmax"] = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
        args["nested_absmax"] = torch.rand(-(-blocks // 256), generator=g)
        args["nested_code"] = torch.rand(256, generator=g) * 2 - 1
        offset = float(torch.rand(1, generator=g))
    weight = quant_reference.weight_4bit(
        args["packed"], args["absmax"], args["code"], blocksize, out, in_,
        args["nested_absmax"], args["nested_code"], offset,
    )  # fmt: skip
    for name in p["strided"]:
        if args[name] is not None:
            args[name] = _strided(args[name])
    x = args["x"]
    defect = p["defect"]
    wider = torch.ones(*p["lead"], in_ + 1).to(x.dtype)
    changed = {
        # Two more rows: one more row of a one-column weight can fit the same bytes and blocks (a
        # 2x1 weight is stored exactly as a 1x1 one is, padding nibble included), which is no defect.
        "out_features_more": {"out": out + 2},
        "out_features_fewer": {"out": out - 1},
        "x_wider": {"x": wider},
        "x_narrower": {"x": x[..., :-1]},
        "x_integer": {"x": x.to(torch.int64)},
        "x_scalar": {"x": torch.tensor(1.0)},
        "packed_int8": {"packed": args["packed"].view(torch.int8)},
        "packed_short": {"packed": args["packed"].reshape(-1)[:-1]},
        "code_short": {"code": args["code"][:8]},
        "code_float64": {"code": args["code"].double()},
        "code_on_meta": {"code": args["code"].to("meta")},
        "absmax_float16": {"absmax": args["absmax"].half()},
        "absmax_short": {"absmax": args["absmax"][:-1]},
        "absmax_long": {"absmax": torch.cat([args["absmax"], args["absmax"][:1]])},
        "blocksize_zero": {"blocksize": 0},
        "nested_absmax_missing": {"nested_absmax": None},
        "nested_code_missing": {"nested_code": None},
        "nested_code_short": {"nested_code": torch.zeros(255)},
        "nested_absmax_short": {"nested_absmax": torch.zeros(-(-blocks // 256) - 1)},
        "nested_absmax_float16": {"nested_absmax": torch.ones(-(-blocks // 256), dtype=torch.float16)},
        "stray_nested_tables": {
            "nested_absmax": torch.ones(-(-blocks // 256)),
            "nested_code": torch.zeros(256),
        },
    }.get(defect, {})
    args.update(changed)
    tables = (
        args["packed"],
        args["absmax"],
        args["code"],
        args["nested_absmax"],
        args["nested_code"],
        offset,
    )
    x_in = args["x"].detach().requires_grad_(args["x"].is_floating_point())
    y = torch.ops.neoxja.linear_4bit(
        x_in, *tables, changed.get("blocksize", blocksize), changed.get("out", out)
    )
    detail = quant_reference.assert_product(y.detach(), x, weight)
    if x_in.requires_grad and y.numel():  # the backward (QLoRA's) dequantizes through the same checks
        grad = torch.ones_like(y)
        y.backward(grad)
        quant_reference.assert_product(x_in.grad, grad.to(x.dtype), weight.T.contiguous())
    return detail


@fuzz(60)
@given(case=op_4bit_cases())
def test_linear_4bit_op_refuses_or_multiplies(workers: Workers, case: dict) -> None:
    result = workers.run(case["variant"], MODULE, "run_op_4bit", case)
    defects = {**OP_4BIT_DEFECTS, **NESTED_DEFECTS, **PLAIN_DEFECTS}
    check_outcome(result, defects.get(case["defect"], set()), case)


# ----- torch.ops.neoxja.linear_int8 and linear_bf16 ---------------------------------------------

DENSE_DEFECTS = {
    "weight_dtype": {"weight"},
    "weight_flat": {"weight"},
    "weight_3d": {"weight"},
    "weight_on_meta": {"weight"},
    "x_wider": {"x"},
    "x_integer": {"x"},
}
INT8_DEFECTS = {"scb_short": {"scb"}, "scb_column": {"scb"}, "scb_integer": {"scb"}}


@st.composite
def op_dense_cases(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["int8", "bf16"]))
    defects = {**DENSE_DEFECTS, **(INT8_DEFECTS if kind == "int8" else {})}
    return {
        "seed": draw(st.integers(0, 2**31)),
        "variant": draw(st.sampled_from(sorted(VARIANTS))),
        "threads": draw(st.integers(1, 3)),
        "kind": kind,
        "out": draw(st.integers(1, 40)),
        "in": draw(st.integers(1, 200)),
        "lead": draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)),
        "dtype": draw(st.sampled_from(sorted(FLOATS))),
        "scb_dtype": draw(st.sampled_from(["float32", "float16", "float64"])),
        "strided": draw(st.lists(st.sampled_from(["x", "weight", "scb"]), unique=True, max_size=3)),
        "defect": draw(st.one_of(st.none(), st.sampled_from(sorted(defects)))),
    }


def run_op_dense(p: dict) -> str:
    g = _setup(p)
    out, in_ = p["out"], p["in"]
    x = torch.randn(*p["lead"], in_, generator=g).to(FLOATS[p["dtype"]])
    if p["kind"] == "int8":
        weight = torch.randint(-127, 128, (out, in_), generator=g, dtype=torch.int8)
        scb = (torch.rand(out, generator=g) + 0.5).to(FLOATS[p["scb_dtype"]])
        dense = weight.double() * (scb.float() / 127.0).double()[:, None]
    else:
        weight = torch.randn(out, in_, generator=g).to(torch.bfloat16)
        scb, dense = None, weight.double()
    args = {"x": x, "weight": weight, "scb": scb}
    for name in p["strided"]:
        if args[name] is not None:
            args[name] = _strided(args[name])
    other = torch.uint8 if p["kind"] == "int8" else torch.float16
    args.update(
        {
            "weight_dtype": {"weight": weight.to(other)},
            "weight_flat": {"weight": weight.reshape(-1)},
            "weight_3d": {"weight": weight[None]},
            "weight_on_meta": {"weight": weight.to("meta")},
            "x_wider": {"x": torch.ones(*p["lead"], in_ + 1).to(x.dtype)},
            "x_integer": {"x": x.to(torch.int64)},
            "scb_short": {"scb": scb[:-1] if scb is not None else None},
            "scb_column": {"scb": scb[:, None] if scb is not None else None},
            "scb_integer": {"scb": scb.long() if scb is not None else None},
        }.get(p["defect"], {})
    )
    if p["kind"] == "int8":
        y = torch.ops.neoxja.linear_int8(args["x"], args["weight"], args["scb"])
    else:
        y = torch.ops.neoxja.linear_bf16(args["x"], args["weight"])
    return quant_reference.assert_product(y, x, dense)


@fuzz(40)
@given(case=op_dense_cases())
def test_int8_and_bf16_ops_refuse_or_multiply(workers: Workers, case: dict) -> None:
    result = workers.run(case["variant"], MODULE, "run_op_dense", case)
    check_outcome(result, {**DENSE_DEFECTS, **INT8_DEFECTS}.get(case["defect"], set()), case)


# ----- neoxja._quant called directly -------------------------------------------------------------

C_FUNCTIONS = ["linear_4bit", "dequantize_4bit", "linear_dense", "linear_dense_bf16"]
ARRAY_DEFECTS = ["short", "long", "dtype", "strided", "misaligned", "tensor", "none", "readonly"]
DIM_DEFECTS = {
    "rows_zero": {"rows"},
    "rows_negative": {"rows"},
    "arithmetic_unknown": {"arithmetic"},
    "arithmetic_int": {"arithmetic"},
    "blocksize_odd": {"blocksize"},
    "in_zero": {"in_features"},
    "out_zero": {"out_features"},
    "in_huge": {"in_features", "out_features", "w", "x"},
    "first_negative": {"rows"},
    "count_beyond": {"rows"},
    "in_float": {"in_features"},
    "blocksize_none": {"blocksize"},
    "threads_huge": {"threads"},
    "offset_text": {"offset"},
}
DIM_DEFECTS_OF = {
    "linear_4bit": {
        "rows_zero",
        "rows_negative",
        "arithmetic_unknown",
        "arithmetic_int",
        "blocksize_odd",
        "in_zero",
        "out_zero",
        "in_huge",
        "in_float",
        "blocksize_none",
        "threads_huge",
        "offset_text",
    },
    "dequantize_4bit": {
        "blocksize_odd",
        "in_zero",
        "out_zero",
        "in_huge",
        "first_negative",
        "count_beyond",
        "in_float",
        "blocksize_none",
        "threads_huge",
        "offset_text",
    },
    "linear_dense": {
        "rows_zero",
        "rows_negative",
        "arithmetic_unknown",
        "arithmetic_int",
        "in_zero",
        "out_zero",
        "in_huge",
        "in_float",
        "threads_huge",
    },
}
DIM_DEFECTS_OF["linear_dense_bf16"] = DIM_DEFECTS_OF["linear_dense"]


def _c_arrays(p: dict) -> dict[str, tuple[int, int]]:
    """(element count, item size) of each array the case's C function takes."""
    fn, rows, in_, out, blocks = p["fn"], p["rows"], p["in"], p["out"], p["out"] * p["in"] // p["blocksize"]
    if fn.startswith("linear_dense"):
        scale = {"scale": (out, 4)} if fn == "linear_dense" else {}
        return {"x": (rows * in_, 4), "w": (out * in_, 1 if scale else 2), **scale, "y": (rows * out, 4)}
    tables = {"w": (out * in_ // 2, 1), "code": (16, 4)}
    if p["nested"]:
        tables.update(
            {"qabsmax": (blocks, 1), "nested_absmax": (-(-blocks // 256), 4), "nested_code": (256, 4)}
        )
    else:
        tables["absmax"] = (blocks, 4)
    if fn == "dequantize_4bit":
        return {**tables, "y": (p["count"] * in_, 4)}
    return {"x": (rows * in_, 4), **tables, "y": (rows * out, 4)}


@st.composite
def c_quant_cases(draw: st.DrawFn) -> dict:
    fn = draw(st.sampled_from(C_FUNCTIONS))
    blocksize = draw(st.sampled_from([32, 64, 96, 128] if fn == "linear_4bit" else [2, 4, 32, 64]))
    out = draw(st.integers(1, 24))
    first = draw(st.integers(0, out - 1))
    p = {
        "seed": draw(st.integers(0, 2**31)),
        "variant": draw(st.sampled_from(sorted(VARIANTS))),
        "fn": fn,
        "rows": draw(st.integers(1, 12)),
        "arithmetic": draw(st.sampled_from(["exact", "fast"])),
        "in": blocksize * draw(st.integers(1, 5)),
        "out": out,
        "first": first,
        "count": draw(st.integers(0, out - first)),
        "blocksize": blocksize,
        "nested": not fn.startswith("linear_dense") and draw(st.booleans()),
        "threads": draw(st.sampled_from([-3, 0, 1, 2, 3, 1000])),
    }
    names = sorted(_c_arrays(p))
    p["defect"] = draw(
        st.one_of(
            st.none(),
            st.tuples(st.sampled_from(names), st.sampled_from(ARRAY_DEFECTS)),
            st.just(("y", "overlap")),
            st.tuples(st.just("dims"), st.sampled_from(sorted(DIM_DEFECTS_OF[fn]))),
        )
    )
    return p


def _fast_blocksize_refused(p: dict) -> bool:
    """The fast 4-bit kernels take power-of-two blocks only (as bitsandbytes writes them)."""
    blocksize = p["blocksize"]
    return p["fn"] == "linear_4bit" and p["arithmetic"] == "fast" and blocksize & (blocksize - 1) != 0


def c_quant_expected(p: dict) -> set[str]:
    """The names a refusal of this case must mention (empty: the case is valid)."""
    if p["defect"] is None:
        return {"blocksize"} if _fast_blocksize_refused(p) else set()
    where, kind = p["defect"]
    if where == "dims":
        return DIM_DEFECTS[kind]
    if _fast_blocksize_refused(p):  # checked before the arrays
        return {"blocksize"}
    count, itemsize = _c_arrays(p)[where]
    harmless = (
        kind == "readonly" and where != "y"  # inputs may be read-only
        or kind == "strided" and count <= 1  # one element is contiguous whatever its stride
        or kind == "misaligned" and (itemsize == 1 or count == 0)
        or kind == "overlap" and count == 0
    )  # fmt: skip
    if harmless:
        return set()
    if kind == "none" and where in ("absmax", "qabsmax"):
        return {"absmax", "qabsmax"}
    if kind == "none" and where == "scale":
        return {"w"}  # without a scale the weight must be bfloat16, which an int8 one is not
    return {where}


def _defective(array: np.ndarray, kind: str) -> object:
    flat = array.reshape(-1)
    if kind == "short":
        return flat[:-1].copy() if flat.size else np.zeros(1, array.dtype)
    if kind == "long":
        return np.concatenate([flat, np.zeros(1, array.dtype)])
    if kind == "dtype":
        other = {"float32": np.float64, "uint8": np.int8, "int8": np.uint8, "int16": np.float16}
        return array.astype(other[array.dtype.name])
    if kind == "strided":
        wide = np.zeros(2 * flat.size, array.dtype)
        wide[::2] = flat
        return wide[::2]
    if kind == "misaligned":  # one byte past an aligned address (still aligned for 1-byte items)
        moved = np.frombuffer(np.zeros(array.nbytes + 1, np.uint8), array.dtype, flat.size, offset=1)
        moved[:] = flat
        return moved
    if kind == "tensor":
        return torch.from_numpy(array)
    if kind == "none":
        return None
    if kind == "readonly":
        frozen = array.copy()
        frozen.setflags(write=False)
        return frozen
    raise AssertionError(kind)


def run_c_quant(p: dict) -> str:
    from neoxja import _quant

    rng = np.random.default_rng(p["seed"])
    fn, rows, in_, out, blocksize = p["fn"], p["rows"], p["in"], p["out"], p["blocksize"]
    first, count = p["first"], p["count"]
    arrays: dict = {
        name: None for name in ("x", "absmax", "qabsmax", "nested_absmax", "nested_code", "scale")
    }
    for name, (size, _) in _c_arrays(p).items():
        if name in ("w", "qabsmax"):
            arrays[name] = rng.integers(0, 256, size, dtype=np.uint8)
        else:
            arrays[name] = rng.uniform(0.1 if "absmax" in name else -1, 1, size).astype(np.float32)
    if fn == "linear_dense":
        arrays["w"] = rng.integers(-127, 128, out * in_, dtype=np.int8)
        arrays["scale"] *= 0.01
    elif fn == "linear_dense_bf16":
        arrays["w"] = (
            torch.from_numpy(rng.standard_normal(out * in_, np.float32)).bfloat16().view(torch.int16)
        )
        arrays["w"] = arrays["w"].numpy()
    arrays["y"][:] = 0
    offset = float(rng.uniform(0, 0.5)) if p["nested"] else 0.0
    t = {k: None if v is None else torch.from_numpy(v.copy()) for k, v in arrays.items()}
    if fn == "linear_dense":
        weight = t["w"].double().view(out, in_) * t["scale"].double()[:, None]
    elif fn == "linear_dense_bf16":
        weight = t["w"].view(torch.bfloat16).double().view(out, in_)
    else:
        scales = t["qabsmax"] if p["nested"] else t["absmax"]
        nested = (t["nested_absmax"], t["nested_code"], offset)
        weight = quant_reference.weight_4bit(t["w"], scales, t["code"], blocksize, out, in_, *nested)
    dims = {"rows": rows, "in": in_, "out": out, "blocksize": blocksize, "first": first, "count": count,
            "threads": p["threads"], "offset": offset, "arithmetic": p["arithmetic"]}  # fmt: skip
    where, kind = p["defect"] or (None, None)
    if where == "dims":
        dims.update({
            "rows_zero": {"rows": 0}, "rows_negative": {"rows": -1}, "arithmetic_int": {"arithmetic": 1},
            "arithmetic_unknown": {"arithmetic": "medium"}, "blocksize_odd": {"blocksize": blocksize + 1},
            "in_zero": {"in": 0}, "out_zero": {"out": 0}, "in_huge": {"in": 2**62},
            "first_negative": {"first": -1}, "count_beyond": {"count": out - first + 1},
            "in_float": {"in": float(in_)}, "blocksize_none": {"blocksize": None},
            "threads_huge": {"threads": 2**70}, "offset_text": {"offset": "0.5"},
        }[kind])  # fmt: skip
    elif kind == "overlap":  # y over the memory of the first input
        source = "x" if arrays["x"] is not None else "code"
        shared = np.zeros(max(arrays[source].size, arrays["y"].size), np.float32)
        shared[: arrays[source].size] = arrays[source]
        arrays[source], arrays["y"] = shared[: arrays[source].size], shared[: arrays["y"].size]
    elif where is not None:
        arrays[where] = _defective(arrays[where], kind)
    a, d = arrays, dims
    if fn == "linear_4bit":
        tables = (
            a["absmax"],
            a["qabsmax"],
            a["nested_absmax"],
            a["nested_code"],
            d["offset"],
            d["blocksize"],
        )
        _quant.linear_4bit(
            a["x"], d["rows"], d["in"], d["out"], a["w"], a["code"], *tables, a["y"], d["threads"],
            d["arithmetic"],
        )  # fmt: skip
    elif fn == "dequantize_4bit":
        tables = (
            a["absmax"],
            a["qabsmax"],
            a["nested_absmax"],
            a["nested_code"],
            d["offset"],
            d["blocksize"],
        )
        rows_of = (d["first"], d["count"], d["out"], d["in"])
        _quant.dequantize_4bit(*rows_of, a["w"], a["code"], *tables, a["y"], d["threads"])
        y, expected = torch.from_numpy(np.asarray(a["y"])).double(), weight[first : first + count].reshape(-1)
        assert torch.allclose(y, expected, rtol=1e-6, atol=1e-6), (
            "the dequantized rows differ from the format"
        )
        return f"{count} rows"
    else:
        shape = (d["rows"], d["in"], d["out"])
        _quant.linear_dense(a["x"], *shape, a["w"], a["scale"], a["y"], d["threads"], d["arithmetic"])
    y = torch.from_numpy(np.asarray(a["y"])).view(rows, out)
    x = t["x"].view(rows, in_)
    if p["arithmetic"] == "fast":
        return _assert_fast(p, y, x, t, offset)
    return quant_reference.assert_product(y, x, weight)


def _assert_fast(p: dict, y: torch.Tensor, x: torch.Tensor, t: dict, offset: float) -> str:
    """A valid fast product equals the PyTorch model of its arithmetic within the float fold."""
    from neoxja import _quant

    fn, in_, out, blocksize = p["fn"], p["in"], p["out"], p["blocksize"]
    if fn == "linear_4bit":
        if p["nested"]:
            absmax = dequantize_blockwise(t["qabsmax"], t["nested_absmax"], t["nested_code"]) + offset
        else:
            absmax = t["absmax"]
        reference = quant_reference.linear_4bit(x, t["w"], t["code"], absmax, blocksize, out)
        scales = quant_reference.block_scales(absmax, blocksize, out, in_)
        magnitude = x.abs().double() @ scales.abs().double().T
    elif fn == "linear_dense":
        weight = t["w"].view(out, in_)
        reference = quant_reference.linear_int8(x, weight, t["scale"])
        magnitude = quant_reference.linear_int8(x.abs(), weight.abs(), t["scale"].abs())
    else:
        weight = t["w"].view(torch.bfloat16).view(out, in_)
        native = _quant.kernels()["bfloat16"] == "avx512-bf16"
        reference = quant_reference.linear_bf16(x, weight) if native else (x.double() @ weight.double().T)
        magnitude = x.abs().double() @ weight.abs().double().T
    quant_reference.assert_fold(y, reference, magnitude, f"{fn} fast")
    return f"fast, max error {float((y.double() - reference.double()).abs().max()):.2e}"


@fuzz(100)
@given(case=c_quant_cases())
def test_quant_c_functions_refuse_or_multiply(workers: Workers, case: dict) -> None:
    result = workers.run(case["variant"], MODULE, "run_c_quant", case)
    check_outcome(result, c_quant_expected(case), case)


def test_the_ops_check_shapes_without_data() -> None:
    """On meta tensors (what torch.compile traces with) the ops' fake implementations refuse what the
    real ones refuse, naming the argument, before any kernel could run."""
    x = torch.empty(2, 64, device="meta")
    packed = torch.empty(32 * 64 // 2, 1, dtype=torch.uint8, device="meta")
    absmax, code = torch.empty(32, device="meta"), torch.empty(16, device="meta")
    linear_4bit = torch.ops.neoxja.linear_4bit
    assert linear_4bit(x, packed, absmax, code, None, None, 0.0, 64, 32).shape == (2, 32)
    with pytest.raises(ValueError, match=r"packed holds 1024 values; .*out_features=33"):
        linear_4bit(x, packed, absmax, code, None, None, 0.0, 64, 33)
    with pytest.raises(ValueError, match="absmax must be float32 or uint8, got float16"):
        linear_4bit(x, packed, absmax.half(), code, None, None, 0.0, 64, 32)
    with pytest.raises(ValueError, match="code holds 8 values"):
        linear_4bit(x, packed, absmax, code[:8], None, None, 0.0, 64, 32)
    with pytest.raises(ValueError, match="needs nested_absmax and nested_code"):
        linear_4bit(x, packed, absmax.to(torch.uint8), code, None, None, 0.0, 64, 32)
    weight = torch.empty(32, 64, dtype=torch.int8, device="meta")
    assert torch.ops.neoxja.linear_int8(x, weight, torch.empty(32, device="meta")).shape == (2, 32)
    with pytest.raises(ValueError, match=r"scb has shape \[31\]"):
        torch.ops.neoxja.linear_int8(x, weight, torch.empty(31, device="meta"))
    with pytest.raises(ValueError, match="weight must be bfloat16, got float16"):
        torch.ops.neoxja.linear_bf16(x, weight.half())
    with pytest.raises(ValueError, match=r"x has shape \[2, 65\]"):
        torch.ops.neoxja.linear_bf16(torch.empty(2, 65, device="meta"), weight.bfloat16())
