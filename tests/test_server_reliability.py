"""Issue 15's table, row by row, against real `paradec serve` processes on 127.0.0.1: what a careless or hostile
client may send, and what must happen.

    rows 1, 2, 12  method options: bounded, engine settings refused per request, booleans are not integers -> 400
    row 3          layerskip with many layer subsets -> answered at once (hf runner: refused; the cache bound is
                   tests/test_layerskip.py's)
    row 4          seeds outside [-2**63, 2**64) -> 400 naming the range
    row 5          a positive temperature below 1e-5 -> greedy
    row 6          SIGTERM with a stream running and a request waiting -> drain, 503 JSON, [DONE], exit 0
    row 7          silent, dripping and stalling clients -> 408 or closed, others served; a connection cap -> 503
    row 8          oversized prompts -> refused by their bytes before tokenization; a small request is not delayed
    row 9          stop strings -> at most 4, of at most 256 characters
    row 10         error messages -> a user value echoed in at most ~200 characters; a 500 names only a request id
    row 11         /health -> status and model name only; /docs, /redoc, /openapi.json off unless --docs
    row 13         metrics -> 499 for a client that went away, a stream's failure under its error's status

The servers run a tiny random-weight llama on CPU with short deadlines (1 s for headers and for bodies). Every
socket operation has a timeout; each server is stopped by its fixture or by the test that signals it. What needs a
fault no real server shows (a 500, a stream that breaks) or a setting (`docs`) runs the app in this process, under
starlette's TestClient.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from paradec.heads import EagleConfig, EagleHead, MedusaConfig, MedusaHeads, save_heads
from paradec.server.app import CUT_GRACE, ServerConfig, create_app

NAME = "tiny"
HEADER_TIMEOUT = BODY_TIMEOUT = 1.0  # seconds
MAX_CONNECTIONS = 32
SOCKET_TIMEOUT = 5.0  # every raw socket operation; well above the server's deadlines
GOOD = {"model": NAME, "prompt": "def fibonacci(n):\n", "max_tokens": 4, "temperature": 0}
C = "/v1/completions"


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, vocab_size):
    """Random EAGLE and Medusa heads for the tiny llama (hidden size 64): the eagle and medusa methods run."""
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    save_heads(EagleHead(EagleConfig.for_target(64, vocab_size)), root / "eagle")
    save_heads(MedusaHeads(MedusaConfig(64, vocab_size, num_heads=3)), root / "medusa")
    return root


@pytest.fixture(scope="module")
def server(chat_llama_dir, model_dirs, heads_dir, serve_process):
    args = ["--model", str(chat_llama_dir), "--draft", str(model_dirs["llama-draft"]), "--heads", str(heads_dir)]
    args += ["--runner", "hf", "--device", "cpu", "--served-model-name", NAME, "--max-queue", "4", "--timeout", "30"]
    args += ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    args += ["--max-connections", str(MAX_CONNECTIONS)]
    proc = serve_process(args)
    yield proc
    proc.stop()


def post(server, body: dict, path: str = C, timeout: float = 30.0) -> httpx.Response:
    """One request on a connection of its own (closed after: no pooled connection counts against the cap)."""
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)


def error_of(reply: httpx.Response, status: int) -> dict:
    """The error of an answer that must be `status` in OpenAI's error shape."""
    assert reply.status_code == status, reply.text[:500]
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def connect(server) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=SOCKET_TIMEOUT)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or SOCKET_TIMEOUT passes without a byte)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response: its head and its Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"closed after {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail(f"closed after {data!r}")
    return head + b"\r\n\r\n" + body


# --- rows 1, 2, 12: method options (the engine's checks, answered by the server) -----------------------------------

