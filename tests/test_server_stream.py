"""The server's streaming hot path, in process: a batched step's events reach the event loop in one wake-up
(`Outbox`), a handle returns events already there without waiting and wakes a waiting reader at its deadline, a
stream joins the pieces of a choice that arrived together into one chunk (never across choices, never past a
choice's end), and a piece chunk's JSON from its template is the model's own."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from paradec.decode import Result
from paradec.metrics import GenerationStats
from paradec.server import worker
from paradec.server.formats import PIECE_MARK, ChatFormat, CompletionFormat, EventStream
from paradec.server.worker import ChoiceDone, Done, Failed, Handle, Job, JobTimeout, Outbox, Piece


def _handle(loop: asyncio.AbstractEventLoop, timeout: float = 60.0) -> Handle:
    return Handle(Job(lambda: None, "vanilla", timeout), loop)


def _result(text: str) -> Result:
    return Result(text, [1], "stop", GenerationStats(method="vanilla", prompt_tokens=1))


def test_an_outbox_wakes_each_event_loop_once_and_keeps_each_handles_order():
    async def test():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (calls.append(args), real(*args))[1]
        handles = [_handle(loop) for _ in range(3)]
        out = Outbox()
        for step in range(4):
            for k, handle in enumerate(handles):
                out.add(handle, Piece(f"{k}.{step}"))
        threading.Thread(target=out.flush).start()  # from the engine's thread, as the batch worker does
        for k, handle in enumerate(handles):
            assert [(await handle.next()).text for _ in range(4)] == [f"{k}.{step}" for step in range(4)]
        assert len(calls) == 1  # 12 events, one wake-up
        out.flush()  # nothing left: no call
        assert len(calls) == 1

    asyncio.run(test())


def test_a_handle_returns_what_is_there_and_times_out_a_waiting_reader_at_its_deadline():
    async def test():
        loop = asyncio.get_running_loop()
        handle = _handle(loop, timeout=0.2)
        handle.push(Piece("a"))
        await asyncio.sleep(0)
        assert handle.next_nowait() == Piece("a")
        assert handle.next_nowait() is None  # nothing there: no wait
        started = time.monotonic()
        failed = await handle.next()  # nothing comes: the deadline's timer wakes it
        assert isinstance(failed, Failed) and isinstance(failed.error, JobTimeout)
        assert 0.1 < time.monotonic() - started < 2.0 and handle.cancel_reason == "timeout"

        late = _handle(loop, timeout=0.05)
        late.push(Piece("b"))
        await asyncio.sleep(0.1)  # past the deadline with an event there: the timeout comes first, as it always did
        assert late.next_nowait() is None
        assert isinstance((await late.next()).error, JobTimeout)

    asyncio.run(test())


def test_a_deadline_wake_up_that_comes_early_rearms_and_the_reader_keeps_waiting():
    async def test():
        loop = asyncio.get_running_loop()
        handle = _handle(loop, timeout=30.0)
        handle._events.put_nowait(worker._DEADLINE)  # a timer that fired before the deadline
        loop.call_later(0.05, handle.push, Piece("a"))
        assert await handle.next() == Piece("a")
        loop.call_later(0.05, handle.push, Done(_result("a"), 0.0))
        assert isinstance(await handle.next(), Done)
        assert handle._timer is not None and handle._timer.cancelled()  # its end: the timer is not left behind

    asyncio.run(test())


def _stream(fmt, events: list) -> list[dict]:
    """The data events of a stream whose job pushed `events` before the stream began to read."""

    async def run():
        loop = asyncio.get_running_loop()
        handle = _handle(loop)
        for event in events:
            handle.push(event)
        first = await handle.next()
        stream = EventStream(fmt, first, handle, lambda status: None, "req-1")
        chunks = [chunk async for chunk in stream.body_iterator]
        assert chunks[-1] == "data: [DONE]\n\n"
        return [json.loads(chunk.removeprefix("data: ")) for chunk in chunks[:-1]]

    return asyncio.run(run())


def test_a_stream_joins_the_pieces_that_came_together_within_a_choice():
    fmt = ChatFormat("m", 3, False, n=2)
    events = [Piece("He", 0), Piece("llo", 0), Piece("Bon", 1), Piece("jour", 1), ChoiceDone(1, _result("Bonjour"))]
    events += [Piece(",", 1), Piece(" wo", 0), Piece("rld", 0), Done(_result("Hello world"), 0.0)]
    chunks = _stream(fmt, events)
    opening, body = chunks[:2], chunks[2:]
    assert [c["choices"][0]["delta"] for c in opening] == [{"role": "assistant", "content": ""}] * 2
    pieces = [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content")) for c in body]
    assert pieces[:4] == [(0, "Hello"), (1, "Bonjour"), (1, None), (1, ",")]  # the choice's end keeps its place
    assert body[2]["choices"][0]["finish_reason"] == "stop"
    assert pieces[4] == (0, " world")
    text = {0: "", 1: ""}
    for index, content in pieces:
        text[index] += content or ""
    assert text == {0: "Hello world", 1: "Bonjour,"}  # nothing lost, nothing doubled


def test_a_stream_that_fails_behind_its_pieces_sends_them_then_the_error():
    chunks = _stream(CompletionFormat("m", 3, False), [Piece("a"), Piece("b"), Failed(RuntimeError("boom"))])
    assert chunks[0]["choices"][0]["text"] == "ab"
    assert chunks[-1]["error"]["type"] == "server_error"


@pytest.mark.parametrize("fmt_class", [ChatFormat, CompletionFormat])
def test_a_piece_chunk_from_its_template_is_the_models_json(fmt_class):
    fmt = fmt_class('a "quoted" model', 3, False, n=3)
    for text in ["", " token", 'é"\\\n\t\x00\x1f\x7f', "\U0001f600\u2028\u2029", "</script>", PIECE_MARK[:3]]:
        for index in (0, 2):
            assert fmt.piece_json(text, index) == fmt.piece(text, index).model_dump_json()
    odd = fmt_class(f"model {PIECE_MARK}", 3, False)  # the marker in the name too: the model's JSON still
    assert odd.piece_json("x") == odd.piece("x").model_dump_json()
