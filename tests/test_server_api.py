"""`paradec serve` as a real process on 127.0.0.1, with real clients (the `openai` package and httpx): answers
equal offline `engine.generate`, streaming, usage and stats, metrics, bad requests (each a 4xx in OpenAI's error
shape, the server serving a good request afterwards), and a load of 200 requests from 16 concurrent clients."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import openai
import pytest

import paradec

API_KEY = "sk-paradec-test"
NAME = "tiny"
PROMPT = "def fibonacci(n):\n"
SERVER_OPTIONS = {"num_draft_tokens": 4}  # the server's --opt for its --method pld
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def stack():"}]


@pytest.fixture(scope="module")
def server(chat_llama_dir, model_dirs, serve_process):
    args = ["--model", str(chat_llama_dir), "--draft", str(model_dirs["llama-draft"]), "--runner", "hf"]
    args += ["--served-model-name", NAME, "--api-key", API_KEY, "--method", "pld", "--opt", "num_draft_tokens=4"]
    assert SERVER_OPTIONS == {"num_draft_tokens": 4}
    proc = serve_process(args)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def engine(chat_llama_dir, model_dirs):
    return paradec.load(chat_llama_dir, model_dirs["llama-draft"], device="cpu", runner="hf")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


# --- answers equal offline generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vanilla", "pld", "draft"])
def test_completion_equals_offline_generate(client, engine, method):
    offline = engine.generate(PROMPT, method=method, max_new_tokens=24)
    reply = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"method": method}
    )
    assert reply.choices[0].text == offline.text
    assert reply.choices[0].finish_reason == offline.finish_reason
    assert reply.usage.completion_tokens == len(offline.token_ids)
    assert reply.usage.prompt_tokens == len(engine.encode(PROMPT))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stats = reply.model_extra["paradec"]
    assert stats["method"] == method and stats["new_tokens"] == len(offline.token_ids)
    assert stats["tau"] == pytest.approx(stats["new_tokens"] / stats["steps"])
    if method == "draft":
        assert stats["proposed_tokens"] > 0 and len(stats["acceptance_by_position"]) >= 1


def test_streamed_completion_equals_offline_generate(client, engine):
    offline = engine.generate(PROMPT, method="draft", max_new_tokens=32)
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"method": "draft", "method_options": {"k": 3}},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2 and "".join(texts) == offline.text
    closing, usage = chunks[-2], chunks[-1]
    assert closing.choices[0].finish_reason == offline.finish_reason
    assert closing.model_extra["paradec"]["method"] == "draft"
    assert usage.choices == [] and usage.usage.completion_tokens == len(offline.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_offline_generate(client, engine):
    offline = engine.generate(engine.encode_chat(MESSAGES), method="pld", max_new_tokens=20)
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == offline.text
    assert reply.usage.prompt_tokens == len(engine.encode_chat(MESSAGES))
    assert reply.model_extra["paradec"]["method"] == "pld"  # the server's --method

    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_completion_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline.text
    assert chunks[-1].choices[0].finish_reason == offline.finish_reason


def test_chat_prompt_is_encode_chat_of_the_messages(client, engine):
    """The server's prompt ids are `engine.encode_chat` of the messages, a developer message read as a system one."""
    messages = [
        {"role": "developer", "content": "Answer in Python.", "name": "lead"},
        {"role": "user", "content": "class Stack:"},
        {"role": "assistant", "content": "    def push(self, item):"},
        {"role": "user", "content": "def pop(self):"},
    ]
    as_system = [{**messages[0], "role": "system"}, *messages[1:]]
    ids = engine.encode_chat(as_system)
    assert engine.tokenizer.decode(ids).startswith("<|system|>Answer in Python.\n<|user|>class Stack:")
    offline = engine.generate(ids, method="pld", max_new_tokens=12)
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == offline.text


