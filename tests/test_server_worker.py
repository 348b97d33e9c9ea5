"""The engine worker behind `paradec serve`, in process with a scripted engine: cancellation frees the engine, a
full queue refuses, a timeout cancels, a failing generation is reported and the worker keeps serving, closing fails
the waiting jobs only. Also the `paradec serve` argument checks that end before any server starts."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from conftest import run_scheduler
from paradec.cli import main
from paradec.decode import Result
from paradec.errors import ParadecError
from paradec.metrics import GenerationStats
from paradec.server.worker import Done, EngineWorker, Failed, Job, JobCancelled, JobTimeout, Piece, QueueFull


class ScriptedGeneration:
    """Yields `pieces`; then, if `gate` is given, blocks until it is set and yields forever (one piece per gate)."""

    def __init__(self, pieces: list[str], gate: threading.Event | None, error: Exception | None) -> None:
        self.pieces, self.gate, self.error = pieces, gate, error
        self.stats = GenerationStats(method="vanilla", prompt_tokens=1)
        self.result: Result | None = None
        self.closed = False

    def __iter__(self):
        try:
            for piece in self.pieces:
                self.stats.record_step(0, 0, 0)
                yield piece
            if self.error is not None:
                raise self.error
            while self.gate is not None:
                self.gate.wait()
                self.gate.clear()
                self.stats.record_step(0, 0, 0)
                yield "."
            self.stats.new_tokens = len(self.pieces)
            self.result = Result("".join(self.pieces), [1] * len(self.pieces), "length", self.stats)
        finally:
            self.closed = True


class ScriptedEngine:
    """`stream(prompt_ids=[k])` runs script k: (pieces, gate, error) or an exception raised by `stream` itself."""

    def __init__(self, scripts: dict[int, tuple | Exception]) -> None:
        self.scripts = scripts
        self.generations: list[ScriptedGeneration] = []

    def stream(self, prompt_ids, **kwargs) -> ScriptedGeneration:
        script = self.scripts[prompt_ids[0]]
        if isinstance(script, Exception):
            raise script
        self.generations.append(ScriptedGeneration(*script))
        return self.generations[-1]

    def job(self, script: int, timeout: float = 60.0) -> Job:
        """A job that runs script `script` (`stream` is called on the worker's thread, as the app's jobs do)."""
        return Job(functools.partial(self.stream, [script]), "vanilla", timeout)


async def drain(handle) -> tuple[list[str], Done | Failed]:
    pieces = []
    while isinstance(event := await handle.next(), Piece):
        pieces.append(event.text)
    return pieces, event


def run_worker(engine, test, max_queue: int = 4) -> list:
    """Run `await test(worker)` on an event loop with a started worker; returns the worker's job reports."""
    reports = []
    worker = EngineWorker(max_queue=max_queue, on_report=reports.append)
    run_scheduler(worker, test)
    return reports


def test_jobs_run_in_order_and_report():
    engine = ScriptedEngine({1: (["a", "b"], None, None), 2: (["c"], None, None)})

    async def test(worker):
        first, second = worker.submit(engine.job(1)), worker.submit(engine.job(2))
        pieces, done = await drain(first)
        assert pieces == ["a", "b"] and isinstance(done, Done) and done.result is engine.generations[0].result
        pieces, done = await drain(second)
        assert pieces == ["c"] and done.result.text == "c"

    reports = run_worker(engine, test)
    assert [(r.outcome, r.new_tokens) for r in reports] == [("length", 2), ("length", 1)]


def test_cancel_mid_generation_closes_it_and_frees_the_worker():
    gate = threading.Event()
    engine = ScriptedEngine({1: (["a"], gate, None), 2: (["b"], None, None)})

    async def test(worker):
        endless = worker.submit(engine.job(1))
        assert await endless.next() == Piece("a")
        endless.cancel()
        gate.set()  # lets the endless generation emit one more piece, unless the worker saw the cancel after "a"
        pieces, failed = await drain(endless)
        assert pieces in ([], ["."]) and isinstance(failed, Failed) and isinstance(failed.error, JobCancelled)
        assert engine.generations[0].closed and engine.generations[0].result is None
        _, done = await drain(worker.submit(engine.job(2)))
        assert done.result.text == "b"

    reports = run_worker(engine, test)
    assert [r.outcome for r in reports] == ["disconnect", "length"]
    assert reports[0].new_tokens in (1, 2)  # "a", and maybe "."


def test_full_queue_refuses_then_recovers():
    gate = threading.Event()
    engine = ScriptedEngine({1: (["a"], gate, None), 2: (["b"], None, None)})

    async def test(worker):
        running = worker.submit(engine.job(1))
        assert await running.next() == Piece("a")  # the worker holds job 1: the queue is empty
        waiting = worker.submit(engine.job(2))
        assert worker.queue_depth == 1 and worker.running == 1
        with pytest.raises(QueueFull, match="1 requests are already waiting"):
            worker.submit(engine.job(2))
        running.cancel()
        gate.set()
        _, done = await drain(waiting)
        assert done.result.text == "b"

    run_worker(engine, test, max_queue=1)


