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
- No batching: the batched runner over a sharded model is not built, so `--max-batch` is 1.
- Shutdown: when rank 0's worker stops (the server drained), it broadcasts STOP and every follower returns.
"""

from __future__ import annotations

import dataclasses
import logging
import queue

import torch.distributed as dist

from paradec.errors import ParadecError
from paradec.server.worker import EngineWorker, Handle, emit_report, run_alone

log = logging.getLogger("paradec.server")

HEARTBEAT_S = 20.0  # idle rank 0 broadcasts this often (the group's collective timeout is minutes)
IDLE, STOP = "idle", "stop"  # the broadcasts that are not requests


def broadcast(message=None):
    """Rank 0's `message` on every rank (a collective: all ranks call it together)."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decode(engine, request) -> None:
    """`request` decoded to its end as the server's one-at-a-time worker decodes it (the same calls, so the same
    collectives): one sample through `Engine.stream`, n samples through `Engine.samples`, one after another."""
    generations = engine.samples(request) if request.n > 1 else [engine.stream(request)]
    for generation in generations:
        for _ in generation:
            pass


def follow(engine) -> int:
    """A rank other than 0: run every request rank 0 broadcasts, until it broadcasts STOP. A request that fails
    here fails on rank 0 too (the same checks on the same inputs); it is logged and the loop goes on."""
    while True:
        message = broadcast()
        if message == STOP:
            return 0
        if message == IDLE:
            continue
        try:
            decode(engine, message)
        except ParadecError as exc:
            log.info("tensor parallel: request failed on this rank as on rank 0: %s", exc)


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
        if self._stopping or handle.cancelled:
            emit_report(self.on_report, run_alone(handle, stopping=True))  # cancelled unstarted, on rank 0 alone
            return
        broadcast(handle.job.request)
        report = run_alone(_Uncancellable(handle), False)
        if handle.cancelled and report.outcome not in ("error", "invalid"):
            report = dataclasses.replace(report, outcome=handle.cancel_reason)
        emit_report(self.on_report, report)
