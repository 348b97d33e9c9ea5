"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and where they come from.

`APIError` is every answer that is not a success. `ErrorBoundary` (ASGI middleware around the routes) gives each
request an id, sends it back in `x-request-id`, and turns anything unhandled into a 500 that says only "internal
error" and the id: the exception's details go to the server log under the same id, never to the client.

Messages echo user values through `paradec.errors.shown` (at most 200 characters of a value) and are capped at
`MAX_MESSAGE_CHARS` whoever wrote them, so a body of a megabyte cannot come back in its error.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from paradec.errors import SHOWN_CHARS, ParadecError, shown
from paradec.server.schemas import FIELD_NAMES, ErrorDetail, ErrorResponse
from paradec.server.worker import JobCancelled, JobTimeout

log = logging.getLogger("paradec.server")

MAX_MESSAGE_CHARS = 400  # of a whole message
RETRY_AFTER = {"Retry-After": "1"}  # seconds; on every 503
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer (only ever seen in metrics)


class APIError(Exception):
    """An error answered with OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 15] + "... (truncated)"
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers


def internal_error(request_id: str) -> APIError:
    return APIError(500, f"internal error (request id {request_id})", type="server_error", code="internal_error")


def shutting_down() -> APIError:
    return APIError(
        503,
        "the server is shutting down; retry on another instance or after it restarts",
        type="server_error",
        code="shutting_down",
        headers=RETRY_AFTER,
    )


def job_error(error: Exception, request_id: str) -> APIError:
    """How a job that failed is answered (or, mid-stream, the error event that ends it)."""
    if isinstance(error, ParadecError):  # found by the engine once the job started (on the worker's thread)
        return APIError(400, str(error), param=error.param)
    if isinstance(error, JobTimeout):
        return APIError(504, str(error), type="timeout_error", code="timeout")
    if isinstance(error, JobCancelled):
        if str(error) == "disconnect":
            return APIError(CLIENT_CLOSED, "the client closed the connection", type="client_closed", code="cancelled")
        if str(error) == "shutdown":
            return shutting_down()
        return APIError(503, f"the request was cancelled ({error})", type="server_error", code="cancelled")
    return internal_error(request_id)  # the worker logged the details under this id


def schema_error(exc: ValidationError) -> APIError:
    """A pydantic error as OpenAI's error: 400 for a body that is not JSON, 422 for a body of the wrong shape."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "extra_forbidden":
        path = cut(".".join(map(str, first["loc"])))
        return APIError(422, f"unrecognized request argument supplied: {path}", param=path, code="extra_forbidden")
    path = _field_path(first["loc"])
    if not path:
        return APIError(422, "the request body must be a JSON object", code=first["type"])
    if first["type"] == "missing":
        message = f"missing required field {path!r}"
    else:
        same_place = [e for e in errors if _field_path(e["loc"]) == path]
        detail = first["msg"] if len(same_place) == 1 else "matches none of the accepted types"
        message = f"invalid {path!r}: {detail} (got {shown(first['input'])})"
    return APIError(422, message, param=path, code=first["type"])


def _field_path(loc: tuple) -> str:
    """'messages.0.content' from a pydantic error location, without its union-member tags ("str", "list[int]")."""
    return ".".join(str(part) for part in loc if isinstance(part, int) or part in FIELD_NAMES)


def cut(text: str) -> str:
    """A client's text quoted as is (a field name, a URL path), cut to SHOWN_CHARS characters."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


class ErrorBoundary:
    """ASGI middleware around the routes: a request id per HTTP request (`request.state.request_id`, and the
    `x-request-id` response header), and a JSON 500 for whatever escapes a route before its response started
    (`on_status(scope, 500)` counts it). Nothing escapes it, so Starlette's plain-text 500 is never sent."""

    def __init__(self, app: ASGIApp, on_status: Callable[[Scope, int], None]) -> None:
        self.app = app
        self.on_status = on_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            if started:  # the status line is out: uvicorn closes the connection when the app returns
                return
            self.on_status(scope, 500)
            body = internal_error(request_id).body.model_dump_json().encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
            await send_with_id({"type": "http.response.body", "body": body})
