"""Serving a tensor-parallel engine (`paradec serve --tensor-parallel N`): rank 0 serves HTTP, the other ranks follow.

Every rank loads its shard of the target (`paradec.runners.native.tp`). Rank 0 runs the HTTP server with a
one-at-a-time worker (`TensorParallelWorker`): before it decodes a job it broadcasts the job's checked `Request` to
the other ranks, and each of them (`follow`) runs the same generation (`decode`: `Engine.stream` for one sample,
`Engine.samples` for n, as the server's worker runs them). So every rank runs the same steps and reaches the same
collectives in the same order, which is the SPMD contract the sharded runner rests on. What follows from it:

- A request is decoded to its end on every rank, also when its client disconnects or its deadline passes: the client
  is told at once (its handle is cancelled and nothing more is sent to it), but rank 0 keeps stepping, because the
  other ranks could only stop with it through one more collective per step. A cancellation costs at most the
  request's remaining tokens of compute; it never desynchronises the ranks.
- Idle, rank 0 broadcasts a heartbeat every `HEARTBEAT_S` seconds, well inside the group's collective timeout, so
  the waiting ranks never time out; a rank 0 that dies leaves the others failing their collective within that
  timeout, and exiting, rather than waiting forever.
- Shutdown: when rank 0's worker stops (the server drained), it broadcasts STOP and every follower returns.

With `--max-batch N` > 1 rank 0 runs the batched scheduler instead (`TensorParallelBatchWorker`, the server's
`BatchWorker` over a `MirroredDecoder`) and the other ranks `follow` with a decoder of their own: before each
decode step rank 0 broadcasts what its scheduler did to its decoder since the last one (requests submitted,
sequences cancelled), every rank applies it in that order and steps. A batch decoder is deterministic given those
calls but for its speculation policy, whose choice every rank takes from rank 0 (`paradec.batch`). So a request
whose client leaves is cancelled on every rank at the same step boundary and frees its slot, as on one process. A
job that does not batch (layerskip) is broadcast as a solo request and decoded to its end, as above.
"""

from __future__ import annotations

import dataclasses
import logging
import queue

from paradec.errors import ParadecError
from paradec.runners.native.tp import broadcast_host as broadcast  # rank 0's message on every rank
from paradec.server.batching import BatchWorker
from paradec.server.worker import EngineWorker, Handle, emit_report, run_alone

log = logging.getLogger("paradec.server")

HEARTBEAT_S = 20.0  # idle rank 0 broadcasts this often (the group's collective timeout is minutes)
IDLE, STOP = "idle", "stop"  # the broadcasts that are not requests


def decode(engine, request) -> None:
    """`request` decoded to its end as the server's one-at-a-time worker decodes it (the same calls, so the same
    collectives): one sample through `Engine.stream`, n samples through `Engine.samples`, one after another."""
    generations = engine.samples(request) if request.n > 1 else [engine.stream(request)]
    for generation in generations:
        for _ in generation:
            pass


def follow(engine, decoder=None) -> int:
    """A rank other than 0: run what rank 0 broadcasts until it broadcasts STOP: a solo request (`("solo",
    request)`) decoded to its end; under a batched server (`decoder`, this rank's own) each step's record
    (`("step", ops)`: requests submitted, sequences cancelled) applied to `decoder` in order, then one step. A
    request that fails here fails on rank 0 too (the same checks on the same inputs); it is logged and the loop goes
    on."""
    jobs: dict[int, list] = {}  # a batched job's number (rank 0's submission order) -> its sequences
    submitted = 0
    while True:
        message = broadcast()
        if message == STOP:
            return 0
        if message == IDLE:
            continue
        kind, body = message
        if kind == "solo":
            try:
                decode(engine, body)
            except ParadecError as exc:
                log.info("tensor parallel: request failed on this rank as on rank 0: %s", exc)
            continue
        for op in body:
            if op[0] == "submit":
                jobs[submitted] = decoder.submit_samples(op[1])
                submitted += 1
            else:
                _, job, sample, reason = op
                for item in jobs.get(job, []):
                    if item.sample == sample:
                        decoder.cancel(item, reason)
        try:
            decoder.step()
        except Exception:  # rank 0's step failed alike: its scheduler cancels the batch, which reaches us as ops
            log.exception("tensor parallel: a batch step failed on this rank as on rank 0")
        jobs = {job: items for job, items in jobs.items() if not all(item.done for item in items)}


