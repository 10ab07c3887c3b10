"""HTTP connections at the edges of their resources: uvicorn's h11 protocol with the limits it lacks.

uvicorn holds a connection that never sends a byte, or trickles its request head one byte at a time,
forever; it answers a connection cap with a plain-text 503; and it closes a connection whose client
half-closed its socket after sending a request, so that client never gets its answer. The protocol
here (:func:`protocol_class`) adds, per connection:

- a cap: a connection opened while ``max_connections`` others are open gets a 503 in OpenAI's JSON
  shape for its request (with ``Connection: close``), at once, never a wait;
- a deadline for the request head: the request line and headers must be complete within
  ``timeout_header`` seconds of the connection opening (or of the first byte of a later request on a
  kept-alive one), else the connection is closed (with a 408 if part of a head came);
- uvicorn's keep-alive timeout between requests, kept armed whatever comes;
- a deadline for a body the application did not read (it answered first, e.g. a 401 or a 413): the
  rest must come within ``timeout_body`` seconds of the head, else the connection is closed. (A body
  the application reads has the same deadline, enforced where it is read: ``read_json`` answers 408.)
- half-closed clients: an end of input after a complete request no longer closes the connection;
  the answer is sent and then the connection closed. A client that really went away is told from one
  that half-closed by a ``100 Continue`` interim response (which HTTP/1.1 clients skip): a closed
  socket answers it with a reset, which ends the request as a disconnect;
- a lingering close when the client may still be sending (an answer before the end of its head or
  body: a 408, a 413, a 503): our side is shut after the answer, and what still comes is read and
  dropped for up to ``LINGER`` seconds before the close. (Closing a socket with unread input makes the
  kernel reset the connection, and a reset can destroy the answer before the client reads it.)

Closed and refused connections are logged as counts, at most one line per kind per ``log_interval``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from neoxja.serving.protocol import APIError

logger = logging.getLogger("neoxja.server")

RESET_POLL = 0.2  # seconds between checks of a half-closed connection for a reset
LINGER = 2.0  # seconds a closing connection reads and drops what the client still sends


@dataclass(frozen=True)
class ConnectionLimits:
    """What ``neoxja serve`` allows each connection (seconds, connections)."""

    max_connections: int = 1024
    timeout_keep_alive: float = 5.0
    timeout_header: float = 10.0
    timeout_body: float = 30.0
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        for name in ("timeout_keep_alive", "timeout_header", "timeout_body", "log_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class RateLimitedLog:
    """Warnings counted by kind and logged at most once per ``interval`` seconds per kind: the first
    occurrence at once, later ones as one line with their count. Call from the event loop only."""

    def __init__(self, log: logging.Logger, interval: float) -> None:
        self.log, self.interval = log, interval
        self.counts: Counter[str] = Counter()
        self.last: dict[str, float] = {}
        self.flush_at: dict[str, asyncio.TimerHandle] = {}

    def count(self, what: str) -> None:
        """One more ``what`` (a message without variable parts)."""
        self.counts[what] += 1
        if what in self.flush_at:
            return
        wait = self.last.get(what, -self.interval) + self.interval - time.monotonic()
        if wait <= 0:
            self._flush(what)
        else:
            self.flush_at[what] = asyncio.get_running_loop().call_later(wait, self._flush, what)

    def _flush(self, what: str) -> None:
        self.flush_at.pop(what, None)
        count = self.counts.pop(what, 0)
        if count:
            now = time.monotonic()
            since = f"in the last {now - self.last[what]:.0f} s" if what in self.last else "so far"
            self.log.warning("%s (%d %s)", what, count, since)
            self.last[what] = now

    def close(self) -> None:
        """Log what is still counted (at shutdown)."""
        for what in list(self.counts):
            handle = self.flush_at.pop(what, None)
            if handle is not None:
                handle.cancel()
            self._flush(what)


def _json(status: int, message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps(APIError(status, message, type=type, code=code).body()).encode()


def over_capacity_app(max_connections: int, events: RateLimitedLog) -> Any:
    """The ASGI app of a connection opened past the cap: a 503 for its request, then the close."""
    body = _json(
        503,
        f"the server holds its maximum of {max_connections} connections; retry later",
        "too_many_connections",
        type="service_unavailable",
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        events.count(f"requests on connections past --max-connections {max_connections}: 503")
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, head and unread-body deadlines and half-closed
    clients answered (see the module's docstring). Made per server by :func:`protocol_class`."""

    limits: ConnectionLimits
    events: RateLimitedLog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind: str | None = None
        self._request_at = 0.0  # when the current request's head was complete
        self._peer_eof = False
        self._reset_watch: asyncio.TimerHandle | None = None
        self._socket: asyncio.Transport | None = None  # the real transport; uvicorn's closes _close
        self._lingering = False

    # ------------------------------------------------------------------ asyncio's callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        super().connection_made(_Transport(transport, self._close))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self.app = over_capacity_app(self.limits.max_connections, self.events)
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._reset_watch is not None:
            self._reset_watch.cancel()
            self._reset_watch = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # closing: dropped
            return
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._request_at = self.loop.time()
        self._schedule()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is not cycle:  # a pipelined request was waiting
            self._request_at = self.loop.time()
        self._schedule()

    def eof_received(self) -> bool | None:
        """The client shut its sending side. After a complete request whose answer is pending, keep
        the connection to send that answer (then close); otherwise close, as uvicorn does."""
        cycle = self.cycle
        if self._lingering or cycle is None or cycle.response_complete or cycle.more_body:
            return super().eof_received()
        if not self._peer_eof:
            self._peer_eof = True
            cycle.keep_alive = False
            if not cycle.response_started and self.scope["http_version"] == "1.1":
                probe = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                self.transport.write(self.conn.send(probe))
            self._watch_for_reset()
        return True

    def _close(self) -> None:
        """Every close of the connection (uvicorn's too): at once, unless the client may still be
        sending its head or body; then the answer is followed by our end of the connection, and the
        rest of its input is dropped for up to :data:`LINGER` seconds before the close."""
        real = self._socket
        if real is None or real.is_closing() or self._lingering:
            return
        their = self.conn.their_state
        if not (
            their is h11.SEND_BODY or their is h11.ERROR or (their is h11.IDLE and self.conn.trailing_data[0])
        ):
            real.close()
            return
        self._lingering = True
        self._disarm()
        if real.can_write_eof():
            real.write_eof()
        real.resume_reading()
        self.loop.call_later(LINGER, real.close)

    # ------------------------------------------------------------------ deadlines

    def _schedule(self) -> None:
        """Arm the deadline that the connection's state calls for (or none)."""
        if self.transport.is_closing():
            self._disarm()
            return
        answered = self.cycle is None or self.cycle.response_complete
        their = self.conn.their_state
        if answered and their is h11.IDLE:
            if self.cycle is None or self.conn.trailing_data[0]:  # a head is (or should be) coming
                self._arm("head", self.loop.time() + self.limits.timeout_header, self._head_late)
            else:  # between requests: uvicorn's keep-alive timeout (data it received disarmed it)
                self._disarm()
                if self.timeout_keep_alive_task is None:
                    self.timeout_keep_alive_task = self.loop.call_later(
                        self.timeout_keep_alive, self.timeout_keep_alive_handler
                    )
        elif answered and their is h11.SEND_BODY:
            self._arm("body", self._request_at + self.limits.timeout_body, self._body_late)
        else:
            self._disarm()

    def _arm(self, kind: str, when: float, callback: Any) -> None:
        if self._deadline_kind == kind:
            return  # a deadline runs from its start, whatever arrives meanwhile
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_at(when, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._deadline_kind = None

    def _head_late(self) -> None:
        self._deadline = self._deadline_kind = None
        if self.transport.is_closing():
            return
        timeout = self.limits.timeout_header
        if self.conn.trailing_data[0]:
            message = f"the request line and headers did not arrive within {timeout:g} s"
            body = _json(408, message, "request_timeout")
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.events.count(f"request heads not complete within --timeout-header {timeout:g} s: 408")
        else:
            self.events.count(f"connections silent for --timeout-header {timeout:g} s: closed")
        self.transport.close()

    def _body_late(self) -> None:
        self._deadline = self._deadline_kind = None
        if not self.transport.is_closing():
            self.events.count(
                f"unread request bodies not complete within --timeout-body {self.limits.timeout_body:g} s: "
                "closed"
            )
            self.transport.close()

    # ------------------------------------------------------------------ half-closed clients

    def _watch_for_reset(self) -> None:
        """Until the answer is sent, poll the socket for a reset: the peer had closed, not half-closed
        (its kernel resets the connection when the ``100 Continue`` or the stream's next bytes come)."""
        sock = self.transport.get_extra_info("socket")
        self._reset_watch = None
        if sock is None or self.transport.is_closing() or self.cycle is None or self.cycle.response_complete:
            return
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.transport.abort()  # uvicorn then tells the application that the client disconnected
            return
        self._reset_watch = self.loop.call_later(RESET_POLL, self._watch_for_reset)


class _Transport:
    """The transport as uvicorn's protocol sees it: the real one, with ``close`` the protocol's own."""

    def __init__(self, transport: asyncio.Transport, close: Any) -> None:
        self._transport, self.close = transport, close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's ``http`` setting: :class:`GuardedH11Protocol` with ``limits``
    and one rate-limited log shared by the server's connections."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"limits": limits, "events": RateLimitedLog(logger, limits.log_interval)},
    )
