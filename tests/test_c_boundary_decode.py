"""Fuzzing the C decoding step (``neoxja._decode``) at its boundary, each case in a child process
(``fuzz_isolation``): a crash or hang fails the test and names the case.

Random small models (layers, heads, rotary share, activation, batch, cache capacity; float32 or
quantized: nf4, fp4, int8, bfloat16 in either arithmetic, sometimes with an int8 output head) are
built with PyTorch, their arrays handed to ``new_model`` with at most one defect (an array short,
long, float64, strided, read-only where it is written, missing or not an array; a weight
descriptor of an unknown kind, of the wrong length, with a bad arithmetic or blocksize;
dimensions that disagree with the arrays), then one ``step``, ``step_slots`` or ``verify`` (several
tokens per sequence) with at most one defect in its arguments
(token ids out of the vocabulary, positions beyond the RoPE table or overflowing, masks, logits and
argmax buffers of the wrong size, type or layout, overlapping each other or the model's cache,
duplicate or absent cache slots, rows and cache positions out of range, no tokens to verify or more
than the cache holds). A valid case must give the logits of the PyTorch forward on the same tokens
(of its arithmetic: ``quant_reference``'s model for the fast one) and the first maximum of each row;
a defective one must be refused naming the argument.
``_decode.matmul`` is fuzzed on its own against ``x @ w.T``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fuzz_isolation import POOL, VARIANTS, Workers, check_outcome, fuzz
from hypothesis import given
from hypothesis import strategies as st
from quant_reference import fast_reference_model

from neoxja import cpu_decode
from neoxja.cache import KVCache
from neoxja.configuration import GPTNeoXJapaneseConfig
from neoxja.modeling import GPTNeoXJapaneseForCausalLM
from neoxja.quantization.layers import Linear8bit
from neoxja.quantization.loading import quantize

MODULE = "test_c_boundary_decode"
LAYER_NAMES = [
    "input_layernorm.weight", "input_layernorm.bias", "query_key_value.weight", "dense.weight", "dense_bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias", "dense_h_to_4h.weight",
    "dense_4h_to_h.weight", "k cache", "v cache",
]  # fmt: skip
GLOBAL_NAMES = [
    "embed_in",
    "embed_out",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
    "cos table",
    "sin table",
]
ARRAY_DEFECTS = ["short", "long", "float64", "strided", "readonly", "none", "tensor"]
DIM_DEFECTS = {
    "vocab_plus": {"embed_in"},
    "batch_plus": {"k cache"},
    "capacity_plus": {"k cache"},
    "rot_odd": {"dims"},
    "heads_not_dividing": {"dims"},
    "table_beyond": {"cos table"},
    "layers_more": {"layers"},
}
STEP_DEFECTS = {
    "tokens_out_of_vocab": {"tokens"},
    "tokens_negative": {"tokens"},
    "tokens_int32": {"tokens"},
    "tokens_short": {"tokens"},
    "tokens_none": {"tokens"},
    "logits_short": {"logits"},
    "logits_float64": {"logits"},
    "logits_readonly": {"logits"},
    "argmax_int32": {"argmax"},
    "argmax_short": {"argmax"},
    "argmax_readonly": {"argmax"},
    "rows_zero": {"rows"},
    "rows_beyond": {"rows"},
    "model_not_capsule": {"model"},
    "rows_float": {"rows"},
    "threads_text": {"threads"},
}
POSITIONAL_DEFECTS = {
    "t_negative": {"t"},
    "t_float": {"t"},
    "t_capacity": {"t"},
    "positions_beyond_table": {"positions"},
    "positions_overflow": {"positions"},
    "positions_short": {"positions"},
    "mask_narrow": {"mask"},
    "mask_strided_positions": {"mask"},
    "mask_float": {"mask"},
}
SLOT_DEFECTS = {
    "slots_duplicate": {"slots"},
    "slots_beyond": {"slots"},
    "slots_negative": {"slots"},
    "lengths_capacity": {"lengths"},
    "lengths_negative": {"lengths"},
    "lengths_short": {"lengths"},
}
VERIFY_DEFECTS = {
    "tokens_out_of_vocab": {"tokens"},
    "tokens_negative": {"tokens"},
    "tokens_int32": {"tokens"},
    "tokens_none": {"tokens"},
    "tokens_flat": {"tokens"},
    "tokens_no_count": {"tokens"},
    "sequences_beyond": {"tokens"},
    "t_negative": {"t"},
    "t_float": {"t"},
    "t_past_capacity": {"t"},
    "t_past_table": {"t"},
    "t_overflowing": {"t"},
    "logits_short": {"logits"},
    "logits_float64": {"logits"},
    "logits_readonly": {"logits"},
    "logits_overlaps_cache": {"logits"},
    "argmax_int32": {"argmax"},
    "argmax_short": {"argmax"},
    "argmax_readonly": {"argmax"},
    "argmax_overlaps_logits": {"argmax"},
    "model_not_capsule": {"model"},
    "threads_text": {"threads"},
}
ACTS = ["gelu", "gelu_new", "relu", "silu"]
FORMATS = ["float32", "float32", "nf4", "fp4", "int8", "bfloat16"]
FOUR_BIT = ("nf4", "fp4")
MATRICES = [2, 3, 7, 8]  # the layer slots that hold weight matrices
DESCRIPTOR_DEFECTS = ["kind_unknown", "tuple_short", "arithmetic_bad", "arithmetic_int"]

pytestmark = pytest.mark.skipif(
    not cpu_decode.extension_available() and os.environ.get("CI", "").lower() != "true",
    reason="neoxja._decode is not built",
)


@pytest.fixture(scope="module")
def workers() -> Workers:
    return POOL


@st.composite
def decode_cases(draw: st.DrawFn) -> dict:
    fmt = draw(st.sampled_from(FORMATS))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    if fmt in FOUR_BIT:  # blocks of 32 within each row of every matrix
        heads, head_dim = 2, 16
    capacity = draw(st.integers(2, 9))
    mode = draw(st.sampled_from(["step", "step_slots", "verify"]))
    if mode == "verify":
        step_defects = VERIFY_DEFECTS
    else:
        step_defects = {**STEP_DEFECTS, **(POSITIONAL_DEFECTS if mode == "step" else SLOT_DEFECTS)}
    layers = draw(st.integers(1, 2))
    model_defect = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.tuples(
                st.just("layer"),
                st.integers(0, layers - 1),
                st.integers(0, 10),
                st.sampled_from(ARRAY_DEFECTS),
            ),
            st.tuples(st.just("global"), st.just(0), st.integers(0, 5), st.sampled_from(ARRAY_DEFECTS)),
            st.tuples(st.just("dims"), st.just(0), st.just(0), st.sampled_from(sorted(DIM_DEFECTS))),
            *(
                []
                if fmt == "float32"
                else [
                    st.tuples(
                        st.just("descriptor"),
                        st.integers(0, layers - 1),
                        st.sampled_from(MATRICES),
                        st.sampled_from(
                            DESCRIPTOR_DEFECTS + (["blocksize_odd"] if fmt in ("nf4", "fp4") else [])
                        ),
                    )
                ]
            ),
        )
    )
    return {
        "seed": draw(st.integers(0, 2**31)),
        "variant": draw(st.sampled_from(sorted(VARIANTS))),
        "format": fmt,
        "arithmetic": draw(st.sampled_from(["exact", "fast"])),
        "double_quant": draw(st.booleans()),
        "int8_head": draw(st.booleans()),
        "threads": draw(st.sampled_from([-1, 1, 2, 3, 300])),
        "layers": layers,
        "heads": heads,
        "head_dim": head_dim,
        "rotary_pct": draw(
            st.sampled_from([pct for pct in (0.25, 0.5, 1.0) if int(head_dim * pct) in (2, 4, 8, 16)])
        ),
        "act": draw(st.sampled_from(ACTS)),
        "vocab": draw(st.integers(4, 64)),
        "batch": draw(st.integers(1, 4)),
        "capacity": capacity,
        "max_length": draw(st.integers(1, capacity)),
        "mode": mode,
        "rows": draw(st.integers(1, 4)),
        "count": draw(st.integers(1, 5)),
        "t": draw(st.integers(0, capacity - 1)),
        "positions": draw(st.booleans()),
        "mask": draw(st.booleans()),
        "argmax": draw(st.sampled_from([None, "contiguous", "strided"])),
        "model_defect": model_defect,
        "step_defect": draw(st.one_of(st.none(), st.sampled_from(sorted(step_defects)))),
    }


def _clamp(p: dict) -> dict:
    """The case's valid geometry: rows within the batch, positions within the table."""
    p = dict(p)
    p["rows"] = min(p["rows"], p["batch"])
    p["t"] = min(p["t"], p["max_length"] - 1)
    if p["mode"] == "verify":  # count tokens at t..t + count - 1, within the RoPE table
        p["count"] = min(p["count"], p["max_length"])
        p["t"] = min(p["t"], p["max_length"] - p["count"])
    return p


