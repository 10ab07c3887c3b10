"""Training checkpoints: what ``--save-every`` writes and ``--resume`` reads.

A checkpoint is a directory ``checkpoint-<step>`` holding the weights (the full model in
transformers' format, or the LoRA adapter in peft's) and ``trainer_state.pt``: the optimizer,
the schedule, the random-number states and the step (from which the data position follows). It is
written under a temporary name, ``.checkpoint-<step>.partial-<pid>``, and swapped in when complete
(:func:`neoxja.saving.replace_directory`), so an interrupted save leaves the previous checkpoints
as they were and is never taken for a checkpoint; what a killed save leaves is removed by the next
save or run in that directory once its process is gone. ``trainer_state.pt`` is read with
``torch.load(weights_only=True)``: it holds only tensors and plain values, and every one of them is
checked (:func:`check_state`, :func:`check_optimizer_state`) before training resumes.
``--save-total-limit N`` keeps the N newest (:func:`prune_checkpoints`), removing older ones only once
the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from neoxja.saving import remove_stale_saves, replace_directory, temporary_sibling

STATE_FILE = "trainer_state.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # a checkpoint folder; its step


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
    """Write ``checkpoint-<step>`` atomically: weights through ``write_weights(dir)``, then ``state``.
    A checkpoint of the same step from an earlier run is replaced whole."""
    final = output_dir / f"checkpoint-{step}"
    remove_stale_saves(output_dir)
    with replace_directory(final, carry_over=False) as partial:
        write_weights(partial)
        torch.save(state, partial / STATE_FILE)
        summary = {"step": step, **{k: v for k, v in state.items() if isinstance(v, (int, float, str))}}
        (partial / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return final


def prune_checkpoints(output_dir: Path, limit: int, latest: Path) -> list[Path]:
    """Remove the ``checkpoint-N`` folders of ``output_dir`` beyond the ``limit`` newest, oldest (lowest
    step) first; ``latest``, the one just written, always stays. Each is renamed to a temporary name
    before it is deleted, so an interrupted removal leaves no half checkpoint for ``--resume`` to find."""
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir() and not p.is_symlink() and p != latest
    )
    removed = [p for _, p in found[: max(0, len(found) - (limit - 1))]]
    for path in removed:
        remove_folder(path)
    return removed


def remove_folder(path: Path) -> None:
    """Delete the folder ``path``, renamed to a temporary name first: an interrupted removal leaves
    nothing under its name (no half checkpoint for ``--resume`` to find)."""
    aside = temporary_sibling(path, "partial")
    os.rename(path, aside)
    shutil.rmtree(aside)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint that ``--resume path`` means: ``path`` itself when it is one, else the
    checkpoint of the highest step inside it."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such directory")
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    found = [(step, p) for step, p in found if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"--resume {path}: neither a checkpoint nor a directory holding checkpoint-N")
    return max(found)[1]


def load_state(checkpoint: Path, total_steps: int) -> dict[str, Any]:
    """``trainer_state.pt`` of ``checkpoint`` (tensors and plain values only), checked by
    :func:`check_state` against a run of ``total_steps`` steps."""
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling or format error: name the file
        raise ValueError(f"{path}: not a readable neoxja trainer state ({err})") from err
    check_state(state, path, total_steps)
    return state


def _fail(path: Path, key: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {key} {problem}: not a state this run can resume from")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_state(state: Any, path: Path, total_steps: int) -> None:
    """A ``ValueError`` naming ``path`` and the key when ``state`` is not what :meth:`_Run._save_checkpoint`
    writes, or its step is outside ``0..total_steps``, or not the step of its ``checkpoint-N`` folder."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of training state, found a {type(state).__name__}")
    kinds = {"step": "an int", "optimizer": "a dict", "scheduler": "a dict", "rng": "a dict"}
    for key, kind in kinds.items():
        if key not in state:
            raise _fail(path, repr(key), "is missing")
        ok = _is_int(state[key]) if key == "step" else isinstance(state[key], dict)
        if not ok:
            raise _fail(path, repr(key), f"is a {type(state[key]).__name__}, not {kind}")
    step = state["step"]
    if step < 0:
        raise _fail(path, "'step'", f"is {step}, below 0")
    if step > total_steps:
        raise _fail(path, "'step'", f"is {step}, beyond this run's {total_steps} steps (--steps/--epochs)")
    folder = CHECKPOINT_NAME.fullmatch(path.parent.name)
    if folder is not None and int(folder.group(1)) != step:
        raise _fail(path, "'step'", f"is {step}, but the checkpoint is {path.parent.name}")
    for key in ("total_steps", "world_size"):
        if key in state and not (_is_int(state[key]) and state[key] >= 1):
            raise _fail(path, repr(key), f"is {state[key]!r}, not a positive int")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise _fail(path, "'scaler'", f"is a {type(state['scaler']).__name__}, not a dict")
    cpu = state["rng"].get("cpu")
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.dim() == 1):
        raise _fail(path, "rng['cpu']", "is not a uint8 random-number state")
    scheduler = state["scheduler"]
    if scheduler.get("last_epoch") != step or not _is_int(scheduler.get("last_epoch")):
        raise _fail(
            path, "scheduler['last_epoch']", f"is {scheduler.get('last_epoch')!r}, not the step {step}"
        )
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise _fail(path, "'optimizer'", "lacks its 'state' dict or 'param_groups' list")


def _same_kind(value: Any, wanted: Any) -> bool:
    """Whether a saved hyper-parameter has the type of the fresh optimizer's (any real number for one)."""
    number = (int, float)
    if isinstance(wanted, number) and not isinstance(wanted, bool):
        return isinstance(value, number) and not isinstance(value, bool)
    return type(value) is type(wanted)


def check_optimizer_state(
    saved: Mapping[str, Any], expected: Mapping[str, Any], shapes: Mapping[str, torch.Size], path: Path
) -> None:
    """A ``ValueError`` naming ``path`` and the parameter when the optimizer state ``saved`` does not
    fit the model: other parameter groups or names than ``expected`` (the state dict of the run's own
    fresh optimizer), or moment tensors whose shapes are not the parameters' (``shapes``)."""
    groups, wanted = saved["param_groups"], expected["param_groups"]
    if len(groups) != len(wanted):
        raise _fail(
            path,
            "optimizer['param_groups']",
            f"has {len(groups)} groups, the model's optimizer {len(wanted)}",
        )
    for number, (group, want) in enumerate(zip(groups, wanted, strict=True)):
        names = group.get("params") if isinstance(group, dict) else None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise _fail(path, f"optimizer['param_groups'][{number}]", "has no list of parameter names")
        extra, lacking = sorted(set(names) - set(want["params"])), sorted(set(want["params"]) - set(names))
        if extra or lacking:
            which = f"parameters the model lacks: {extra[:5]}" if extra else f"no state for {lacking[:5]}"
            raise _fail(
                path, f"optimizer['param_groups'][{number}]", f"names {which} (another model or LoRA setup?)"
            )
        for key, value in group.items():
            if key != "params" and key in want and not _same_kind(value, want[key]):
                raise _fail(path, f"optimizer['param_groups'][{number}][{key!r}]", f"is {value!r}")
    for name, moments in saved["state"].items():
        if name not in shapes:
            raise _fail(path, f"optimizer['state'][{name!r}]", "is for a parameter the model lacks")
        if not isinstance(moments, dict):
            raise _fail(path, f"optimizer['state'][{name!r}]", f"is a {type(moments).__name__}, not a dict")
        for key, value in moments.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise _fail(path, f"optimizer['state'][{name!r}][{key!r}]", "is not a floating-point tensor")
            if value.dim() and value.shape != shapes[name]:
                raise _fail(
                    path,
                    f"optimizer['state'][{name!r}][{key!r}]",
                    f"has shape {list(value.shape)}, the parameter {list(shapes[name])}",
                )
