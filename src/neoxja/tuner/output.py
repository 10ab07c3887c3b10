"""The output directory of a training run: when a run may write into it, and what ``--overwrite``
clears there.

A directory that holds anything is refused (before any model or data is loaded), so that a new run
never mixes its ``metrics.jsonl`` and ``checkpoint-N`` folders with an earlier run's, or replaces a
model by accident, unless the user says which of two things is meant: ``--resume DIR`` (continue the
run that is there, from its latest checkpoint or one inside it) or ``--overwrite`` (start over:
what an earlier run wrote there is removed, and nothing else).
"""

from __future__ import annotations

import os
from pathlib import Path

from neoxja.tuner.checkpoints import CHECKPOINT_NAME, remove_folder

# What a run writes at the top of its directory besides checkpoints and the model's own files: the
# log, the summary, and the files of a LoRA result.
_RUN_FILES = ("metrics.jsonl", "training_args.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def same_directory(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one existing directory (through links, ``..``, bind mounts)."""
    return Path(a).is_dir() and Path(b).is_dir() and os.path.samefile(a, b)


def continues_run(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> bool:
    """Whether ``resume`` names ``output_dir`` itself or a checkpoint inside it: the run continues there."""
    if resume is None:
        return False
    resume = Path(resume)
    return same_directory(resume, output_dir) or (
        CHECKPOINT_NAME.fullmatch(resume.name) is not None and same_directory(resume.parent, output_dir)
    )


def check_output_dir(
    output_dir: str | os.PathLike, *, resume: str | os.PathLike | None = None, overwrite: bool = False
) -> None:
    """A ``ValueError`` (one line, naming the directory and the ways out) when a run may not write
    into ``output_dir``: a file, or a directory that holds anything, unless ``resume`` continues the
    run there or ``overwrite`` starts it over. Checks only; nothing is changed."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path} is a file, not a directory")
    continuing = continues_run(resume, path)
    if overwrite and continuing:
        raise ValueError(
            f"--overwrite would remove the checkpoints in {path} that --resume {resume} continues from: "
            f"pass one of them"
        )
    if overwrite or continuing or not path.is_dir() or next(path.iterdir(), None) is None:
        return
    raise ValueError(
        f"--output {path} is not empty: pass --resume {path} to continue the run there, or --overwrite "
        f"to start over (removing its checkpoints, metrics.jsonl and result)"
    )


def clear_earlier_run(output_dir: str | os.PathLike, *, keep_adapter: bool) -> list[Path]:
    """Remove what an earlier run wrote into ``output_dir`` and this run would mix with
    (``--overwrite``): its ``checkpoint-N`` folders, ``metrics.jsonl``, ``training_args.json``, the
    ``merged/`` model and a LoRA result's adapter files (unless ``keep_adapter``: the model being
    trained was read from them). A model's own files stay until this run's result replaces them in
    one step; other entries (the user's, tokenizer files the run writes again) stay. A folder is
    renamed to a temporary name first, so an interrupted removal leaves no half checkpoint behind."""
    path = Path(output_dir)
    removed: list[Path] = []
    if not path.is_dir():
        return removed
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            if CHECKPOINT_NAME.fullmatch(name) or (name == "merged" and (entry / "config.json").is_file()):
                remove_folder(entry)
                removed.append(entry)
        elif name in _RUN_FILES or (name in _ADAPTER_FILES and not keep_adapter):
            entry.unlink()
            removed.append(entry)
    return removed
