"""neoxja.hub.resolve_file: local directories and an offline Hub cache laid out by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from neoxja.hub import HubOptions, HubUnavailableError, resolve_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(root: Path, repo_id: str, files: dict[str, str], revision: str = "main") -> Path:
    """Lay out ``root`` the way huggingface_hub stores a downloaded snapshot."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / revision).write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_file(tmp_path, "config.json") == tmp_path / "config.json"
    assert resolve_file(tmp_path, "model.safetensors") is None


def test_local_subfolder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text("{}")
    found = resolve_file(tmp_path, "config.json", HubOptions(subfolder="sub"))
    assert found == tmp_path / "sub" / "config.json"


def test_offline_cache_hit_and_absent_file(offline: Path) -> None:
    snapshot = make_hub_cache(offline, "abeja/gpt-neox-japanese-2.7b", {"config.json": '{"a": 1}'})
    found = resolve_file("abeja/gpt-neox-japanese-2.7b", "config.json")
    assert found is not None and found.read_text() == '{"a": 1}'
    assert found.parent == snapshot
    # The snapshot is cached but lacks the file: that is "absent", not "unreachable".
    assert resolve_file("abeja/gpt-neox-japanese-2.7b", "model.safetensors") is None


def test_offline_uncached_repo_says_hub_unreachable(offline: Path) -> None:
    with pytest.raises(HubUnavailableError, match="not reachable.*local directory"):
        resolve_file("abeja/gpt-neox-japanese-2.7b", "config.json")


def test_explicit_cache_dir_and_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    make_hub_cache(tmp_path, "someone/model", {"vocab.txt": "x"}, revision="v1")
    options = HubOptions(cache_dir=tmp_path, revision="v1")
    assert resolve_file("someone/model", "vocab.txt", options).read_text() == "x"


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="does not exist"):
        resolve_file(str(tmp_path / "nope" / "deeper"), "config.json")
    with pytest.raises(OSError, match="does not exist"):
        resolve_file("./not-here", "config.json")


def test_pop_from_takes_only_hub_kwargs() -> None:
    kwargs = {"revision": "r", "cache_dir": "/c", "token": "t", "dtype": "auto", "local_files_only": True}
    options = HubOptions.pop_from(kwargs)
    assert options == HubOptions(revision="r", cache_dir="/c", token="t", local_files_only=True)
    assert kwargs == {"dtype": "auto"}


def test_unresolvable_hub_goes_to_the_cache_without_retrying(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No network and no offline flag: no request is made (huggingface_hub would retry each with
    back-off for ~25 s); a cached file is still found and an uncached one fails at once."""
    import socket

    import huggingface_hub.constants as constants
    import huggingface_hub.file_download

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_request(*args: object, **kwargs: object) -> None:
        raise AssertionError("a request to the Hub was attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", no_request)
    make_hub_cache(cache, "abeja/gpt-neox-japanese-2.7b", {"config.json": "{}"})
    assert resolve_file("abeja/gpt-neox-japanese-2.7b", "config.json") is not None
    with pytest.raises(HubUnavailableError, match="not reachable"):
        resolve_file("someone/not-cached", "config.json")


def test_a_file_given_as_the_model_says_to_pass_its_directory(tmp_path) -> None:
    from neoxja import GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    for load in (GPTNeoXJapaneseForCausalLM.from_pretrained, GPTNeoXJapaneseTokenizer.from_pretrained):
        with pytest.raises(OSError, match=f"{weights} is a file: pass the model directory that holds it"):
            load(weights)
