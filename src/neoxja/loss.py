"""Next-token cross-entropy, from logits or straight from the final hidden states.

``[batch, seq, vocab]`` float32 logits are the largest tensors of a training step (256 MB a row at
2,048 tokens and a 32,000-token vocabulary, and cross-entropy's backward needs as much again twice).
:func:`chunked_loss_sum` applies the output head and the loss to a chunk of positions at a time; with
``recompute`` it keeps only the hidden states and recomputes each chunk's logits in backward, which
is what gradient checkpointing does for the layers, done for the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

IGNORE_INDEX = -100

# Logit elements (positions x vocabulary) per chunk: 2**23 float32 values are 32 MB.
CHUNK_ELEMENTS = 2**23


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is label t + 1; the last position has none (shifting the labels, not the
    logits, avoids copying the largest tensor of the step)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def logits_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed float32 cross-entropy of ``logits [..., vocab]`` against ``targets [...]``."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def chunked_loss_sum(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, recompute: bool
) -> torch.Tensor:
    """``logits_loss_sum(head(hidden), targets)`` without all the logits at once.

    ``hidden`` is ``[batch, seq, hidden]``; ``head`` maps it to the vocabulary (any module: a LoRA
    or quantized head works too). ``recompute`` (training with gradient checkpointing) keeps only
    ``hidden`` for backward; otherwise each chunk keeps what its backward needs, as the whole would.
    """
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten().to(hidden.device)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS // vocab)
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_hidden.shape[0], rows):
        chunk, chunk_targets = flat_hidden[start : start + rows], flat_targets[start : start + rows]
        if recompute and torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(
                _head_loss, head, chunk, chunk_targets, use_reentrant=False
            )
        else:
            total = total + _head_loss(head, chunk, chunk_targets)
    return total


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits_loss_sum(head(hidden), targets)
