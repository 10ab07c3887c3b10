"""The HTTP server: OpenAI's API over a :class:`~neoxja.serving.engine.Engine`, on FastAPI.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus), and the tokenizer endpoints ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's shapes, which lm-eval's remote tokenizer
reads). With an API key set, everything but ``/health`` and ``/metrics`` needs
``Authorization: Bearer KEY`` (compared in constant time).

The model loads in a background thread once the app starts: until then, and from the moment a
shutdown begins, requests get 503 (``/health`` says which). Errors use OpenAI's JSON shape: 400
(the field is named), 401, 404 (unknown model or path), 413 (body over ``max_body_bytes``), 429
with ``Retry-After`` (queue full), 503. One log line per request (logger ``neoxja.server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from neoxja.serving.chat import DEFAULT_CHAT_STOPS, DEFAULT_CHAT_TEMPLATE, compile_chat_template
from neoxja.serving.engine import Engine, EngineClosed, QueueFull
from neoxja.serving.metrics import Metrics
from neoxja.serving.protocol import APIError, Limits, Parsed, parse_chat, parse_completion
from neoxja.serving.responses import Collector

logger = logging.getLogger("neoxja.server")

OPEN_PATHS = ("/health", "/metrics")


@dataclass
class ServerConfig:
    """What ``neoxja serve`` sets: names, caps, engine sizes and the chat template. (How long running
    requests may finish after SIGTERM is uvicorn's ``timeout_graceful_shutdown``; when the app's
    lifespan ends, what still runs is cancelled.)"""

    served_model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 256
    max_model_len: int | None = None
    max_tokens: int | None = None  # cap on a request's max_tokens (default: max_model_len)
    prefill_chunk: int = 512
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    chat_template: str | None = None  # None: DEFAULT_CHAT_TEMPLATE with DEFAULT_CHAT_STOPS


class Server:
    """The app's state: the engine once loaded, the tokenizer, the caps and the metrics."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], config: ServerConfig) -> None:
        self.load, self.config = load, config
        self.engine: Engine | None = None
        self.tokenizer: Any = None
        self.limits: Limits | None = None
        self.render: Callable[[list[dict[str, str]]], str] | None = None
        self.chat_stops = [] if config.chat_template is not None else DEFAULT_CHAT_STOPS
        self.metrics = Metrics()
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None  # the CLI stops uvicorn: no model, no server
        self.draining = False

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="neoxja-load", daemon=True).start()

    def _load(self) -> None:
        try:
            model, tokenizer = self.load()
            config = self.config
            engine = Engine(
                model,
                tokenizer,
                max_batch=config.max_batch,
                max_queue=config.max_queue,
                max_model_len=config.max_model_len,
                prefill_chunk=config.prefill_chunk,
            )
            self.render = compile_chat_template(
                config.chat_template or DEFAULT_CHAT_TEMPLATE, tokenizer.bos_token, tokenizer.eos_token
            )
            self.limits = Limits(
                max_model_len=engine.max_model_len,
                vocab_size=model.config.vocab_size,
                max_tokens=min(config.max_tokens or engine.max_model_len, engine.max_model_len),
                max_n=config.max_n,
            )
            self.tokenizer = tokenizer
            engine.start()
            self.metrics.watch(engine)
            self.engine = engine
            logger.info(
                "serving %s: %s decoding, %d KV slots of %d positions (%.1f MB)",
                config.served_model_name,
                engine.step.name,
                engine.pool.num_slots,
                engine.max_model_len,
                engine.pool.nbytes / 1e6,
            )
        except Exception as err:  # reported by /health and every request
            self.failure = f"{type(err).__name__}: {err}"
            logger.error("could not load the model: %s", self.failure)
            if self.on_failure is not None:
                self.on_failure()

    def ready(self) -> Engine:
        """The engine, or a 503 saying why there is none."""
        if self.draining or (self.engine is not None and self.engine.closed):
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if self.engine is None:
            message = f"the model failed to load: {self.failure}" if self.failure else "the model is loading"
            raise APIError(503, message, type="service_unavailable", headers={"Retry-After": "5"})
        return self.engine

    def drain(self) -> None:
        """Stop taking requests (503); the running ones go on."""
        self.draining = True
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.close()

    def check_model(self, body: Any) -> None:
        if isinstance(body, dict) and body.get("model") not in (None, self.config.served_model_name):
            raise APIError(
                404,
                f"the model {body['model']!r} does not exist; "
                f"this server serves {self.config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body; 413 past ``limit`` bytes (announced or received), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; at most {limit} are accepted")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class _RequestLog:
    """ASGI middleware: one log line and one metrics count per request, when its last byte is sent."""

    def __init__(self, app: Any, server: Server, endpoints: frozenset[str]) -> None:
        self.app, self.server, self.endpoints = app, server, endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        info: dict[str, Any] = {}
        scope.setdefault("state", {})["log"] = info
        status = [500]

        async def logged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(scope, status[0], start, info)

        await self.app(scope, receive, logged_send)

    def _record(self, scope: dict, status: int, start: float, info: dict) -> None:
        path = scope["path"]
        self.server.metrics.requests.labels(path if path in self.endpoints else "other", str(status)).inc()
        if path in ("/health", "/metrics"):
            return
        collector: Collector | None = info.get("collector")
        extra = ""
        if collector is not None:
            usage = collector.usage()
            ttft = (
                "-"
                if collector.first_token_at is None
                else f"{collector.first_token_at - collector.arrival:.3f}s"
            )
            reasons = (
                "cancelled"
                if collector.cancelled
                else ",".join(sorted({str(c.finish_reason) for c in collector.choices}))
            )
            extra = (
                f" id={collector.id} prompt_tokens={usage['prompt_tokens']} "
                f"completion_tokens={usage['completion_tokens']} ttft={ttft} finish={reasons}"
            )
        logger.info("%s %s %d%s time=%.3fs", scope["method"], path, status, extra, time.monotonic() - start)


