"""`n` choices through `paradec serve`: the n samples of a request are one job.

A real server with the `openai` client: batched (`--max-batch 8 --speculate always`: the n samples are n sequences
of the batch) for
/v1/completions, one at a time (`--max-batch 1`: the samples run one after another inside the job) for
/v1/chat/completions. Each choice has its index and finish reason and is the engine's sample of that index; usage
sums the choices; a stream interleaves the choices' chunks, each carrying its index, closes each choice with its
finish reason, and ends with one [DONE]; n = 17 is refused naming n; a stream dropped mid-way frees all its
sequences. In process: the timeout cancels the whole job; a sample that fails fails the job and stops its siblings;
a job of more samples than the batch holds is answered; the one-at-a-time worker's events.
"""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import openai
import pytest

import paradec
from conftest import run_scheduler, until
from paradec.decode import Decoding
from paradec.server.batching import BatchWorker
from paradec.server.worker import ChoiceDone, Done, EngineWorker, Failed, Job, JobTimeout, Piece
from paradec.zoo import code_model_dir

NAME = "code"
PROMPT = "def fibonacci(n):\n"
SERVE = ["--model", str(code_model_dir()), "--runner", "native", "--dtype", "float32", "--served-model-name", NAME]
HOT = {"temperature": 0.8, "seed": 5}


@pytest.fixture(scope="module")
def engine():
    return paradec.load(code_model_dir(), runner="native", dtype="float32")


