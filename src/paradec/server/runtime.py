"""The app under uvicorn: connection limits below the app, and a shutdown that drains.

`GuardedH11Protocol` is uvicorn's HTTP/1.1 protocol (h11) with two limits uvicorn lacks:

    header deadline   a connection delivers a request's headers within `header_timeout` seconds of opening (or of
                      the first byte of its next request, once kept alive); otherwise it is closed, with a 408 when
                      part of a request had arrived. Idle kept-alive connections keep uvicorn's own 5 s limit.
    connection cap    beyond `max_connections` open connections, a new one is answered 503 (+ Retry-After) at its
                      first request and closed.

The body deadline lives in the app (`requests.read_json`): only the route knows when it has its whole body. A slow
client costs a connection and a timer, nothing that other clients wait on.

`GracefulServer` is uvicorn's server with paradec's shutdown: the first SIGTERM or SIGINT runs the app's
`drain(hurry)` while the server still answers (new generations get 503), then uvicorn's own shutdown closes the
listening socket and the connections. A second signal hurries the drain (running generations are cut at once), a
third stops waiting for anything. The signal is handled, not re-raised: the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from paradec.server.errors import RETRY_AFTER, APIError

log = logging.getLogger("paradec.server")

UVICORN_GRACE = 5  # seconds uvicorn waits for connections to close after the drain, before it cancels their tasks


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds from a connection's opening (or a kept-alive one's next byte) to its headers
    max_connections: int = 512  # open connections; more are answered 503 and closed


class GuardedH11Protocol(H11Protocol):
    """One connection, under `limits` (see the module docstring); `guarded_protocol` makes the class for a server."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = self._over_capacity  # the request this connection sends gets a 503 instead of the app
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (h11 has moved on to the body)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request arrived: say why the connection ends
            error = APIError(
                408,
                f"the request headers did not arrive within {self.limits.header_timeout:g} s",
                code="request_timeout",
            )
            self.transport.write(_raw_response(error))
        self.transport.close()

    async def _over_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            503,
            f"the server has too many open connections (at most {self.limits.max_connections}); retry later",
            type="server_overloaded",
            code="too_many_connections",
        )
        response = JSONResponse(error.body.model_dump(), 503, headers={**RETRY_AFTER, "Connection": "close"})
        await response(scope, receive, send)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def _raw_response(error: APIError) -> bytes:
    """An error written straight to the socket, for a connection that is closed right after (no h11 state)."""
    body = error.body.model_dump_json().encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining the app before it shuts down (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain
        self.signals = 0
        self._draining: asyncio.Task | None = None
        self._hurry = asyncio.Event()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # a signal handler runs between two bytecodes of the main thread, the event loop's thread: it only counts,
        # and `on_tick` (on the loop, every 0.1 s) acts. Not recording `sig` keeps uvicorn from re-raising it.
        self.signals += 1

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self._draining is None:
            self._draining = asyncio.create_task(self.drain(self._hurry))
        if self.signals >= 2:
            self._hurry.set()
        if self.signals >= 3:
            self.should_exit = self.force_exit = True
        if self._draining is not None and self._draining.done():
            if not self._draining.cancelled() and self._draining.exception() is not None:
                log.error("the drain failed", exc_info=self._draining.exception())
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app: FastAPI, sock: socket.socket, *, limits: ConnectionLimits, log_level: str) -> None:
    """Serve `app` (from `create_app`) on the listening `sock` until a signal has drained it."""
    config = uvicorn.Config(
        app, http=guarded_protocol(limits), log_level=log_level, timeout_graceful_shutdown=UVICORN_GRACE
    )
    GracefulServer(config, app.state.drain).run(sockets=[sock])
