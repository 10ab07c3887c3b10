"""Where the tests find what lives outside the repository (``../shared`` beside the checkout): the
real tokenizer files and the Japanese corpus. Used by tests/conftest.py and tests_vllm/conftest.py
(the vLLM plugin's tests, run in a venv of their own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_dir(env: str, default: Path, must_have: tuple[str, ...]) -> Path:
    """The directory ``$env`` (else ``default``) if it holds every file of ``must_have``; otherwise
    the test is skipped with the reason, or fails in CI (``CI=true``), where nothing may be skipped."""
    path = Path(os.environ.get(env, default))
    missing = [name for name in must_have if not (path / name).is_file()]
    if missing:
        reason = f"{env}={path} lacks {', '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)
    return path


def tokenizer_assets() -> Path:
    """``$NEOXJA_ASSETS`` (default ``../shared/assets/abeja-tokenizer``): the real vocab.txt and
    emoji.json of abeja/gpt-neox-japanese-2.7b."""
    default = REPO.parent / "shared" / "assets" / "abeja-tokenizer"
    return shared_dir("NEOXJA_ASSETS", default, ("vocab.txt", "emoji.json"))


def corpus(*needed: str) -> Path:
    """``$NEOXJA_CORPUS`` (default ``../shared/corpus``): Japanese text holding the files ``needed``."""
    return shared_dir("NEOXJA_CORPUS", REPO.parent / "shared" / "corpus", needed)
