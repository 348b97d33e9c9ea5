"""The FastAPI app: OpenAI-compatible endpoints in front of one scheduler (`worker.py`) that owns the engine.

A generation request goes through, in order: API key (401) -> body: content type (415), size (413), JSON (400),
schema (422) -> values: model name (404), unsupported features, ranges, method and its options, context length
(400) -> `scheduler.submit` (queue full: 503 with Retry-After) -> the job's events -> one JSON body, or a stream of
Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`. A client that disconnects cancels its job;
a job that outlives the request timeout is cancelled and answered with 504 (or an error event mid-stream).

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, FastAPI's own 404 and
405 included. /health and /metrics need no API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

import paradec
from paradec.config import SamplingParams
from paradec.drafters import get_drafter, parse_options
from paradec.errors import ParadecError
from paradec.server.metrics import CONTENT_TYPE, ServerMetrics
from paradec.server.schemas import (
    FIELD_NAMES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    ParadecStats,
    Usage,
)
from paradec.server.worker import (
    Done,
    EngineWorker,
    Event,
    Failed,
    Handle,
    Job,
    JobCancelled,
    JobTimeout,
    Piece,
    QueueFull,
    Scheduler,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)

RequestT = TypeVar("RequestT", bound=BaseModel)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the name clients pass as `model` and /v1/models lists
    method: str = "vanilla"  # decoding method of requests that name none
    options: dict[str, Any] = field(default_factory=dict)  # options of `method` for those requests
    api_key: str | None = None  # None = no authentication
    max_queue: int = 64  # requests waiting for the engine; more -> 503
    timeout: float = 600.0  # seconds per request, queue wait included
    max_body_bytes: int = 1 << 20


class Decoding(NamedTuple):
    method: str
    options: Any  # an instance of the method's options class
    sampling: SamplingParams
    stop: list[str]


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
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
        self.headers = headers


def create_app(engine: paradec.Engine, config: ServerConfig) -> FastAPI:
    """The app serving `engine`; its engine worker starts and stops with the app (ASGI lifespan)."""
    worker = EngineWorker(engine, max_queue=config.max_queue)
    metrics = ServerMetrics(lambda: worker.queue_depth, lambda: worker.running)
    worker.on_report = metrics.observe
    api = OpenAIServer(engine, config, worker, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="paradec", version=paradec.__version__, lifespan=lifespan)
    app.add_exception_handler(APIError, api.on_api_error)
    app.add_exception_handler(StarletteHTTPException, api.on_http_error)
    app.add_exception_handler(Exception, api.on_bug)
    app.post("/v1/completions", response_model=CompletionResponse)(api.completions)
    app.post("/v1/chat/completions", response_model=ChatCompletionResponse)(api.chat_completions)
    app.get("/v1/models", response_model=ModelList)(api.list_models)
    app.get("/v1/models/{model_id:path}", response_model=ModelCard)(api.get_model)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_text)
    return app


class OpenAIServer:
    """Turns OpenAI requests into scheduler jobs, and job events into OpenAI responses."""

    def __init__(self, engine: paradec.Engine, config: ServerConfig, scheduler: Scheduler, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.created = int(time.time())

    # --- endpoints --------------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._read(request, CompletionRequest)
        decoding = self._decoding(body)
        for name, unsupported in (
            ("echo", body.echo),
            ("logprobs", body.logprobs is not None),
            ("suffix", bool(body.suffix)),
            ("best_of", body.best_of not in (None, 1)),
        ):
            if unsupported:
                raise APIError(400, f"{name} is not supported by paradec", param=name, code="unsupported_parameter")
        prompt_ids = await asyncio.to_thread(self._completion_prompt, body.prompt)
        max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        job = self._job(decoding, prompt_ids, max_tokens, "prompt")
        fmt = CompletionFormat(self.config.model_name, len(prompt_ids), _include_usage(body))
        return await self._serve(request, job, body.stream, fmt)

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._read(request, ChatCompletionRequest)
        decoding = self._decoding(body)
        if body.logprobs or body.top_logprobs is not None:
            raise APIError(400, "logprobs is not supported by paradec", param="logprobs", code="unsupported_parameter")
        prompt_ids = await asyncio.to_thread(self._chat_prompt, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(self.engine.target.max_length - len(prompt_ids), 1)
        job = self._job(decoding, prompt_ids, max_tokens, "messages")
        fmt = ChatFormat(self.config.model_name, len(prompt_ids), _include_usage(body))
        return await self._serve(request, job, body.stream, fmt)

    async def list_models(self, request: Request) -> ModelList:
        self._authorize(request)
        self.metrics.count_request(_endpoint(request), 200)
        return ModelList(data=[self._model_card()])

    async def get_model(self, model_id: str, request: Request) -> ModelCard:
        self._authorize(request)
        self._check_model(model_id)
        self.metrics.count_request(_endpoint(request), 200)
        return self._model_card()

    async def health(self) -> JSONResponse:
        alive = self.scheduler.alive
        status = {
            "status": "ok" if alive else "engine worker stopped",
            "model": self.config.model_name,
            "queue_depth": self.scheduler.queue_depth,
            "running": self.scheduler.running,
        }
        return JSONResponse(status, status_code=200 if alive else 503)

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # --- error handlers ---------------------------------------------------------------------------------------------
    async def on_api_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        self.metrics.count_request(_endpoint(request), exc.status)
        return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)

    async def on_http_error(self, request: Request, exc: Exception) -> JSONResponse:
        """FastAPI's own errors (no such route, wrong HTTP method) in OpenAI's shape."""
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        error = APIError(exc.status_code, message, code=code, headers=exc.headers)
        return await self.on_api_error(request, error)

    async def on_bug(self, request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"
        return await self.on_api_error(request, APIError(500, message, type="server_error", code="internal_error"))

    # --- request checks ---------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.config.api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def _read(self, request: Request, schema: type[RequestT]) -> RequestT:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(
                415,
                f"the request body must be JSON with 'Content-Type: application/json', got {media_type or 'none'!r}",
                code="unsupported_media_type",
            )
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:
            raise APIError(400, "the client disconnected before sending the whole body") from None
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise _schema_error(exc) from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist: this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _decoding(self, body: GenerationRequest) -> Decoding:
        """How a request wants to be decoded (its model name checked too)."""
        self._check_model(body.model)
        for name, value, neutral in (
            ("n", body.n, 1),
            ("presence_penalty", body.presence_penalty, 0.0),
            ("frequency_penalty", body.frequency_penalty, 0.0),
        ):
            if value != neutral:
                raise APIError(
                    400, f"{name}={value!r} is not supported (only {neutral})", param=name, code="unsupported_parameter"
                )
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        method = self.config.method if body.method is None else body.method
        options = body.method_options
        if options is None and method == self.config.method:
            options = self.config.options
        try:
            drafter = get_drafter(method)
        except ParadecError as exc:
            raise APIError(400, str(exc), param="method", code="unknown_method") from None
        try:
            parsed = parse_options(drafter, options)
        except ParadecError as exc:
            raise APIError(400, str(exc), param="method_options") from None
        values = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p)
        try:
            sampling = SamplingParams(**values, seed=body.seed)
        except ParadecError as exc:  # its message starts with the name of the bad field
            param = next((name for name in values if str(exc).startswith(name)), None)
            raise APIError(400, str(exc), param=param) from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if "" in stop:
            raise APIError(400, "stop strings must not be empty", param="stop")
        return Decoding(method, parsed, sampling, stop)

    def _completion_prompt(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        try:
            return self.engine.encode(prompt)
        except ParadecError as exc:
            raise APIError(400, str(exc), param="prompt") from None

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not self.engine.has_chat_template():
            raise APIError(
                400,
                f"model {self.config.model_name!r} has no chat template: use /v1/completions with a plain prompt",
                param="messages",
                code="no_chat_template",
            )
        conversation = []
        for message in body.messages:
            turn = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            if message.name is not None:
                turn["name"] = message.name
            conversation.append(turn)
        try:
            return self.engine.encode_chat(conversation)
        except ParadecError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def _job(self, decoding: Decoding, prompt_ids: list[int], max_tokens: int, prompt_param: str) -> Job:
        context = self.engine.target.max_length
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if len(prompt_ids) >= context:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens, the model's context is {context} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if len(prompt_ids) + max_tokens > context:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {len(prompt_ids) + max_tokens} "
                f"exceeds the model's context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        method, options, sampling, stop = decoding
        return Job(prompt_ids, method, options, sampling, max_tokens, stop, self.config.timeout)

    # --- running a job ----------------------------------------------------------------------------------------------
    async def _serve(self, request: Request, job: Job, stream: bool, fmt: ResponseFormat) -> Response:
        try:
            handle = self.scheduler.submit(job)
        except QueueFull as exc:
            raise APIError(
                503,
                f"the server is busy ({exc}); retry later",
                type="server_overloaded",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        async with _cancel_on_disconnect(request, handle):
            event = await handle.next()
            while not stream and isinstance(event, Piece):
                event = await handle.next()
        if isinstance(event, Failed):
            raise _job_error(event.error)
        self.metrics.count_request(_endpoint(request), 200)
        if not stream:
            assert isinstance(event, Done)
            return JSONResponse(fmt.response(event).model_dump())
        return _EventStream(_sse(fmt, event, handle), handle)

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.config.model_name, created=self.created)


# --- response formats -----------------------------------------------------------------------------------------------


class ResponseFormat(ABC):
    """How an endpoint shapes a finished job, and the chunks of a streamed one."""

    prefix = ""

    def __init__(self, model_name: str, prompt_tokens: int, include_usage: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage

    def usage(self, done: Done) -> Usage:
        completion = len(done.result.token_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion
        )

    def stats(self, done: Done) -> ParadecStats:
        return ParadecStats.of(done.result.stats, done.queue_seconds)

    @abstractmethod
    def response(self, done: Done) -> BaseModel: ...

    def opening(self) -> list[BaseModel]:
        return []

    @abstractmethod
    def piece(self, text: str) -> BaseModel: ...

    @abstractmethod
    def closing(self, done: Done) -> BaseModel: ...

    @abstractmethod
    def usage_chunk(self, done: Done) -> BaseModel: ...


class CompletionFormat(ResponseFormat):
    prefix = "cmpl"

    def _chunk(self, choices: list[CompletionChoice], **extra: Any) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def response(self, done: Done) -> CompletionResponse:
        choice = CompletionChoice(text=done.result.text, finish_reason=done.result.finish_reason)
        return self._chunk([choice], usage=self.usage(done), paradec=self.stats(done))

    def piece(self, text: str) -> CompletionResponse:
        return self._chunk([CompletionChoice(text=text)])

    def closing(self, done: Done) -> CompletionResponse:
        choice = CompletionChoice(text="", finish_reason=done.result.finish_reason)
        return self._chunk([choice], paradec=self.stats(done))

    def usage_chunk(self, done: Done) -> CompletionResponse:
        return self._chunk([], usage=self.usage(done))


class ChatFormat(ResponseFormat):
    prefix = "chatcmpl"

    def _chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def response(self, done: Done) -> ChatCompletionResponse:
        message = AssistantMessage(content=done.result.text)
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChoice(message=message, finish_reason=done.result.finish_reason)],
            usage=self.usage(done),
            paradec=self.stats(done),
        )

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def piece(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def closing(self, done: Done) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=ChatDelta(), finish_reason=done.result.finish_reason)
        return self._chunk([choice], paradec=self.stats(done))

    def usage_chunk(self, done: Done) -> ChatCompletionChunk:
        return self._chunk([], usage=self.usage(done))


async def _sse(fmt: ResponseFormat, event: Event, handle: Handle) -> AsyncIterator[str]:
    """The SSE body of a stream whose first event is `event`."""
    for chunk in fmt.opening():
        yield _data(chunk.model_dump_json())
    while isinstance(event, Piece):
        yield _data(fmt.piece(event.text).model_dump_json())
        event = await handle.next()
    if isinstance(event, Done):
        yield _data(fmt.closing(event).model_dump_json())
        if fmt.include_usage:
            yield _data(fmt.usage_chunk(event).model_dump_json())
    else:  # failed mid-stream: the status line is sent, so the error travels as an event
        yield _data(_job_error(event.error).body.model_dump_json())
    yield _data("[DONE]")


def _data(payload: str) -> str:
    return f"data: {payload}\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that cancels its job when it ends, however it ends: finished, failed, or client gone."""

    def __init__(self, events: AsyncIterator[str], handle: Handle) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, handle: Handle) -> AsyncIterator[None]:
    """Cancel the job if the client disconnects while the body runs (the request body has been read already)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


# --- helpers --------------------------------------------------------------------------------------------------------


def _include_usage(body: GenerationRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _endpoint(request: Request) -> str:
    """The route's path template (bounded label values for metrics)."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _job_error(error: Exception) -> APIError:
    if isinstance(error, ParadecError):
        return APIError(400, str(error))
    if isinstance(error, JobTimeout):
        return APIError(504, str(error), type="timeout_error", code="timeout")
    if isinstance(error, JobCancelled):
        return APIError(503, f"the request was cancelled ({error})", type="server_error", code="cancelled")
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error", code="internal_error")


def _schema_error(exc: ValidationError) -> APIError:
    """A pydantic error as OpenAI's error: 400 for a body that is not JSON, 422 for a body of the wrong shape."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "extra_forbidden":
        path = ".".join(map(str, first["loc"]))
        return APIError(422, f"unrecognized request argument supplied: {path}", param=path, code="extra_forbidden")
    path = _field_path(first["loc"])
    if not path:
        return APIError(422, "the request body must be a JSON object", code=first["type"])
    if first["type"] == "missing":
        message = f"missing required field {path!r}"
    else:
        same_place = [e for e in errors if _field_path(e["loc"]) == path]
        shown = repr(first["input"])
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        detail = first["msg"] if len(same_place) == 1 else "matches none of the accepted types"
        message = f"invalid {path!r}: {detail} (got {shown})"
    return APIError(422, message, param=path, code=first["type"])


def _field_path(loc: tuple) -> str:
    """'messages.0.content' from a pydantic error location, without its union-member tags ("str", "list[int]")."""
    return ".".join(str(part) for part in loc if isinstance(part, int) or part in FIELD_NAMES)
