"""The FastAPI app: OpenAI-compatible routes in front of one scheduler that runs the engine: `batching.BatchWorker`
(continuous batching, up to `ServerConfig.max_batch` sequences per step) when the engine can batch (the native
runner), else `worker.EngineWorker` (one generation at a time); `make_scheduler` picks, and logs which.

A generation request goes through, in order, cheap checks first:

    API key (401) -> shutting down (503) -> queue full (503 + Retry-After, the body not even read)
    -> the body (`requests.read_json`: 415, 413, 408, 400, 422) -> its values (`requests.*_ask`: 404, 400)
    -> a queue slot reserved (503) -> the prompt's size (`requests.PromptBound`: 400, before any tokenization)
    -> `requests.prepare` on a thread: the engine's checks and the tokenization (400 naming the parameter)
    -> `scheduler.submit` -> the job's events -> one JSON body, or a stream of Server-Sent Events (`formats.py`).

A request for `n` > 1 choices is one job of n samples (`worker.py`): its answer holds n choices, each with its index
and finish reason, and usage sums them; its stream interleaves their chunks (`formats.py`). A client that
disconnects cancels its job; a job that outlives the request timeout is cancelled and answered with
504 (or an error event mid-stream). Every error leaves in OpenAI's shape (`errors.py`), FastAPI's own 404 and 405
included; an unexpected one is a 500 that names only the request id.

Shutdown (`drain`, which `runtime.GracefulServer` runs on SIGTERM/SIGINT): new requests get 503 + Retry-After, the
waiting ones get 503 at once, the running ones may finish within `shutdown_timeout` seconds; then the rest are cut
(a stream ends with an error event and `[DONE]`, a plain request gets 503). The waiting requests are not run: on a
one-at-a-time engine they would rarely start before the deadline, and answered now their clients can retry
elsewhere at once.

/health and /metrics need no API key; /health says only whether the server serves, and the served model's name.
/docs, /redoc and /openapi.json exist only with `ServerConfig.docs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

import paradec
from paradec.errors import ParadecError
from paradec.server.errors import RETRY_AFTER, APIError, ErrorBoundary, cut, job_error, shutting_down
from paradec.server.formats import ChatFormat, CompletionFormat, EventStream, ResponseFormat
from paradec.server.metrics import CONTENT_TYPE, ServerMetrics
from paradec.server.requests import (
    Ask,
    PromptBound,
    authorize,
    chat_ask,
    check_model,
    completion_ask,
    engine_error,
    prepare,
    read_json,
)
from paradec.server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from paradec.server.worker import (
    ChoiceDone,
    EngineWorker,
    Failed,
    Handle,
    Job,
    JobReport,
    Piece,
    QueueFull,
    Scheduler,
)

log = logging.getLogger("paradec.server")

BodyT = TypeVar("BodyT", bound=GenerationRequest)

CUT_GRACE = 5.0  # seconds the cut requests get to send their last event, once the shutdown deadline has passed


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the name clients pass as `model` and /v1/models lists
    method: str = "vanilla"  # decoding method of requests that name none (its --opt are the engine's defaults)
    api_key: str | None = None  # None = no authentication
    max_queue: int = 64  # requests waiting for the engine; more -> 503
    timeout: float = 600.0  # seconds per request, queue wait included
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds to receive a request's body, from its headers on
    shutdown_timeout: float = 30.0  # seconds running generations may take to finish once a shutdown began
    docs: bool = False  # serve /docs, /redoc and /openapi.json
    max_batch: int = 16  # sequences decoded together (continuous batching); 1 = one request at a time
    speculate: str = "auto"  # the batch's speculation policy (`paradec.batch.SpeculationPolicy`): auto, always, never
    # decode synthetic batches of every batch bucket before serving (`BatchDecoder.warm_up`: compilation and the
    # first graphs happen before the first request); None: when the target runs on CUDA
    warmup: bool | None = None


def make_scheduler(
    engine: paradec.Engine, config: ServerConfig, on_report: Callable[[JobReport], None] | None = None
) -> Scheduler:
    """The batched scheduler when `config.max_batch` > 1 and the engine can batch, else the one-at-a-time worker;
    logs which (once: the app makes one)."""
    if isinstance(config.max_batch, bool) or not isinstance(config.max_batch, int) or config.max_batch < 1:
        raise ParadecError(f"max_batch must be an integer >= 1, got {config.max_batch!r}", param="max_batch")
    if config.max_batch > 1:
        from paradec.server.batching import BatchWorker

        try:
            decoder = engine.batch_decoder(config.max_batch, speculate=config.speculate)
        except ParadecError as exc:
            if exc.param == "speculate":
                raise
            log.info("serving one request at a time (max_batch %d, but %s)", config.max_batch, exc)
        else:
            cache = decoder.runner.cache_bytes / 2**30
            log.info(
                "continuous batching: up to %d sequences per decode step (KV cache %.2f GiB), speculation %s",
                config.max_batch,
                cache,
                config.speculate,
            )
            warm = decoder.runner.device.type == "cuda" if config.warmup is None else config.warmup
            if warm:
                started = time.perf_counter()
                steps, methods = decoder.warm_up(dict.fromkeys(("vanilla", config.method)))
                log.info(
                    "warm-up: %s at batch sizes up to %d, %d decode steps in %.1f s",
                    " and ".join(methods),
                    config.max_batch,
                    steps,
                    time.perf_counter() - started,
                )
            return BatchWorker(decoder, max_queue=config.max_queue, on_report=on_report)
    else:
        log.info("serving one request at a time (max_batch 1)")
    return EngineWorker(max_queue=config.max_queue, on_report=on_report)


def create_app(engine: paradec.Engine, config: ServerConfig, scheduler: Scheduler | None = None) -> FastAPI:
    """The app serving `engine`; its scheduler (`make_scheduler`'s, or `scheduler`) starts and stops with the app
    (ASGI lifespan). `app.state.drain(hurry)` is its graceful shutdown (see the module docstring)."""
    worker = make_scheduler(engine, config) if scheduler is None else scheduler
    metrics = ServerMetrics(lambda: worker.queue_depth, lambda: worker.running)
    worker.on_report = metrics.observe
    if hasattr(worker, "on_step"):
        worker.on_step = metrics.observe_step
    if getattr(worker, "decoder", None) is not None:  # a batching scheduler: its decoder's steps and graphs
        metrics.watch_decoder(worker.decoder)
    api = OpenAIServer(engine, config, worker, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="paradec", version=paradec.__version__, lifespan=lifespan, **docs)
    app.add_middleware(ErrorBoundary, on_status=lambda scope, status: metrics.count_request(endpoint(scope), status))
    app.add_exception_handler(APIError, api.on_api_error)
    app.add_exception_handler(StarletteHTTPException, api.on_http_error)
    app.post("/v1/completions", response_model=CompletionResponse)(api.completions)
    app.post("/v1/chat/completions", response_model=ChatCompletionResponse)(api.chat_completions)
    app.get("/v1/models", response_model=ModelList)(api.list_models)
    app.get("/v1/models/{model_id:path}", response_model=ModelCard)(api.get_model)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_text)
    app.state.drain = api.drain
    app.state.scheduler = worker
    return app


class OpenAIServer:
    """Turns OpenAI requests into scheduler jobs, and job events into OpenAI responses."""

    def __init__(self, engine: paradec.Engine, config: ServerConfig, scheduler: Scheduler, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.bound = PromptBound(engine.target.max_length, engine.tokenizer)
        self.created = int(time.time())
        self.draining = False
        self._reserved = 0  # requests past their body, not yet submitted: they count against the queue
        self._live: set[Handle] = set()  # submitted jobs whose responses have not ended
        self._idle = asyncio.Event()  # set while `_live` is empty
        self._idle.set()

    # --- endpoints --------------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body = await self._admit(request, CompletionRequest)
        ask = completion_ask(body, self.config.model_name, self.config.method)
        usage = _include_usage(body)
        return await self._generate(
            request, ask, body.stream, lambda tokens, n: CompletionFormat(self.config.model_name, tokens, usage, n)
        )

    async def chat_completions(self, request: Request) -> Response:
        body = await self._admit(request, ChatCompletionRequest)
        if not self.engine.has_chat_template():
            raise APIError(
                400,
                f"model {self.config.model_name!r} has no chat template: use /v1/completions with a plain prompt",
                param="messages",
                code="no_chat_template",
            )
        ask = chat_ask(body, self.config.model_name, self.config.method)
        usage = _include_usage(body)
        return await self._generate(
            request, ask, body.stream, lambda tokens, n: ChatFormat(self.config.model_name, tokens, usage, n)
        )

    async def list_models(self, request: Request) -> ModelList:
        authorize(request, self.config.api_key)
        self.metrics.count_request(endpoint(request.scope), 200)
        return ModelList(data=[self._model_card()])

    async def get_model(self, model_id: str, request: Request) -> ModelCard:
        authorize(request, self.config.api_key)
        check_model(model_id, self.config.model_name)
        self.metrics.count_request(endpoint(request.scope), 200)
        return self._model_card()

    async def health(self) -> JSONResponse:
        if self.draining:
            status = "shutting down"
        elif not self.scheduler.alive:
            status = "engine worker stopped"
        else:
            status = "ok"
        body = {"status": status, "model": self.config.model_name}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # --- error handlers ---------------------------------------------------------------------------------------------
    async def on_api_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        self.metrics.count_request(endpoint(request.scope), exc.status)
        return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)

    async def on_http_error(self, request: Request, exc: Exception) -> JSONResponse:
        """FastAPI's own errors (no such route, wrong HTTP method) in OpenAI's shape."""
        assert isinstance(exc, StarletteHTTPException)
        path = cut(request.url.path)
        if exc.status_code == 404:
            message, code = f"no such endpoint: {request.method} {path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        error = APIError(exc.status_code, message, code=code, headers=exc.headers)
        return await self.on_api_error(request, error)

    # --- admission --------------------------------------------------------------------------------------------------
    async def _admit(self, request: Request, schema: type[BodyT]) -> BodyT:
        """The checks that cost nothing, then the body."""
        authorize(request, self.config.api_key)
        if self.draining:
            raise shutting_down()
        if self.scheduler.queue_depth >= self.config.max_queue:
            raise self._busy(f"{self.config.max_queue} requests are already waiting")
        return await read_json(request, schema, max_bytes=self.config.max_body_bytes, timeout=self.config.body_timeout)

    @contextlib.contextmanager
    def _reservation(self) -> Iterator[None]:
        """A queue slot held while the prompt is tokenized, so that no tokenization is spent on a request that the
        queue would refuse."""
        if self.scheduler.queue_depth + self._reserved >= self.config.max_queue:
            raise self._busy(f"{self.config.max_queue} requests are already waiting or being prepared")
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def _busy(self, why: str) -> APIError:
        return APIError(
            503,
            f"the server is busy ({why}); retry later",
            type="server_overloaded",
            code="queue_full",
            headers=RETRY_AFTER,
        )

    async def _generate(
        self, request: Request, ask: Ask, stream: bool, make_format: Callable[[int, int], ResponseFormat]
    ) -> Response:
        """Prepare, submit and serve `ask`; `make_format(prompt_tokens, n)` shapes its answer."""
        request_id = request.state.request_id
        with self._reservation():
            self.bound.check(ask)
            try:
                prepared = await asyncio.to_thread(prepare, self.engine, ask)
            except ParadecError as exc:
                raise engine_error(exc, ask) from None
            try:
                job = Job(
                    prepared.start,
                    ask.method,
                    self.config.timeout,
                    request_id,
                    request=prepared.request,
                    samples=prepared.samples,
                )
                handle = self.scheduler.submit(job)
            except QueueFull as exc:
                raise (shutting_down() if self.draining else self._busy(str(exc))) from None
        return await self._serve(request, handle, stream, make_format(prepared.prompt_tokens, prepared.n))

    # --- running a job ----------------------------------------------------------------------------------------------
    async def _serve(self, request: Request, handle: Handle, stream: bool, fmt: ResponseFormat) -> Response:
        self._live.add(handle)
        self._idle.clear()
        streaming = False
        try:
            async with _cancel_on_disconnect(request, handle):
                event = await handle.next()
                while not stream and isinstance(event, (Piece, ChoiceDone)):
                    event = await handle.next()
            if isinstance(event, Failed):
                raise job_error(event.error, handle.job.request_id)
            if not stream:
                self.metrics.count_request(endpoint(request.scope), 200)
                return JSONResponse(fmt.response(event).model_dump())
            streaming = True
            route = endpoint(request.scope)

            def ended(status: int) -> None:
                self.metrics.count_request(route, status)
                self._release(handle)

            return EventStream(fmt, event, handle, ended, handle.job.request_id)
        finally:
            if not streaming:
                self._release(handle)

    def _release(self, handle: Handle) -> None:
        self._live.discard(handle)
        if not self._live:
            self._idle.set()

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.config.model_name, created=self.created)

    # --- shutdown ---------------------------------------------------------------------------------------------------
    async def drain(self, hurry: asyncio.Event) -> None:
        """Stop admitting, answer the waiting requests, give the running ones `shutdown_timeout` seconds (less if
        `hurry` is set: a second signal), then cut the rest. Logs how long it took."""
        started = time.monotonic()
        self.draining = True
        waiting = self.scheduler.close()
        running = len(self._live) - waiting
        log.info(
            "shutting down: %d waiting requests answered 503, up to %g s for %d running",
            waiting,
            self.config.shutdown_timeout,
            running,
        )
        cut_short = 0
        if not await self._until_idle(self.config.shutdown_timeout, hurry):
            cut_short = len(self._live)
            for handle in list(self._live):
                handle.fail("shutdown")
            await self._until_idle(CUT_GRACE, None)
        log.info(
            "drained in %.2f s: %d requests finished, %d cut short, %d waiting answered 503",
            time.monotonic() - started,
            max(running - cut_short, 0),
            cut_short,
            waiting,
        )

    async def _until_idle(self, timeout: float, hurry: asyncio.Event | None) -> bool:
        """Wait until no response is live (True), for at most `timeout` seconds or until `hurry` is set."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        return self._idle.is_set()


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


def _include_usage(body: GenerationRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def endpoint(scope: Scope) -> str:
    """The route's path template (bounded label values for metrics)."""
    return getattr(scope.get("route"), "path", "unmatched")
