"""`paradec bench --concurrency`: the server under load, end to end on the committed code model (CPU)."""

from __future__ import annotations

import json

import pytest

from paradec.bench import load
from paradec.bench.prompts import BenchPrompt
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.zoo import code_draft_dir, code_model_dir

PROMPTS = [
    {"id": "fib", "category": "code", "prompt": "def fibonacci(n):\n"},
    {"id": "stack", "category": "code", "prompt": "class Stack:\n    def __init__(self):\n"},
    {"id": "read", "category": "code", "prompt": "def read_lines(path):\n"},
]


def test_request_bodies():
    path, body = load.body(BenchPrompt("p", "c", "def f():"), "pld", 16)
    assert path == "/v1/completions" and body["prompt"] == "def f():" and body["method"] == "pld"
    assert body["temperature"] == 0 and body["stream"] and body["max_tokens"] == 16
    chat = BenchPrompt("c", "c", "hi", messages=(("system", "Be brief."), ("user", "hi"), ("user", "later")))
    path, body = load.body(chat, "vanilla", 8)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert load._percentile([], 0.5) is None and load._percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_concurrent_clients_get_the_answers_of_one_client(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    args = ["bench", "--concurrency", "1,3", "--model", str(code_model_dir()), "--draft", str(code_draft_dir())]
    args += ["--runner", "native", "--dtype", "float32", "--device", "cpu", "--prompts", str(prompts)]
    args += ["--methods", "pld,draft", "--max-new-tokens", "12", "--out", str(out), "--quiet", "--warmup", "0"]
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((out / "load.json").read_text())
    rounds = {(r["method"], r["clients"]): r for r in data["rounds"]}
    assert set(rounds) == {(m, n) for m in ("vanilla", "pld", "draft") for n in (1, 3)}
    for r in rounds.values():
        assert r["errors"] == 0 and r["equal"] == r["compared"] == r["requests"] and r["tokens"] > 0
        assert r["latency_p50"] > 0 and r["ttft_p50"] is not None
    assert rounds[("pld", 3)]["requests"] == 6  # max(prompts, 2 x clients)
    assert "| pld | 3 | 6 |" in (out / "load.md").read_text()
    # what the batching server's /metrics counted in each round: one sequence per step alone, more under 3 clients
    for (method, clients), r in rounds.items():
        server = r["server"]
        assert server["steps"] > 0 and server["tokens_per_step"] >= 1 and server["uncaptured"] == 0
        assert (server["mean_batch"] == 1) == (clients == 1), (method, clients)
    vanilla = rounds[("vanilla", 3)]["server"]  # never a proposal: every step plain, all but the first overlapped
    assert vanilla["speculative"] == 0 and vanilla["plain"] == vanilla["steps"] and vanilla["overlapped"] > 0
    assert "| pld | 3 |" in (out / "load.md").read_text().split("The batching server's decode steps")[1]


def test_each_timed_round_follows_untimed_rounds_of_the_same_load(monkeypatch):
    """`--warmup K`: K untimed rounds of the same method and clients before each timed one, none of them in the
    results; the timed round is the last."""
    calls = []

    def fake_round(url, prompts, method, clients, max_tokens, timeout=600.0, model="paradec"):
        calls.append((method, clients))
        answers = [load.Answer(prompt=p.id, status=200, text=f"{p.id}-{len(calls)}", tokens=3) for p in prompts]
        return load.Round(method, clients, len(answers), 0, 3 * len(answers), 1.0, 3.0 * len(answers), 1, 1, 0, 0,
                          answers=answers)  # fmt: skip

    monkeypatch.setattr(load, "run_round", fake_round)
    monkeypatch.setattr(load, "served_model", lambda url: "paradec")
    monkeypatch.setattr(load, "scrape", lambda url: {})  # no /metrics: no server record
    prompts = [BenchPrompt(p["id"], p["category"], p["prompt"]) for p in PROMPTS]
    rounds = load.load_bench("http://x", prompts, ["vanilla", "pld"], [1, 4], 8, warmup=2)
    assert calls == [(m, n) for m in ("vanilla", "pld") for n in (1, 4) for _ in range(3)]
    assert [(r.method, r.clients) for r in rounds] == [("vanilla", 1), ("vanilla", 4), ("pld", 1), ("pld", 4)]
    # the answers kept are the timed round's (the third call of each load): a warm-up's would say "-1"/"-2"
    assert rounds[0].answers[0].text == "fib-3" and rounds[1].answers[0].text == "fib-6"
    calls.clear()
    load.load_bench("http://x", prompts, ["vanilla"], [2], 8, warmup=0)
    assert calls == [("vanilla", 1), ("vanilla", 2)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--concurrency", "0"], "--concurrency: client count must be >= 1, got 0"),
        (["--concurrency", "2,x"], "--concurrency: 'x' is not an integer"),
        (["--concurrency", "2", "--mode", "sample"], "--concurrency measures greedy decoding"),
    ],
)
def test_bad_load_arguments_exit_2(extra, message, capsys):
    assert main(["bench", "--device", "cpu", "--suite", "smoke", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_server_that_does_not_start_says_why(tmp_path):
    """The started server's own last words (on its log, not its stdout) are in the error: on 2026-12-04 the GPU
    machine lacked fastapi and the bench said only ``''``."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ParadecError, match=r"paradec serve did not start: .*no-such-model.* \(its log: "):
        load.Server(["--model", str(missing)], tmp_path / "server.log")