OPTION_PROBES = {
    "pld max_ngram=1e9": ("pld", {"max_ngram": 10**9}, "max_ngram"),
    "eagle topk=8192": ("eagle", {"topk": 8192}, "topk"),
    "lookahead window=10000": ("lookahead", {"window": 10000}, "window"),
    "eagle depth=300": ("eagle", {"depth": 300}, "depth"),
    "draft k=1e6 adaptive": ("draft", {"k": 10**6, "adaptive": True}, "k"),
    "eagle compile per request (row 2)": ("eagle", {"compile": True}, "compile"),
    "medusa nodes=true (row 12)": ("medusa", {"nodes": True}, "nodes"),
}


@pytest.mark.parametrize("case", list(OPTION_PROBES))
def test_out_of_bounds_method_options_are_400_naming_the_option(server, case):
    method, options, name = OPTION_PROBES[case]
    started = time.monotonic()
    reply = post(server, {**GOOD, "method": method, "method_options": options})
    error = error_of(reply, 400)
    assert error["param"] == "method_options" and name in error["message"]
    assert time.monotonic() - started < 10


def test_the_methods_probed_run_with_their_default_options(server):
    """The probes above are refused for their values, not because the method cannot run here."""
    for method in ("pld", "eagle", "lookahead", "draft", "medusa"):
        reply = post(server, {**GOOD, "method": method})
        assert reply.status_code == 200, reply.text


# --- row 3: layerskip with many layer subsets ------------------------------------------------------------------------


def test_layerskip_with_many_layer_subsets_is_answered_in_bounded_time(server):
    """On this server's hf runner the method is refused whatever the subset (the bound on the per-subset caches of
    the native runner is tests/test_layerskip.py's); the server goes on."""
    for layers in ([0], [1], [0, 1], [1, 0], [0, 0], [5]):
        started = time.monotonic()
        reply = post(server, {**GOOD, "method": "layerskip", "method_options": {"layers": layers}})
        error = error_of(reply, 400)
        assert error["param"] in ("method", "method_options") and time.monotonic() - started < 10
    assert post(server, GOOD).status_code == 200


# --- row 4: seeds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_out_of_range_is_400_naming_the_range(server, seed):
    error = error_of(post(server, {**GOOD, "temperature": 1.0, "seed": seed}), 400)
    assert error["param"] == "seed" and "2**64" in error["message"]


def test_seeds_at_the_ends_of_the_range_work(server):
    for seed in (2**64 - 1, -(2**63)):
        assert post(server, {**GOOD, "temperature": 1.0, "seed": seed}).status_code == 200


# --- row 5: tiny temperatures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-38, 1e-6])
def test_a_temperature_below_the_epsilon_is_greedy(server, temperature):
    greedy = post(server, {**GOOD, "max_tokens": 12}).json()["choices"][0]["text"]
    reply = post(server, {**GOOD, "max_tokens": 12, "temperature": temperature})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == greedy != ""


# --- row 7: slow clients ---------------------------------------------------------------------------------------------


def test_slow_clients_get_408_or_are_closed_and_others_are_served(server):
    opened = time.monotonic()
    silent = connect(server)  # sends nothing at all
    dripping = connect(server)
    dripping.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    stalled = connect(server)  # whole headers, a tenth of the body
    stalled.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"prompt":'
    )
    with silent, dripping, stalled:
        reply = post(server, GOOD)  # while all three hold their connections
        assert reply.status_code == 200
        served_after = time.monotonic() - opened
        assert served_after < HEADER_TIMEOUT  # it did not wait for any of their deadlines

        dripping.settimeout(0.1)  # one byte of a header every 0.1 s (the wait for an answer), until it comes
        answer = b""
        for byte in b"X-Slow: " + b"a" * 200:
            try:
                dripping.sendall(bytes([byte]))
                answer = dripping.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # closed, and a byte sent after the close was answered with a reset
                pass
            break
        dripping.settimeout(SOCKET_TIMEOUT)
        answer += read_to_end(dripping)
        dripped_for = time.monotonic() - opened
        # a 408, unless the reset of a byte sent after it overtook it
        assert answer == b"" or (answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer)

        answer = read_to_end(stalled)
        stalled_for = time.monotonic() - opened
        assert answer.startswith(b"HTTP/1.1 408 ") and b"the request body did not arrive within 1 s" in answer

        assert read_to_end(silent) == b""  # closed without a word: it never began a request
        silent_for = time.monotonic() - opened
    for seconds in (dripped_for, stalled_for, silent_for):
        assert HEADER_TIMEOUT <= seconds < SOCKET_TIMEOUT
    print(
        f"\nslow clients: a request served after {served_after:.2f} s; dripping headers "
        f"{'answered 408' if answer else 'closed'} after {dripped_for:.2f} s, stalled body 408 after "
        f"{stalled_for:.2f} s, silent connection closed after {silent_for:.2f} s"
    )
    assert post(server, GOOD).status_code == 200


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(server):
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        reply = post(server, GOOD)
        error = error_of(reply, 503)
        assert error["code"] == "too_many_connections" and reply.headers["retry-after"] == "1"
    finally:
        for sock in idle:
            sock.close()
    statuses = []
    while len(statuses) < 200 and 200 not in statuses:  # until the server has seen the idle connections close
        statuses.append(post(server, GOOD).status_code)
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}


