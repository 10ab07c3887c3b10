"""RoPE against transformers' GPTNeoXJapaneseRotaryEmbedding and apply_rotary_pos_emb."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.gpt_neox_japanese import modeling_gpt_neox_japanese as reference

from neoxja.configuration import GPTNeoXJapaneseConfig
from neoxja.rope import RotaryEmbedding, apply_rotary

TRAINED = 64  # max_position_embeddings of the tiny configs

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "linear-legacy-type-key": {"type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 8,
        "mscale": 0.9,
        "mscale_all_dim": 0.7,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "yarn-inferred-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 2.0,
        "attention_factor": 0.8,
        "original_max_position_embeddings": 32,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + i / 7 for i in range(4)],
        "long_factor": [2.0 + i for i in range(4)],
        "original_max_position_embeddings": 16,
    },
    "longrope-factor": {
        "rope_type": "longrope",
        "factor": 6.0,
        "attention_factor": 1.3,
        "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [4.0, 5.0, 6.0, 7.0],
        "original_max_position_embeddings": 32,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def _configs(rope_scaling: dict | None, rotary_pct: float = 0.5, base: float = 10000):
    kwargs = dict(
        hidden_size=32,
        num_attention_heads=2,
        rotary_pct=rotary_pct,
        rotary_emb_base=base,
        max_position_embeddings=TRAINED,
    )
    ours = GPTNeoXJapaneseConfig(**kwargs, rope_scaling=copy.deepcopy(rope_scaling))
    theirs = transformers.GPTNeoXJapaneseConfig(**kwargs, rope_scaling=copy.deepcopy(rope_scaling))
    return ours, theirs


def _positions(*ranges: tuple[int, int], batch: int = 1) -> torch.Tensor:
    pos = torch.cat([torch.arange(lo, hi) for lo, hi in ranges])
    return pos.expand(batch, -1)


# A decoding-like sequence of calls: short prompt, growth past the trained length (twice), a single
# far position, exactly the trained length while grown (dynamic keeps its frequencies), back to short
# (dynamic resets), and the boundaries 16 and 32 at which longrope switches between its factor sets.
CALLS = [
    _positions((0, 10)),
    _positions((0, 100)),
    _positions((100, 101)),
    _positions((0, 7), (40, 50), batch=2),
    _positions((250, 260)),
    _positions((0, TRAINED)),
    _positions((TRAINED - 1, TRAINED + 1)),
    _positions((0, 20)),
    _positions((0, 16)),
    _positions((0, 17)),
    _positions((15, 16)),
    _positions((0, 32)),
    _positions((32, 33)),
    _positions((3, 9)),
]


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_cos_sin_match_reference_over_a_sequence_of_calls(case: str) -> None:
    ours_cfg, theirs_cfg = _configs(ROPE_CASES[case])
    ours, theirs = RotaryEmbedding(ours_cfg), reference.GPTNeoXJapaneseRotaryEmbedding(theirs_cfg)
    x = torch.zeros(1, dtype=torch.float32)
    for position_ids in CALLS:
        cos, sin = ours(x, position_ids)
        ref_cos, ref_sin = theirs(x, position_ids)
        assert cos.shape == ref_cos.shape == (*position_ids.shape, ours_cfg.rotary_ndims)
        assert cos.dtype == sin.dtype == torch.float32
        where = f"{case}, positions up to {int(position_ids.max())}"
        assert (cos - ref_cos).abs().max() <= 1e-6, where
        assert (sin - ref_sin).abs().max() <= 1e-6, where


@pytest.mark.parametrize("rotary_pct, base", [(1.0, 10000), (0.25, 500.0), (0.75, 1e6)])
def test_rotary_fraction_and_base_match_reference(rotary_pct: float, base: float) -> None:
    ours_cfg, theirs_cfg = _configs(ROPE_CASES["llama3"], rotary_pct=rotary_pct, base=base)
    ours, theirs = RotaryEmbedding(ours_cfg), reference.GPTNeoXJapaneseRotaryEmbedding(theirs_cfg)
    position_ids = _positions((0, 300))
    cos, sin = ours(torch.zeros(1), position_ids)
    ref_cos, ref_sin = theirs(torch.zeros(1), position_ids)
    assert cos.shape[-1] == int(16 * rotary_pct)
    assert (cos - ref_cos).abs().max() <= 1e-6
    assert (sin - ref_sin).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype_follows_x_and_frequencies_stay_float32(dtype: torch.dtype) -> None:
    ours_cfg, theirs_cfg = _configs(ROPE_CASES["yarn"])
    ours = RotaryEmbedding(ours_cfg).to(dtype)
    assert ours.inv_freq.dtype == torch.float32
    theirs = reference.GPTNeoXJapaneseRotaryEmbedding(theirs_cfg)
    position_ids = _positions((0, 50))
    cos, sin = ours(torch.zeros(1, dtype=dtype), position_ids)
    ref_cos, ref_sin = theirs(torch.zeros(1, dtype=dtype), position_ids)
    assert cos.dtype == sin.dtype == dtype
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("case", ["default", "dynamic", "longrope"])
def test_frequencies_are_not_in_the_state_dict(case: str) -> None:
    ours_cfg, _ = _configs(ROPE_CASES[case])
    assert RotaryEmbedding(ours_cfg).state_dict() == {}


def test_static_types_do_not_recompute_frequencies() -> None:
    ours_cfg, _ = _configs(ROPE_CASES["yarn"])
    rope = RotaryEmbedding(ours_cfg)
    before = rope.inv_freq
    rope(torch.zeros(1), _positions((0, 500)))
    assert rope.inv_freq is before


def test_dynamic_grows_then_resets() -> None:
    ours_cfg, _ = _configs(ROPE_CASES["dynamic"])
    rope = RotaryEmbedding(ours_cfg)
    original = rope.inv_freq.clone()
    rope(torch.zeros(1), _positions((0, 3 * TRAINED)))
    assert (rope.inv_freq < original).any(), "a longer sequence must lower the frequencies"
    rope(torch.zeros(1), _positions((0, 5)))
    assert torch.equal(rope.inv_freq, original)


def _reference_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """What transformers' GPTNeoXJapaneseAttention does with the rotary and pass-through parts."""
    ndims = cos.shape[-1]
    q_rot, k_rot = reference.apply_rotary_pos_emb(q[..., :ndims], k[..., :ndims], cos, sin)
    return torch.cat((q_rot, q[..., ndims:]), dim=-1), torch.cat((k_rot, k[..., ndims:]), dim=-1)