def _model_defect_names(p: dict) -> set[str]:
    where, _, index, kind = p["model_defect"]
    if where == "dims":
        return DIM_DEFECTS[kind]
    if where == "descriptor":
        return {LAYER_NAMES[index]}
    name = LAYER_NAMES[index] if where == "layer" else GLOBAL_NAMES[index]
    if kind == "readonly":  # only the caches are written
        return {name} if where == "layer" and index >= 9 else set()
    if kind == "none" and where == "layer" and index == 4:
        return set()  # no dense bias: a model without one
    if where == "global" and index >= 4:  # a RoPE table: at least positions * rotary / 2 values
        one_value = p["max_length"] * (int(p["head_dim"] * p["rotary_pct"]) // 2) == 1
        if kind == "long" or kind == "strided" and one_value:  # (one value is contiguous)
            return set()
    return {name}


def decode_expected(p: dict) -> set[str]:
    """The names a refusal must mention (empty: the case must run and match the reference)."""
    names = _model_defect_names(p) if p["model_defect"] is not None else set()
    defects = {**STEP_DEFECTS, **POSITIONAL_DEFECTS, **SLOT_DEFECTS, **VERIFY_DEFECTS}
    return names or defects.get(p["step_defect"], set())


def _model(p: dict, g: torch.Generator) -> GPTNeoXJapaneseForCausalLM:
    config = GPTNeoXJapaneseConfig(
        vocab_size=p["vocab"],
        hidden_size=p["heads"] * p["head_dim"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        intermediate_multiple_size=2,
        rotary_pct=p["rotary_pct"],
        hidden_act=p["act"],
        max_position_embeddings=64,
    )
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    model = GPTNeoXJapaneseForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # the layer norms too, so that their arrays matter
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    arithmetic = p["arithmetic"]
    if p["format"] != "float32":
        options = (
            {"blocksize": 32, "double_quant": p["double_quant"]} if p["format"] in ("nf4", "fp4") else {}
        )
        quantize(model, p["format"], cpu_arithmetic=arithmetic, **options)
    if p["int8_head"]:
        model.embed_out = Linear8bit.from_linear(model.embed_out, cpu_arithmetic=arithmetic).eval()
    return model


def _reference(p: dict, model: GPTNeoXJapaneseForCausalLM) -> torch.nn.Module:
    """What the C step must agree with: the model itself, or for the fast arithmetic the PyTorch
    model of that arithmetic (quant_reference)."""
    from neoxja import _decode

    quantized = p["format"] != "float32" or p["int8_head"]
    if not quantized or p["arithmetic"] == "exact":
        return model
    return fast_reference_model(model, _decode.kernels()["bfloat16"] == "avx512-bf16")


def _defective_matrix(matrix: object, kind: str) -> object:
    """A weight descriptor with one defect: an array defect in its weight, or of the tuple itself."""
    if not isinstance(matrix, tuple):  # float32: an array like the others
        return _defective(matrix, kind)
    if kind == "none":
        return None
    return (matrix[0], _defective(matrix[1], kind), *matrix[2:])


def _defective_descriptor(matrix: tuple, kind: str) -> object:
    if kind == "kind_unknown":
        return ("int4", *matrix[1:])
    if kind == "tuple_short":
        return matrix[:-1]
    if kind == "blocksize_odd":  # 4-bit: blocksize is the one before last
        return (*matrix[:-2], matrix[-2] + 1, matrix[-1])
    return (*matrix[:-1], "medium" if kind == "arithmetic_bad" else 1)


def _defective(array: np.ndarray | None, kind: str) -> object:
    if kind == "short":
        return array.reshape(-1)[:-1].copy()
    if kind == "long":
        return np.concatenate([array.reshape(-1), np.zeros(1, array.dtype)])
    if kind == "float64":
        return array.astype(np.float64)
    if kind == "strided":
        wide = np.zeros(2 * array.size, array.dtype)
        wide[::2] = array.reshape(-1)
        return wide[::2]
    if kind == "readonly":
        frozen = array.copy()
        frozen.setflags(write=False)
        return frozen
    if kind == "none":
        return None
    return torch.from_numpy(array)


def _build(p: dict, model: GPTNeoXJapaneseForCausalLM, cache: KVCache) -> object:
    from neoxja import _decode

    dims, layers, globals_ = cpu_decode.model_arrays(model, cache, p["max_length"])
    dims, layers, globals_ = list(dims), [list(layer) for layer in layers], list(globals_)
    hidden = p["heads"] * p["head_dim"]
    for layer in layers:  # layers without a dense bias get an explicit zero one (the same model)
        if layer[4] is None:
            layer[4] = np.zeros(hidden, np.float32)
    if p["model_defect"] is not None:
        where, at, index, kind = p["model_defect"]
        if where == "dims":
            change = {
                "vocab_plus": (7, dims[7] + 1),
                "batch_plus": (6, dims[6] + 1),
                "capacity_plus": (8, dims[8] + 1),
                "rot_odd": (3, dims[3] + 1),
                "heads_not_dividing": (2, hidden + 1),
                "table_beyond": (9, p["capacity"] + 1),
            }.get(kind)
            if change:
                dims[change[0]] = change[1]
            else:  # layers_more
                dims[0] += 1
        elif where == "descriptor":
            layers[at][index] = _defective_descriptor(layers[at][index], kind)
        elif where == "layer":
            if kind == "none" and index == 4:
                layers[at][4] = None
                model.gpt_neox_japanese.layers[at].attention.dense_bias = None  # the reference: no bias
            elif index in MATRICES:
                layers[at][index] = _defective_matrix(layers[at][index], kind)
            else:
                layers[at][index] = _defective(layers[at][index], kind)
        else:
            globals_[index] = (_defective_matrix if index == 1 else _defective)(globals_[index], kind)
    return _decode.new_model(tuple(dims), [tuple(layer) for layer in layers], tuple(globals_))


def run_decode(p: dict) -> str:
    from neoxja import _decode

    p = _clamp(p)
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(p["seed"])
    model = _model(p, g)
    batch, capacity, rows, t, vocab = p["batch"], p["capacity"], p["rows"], p["t"], p["vocab"]
    prefix = torch.randint(0, vocab, (batch, capacity), generator=g)
    mask = torch.randint(0, 2, (batch, capacity + 1), generator=g)
    mask[:, 0] = 1  # every position sees a key (a row that sees none is NaN in PyTorch's attention)
    delta = int(torch.randint(0, 4, (1,), generator=g))
    rope = (torch.arange(batch) % 2 + t).clamp(max=p["max_length"] - 1)  # the new tokens' RoPE positions
    positions = rope - delta  # what step() takes: positions + delta
    cache = KVCache(model.config, batch, capacity)
    reference = _reference(p, model)
    with torch.inference_mode():
        if p["mode"] == "step" and t > 0:
            attention = mask[:, :t] if p["mask"] else None
            reference(prefix[:, :t], attention_mask=attention, position_ids=torch.arange(t).expand(batch, t),
                      past_key_values=cache)  # fmt: skip
        elif p["mode"] == "step_slots" and capacity > 1:
            reference(prefix[:, : capacity - 1], past_key_values=cache)
        elif p["mode"] == "verify" and t > 0:
            reference(prefix[:, :t], past_key_values=cache)
    decoder = _build(p, model, cache)
    if p["mode"] == "verify":
        return _run_verify(p, decoder, reference, reference is not model, prefix, cache, g)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    logits = torch.full((batch, vocab), float("nan"))
    argmax = None
    if p["argmax"] is not None:
        argmax = torch.full((rows, 2), -5)[:, 0] if p["argmax"] == "strided" else torch.full((rows,), -5)
    slots = torch.randperm(batch, generator=g)[:rows]
    lengths = torch.randint(0, min(capacity - 1, p["max_length"] - 1) + 1, (rows,), generator=g)
    args = {"model": decoder, "rows": rows, "t": t, "tokens": tokens.numpy(), "logits": logits.numpy(),
            "argmax": None if argmax is None else argmax.numpy(), "positions": None, "mask": None,
            "slots": slots.numpy(), "lengths": lengths.numpy(), "threads": p["threads"]}  # fmt: skip
    if p["mode"] == "step" and p["positions"]:
        args["positions"] = positions[:rows].numpy()
    if p["mode"] == "step" and p["mask"]:
        args["mask"] = mask[:rows].numpy()
    defect = p["step_defect"]
    bad = {
        "tokens_out_of_vocab": {"tokens": np.full(rows, vocab)},
        "tokens_negative": {"tokens": np.full(rows, -1)},
        "tokens_int32": {"tokens": tokens.numpy().astype(np.int32)},
        "tokens_short": {"tokens": tokens.numpy()[:-1]},
        "tokens_none": {"tokens": None},
        "logits_short": {"logits": logits.numpy().reshape(-1)[: rows * vocab - 1]},
        "logits_float64": {"logits": logits.numpy().astype(np.float64)},
        "logits_readonly": {"logits": _defective(logits.numpy(), "readonly")},
        "argmax_int32": {"argmax": np.zeros(rows, np.int32)},
        "argmax_short": {"argmax": np.zeros(rows - 1, np.int64)},
        "argmax_readonly": {"argmax": _defective(np.zeros(rows, np.int64), "readonly")},
        "rows_zero": {"rows": 0},
        "rows_beyond": {"rows": batch + 1},
        "model_not_capsule": {"model": object()},
        "rows_float": {"rows": float(rows)},
        "threads_text": {"threads": "2"},
        "t_float": {"t": float(t)},
        "t_negative": {"t": -1},
        "t_capacity": {"t": capacity},
        "positions_beyond_table": {"positions": np.full(rows, p["max_length"] + delta)},
        "positions_overflow": {"positions": np.full(rows, 2**63 - 2)},
        "positions_short": {"positions": positions[: rows - 1].numpy()},
        "mask_narrow": {"mask": mask[:rows, :t].numpy()},
        "mask_strided_positions": {
            "mask": torch.zeros(rows, 2 * capacity + 2, dtype=torch.long)[:, ::2].numpy()
        },
        "mask_float": {"mask": mask[:rows].double().numpy()},
        "slots_duplicate": {"slots": np.zeros(rows, np.int64) if rows > 1 else np.array([batch])},
        "slots_beyond": {"slots": np.full(rows, batch)},
        "slots_negative": {"slots": np.full(rows, -1)},
        "lengths_capacity": {"lengths": np.full(rows, capacity)},
        "lengths_negative": {"lengths": np.full(rows, -1)},
        "lengths_short": {"lengths": lengths.numpy()[:-1]},
    }.get(defect, {})
    args.update(bad)
    a = args
    if p["mode"] == "step":
        where = (a["tokens"], a["positions"], delta, a["mask"])
        _decode.step(a["model"], a["rows"], a["t"], *where, a["logits"], a["argmax"], a["threads"])
        expected = []
        for b in range(rows):
            ids = torch.cat([prefix[b, :t], tokens[b : b + 1]])[None]
            pos = torch.arange(t + 1)
            if p["positions"]:
                pos[t] = rope[b]
            keep = torch.cat([mask[b, :t], torch.ones(1, dtype=mask.dtype)])[None] if p["mask"] else None
            with torch.inference_mode():
                expected.append(reference(ids, attention_mask=keep, position_ids=pos[None]).logits[0, -1])
    else:
        where = (a["tokens"], a["slots"], a["lengths"])
        _decode.step_slots(a["model"], a["rows"], *where, a["logits"], a["argmax"], a["threads"])
        expected = []
        for b in range(rows):
            ids = torch.cat([prefix[slots[b], : lengths[b]], tokens[b : b + 1]])[None]
            with torch.inference_mode():
                expected.append(reference(ids).logits[0, -1])
    ours = logits[:rows]
    fast = reference is not model  # (int8 rounding may fall the other way on float32 differences)
    torch.testing.assert_close(
        ours, torch.stack(expected), rtol=2e-3 if fast else 2e-4, atol=2e-3 if fast else 2e-4
    )
    assert torch.isnan(logits[rows:]).all(), "a step wrote logits beyond its rows"
    if argmax is not None:
        assert torch.equal(argmax, ours.argmax(-1)), "argmax is not the first maximum of the logits"
    return f"{p['mode']} of {rows} rows"


@fuzz(70)
@given(case=decode_cases())
def test_decode_step_refuses_or_matches_pytorch(workers: Workers, case: dict) -> None:
    result = workers.run(case["variant"], MODULE, "run_decode", case)
    check_outcome(result, decode_expected(case), case)


def _run_verify(
    p: dict,
    decoder: object,
    reference: torch.nn.Module,
    fast: bool,
    prefix: torch.Tensor,
    cache: KVCache,
    g: torch.Generator,
) -> str:
    """``verify`` of ``count`` tokens for ``rows`` sequences after ``t`` cache positions (with the
    case's one defect): the logits of the PyTorch forward over prefix + tokens at each new token."""
    from neoxja import _decode

    batch, rows, count, t, vocab = p["batch"], p["rows"], p["count"], p["t"], p["vocab"]
    tokens = torch.randint(0, vocab, (rows, count), generator=g)
    logits = torch.full((batch * count, vocab), float("nan"))
    argmax = None
    if p["argmax"] is not None:
        argmax = (
            torch.full((rows * count, 2), -5)[:, 0]
            if p["argmax"] == "strided"
            else torch.full((rows * count,), -5)
        )
    shared = np.zeros(rows * count * vocab + 1, np.int64)  # an argmax on the logits' own bytes
    args = {"model": decoder, "tokens": tokens.numpy(), "t": t, "logits": logits.numpy(),
            "argmax": None if argmax is None else argmax.numpy(), "threads": p["threads"]}  # fmt: skip
    args.update(
        {
            "tokens_out_of_vocab": {"tokens": np.full((rows, count), vocab)},
            "tokens_negative": {"tokens": np.full((rows, count), -1)},
            "tokens_int32": {"tokens": tokens.numpy().astype(np.int32)},
            "tokens_none": {"tokens": None},
            "tokens_flat": {"tokens": tokens.numpy().reshape(-1)},
            "tokens_no_count": {"tokens": np.zeros((rows, 0), np.int64)},
            "sequences_beyond": {"tokens": np.zeros((batch + 1, count), np.int64)},
            "t_negative": {"t": -1},
            "t_float": {"t": float(t)},
            "t_past_capacity": {"t": p["capacity"] - count + 1},
            "t_past_table": {"t": p["max_length"] - count + 1},
            "t_overflowing": {"t": 2**63 - 1},
            "logits_short": {"logits": logits.numpy().reshape(-1)[: rows * count * vocab - 1]},
            "logits_float64": {"logits": logits.numpy().astype(np.float64)},
            "logits_readonly": {"logits": _defective(logits.numpy(), "readonly")},
            "logits_overlaps_cache": {"logits": cache.keys[0].numpy().reshape(-1)},
            "argmax_int32": {"argmax": np.zeros(rows * count, np.int32)},
            "argmax_short": {"argmax": np.zeros(rows * count - 1, np.int64)},
            "argmax_readonly": {"argmax": _defective(np.zeros(rows * count, np.int64), "readonly")},
            "argmax_overlaps_logits": {
                "logits": shared.view(np.float32)[: rows * count * vocab],
                "argmax": shared[rows * count * vocab // 2 :][: rows * count],
            },
            "model_not_capsule": {"model": object()},
            "threads_text": {"threads": "2"},
        }.get(p["step_defect"], {})
    )
    a = args
    _decode.verify(a["model"], a["tokens"], a["t"], a["logits"], a["argmax"], a["threads"])
    expected = []
    for b in range(rows):
        ids = torch.cat([prefix[b, :t], tokens[b]])[None]
        with torch.inference_mode():
            expected.append(reference(ids).logits[0, t:])
    ours = logits[: rows * count]
    torch.testing.assert_close(
        ours, torch.cat(expected), rtol=2e-3 if fast else 2e-4, atol=2e-3 if fast else 2e-4
    )
    assert torch.isnan(logits[rows * count :]).all(), "verify wrote logits beyond its rows"
    if argmax is not None:
        assert torch.equal(argmax, ours.argmax(-1)), "argmax is not the first maximum of the logits"
    return f"verify of {rows} x {count} tokens at {t}"


# ----- _decode.matmul ------------------------------------------------------------------------------

MATMUL_DEFECTS = {
    "w_float64": {"w"},
    "x_strided": {"x"},
    "y_readonly": {"y"},
    "y_overlaps_x": {"y"},
    "x_wrong_width": {"w"},
    "y_wrong_shape": {"w"},
    "x_flat": {"w"},
    "w_tensor": {"w"},
}


@st.composite
def matmul_cases(draw: st.DrawFn) -> dict:
    return {
        "seed": draw(st.integers(0, 2**31)),
        "variant": draw(st.sampled_from(["native", "scalar"])),
        "rows": draw(st.integers(1, 40)),
        "cols": draw(st.integers(1, 40)),
        "vectors": draw(st.integers(1, 9)),
        "threads": draw(st.sampled_from([-1, 0, 1, 2, 3, 1000])),
        "defect": draw(st.one_of(st.none(), st.sampled_from(sorted(MATMUL_DEFECTS)))),
    }


def _every_other(x: np.ndarray) -> np.ndarray:
    """x's values in a view that skips every other column (contiguous only if it has one element)."""
    wide = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
    wide[:, ::2] = x
    return wide[:, ::2]


def run_matmul(p: dict) -> str:
    from neoxja import _decode

    rng = np.random.default_rng(p["seed"])
    w = rng.standard_normal((p["rows"], p["cols"]), np.float32)
    x = rng.standard_normal((p["vectors"], p["cols"]), np.float32)
    y = np.zeros((p["vectors"], p["rows"]), np.float32)
    args = {"w": w, "x": x, "y": y}
    shared = np.zeros(x.size + y.size, np.float32)
    shared[: x.size] = x.reshape(-1)
    args.update(
        {
            "w_float64": {"w": w.astype(np.float64)},
            "x_strided": {"x": _every_other(x)},
            "y_readonly": {"y": _defective(y, "readonly")},
            "y_overlaps_x": {"x": shared[: x.size].reshape(x.shape), "y": shared[: y.size].reshape(y.shape)},
            "x_wrong_width": {"x": np.zeros((p["vectors"], p["cols"] + 1), np.float32)},
            "y_wrong_shape": {"y": np.zeros((p["vectors"], p["rows"] + 1), np.float32)},
            "x_flat": {"x": x.reshape(-1)},
            "w_tensor": {"w": torch.from_numpy(w)},
        }.get(p["defect"], {})
    )
    _decode.matmul(args["w"], args["x"], args["y"], p["threads"])
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    return f"{p['vectors']}x{p['cols']} @ {p['cols']}x{p['rows']}"


@fuzz(40)
@given(case=matmul_cases())
def test_decode_matmul_refuses_or_multiplies(workers: Workers, case: dict) -> None:
    result = workers.run(case["variant"], MODULE, "run_matmul", case)
    one_element = case["vectors"] * case["cols"] == 1  # contiguous whatever its strides
    names = (
        set() if case["defect"] == "x_strided" and one_element else MATMUL_DEFECTS.get(case["defect"], set())
    )
    check_outcome(result, names, case)
