"""``neoxja serve`` as a user runs it: a process on a port, stopped by SIGTERM while a stream is running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from neoxja.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_running_stream_and_exits_0(tiny_checkpoint: Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "neoxja", "serve", "--model", str(tiny_checkpoint), "--port", str(port)]
    command += ["--max-model-len", "512", "--served-model-name", "tiny", "--drain-timeout", "60"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": "吾輩は猫である。", "max_tokens": 400, "temperature": 0}
        body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 400  # the stream ran to its end
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stderr.read()
    assert "POST /v1/completions 200" in log and "completion_tokens=400" in log  # one line per request


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--chat-template", "/nonexistent/template.jinja"], "--chat-template"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_options_are_one_line_errors(
    argv: list[str], message: str, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tiny_checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
