"""`paradec serve --max-queue 1` as a real process: a client that disconnects mid-generation frees the engine for
the next request, a full queue answers 503 with Retry-After, and a model without a chat template refuses chat.

The target is a tiny llama with its attention output zeroed and an 8k context: its next token depends on the
current token only, so we can pick a prompt whose greedy continuation never reaches EOS and shows text at every
token; an 8000-token generation then keeps the engine busy until the test disconnects."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import paradec

LONG = 8000  # tokens of the generation that the tests interrupt


@pytest.fixture(scope="module")
def engine(long_loop_dir):
    return paradec.load(long_loop_dir, device="cpu", runner="hf")


@pytest.fixture(scope="module")
def server(long_loop_dir, serve_process):
    args = ["--model", str(long_loop_dir), "--runner", "hf", "--max-queue", "1", "--served-model-name", "long"]
    proc = serve_process(args)
    yield proc
    proc.stop()


def test_disconnect_mid_stream_frees_the_worker_and_a_full_queue_answers_503(server, engine, endless_token):
    short = {"prompt": [endless_token], "max_tokens": 4, "temperature": 0}
    expected = engine.generate([endless_token], max_new_tokens=4).text
    before = server.metrics()
    with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        endless = {**short, "max_tokens": LONG, "stream": True}
        with http.stream("POST", "/v1/completions", json=endless) as stream:
            lines = stream.iter_lines()  # kept referenced: dropping it early would close the connection
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
            waiting = pool.submit(httpx.post, f"{server.url}/v1/completions", json=short, timeout=60)
            server.wait_for(running=1, queue_depth=1)
            full = http.post("/v1/completions", json=short)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
        # leaving the `with` closed the connection mid-stream: the worker drops that generation, runs the next one
        answer = waiting.result(timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == expected

    after = server.metrics()
    assert (
        after.sum("paradec_generations_total", outcome="disconnect")
        - before.sum("paradec_generations_total", outcome="disconnect")
        == 1
    )
    generated = after.sum("paradec_generation_tokens_total") - before.sum("paradec_generation_tokens_total")
    assert 4 < generated < LONG  # the disconnected generation stopped early

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = client.completions.create(model="long", prompt=[endless_token], max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_disconnect_during_a_plain_request_cancels_it(server, engine, endless_token):
    before = server.metrics()
    body = json.dumps({"prompt": [endless_token], "max_tokens": LONG, "temperature": 0}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            server.wait_for(running=1)
        server.wait_for(running=0)
        reply = http.post("/v1/completions", json={"prompt": [endless_token], "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200
    after = server.metrics()
    assert (
        after.sum("paradec_generations_total", outcome="disconnect")
        - before.sum("paradec_generations_total", outcome="disconnect")
        == 1
    )
    assert after.sum("paradec_generation_tokens_total") - before.sum("paradec_generation_tokens_total") < LONG


def test_requests_this_model_cannot_serve_are_400(server):
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "no_chat_template"
    assert "has no chat template: use /v1/completions" in reply.json()["error"]["message"]
    # found by the engine on the worker's thread, before the generation starts: still a 400
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "method": "draft"})
    assert reply.status_code == 400 and "method 'draft' needs a draft model" in reply.json()["error"]["message"]
