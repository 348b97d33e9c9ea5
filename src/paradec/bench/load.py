"""`paradec bench --concurrency 1,16,32`: the OpenAI-compatible server under load from N concurrent clients.

For each method and each client count N, N client threads send the suite's prompts to the server (streaming, greedy,
`max_tokens` = --max-new-tokens, the method in the request's `method` field), each client one request at a time,
until every request of the round is answered. A round has max(prompts, 2 N) requests, the prompts in turn. Measured
per request, on the client: latency (send to the last byte), time to first token (send to the first text), and the
completion tokens the server reports (`usage`); per round: aggregate tok/s (completion tokens / the round's wall
time), p50/p95 latency and time to first token, errors (any non-200 answer or broken stream). Every greedy answer is
compared with the same prompt's answer at one client (the server decoding one request alone, as offline decoding
does): `equal` counts the answers that match it. Each timed round follows `--warmup` untimed rounds of the same
load (default 1), so that compilation and CUDA graph captures of its batch sizes are not timed.

The server is the one at `--url`, or one started for the run (`paradec serve` with the bench's model options,
`--max-batch` the largest N, a queue long enough for every round), stopped at the end. The client side uses the
standard library only (http.client, threads), so it runs wherever the server does.
"""

from __future__ import annotations

import http.client
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from paradec.bench.prompts import BenchPrompt
from paradec.errors import ParadecError


@dataclass
class Answer:
    """One request's outcome, as the client saw it."""

    prompt: str  # the prompt id
    status: int = 0  # HTTP status (0: no answer)
    text: str = ""
    tokens: int = 0  # completion tokens (the server's usage)
    latency: float = 0.0  # seconds, send to the end of the stream
    ttft: float | None = None  # seconds, send to the first text
    error: str = ""


@dataclass
class Round:
    method: str
    clients: int
    requests: int
    errors: int
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    latency_p50: float | None
    latency_p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    equal: int | None = None  # answers equal to the one-client answer of their prompt (greedy)
    compared: int | None = None
    answers: list[Answer] = field(default_factory=list)
    server: dict | None = None  # what the server's /metrics counted during the round (`server_delta`)


def _get(url: str, path: str, timeout: float) -> tuple[int, str]:
    """(status, body) of `GET url/path`; OSError or HTTPException when there is no answer."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def served_model(url: str, timeout: float = 30.0) -> str:
    """The name the server serves its model under (`GET /v1/models`)."""
    try:
        status, text = _get(url, "/v1/models", timeout)
        if status != 200:
            raise ParadecError(f"GET {url}/v1/models answered {status}: {text[:200]}")
        return json.loads(text)["data"][0]["id"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
        raise ParadecError(f"cannot read the served model from {url}/v1/models: {exc}") from None


def body(prompt: BenchPrompt, method: str, max_tokens: int, model: str = "paradec") -> tuple[str, dict]:
    """(path, JSON body) of a streaming greedy request for `prompt`: chat records go to the chat endpoint with
    their messages up to the first user turn, plain prompts to the completions endpoint."""
    common = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "method": method,
    }
    if not prompt.messages:
        return "/v1/completions", {**common, "prompt": prompt.text}
    messages = []
    for role, content in prompt.messages:
        messages.append({"role": role, "content": content})
        if role == "user":
            break
    return "/v1/chat/completions", {**common, "messages": messages}


def scrape(url: str, timeout: float = 30.0) -> dict[str, float]:
    """The server's /metrics (Prometheus text) as {sample name with its labels: value}; {} when it answers none."""
    try:
        status, text = _get(url, "/metrics", timeout)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                continue
    return samples


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """What a batching server did between two scrapes: its decode steps (all, and by kind), the mean sequences and
    tokens per step, the steps that met a new CUDA graph bucket and their seconds, and the steps that replayed no
    graph or ran eagerly past the bank's cap. None for a server without a batch decoder (one request at a time)."""
    if "paradec_batch_size_count" not in after or 'paradec_batch_graphs{state="misses"}' not in after:
        return None

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = d("paradec_batch_size_count")
    kinds = ("speculative", "plain", "overlapped", "drained", "captured")
    delta = {kind: int(d(f'paradec_decode_steps_by_kind{{kind="{kind}"}}')) for kind in kinds}
    for choice in ("dropped", "left_out", "shadows"):
        delta[choice] = int(d(f'paradec_speculation_choices{{choice="{choice}"}}'))
    return {
        "steps": int(steps),
        "mean_batch": d("paradec_batch_size_sum") / steps if steps else None,
        "tokens_per_step": d("paradec_batch_step_tokens_sum") / steps if steps else None,
        **delta,
        "new_bucket_seconds": d("paradec_decode_new_bucket_seconds"),
        "graph_misses": int(d('paradec_batch_graphs{state="misses"}')),
        "uncaptured": int(d('paradec_batch_graphs{state="uncaptured"}')),
    }


