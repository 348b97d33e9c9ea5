"""OpenAI's response shapes: a finished job as one JSON body, or a running one as Server-Sent Events.

A stream is `data: <chunk>` events in OpenAI's chunk format (chat: a first chunk with the role; then one per text
piece; a closing chunk with `finish_reason` and paradec's stats; with `include_usage`, a usage chunk) and always ends
with `data: [DONE]`. With n > 1 choices every chunk carries its choice's `index`: chat opens each choice with its
role chunk, the choices' pieces interleave as they are decoded, each choice closes with its own `finish_reason` when
it ends, and the last closing chunk carries paradec's stats (of the choices together); usage sums the choices' tokens
(the prompt counted once, as OpenAI counts it). A job that fails after the status line went out cannot change its
200, so its error travels as one last event, `data: {"error": {...}}`, before the `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from pydantic_core import to_json
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from paradec.decode import Result
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
from paradec.server.worker import ChoiceDone, Done, Event, Handle, Piece

PIECE_MARK = "\u2063paradec:piece\u2063"  # stands for a piece's text in the chunk `piece_json` fills in
_MARK_JSON = to_json(PIECE_MARK).decode()


class ResponseFormat(ABC):
    """How an endpoint shapes a finished job, and the chunks of a streamed one (`n` choices)."""

    prefix = ""

    def __init__(self, model_name: str, prompt_tokens: int, include_usage: bool, n: int = 1) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.n = n
        self.closed: set[int] = set()  # choices whose closing chunk went out
        self._pieces: dict[int, list[str]] = {}  # per choice, a piece chunk's JSON around its text (`piece_json`)

    def usage(self, done: Done) -> Usage:
        completion = sum(len(result.token_ids) for result in done.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion
        )

    def stats(self, done: Done) -> ParadecStats:
        return ParadecStats.of(done.job_stats, done.queue_seconds)

    @abstractmethod
    def response(self, done: Done) -> BaseModel: ...

    def opening(self) -> list[BaseModel]:
        return []

    @abstractmethod
    def piece(self, text: str, index: int = 0) -> BaseModel: ...

    def piece_json(self, text: str, index: int = 0) -> str:
        """`piece(text, index)`'s JSON, from that chunk made once per choice with a marker in place of the text: the
        stream's hot path (the model and its serializer cost the event loop ~15 µs a piece, this ~1)."""
        parts = self._pieces.get(index)
        if parts is None:
            parts = self._pieces[index] = self.piece(PIECE_MARK, index).model_dump_json().split(_MARK_JSON)
        if len(parts) != 2:  # the marker elsewhere too (a model named so): the model itself
            return self.piece(text, index).model_dump_json()
        return parts[0] + to_json(text).decode() + parts[1]

    @abstractmethod
    def close(self, index: int, result: Result, stats: ParadecStats | None = None) -> BaseModel:
        """The closing chunk of choice `index` (its `finish_reason`), with `stats` when it is the job's last."""

    def choice_done(self, event: ChoiceDone) -> BaseModel:
        self.closed.add(event.index)
        return self.close(event.index, event.result)

    def closing(self, done: Done) -> list[BaseModel]:
        """The closing chunks of the choices not closed yet; the last one carries paradec's stats."""
        left = [i for i in range(len(done.choices)) if i not in self.closed]
        chunks = [self.close(i, done.choices[i]) for i in left[:-1]]
        if left:
            chunks.append(self.close(left[-1], done.choices[left[-1]], self.stats(done)))
        self.closed.update(left)
        return chunks

    @abstractmethod
    def usage_chunk(self, done: Done) -> BaseModel: ...


class CompletionFormat(ResponseFormat):
    prefix = "cmpl"

    def _chunk(self, choices: list[CompletionChoice], **extra: Any) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def response(self, done: Done) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=result.text, finish_reason=result.finish_reason)
            for i, result in enumerate(done.choices)
        ]
        return self._chunk(choices, usage=self.usage(done), paradec=self.stats(done))

    def piece(self, text: str, index: int = 0) -> CompletionResponse:
        return self._chunk([CompletionChoice(index=index, text=text)])

    def close(self, index: int, result: Result, stats: ParadecStats | None = None) -> CompletionResponse:
        choice = CompletionChoice(index=index, text="", finish_reason=result.finish_reason)
        return self._chunk([choice], paradec=stats)

    def usage_chunk(self, done: Done) -> CompletionResponse:
        return self._chunk([], usage=self.usage(done))


class ChatFormat(ResponseFormat):
    prefix = "chatcmpl"

    def _chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def response(self, done: Done) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
                for i, result in enumerate(done.choices)
            ],
            usage=self.usage(done),
            paradec=self.stats(done),
        )

    def opening(self) -> list[BaseModel]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(self.n)
        ]

    def piece(self, text: str, index: int = 0) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text))])

    def close(self, index: int, result: Result, stats: ParadecStats | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=result.finish_reason)
        return self._chunk([choice], paradec=stats)

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
        while isinstance(event, (Piece, ChoiceDone)):
            if isinstance(event, Piece):  # with the pieces of its choice already behind it: one chunk
                index, texts = event.index, [event.text]
                while isinstance(event := self.handle.next_nowait(), Piece) and event.index == index:
                    texts.append(event.text)
                yield _data(fmt.piece_json("".join(texts), index))
            else:
                yield _data(fmt.choice_done(event).model_dump_json())
                event = None
            if event is None:
                event = await self.handle.next()
        if isinstance(event, Done):
            status = 200
            for chunk in fmt.closing(event):
                yield _data(chunk.model_dump_json())
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
