"""Rotary position embeddings (RoPE) and their context-extension variants.

``RotaryEmbedding(config)(x, position_ids)`` returns the ``cos``/``sin`` tables for the given
positions (:meth:`RotaryEmbedding.tables` the same, ready for :func:`apply_rotary`, which rotates
the first ``rotary_ndims`` dimensions of queries and keys with them). The variants
(``config.rope_parameters["rope_type"]``) only change the inverse frequencies and an overall scale of
cos/sin ("attention scaling"):

- ``default``: ``theta_i = base ** (-2i / d)``.
- ``linear``: positions divided by ``factor`` (position interpolation).
- ``dynamic``: NTK-aware base that grows with the longest position seen beyond the trained length,
  and returns to the original frequencies once sequences are short again.
- ``yarn``: per-frequency blend of interpolation and extrapolation, plus an attention scale.
- ``longrope``: per-frequency rescaling, one set for short and one for long sequences.
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth ramp between.

The numbers are those of transformers' ``modeling_rope_utils`` (float32, same operation order), so
cos/sin agree with the reference to the last bit in practice, even at large positions where a one-ulp
difference in a frequency would show.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from neoxja.configuration import GPTNeoXJapaneseConfig


def _exponents(dim: int, device: torch.device | None = None) -> Tensor:
    """``2i / dim`` for i = 0 .. dim/2 - 1, in float32."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def _default(
    config: GPTNeoXJapaneseConfig, dim: int, seq_len: Tensor | int | None, device: torch.device | None
) -> tuple[Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** _exponents(dim, device)), 1.0


def _linear(
    config: GPTNeoXJapaneseConfig, dim: int, seq_len: Tensor | int | None, device: torch.device | None
) -> tuple[Tensor, float]:
    inv_freq, _ = _default(config, dim, None, device)
    return inv_freq / config.rope_parameters["factor"], 1.0


def _dynamic(
    config: GPTNeoXJapaneseConfig, dim: int, seq_len: Tensor | int | None, device: torch.device | None
) -> tuple[Tensor, float]:
    """NTK scaling: enlarge the base so that the lowest frequency stretches over ``seq_len`` positions.

    At construction (``seq_len`` None) this is the plain RoPE of the trained length. During a forward,
    ``seq_len`` is a tensor and the new base is computed in float32 tensor arithmetic, as the
    reference does, so both produce the same float32 base.
    """
    base = config.rope_parameters["rope_theta"]
    factor = config.rope_parameters["factor"]
    trained = config.max_position_embeddings
    if seq_len is None:
        length: int | Tensor = trained
    else:
        length = torch.maximum(seq_len, torch.tensor(trained, dtype=seq_len.dtype, device=seq_len.device))
    base = base * ((factor * length / trained) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim, device)), 1.0


def _scaling(config: GPTNeoXJapaneseConfig) -> tuple[dict, float, int, float]:
    """The RoPE settings, base, trained context length and scaling factor (default: how far the
    config extends the trained length)."""
    rope = config.rope_parameters
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    return rope, rope["rope_theta"], original, factor


