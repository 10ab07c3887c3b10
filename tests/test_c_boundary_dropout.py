"""Fuzzing the dropout masks' C function (``neoxja._dropout.drop``) at its boundary, each case in a
child process (``fuzz_isolation``): random sizes (past the point where it starts threads), dtypes,
layouts (strided, read-only, misaligned, not an array), keys and thresholds at and beyond their
limits. A valid case must equal the mask formula computed here in numpy, bit for bit; a defective one
must be refused by a ValueError or TypeError naming the argument.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fuzz_isolation import POOL, Workers, check_outcome, fuzz
from hypothesis import given
from hypothesis import strategies as st

from neoxja import dropout_attention

MODULE = "test_c_boundary_dropout"

pytestmark = pytest.mark.skipif(
    dropout_attention._dropout is None and os.environ.get("CI", "").lower() != "true",
    reason="neoxja._dropout is not built",
)


@pytest.fixture(scope="module")
def workers() -> Workers:
    return POOL


# ----- neoxja._dropout.drop ------------------------------------------------------------------------

DROP_LAYOUT_DEFECTS = ["strided", "readonly", "tensor", "bytes", "misaligned"]


@st.composite
def drop_cases(draw: st.DrawFn) -> dict:
    key = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**32, 2**64, 2**70]))
    return {
        "seed": draw(st.integers(0, 2**31)),
        "n": draw(st.one_of(st.integers(0, 64), st.integers(60_000, 200_000))),
        "dtype": draw(st.sampled_from(["float32", "float64", "float16", "int32"])),
        "layout": draw(st.one_of(st.none(), st.sampled_from(DROP_LAYOUT_DEFECTS))),
        "k1": draw(key),
        "k2": draw(key),
        "threshold": draw(st.one_of(st.integers(0, 2**24), st.sampled_from([-1, 2**24 + 1, 1.5]))),
        "scale": draw(st.floats(0, 10)),
        "threads": draw(st.sampled_from([-1, 0, 1, 2, 3, 65, 1000])),
    }


def drop_expected(p: dict) -> set[str]:
    names = set()
    if p["dtype"] not in ("float32", "float64") or p["layout"] in ("readonly", "tensor", "bytes"):
        names.add("x")
    if p["layout"] == "strided" and p["n"] > 1 or p["layout"] == "misaligned" and p["n"] > 0:
        names.add("x")
    for key in ("k1", "k2"):
        if not 0 <= p[key] < 2**32:
            names.add(key)
    if not (isinstance(p["threshold"], int) and 0 <= p["threshold"] <= 2**24):
        names.add("threshold")
    return names


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def run_drop(p: dict) -> str:
    from neoxja import _dropout

    rng = np.random.default_rng(p["seed"])
    values = rng.standard_normal(p["n"]).astype(p["dtype"])
    x = values.copy()
    layout = p["layout"]
    if layout == "strided":
        wide = np.zeros(2 * p["n"], values.dtype)
        wide[::2] = values
        x = wide[::2]
    elif layout == "readonly":
        x.setflags(write=False)
    elif layout == "tensor":
        x = torch.from_numpy(x)
    elif layout == "bytes":
        x = x.tobytes()
    elif layout == "misaligned":  # (an empty array is never read: its address does not matter)
        raw = np.zeros(values.nbytes + 1, np.uint8)
        x = np.frombuffer(raw, values.dtype, p["n"], offset=1)
        x[:] = values
    _dropout.drop(x, p["k1"], p["k2"], p["threshold"], p["scale"], p["threads"])
    index = np.arange(p["n"], dtype=np.uint32)
    with np.errstate(over="ignore"):
        keep = (_mix(_mix(index ^ np.uint32(p["k1"])) ^ np.uint32(p["k2"])) >> np.uint32(8)) >= p["threshold"]
    expected = np.where(keep, values * values.dtype.type(p["scale"]), values.dtype.type(0))
    assert np.array_equal(np.asarray(x), expected), "the dropout mask or scale differs from the formula"
    return f"{int(keep.sum())} of {p['n']} kept"


@fuzz(40)
@given(case=drop_cases())
def test_dropout_c_function_refuses_or_drops(workers: Workers, case: dict) -> None:
    result = workers.run("native", MODULE, "run_drop", case)
    check_outcome(result, drop_expected(case), case)
