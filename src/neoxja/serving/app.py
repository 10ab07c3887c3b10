"""The HTTP server: OpenAI's API over a :class:`~neoxja.serving.engine.Engine`, on FastAPI.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus), and the tokenizer endpoints
``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's shapes, which lm-eval's
remote tokenizer reads). With an API key set, everything but ``/health`` and ``/metrics`` needs
``Authorization: Bearer KEY`` (compared in constant time).

The model loads in a background thread once the app starts: until then, and from the moment a
shutdown begins, requests get 503 (``/health`` says which; it also reports an engine that makes no
progress while work waits, or whose thread died). Errors use OpenAI's JSON shape: 400 (the field is
named), 401, 404 (unknown model or path), 408 (the body did not come within ``timeout_body``), 413
(body over ``max_body_bytes``), 429 with ``Retry-After`` (queue full), 503. Bodies are parsed, and
prompts tokenized, in worker threads, so the event loop (``/health`` included) is never held by one
request. One log line per request (logger ``neoxja.server``), with what the client sent escaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from neoxja.jsonfile import loads
from neoxja.serving.answers import generate
from neoxja.serving.chat import compile_chat_template
from neoxja.serving.engine import Engine
from neoxja.serving.metrics import Metrics
from neoxja.serving.protocol import DEFAULT_MAX_WORK, APIError, Limits, Parsed, parse_chat, parse_completion
from neoxja.serving.responses import Collector
from neoxja.tokenizer.chat import chat_stops

logger = logging.getLogger("neoxja.server")

OPEN_PATHS = ("/health", "/metrics")


@dataclass
class ServerConfig:
    """What ``neoxja serve`` sets: names, caps, engine sizes, the chat template and the app's timeouts.
    (How long running requests may finish after SIGTERM is the server's: :meth:`Server.wind_down` with
    ``neoxja serve --drain-timeout``; when the app's lifespan ends, what still runs is cancelled.)"""

    served_model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 256
    max_model_len: int | None = None
    max_tokens: int | None = None  # cap on a request's max_tokens (default: max_model_len)
    prefill_chunk: int = 512
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_work: int = DEFAULT_MAX_WORK  # tokens scored per request (protocol.request_work), else 400
    chat_template: str | None = None  # None: the tokenizer's own template, else neoxja's default
    timeout_body: float = 30.0  # seconds from a request's headers to the end of its body (else 408)
    stall_timeout: float = 60.0  # /health says "stalled" after this long without an engine step

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_api_key(self.api_key, "api_key")
        for name in ("timeout_body", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def check_api_key(key: str, name: str) -> None:
    """Refuse a key no client could send: empty (it would turn authentication off unnoticed), or with
    a character outside printable ASCII, a space included (an ``Authorization`` header carries none)."""
    if not key:
        raise ValueError(f"{name} is empty: give a key, or none at all to serve without authentication")
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        what = "a space" if key[bad] == " " else "not printable ASCII"
        raise ValueError(
            f"{name}: character {bad + 1} of the key is {what}; a key must be printable ASCII without "
            "spaces, as an Authorization header carries it"
        )


def printable(text: str, limit: int = 300) -> str:
    """``text`` from a client, safe in a log line: control characters (newlines, terminal escapes),
    backslashes and other unprintable characters escaped, and at most ``limit`` characters."""
    escaped = repr(text)[1:-1] if not text.isprintable() or "\\" in text else text
    return escaped if len(escaped) <= limit else f"{escaped[:limit]}...({len(escaped) - limit} more)"


FINISH_GRACE = 5.0  # seconds for requests cut at the drain timeout to send their endings


class Server:
    """The app's state: the engine once loaded, the tokenizer, the caps and the metrics."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], config: ServerConfig) -> None:
        self.load, self.config = load, config
        self.engine: Engine | None = None
        self.tokenizer: Any = None
        self.limits: Limits | None = None
        self.render: Callable[[list[dict[str, str]]], str] | None = None
        self.chat_template: str | None = None  # what chat prompts are rendered with, once loaded
        self.chat_stops: list[str] = []  # set once the tokenizer (and its own template) is loaded
        self.metrics = Metrics()
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None  # the CLI stops uvicorn: no model, no server
        self.on_ready: Callable[[], None] | None = None  # called (in the loading thread) once it serves
        self.draining = False
        self.active: set[Collector] = set()  # generation requests being answered

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
            # --chat-template, else the tokenizer's own (tokenizer_config.json), else neoxja's default:
            # the template `neoxja chat` and apply_chat_template render with.
            self.chat_template = template = config.chat_template or tokenizer.get_chat_template()
            self.render = compile_chat_template(template, tokenizer.bos_token, tokenizer.eos_token)
            self.chat_stops = chat_stops(template)
            self.limits = Limits(
                max_model_len=engine.max_model_len,
                vocab_size=model.config.vocab_size,
                max_tokens=min(config.max_tokens or engine.max_model_len, engine.max_model_len),
                max_n=config.max_n,
                max_work=config.max_work,
            )
            self.tokenizer = tokenizer
            if self.draining:  # stopped while loading: nothing to serve
                return
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
            if self.on_ready is not None:
                self.on_ready()
        except Exception as err:  # reported by /health and every request
            self.failure = f"{type(err).__name__}: {err}"
            logger.error("could not load the model: %s", self.failure)
            if self.on_failure is not None:
                self.on_failure()

    def ready(self) -> Engine:
        """The engine, or a 503 saying why there is none."""
        if self.draining or (self.engine is not None and self.engine.closed):
            raise APIError(
                503,
                "the server is shutting down",
                type="service_unavailable",
                headers={"Connection": "close"},
            )
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

    async def wind_down(self, timeout: float, abort: Callable[[], bool] = lambda: False) -> None:
        """The shutdown's drain: no new requests (503); the running ones get ``timeout`` seconds to
        finish, then the rest are cancelled and given :data:`FINISH_GRACE` seconds to send their
        endings (a stream's error event and ``[DONE]``, a whole answer's 503). ``abort()`` true
        (a second Ctrl-C) ends the waiting early."""
        self.drain()
        engine = self.engine
        if engine is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def busy() -> bool:
            return bool(self.active or engine.running or engine.queue_depth)

        while busy() and loop.time() < deadline and not abort():
            await asyncio.sleep(0.05)
        if busy():
            logger.warning("drain timeout (%gs): cancelling %d running request(s)", timeout, len(self.active))
        await asyncio.to_thread(engine.shutdown, 0.0)  # what still runs ends as "cancelled"
        deadline = loop.time() + FINISH_GRACE
        while self.active and loop.time() < deadline and not abort():
            await asyncio.sleep(0.02)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``'s status code and body: ok, or why not (loading, failed, draining, an engine
        whose thread died or that made no step for ``stall_timeout`` seconds while work waits)."""
        if self.failure:
            return 503, {"status": "failed", "error": self.failure}
        if self.draining:
            return 503, {"status": "draining"}
        engine = self.engine
        if engine is None:
            return 503, {"status": "loading"}
        stalled = engine.stalled_for()
        if math.isinf(stalled):
            return 503, {"status": "dead", "error": "the engine's thread has stopped"}
        if stalled > self.config.stall_timeout:
            return 503, {"status": "stalled", "stalled_for": round(stalled, 3)}
        return 200, {"status": "ok"}

    def check_model(self, body: Any, param: str | None = "model") -> None:
        """A 404 (OpenAI's ``model_not_found``) when ``body`` names a model other than the served one;
        ``param`` is the error's (None where the name is in the path, as OpenAI's retrieve-model)."""
        if isinstance(body, dict) and body.get("model") not in (None, self.config.served_model_name):
            raise APIError(
                404,
                f"the model {body['model']!r} does not exist; "
                f"this server serves {self.config.served_model_name!r}",
                param=param,
                code="model_not_found",
            )


async def read_json(request: Request, limit: int, timeout: float) -> Any:
    """The request's JSON body: 413 past ``limit`` bytes (announced or received), 408 if it is not
    complete ``timeout`` seconds after the request's headers, 400 if it is not JSON or nests too deep
    (parsed in a worker thread)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; at most {limit} are accepted")
    started = request.scope["state"]["log"]["start"]
    body = bytearray()
    try:
        async with asyncio.timeout(started + timeout - time.monotonic()):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"the request body is over {limit} bytes")
    except TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g} s of the headers",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection before the body was complete") from None
    try:
        return await asyncio.to_thread(loads, bytes(body), "the request body")
    except ValueError as err:
        raise APIError(400, str(err)) from None


class _Authenticate:
    """ASGI middleware: a 401 for a request without ``Authorization: Bearer KEY`` (compared in constant
    time), except on :data:`OPEN_PATHS`. (A plain ASGI layer: Starlette's ``BaseHTTPMiddleware``
    would pass every chunk of every stream through a task and a memory channel.)"""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.key):
                error = APIError(
                    401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key"
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _RequestLog:
    """ASGI middleware: one log line and one metrics count per request, when its last byte is sent."""

    def __init__(self, app: Any, server: Server, endpoints: frozenset[str]) -> None:
        self.app, self.server, self.endpoints = app, server, endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        info: dict[str, Any] = {"start": start}  # the body's deadline runs from here (read_json)
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
        raw = scope.get("raw_path") or path.encode()
        target = printable(raw.decode("ascii", "backslashreplace"))  # as sent, percent-escapes and all
        elapsed = time.monotonic() - start
        logger.info("%s %s %d%s time=%.3fs", printable(scope["method"]), target, status, extra, elapsed)


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
        logger.exception("unhandled error in %s %s", printable(request.method), printable(request.url.path))
        body = APIError(500, f"internal error: {type(err).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {
            "id": config.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "neoxja",
            "max_model_len": server.ready().max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        """OpenAI's retrieve-model: the served model's card, 404 (model_not_found) for any other id."""
        card = model_card()
        server.check_model({"model": model}, param=None)
        return card

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        server.ready()
        tokenizer = server.tokenizer
        return {
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": server.chat_template,
            "max_model_len": server.limits.max_model_len,
            "model": config.served_model_name,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        server.ready()
        body = await read_json(request, config.max_body_bytes, config.timeout_body)
        server.check_model(body)
        tokens = await asyncio.to_thread(_tokenize, server, body)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.limits.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        server.ready()
        body = await read_json(request, config.max_body_bytes, config.timeout_body)
        server.check_model(body)
        return {"prompt": await asyncio.to_thread(_detokenize, server, body)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine = server.ready()
        body = await read_json(request, config.max_body_bytes, config.timeout_body)
        server.check_model(body)
        parsed = await asyncio.to_thread(parse_completion, body, server.tokenizer, server.limits)
        return await generate(server, engine, request, parsed, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine = server.ready()
        body = await read_json(request, config.max_body_bytes, config.timeout_body)
        server.check_model(body)
        parsed = await asyncio.to_thread(_parse_chat, server, body, server.chat_stops)
        return await generate(server, engine, request, parsed, "chat")

    endpoints = frozenset(route.path for route in app.routes)  # metrics label; any other path: "other"
    if config.api_key is not None:
        app.add_middleware(_Authenticate, key=config.api_key)
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


def _tokenize(server: Server, body: Any) -> list[int]:
    """``/tokenize``: the ids of ``prompt``, or of ``messages`` rendered by the chat template."""
    if isinstance(body, dict) and isinstance(body.get("prompt"), str):
        return server.tokenizer.encode(body["prompt"])
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        return _parse_chat(server, {"messages": body["messages"], "max_tokens": 1}, []).prompts[0]
    raise APIError(400, "prompt: a string is required (or messages, a chat)", param="prompt")


def _detokenize(server: Server, body: Any) -> str:
    """``/detokenize``: the text of ``tokens``."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    vocab = server.limits.vocab_size
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
    ):
        raise APIError(400, f"tokens: a list of token ids in [0, {vocab}) is required", param="tokens")
    return server.tokenizer.decode(tokens)
