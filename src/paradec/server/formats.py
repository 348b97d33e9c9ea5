"""OpenAI's response shapes: a finished job as one JSON body, or a running one as Server-Sent Events.

A stream is `data: <chunk>` events in OpenAI's chunk format (chat: a first chunk with the role; then one per text
piece; a closing chunk with `finish_reason` and paradec's stats; with `include_usage`, a usage chunk) and always ends
with `data: [DONE]`. A job that fails after the status line went out cannot change its 200, so its error travels as
one last event, `data: {"error": {...}}`, before the `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from paradec.server.errors import CLIENT_CLOSED, job_error
from paradec.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    ParadecStats,
    Usage,
)
from paradec.server.worker import Done, Event, Handle, Piece


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


class EventStream(StreamingResponse):
    """The SSE response of a job whose first event is `first`. However it ends (finished, failed, or the client
    gone) it cancels the job and calls `on_end(status)`: 200 when it finished, the status of the error it ended
    with when it failed, 499 when the client went away before the `[DONE]`, 500 when it broke."""

    def __init__(
        self, fmt: ResponseFormat, first: Event, handle: Handle, on_end: Callable[[int], None], request_id: str
    ) -> None:
        self.handle = handle
        self.on_end = on_end
        self.outcome = CLIENT_CLOSED  # until the generator below runs to its end
        events = self._events(fmt, first, request_id)
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, fmt: ResponseFormat, event: Event, request_id: str) -> AsyncIterator[str]:
        for chunk in fmt.opening():
            yield _data(chunk.model_dump_json())
        while isinstance(event, Piece):
            yield _data(fmt.piece(event.text).model_dump_json())
            event = await self.handle.next()
        if isinstance(event, Done):
            status = 200
            yield _data(fmt.closing(event).model_dump_json())
            if fmt.include_usage:
                yield _data(fmt.usage_chunk(event).model_dump_json())
        else:
            error = job_error(event.error, request_id)
            status = error.status
            yield _data(error.body.model_dump_json())
        yield _data("[DONE]")
        self.outcome = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            if not isinstance(exc, ClientDisconnect):
                self.outcome = 500  # a bug mid-stream: `ErrorBoundary` logs it
            raise
        finally:
            self.handle.cancel()
            self.on_end(self.outcome)


def _data(payload: str) -> str:
    return f"data: {payload}\n\n"
