"""Saving a model directory never loses a model: the new one is written beside the old one and
swapped in whole; failures and kills leave the old one loadable; user files survive; leftovers of
killed saves are removed once their process is gone; files get the umask's permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from neoxja import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, saving
from neoxja.saving import remove_stale_saves, replace_directory

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1)
X = torch.arange(3, 11).view(1, 8)


def model(seed: int) -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**CONFIG)).eval()


def logits_of(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return GPTNeoXJapaneseForCausalLM.from_pretrained(directory)(X).logits


def logits(m: GPTNeoXJapaneseForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return m(X).logits


def siblings(directory: Path) -> list[str]:
    """Everything beside ``directory`` in its parent (temporary directories included)."""
    return sorted(p.name for p in directory.parent.iterdir() if p != directory)


@pytest.fixture
def old(tmp_path: Path) -> tuple[GPTNeoXJapaneseForCausalLM, Path]:
    """A model saved in ``tmp_path/parent/model`` (sharded, so that a new save changes the file set)."""
    first = model(0)
    directory = tmp_path / "parent" / "model"
    first.save_pretrained(directory, max_shard_size="30KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return first, directory


def test_a_new_save_leaves_nothing_beside_it(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "model"
    m = model(0)
    m.save_pretrained(directory)
    assert torch.equal(logits_of(directory), logits(m))
    assert siblings(directory) == []


def test_saving_over_a_model_keeps_the_users_files_and_drops_the_old_weights(old) -> None:
    _, directory = old
    (directory / "README.md").write_text("my notes")
    (directory / "metrics.jsonl").write_text('{"step": 1}\n')
    (directory / "checkpoint-3").mkdir()
    (directory / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (directory / "latest").symlink_to("checkpoint-3")
    (directory / "pytorch_model.bin").write_bytes(b"an old format's weights")
    inode = (directory / "metrics.jsonl").stat().st_ino
    new = model(1)
    new.save_pretrained(directory)
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "README.md",
        "checkpoint-3",
        "config.json",
        "latest",
        "metrics.jsonl",
        "model.safetensors",
    ]
    assert (directory / "README.md").read_text() == "my notes"
    assert (directory / "checkpoint-3" / "trainer_state.json").read_text() == "{}"
    assert os.readlink(directory / "latest") == "checkpoint-3"
    assert (directory / "metrics.jsonl").stat().st_ino == inode  # carried as a link, not a copy
    assert torch.equal(logits_of(directory), logits(new))
    assert siblings(directory) == []


def test_a_write_that_fails_midway_leaves_the_old_model(old, monkeypatch: pytest.MonkeyPatch) -> None:
    first, directory = old
    before = sorted(p.name for p in directory.iterdir())

    def half_then_fail(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model(1).save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == before
    assert torch.equal(logits_of(directory), logits(first))
    assert siblings(directory) == []  # the temporary directory is gone too


def test_a_killed_save_leaves_the_old_model_and_one_named_leftover_that_the_next_save_removes(old) -> None:
    first, directory = old
    script = (
        "import os, sys\n"
        "from neoxja.saving import replace_directory\n"
        "with replace_directory(sys.argv[1]) as staging:\n"
        "    (staging / 'config.json').write_text('{}')\n"
        "    (staging / 'model.safetensors').write_bytes(b'half a file')\n"
        "    os._exit(9)  # killed mid-save: no cleanup runs\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True)
    assert child.returncode == 9, child.stderr
    leftovers = siblings(directory)
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.partial-"), leftovers
    assert torch.equal(logits_of(directory), logits(first))
    new = model(1)
    new.save_pretrained(directory)  # the killed process is gone: its leftover goes
    assert siblings(directory) == []
    assert torch.equal(logits_of(directory), logits(new))


def test_files_follow_the_umask_and_the_directory_keeps_its_mode(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        directory = tmp_path / "model"
        model(0).save_pretrained(directory)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o644}
        directory.chmod(0o750)
        os.umask(0o027)
        model(1).save_pretrained(directory)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750
        assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o640}
    finally:
        os.umask(previous)


def test_without_an_atomic_exchange_two_renames_do_the_swap(old, monkeypatch: pytest.MonkeyPatch) -> None:
    first, directory = old
    monkeypatch.setattr(saving, "exchange", lambda a, b: False)
    new = model(1)
    new.save_pretrained(directory)
    assert torch.equal(logits_of(directory), logits(new))
    assert siblings(directory) == []

    # The second rename failing puts the old directory back.
    real_rename = os.rename

    def failing(source: str | os.PathLike, target: str | os.PathLike) -> None:
        if ".partial-" in Path(source).name:
            raise OSError(5, "Input/output error")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"):
        model(2).save_pretrained(directory)
    monkeypatch.setattr(os, "rename", real_rename)
    assert torch.equal(logits_of(directory), logits(new))
    assert siblings(directory) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_leftovers_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead, live = dead_pid(), os.getppid()
    (tmp_path / "m").mkdir()
    made = {
        f".m.partial-{dead}": False,  # a killed save: removed
        f".m.partial-{live}": True,  # a save in progress in another process: kept
        f".m.partial-{os.getpid()}": True,  # one of this process: kept
        f".m.replaced-{dead}": False,  # an old copy set aside while m exists: removed
        f".gone.replaced-{dead}": True,  # the only copy of "gone": kept
        f".checkpoint-4.stale-{dead}": True,  # earlier versions' aside name, checkpoint-4 missing: kept
        f".other.partial-{dead}": False,
        "checkpoint-2": True,
        ".hidden": True,
    }
    for name in made:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    removed = remove_stale_saves(tmp_path, "m")
    assert sorted(p.name for p in removed) == sorted([f".m.partial-{dead}", f".m.replaced-{dead}"])
    remove_stale_saves(tmp_path)
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {name for name, keep in made.items() if keep} | {"m"}


def test_files_mount_points_and_links(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="it is a file, not a directory"):
        model(0).save_pretrained(tmp_path / "file")
    with pytest.raises(OSError, match="it is a mount point"):
        with replace_directory("/"):
            pass
    real = tmp_path / "real"
    model(0).save_pretrained(real)
    (tmp_path / "link").symlink_to(real)
    new = model(1)
    new.save_pretrained(tmp_path / "link")  # the link stays, its target gets the new model
    assert (tmp_path / "link").is_symlink() and torch.equal(logits_of(real), logits(new))


def test_saving_leaves_the_model_and_its_config_alone(tmp_path: Path) -> None:
    m = model(0).to(torch.bfloat16)
    before = m.config.to_dict()
    m.save_pretrained(tmp_path / "out")
    assert m.config.to_dict() == before and m.config.dtype is None
    saved = GPTNeoXJapaneseConfig.from_pretrained(tmp_path / "out")
    assert saved.dtype == torch.bfloat16 and saved.architectures == ["GPTNeoXJapaneseForCausalLM"]


def test_a_failed_init_leaves_no_half_written_out(
    tmp_path: Path, assets_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from neoxja.cli import main

    def fail(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    out = tmp_path / "tiny"
    assert main(["init", "--tokenizer", str(assets_dir), "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary directory
    monkeypatch.undo()
    assert main(["init", "--tokenizer", str(assets_dir), "--out", str(out)]) == 0
    assert (out / "vocab.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_exchange_swaps_two_directories_or_leaves_both_alone(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").touch()
    (tmp_path / "b").mkdir()
    swapped = saving.exchange(tmp_path / "a", tmp_path / "b")  # False where the system cannot
    assert (tmp_path / ("b" if swapped else "a") / "from-a").is_file()
    assert not (tmp_path / ("a" if swapped else "b") / "from-a").exists()
    if swapped:  # an error of the call itself is raised, not taken for "cannot"
        with pytest.raises(OSError, match="cannot swap .* No such file"):
            saving.exchange(tmp_path / "a", tmp_path / "missing")
