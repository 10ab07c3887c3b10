"""``neoxja serve``: the OpenAI-compatible HTTP server (:mod:`neoxja.serving`), on uvicorn.

Needs the ``server`` extra (``pip install "neoxja[server]"``). The port opens at once and the model
loads behind it (``/health`` answers 503 until it is ready). SIGTERM or Ctrl-C, at any moment from
the start of the command, stops it with exit status 0: before the server runs, at once; once it
runs, new requests get 503 while the running ones get ``--drain-timeout`` seconds to finish, then
the rest are cancelled. Connections are capped and timed out (``--max-connections``,
``--timeout-*``; :mod:`neoxja.serving.connections`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
from pathlib import Path
from typing import Any

from neoxja.commands.generate import (
    add_model_arguments,
    check_directories,
    load,
    positive,
    read_chat_template,
)

logger = logging.getLogger("neoxja.server")

EPILOG = """\
examples:
  neoxja serve --model ./gpt-neox-japanese-2.7b
  neoxja serve --model ./my-model --quantize nf4 --max-batch 16 --api-key "$KEY"
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "吾輩は猫である。", "max_tokens": 32, "temperature": 0}'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP with OpenAI's API (continuous batching, streaming, metrics)",
        description="An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics, /tokenize, /detokenize.",
        epilog=EPILOG,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every IPv4 interface)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: --model)"
    )
    parser.add_argument(
        "--max-batch", type=positive(int), default=8, help="KV slots: sequences decoded together"
    )
    parser.add_argument(
        "--max-queue",
        type=positive(int),
        default=256,
        help="sequences that may wait for a slot",
    )
    parser.add_argument(
        "--max-model-len",
        type=positive(int),
        default=None,
        help="positions per slot, prompt + completion (default: the model's context)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive(int),
        default=None,
        help="cap on a request's max_tokens, and what a chat request without one gets at most "
        "(completions: 16, as OpenAI) (default: --max-model-len)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive(int),
        default=512,
        help="prompt tokens prefilled per step, between decoding steps",
    )
    parser.add_argument("--max-n", type=positive(int), default=8, help="cap on a request's n")
    parser.add_argument(
        "--max-work",
        type=positive(int),
        default=None,
        help="cap on one request's tokens scored: prompt and generated positions of all its sequences, "
        "plus the log-probabilities it returns; a 400 past it (default: 524288, 2**19)",
    )
    parser.add_argument(
        "--max-body-bytes", type=positive(int), default=1 << 20, help="cap on a request body (default: 1 MiB)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY (default: $NEOXJA_API_KEY, else none)",
    )
    parser.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        help="Jinja chat template file (default: the tokenizer's own chat_template, else neoxja's "
        "built-in template with its stop strings)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM; new ones get 503 meanwhile",
    )
    limits = parser.add_argument_group("connections")
    limits.add_argument(
        "--max-connections",
        type=positive(int),
        default=1024,
        help="open connections served at once; a connection past them gets 503 for its request",
    )
    limits.add_argument(
        "--timeout-keep-alive",
        type=positive(float),
        default=5.0,
        help="seconds an idle connection is kept between requests",
    )
    limits.add_argument(
        "--timeout-header",
        type=positive(float),
        default=10.0,
        help="seconds a request line and its headers may take to arrive, from the connection's opening "
        "(or a later request's first byte); then the connection is closed",
    )
    limits.add_argument(
        "--timeout-body",
        type=positive(float),
        default=30.0,
        help="seconds a request body may take to arrive after its headers; then 408 and the connection "
        "is closed",
    )
    limits.add_argument(
        "--stall-timeout",
        type=positive(float),
        default=60.0,
        help='/health answers 503 "stalled" when the engine has made no step for this many seconds '
        "while work waits (default: 60; above the longest step: one --prefill-chunk of the model)",
    )
    parser.set_defaults(func=run_serve)


