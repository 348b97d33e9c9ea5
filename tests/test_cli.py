"""`paradec generate` end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def paradec(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "paradec", *args], capture_output=True, text=True, timeout=240, env=env, check=False
    )


@pytest.fixture(scope="module")
def outputs(model_dirs):
    common = ["--model", str(model_dirs["llama"]), "--draft", str(model_dirs["llama-draft"]), "--runner", "hf"]
    common += ["--prompt", "def fibonacci(n):\n", "--max-new-tokens", "24"]
    return {
        method: paradec("generate", *common, "--method", method, "--json") for method in ("vanilla", "pld", "draft")
    }


def test_methods_print_the_same_greedy_text(outputs):
    records = {}
    for method, proc in outputs.items():
        assert proc.returncode == 0, proc.stderr
        records[method] = json.loads(proc.stdout)
    assert records["pld"]["text"] == records["vanilla"]["text"] == records["draft"]["text"]
    assert records["draft"]["token_ids"] == records["vanilla"]["token_ids"]
    stats = records["draft"]["stats"]
    assert stats["new_tokens"] == 24 and stats["steps"] >= 1 and stats["tau"] == 24 / stats["steps"]
    assert set(stats) >= {"acceptance_by_position", "wall_seconds", "tokens_per_second", "prefill_seconds"}


def test_streaming_mode_prints_text_and_stats(model_dirs, outputs):
    proc = paradec(
        "generate", "--model", str(model_dirs["llama"]), "--runner", "hf", "--method", "pld",
        "--prompt", "def fibonacci(n):\n", "--max-new-tokens", "24",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == json.loads(outputs["vanilla"].stdout)["text"] + "\n"
    assert "[pld] 24 tokens in" in proc.stderr and "tau" in proc.stderr


def test_bad_input_exit_code_2(model_dirs):
    proc = paradec("generate", "--model", str(model_dirs["llama"]), "--prompt", "x", "--temperature", "-1")
    assert proc.returncode == 2
    assert "temperature must be >= 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr
