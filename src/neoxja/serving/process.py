"""The server process around the app: uvicorn with neoxja's listening sockets, connections and shutdown.

:class:`HTTPServer` is ``uvicorn.Server`` with these changes:

- connections are :mod:`neoxja.serving.connections`' (cap, deadlines, half-closed clients);
- shutdown drains: after SIGTERM/SIGINT the port stays open and new requests get 503 (the app's
  ``draining``), running ones get ``drain_timeout`` seconds, then the rest are cancelled (a stream
  ends with an error event and ``[DONE]``, a whole answer is a 503); only then does the port close;
- it listens on sockets made by :func:`listen` (before the model loads, so that a port in use is a
  one-line error): their ``accept`` fails once, not thousands of times a second, when the process
  is out of file descriptors or memory (EMFILE and friends). asyncio's accept loop retries the
  whole backlog (2048 connections) after such a failure, reporting each attempt and scheduling a
  retry for each; here the first failure ends the round and one retry a second remains. Failures
  are logged as one line per ``log_interval`` with their count, and the open connections are served
  on meanwhile.

:func:`raise_file_limit` lifts the soft limit on open files towards what ``max_connections`` needs.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from typing import Any

import uvicorn

from neoxja.serving.connections import ConnectionLimits, RateLimitedLog, protocol_class

logger = logging.getLogger("neoxja.server")

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_RETRY = 1.0  # asyncio retries a failed accept after this many seconds
ACCEPT_BATCH = 64  # connections accepted per turn of the event loop (asyncio's own: the backlog)
BACKLOG = 2048  # connections the kernel queues before they are accepted (uvicorn's default)
FINISH_GRACE = 5.0  # seconds for cancelled requests to send their endings, and for 503s in flight
SPARE_FILES = 64  # descriptors beside the connections: model files, logs, the event loop's own


class Listener(socket.socket):
    """A listening socket whose ``accept``, once it failed for want of descriptors or memory, says
    "nothing to accept" until asyncio's retry: that ends asyncio's accept round at the first failure.
    ``report`` is told of each failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed_at = -math.inf  # time.monotonic() of the last failure (asyncio's loop clock)
        self.paused = False  # the server is stopping: accept nothing more
        self.accepted = 0  # connections accepted in this turn of the event loop
        self.report: Any = None

    def accept(self) -> tuple[socket.socket, Any]:
        if self.paused or time.monotonic() < self.failed_at + ACCEPT_RETRY / 2:
            raise BlockingIOError(errno.EAGAIN, "not accepting for now")
        if self.accepted == ACCEPT_BATCH:  # the rest at the loop's next turn, after the others' events
            self.accepted = 0
            raise BlockingIOError(errno.EAGAIN, "the rest at the next turn")
        try:
            connection = super().accept()
        except BlockingIOError:
            self.accepted = 0
            raise
        except OSError as err:
            if err.errno in OUT_OF_RESOURCES:
                self.failed_at = time.monotonic()
                if self.report is not None:
                    self.report(err)
            raise
        self.accepted += 1
        return connection


def listen(host: str, port: int) -> list[Listener]:
    """Listening sockets for ``host`` (every address it resolves to) and ``port`` (0: any free one);
    ValueError naming both when that is impossible (a port in use, an unknown host)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: {err.strerror}") from None
    listeners: list[Listener] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = Listener(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            port = port or sock.getsockname()[1]  # "any free port": the same one for every address
    except OSError as err:
        for sock in listeners:
            sock.close()
        if err.errno == errno.EADDRINUSE:  # the common case: a second server on the port
            raise ValueError(
                f"port {port} on {host} is in use (another server?): stop it, or choose another with --port"
            ) from None
        raise ValueError(f"cannot listen on {host} port {port}: {err.strerror}") from None
    return listeners


class HTTPServer(uvicorn.Server):
    """uvicorn's server for the app of :func:`neoxja.serving.app.create_app` on ``listeners``."""

    def __init__(
        self, app: Any, listeners: list[Listener], limits: ConnectionLimits, drain_timeout: float
    ) -> None:
        protocol = protocol_class(limits)
        config = uvicorn.Config(
            app,
            http=protocol,
            lifespan="on",
            log_level="warning",
            backlog=BACKLOG,
            timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]
            timeout_graceful_shutdown=FINISH_GRACE,  # type: ignore[arg-type]
        )
        super().__init__(config)
        self.app_server = app.state.server
        self.listeners = listeners
        self.drain_timeout = drain_timeout
        self.connection_events = protocol.events
        self.accept_errors = RateLimitedLog(logger, limits.log_interval)
        for listener in listeners:
            listener.report = self._accept_failed

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        super().run(sockets or self.listeners)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM/SIGINT: new requests get 503 from now on (the engine closes on the event loop)."""
        self.app_server.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        await super().startup(sockets)
        if self.started:
            for listener in self.listeners:
                host, port = listener.getsockname()[:2]
                logger.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.started:  # the port is still open: newcomers get 503 while the running requests end
            await self.app_server.wind_down(self.drain_timeout, lambda: self.force_exit)
        for listener in self.listeners:  # no more connections; asyncio's pending retry must still
            listener.paused = True  # find its socket open, or it fails with a traceback
        retry = max(listener.failed_at for listener in self.listeners) + ACCEPT_RETRY - time.monotonic()
        if retry > 0:
            await asyncio.sleep(retry + 0.01)
        await super().shutdown(sockets)
        self.connection_events.close()
        self.accept_errors.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's report of a failed accept on a listener is the failure the listener counted."""
        error, sock = context.get("exception"), context.get("socket")
        ours = sock is not None and any(sock.fileno() == listener.fileno() for listener in self.listeners)
        if ours and isinstance(error, OSError) and error.errno in OUT_OF_RESOURCES:
            return
        loop.default_exception_handler(context)

    def _accept_failed(self, err: OSError) -> None:
        self.accept_errors.count(
            f"cannot accept connections: {err.strerror} (errno {err.errno}); "
            "serving the open ones, retrying every second"
        )


def raise_file_limit(max_connections: int) -> tuple[int, int]:
    """Raise the soft limit on open files (within the hard one) to what ``max_connections`` served
    connections, as many being refused, and :data:`SPARE_FILES` need; (needed, the limit now)."""
    import resource

    needed = 2 * max_connections + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return needed, soft