# --- row 8: oversized prompts ----------------------------------------------------------------------------------------


def test_oversized_prompts_are_refused_by_their_bytes_and_do_not_delay_a_small_request(server):
    big = "def f(x):\n    return x\n" * 30_000  # 690 kB: under the 1 MiB body limit, far over 256 tokens
    with ThreadPoolExecutor(12) as pool:
        oversized = [pool.submit(post, server, {**GOOD, "prompt": big}) for _ in range(12)]
        started = time.monotonic()
        small = post(server, GOOD)
        small_seconds = time.monotonic() - started
        replies = [future.result(timeout=60) for future in oversized]
    assert small.status_code == 200
    for reply in replies:
        error = error_of(reply, 400)
        assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
        assert "bytes, more than the model's context of 256 tokens can hold" in error["message"]
    messages = [{"role": "user", "content": big}]
    error = error_of(post(server, {"model": NAME, "messages": messages}, "/v1/chat/completions"), 400)
    assert error["param"] == "messages" and "bytes" in error["message"]
    print(f"\n12 oversized prompts in flight: a small request answered in {small_seconds * 1000:.0f} ms")
    assert small_seconds < 5


# --- row 9: stop strings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["a", "b", "c", "d", "e"], "at most 4 stop strings"),
        (["x" * 257], "at most 256 characters"),
        ([f"s{i}" for i in range(20_000)], "at most 4 stop strings"),
    ],
    ids=["5 strings", "257 characters", "20000 strings"],
)
def test_too_many_or_too_long_stop_strings_are_400(server, stop, message):
    started = time.monotonic()
    error = error_of(post(server, {**GOOD, "stop": stop}), 400)
    assert error["param"] == "stop" and message in error["message"]
    assert time.monotonic() - started < 10


def test_four_stop_strings_of_256_characters_work(server):
    assert post(server, {**GOOD, "stop": ["x" * 256, "y", "z", "w"]}).status_code == 200


# --- row 10: error messages ------------------------------------------------------------------------------------------

LONG = "x" * 10_000
ECHO_PROBES = {
    "model": ({**GOOD, "model": LONG}, 404, "model"),
    "method": ({**GOOD, "method": LONG}, 400, "method"),
    "option name": ({**GOOD, "method": "pld", "method_options": {LONG: 1}}, 400, "method_options"),
    "option value": ({**GOOD, "method": "pld", "method_options": {"max_ngram": LONG}}, 400, "method_options"),
    "stop string": ({**GOOD, "stop": [LONG]}, 400, "stop"),
    "ill-typed prompt": ({**GOOD, "prompt": {"text": LONG}}, 422, "prompt"),
    "ill-typed temperature": ({**GOOD, "temperature": LONG}, 422, "temperature"),
    "unknown field": ({**GOOD, LONG: 1}, 422, None),
}


def longest_echo(message: str) -> int:
    return max((len(run) for run in re.findall("x+", message)), default=0)


