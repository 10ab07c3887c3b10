"""Attention with dropout for CPU training, one block of queries at a time.

PyTorch's fused CPU attention kernels cannot drop out, and the explicit computation keeps every
layer's ``[heads, queries, keys]`` scores, softmax and dropout mask alive until backward: at 2,048
tokens that is hundreds of MB a layer, and the passes over them cost more than the matrix products.
This autograd function does what flash attention does, in PyTorch: it takes a block of queries at a
time (skipping keys a causal block cannot see), keeps only each row's softmax maximum and sum, and in
backward recomputes a block's probabilities and regenerates its dropout mask, so no score-sized
tensor outlives its block.

Masks are counter-based (``_dropout.c``, or the same hash in PyTorch integer ops without it): block
``i``'s mask is a function of ``seed + i``, where ``seed`` is drawn once per call from PyTorch's
default generator. So ``torch.manual_seed`` makes runs repeatable, and restoring the RNG state (as
training checkpoints do, and as activation checkpointing does when it replays a forward) gives the
same masks. Drawing them from PyTorch's generator instead (one serial Mersenne-Twister stream) took
longer than the attention's matrix products at 2,048 tokens. Scores and softmax are float32 whatever the
input dtype (float64 stays float64), as in the explicit path.
"""

from __future__ import annotations

import math

import torch

try:
    from neoxja import _dropout
except ImportError:  # built without a C compiler: the same masks through PyTorch integer ops
    _dropout = None

# Score elements (batch x heads x queries x keys) of one block: 2**20 float32 values are 4 MB, which
# measured fastest at 2,048 tokens (blocks that stay in cache beat fewer, larger products).
BLOCK_ELEMENTS = 2**20


def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` with dropout ``dropout`` on the probabilities.

    ``q``, ``k``, ``v`` are ``[batch, heads, length, head_size]`` (queries and keys of one length
    when ``is_causal``); ``mask`` a boolean ``[batch or 1, 1, queries, keys]`` (True = may attend).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    seed = int(torch.randint(0, 2**62, (1,)))
    with torch.autocast("cpu", enabled=False):  # the scores stay float32 under bfloat16 autocast
        return _DropoutAttention.apply(q, k, v, mask, is_causal, dropout, seed)


def _blocks(q: torch.Tensor, keys: int, is_causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of each block of query rows."""
    batch, heads, queries, _ = q.shape
    rows = max(16, BLOCK_ELEMENTS // max(1, batch * heads * keys))
    return [
        (start, min(start + rows, queries), min(start + rows, keys) if is_causal else keys)
        for start in range(0, queries, rows)
    ]


def _scores(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, block: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled float32 scores of one block and the boolean mask they were filled under."""
    start, end, key_end = block
    scale = 1.0 / math.sqrt(q.shape[-1])
    wide = _wide(q.dtype)
    scores = torch.matmul(q[:, :, start:end].to(wide) * scale, k[:, :, :key_end].to(wide).transpose(-1, -2))
    allowed = None
    if mask is not None:
        allowed = mask[..., start:end, :key_end]
    elif is_causal:  # only keys at or before each query
        allowed = torch.ones(end - start, key_end, dtype=torch.bool).tril(start)
    if allowed is not None:
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    return scores, allowed


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and gradients are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


MASK = 0xFFFFFFFF


def _keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a block's seed (splitmix64's output function)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & MASK, z >> 32


def _times(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` below 2**32, in two halves so nothing overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finalizer of ``_dropout.c`` on int64 tensors."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def drop_(x: torch.Tensor, dropout: float, seed: int) -> torch.Tensor:
    """Dropout of contiguous ``x`` in place: element i is zeroed, or scaled by 1 / (1 - dropout), by a
    mask that is a pure function of ``seed`` and i (so backward regenerates forward's mask)."""
    threshold, scale = round(dropout * 2**24), 1.0 / (1.0 - dropout)
    k1, k2 = _keys(seed)
    if _dropout is not None and x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
        _dropout.drop(x.detach().numpy(), k1, k2, threshold, scale, torch.get_num_threads())
        return x
    index = torch.arange(x.numel(), dtype=torch.int64).view(x.shape)
    keep = (_mix(_mix(index ^ k1) ^ k2) >> 8) >= threshold
    return x.copy_(torch.where(keep, x * scale, 0.0))


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, dropout, seed):  # noqa: ANN001, ANN205
        out = torch.empty(q.shape, dtype=v.dtype)
        # Each row's maximum and the sum of exp(score - maximum): kept apart, not as one log-sum-exp,
        # which would round away log(keys) in a row that sees no key (scores all at the dtype's min).
        row_max = torch.empty(*q.shape[:3], 1, dtype=_wide(q.dtype))
        row_sum = torch.empty_like(row_max)
        blocks = _blocks(q, k.shape[2], is_causal)
        for index, block in enumerate(blocks):
            start, end, key_end = block
            scores, _ = _scores(q, k, mask, is_causal, block)
            top = scores.amax(dim=-1, keepdim=True)
            probs = scores.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            probs.div_(total)
            if dropout > 0:
                drop_(probs, dropout, seed + index)
            out[:, :, start:end] = torch.matmul(probs.to(v.dtype), v[:, :, :key_end])
            row_max[:, :, start:end], row_sum[:, :, start:end] = top, total
        ctx.save_for_backward(q, k, v, out, row_max, row_sum, mask)
        ctx.settings = (is_causal, dropout, seed, blocks)
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, row_max, row_sum, mask = ctx.saved_tensors
        is_causal, dropout, seed, blocks = ctx.settings
        scale = 1.0 / math.sqrt(q.shape[-1])
        wide = _wide(q.dtype)
        grad_out = grad_out.to(wide)
        # rowsum(dP o P) = rowsum(dO o O), dropout or not: the softmax backward needs only this.
        delta = (grad_out * out.to(wide)).sum(-1, keepdim=True)
        kw, vw = k.to(wide), v.to(wide)
        dq = torch.empty(q.shape, dtype=wide)
        dk = torch.zeros(k.shape, dtype=wide)
        dv = torch.zeros(v.shape, dtype=wide)
        for index, block in enumerate(blocks):
            start, end, key_end = block
            scores, allowed = _scores(q, k, mask, is_causal, block)
            probs = scores.sub_(row_max[:, :, start:end]).exp_().div_(row_sum[:, :, start:end])
            g = grad_out[:, :, start:end]
            dropped = drop_(probs.clone(), dropout, seed + index) if dropout > 0 else probs
            dv[:, :, :key_end] += torch.matmul(dropped.transpose(-1, -2), g)
            grad_probs = torch.matmul(g, vw[:, :, :key_end].transpose(-1, -2))
            if dropout > 0:
                drop_(grad_probs, dropout, seed + index)
            grad_scores = grad_probs.sub_(delta[:, :, start:end]).mul_(probs)
            if mask is not None:  # masked scores were constants (this matters only in rows that see no key)
                grad_scores.masked_fill_(~allowed, 0.0)
            dq[:, :, start:end] = torch.matmul(grad_scores, kw[:, :, :key_end])
            dk[:, :, :key_end] += torch.matmul(grad_scores.transpose(-1, -2), q[:, :, start:end].to(wide))
        dq.mul_(scale), dk.mul_(scale)  # the scores' scale, once here rather than on every block
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