def _freeze_heap() -> None:
    """Once the model is loaded: collect, then leave every object alive now (the model, the tokenizer,
    the modules: some 200,000) out of the garbage collector's later passes. A full pass over them took
    40 ms on an idle machine and several hundred under load, holding every connection meanwhile
    (Python's ``gc.freeze``, as long-running servers do)."""
    gc.collect()
    gc.freeze()


class _Stopped(BaseException):
    """SIGTERM or SIGINT came before the server was made: the command ends with 0."""


class _Signals:
    """The handler of SIGTERM and SIGINT from the command's first line: until the server exists,
    stop starting; from then on, what uvicorn's own handler does (drain and stop)."""

    def __init__(self) -> None:
        self.server: Any = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.server is None:
            raise _Stopped
        self.server.handle_exit(signum, frame)


def api_url(host: str, port: int) -> str:
    """The base URL of the API on ``host``:``port``, as an OpenAI client's ``base_url`` takes it."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def run_serve(args: argparse.Namespace) -> int:
    signals = _Signals()
    previous = {stop: signal.signal(stop, signals) for stop in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve(args, signals)
    except _Stopped:
        return 0
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _serve(args: argparse.Namespace, signals: _Signals) -> int:
    try:
        from neoxja.serving.app import ServerConfig, check_api_key, create_app
        from neoxja.serving.connections import ConnectionLimits
        from neoxja.serving.process import HTTPServer, raise_file_limit
        from neoxja.serving.protocol import DEFAULT_MAX_WORK
    except ImportError as err:
        raise ValueError(
            f'neoxja serve needs the server extra: pip install "neoxja[server]" ({err})'
        ) from None
    check_directories(args)
    from neoxja.hub import resolve_file

    if resolve_file(args.model, "config.json") is None:  # fail here, before a port is opened
        raise ValueError(f"--model {args.model}: no config.json there")
    if args.quantize is not None:
        from neoxja.quantization.loading import check_requested_format

        check_requested_format(args.model, args.quantize, "--quantize")  # a quantized --model's own format
    template = read_chat_template(args)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {args.port}")
    api_key = args.api_key
    if api_key is not None:
        check_api_key(api_key, "--api-key")
    elif "NEOXJA_API_KEY" in os.environ:
        api_key = os.environ["NEOXJA_API_KEY"]
        check_api_key(api_key, "$NEOXJA_API_KEY")
    from neoxja.serving.process import listen

    listeners = listen(args.host, args.port)  # a port in use is an error here, before the model loads
    config = ServerConfig(
        served_model_name=args.served_model_name or str(args.model),
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        max_tokens=args.max_tokens,
        prefill_chunk=args.prefill_chunk,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        chat_template=template,
        max_work=DEFAULT_MAX_WORK if args.max_work is None else args.max_work,
        timeout_body=args.timeout_body,
        stall_timeout=args.stall_timeout,
    )
    limits = ConnectionLimits(
        max_connections=args.max_connections,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_header=args.timeout_header,
        timeout_body=args.timeout_body,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info(
        "serving %s at %s as %r (pid %d); loading the model, /health says when it is ready",
        args.model,
        api_url(args.host, listeners[0].getsockname()[1]),
        config.served_model_name,
        os.getpid(),
    )
    needed, files = raise_file_limit(args.max_connections)
    if files < needed:
        logger.warning(
            "the limit on open files is %d, below the %d that --max-connections %d calls for: past it, "
            "new connections wait unaccepted (raise it with ulimit -n, or lower --max-connections)",
            files,
            needed,
            args.max_connections,
        )
    app = create_app(lambda: load(args), config)
    server = HTTPServer(app, listeners, limits, args.drain_timeout)
    app.state.server.on_failure = lambda: setattr(server, "should_exit", True)
    app.state.server.on_ready = _freeze_heap
    signals.server = server  # uvicorn replaces the handler while it runs, then restores it
    server.run()
    if app.state.server.failure is not None:
        raise ValueError(f"could not load the model: {app.state.server.failure}")
    return 0
