"""`paradec serve` with continuous batching (`paradec.server.batching.BatchWorker`) on the committed code model.

As a real process (`--max-batch 8`, native runner, fp32): concurrent requests of mixed methods, plain and streamed,
each answered what `engine.generate` answers it alone, while the batch held several sequences in a step (its
histograms in /metrics); a stream cancelled mid-way leaves the others' answers unchanged; EAGLE and layerskip
requests (layerskip does not batch: it runs alone between batches) mixed with batched ones; a full queue answers
503.

In process, the scheduler itself: a job that does not batch waits for the batch to drain and holds back the jobs
behind it; timeouts; close() fails the waiting jobs and lets the running ones finish; stop() cancels them all.
And `--max-batch` and the choice of scheduler.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import paradec
from conftest import run_scheduler, until
from paradec.batch import BatchDecoder
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.server.app import ServerConfig, create_app, make_scheduler
from paradec.server.batching import BatchWorker, StepReport
from paradec.server.worker import Done, EngineWorker, Failed, Job, JobCancelled, JobTimeout, Piece, QueueFull
from paradec.zoo import code_draft_dir, code_model_dir

NAME = "code"
PROMPTS = [  # each generates LONG tokens greedily without reaching EOS, but the last (3 tokens)
    "def fibonacci(n):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "x",
    "def read_lines(path):\n    with open(path) as f:\n        return",
    "# sort a list\n",
    "def add(a, b):\n    return",
    "for i in range(10):\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(",
]
METHODS = ["vanilla", "pld", "draft"]
NEW = 24
LONG = 900  # tokens: a generation that outlasts what a test does meanwhile (the context is 1024)
SERVE = ["--model", str(code_model_dir()), "--draft", str(code_draft_dir()), "--runner", "native"]
SERVE += ["--dtype", "float32", "--served-model-name", NAME]


@pytest.fixture(scope="module")
def engine():
    return paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")


@functools.cache
def _alone(engine, prompt: str, method: str, max_new_tokens: int, sampling: tuple = ()):
    return engine.generate(prompt, method=method, max_new_tokens=max_new_tokens, sampling=dict(sampling) or None)


def alone(engine, prompt: str, method: str, max_new_tokens: int = NEW, **sampling):
    """`engine.generate` of the request alone (greedy unless `sampling`), cached. The in-process tests call it for
    their cases before a worker starts (`expect`): the engine runs one generation at a time, and a test that ran one
    while the worker runs a job alone would make that job fail."""
    return _alone(engine, prompt, method, max_new_tokens, tuple(sorted(sampling.items())))


def expect(engine, *cases: tuple) -> None:
    for case in cases:
        alone(engine, *case)


@pytest.fixture(scope="module")
def server(serve_process):
    proc = serve_process([*SERVE, "--max-batch", "8", "--max-queue", "16"])
    yield proc
    proc.stop()


def complete(server, prompt: str, method: str, max_tokens: int = NEW, **body) -> httpx.Response:
    request = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "method": method, **body}
    return httpx.post(f"{server.url}/v1/completions", json=request, timeout=120)


def stream_text(
    server,
    prompt: str,
    method: str,
    max_tokens: int = NEW,
    stop_after: int | None = None,
    until: threading.Event | None = None,
) -> list[str]:
    """The text pieces of a streamed completion; the connection is closed after `stop_after` pieces, or at the
    first piece after `until` is set."""
    request = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "method": method, "stream": True}
    pieces = []
    with (
        httpx.Client(base_url=server.url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=request) as reply,
    ):
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            if chunk["choices"][0]["text"]:
                pieces.append(chunk["choices"][0]["text"])
            if (stop_after is not None and len(pieces) >= stop_after) or (until is not None and until.is_set()):
                return pieces  # leaving the `with` closes the connection mid-stream
    return pieces


def batch_steps(samples) -> tuple[float, float]:
    """(decode steps, of which steps that held more than one sequence) in /metrics."""
    steps = samples.sum("paradec_batch_size_count")
    single = samples.sum("paradec_batch_size_bucket", le="1.0")
    return steps, steps - single


# --- a real server ------------------------------------------------------------------------------------------------


def test_concurrent_requests_of_mixed_methods_each_equal_their_answer_alone(server, engine):
    before = server.metrics()
    cases = [(prompt, METHODS[i % len(METHODS)]) for i, prompt in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: complete(server, *case), cases))
    for (prompt, method), reply in zip(cases, replies, strict=True):
        assert reply.status_code == 200, reply.text
        expected = alone(engine, prompt, method)
        choice = reply.json()["choices"][0]
        assert choice["text"] == expected.text, (prompt, method)
        assert choice["finish_reason"] == expected.finish_reason
        assert reply.json()["usage"]["completion_tokens"] == len(expected.token_ids)
        stats = reply.json()["paradec"]
        assert stats["method"] == method and stats["new_tokens"] == len(expected.token_ids)

    def delta(samples, name: str, **labels: str) -> float:
        return samples.sum(name, **labels) - before.sum(name, **labels)

    tokens = sum(len(alone(engine, *case).token_ids) for case in cases)
    # a job's report may reach the metrics just after its answer reached the client
    after = server.wait_until(lambda s: delta(s, "paradec_generation_tokens_total") == tokens, "all jobs reported")
    steps, shared = (a - b for a, b in zip(batch_steps(after), batch_steps(before), strict=True))
    assert shared > 0, "no decode step held more than one sequence"
    sequences = delta(after, "paradec_batch_size_sum")
    assert sequences > steps  # more sequences than steps: the steps were shared
    assert delta(after, "paradec_batch_step_tokens_sum") == tokens  # every emitted token, counted per step
    assert delta(after, "paradec_batch_step_inputs_sum") >= sequences  # a pending token per sequence, + drafts
    for method in METHODS:
        assert delta(after, "paradec_generations_total", method=method) == sum(m == method for _, m in cases)


def test_a_sampled_request_in_a_batch_is_answered(server):
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 1234}
    with ThreadPoolExecutor(4) as pool:
        sampled = pool.submit(complete, server, PROMPTS[0], "pld", **sampling)
        others = [pool.submit(complete, server, prompt, "vanilla") for prompt in PROMPTS[1:4]]
        reply = sampled.result()
        assert all(other.result().status_code == 200 for other in others)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == NEW


def test_concurrent_streams_each_equal_their_answer_alone(server, engine):
    cases = [(prompt, METHODS[i % len(METHODS)]) for i, prompt in enumerate(PROMPTS[:6])]
    with ThreadPoolExecutor(len(cases)) as pool:
        streams = list(pool.map(lambda case: stream_text(server, *case), cases))
    for case, pieces in zip(cases, streams, strict=True):
        assert "".join(pieces) == alone(engine, *case).text, case
        assert len(pieces) > 1


def test_cancelling_one_stream_mid_way_leaves_the_others_unchanged(server, engine):
    before = server.metrics()
    cases = [(prompt, METHODS[i % len(METHODS)]) for i, prompt in enumerate(PROMPTS[:4])]
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        cut = pool.submit(stream_text, server, PROMPTS[4], "pld", LONG, stop_after=3)
        streams = [pool.submit(stream_text, server, *case, 64) for case in cases]
        assert len(cut.result()) == 3
        for case, stream in zip(cases, streams, strict=True):
            assert "".join(stream.result()) == alone(engine, *case, 64).text, case
    after = server.wait_until(
        lambda s: (
            s.sum("paradec_generations_total", outcome="disconnect")
            > before.sum("paradec_generations_total", outcome="disconnect")
        ),
        "the cut stream's generation reported",
    )
    assert (
        after.sum("paradec_generations_total", outcome="disconnect")
        - before.sum("paradec_generations_total", outcome="disconnect")
        == 1
    )
    server.wait_for(running=0, queue_depth=0)


def test_eagle_and_layerskip_requests_mixed_with_batched_ones_are_answered_right(server, engine):
    """layerskip does not batch (it runs alone, between batches); EAGLE does, or runs alone where it does not."""
    cases = [(PROMPTS[0], "eagle"), (PROMPTS[1], "pld"), (PROMPTS[2], "layerskip"), (PROMPTS[3], "draft")]
    cases += [(PROMPTS[5], "eagle"), (PROMPTS[6], "vanilla"), (PROMPTS[4], "layerskip")]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: complete(server, *case), cases))
    for case, reply in zip(cases, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == alone(engine, *case).text, case
        assert reply.json()["paradec"]["method"] == case[1]


def test_metrics_have_the_batch_histograms(server):
    complete(server, PROMPTS[0], "vanilla")
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("paradec_batch_size", "paradec_batch_step_inputs", "paradec_batch_step_tokens"):
        assert f"# TYPE {name} histogram" in text
        assert f"{name}_count" in text and f'{name}_bucket{{le="+Inf"}}' in text
    samples = server.metrics()
    assert samples.sum("paradec_batch_size_count") == samples.sum("paradec_batch_step_tokens_count") > 0
    for choice in ("dropped", "left_out", "shadows"):  # the speculation policy's choices, totals so far
        assert ("paradec_speculation_choices", (("choice", choice),)) in samples, choice


def test_a_full_queue_answers_503_and_the_waiting_request_is_served(serve_process, engine):
    proc = serve_process([*SERVE, "--max-batch", "2", "--max-queue", "1"])
    try:
        short = (PROMPTS[-1], "pld")
        cut = threading.Event()
        with ThreadPoolExecutor(3) as pool:
            long = []
            # one after the other: a request being prepared holds a place in the queue (of 1)
            for running, prompt in enumerate(PROMPTS[:2], 1):
                long.append(pool.submit(stream_text, proc, prompt, "vanilla", LONG, until=cut))
                proc.wait_for(running=running)
            waiting = pool.submit(complete, proc, *short)
            proc.wait_for(running=2, queue_depth=1)
            full = complete(proc, *short)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
            cut.set()  # the long streams disconnect: the waiting request joins the batch
            reply = waiting.result(timeout=120)
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == alone(engine, *short).text
            for stream in long:
                stream.result(timeout=120)
    finally:
        proc.stop()


# --- the scheduler in process --------------------------------------------------------------------------------------


def job(engine, prompt: str, method: str, max_new_tokens: int = NEW, timeout: float = 120.0, batch=True) -> Job:
    """A job as the app makes it; with `batch=False`, without its request (so it can only run alone)."""
    request = engine.request(prompt, method=method, max_new_tokens=max_new_tokens)
    return Job(functools.partial(engine.stream, request), method, timeout, request=request if batch else None)


SOLO = ["layerskip", "no request"]  # a method that does not batch; a job that names no request


def solo_job(engine, kind: str, prompt: str, max_new_tokens: int = NEW) -> Job:
    """A job that runs alone: of a method that does not batch, or one without a request."""
    if kind == "no request":
        return job(engine, prompt, "vanilla", max_new_tokens, batch=False)
    made = job(engine, prompt, kind, max_new_tokens)
    if made.request.drafter.batchable:
        pytest.skip(f"method {kind!r} runs in batches now")
    return made


async def drain(handle) -> tuple[list[str], Done | Failed]:
    pieces = []
    while isinstance(event := await handle.next(), Piece):
        pieces.append(event.text)
    return pieces, event


def run_batch_worker(engine, test, *, max_batch: int = 4, max_queue: int = 4) -> tuple[list, list]:
    """Run `await test(worker)` with a started BatchWorker; returns its job reports and step reports."""
    reports, steps = [], []
    worker = BatchWorker(
        engine.batch_decoder(max_batch), max_queue=max_queue, on_report=reports.append, on_step=steps.append
    )
    run_scheduler(worker, test)
    assert not worker.alive
    return reports, steps


def test_jobs_are_batched_and_each_equals_its_answer_alone(engine):
    cases = [(prompt, METHODS[i % 3]) for i, prompt in enumerate(PROMPTS[:5])]
    expect(engine, *cases)

    async def test(worker):
        handles = [worker.submit(job(engine, *case)) for case in cases]
        for case, handle in zip(cases, handles, strict=True):
            pieces, done = await drain(handle)
            assert isinstance(done, Done) and "".join(pieces) == done.result.text == alone(engine, *case).text
            assert done.result.stats.method == case[1]
        assert worker.largest_batch > 1
        await until(lambda: worker.running == 0 and worker.queue_depth == 0, "emptied")

    reports, steps = run_batch_worker(engine, test, max_batch=4, max_queue=8)
    assert sorted(r.job.method for r in reports) == sorted(m for _, m in cases)
    assert all(r.outcome in ("stop", "length") and r.stats is not None for r in reports)
    assert all(isinstance(s, StepReport) and 1 <= s.sequences <= 4 and s.inputs >= s.sequences for s in steps)
    assert max(s.sequences for s in steps) > 1
    assert sum(s.tokens for s in steps) == sum(r.new_tokens for r in reports)


def test_a_seeded_sampled_job_in_a_batch_draws_what_it_draws_alone_while_speculation_stays_on(engine):
    """Each job keeps its own sampling and generator (with `speculate="always"`: see batching's docstring)."""
    reports = []
    worker = BatchWorker(engine.batch_decoder(4, speculate="always"), max_queue=8, on_report=reports.append)
    worker.start()
    sampling = {"temperature": 0.9, "seed": 7}
    requests = [
        engine.request(p, method=m, max_new_tokens=NEW, sampling=sampling) for p, m in zip(PROMPTS[:2], METHODS)
    ]
    requests += [engine.request(p, method="pld", max_new_tokens=NEW) for p in PROMPTS[2:4]]
    wanted = [engine.generate(request).token_ids for request in requests]

    async def test():
        try:
            handles = [worker.submit(Job(lambda: None, r.method, 120.0, request=r)) for r in requests]
            for request, tokens, handle in zip(requests, wanted, handles, strict=True):
                _, done = await drain(handle)
                assert done.result.token_ids == tokens, request.sampling
        finally:
            await asyncio.to_thread(worker.stop)

    asyncio.run(test())
    assert len(reports) == 4 and worker.largest_batch > 1


@pytest.mark.parametrize("kind", SOLO)
def test_a_job_that_does_not_batch_waits_for_the_batch_to_drain_and_holds_back_the_jobs_behind_it(engine, kind):
    method = "vanilla" if kind == "no request" else kind
    expect(engine, (PROMPTS[1], method), (PROMPTS[2], "pld"))

    async def test(worker):
        running = worker.submit(job(engine, PROMPTS[0], "pld", LONG))
        assert isinstance(await running.next(), Piece)
        solo = worker.submit(solo_job(engine, kind, PROMPTS[1]))
        behind = worker.submit(job(engine, PROMPTS[2], "pld"))
        for _ in range(20):  # the batch has room, but nothing passes the solo job at the head of the queue
            assert isinstance(await running.next(), Piece)
        assert worker.running == 1 and worker.queue_depth == 2
        running.cancel()
        _, failed = await drain(running)
        assert isinstance(failed.error, JobCancelled)
        pieces, done = await drain(solo)
        assert "".join(pieces) == done.result.text == alone(engine, PROMPTS[1], method).text
        assert done.result.stats.method == method
        _, done = await drain(behind)
        assert done.result.text == alone(engine, PROMPTS[2], "pld").text

    reports, _ = run_batch_worker(engine, test)
    assert [(r.job.method, r.outcome) for r in reports] == [
        ("pld", "disconnect"),
        (method, alone(engine, PROMPTS[1], method).finish_reason),
        ("pld", alone(engine, PROMPTS[2], "pld").finish_reason),  # it started once the solo job had finished
    ]
    assert 0 < reports[0].new_tokens < LONG


def test_a_job_the_decoder_refuses_runs_alone(engine):
    """A decoder without a batched draft runner refuses method 'draft' when it joins: the job runs alone instead."""
    runner = engine.batch_decoder(2).runner
    reports = []
    worker = BatchWorker(BatchDecoder(engine, runner, max_running=2), max_queue=4, on_report=reports.append)
    worker.start()
    cases = [(PROMPTS[0], "pld"), (PROMPTS[1], "draft"), (PROMPTS[2], "vanilla")]
    expect(engine, *cases)

    async def test():
        try:
            handles = [worker.submit(job(engine, *case)) for case in cases]
            for case, handle in zip(cases, handles, strict=True):
                _, done = await drain(handle)
                assert isinstance(done, Done) and done.result.text == alone(engine, *case).text, case
        finally:
            await asyncio.to_thread(worker.stop)

    asyncio.run(test())
    assert sorted(r.job.method for r in reports) == ["draft", "pld", "vanilla"]
    assert all(r.outcome in ("stop", "length") for r in reports)
    assert runner.free == runner.slots


def test_cancelling_one_job_leaves_the_others_unchanged(engine):
    expect(engine, *[(prompt, "pld", 48) for prompt in PROMPTS[:3]])

    async def test(worker):
        cut = worker.submit(job(engine, PROMPTS[4], "draft", LONG))
        others = [worker.submit(job(engine, prompt, "pld", 48)) for prompt in PROMPTS[:3]]
        assert isinstance(await cut.next(), Piece)
        cut.cancel()
        _, failed = await drain(cut)
        assert isinstance(failed.error, JobCancelled) and str(failed.error) == "disconnect"
        for prompt, handle in zip(PROMPTS, others, strict=False):
            _, done = await drain(handle)
            assert done.result.token_ids == alone(engine, prompt, "pld", 48).token_ids

    reports, _ = run_batch_worker(engine, test)
    assert sorted(r.outcome for r in reports)[0] == "disconnect"


def test_timeout_cancels_the_job_and_the_batch_goes_on(engine):
    expect(engine, (PROMPTS[1], "pld"))

    async def test(worker):
        slow = worker.submit(job(engine, PROMPTS[0], "vanilla", LONG, timeout=0.3))
        other = worker.submit(job(engine, PROMPTS[1], "pld"))
        _, failed = await drain(slow)
        assert isinstance(failed.error, JobTimeout) and "timed out after 0.3 s" in str(failed.error)
        _, done = await drain(other)
        assert done.result.text == alone(engine, PROMPTS[1], "pld").text
        await until(lambda: worker.running == 0, "freed the timed-out job's slot")

    reports, _ = run_batch_worker(engine, test)
    assert sorted(r.outcome for r in reports) == sorted(["timeout", alone(engine, PROMPTS[1], "pld").finish_reason])


def test_full_queue_refuses_and_cancelled_waiting_jobs_leave_it(engine):
    expect(engine, (PROMPTS[2], "pld"))

    async def test(worker):
        running = worker.submit(job(engine, PROMPTS[0], "vanilla", LONG))
        assert isinstance(await running.next(), Piece)
        waiting = worker.submit(job(engine, PROMPTS[1], "pld"))
        assert worker.queue_depth == 1 and worker.running == 1
        with pytest.raises(QueueFull, match="1 requests are already waiting"):
            worker.submit(job(engine, PROMPTS[2], "pld"))
        waiting.cancel()  # a client that went away while waiting frees its place at the next step
        await until(lambda: worker.queue_depth == 0, "dropped the cancelled waiting job")
        _, failed = await drain(waiting)
        assert isinstance(failed.error, JobCancelled)
        again = worker.submit(job(engine, PROMPTS[2], "pld"))
        running.cancel()
        _, done = await drain(again)
        assert done.result.text == alone(engine, PROMPTS[2], "pld").text

    reports, _ = run_batch_worker(engine, test, max_batch=1, max_queue=1)
    assert [r.outcome for r in reports][:2] == ["disconnect", "disconnect"]
    assert reports[0].stats is None  # the waiting job never started


def test_close_fails_the_waiting_jobs_and_lets_the_running_ones_finish(engine):
    expect(engine, *[(prompt, "pld", 128) for prompt in PROMPTS[:2]])

    async def test(worker):
        running = [worker.submit(job(engine, prompt, "pld", 128)) for prompt in PROMPTS[:2]]
        await until(lambda: worker.running == 2, "ran two jobs")
        waiting = worker.submit(job(engine, PROMPTS[2], "vanilla"))
        assert worker.close() == 1
        _, failed = await drain(waiting)
        assert isinstance(failed.error, JobCancelled) and str(failed.error) == "shutdown"
        with pytest.raises(QueueFull, match="shutting down"):
            worker.submit(job(engine, PROMPTS[2], "vanilla"))
        for prompt, handle in zip(PROMPTS, running, strict=False):
            _, done = await drain(handle)
            assert isinstance(done, Done) and done.result.text == alone(engine, prompt, "pld", 128).text

    reports, _ = run_batch_worker(engine, test, max_batch=2)
    assert len(reports) == 2 and all(r.outcome in ("stop", "length") for r in reports)  # the waiting one never ran


def test_stop_cancels_the_running_and_the_waiting_jobs(engine):
    worker = BatchWorker(engine.batch_decoder(2), max_queue=4)
    worker.start()

    async def test():
        running = [worker.submit(job(engine, prompt, "pld", LONG)) for prompt in PROMPTS[:2]]
        solo = worker.submit(solo_job(engine, "no request", PROMPTS[3]))  # waits for the batch to drain
        for handle in running:
            assert isinstance(await handle.next(), Piece)
        stopping = asyncio.create_task(asyncio.to_thread(worker.stop))
        for handle in [*running, solo]:
            _, failed = await drain(handle)
            assert isinstance(failed.error, JobCancelled) and str(failed.error) == "shutdown"
        await stopping
        with pytest.raises(QueueFull, match="shutting down"):
            worker.submit(job(engine, PROMPTS[2], "vanilla"))

    asyncio.run(test())
    assert not worker.alive and worker.running == 0
    assert worker.decoder.idle and worker.decoder.runner.free == worker.decoder.runner.slots  # the slots came back


@pytest.mark.parametrize("kind", SOLO)
def test_stop_cancels_a_job_running_alone(engine, kind):
    worker = BatchWorker(engine.batch_decoder(2), max_queue=4)
    worker.start()

    async def test():
        solo = worker.submit(solo_job(engine, kind, PROMPTS[0], LONG))
        assert isinstance(await solo.next(), Piece)
        assert worker.running == 1
        await asyncio.to_thread(worker.stop)
        _, failed = await drain(solo)
        assert isinstance(failed.error, JobCancelled) and str(failed.error) == "shutdown"

    asyncio.run(test())
    assert not worker.alive


# --- choosing the scheduler; --max-batch ---------------------------------------------------------------------------


def test_the_app_batches_when_it_can_and_says_so_once(engine, engines, caplog):
    caplog.set_level(logging.INFO, logger="paradec.server")
    batched = make_scheduler(engine, ServerConfig(model_name=NAME, max_batch=4))
    assert isinstance(batched, BatchWorker) and batched.max_batch == 4
    assert "continuous batching: up to 4 sequences per decode step" in caplog.text
    assert isinstance(make_scheduler(engine, ServerConfig(model_name=NAME, max_batch=1)), EngineWorker)
    assert "serving one request at a time (max_batch 1)" in caplog.text
    caplog.clear()
    hf = make_scheduler(engines("llama"), ServerConfig(model_name=NAME))  # the default max_batch: 16
    assert isinstance(hf, EngineWorker)
    assert caplog.text.count("serving one request at a time") == 1 and "needs the native runner" in caplog.text
    with pytest.raises(ParadecError, match="max_batch must be an integer >= 1, got 0"):
        create_app(engine, ServerConfig(model_name=NAME, max_batch=0))
    assert ServerConfig(model_name=NAME).max_batch == 16


def test_the_batched_server_warms_up_when_asked_and_starts_with_no_steps(engine, caplog):
    """`warmup` (default: on CUDA only, so off here): synthetic batches of every bucket up to max_batch, with vanilla
    and the server's method, before the first request; the scheduler then starts with no steps counted."""
    caplog.set_level(logging.INFO, logger="paradec.server")
    make_scheduler(engine, ServerConfig(model_name=NAME, max_batch=3, method="pld"))
    assert "warm-up" not in caplog.text  # the CPU default: none
    worker = make_scheduler(engine, ServerConfig(model_name=NAME, max_batch=3, method="pld", warmup=True))
    assert "warm-up: vanilla and pld at batch sizes up to 3" in caplog.text
    decoder = worker.decoder
    assert decoder.counts.steps == 0 and not decoder.batch_sizes and decoder.idle
    assert decoder.policy.samples or decoder.policy.plain_samples  # its step timings stay: the policy starts fitted
    # a server method that does not batch (it runs alone) is passed over: vanilla alone warms the batch
    worker = make_scheduler(engine, ServerConfig(model_name=NAME, max_batch=2, method="layerskip", warmup=True))
    assert "warm-up: vanilla at batch sizes up to 2" in caplog.text and worker.decoder.idle


def test_in_process_app_batches_and_answers(engine):
    from starlette.testclient import TestClient

    with TestClient(create_app(engine, ServerConfig(model_name=NAME, max_batch=4))) as client:
        assert isinstance(client.app.state.scheduler, BatchWorker)
        cases = [(prompt, METHODS[i % 3]) for i, prompt in enumerate(PROMPTS[:4])]
        expect(engine, *cases)

        def ask(case):
            body = {"prompt": case[0], "max_tokens": NEW, "temperature": 0, "method": case[1]}
            return client.post("/v1/completions", json=body)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, cases))
        for case, reply in zip(cases, replies, strict=True):
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == alone(engine, *case).text
        assert "paradec_batch_size_count" in client.get("/metrics").text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--max-batch must be >= 1 (1 = one request at a time), got 0"),
        ("-3", "--max-batch must be >= 1 (1 = one request at a time), got -3"),
    ],
)
def test_max_batch_out_of_range_exits_2(value, message, capsys):
    assert main(["serve", "--model", "/nonexistent", "--max-batch", value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["two", "1.5", ""])
def test_max_batch_not_an_integer_exits_2_naming_it(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "/nonexistent", "--max-batch", value])
    assert exit_.value.code == 2
    assert f"argument --max-batch: invalid int value: '{value}'" in capsys.readouterr().err


