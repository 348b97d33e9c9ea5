"""The batched scheduler: the server's requests decoded together, with continuous batching (`paradec.batch`).

`BatchWorker` is the `Scheduler` (worker.py) for an engine that can batch (the native runner). One thread, the only
one that calls into the engine, loops:

    take      handles off the bounded FIFO queue into one `BatchDecoder`, while it holds fewer than `max_batch`
              sequences (a sequence joins at a step boundary; its prompt prefills one chunk per step)
    cancel    each handle cancelled since the last step (disconnect, timeout, shutdown) is cancelled in the decoder:
              it leaves at this step's boundary and frees its slot; the others go on
    step      `decoder.step()`: one decode step (one target forward) for every running sequence
    push      each handle its own new text (`Piece`s), then `Done` or `Failed`, all of a step's through one `Outbox`
              (one wake-up of the event loop); a `JobReport` per ended job, as `EngineWorker` reports, and a
              `StepReport` per decode step (sequences, inputs, tokens) to `on_step`

so a client that disconnects frees its slot within one step. A job of n > 1 samples (OpenAI's choices) is n sequences
of the decoder (`BatchDecoder.submit_samples`: one `SampleGroup`, whose drafters may read each other's tokens); it
joins when the batch has room for all n (or is empty: then its samples join as slots free), its pieces carry their
choice's index, a choice that ends before the others sends a `ChoiceDone`, and the job ends with one `Done` once all
have ended. Cancelling the job (disconnect, timeout, shutdown) cancels its n sequences; one that fails fails the job
(the others are cancelled). Each request keeps its own method, options, sampling,
stops and stats; a greedy request's text is what it decodes alone (the decoder's contract), and a request that
fails fails alone. A sampled request is sampled exactly, with its own generator, but a seeded one may draw other
tokens than alone: the decoder's speculation policy may skip a step's proposals (a large batch), which spends the
generator differently.

A job whose method does not batch (its `Drafter.batchable` is False: layerskip, whose drafter keeps engine-wide
state for one sequence; a job without a `request`; or one the decoder refused to admit with a `ParadecError`, such
as a draft model the batch cannot run) runs alone, through `job.start()` (n > 1: `job.samples()`) as on
`EngineWorker`, once the batch has drained: while it waits at the head of the queue no new job joins the batch (so
it is not starved and the order stays FIFO), the running sequences finish, then it runs with the batch empty, and
the jobs behind it wait until it has finished. A server that mixes such
methods with batchable ones therefore alternates between a batch and one solo generation.

`queue_depth` counts the jobs not yet in the decoder; `running` the jobs in it (plus a solo job). Shutting
down as `EngineWorker`: `close()` refuses new jobs and fails the waiting ones at once, the running ones go on;
`stop()` cancels the running ones too and ends the thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from paradec.batch import BatchDecoder, BatchItem
from paradec.errors import ParadecError
from paradec.server.worker import (
    ChoiceDone,
    Done,
    Failed,
    Handle,
    Job,
    JobCancelled,
    JobReport,
    Outbox,
    Piece,
    QueueFull,
    emit_report,
    job_report,
    merge_stats,
    run_alone,
)

log = logging.getLogger("paradec.server")
# a batch step (prefill and decode of every running request) slower than this many seconds is logged with what it
# met: on the H200 a 3-4 ms step that compiles a new kind of forward stalls every request for 6-19 s
SLOW_STEP = 1.0


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (Dynamo's count; 0 where it never ran)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return 0 if dynamo is None else int(dynamo.counters["stats"]["unique_graphs"])


@dataclass(frozen=True)
class StepReport:
    """One decode step of the batch, for metrics."""

    sequences: int  # sequences the step decoded (the batch size)
    inputs: int  # target inputs of its forward: each sequence's pending token and draft tokens
    tokens: int  # tokens the step emitted, all sequences together


@dataclass
class _Seq:
    """A job in the decoder: its n sequences (one per sample), by choice index."""

    handle: Handle
    items: list[BatchItem]
    queue_seconds: float  # submission to joining the decoder
    joined: float = 0.0  # when it joined (time.monotonic)
    closed: set[int] = field(default_factory=set)  # choices whose end was pushed (`ChoiceDone`)
    stopping: bool = False  # one sequence failed or was refused: the others were cancelled

    @property
    def item(self) -> BatchItem:
        return self.items[0]

    @property
    def done(self) -> bool:
        return all(item.done for item in self.items)


def batchable(job: Job) -> bool:
    """Whether `job` can run in a batch (else it runs alone, through `job.start()`)."""
    return job.request is not None and bool(getattr(job.request.drafter, "batchable", False))


def _refused(item: BatchItem) -> bool:
    """Whether the decoder refused `item` when it joined (its drafter could not open in a batch)."""
    return item.decoding is None and not item.cancelled and isinstance(item.error, ParadecError)


class BatchWorker:
    """Runs jobs together through one `BatchDecoder`, on one thread (see the module docstring)."""

    def __init__(
        self,
        decoder: BatchDecoder,
        *,
        max_queue: int,
        on_report: Callable[[JobReport], None] | None = None,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ParadecError(f"max_queue must be >= 1, got {max_queue!r}")
        self.decoder = decoder
        self.max_batch = decoder.max_running
        self.max_queue = max_queue
        self.on_report = on_report
        self.on_step = on_step
        self.steps = 0  # decode steps so far
        self.largest_batch = 0  # the most sequences a decode step has held
        self._lock = threading.Condition()
        self._waiting: deque[Handle] = deque()  # submitted, not yet in the decoder
        self._batch: dict[Handle, _Seq] = {}  # in the decoder (changed on the worker's thread, under the lock)
        self._solo: Handle | None = None  # the job running alone
        self._alone: set[Handle] = set()  # jobs the decoder refused: they run alone
        self._closed = False  # close(): no new jobs
        self._exiting = False  # stop(): cancel the running jobs and end the thread
        self._thread = threading.Thread(target=self._serve, name="paradec-engine", daemon=True)

    # --- the Scheduler protocol -------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch) + int(self._solo is not None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> int:
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._alone.clear()
            self._lock.notify_all()
        for handle in waiting:
            handle.fail("shutdown")
        return len(waiting)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and the waiting jobs, and end the thread."""
        self.close()
        with self._lock:
            self._exiting = True
            running = [*self._batch, *([self._solo] if self._solo is not None else [])]
            self._lock.notify_all()
        for handle in running:
            handle.cancel("shutdown")
        self._thread.join(timeout)

    def submit(self, job: Job) -> Handle:
        handle = Handle(job, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    # --- the worker's thread ----------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            solo = self._take()
            if solo is not None:
                try:
                    report = self._run_solo(solo)
                finally:
                    with self._lock:
                        self._solo = None
                emit_report(self.on_report, report)
                continue
            if self._batch:
                self._step()
                continue
            with self._lock:
                if not self._waiting and not self._exiting:
                    self._idle()
                if self._exiting and not self._waiting and not self._batch:
                    return

    def _run_solo(self, handle: Handle) -> JobReport:
        """A job that does not batch, run with the batch drained."""
        return run_alone(handle, self._exiting)

    def _idle(self) -> None:
        """Nothing to do (called under the lock): wait for a job or for the end."""
        while not self._waiting and not self._exiting:
            self._lock.wait()

    def _take(self) -> Handle | None:
        """Move waiting jobs into the decoder while it has room, dropping those cancelled while they waited; the
        job to run alone, when one is at the head of the queue and the batch has drained."""
        dropped = []
        with self._lock:
            if any(handle.cancelled for handle in self._waiting):
                dropped = [handle for handle in self._waiting if handle.cancelled]
                self._waiting = deque(handle for handle in self._waiting if not handle.cancelled)
                self._alone.difference_update(dropped)
            solo = None
            while self._waiting:
                head = self._waiting[0]
                if head in self._alone or not batchable(head.job):
                    if not self._batch:  # drained: it runs now; until then nothing joins the batch
                        solo = self._solo = self._waiting.popleft()
                        self._alone.discard(solo)
                    break
                held = self._sequences()
                if held >= self.max_batch or (held and held + head.job.n > self.max_batch):
                    break  # (a job of more samples than max_batch joins an empty batch: they join as slots free)
                try:
                    items = self.decoder.submit_samples(head.job.request)
                except ParadecError:  # the decoder does not batch its method: it runs alone
                    self._alone.add(head)
                    continue
                self._waiting.popleft()
                now = time.monotonic()
                self._batch[head] = _Seq(head, items, now - head.job.submitted, now)
        for handle in dropped:  # cancelled (disconnect, timeout) before they started
            handle.push(Failed(JobCancelled(handle.cancel_reason)))
            wait = time.monotonic() - handle.job.submitted
            emit_report(self.on_report, job_report(handle.job, handle.cancel_reason, None, None, wait))
        return solo

    def _sequences(self) -> int:
        """The sequences of the jobs in the decoder."""
        return sum(len(seq.items) for seq in self._batch.values())

    def _step(self) -> None:
        seqs = list(self._batch.values())
        for seq in seqs:
            if self._exiting:
                seq.handle.cancel("shutdown")
            if seq.handle.cancelled:
                for item in seq.items:
                    if not item.cancelled:
                        self.decoder.cancel(item, seq.handle.cancel_reason)
        started, joining = time.perf_counter(), sum(not item.prefilled for seq in seqs for item in seq.items)
        misses, compiled = getattr(self.decoder.runner, "graph_misses", 0), compiled_graphs()
        try:
            self.decoder.step()
        except Exception as exc:  # a bug outside any one sequence: fail the batch, keep serving
            self._fail_batch(seqs, exc)
            return
        seconds = time.perf_counter() - started
        if seconds > SLOW_STEP:  # every running request waited: say what the step met
            log.warning(
                "a batch step took %.2f s: %d sequences, %d of them joining; %d CUDA graph misses; %d graphs compiled",
                seconds,
                sum(len(seq.items) for seq in seqs),
                joining,
                getattr(self.decoder.runner, "graph_misses", 0) - misses,
                compiled_graphs() - compiled,
            )
        self._observe_steps()
        out = Outbox()  # the step's events: one wake-up of the event loop for all of them
        for seq in seqs:
            handle = seq.handle
            for item in seq.items:
                if not item.cancelled:
                    while item.pieces:
                        out.add(handle, Piece(item.pieces.popleft(), item.sample))
            if not seq.stopping and any(item.error is not None and not item.cancelled for item in seq.items):
                seq.stopping = True  # one failed (or was refused): the job ends, its other sequences stop
                for item in seq.items:
                    self.decoder.cancel(item, "a sibling sample failed")
            if seq.done:
                out.flush()  # (its pieces before its end)
                self._finish(seq)
            elif not seq.stopping and not handle.cancelled:
                for item in seq.items:
                    if item.result is not None and item.sample not in seq.closed:
                        seq.closed.add(item.sample)
                        out.add(handle, ChoiceDone(item.sample, item.result))
        out.flush()

    def _observe_steps(self) -> None:
        """Report (and clear, so they stay small) the decoder's records of the steps that landed in this call: none
        when it only prefilled, two when it landed an overlapped step and then ran one with proposals."""
        decoder = self.decoder
        records = list(zip(decoder.batch_sizes, decoder.step_inputs, decoder.step_tokens, strict=True))
        decoder.batch_sizes.clear()
        decoder.step_inputs.clear()
        decoder.step_tokens.clear()
        for sequences, inputs, tokens in records:
            report = StepReport(sequences=sequences, inputs=inputs, tokens=tokens)
            self.steps += 1
            self.largest_batch = max(self.largest_batch, sequences)
            if self.on_step is not None:
                try:
                    self.on_step(report)
                except Exception:  # metrics must never take the worker down
                    log.exception("reporting a batch step failed")

    def _finish(self, seq: _Seq) -> None:
        handle, job, items = seq.handle, seq.handle.job, seq.items
        with self._lock:  # no longer running once its last event is out
            self._batch.pop(handle, None)
            retry = any(_refused(item) for item in items) and not self._closed and not handle.cancelled
            if retry:  # it runs alone, first in line
                self._alone.add(handle)
                self._waiting.appendleft(handle)
        if retry:
            error = next(item.error for item in items if _refused(item))
            log.info("request %s runs alone: %s", job.request_id, error)
            return
        failed = next((item for item in items if item.error is not None and not item.cancelled), None)
        if all(item.result is not None for item in items):
            results = tuple(item.result for item in items)
            if len(items) == 1:
                handle.push(Done(results[0], seq.queue_seconds))
            else:
                merged = merge_stats([r.stats for r in results], time.monotonic() - seq.joined)
                handle.push(Done(results[0], seq.queue_seconds, results, merged))
            outcome = "length" if any(r.finish_reason == "length" for r in results) else results[0].finish_reason
        elif handle.cancelled or failed is None or _refused(failed):
            # cancelled (or refused while shutting down: it would have waited)
            reason = handle.cancel_reason or next((i.cancelled for i in items if i.cancelled), "") or "shutdown"
            handle.push(Failed(JobCancelled(reason)))
            outcome = reason
        elif isinstance(failed.error, ParadecError):
            handle.push(Failed(failed.error))
            outcome = "invalid"
        else:  # a bug or a device failure in this job's sequences: the others go on
            error = failed.error if isinstance(failed.error, Exception) else RuntimeError(str(failed.error))
            log.error("generation failed (request %s)", job.request_id, exc_info=error)
            handle.push(Failed(error))
            outcome = "error"
        emit_report(self.on_report, self._report(seq, outcome))

    def _report(self, seq: _Seq, outcome: str) -> JobReport:
        items = seq.items
        if len(items) == 1:
            item = items[0]
            stats = None if item.decoding is None else item.decoding.stats
            return job_report(seq.handle.job, outcome, stats, item.result, seq.queue_seconds, _emitted(seq))
        started = [item.decoding.stats for item in items if item.decoding is not None]
        stats = merge_stats(started, time.monotonic() - seq.joined) if started else None
        return job_report(seq.handle.job, outcome, stats, None, seq.queue_seconds, _emitted(seq))

    def _fail_batch(self, seqs: list[_Seq], exc: Exception) -> None:
        log.error(
            "a batch step failed: generation failed (requests %s)",
            ", ".join(seq.handle.job.request_id for seq in seqs),
            exc_info=exc,
        )
        for seq in seqs:
            for item in seq.items:
                self.decoder.cancel(item, "error")
        try:
            self.decoder.step()  # drops the cancelled sequences, freeing their slots
        except Exception:
            log.exception("clearing the failed batch failed")
        for seq in seqs:
            with self._lock:
                self._batch.pop(seq.handle, None)
            seq.handle.push(Failed(exc))
            emit_report(self.on_report, self._report(seq, "error"))


def _emitted(seq: _Seq) -> int:
    """Tokens the job's sequences have generated."""
    return sum(0 if item.decoding is None else len(item.decoding.new_ids) for item in seq.items)
