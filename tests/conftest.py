"""Shared fixtures: where the real tokenizer files and the Japanese corpus live.

Both come from ``../shared`` beside the checkout (never from the repository). Outside CI a
missing directory skips the tests that need it, with the reason; inside CI (``CI=true``) it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_dir(env: str, default: Path, must_have: tuple[str, ...]) -> Path:
    path = Path(os.environ.get(env, default))
    missing = [name for name in must_have if not (path / name).is_file()]
    if missing:
        reason = f"{env}={path} lacks {', '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The real vocab.txt + emoji.json of abeja/gpt-neox-japanese-2.7b."""
    return _shared_dir(
        "NEOXJA_ASSETS", REPO.parent / "shared" / "assets" / "abeja-tokenizer", ("vocab.txt", "emoji.json")
    )


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Japanese text (Aozora Bunko novels, UD GSD sentences) for tests."""
    return _shared_dir("NEOXJA_CORPUS", REPO.parent / "shared" / "corpus", ("neko.txt", "gsd-test.txt"))
