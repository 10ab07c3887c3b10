"""The README's walk-through, run as a newcomer types it, from an empty directory.

The bash block after the ``<!-- walkthrough`` comment in README.md is run line by line in an empty
temporary directory: ``neoxja ...`` lines in process through ``neoxja.cli.main`` (each must return
0), ``neoxja serve ... &`` as a server process, the ``until curl ... /health`` loop as a wait for
it, the ``curl`` request with curl itself (httpx where there is no curl), and ``kill $!`` as the
SIGTERM that must end the server with status 0. The test supplies only what a newcomer brings:
``./abeja-tokenizer`` links to the real tokenizer files (NEOXJA_ASSETS), ``./corpus.txt`` to a
Japanese text file of NEOXJA_CORPUS, and port 8000 becomes a free port. A line of any other kind
fails the test, so the block cannot hold a command that nothing runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from neoxja import cli

REPO = Path(__file__).resolve().parent.parent
MARK = "<!-- walkthrough"
PORT = "8000"  # the README's port, replaced by a free one
HEALTH = re.compile(r"until curl -sf (http://\S+/health); do sleep 1; done")
READY_S = 120.0  # generous: a loaded 2-core CI machine; a healthy server answers in a few seconds


def walkthrough() -> list[str]:
    """The walk-through's commands, continuation lines joined, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(MARK) == 1, f"README.md must have exactly one {MARK!r} comment"
    after = text[text.index(MARK) :].split("\n", 1)[1]
    assert after.startswith("```bash\n"), f"the {MARK!r} comment must be right above a ```bash block"
    block = after[len("```bash\n") : after.index("\n```")]
    lines, pending = [], ""
    for raw in block.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_walkthrough_block_goes_from_init_to_a_served_fine_tuned_quantized_model() -> None:
    commands = [shlex.split(line, comments=True)[:2] for line in walkthrough()]
    steps = [words[1] for words in commands if words[0] == "neoxja"]
    for needed in ("init", "generate", "train", "quantize", "serve"):
        assert needed in steps, f"the walk-through has no neoxja {needed}"
    assert steps.index("init") < steps.index("train") < steps.index("quantize") < steps.index("serve")


class Server:
    """``neoxja serve ... &``: the server process, its log in a file."""

    def __init__(self, words: list[str], cwd: Path) -> None:
        self.log = cwd.parent / "serve.log"  # beside the walk-through's directory, not in it
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "neoxja", *words[1:]],
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"neoxja serve exited {self.proc.returncode}:\n{self.text()}"
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        pytest.fail(f"{url} did not answer 200 within {READY_S:.0f} s:\n{self.text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def request(words: list[str]) -> dict:
    """The curl line's request: curl itself where installed, else the same request through httpx."""
    if shutil.which("curl"):
        done = subprocess.run(words, capture_output=True, timeout=120)
        assert done.returncode == 0, f"{shlex.join(words)} exited {done.returncode}: {done.stderr!r}"
        return json.loads(done.stdout)
    url = next(word for word in words if word.startswith("http"))
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    body = words[words.index("-d") + 1].encode()
    return httpx.post(url, content=body, headers=headers, timeout=120).json()


def test_readme_walkthrough_runs(
    assets_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    (work / "abeja-tokenizer").symlink_to(assets_dir)
    (work / "corpus.txt").symlink_to(corpus_dir / "gsd-test.txt")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the walk-through needs no network
    port = str(free_port())
    server: Server | None = None
    try:
        for line in walkthrough():
            line = line.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}")
            words = shlex.split(line, comments=True)
            if words[:2] == ["neoxja", "serve"]:
                assert words[-1] == "&" and words[words.index("--port") + 1] == PORT, line
                words[words.index("--port") + 1] = port
                server = Server(words[:-1], work)
            elif words[0] == "neoxja":
                try:
                    status = cli.main(words[1:])
                except SystemExit as exit_:  # argparse's errors
                    status = exit_.code
                out, err = capsys.readouterr()
                assert status == 0, f"{line}\nexited {status}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
            elif match := HEALTH.fullmatch(line.split("#")[0].strip()):
                assert server is not None, f"{line}: no server started above it"
                server.wait_healthy(match[1])
            elif words[0] == "curl":
                assert server is not None, f"{line}: no server started above it"
                answer = request(words)
                assert "error" not in answer and answer["choices"][0]["text"], answer
            elif words == ["kill", "$!"]:
                assert server is not None, f"{line}: no server started above it"
                status = server.stop()
                assert status == 0, f"neoxja serve exited {status} on SIGTERM:\n{server.text()}"
                server = None
            else:
                pytest.fail(f"the README's walk-through has a line this test cannot run: {line}")
        assert server is None, "the walk-through leaves its server running (no kill $!)"
    finally:
        if server is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