def _percentile(values: Sequence[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def send(url: str, path: str, payload: dict, prompt_id: str, timeout: float) -> Answer:
    """One streaming request; reads the Server-Sent Events to the end."""
    parts = urlsplit(url)
    answer = Answer(prompt_id)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer.status = response.status
        if response.status != 200:
            answer.error = response.read().decode(errors="replace")[:300]
            return answer
        pieces = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or ():
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if text:
                    if answer.ttft is None:
                        answer.ttft = time.perf_counter() - started
                    pieces.append(text)
            if event.get("usage"):
                answer.tokens = int(event["usage"].get("completion_tokens") or 0)
        answer.text = "".join(pieces)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    finally:
        answer.latency = time.perf_counter() - started
        connection.close()
    return answer


def run_round(
    url: str,
    prompts: list[BenchPrompt],
    method: str,
    clients: int,
    max_tokens: int,
    timeout: float = 600.0,
    model: str = "paradec",
) -> Round:
    """One round: `clients` threads, each sending requests one at a time until the round's requests are done."""
    count = max(len(prompts), 2 * clients)
    work: queue.Queue[BenchPrompt] = queue.Queue()
    for i in range(count):
        work.put(prompts[i % len(prompts)])
    answers: list[Answer] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            path, payload = body(prompt, method, max_tokens, model)
            answer = send(url, path, payload, prompt.id, timeout)
            with lock:
                answers.append(answer)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    good = [a for a in answers if a.status == 200 and not a.error]
    tokens = sum(a.tokens for a in good)
    return Round(
        method=method,
        clients=clients,
        requests=len(answers),
        errors=len(answers) - len(good),
        tokens=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        latency_p50=_percentile([a.latency for a in good], 0.5),
        latency_p95=_percentile([a.latency for a in good], 0.95),
        ttft_p50=_percentile([a.ttft for a in good if a.ttft is not None], 0.5),
        ttft_p95=_percentile([a.ttft for a in good if a.ttft is not None], 0.95),
        answers=answers,
    )


def load_bench(
    url: str,
    prompts: list[BenchPrompt],
    methods: Sequence[str],
    concurrency: Sequence[int],
    max_tokens: int,
    warmup: int = 1,
) -> list[Round]:
    """Every method at every client count (one client first, as the reference answers), each timed round after
    `warmup` untimed rounds of the same clients and requests: the server meets that load's batch sizes, and so
    compiles and captures their steps, before it is timed (on 2026-12-03 an H200 run without them timed 12 s of
    compilation in the first batched round: p50 time to first token 12.4 s at 16 clients)."""
    rounds = []
    model = served_model(url)
    for method in methods:
        reference: dict[str, str] = {}
        for clients in sorted(set(concurrency) | {1}):
            for _ in range(warmup):
                run_round(url, prompts, method, clients, max_tokens, model=model)
            before = scrape(url)
            result = run_round(url, prompts, method, clients, max_tokens, model=model)
            result.server = server_delta(before, scrape(url))
            if clients == 1:
                reference = {a.prompt: a.text for a in result.answers if a.status == 200 and not a.error}
            compared = [a for a in result.answers if a.prompt in reference and a.status == 200 and not a.error]
            result.compared = len(compared)
            result.equal = sum(a.text == reference[a.prompt] for a in compared)
            if clients in concurrency:
                rounds.append(result)
            print(
                f"paradec bench: {method} x{clients}: {result.tokens_per_second:.1f} tok/s, p50 latency "
                f"{_fmt(result.latency_p50)} s, {result.errors} errors, {result.equal}/{result.compared} equal",
                file=sys.stderr,
            )
    return rounds


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(rounds: list[Round], meta: dict) -> str:
    lines = [
        "# paradec bench: the server under load",
        "",
        f"`{meta.get('command', '')}`",
        "",
        f"{meta.get('device', '')}; server {meta.get('url', '')}; {meta.get('prompts', '')}; greedy, "
        f"{meta.get('max_new_tokens', '')} new tokens at most",
        "",
        "| method | clients | requests | tok/s | × 1 client | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s "
        "| errors | equal to 1 client |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    alone = {r.method: r.tokens_per_second for r in rounds if r.clients == 1}
    for r in rounds:
        ratio = r.tokens_per_second / alone[r.method] if alone.get(r.method) else None
        lines.append(
            f"| {r.method} | {r.clients} | {r.requests} | {r.tokens_per_second:.1f} | {_fmt(ratio, '.2f')} | "
            f"{_fmt(r.latency_p50)} | {_fmt(r.latency_p95)} | {_fmt(r.ttft_p50, '.3f')} | {_fmt(r.ttft_p95, '.3f')} "
            f"| {r.errors} | {r.equal}/{r.compared} |"
        )
    served = [r for r in rounds if r.server]
    if served:
        lines += [
            "",
            "The batching server's decode steps during each timed round (its /metrics): sequences and tokens per "
            "step, steps by kind, steps that met a new CUDA graph bucket (an eager first use or a capture; their "
            "seconds), steps run eagerly because the graph bank was full, and the speculation policy's choices: "
            "speculative steps dropped before a new bucket, sequences left out of speculative steps (sequence-steps), "
            "shadow drafts decided.",
            "",
            "| method | clients | steps | mean batch | tokens/step | speculative | overlapped | drained "
            "| new bucket (s) | uncaptured | dropped | left out | shadow drafts |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in served:
            v = r.server
            lines.append(
                f"| {r.method} | {r.clients} | {v['steps']} | {_fmt(v['mean_batch'], '.1f')} | "
                f"{_fmt(v['tokens_per_step'], '.1f')} | {v['speculative']} | {v['overlapped']} | {v['drained']} | "
                f"{v['captured']} ({v['new_bucket_seconds']:.2f}) | {v['uncaptured']} | {v.get('dropped', 0)} | "
                f"{v.get('left_out', 0)} | {v.get('shadows', 0)} |"
            )
    return "\n".join(lines) + "\n"


def write(out: Path, rounds: list[Round], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rounds": [asdict(r) for r in rounds]}
    (out / "load.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "load.md").write_text(markdown(rounds, meta))


class Server:
    """`python -m paradec serve ARGS --port 0` started for a load run; `url` once it listens."""

    def __init__(self, args: list[str], log: Path) -> None:
        command = [sys.executable, "-m", "paradec", "serve", *args, "--port", "0", "--log-level", "warning"]
        self._log = log.open("w")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        if "listening on http://" not in line:
            self.stop()
            said = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) or line.strip()
            raise ParadecError(f"paradec serve did not start: {said or 'it printed nothing'} (its log: {log})")
        self.url = line.rsplit(" ", 1)[1].strip()
        self.banner = line.strip()  # what it serves, and how (its start line)
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