@pytest.mark.parametrize("case", list(ECHO_PROBES))
def test_error_messages_echo_at_most_200_characters_of_a_value(server, case):
    body, status, param = ECHO_PROBES[case]
    error = error_of(post(server, body), status)
    assert param is None or error["param"] == param
    assert len(error["message"]) <= 400 and longest_echo(error["message"]) <= 200, error["message"]


def test_long_paths_and_headers_are_not_echoed_either(server):
    reply = httpx.get(f"{server.url}/v1/{LONG}", timeout=30)
    assert longest_echo(error_of(reply, 404)["message"]) <= 200
    reply = httpx.post(f"{server.url}{C}", content=b"{}", headers={"Content-Type": f"text/{LONG}"}, timeout=30)
    assert longest_echo(error_of(reply, 415)["message"]) <= 200


def test_every_answer_has_a_request_id(server):
    ids = {post(server, body).headers["x-request-id"] for body in (GOOD, {**GOOD, "max_tokens": 0})}
    assert len(ids) == 2 and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)


def in_process(engine, **config):
    """The app in this process (starlette's TestClient runs its lifespan: the engine worker starts and stops)."""
    from starlette.testclient import TestClient

    return TestClient(create_app(engine, ServerConfig(model_name=NAME, **config)), raise_server_exceptions=False)


def test_a_failed_generation_is_a_500_naming_only_its_request_id(engines, monkeypatch, caplog):
    engine = engines("llama")

    def broken(request):
        raise RuntimeError("device lost at /home/secret/model")

    monkeypatch.setattr(engine, "stream", broken)
    with in_process(engine) as client:
        reply = client.post(C, json=GOOD)
    error = error_of(reply, 500)
    request_id = reply.headers["x-request-id"]
    assert error["message"] == f"internal error (request id {request_id})" and "secret" not in reply.text
    assert f"generation failed (request {request_id})" in caplog.text and "/home/secret/model" in caplog.text


def test_a_bug_in_a_route_is_a_500_naming_only_its_request_id(engines, monkeypatch, caplog):
    def broken(engine, ask):
        raise KeyError("/home/secret/model")

    monkeypatch.setattr("paradec.server.app.prepare", broken)
    with in_process(engines("llama")) as client:
        reply = client.post(C, json=GOOD)
        error = error_of(reply, 500)
        request_id = reply.headers["x-request-id"]
        assert error["message"] == f"internal error (request id {request_id})" and "secret" not in reply.text
        assert f"request {request_id} failed" in caplog.text and "/home/secret/model" in caplog.text
        samples = client.get("/metrics").text
    assert 'paradec_requests_total{endpoint="/v1/completions",status="500"} 1.0' in samples


# --- row 11: /health and the API docs --------------------------------------------------------------------------------


def test_health_says_only_status_and_model_name_and_docs_are_off(server):
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": NAME}
    for path in ("/docs", "/redoc", "/openapi.json"):
        error_of(httpx.get(f"{server.url}{path}", timeout=30), 404)


def test_docs_are_served_with_the_docs_setting(engines):
    with in_process(engines("llama"), docs=True) as client:
        assert client.get("/openapi.json").json()["info"]["title"] == "paradec"
        assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 200


# --- rows 6 and 13: a model that generates as long as asked ----------------------------------------------------------

ENDLESS = 8000  # tokens: longer than any test waits


def endless(token: int, **changes) -> dict:
    return {"prompt": [token], "max_tokens": ENDLESS, "temperature": 0, **changes}


def data_events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def long_server(long_loop_dir, serve_process):
    """--timeout 2: a stream of ENDLESS tokens times out after it started."""
    args = ["--model", str(long_loop_dir), "--runner", "hf", "--device", "cpu", "--max-queue", "1", "--timeout", "2"]
    proc = serve_process(args)
    yield proc
    proc.stop()


def requests_counted(samples, status: int) -> float:
    return samples.sum("paradec_requests_total", endpoint=C, status=str(status))