class _Uncancellable:
    """A job's handle as `run_alone` sees it on a tensor-parallel server: never cancelled, so the generation runs to
    its end on rank 0 as on the others; its events still go to the real handle (whose reader may have left)."""

    cancelled = False
    cancel_reason = ""

    def __init__(self, handle: Handle) -> None:
        self.job = handle.job
        self._handle = handle

    def push(self, event) -> None:
        if not self._handle.cancelled:
            self._handle.push(event)

    def cancel(self, reason: str = "disconnect") -> None:
        pass


class TensorParallelWorker(EngineWorker):
    """`EngineWorker` on rank 0 of a tensor-parallel group: broadcasts each job's request before decoding it,
    decodes every job to its end, beats while idle, and broadcasts STOP when it ends (see the module docstring)."""

    def _serve(self) -> None:
        try:
            while True:
                try:
                    handle = self._queue.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    broadcast(IDLE)
                    continue
                if handle is None:
                    return
                self._current = handle
                try:
                    self._run(handle)
                finally:
                    self._current = None
        finally:
            broadcast(STOP)

    def _run(self, handle: Handle) -> None:
        emit_report(self.on_report, _alone_on_every_rank(handle, self._stopping))


class MirroredDecoder:
    """Rank 0's `BatchDecoder` as its scheduler sees it: `submit_samples` and `cancel` are recorded as they happen,
    and `step` broadcasts the record (`("step", ops)`) before stepping, so that every follower's decoder receives
    the same calls in the same order. Everything else is the decoder's."""

    def __init__(self, decoder) -> None:
        self._decoder = decoder
        self._ops: list[tuple] = []
        self._jobs = 0  # requests submitted so far: a follower names a job by its number
        self._job_of: dict[int, tuple[int, object]] = {}  # id(item) -> (its job's number, item), until it is done

    def __getattr__(self, name: str):
        return getattr(self._decoder, name)

    def submit_samples(self, request):
        items = self._decoder.submit_samples(request)  # a refusal (ParadecError) is refused on every rank alike
        self._ops.append(("submit", request))
        for item in items:
            self._job_of[id(item)] = (self._jobs, item)
        self._jobs += 1
        return items

    def cancel(self, item, reason: str = "cancelled") -> None:
        self._decoder.cancel(item, reason)
        if id(item) in self._job_of:
            self._ops.append(("cancel", self._job_of[id(item)][0], item.sample, reason))

    def step(self):
        ops, self._ops = self._ops, []
        broadcast(("step", ops))
        touched = self._decoder.step()
        self._job_of = {key: entry for key, entry in self._job_of.items() if not entry[1].done}
        return touched


class TensorParallelBatchWorker(BatchWorker):
    """`BatchWorker` on rank 0 of a tensor-parallel group (its decoder a `MirroredDecoder`): solo jobs are broadcast
    and decoded to their end, an idle worker beats, and STOP goes out when it ends (see the module docstring)."""

    def _serve(self) -> None:
        try:
            super()._serve()
        finally:
            broadcast(STOP)

    def _run_solo(self, handle: Handle):
        return _alone_on_every_rank(handle, self._exiting)

    def _idle(self) -> None:
        """One heartbeat's wait; still idle, a beat to the other ranks (under the lock: a broadcast is quick)."""
        self._lock.wait(HEARTBEAT_S)
        if not self._waiting and not self._exiting:
            broadcast(IDLE)


def _alone_on_every_rank(handle: Handle, stopping: bool):
    """A job run alone on every rank: broadcast, then decoded to its end whatever its client does (see the module
    docstring); cancelled unstarted (`stopping`, or cancelled while it waited) on rank 0 alone."""
    if stopping or handle.cancelled:
        return run_alone(handle, stopping=True)
    broadcast(("solo", handle.job.request))
    report = run_alone(_Uncancellable(handle), False)
    if handle.cancelled and report.outcome not in ("error", "invalid"):
        report = dataclasses.replace(report, outcome=handle.cancel_reason)
    return report