def test_max_batch_help_is_clear(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-batch MAX_BATCH" in text
    assert "requests decoded together, with continuous batching (default 16 on a GPU, 4 on the CPU; 1 = one" in text
    assert "--speculate {auto,always,never}" in text


def test_a_slow_batch_step_is_logged_with_what_it_met(engine, monkeypatch, caplog):
    """A step slower than `SLOW_STEP` stalls every running request (on the H200, a new kind of forward compiling:
    6-19 s): the server log says how long, how many sequences it held and how many were joining, the CUDA graph
    misses and the graphs torch.compile made meanwhile."""
    from paradec.server import batching

    monkeypatch.setattr(batching, "SLOW_STEP", 0.0)  # every step is slow
    compiled = iter(range(10**6))  # 1 graph compiled per step
    monkeypatch.setattr(batching, "compiled_graphs", lambda: next(compiled))

    async def test(worker):
        handles = [worker.submit(job(engine, prompt, "pld")) for prompt in PROMPTS[:2]]
        for handle in handles:
            _, done = await drain(handle)
            assert isinstance(done, Done)

    with caplog.at_level("WARNING", logger="paradec.server"):
        run_batch_worker(engine, test, max_batch=4)
    slow = [r.getMessage() for r in caplog.records if r.getMessage().startswith("a batch step took")]
    assert slow and all(m.endswith("0 CUDA graph misses; 1 graphs compiled") for m in slow)
    assert any(" of them joining;" in m and ", 0 of" not in m for m in slow) and any(", 0 of them" in m for m in slow)
    monkeypatch.undo()
    assert batching.compiled_graphs() >= 0  # Dynamo's own count (0 where nothing compiled)