@pytest.fixture(scope="module")
def server(serve_process):
    proc = serve_process([*SERVE, "--max-batch", "8", "--speculate", "always"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def expected(engine, prompt, n, method="vanilla", max_new_tokens=24, **sampling):
    """The engine's n samples (speculation on, as the server runs it: a sampled multisample sample depends on the
    steps that speculated)."""
    return engine.generate(
        prompt, method=method, n=n, max_new_tokens=max_new_tokens, sampling=sampling or None, speculate="always"
    )


def sse(url: str, path: str, body: dict) -> list:
    """The `data:` payloads of a stream, [DONE] included (as the string)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        return [
            line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
            for line in reply.iter_lines()
            if line.startswith("data: ")
        ]


# --- a batched server ---------------------------------------------------------------------------------------------
def test_n_choices_each_with_its_index_finish_reason_and_sample(client, engine):
    want = expected(engine, PROMPT, 3, **HOT)
    reply = client.completions.create(model=NAME, prompt=PROMPT, n=3, max_tokens=24, **HOT)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [r.text for r in want]
    assert [c.finish_reason for c in reply.choices] == [r.finish_reason for r in want]
    assert len({c.text for c in reply.choices}) > 1  # sample i is seeded seed + i
    tokens = sum(len(r.token_ids) for r in want)
    prompt_tokens = len(engine.encode(PROMPT))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, tokens)
    assert reply.usage.total_tokens == prompt_tokens + tokens
    stats = reply.model_extra["paradec"]
    assert stats["method"] == "vanilla" and stats["new_tokens"] == tokens and stats["steps"] == tokens


def test_greedy_choices_are_n_equal_answers(client, engine):
    alone = engine.generate(PROMPT, method="multisample", max_new_tokens=32)
    reply = client.completions.create(
        model=NAME, prompt=PROMPT, n=3, max_tokens=32, temperature=0, extra_body={"method": "multisample"}
    )
    assert [c.text for c in reply.choices] == [alone.text] * 3
    assert reply.usage.completion_tokens == 3 * len(alone.token_ids)
    assert reply.model_extra["paradec"]["method"] == "multisample"
    # a method that does not batch runs its samples one after another, alone between batches
    alone = engine.generate(PROMPT, method="layerskip", max_new_tokens=16)
    reply = client.completions.create(
        model=NAME, prompt=PROMPT, n=2, max_tokens=16, temperature=0, extra_body={"method": "layerskip"}
    )
    assert [(c.index, c.text) for c in reply.choices] == [(0, alone.text), (1, alone.text)]


def test_a_stream_interleaves_the_choices_and_ends_once(server, engine):
    want = expected(engine, PROMPT, 3, method="multisample", max_new_tokens=32, **HOT)
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 32, "method": "multisample", "stream": True, **HOT}
    events = sse(server.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == sum(len(r.token_ids) for r in want)
    assert all(len(chunk["choices"]) == 1 for chunk in chunks)
    indices = [chunk["choices"][0]["index"] for chunk in chunks]
    assert set(indices) == {0, 1, 2} and indices != sorted(indices)  # interleaved, not one choice after another
    for i, result in enumerate(want):
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == result.text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [result.finish_reason]
        assert mine[-1]["finish_reason"] == result.finish_reason  # a choice's last chunk closes it
    assert chunks[-1]["paradec"]["new_tokens"] == sum(len(r.token_ids) for r in want)  # the last closing chunk
    streamed = client_stream_texts(server, body)
    assert streamed == [r.text for r in want]


def client_stream_texts(server, body: dict) -> list[str]:
    """The choices' texts of a stream read with the `openai` client."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    extra = {"method": body["method"]}
    texts = [""] * body["n"]
    for chunk in client.completions.create(
        model=NAME,
        prompt=body["prompt"],
        n=body["n"],
        max_tokens=body["max_tokens"],
        temperature=body["temperature"],
        seed=body["seed"],
        stream=True,
        extra_body=extra,
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    return texts


def test_n_out_of_range_is_refused_naming_n(client):
    for n in (17, 0):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=NAME, prompt=PROMPT, n=n, max_tokens=4)
        assert info.value.status_code == 400 and info.value.body["param"] == "n"
        assert f"n must be an integer in [1, 16], got {n}" in info.value.body["message"]
    assert client.completions.create(model=NAME, prompt=PROMPT, n=16, max_tokens=2).choices[-1].index == 15


def test_a_dropped_stream_frees_all_its_sequences(server):
    body = {"prompt": PROMPT, "n": 4, "max_tokens": 900, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as reply:
        pieces = 0
        for line in reply.iter_lines():
            pieces += line.startswith("data: ")
            if pieces >= 8:
                break  # leaving the `with` closes the connection mid-stream
    server.wait_until(
        lambda m: m.sum("paradec_generations_total", outcome="disconnect") >= 1 and m.sum("paradec_running") == 0,
        "the dropped job's end",
    )
    reply = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200 and len(reply.json()["choices"]) == 4


# --- one at a time --------------------------------------------------------------------------------------------------
def test_chat_choices_one_after_another(serve_process, chat_llama_dir):
    engine = paradec.load(chat_llama_dir, runner="native")
    proc = serve_process(["--model", str(chat_llama_dir), "--runner", "native", "--max-batch", "1"])
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "def stack():"}]
        want = engine.generate(messages=messages, n=2, max_new_tokens=12, sampling={"temperature": 1.0, "seed": 9})
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=messages, n=2, max_tokens=12, temperature=1.0, seed=9
        )
        assert [(c.index, c.message.content, c.finish_reason) for c in reply.choices] == [
            (i, r.text, r.finish_reason) for i, r in enumerate(want)
        ]
        assert reply.usage.completion_tokens == sum(len(r.token_ids) for r in want)
        body = {"messages": messages, "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 9, "stream": True}
        events = sse(proc.url, "/v1/chat/completions", body)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [chunk["choices"][0] for chunk in events[:-1]]
        assert [c["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2  # each choice opens
        assert [c["index"] for c in chunks[:2]] == [0, 1]
        indices = [c["index"] for c in chunks[2:]]
        assert indices == sorted(indices)  # one sample after another
        for i, result in enumerate(want):
            mine = [c for c in chunks[2:] if c["index"] == i]
            assert "".join(c["delta"].get("content", "") for c in mine) == result.text
            assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [result.finish_reason]
    finally:
        proc.stop()


# --- the schedulers in process --------------------------------------------------------------------------------------
async def drain(handle) -> tuple[list[Piece | ChoiceDone], Done | Failed]:
    events = []
    while isinstance(event := await handle.next(), (Piece, ChoiceDone)):
        events.append(event)
    return events, event


def samples_job(engine, prompt: str, n: int, max_new_tokens: int, timeout: float = 120.0, **sampling) -> Job:
    request = engine.request(prompt, n=n, max_new_tokens=max_new_tokens, sampling=sampling or None)
    samples = functools.partial(engine.samples, request)
    return Job(
        functools.partial(engine.stream, request.samples()[0]), "vanilla", timeout, request=request, samples=samples
    )


def run_batch_worker(engine, test, max_batch: int = 4) -> list:
    reports = []
    worker = BatchWorker(engine.batch_decoder(max_batch, speculate="always"), max_queue=4, on_report=reports.append)
    run_scheduler(worker, test)
    return reports


def test_the_timeout_cancels_the_whole_job(engine):
    async def test(worker):
        handle = worker.submit(samples_job(engine, PROMPT, 3, 900, timeout=0.3, temperature=0.8))
        _, failed = await drain(handle)
        assert isinstance(failed, Failed) and isinstance(failed.error, JobTimeout)
        await until(lambda: worker.running == 0, "the job left")
        assert worker.decoder.runner.free == worker.decoder.runner.slots  # its three sequences are gone

    reports = run_batch_worker(engine, test)
    assert [r.outcome for r in reports] == ["timeout"] and reports[0].new_tokens > 0


def test_a_failing_sample_fails_the_job_and_stops_its_siblings(engine, monkeypatch):
    real = Decoding.prefilled

    def prefilled(self, count, hidden):  # (where a batch's prefill fails per sequence: its drafter begins)
        if self.state.sampling.seed == 21:  # sample 1 of seed 20
            raise RuntimeError("device lost")
        return real(self, count, hidden)

    monkeypatch.setattr(Decoding, "prefilled", prefilled)

    async def test(worker):
        handle = worker.submit(samples_job(engine, PROMPT, 3, 900, temperature=0.8, seed=20))
        _, failed = await drain(handle)
        assert isinstance(failed, Failed) and "device lost" in str(failed.error)
        await until(lambda: worker.running == 0, "the job left")
        assert worker.decoder.runner.free == worker.decoder.runner.slots

    reports = run_batch_worker(engine, test)
    assert [r.outcome for r in reports] == ["error"]


def test_more_samples_than_the_batch_holds(engine):
    want = expected(engine, PROMPT, 5, max_new_tokens=12, **HOT)

    async def test(worker):
        first = worker.submit(samples_job(engine, PROMPT, 5, 12, **HOT))
        second = worker.submit(samples_job(engine, "x", 1, 6))
        events, done = await drain(first)
        assert isinstance(done, Done) and [r.token_ids for r in done.choices] == [r.token_ids for r in want]
        for i, result in enumerate(want):
            assert "".join(e.text for e in events if isinstance(e, Piece) and e.index == i) == result.text
        ended = [e.index for e in events if isinstance(e, ChoiceDone)]
        assert len(ended) == len(set(ended)) <= 4  # the last ones end with the Done
        assert done.job_stats.new_tokens == sum(len(r.token_ids) for r in want)
        _, done = await drain(second)
        assert isinstance(done, Done) and len(done.choices) == 1

    reports = run_batch_worker(engine, test, max_batch=2)
    assert len(reports) == 2 and reports[0].new_tokens == sum(len(r.token_ids) for r in want)


def test_the_one_at_a_time_worker_runs_the_samples_in_turn(engine):
    want = expected(engine, PROMPT, 3, max_new_tokens=8, **HOT)
    reports = []
    worker = EngineWorker(max_queue=2, on_report=reports.append)
    worker.start()

    async def test():
        try:
            events, done = await drain(worker.submit(samples_job(engine, PROMPT, 3, 8, **HOT)))
        finally:
            await asyncio.to_thread(worker.stop)
        order = [e.index for e in events if isinstance(e, Piece)]
        assert order == sorted(order) and set(order) == {0, 1, 2}
        assert [(e.index, e.result.text) for e in events if isinstance(e, ChoiceDone)] == [
            (0, want[0].text),
            (1, want[1].text),
        ]
        assert [r.text for r in done.choices] == [r.text for r in want] and done.result is done.choices[0]

    asyncio.run(test())
    assert len(reports) == 1 and reports[0].new_tokens == sum(len(r.token_ids) for r in want)
    assert reports[0].stats.steps == sum(r.stats.steps for r in want)