def test_a_client_that_disconnects_is_counted_499(long_server, endless_token):
    before = long_server.metrics()
    body = json.dumps(endless(endless_token)).encode()
    with connect(long_server) as raw:  # a plain request, dropped while it runs
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        long_server.wait_for(running=1)
    body = endless(endless_token, stream=True)
    with httpx.stream("POST", f"{long_server.url}{C}", json=body, timeout=30) as stream:  # dropped after a piece
        lines = stream.iter_lines()
        assert data_events(next(lines) for _ in range(2))
    after = long_server.wait_until(lambda s: requests_counted(s, 499) - requests_counted(before, 499) == 2, "2 x 499")
    assert requests_counted(after, 503) == requests_counted(before, 503)
    assert (
        after.sum("paradec_generations_total", outcome="disconnect")
        - before.sum("paradec_generations_total", outcome="disconnect")
        == 2
    )


def test_a_stream_that_fails_after_it_started_is_counted_under_its_error(long_server, endless_token):
    before = long_server.metrics()
    with httpx.stream("POST", f"{long_server.url}{C}", json=endless(endless_token, stream=True), timeout=30) as stream:
        assert stream.status_code == 200
        events = data_events(stream.iter_lines())
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    assert json.loads(events[0])["choices"][0]["text"]  # it had started
    after = long_server.wait_until(lambda s: requests_counted(s, 504) > requests_counted(before, 504), "a 504")
    assert requests_counted(after, 504) - requests_counted(before, 504) == 1
    assert requests_counted(after, 200) == requests_counted(before, 200)


class BreaksAfterAPiece:
    """A generation that shows one piece, then fails as a device would (what the worker reads of it)."""

    stats = result = None

    def __iter__(self):
        yield "def"
        raise RuntimeError("device lost at /home/secret/model")


def test_a_stream_that_breaks_after_it_started_ends_with_an_internal_error_event(engines, monkeypatch):
    engine = engines("llama")
    monkeypatch.setattr(engine, "stream", lambda request: BreaksAfterAPiece())
    with in_process(engine) as client:
        with client.stream("POST", C, json={**GOOD, "stream": True}) as stream:
            assert stream.status_code == 200
            events = data_events(stream.iter_lines())
        samples = client.get("/metrics").text
    request_id = stream.headers["x-request-id"]
    assert json.loads(events[0])["choices"][0]["text"] == "def" and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == f"internal error (request id {request_id})"
    assert 'paradec_requests_total{endpoint="/v1/completions",status="500"} 1.0' in samples
    assert 'status="200"' not in samples


def test_a_full_queue_answers_503_before_reading_the_body(long_server, endless_token):
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
        with http.stream("POST", f"{long_server.url}{C}", json=endless(endless_token, stream=True)) as stream:
            lines = stream.iter_lines()
            assert data_events(next(lines) for _ in range(2))
            waiting = pool.submit(httpx.post, f"{long_server.url}{C}", json=endless(endless_token), timeout=30)
            long_server.wait_for(running=1, queue_depth=1)
            with connect(long_server) as raw:  # headers of a 1 MB body, and no body
                raw.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000\r\n\r\n"
                )
                answer = read_response(raw)
        waiting.result(timeout=30)
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"code":"queue_full"' in answer


# --- row 6: SIGTERM --------------------------------------------------------------------------------------------------


def drain_seconds(log: str) -> tuple[float, tuple[int, ...]]:
    """From the server's log: how long the drain took, and (requests finished, cut short, waiting answered 503)."""
    match = re.search(r"drained in ([0-9.]+) s: (\d+) requests finished, (\d+) cut short, (\d+) waiting", log)
    assert match, log
    return float(match[1]), tuple(int(n) for n in match.groups()[1:])


def sigterm_while_streaming(proc, token: int, max_tokens: int) -> tuple[list[str], httpx.Response, httpx.Response]:
    """Start a stream of `max_tokens`, queue a request behind it, send SIGTERM; then send a new request while the
    server drains. Returns the stream's events, the queued request's answer and the new request's."""
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
        body = endless(token, max_tokens=max_tokens, stream=True)
        with http.stream("POST", f"{proc.url}{C}", json=body) as stream:
            lines = stream.iter_lines()
            first = data_events(next(lines) for _ in range(2))
            queued = pool.submit(httpx.post, f"{proc.url}{C}", json=endless(token, max_tokens=4), timeout=30)
            proc.wait_for(running=1, queue_depth=1)
            proc.proc.send_signal(signal.SIGTERM)
            waiting = queued.result(timeout=30)  # answered as the drain begins
            refused = httpx.post(f"{proc.url}{C}", json=endless(token, max_tokens=4), timeout=30)
            health = httpx.get(f"{proc.url}/health", timeout=30)
            assert health.status_code == 503 and health.json() == {"status": "shutting down", "model": "llama"}
            events = first + data_events(lines)
    return events, waiting, refused


def test_sigterm_cuts_a_stream_at_the_deadline_with_an_error_event_and_done(
    long_loop_dir, endless_token, serve_process
):
    shutdown_timeout = 1.0
    args = ["--model", str(long_loop_dir), "--runner", "hf", "--device", "cpu", "--max-queue", "2"]
    proc = serve_process([*args, "--shutdown-timeout", str(shutdown_timeout)], log_level="info")
    events, waiting, refused = sigterm_while_streaming(proc, endless_token, ENDLESS)
    assert proc.proc.wait(30) == 0 and proc.stop() == 0
    for answer in (waiting, refused):
        error = error_of(answer, 503)
        assert error["code"] == "shutting_down" and answer.headers["retry-after"] == "1"
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert all("error" not in json.loads(event) for event in events[:-2])
    seconds, (finished, cut, answered) = drain_seconds(proc.log())
    assert (finished, cut, answered) == (0, 1, 1)
    assert shutdown_timeout <= seconds < shutdown_timeout + CUT_GRACE
    print(f"\nSIGTERM, a stream cut at the {shutdown_timeout:g} s deadline: drained in {seconds:.2f} s, exit 0")


def test_sigterm_lets_a_running_stream_finish(long_loop_dir, endless_token, serve_process):
    shutdown_timeout = 30.0
    args = ["--model", str(long_loop_dir), "--runner", "hf", "--device", "cpu", "--max-queue", "2"]
    proc = serve_process([*args, "--shutdown-timeout", str(shutdown_timeout)], log_level="info")
    events, waiting, refused = sigterm_while_streaming(proc, endless_token, 2000)
    assert proc.proc.wait(60) == 0 and proc.stop() == 0
    assert error_of(waiting, 503)["code"] == error_of(refused, 503)["code"] == "shutting_down"
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert all("error" not in json.loads(event) for event in events[:-1])
    seconds, counts = drain_seconds(proc.log())
    assert counts == (1, 0, 1) and seconds < shutdown_timeout
    print(f"\nSIGTERM, a 2000-token stream let finish: drained in {seconds:.2f} s, exit 0")


def test_a_second_signal_cuts_the_running_stream_at_once(long_loop_dir, endless_token, serve_process):
    args = ["--model", str(long_loop_dir), "--runner", "hf", "--device", "cpu", "--shutdown-timeout", "30"]
    proc = serve_process(args, log_level="info")
    with httpx.stream("POST", f"{proc.url}{C}", json=endless(endless_token, stream=True), timeout=30) as stream:
        lines = stream.iter_lines()
        events = data_events(next(lines) for _ in range(2))
        proc.proc.send_signal(signal.SIGINT)
        for _ in range(2000):  # polls /health until the drain has begun (the signal is acted on within 0.1 s)
            if httpx.get(f"{proc.url}/health", timeout=30).status_code == 503:
                break
        else:
            pytest.fail("the server never began to drain")
        proc.proc.send_signal(signal.SIGINT)
        events += data_events(lines)
    assert proc.proc.wait(30) == 0 and proc.stop() == 0
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
    seconds, counts = drain_seconds(proc.log())
    assert counts == (0, 1, 0) and seconds < 30
