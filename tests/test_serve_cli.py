"""``neoxja serve`` as a user runs it: a process on a port, stopped by SIGTERM while a stream is running."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from neoxja.cli import main


def test_sigterm_finishes_the_running_stream_and_exits_0(tiny_checkpoint: Path) -> None:
    # --port 0: any free port, which the start-up line names (before the model loads)
    command = [sys.executable, "-m", "neoxja", "serve", "--model", str(tiny_checkpoint), "--port", "0"]
    command += ["--max-model-len", "512", "--served-model-name", "tiny", "--drain-timeout", "60"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    first = process.stderr.readline()
    prefix = re.escape(f"serving {tiny_checkpoint} at http://127.0.0.1:")
    match = re.search(prefix + r"(\d+)/v1 as 'tiny'", first)
    assert match, first
    port = int(match.group(1))
    assert port != 0
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


def test_a_port_in_use_is_a_one_line_error_before_the_model_loads(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import neoxja.commands.serve

    def no_load(args: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(neoxja.commands.serve, "load", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: port {port} on 127.0.0.1 is in use" in err


@pytest.mark.parametrize(
    "key, env, message",
    [
        ("", None, "--api-key is empty"),
        (None, "", "$NEOXJA_API_KEY is empty"),
        ("ключ", None, "--api-key: character 1 of the key is not printable ASCII"),
        ("open sesame", "ignored", "--api-key: character 5 of the key is a space"),
    ],
)
def test_an_api_key_no_client_could_send_is_refused_at_startup(
    key: str | None,
    env: str | None,
    message: str,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty key used to turn authentication off without a word, a non-ASCII one to lock everyone
    out: both are one-line errors, exit status 2, before a port is opened."""
    if env is None:
        monkeypatch.delenv("NEOXJA_API_KEY", raising=False)
    else:
        monkeypatch.setenv("NEOXJA_API_KEY", env)
    argv = ["serve", "--model", str(tiny_checkpoint)] + ([] if key is None else ["--api-key", key])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_limits_defaults_are_the_servers_and_help_gives_them(capsys: pytest.CaptureFixture[str]) -> None:
    from neoxja.cli import build_parser
    from neoxja.serving.app import ServerConfig
    from neoxja.serving.connections import ConnectionLimits
    from neoxja.serving.protocol import DEFAULT_MAX_WORK

    args = build_parser().parse_args(["serve", "--model", "m"])
    limits, config = ConnectionLimits(), ServerConfig(served_model_name="m")
    defaults = {
        "--max-connections": (args.max_connections, limits.max_connections),
        "--timeout-keep-alive": (args.timeout_keep_alive, limits.timeout_keep_alive),
        "--timeout-header": (args.timeout_header, limits.timeout_header),
        "--timeout-body": (args.timeout_body, limits.timeout_body),
        "--stall-timeout": (args.stall_timeout, config.stall_timeout),
        "--max-work": (DEFAULT_MAX_WORK, config.max_work),  # None on the command line: the server's
    }
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, (given, server_default) in defaults.items():
        assert given == server_default, flag
        described = text.split(f"{flag} {flag[2:].upper().replace('-', '_')}")[-1].split(" --", 1)[0]
        assert f"(default: {given:g}" in described, flag