def _yarn(
    config: GPTNeoXJapaneseConfig, dim: int, seq_len: Tensor | int | None, device: torch.device | None
) -> tuple[Tensor, float]:
    """YaRN: keep high frequencies (many rotations within the trained length), interpolate low ones."""
    rope, base, original, factor = _scaling(config)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        # The dimension index whose wavelength fits ``rotations`` times into the trained length.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below divides by high - low

    powers = base ** _exponents(dim, device)
    extrapolated = 1.0 / powers
    interpolated = 1.0 / (factor * powers)
    ramp = torch.arange(dim // 2, dtype=torch.float32, device=device)
    ramp = torch.clamp((ramp - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the frequency is kept as trained, 0 where it is interpolated
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    return inv_freq, attention_factor


def _longrope(
    config: GPTNeoXJapaneseConfig, dim: int, seq_len: Tensor | int | None, device: torch.device | None
) -> tuple[Tensor, float]:
    """LongRoPE: frequencies divided by per-dimension factors, the long set past the trained length."""
    rope, base, original, factor = _scaling(config)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(
        rope["long_factor"] if long else rope["short_factor"], dtype=torch.float32, device=device
    )
    return 1.0 / (ext * base ** _exponents(dim, device)), attention_factor


def _llama3(
    config: GPTNeoXJapaneseConfig, dim: int, seq_len: Tensor | int | None, device: torch.device | None
) -> tuple[Tensor, float]:
    """Llama 3.1: divide wavelengths longer than original/low_freq_factor by ``factor``, keep short ones."""
    rope = config.rope_parameters
    inv_freq, _ = _default(config, dim, None, device)
    factor = rope["factor"]
    low_factor, high_factor = rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    long_wavelen = original / low_factor
    short_wavelen = original / high_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelen < short_wavelen) * ~(wavelen > long_wavelen)
    return torch.where(between, smoothed, scaled), 1.0


_INV_FREQ = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
}


def rope_frequencies(
    config: GPTNeoXJapaneseConfig, seq_len: Tensor | int | None = None, device: torch.device | None = None
) -> tuple[Tensor, float]:
    """Inverse frequencies ``[rotary_ndims // 2]`` (float32) and the cos/sin scale for ``config``.

    ``seq_len`` (the longest position + 1) matters only for ``dynamic`` (a 0-dim tensor there: the new
    base is computed in float32 like the reference) and ``longrope``; None means "within the trained
    length". ``device`` defaults to torch's current one.
    """
    return _INV_FREQ[config.rope_parameters["rope_type"]](config, config.rotary_ndims, seq_len, device)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for arbitrary positions, with the attention scaling folded in.

    The inverse frequencies are computed once (non-persistent buffers, so they are not part of the
    state dict). Only ``dynamic`` recomputes them, when a longer sequence than ever seen arrives,
    and only ``longrope`` switches between two precomputed sets.
    """

    def __init__(self, config: GPTNeoXJapaneseConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type: str = config.rope_parameters["rope_type"]
        self.rotary_ndims = config.rotary_ndims
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        # dynamic: the longest sequence the current frequencies were computed for.
        self.original_max_seq_len = config.max_position_embeddings
        self.max_seq_len_cached: int | Tensor = config.max_position_embeddings
        if self.rope_type == "longrope":
            self.longrope_threshold = config.rope_parameters["original_max_position_embeddings"]
            long_inv_freq, _ = rope_frequencies(config, self.longrope_threshold + 1)
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        # Follow device moves but not dtype casts (model.half() etc.): frequencies stay float32,
        # because rounding them to 16 bits would shift every angle by up to position * 2**-8.
        def move_only(t: Tensor) -> Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(move_only, recurse)

    @torch.no_grad()
    def _update_dynamic(self, position_ids: Tensor) -> None:
        seq_len = position_ids.max() + 1
        cached = self.max_seq_len_cached
        if seq_len > cached:  # longer than ever: stretch the base further
            # computed on the positions' device, as the reference does, for the same float32 rounding
            inv_freq, self.attention_scaling = rope_frequencies(self.config, seq_len, seq_len.device)
            self.inv_freq = inv_freq.to(self.original_inv_freq.device)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and cached > self.original_max_seq_len:  # short again
            self.inv_freq = self.original_inv_freq.clone()
            self.max_seq_len_cached = self.original_max_seq_len

    def _half_cos_sin(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``[batch, seq, rotary_ndims / 2]`` (float32, scaled) for ``position_ids``."""
        if self.rope_type == "dynamic":
            self._update_dynamic(position_ids)
        inv_freq = self.inv_freq
        if self.rope_type == "longrope":
            # a tensor condition: no host synchronisation while decoding
            is_long = position_ids.max() >= self.longrope_threshold
            inv_freq = torch.where(is_long, self.long_inv_freq, self.original_inv_freq)
        if inv_freq.device != x.device:
            inv_freq = inv_freq.to(x.device)
        angles = position_ids[..., None].float() * inv_freq
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos = cos * self.attention_scaling
            sin = sin * self.attention_scaling
        return cos, sin

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``[batch, seq, rotary_ndims]`` in ``x.dtype`` for ``position_ids`` ``[batch, seq]``
        (what the reference's rotary embedding returns)."""
        cos, sin = self._half_cos_sin(x, position_ids)
        return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)

    def tables(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """What :func:`apply_rotary` takes, made once per forward: ``cos`` and ``sin`` as from
        :meth:`forward`, shaped ``[batch, 1, seq, 1, rotary_ndims]`` to broadcast over heads and over
        q/k, with the sign of ``rotate_half`` folded into the first half of ``sin``."""
        cos, sin = self._half_cos_sin(x, position_ids)
        cos = torch.cat((cos, cos), dim=-1).to(x.dtype)
        signed_sin = torch.cat((-sin, sin), dim=-1).to(x.dtype)
        return cos[:, None, :, None], signed_sin[:, None, :, None]


def apply_rotary(qk: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the first ``rotary_ndims`` dimensions of every head of q and k in one go; pass the rest.

    ``qk`` is ``[batch, heads, seq, n, head_dim]`` (q and k stacked on ``n``, e.g. a view into the
    fused projection), ``tables`` come from :meth:`RotaryEmbedding.tables`. Returns a new tensor, bit-equal to
    the reference's ``x * cos + rotate_half(x) * sin`` on each of them: with the halves swapped and
    the sign folded into ``sin``, ``x1 * cos + x2 * -sin`` is exactly ``x1 * cos - x2 * sin``.
    """
    cos, signed_sin = tables
    rotary_ndims = cos.shape[-1]
    x = qk[..., :rotary_ndims]
    swapped = x.roll(rotary_ndims // 2, dims=-1)  # [x2, x1]
    out = x * cos
    out += swapped * signed_sin  # a fresh tensor: adding in place is safe for autograd
    if rotary_ndims < qk.shape[-1]:
        out = torch.cat((out, qk[..., rotary_ndims:]), dim=-1)
    return out
