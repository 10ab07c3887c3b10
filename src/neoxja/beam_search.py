"""Beam search: STUB, replaced by the beam-search helper."""

from __future__ import annotations

from typing import Any

from neoxja.generation_config import GenerationConfig
from neoxja.generation_outputs import GenerateBeamDecoderOnlyOutput, StepRecord
from neoxja.generation_plan import Plan


def beam_search(
    model: Any, plan: Plan, config: GenerationConfig, record: StepRecord
) -> GenerateBeamDecoderOnlyOutput:
    raise NotImplementedError
