"""The optimizer and the learning-rate schedules of :func:`neoxja.train`.

AdamW with transformers' Trainer defaults (betas 0.9/0.999, eps 1e-8, the fused kernel), weight
decay on the matrices only (not on biases and layer norms), and the schedules transformers names
``linear``, ``cosine`` and ``constant`` (each after a linear warm-up), as ``LambdaLR`` so that their
state saves and resumes with the optimizer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from neoxja.tuner import SCHEDULES


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; decay applies to tensors of two or more dimensions."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (transformers' Trainer default too): one pass per tensor, no temporaries.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None
    )


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each step (0-based) of ``total`` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup, total))
