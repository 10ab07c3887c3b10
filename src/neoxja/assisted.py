"""Assisted decoding: STUB, replaced by the assisted-decoding helper."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from neoxja.generation_config import GenerationConfig
from neoxja.generation_outputs import StepRecord
from neoxja.generation_plan import Plan


def assisted_steps(
    model: Any,
    plan: Plan,
    config: GenerationConfig,
    tokens: torch.Tensor,
    record: StepRecord,
    assistant_model: Any,
) -> Iterator[tuple[int, torch.Tensor]]:
    raise NotImplementedError
