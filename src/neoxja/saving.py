"""Saving model directories so that no save can lose a model: :func:`replace_directory` and
:func:`save_pretrained`.

Everything is written into a temporary sibling of the destination, ``.<name>.partial-<pid>``,
flushed to disk, and only then swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``
call, so at every instant the destination path holds either the old complete directory or the new
complete one; elsewhere (or on a filesystem without it) the old directory is first renamed aside to
``.<name>.replaced-<pid>``, which leaves a moment without one, recoverable by renaming it back.
A save that fails removes its temporary directory; a killed one leaves it, and the next save into
the same place (or the next training run in its parent) removes it once its process is gone.

The user's own files in the destination (a README, a training run's ``metrics.jsonl`` and
``checkpoint-N`` folders, tokenizer files saved separately) are carried into the new directory,
as hard links (copies where links are impossible); only the old model's own files
(``config.json`` and the weight files) go with the old directory.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from neoxja.network import GPTNeoXJapanesePreTrainedModel

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# The files a model save writes, which replace (never join) those of an earlier save.
MODEL_FILES = re.compile(
    r"config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?"
)
# Temporary siblings: a save in progress (partial), an old directory set aside (replaced), and the
# name under which earlier neoxja versions set an old checkpoint aside (stale).
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|replaced|stale)-(?P<pid>\d+)")


def temporary_sibling(destination: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>`` beside ``destination``: the name a save of this process uses."""
    return destination.with_name(f".{destination.name}.{kind}-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (this one included); one of another user counts as alive."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False  # never a saving process, and os.kill(0, ...) would signal our own group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_saves(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary directories that killed saves left in ``directory`` (for the entry
    ``name`` only, if given), and return them.

    One is stale when the process in its name is no longer running. A ``replaced`` directory (an
    old model set aside) is kept while nothing is at its name: then it is the only complete copy.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if _process_alive(int(match["pid"])) or not entry.is_dir() or entry.is_symlink():
            continue
        if match["kind"] != "partial" and not (directory / match["name"]).exists():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextmanager
def replace_directory(destination: str | os.PathLike, *, carry_over: bool = True) -> Iterator[Path]:
    """Yield an empty directory to write into; when the block ends without an error it replaces
    ``destination`` in one step, carrying over (``carry_over``) the entries that the block did not
    write and that are not the old model's own files (:data:`MODEL_FILES`).

    ``destination`` may be missing (it is created) or an existing directory (a symbolic link to one
    is followed), not a mount point (which no rename can replace). An error in the block removes the
    temporary directory and leaves ``destination`` as it was. The new directory keeps the mode of the
    one it replaces; new files follow the umask.
    """
    destination = Path(os.path.abspath(destination))
    if destination.is_symlink():
        destination = Path(os.path.realpath(destination))
    if destination.exists() and not destination.is_dir():
        raise OSError(f"cannot save into {destination}: it is a file, not a directory")
    if os.path.ismount(destination):
        raise OSError(
            f"cannot save into {destination}: it is a mount point, which cannot be replaced in one step; "
            f"save into a folder inside it"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(destination.parent, destination.name)
    staging = temporary_sibling(destination, "partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a dead process that had this pid
    try:
        os.mkdir(staging)  # mode 0o777 less the umask, unlike tempfile's 0o700
    except PermissionError as err:
        raise PermissionError(
            err.errno,
            f"cannot save into {destination}: the new files are written beside it and swapped in, "
            f"which needs write permission on {destination.parent}",
        ) from err
    try:
        yield staging
        _sync_tree(staging)
        if destination.is_dir():
            if carry_over:
                _carry_over(destination, staging)
            shutil.copymode(destination, staging)
        _swap_in(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that ``new`` lacks, except the old
    model's files (a save in progress of another process inside ``old`` is carried too)."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink() or MODEL_FILES.fullmatch(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem below, or one without hard links
        shutil.copy2(source, target)


def _sync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so that the swap never exposes a
    directory whose data a power cut could still lose."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _fsync(path, os.O_RDONLY)
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str | os.PathLike, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. a directory on a platform that cannot open one
    try:
        os.fsync(fd)
    except OSError:
        pass  # a filesystem without fsync (some network or virtual ones)
    finally:
        os.close(fd)


def _swap_in(staging: Path, destination: Path) -> None:
    """Put ``staging`` at ``destination`` and remove what was there."""
    if not destination.exists():
        os.rename(staging, destination)
    elif exchange(staging, destination):
        shutil.rmtree(staging)  # now the old directory
    else:
        aside = temporary_sibling(destination, "replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(destination, aside)
        try:
            os.rename(staging, destination)
        except BaseException:
            os.rename(aside, destination)
            raise
        shutil.rmtree(aside)
    _fsync(destination.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False when
    the system or filesystem cannot, so that the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


# ----- model directories ------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10**9), ``"500MiB"`` (2**20), ``"10KB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


def save_pretrained(
    model: GPTNeoXJapanesePreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    safe_serialization: bool = True,
    max_shard_size: int | str = "50GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` and the weights into ``save_directory``, replacing an earlier model
    there in one step (:func:`replace_directory`: other files of the directory are kept)."""
    limit = parse_size(max_shard_size)
    with replace_directory(save_directory) as staging:
        write_pretrained(
            model, staging, safe_serialization=safe_serialization, limit=limit, state_dict=state_dict
        )


def write_pretrained(
    model: GPTNeoXJapanesePreTrainedModel,
    directory: Path,
    *,
    safe_serialization: bool = True,
    limit: int = 50 * 10**9,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` and the weights into the empty ``directory``, in shards of at most
    ``limit`` bytes (with an index file) when they do not fit in one.

    A tied ``embed_out.weight`` is left out, as transformers does: it is rebuilt from ``embed_in``.
    ``state_dict`` (tensors under the model's own keys) is written instead of ``model.state_dict()``.
    The model's config is written with the dtype and class of the weights, and left as it was.
    """
    state = dict(state_dict) if state_dict is not None else model.state_dict()
    if getattr(model.config, "tie_word_embeddings", True):
        state.pop("embed_out.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += nbytes

    config = copy.deepcopy(model.config)  # saving leaves the model's own config as it was
    config.dtype = model.dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)

    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    count = len(shards)
    names = [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]
    if count == 1:
        names = [f"{stem}.{ext}"]
    mode = new_file_mode(directory)
    for name, shard in zip(names, shards, strict=True):
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, directory / name, metadata={"format": "pt"})
            os.chmod(directory / name, mode)  # the library writes 0600 files, whatever the umask
        else:
            torch.save(shard, directory / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        index_name = SAFE_INDEX if safe_serialization else BIN_INDEX
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (directory / index_name).write_text(text, encoding="utf-8")


def new_file_mode(directory: Path) -> int:
    """The permissions a file created in ``directory`` gets (0666 less the umask, or as the directory's
    default ACL says), found by creating one: no process-wide umask is touched."""
    probe = directory / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)