def _ours_rotary(q: torch.Tensor, k: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor) -> tuple:
    out = apply_rotary(torch.stack((q, k), dim=-2), rope.tables(q, positions))
    return out[..., 0, :], out[..., 1, :]


@pytest.mark.parametrize("rotary_pct", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_reference_attention_math(rotary_pct: float, dtype: torch.dtype) -> None:
    ours_cfg, _ = _configs(ROPE_CASES["yarn"], rotary_pct=rotary_pct)
    generator = torch.Generator().manual_seed(0)
    batch, heads, seq, head_dim = 2, ours_cfg.num_attention_heads, 7, ours_cfg.head_dim
    # q and k as the attention makes them: strided views into one fused projection
    qkv = torch.randn(batch, seq, heads, 3, head_dim, generator=generator).to(dtype).transpose(1, 2)
    q, k = qkv[..., 0, :], qkv[..., 1, :]
    position_ids = torch.stack([torch.arange(3, 3 + seq), torch.arange(90, 90 + seq)])
    rope = RotaryEmbedding(ours_cfg)
    cos, sin = rope(q, position_ids)
    ref_q, ref_k = _reference_rotary(q, k, cos, sin)

    out = apply_rotary(qkv[..., :2, :], rope.tables(q, position_ids))
    assert out.dtype == dtype and out.shape == (batch, heads, seq, 2, head_dim)
    assert torch.equal(out[..., 0, :], ref_q) and torch.equal(out[..., 1, :], ref_k)


def test_apply_rotary_gradients_match_reference() -> None:
    ours_cfg, _ = _configs(None, rotary_pct=0.5)
    q = torch.randn(2, 2, 5, ours_cfg.head_dim, requires_grad=True)
    k = torch.randn(2, 2, 5, ours_cfg.head_dim, requires_grad=True)
    rope, positions = RotaryEmbedding(ours_cfg), torch.arange(5).expand(2, -1)
    cos, sin = rope(q, positions)
    weights = torch.randn(2, 2, 5, ours_cfg.head_dim)
    grads = torch.autograd.grad(sum((t * weights).sum() for t in _ours_rotary(q, k, rope, positions)), (q, k))
    ref_grads = torch.autograd.grad(
        sum((t * weights).sum() for t in _reference_rotary(q, k, cos, sin)), (q, k)
    )
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert (ours - theirs).abs().max() <= 1e-6


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_builds_on_the_meta_device(case: str) -> None:
    """Checkpoint loading builds the network on the meta device; RoPE must not need real values there."""
    ours_cfg, _ = _configs(ROPE_CASES[case])
    with torch.device("meta"):
        rope = RotaryEmbedding(ours_cfg)
    assert rope.inv_freq.is_meta
