"""Answering a generation request: submit it to the engine, then stream its events or send the whole
answer, without blocking the event loop.

What is cheap (a token's chunk) is done on the event loop; what grows with the request (scoring an
echoed prompt, decoding the echoed prompts, a whole answer's JSON) is done in a worker thread, so
that ``/health`` and every other connection are answered while a big answer is built. A whole answer
is serialized one choice at a time, so that no single C call holds the interpreter for long.

A request whose client goes away is cancelled (its sequences freed at the engine's next step). A
request cut by the server's shutdown (the drain timeout) ends in a way its client can tell: a stream
with an error event and then ``[DONE]``, a whole answer with a 503.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from neoxja.serving.engine import Engine, EngineClosed, Event, QueueFull
from neoxja.serving.protocol import APIError, Parsed
from neoxja.serving.responses import Collector

if TYPE_CHECKING:
    from neoxja.serving.app import Server

CUT_MESSAGE = "the server shut down before this request finished (it was cut at the drain timeout)"


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def generate(server: Server, engine: Engine, request: Request, parsed: Parsed, kind: str) -> Response:
    """Submit ``parsed`` to the engine and answer with the whole result or a stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    arrival = time.monotonic()

    def sink(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    handle = await _submit(engine, parsed, sink)
    server.metrics.prompt_tokens.inc(sum(len(p) for p in parsed.prompts) * parsed.n)
    collector = Collector(
        parsed, server.tokenizer, server.config.served_model_name, kind, server.metrics, arrival
    )
    request.scope["state"]["log"]["collector"] = collector
    server.active.add(collector)

    def close() -> None:
        server.active.discard(collector)
        if collector.unfinished:  # the client is gone: cancel (freed at the engine's next step)
            engine.cancel(handle)
            collector.cancel()

    if parsed.stream:
        return _EventStream(_stream(events, collector), close)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while collector.unfinished:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            await _add(collector, _batch(getter.result(), events))
    finally:
        gone.cancel()
        close()
    errors = [c.error for c in collector.choices if c.error]
    if errors:
        raise APIError(500, f"generation failed: {errors[0]}", type="server_error")
    if any(c.finish_reason == "cancelled" for c in collector.choices):
        raise APIError(503, CUT_MESSAGE, type="service_unavailable")
    body = await asyncio.to_thread(_whole_answer, collector)
    return Response(body, media_type="application/json")


async def _submit(engine: Engine, parsed: Parsed, sink: Callable[[Event], None]) -> Any:
    """``engine.submit`` in a worker thread (a request of hundreds of sequences takes a while to set
    up); a request cancelled meanwhile (the server stopping) is cancelled in the engine too."""
    future = asyncio.get_running_loop().run_in_executor(
        None, lambda: engine.submit(parsed.prompts, parsed.params, sink, n=parsed.n)
    )
    try:
        return await asyncio.shield(future)
    except QueueFull as err:
        raise APIError(
            429,
            f"the server is busy: {err}; retry later",
            type="rate_limit_error",
            headers={"Retry-After": "1"},
        ) from None
    except EngineClosed as err:
        raise APIError(503, str(err), type="service_unavailable", headers={"Connection": "close"}) from None
    except ValueError as err:
        raise APIError(400, str(err)) from None
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.exception() is None and engine.cancel(f.result()))
        raise


def _batch(first: Event, events: asyncio.Queue) -> list[Event]:
    """``first`` and the events already waiting behind it."""
    batch = [first]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


async def _add(collector: Collector, batch: list[Event]) -> bytes:
    """Record ``batch`` and return its stream chunks; in a worker thread if it scores a prompt."""
    if any(event.prompt_logprobs is not None for event in batch):
        return await asyncio.to_thread(_record, collector, batch)
    return _record(collector, batch)


def _record(collector: Collector, batch: list[Event]) -> bytes:
    out = []
    for event in batch:
        collector.add(event)
        if not collector.parsed.stream:
            continue
        if event.error:
            out.append(sse(APIError(500, f"generation failed: {event.error}", type="server_error").body()))
        elif event.finish_reason == "cancelled":  # a live stream is only cancelled by the shutdown
            if not collector.cut:
                collector.cut = True
                out.append(sse(APIError(503, CUT_MESSAGE, type="service_unavailable").body()))
        else:
            out.extend(sse(chunk) for chunk in collector.chunks(event))
    return b"".join(out)


def _whole_answer(collector: Collector) -> bytes:
    """The whole answer's JSON, serialized choice by choice."""
    answer = collector.completion() if collector.kind == "completion" else collector.chat()
    compact: dict[str, Any] = {"ensure_ascii": False, "allow_nan": False, "separators": (",", ":")}
    choices = [json.dumps(choice, **compact).encode() for choice in answer.pop("choices")]
    rest = json.dumps(answer, **compact).encode()
    return b'{"choices":[' + b",".join(choices) + b"]," + rest[1:]


def _echoes(collector: Collector) -> bytes:
    """The first chunk of every choice of an echoed stream: its prompt's text."""
    pieces = []
    for index in range(len(collector.choices)):
        pieces.append(sse(collector.completion_piece(index, collector.echo_text(index), None, None)))
        collector.started.add(index)
    return b"".join(pieces)


async def _stream(events: asyncio.Queue, collector: Collector) -> AsyncIterator[bytes]:
    """Server-sent events: chunks as tokens come, the usage chunk if asked for, then ``[DONE]``."""
    if collector.parsed.echo and not collector.parsed.params.prompt_logprobs:
        yield await asyncio.to_thread(_echoes, collector)
    while collector.unfinished:
        data = await _add(collector, _batch(await events.get(), events))
        if data:
            yield data
    if collector.parsed.include_usage:
        yield sse(collector.usage_chunk())
    yield b"data: [DONE]\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (whose body was read) closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` when the response ends, however it ends (a client
    that goes away included: Starlette then stops iterating the stream without closing it)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