def test_timeout_cancels_the_job():
    gate = threading.Event()
    engine = ScriptedEngine({1: (["a"], gate, None), 2: (["b"], None, None)})

    async def test(worker):
        slow = worker.submit(engine.job(1, timeout=0.05))
        pieces, failed = await drain(slow)  # the generation blocks on the gate: only the deadline can end the wait
        assert pieces in ([], ["a"]) and isinstance(failed.error, JobTimeout)
        assert "timed out after 0.05 s" in str(failed.error)
        gate.set()
        _, done = await drain(worker.submit(engine.job(2)))
        assert done.result.text == "b"

    reports = run_worker(engine, test)
    assert [r.outcome for r in reports] == ["timeout", "length"]


def test_failures_are_reported_and_the_worker_survives():
    engine = ScriptedEngine(
        {
            1: ParadecError("unknown option 'x'"),
            2: (["a"], None, RuntimeError("device lost")),
            3: (["b"], None, None),
        }
    )

    async def test(worker):
        _, bad_input = await drain(worker.submit(engine.job(1)))
        assert isinstance(bad_input.error, ParadecError)
        pieces, crashed = await drain(worker.submit(engine.job(2)))
        assert pieces == ["a"] and str(crashed.error) == "device lost"
        assert engine.generations[0].closed
        _, done = await drain(worker.submit(engine.job(3)))
        assert done.result.text == "b" and worker.alive

    reports = run_worker(engine, test)
    assert [r.outcome for r in reports] == ["invalid", "error", "length"]


def test_stop_cancels_waiting_jobs():
    gate = threading.Event()
    engine = ScriptedEngine({1: (["a"], gate, None), 2: (["b"], None, None)})
    worker = EngineWorker(max_queue=2)
    worker.start()

    async def test():
        running = worker.submit(engine.job(1))
        assert await running.next() == Piece("a")
        waiting = worker.submit(engine.job(2))
        stopping = asyncio.create_task(asyncio.to_thread(worker.stop))
        _, failed = await drain(waiting)
        assert isinstance(failed.error, JobCancelled) and str(failed.error) == "shutdown"
        gate.set()
        await stopping
        with pytest.raises(QueueFull, match="shutting down"):
            worker.submit(engine.job(2))

    asyncio.run(test())
    assert not worker.alive and engine.generations[0].closed


def test_close_fails_the_waiting_jobs_and_lets_the_running_one_finish():
    gate = threading.Event()
    engine = ScriptedEngine({1: (["a"], gate, None), 2: (["b"], None, None)})

    async def test(worker):
        running = worker.submit(engine.job(1))
        assert await running.next() == Piece("a")
        waiting = worker.submit(engine.job(2))
        assert worker.close() == 1
        _, failed = await drain(waiting)
        assert isinstance(failed.error, JobCancelled) and str(failed.error) == "shutdown"
        with pytest.raises(QueueFull, match="shutting down"):
            worker.submit(engine.job(2))
        gate.set()
        assert await running.next() == Piece(".")  # still running: closing does not cancel it
        running.fail("shutdown")  # ends its events now, before the worker has seen the cancel
        _, failed = await drain(running)
        assert isinstance(failed.error, JobCancelled) and running.cancelled
        gate.set()  # the worker sees the cancel after its next piece

    reports = run_worker(engine, test)
    assert [r.outcome for r in reports] == ["shutdown"]  # the waiting job never started
    assert engine.generations[0].closed and len(engine.generations) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
        (["--port", "70000"], "--port must lie in [0, 65535], got 70000"),
        (["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be > 0 seconds, got -1.0"),
        (["--header-timeout", "0"], "--header-timeout must be > 0 seconds, got 0.0"),
        (["--body-timeout", "nan"], "--body-timeout must be > 0 seconds, got nan"),
        (["--max-connections", "0"], "--max-connections must be >= 1, got 0"),
        (["--method", "telepathy"], "unknown method 'telepathy'"),
        (["--method", "pld", "--opt", "k=3"], "unknown option 'k' for method 'pld'"),
    ],
)
def test_serve_argument_errors_exit_2(args, message, capsys):
    assert main(["serve", "--model", "/nonexistent", *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_a_method_the_engine_cannot_run_exits_2(model_dirs, capsys):
    assert main(["serve", "--model", str(model_dirs["llama"]), "--runner", "hf", "--method", "draft"]) == 2
    assert "method 'draft' needs a draft model" in capsys.readouterr().err


def test_serve_on_a_busy_port_exits_2(model_dirs, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(model_dirs["llama"]), "--runner", "hf", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
