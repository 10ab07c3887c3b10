"""``neoxja serve``: the OpenAI-compatible HTTP server (:mod:`neoxja.serving`), on uvicorn.

Needs the ``server`` extra (``pip install "neoxja[server]"``). The port opens at once and the model
loads behind it (``/health`` answers 503 until it is ready). SIGTERM or Ctrl-C stops taking
requests, lets the running ones finish for ``--drain-timeout`` seconds, cancels the rest and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

from neoxja.commands.generate import add_model_arguments, check_directories, load, positive

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
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: --model)"
    )
    parser.add_argument(
        "--max-batch", type=positive(int), default=8, help="KV slots: sequences decoded together (default: 8)"
    )
    parser.add_argument(
        "--max-queue",
        type=positive(int),
        default=256,
        help="sequences that may wait for a slot (default: 256)",
    )
    parser.add_argument(
        "--max-model-len",
        type=positive(int),
        default=None,
        help="positions per slot, prompt + completion (default: the model's context)",
    )
    parser.add_argument(
        "--max-tokens", type=positive(int), default=None, help="cap on a request's max_tokens"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive(int),
        default=512,
        help="prompt tokens prefilled per step, between decoding steps (default: 512)",
    )
    parser.add_argument("--max-n", type=positive(int), default=8, help="cap on a request's n (default: 8)")
    parser.add_argument(
        "--max-body-bytes", type=positive(int), default=1 << 20, help="cap on a request body (default: 1 MiB)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY (default: $NEOXJA_API_KEY, else none)",
    )
    parser.add_argument("--chat-template", type=Path, default=None, help="Jinja chat template file")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM (default: 30)",
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from neoxja.serving.app import ServerConfig, create_app
    except ImportError as err:
        raise ValueError(
            f'neoxja serve needs the server extra: pip install "neoxja[server]" ({err})'
        ) from None
    check_directories(args)
    from neoxja.hub import resolve_file

    if resolve_file(args.model, "config.json") is None:  # fail here, before a port is opened
        raise ValueError(f"--model {args.model}: no config.json there")
    template = None
    if args.chat_template is not None:
        try:
            template = args.chat_template.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"--chat-template {args.chat_template}: {err.strerror}") from None
        from neoxja.serving.chat import compile_chat_template

        try:
            compile_chat_template(template)
        except Exception as err:
            raise ValueError(f"--chat-template {args.chat_template}: {err}") from None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    config = ServerConfig(
        served_model_name=args.served_model_name or str(args.model),
        api_key=args.api_key or os.environ.get("NEOXJA_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        max_tokens=args.max_tokens,
        prefill_chunk=args.prefill_chunk,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        chat_template=template,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(lambda: load(args), config)
    server = _draining_server()(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=args.drain_timeout,
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that ignores it
    # lets the drained process exit with 0 instead of dying by SIGTERM.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    app.state.server.on_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.server.failure is not None:
        raise ValueError(f"could not load the model: {app.state.server.failure}")
    return 0


def _draining_server() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, plus: on SIGTERM/SIGINT the app answers 503 to new requests at once."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            state = getattr(self.config.app, "state", None)
            server = getattr(state, "server", None)
            if server is not None:
                server.drain()
            super().handle_exit(sig, frame)

    return DrainingServer
