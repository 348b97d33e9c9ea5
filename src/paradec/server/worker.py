"""The scheduler seam between HTTP requests and the engine, and its one-at-a-time implementation.

The app turns a request into a `Job` (a validated engine call, not started yet), hands it to a `Scheduler` with
`submit(job) -> Handle`, and reads the job's events from the handle: zero or more `Piece`s (text as tokens are
accepted), then one `Done` (the `Result`) or one `Failed`. A job of n > 1 samples (OpenAI's choices) is one job: its
`Piece`s carry their choice's index, a `ChoiceDone` tells each choice's end but the last one's, and its one `Done`
holds every choice's result; cancellation and the timeout apply to the whole job. The handle is the request's side
of the job: `await handle.next()` for events, `handle.cancel()` when the client goes away. The handle enforces the
request's timeout: when it passes, `next()` returns a `Failed(JobTimeout)` and cancels the job.

`EngineWorker` is the scheduler for an engine that runs one generation at a time: one thread starts and runs the
jobs (a job's n samples one after another, through `job.samples`), taking handles from a bounded FIFO queue
(full -> `QueueFull`). It checks for cancellation after every piece
it pushes, then closes the generation, so a client that disconnects frees the engine within one step. Shutting down
has two halves: `close()` refuses new jobs and fails the waiting ones at once (`JobCancelled("shutdown")`) while the
running one goes on; `stop()` cancels the running one too and ends the thread.

A batched engine replaces the worker by another `Scheduler` that takes several handles off its queue and pushes each
its own events (`paradec.server.batching.BatchWorker`, from the job's `request`); the app does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from paradec.decode import Generation, Result
from paradec.errors import ParadecError
from paradec.metrics import GenerationStats
from paradec.request import Request

log = logging.getLogger("paradec.server")


@dataclass(frozen=True)
class Job:
    """One validated generation request: `start()` (on the worker's thread) builds its engine generation; a batched
    scheduler decodes `request` (the same generation's checked input) in its batch instead, when it has one."""

    start: Callable[[], Generation]
    method: str  # the decoding method, for metrics
    timeout: float  # seconds from submission to the last event, queue wait included
    request_id: str = ""  # the HTTP request's id, in the server log
    submitted: float = field(default_factory=time.monotonic)
    request: Request | None = None  # what `start` runs; None: the job can only run alone, through `start`
    # n > 1 samples: their generations one after another (`Engine.samples`), for a scheduler that runs it alone
    samples: Callable[[], Iterator[Generation]] | None = None

    @property
    def n(self) -> int:
        """The job's samples (choices)."""
        return 1 if self.request is None else self.request.n


# --- events, from the scheduler to the request ----------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    text: str  # newly visible text
    index: int = 0  # of the choice it belongs to


@dataclass(frozen=True)
class ChoiceDone:
    """One choice of a job of n > 1 has ended (the others go on); the last one to end ends with the job's `Done`."""

    index: int
    result: Result


@dataclass(frozen=True)
class Done:
    result: Result  # the first choice's (the only one's, for n == 1)
    queue_seconds: float
    results: tuple[Result, ...] = ()  # n > 1: every choice's, by index
    stats: GenerationStats | None = None  # n > 1: the choices' together (`merge_stats`)

    @property
    def choices(self) -> tuple[Result, ...]:
        return self.results or (self.result,)

    @property
    def job_stats(self) -> GenerationStats:
        return self.stats or self.result.stats


@dataclass(frozen=True)
class Failed:
    error: Exception  # ParadecError (bad input), JobTimeout, JobCancelled, or a bug


Event = Piece | ChoiceDone | Done | Failed


def merge_stats(stats: list[GenerationStats], wall_seconds: float) -> GenerationStats:
    """The stats of a job's choices together: tokens, steps (per sequence: τ is the choices' mean tokens per step)
    and draft counts summed; the prompt once; `wall_seconds` the job's (its samples ran together or in turn)."""
    first = stats[0]
    merged = GenerationStats(method=first.method, prompt_tokens=first.prompt_tokens)
    for one in stats:
        merged.new_tokens += one.new_tokens
        merged.steps += one.steps
        merged.proposed_tokens += one.proposed_tokens
        merged.accepted_tokens += one.accepted_tokens
        for mine, theirs in ((merged.accepted_at, one.accepted_at), (merged.proposed_at, one.proposed_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, count in enumerate(theirs):
                mine[i] += count
    merged.prefill_seconds = max(one.prefill_seconds for one in stats)
    started = [one.first_token_seconds for one in stats if one.first_token_seconds]
    merged.first_token_seconds = min(started, default=0.0)
    merged.wall_seconds = wall_seconds
    reasons = {one.finish_reason for one in stats}
    merged.finish_reason = "length" if "length" in reasons else first.finish_reason
    return merged


class QueueFull(Exception):
    """The scheduler's queue is full (or the scheduler is shutting down): try again later."""


class JobTimeout(Exception):
    """The request's deadline passed before its last event."""


class JobCancelled(Exception):
    """Raised with the reason: disconnect, timeout or shutdown."""


# --- the request's side of a job ----------------------------------------------------------------------------------


class Handle:
    """Events of one job, pushed from the scheduler's thread into the request's event loop; and its cancel switch."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.deadline = job.submitted + job.timeout
        self.cancel_reason = ""  # "" while not cancelled; else why: "disconnect", "timeout", "shutdown"
        self._loop = loop
        self._events: asyncio.Queue[Event | object] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._timer: asyncio.TimerHandle | None = None  # wakes a reader waiting at the deadline (set by `next`)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: str = "disconnect") -> None:
        """Ask the scheduler to stop this job (a no-op once it has finished)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    def fail(self, reason: str) -> None:
        """Cancel the job and end its events now, without waiting for the scheduler to notice (it may be in the
        middle of a step): the reader's next event is `Failed(JobCancelled(reason))`, unless the job's end is
        already on its way. What the scheduler pushes afterwards is never read."""
        self.cancel(reason)
        self.push(Failed(JobCancelled(reason)))

    def push(self, event: Event) -> None:
        """Called by the scheduler, from any thread (many handles' events at once: `Outbox`)."""
        with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop has closed, nobody is listening
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> Event:
        """The next event, or `Failed(JobTimeout)` (and the job cancelled) once the deadline has passed. An event
        already here is returned without waiting; a reader that has to wait is woken at the deadline by one timer
        per handle (a timeout per call cost the server's event loop ~20 µs for every streamed piece)."""
        while True:
            if time.monotonic() >= self.deadline:
                return self._timed_out()
            if (event := self.next_nowait()) is not None:
                return event
            if self._timer is None:
                wake = self.deadline - time.monotonic()
                self._timer = self._loop.call_later(wake, self._events.put_nowait, _DEADLINE)
            if (event := self._accept(await self._events.get())) is not None:
                return event

    def next_nowait(self) -> Event | None:
        """The next event if it is already here and the deadline has not passed, else None: a stream joins the
        pieces that arrived together into one chunk."""
        while not self._events.empty() and time.monotonic() < self.deadline:
            if (event := self._accept(self._events.get_nowait())) is not None:
                return event
        return None

    def _accept(self, event: Event | object) -> Event | None:
        """`event` as read off the queue: None for the timer's wake-up (the deadline check answers it; a timer may
        fire a little early: then it is armed again); the job's end cancels the timer."""
        if event is _DEADLINE:
            self._timer = None
            return None
        if isinstance(event, (Done, Failed)) and self._timer is not None:
            self._timer.cancel()
        return event

    def _timed_out(self) -> Failed:
        self.cancel("timeout")
        if self._timer is not None:
            self._timer.cancel()
        return Failed(JobTimeout(f"the request timed out after {self.job.timeout:g} s"))


_DEADLINE = object()  # what a handle's timer puts in its queue: a reader waiting past the deadline wakes


class Outbox:
    """Events for many handles, delivered together: one wake-up of each handle's event loop for all of them. A
    batched step pushes a piece to every running request, and one `call_soon_threadsafe` per piece cost the server's
    event loop ~12 µs more per piece (measured on the CI machine's CPU), time the engine's thread may wait for the
    GIL. Per handle the order stays the order of `add` (and of any `Handle.push` made after a `flush`)."""

    def __init__(self) -> None:
        self._events: list[tuple[Handle, Event]] = []

    def add(self, handle: Handle, event: Event) -> None:
        self._events.append((handle, event))

    def flush(self) -> None:
        """Deliver what was added, one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for handle, event in self._events:
            by_loop.setdefault(handle._loop, []).append((handle._events, event))
        self._events = []
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the event loop has closed, nobody is listening
                loop.call_soon_threadsafe(_put_all, events)


def _put_all(events: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue_, event in events:
        queue_.put_nowait(event)


# --- schedulers -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobReport:
    """How a job ended, for metrics. `outcome`: stop | length | disconnect | timeout | shutdown | invalid | error."""

    job: Job
    outcome: str
    stats: GenerationStats | None  # None when the generation never started
    new_tokens: int
    queue_seconds: float
    total_seconds: float  # submission to the end


class Scheduler(Protocol):
    """What the app needs from whatever runs the engine."""

    def start(self) -> None: ...

    def close(self) -> int:
        """Refuse new jobs (`QueueFull`) and fail the waiting ones; the running ones go on. Returns how many
        waiting jobs failed."""
        ...

    def stop(self) -> None: ...

    def submit(self, job: Job) -> Handle:
        """Queue `job`; raises QueueFull. Must be called from the event loop that will read the handle."""
        ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def alive(self) -> bool: ...


class EngineWorker:
    """Runs jobs one at a time, in submission order, on one thread: the only one that calls into the engine."""

    def __init__(self, *, max_queue: int, on_report: Callable[[JobReport], None] | None = None) -> None:
        if max_queue < 1:
            raise ParadecError(f"max_queue must be >= 1, got {max_queue!r}")
        self.max_queue = max_queue
        self.on_report = on_report
        self._queue: queue.Queue[Handle | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._serve, name="paradec-engine", daemon=True)
        self._current: Handle | None = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return int(self._current is not None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> int:
        self._stopping = True
        failed = 0
        while True:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                return failed
            if waiting is not None:
                waiting.fail("shutdown")
                failed += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and the waiting jobs, and end the thread."""
        self._stopping = True
        current = self._current
        if current is not None:
            current.cancel("shutdown")
        self.close()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> Handle:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        handle = Handle(job, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        return handle

    def _serve(self) -> None:
        while (handle := self._queue.get()) is not None:
            self._current = handle
            try:
                self._run(handle)
            finally:
                self._current = None

    def _run(self, handle: Handle) -> None:
        report = run_alone(handle, self._stopping)
        emit_report(self.on_report, report)


def run_alone(handle: Handle, stopping: bool = False) -> JobReport:
    """Run `handle`'s job through `job.start()` (n > 1: `job.samples()`, one sample after another), pushing its
    events; checks for cancellation after every piece and closes the generation when cancelled. `stopping`: the
    scheduler is shutting down (the job is cancelled unstarted). Every failure is pushed to the handle, never raised."""
    job = handle.job
    if job.samples is not None and job.n > 1:
        return _run_samples(handle, stopping)
    started = time.monotonic()
    queue_seconds = started - job.submitted
    generation = None
    outcome = "error"
    try:
        if stopping:
            handle.cancel("shutdown")
        if handle.cancelled:
            raise JobCancelled(handle.cancel_reason)
        generation = job.start()
        pieces = iter(generation)
        try:
            for piece in pieces:
                handle.push(Piece(piece))
                if handle.cancelled:
                    raise JobCancelled(handle.cancel_reason)
        finally:
            pieces.close()  # frees the engine when the job is cancelled mid-generation
        handle.push(Done(generation.result, queue_seconds))
        outcome = generation.result.finish_reason
    except Exception as exc:  # pushed to this request; the scheduler keeps serving the others
        outcome = _failed(handle, exc)
    return _report(job, outcome, generation, queue_seconds)


def _failed(handle: Handle, exc: Exception) -> str:
    """Push `exc` as the job's last event; returns the outcome for metrics (a bug or a device failure is logged)."""
    handle.push(Failed(exc))
    if isinstance(exc, JobCancelled):
        return handle.cancel_reason
    if isinstance(exc, ParadecError):
        return "invalid"
    log.error("generation failed (request %s)", handle.job.request_id, exc_info=exc)
    return "error"


def _run_samples(handle: Handle, stopping: bool) -> JobReport:
    """`run_alone` for a job of n > 1 samples: the generations of `job.samples()` one after another, each a choice."""
    job = handle.job
    started = time.monotonic()
    queue_seconds = started - job.submitted
    finished: list[Result] = []
    stats: list[GenerationStats] = []
    outcome = "error"
    generations = None
    try:
        if stopping:
            handle.cancel("shutdown")
        if handle.cancelled:
            raise JobCancelled(handle.cancel_reason)
        generations = job.samples()
        for index, generation in enumerate(generations):
            stats.append(generation.stats)
            pieces = iter(generation)
            try:
                for piece in pieces:
                    handle.push(Piece(piece, index))
                    if handle.cancelled:
                        raise JobCancelled(handle.cancel_reason)
            finally:
                pieces.close()  # frees the engine when the job is cancelled mid-generation
            finished.append(generation.result)
            if index < job.n - 1:
                handle.push(ChoiceDone(index, generation.result))
        merged = merge_stats([r.stats for r in finished], time.monotonic() - started)
        handle.push(Done(finished[0], queue_seconds, tuple(finished), merged))
        outcome = merged.finish_reason
    except Exception as exc:  # pushed to this request; the scheduler keeps serving the others
        outcome = _failed(handle, exc)
    finally:
        if generations is not None and hasattr(generations, "close"):
            generations.close()
    if not stats:
        return job_report(job, outcome, None, None, queue_seconds)
    merged = merge_stats(stats, time.monotonic() - started)
    new_tokens = sum(len(r.token_ids) for r in finished)
    if len(finished) < len(stats):  # the one cut short: every step so far emitted its accepted tokens plus one
        new_tokens += stats[-1].steps + stats[-1].accepted_tokens
    return job_report(job, outcome, merged, None, queue_seconds, new_tokens)


def emit_report(on_report: Callable[[JobReport], None] | None, report: JobReport) -> None:
    if on_report is not None:
        try:
            on_report(report)
        except Exception:  # metrics must never take the worker down
            log.exception("reporting a finished job failed")


def _report(job: Job, outcome: str, generation, queue_seconds: float) -> JobReport:
    if generation is None:
        return job_report(job, outcome, None, None, queue_seconds)
    return job_report(job, outcome, generation.stats, generation.result, queue_seconds)


def job_report(
    job: Job,
    outcome: str,
    stats: GenerationStats | None,
    result: Result | None,
    queue_seconds: float,
    new_tokens: int | None = None,
) -> JobReport:
    """The report of `job`, ended now with `outcome`: `stats` None when it never started, `result` None when it
    stopped early (then `new_tokens`, when known, counts the tokens it had generated)."""
    if result is not None:
        new_tokens = len(result.token_ids)
    elif new_tokens is None:  # stopped early: every step so far emitted its accepted tokens plus one
        new_tokens = 0 if stats is None else stats.steps + stats.accepted_tokens
    return JobReport(
        job=job,
        outcome=outcome,
        stats=stats,
        new_tokens=new_tokens,
        queue_seconds=queue_seconds,
        total_seconds=time.monotonic() - job.submitted,
    )
