"""Training checkpoints: what ``--save-every`` writes and ``--resume`` reads.

A checkpoint is a directory ``checkpoint-<step>`` holding the weights (the full model in
transformers' format, or the LoRA adapter in peft's) and ``trainer_state.pt``: the optimizer,
the schedule, the random-number states and the step (from which the data position follows). It is
written under a temporary name and renamed when complete, so an interrupted save leaves the
previous checkpoints as they were and is never taken for a checkpoint. ``trainer_state.pt`` is
read with ``torch.load(weights_only=True)``: it holds only tensors and plain values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"checkpoint-(\d+)")


def rng_state() -> dict[str, Any]:
    """The random-number states that dropout and LoRA dropout draw from."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path, step: int, write_weights: Callable[[Path], None], state: dict[str, Any]
) -> Path:
    """Write ``checkpoint-<step>`` atomically: weights through ``write_weights(dir)``, then ``state``."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_weights(partial)
    torch.save(state, partial / STATE_FILE)
    summary = {"step": step, **{k: v for k, v in state.items() if isinstance(v, (int, float, str))}}
    (partial / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if final.exists():  # a checkpoint of the same step from an earlier run: replaced whole
        stale = output_dir / f".checkpoint-{step}.stale-{os.getpid()}"
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale)
    else:
        partial.rename(final)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint that ``--resume path`` means: ``path`` itself when it is one, else the
    checkpoint of the highest step inside it."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such directory")
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := _NAME.fullmatch(p.name))]
    found = [(step, p) for step, p in found if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"--resume {path}: neither a checkpoint nor a directory holding checkpoint-N")
    return max(found)[1]


def load_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of ``checkpoint`` (tensors and plain values only)."""
    path = checkpoint / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling or format error: name the file
        raise ValueError(f"{path}: not a readable neoxja trainer state ({err})") from err