def test_sampling_parameters_and_stop_are_honoured(client, engine):
    sampling = {"temperature": 0.9, "top_p": 0.8, "seed": 11}
    # sampled tokens depend on the proposals (not their distribution): use the server's --method and --opt
    offline = engine.generate(PROMPT, method="pld", options=SERVER_OPTIONS, max_new_tokens=24, sampling=sampling)
    reply = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, **sampling)
    assert reply.choices[0].text == offline.text

    greedy = engine.generate(PROMPT, max_new_tokens=24).text
    stop = greedy[6:9]
    expected = engine.generate(PROMPT, max_new_tokens=24, stop=stop)
    reply = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == expected.text == greedy[: greedy.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_token_id_prompt(client, engine):
    ids = engine.encode(PROMPT)
    reply = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert reply.choices[0].text == engine.generate(ids, max_new_tokens=8).text


def test_models_and_health(client, http, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "paradec"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(f"{server.url}/health", timeout=30)  # no API key needed
    assert health.status_code == 200 and health.json()["model"] == NAME


def test_metrics(client, server):
    before = server.metrics()
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"method": "draft"})
    after = server.metrics()

    def grew(name: str, **labels: str) -> float:
        return after.sum(name, **labels) - before.sum(name, **labels)

    assert grew("paradec_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("paradec_generations_total", method="draft", outcome="length") == 1
    assert grew("paradec_generation_tokens_total", method="draft") == 16
    steps = grew("paradec_steps_total", method="draft")
    assert 1 <= steps <= 16
    assert 1 <= grew("paradec_draft_position_proposed_total", method="draft", position="1") <= steps
    proposed = grew("paradec_draft_tokens_proposed_total", method="draft")
    assert grew("paradec_draft_position_proposed_total", method="draft") == proposed  # a chain: one token a position
    accepted = grew("paradec_draft_tokens_accepted_total", method="draft")
    assert grew("paradec_draft_position_accepted_total", method="draft") == accepted
    assert grew("paradec_tau_count", method="draft") == 1
    assert grew("paradec_tau_sum", method="draft") == pytest.approx(16 / steps)
    for histogram in ("request_latency_seconds", "time_to_first_token_seconds", "queue_wait_seconds"):
        assert grew(f"paradec_{histogram}_count", method="draft") == 1
    assert after.sum("paradec_queue_depth") == 0


# --- bad requests ---------------------------------------------------------------------------------------------------

GOOD = {"model": NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 60


def completion(**changes):
    body = {**GOOD, **changes}
    return {key: value for key, value in body.items() if value is not ...}


C, CHAT = "/v1/completions", "/v1/chat/completions"
JSON_TYPE = {"Content-Type": "application/json"}
# (path, body (None: GET), headers, status, message fragment, param)
BAD_REQUESTS = {
    "malformed JSON": (C, b'{"prompt": "x",', {}, 400, "not valid JSON", None),
    "body not an object": (C, [1, 2], {}, 422, "must be a JSON object", None),
    "missing prompt": (C, completion(prompt=...), {}, 422, "missing required field 'prompt'", "prompt"),
    "ill-typed prompt": (C, completion(prompt=12), {}, 422, "invalid 'prompt'", "prompt"),
    "ill-typed max_tokens": (C, completion(max_tokens="5"), {}, 422, "valid integer", "max_tokens"),
    "unknown field": (C, completion(colour=1), {}, 422, "unrecognized request argument", "colour"),
    "max_tokens 0": (C, completion(max_tokens=0), {}, 400, "must be an integer >= 1, got 0", "max_tokens"),
    "max_tokens -3": (C, completion(max_tokens=-3), {}, 400, "got -3", "max_tokens"),
    "max_tokens too large": (C, completion(max_tokens=10**6), {}, 400, "exceeds the model's context", "max_tokens"),
    "prompt over the context": (C, completion(prompt=LONG_PROMPT), {}, 400, "the model's context is 256", "prompt"),
    "empty prompt": (C, completion(prompt=""), {}, 400, "prompt is empty", "prompt"),
    "token id out of vocabulary": (C, completion(prompt=[5, 100000]), {}, 400, "outside the vocabulary", "prompt"),
    "two prompts": (C, completion(prompt=["a", "b"]), {}, 400, "one prompt per request", "prompt"),
    "unknown model": (C, completion(model="gpt-4"), {}, 404, "model 'gpt-4' does not exist", "model"),
    "unknown method": (C, completion(method="telepathy"), {}, 400, "unknown method 'telepathy'", "method"),
    "unknown method option": (
        C,
        completion(method="pld", method_options={"k": 2}),
        {},
        400,
        "unknown option 'k'",
        "method_options",
    ),
    "n > 16": (C, completion(n=17), {}, 400, "n must be an integer in [1, 16], got 17", "n"),
    "negative temperature": (C, completion(temperature=-0.5), {}, 400, "temperature must be >= 0", "temperature"),
    "top_p above 1": (C, completion(top_p=1.5), {}, 400, "top_p must lie in (0, 1]", "top_p"),
    "top_p 0": (C, completion(top_p=0), {}, 400, "top_p must lie in (0, 1]", "top_p"),
    "empty stop string": (C, completion(stop=""), {}, 400, "stop strings must be non-empty strings", "stop"),
    "logprobs": (C, completion(logprobs=3), {}, 400, "logprobs is not supported", "logprobs"),
    "wrong content type": (C, "prompt=x", {"Content-Type": "text/plain"}, 415, "application/json", None),
    "oversized body": (C, completion(prompt="x" * (1 << 20)), {}, 413, "exceeds 1048576 bytes", None),
    "bad API key": (C, completion(), {"Authorization": "Bearer sk-wrong"}, 401, "invalid or missing API key", None),
    "no API key": ("/v1/models", None, {"Authorization": ""}, 401, "invalid or missing API key", None),
    "messages not a list": (CHAT, {"messages": "hi"}, {}, 422, "invalid 'messages'", "messages"),
    "empty messages": (CHAT, {"messages": []}, {}, 400, "messages must not be empty", "messages"),
    "unknown role": (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, {}, 422, "role", "messages.0.role"),
    "no such endpoint": ("/v1/engines", {}, {}, 404, "no such endpoint: POST /v1/engines", None),
    "wrong HTTP method": (CHAT, None, {}, 405, "GET is not allowed", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_and_the_server_goes_on(http, case):
    path, body, headers, status, message, param = BAD_REQUESTS[case]
    headers = {**JSON_TYPE, **headers}
    if body is None:
        reply = http.get(path, headers=headers)
    else:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        reply = http.post(path, content=content, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["param"] == param and error["type"]

    good = http.post("/v1/completions", json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"


def test_openai_client_errors(server):
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.completions.create(model=NAME, prompt=PROMPT, max_tokens=2)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.UnprocessableEntityError, match="unrecognized request argument supplied: tools"):
        client.chat.completions.create(
            model=NAME, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]
        )


# --- load -----------------------------------------------------------------------------------------------------------

REQUESTS, CLIENTS, LOAD_TOKENS = 200, 16, 8
LOAD_PROMPTS = [f"def function_{i}(value):\n    return" for i in range(20)]


async def load_request(client: openai.AsyncOpenAI, i: int) -> str:
    """Request i: prompt i % 20, method i % 3, every 4th a streamed chat, the other odd ones streamed completions."""
    prompt = LOAD_PROMPTS[i % len(LOAD_PROMPTS)]
    common = {"model": NAME, "max_tokens": LOAD_TOKENS, "temperature": 0}
    common["extra_body"] = {"method": ("pld", "vanilla", "draft")[i % 3]}
    if i % 4 == 0:
        messages = [{"role": "user", "content": prompt}]
        stream = await client.chat.completions.create(messages=messages, stream=True, **common)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    if i % 2:
        stream = await client.completions.create(prompt=prompt, stream=True, **common)
        return "".join([chunk.choices[0].text async for chunk in stream])
    return (await client.completions.create(prompt=prompt, **common)).choices[0].text


def test_load_200_requests_from_16_concurrent_clients(server, engine):
    def offline(prompt: str, chat: bool) -> str:
        ids = engine.encode_chat([{"role": "user", "content": prompt}]) if chat else engine.encode(prompt)
        return engine.generate(ids, max_new_tokens=LOAD_TOKENS).text  # greedy: the same for every method

    expected = {(p, chat): offline(p, chat) for p in LOAD_PROMPTS for chat in (False, True)}
    before = server.metrics()
    answers: dict[int, str] = {}
    latencies: list[float] = []
    errors: list[str] = []
    todo = iter(range(REQUESTS))

    async def client_loop() -> None:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
            for i in todo:  # the clients share one iterator: each request is sent once
                started = time.perf_counter()
                try:
                    answers[i] = await load_request(c, i)
                except openai.APIError as exc:
                    errors.append(f"request {i}: {exc}")
                latencies.append(time.perf_counter() - started)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(CLIENTS))), timeout=240)

    asyncio.run(run())
    assert errors == []
    assert sorted(answers) == list(range(REQUESTS))
    for i, answer in answers.items():
        assert answer == expected[LOAD_PROMPTS[i % len(LOAD_PROMPTS)], i % 4 == 0], f"request {i}: wrong answer"
    after = server.metrics()
    assert after.sum("paradec_generations_total") - before.sum("paradec_generations_total") == REQUESTS
    p50, p95 = statistics.median(latencies), statistics.quantiles(latencies, n=20)[18]
    print(
        f"\nload: {REQUESTS} requests, {CLIENTS} concurrent clients, {len(errors)} errors, "
        f"latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
    )
