"""Find a model's files in a local directory or on the Hugging Face Hub.

Every loader in neoxja (config, weights, tokenizer) goes through :func:`resolve_file`, so the
Hub's cache (``HF_HOME``, ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``), revisions and
tokens behave the same way everywhere, and only the files that are asked for are downloaded.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "abeja/gpt-neox-japanese-2.7b"


class HubUnavailableError(OSError):
    """The Hub could not be reached (or offline mode is on) and the file is not in the local cache."""


@dataclass(frozen=True)
class HubOptions:
    """Where and how to look for files on the Hub; mirrors ``from_pretrained``'s keyword arguments."""

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    subfolder: str = ""

    @classmethod
    def pop_from(cls, kwargs: dict) -> HubOptions:
        """Take the Hub keyword arguments out of a ``from_pretrained`` kwargs dict."""
        return cls(
            revision=kwargs.pop("revision", None),
            cache_dir=kwargs.pop("cache_dir", None),
            token=kwargs.pop("token", None),
            local_files_only=kwargs.pop("local_files_only", False),
            subfolder=kwargs.pop("subfolder", "") or "",
        )


def file_not_directory(path: str | os.PathLike) -> OSError:
    """The error for a file passed where a model directory (or Hub id) belongs."""
    return OSError(f"{path} is a file: pass the model directory that holds it ({Path(path).parent})")


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` is an existing directory rather than a Hub id."""
    return Path(name_or_path).is_dir()


def resolve_file(
    name_or_path: str | os.PathLike, filename: str, options: HubOptions | None = None
) -> Path | None:
    """Return the local path of ``filename`` for a model directory or Hub id, or None if it has none.

    A local directory is only looked into. A Hub id is downloaded into (or read from) the Hub
    cache. ``None`` means the file does not exist there; a Hub that cannot be reached while the
    file is not cached raises :class:`HubUnavailableError`, and an unknown repository or revision
    raises ``OSError`` naming it.
    """
    options = options or HubOptions()
    if is_local(name_or_path):
        path = Path(name_or_path) / options.subfolder / filename
        return path if path.is_file() else None
    repo_id = str(name_or_path)
    if Path(name_or_path).is_file():
        raise file_not_directory(name_or_path)
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise OSError(f"model directory {repo_id!r} does not exist (and it is not a Hub id owner/name)")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Without a resolvable Hub host name, huggingface_hub would still retry each request with
    # back-off (~25 s per file) before falling back to the cache: go to the cache straight away.
    local_only = options.local_files_only or not _hub_host_resolves()
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                subfolder=options.subfolder or None,
                revision=options.revision,
                cache_dir=options.cache_dir,
                token=options.token,
                local_files_only=local_only,
                library_name="neoxja",
            )
        )
    except LocalEntryNotFoundError as err:
        # Offline (or unreachable) and not in the cache. If the repository's snapshot is cached,
        # the file is simply absent from it; otherwise we know nothing about the repository.
        if _snapshot_cached(repo_id, options):
            return None
        raise HubUnavailableError(
            f"cannot get {filename!r} of {repo_id!r}: the Hugging Face Hub is not reachable "
            f"(or HF_HUB_OFFLINE/local_files_only is set) and it is not in the Hub cache. "
            f"Download the model elsewhere and pass its local directory instead of the Hub id."
        ) from err
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as err:
        raise OSError(f"{repo_id!r} is not a local directory nor a model on the Hugging Face Hub") from err
    except RevisionNotFoundError as err:
        raise OSError(f"revision {options.revision!r} does not exist for {repo_id!r}") from err
    except HFValidationError as err:
        raise OSError(f"{repo_id!r} is neither a model directory nor a valid Hub id: {err}") from err


def _hub_host_resolves() -> bool:
    """Whether the Hub endpoint's host name resolves (a DNS lookup: milliseconds either way)."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _snapshot_cached(repo_id: str, options: HubOptions) -> bool:
    from huggingface_hub import constants

    cache = Path(options.cache_dir or constants.HF_HUB_CACHE)
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return False
    revision = options.revision or "main"
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    return (repo_dir / "snapshots" / commit).is_dir()