def create_app(load: Callable[[], tuple[Any, Any]], config: ServerConfig) -> FastAPI:
    """The ASGI app; ``load()`` returns ``(model, tokenizer)`` and runs in a thread at startup."""
    server = Server(load, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start_loading()
        yield
        server.drain()
        if server.engine is not None:
            await asyncio.to_thread(server.engine.shutdown, 0.0)

    app = FastAPI(title="neoxja", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        body = APIError(500, f"internal error: {type(err).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        key = config.api_key
        if key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
                error = APIError(
                    401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key"
                )
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.failure:
            return JSONResponse({"status": "failed", "error": server.failure}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if server.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = server.ready()
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "neoxja",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        server.ready()
        tokenizer = server.tokenizer
        return {
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": config.chat_template or DEFAULT_CHAT_TEMPLATE,
            "max_model_len": server.limits.max_model_len,
            "model": config.served_model_name,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        server.ready()
        body = await read_json(request, config.max_body_bytes)
        server.check_model(body)
        if isinstance(body, dict) and isinstance(body.get("prompt"), str):
            tokens = server.tokenizer.encode(body["prompt"])
        elif isinstance(body, dict) and isinstance(body.get("messages"), list):
            tokens = _parse_chat(server, {"messages": body["messages"], "max_tokens": 1}, []).prompts[0]
        else:
            raise APIError(400, "prompt: a string is required (or messages, a chat)", param="prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.limits.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        server.ready()
        body = await read_json(request, config.max_body_bytes)
        server.check_model(body)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = server.limits.vocab_size
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise APIError(400, f"tokens: a list of token ids in [0, {vocab}) is required", param="tokens")
        return {"prompt": server.tokenizer.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine = server.ready()
        body = await read_json(request, config.max_body_bytes)
        server.check_model(body)
        parsed = parse_completion(body, server.tokenizer, server.limits)
        return await _generate(server, engine, request, parsed, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine = server.ready()
        body = await read_json(request, config.max_body_bytes)
        server.check_model(body)
        parsed = _parse_chat(server, body, server.chat_stops)
        return await _generate(server, engine, request, parsed, "chat")

    endpoints = frozenset(route.path for route in app.routes)  # metrics label; any other path: "other"
    app.add_middleware(_RequestLog, server=server, endpoints=endpoints)
    return app


def _parse_chat(server: Server, body: Any, stops: list[str]) -> Parsed:
    """A chat body checked and rendered; a template that refuses it (``raise_exception``) or breaks is
    the request's problem (400), not the server's."""
    try:
        return parse_chat(body, server.render, server.tokenizer, server.limits, stops)
    except APIError:
        raise
    except Exception as err:
        raise APIError(400, f"messages: the chat template failed: {err}", param="messages") from None


async def _generate(server: Server, engine: Engine, request: Request, parsed: Parsed, kind: str) -> Response:
    """Submit ``parsed`` to the engine and answer with the whole result or a stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    arrival = time.monotonic()

    def sink(event: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        handle = engine.submit(parsed.prompts, parsed.params, sink, n=parsed.n)
    except QueueFull as err:
        raise APIError(
            429,
            f"the server is busy: {err}; retry later",
            type="rate_limit_error",
            headers={"Retry-After": "1"},
        ) from None
    except EngineClosed as err:
        raise APIError(503, str(err), type="service_unavailable") from None
    except ValueError as err:
        raise APIError(400, str(err)) from None
    server.metrics.prompt_tokens.inc(sum(len(p) for p in parsed.prompts) * parsed.n)
    collector = Collector(
        parsed, server.tokenizer, server.config.served_model_name, kind, server.metrics, arrival
    )
    request.scope["state"]["log"]["collector"] = collector

    if parsed.stream:
        return _EventStream(_stream(events, collector), lambda: _abandon(engine, handle, collector))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while collector.unfinished:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            collector.add(getter.result())
    finally:
        gone.cancel()
        _abandon(engine, handle, collector)
    errors = [c.error for c in collector.choices if c.error]
    if errors:
        raise APIError(500, f"generation failed: {errors[0]}", type="server_error")
    return JSONResponse(collector.completion() if kind == "completion" else collector.chat())


async def _disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (whose body was read) closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _abandon(engine: Engine, handle: Any, collector: Collector) -> None:
    """If the request is not finished, its client is gone: cancel it (freed at the engine's next step)."""
    if collector.unfinished:
        engine.cancel(handle)
        collector.cancel()


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


async def _stream(events: asyncio.Queue, collector: Collector) -> AsyncIterator[bytes]:
    """Server-sent events: chunks as tokens come, the usage chunk if asked for, then ``[DONE]``."""
    if collector.parsed.echo and not collector.parsed.params.prompt_logprobs:
        for index in range(len(collector.choices)):
            yield _sse(collector.completion_piece(index, collector.echo_text(index), None, None))
            collector.started.add(index)
    while collector.unfinished:
        event = await events.get()
        collector.add(event)
        if event.error:
            yield _sse(APIError(500, f"generation failed: {event.error}", type="server_error").body())
            continue
        for chunk in collector.chunks(event):
            yield _sse(chunk)
    if collector.parsed.include_usage:
        yield _sse(collector.usage_chunk())
    yield b"data: [DONE]\n\n"
