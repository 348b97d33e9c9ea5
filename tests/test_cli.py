"""`paradec generate` end to end (in a subprocess, and through `main` for bad chat input): raw prompts and chats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paradec.cli import main
from paradec.engine import load


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


CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def stack():"}]


def test_chat_and_messages_answer_the_encode_chat_prompt(chat_llama_dir, tmp_path, capsys):
    engine = load(chat_llama_dir, runner="hf")
    expected = engine.generate(engine.encode_chat(CHAT), max_new_tokens=12)
    common = ["generate", "--model", str(chat_llama_dir), "--runner", "hf", "--max-new-tokens", "12", "--json"]
    proc = paradec(*common, "--chat", CHAT[1]["content"], "--system", CHAT[0]["content"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["token_ids"] == expected.token_ids and record["text"] == expected.text
    assert set(record) == {"text", "token_ids", "finish_reason", "method", "model", "stats"}
    for content in (CHAT, {"messages": CHAT}):  # a list, or an object with a "messages" list
        path = tmp_path / "chat.json"
        path.write_text(json.dumps(content))
        assert main([*common, "--messages", str(path)]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == expected.token_ids


BAD_CHATS = {
    "unreadable file": (None, "cannot read messages file"),
    "invalid JSON": ("[{", "is not valid JSON"),
    "not a list": ('{"messages": "hi"}', "must hold a JSON list of messages or an object with a 'messages' list"),
    "a number": ("5", "list, got int"),
    "empty": ("[]", "messages must not be empty"),
    "bad role": (
        '[{"role": "robot", "content": "x"}]',
        "messages[0].role must be one of system, user, assistant, tool",
    ),
    "bad content": ('[{"role": "user", "content": 3}]', "messages[0].content must be a string, got int"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_messages_file_exit_code_2(model_dirs, tmp_path, capsys, case):
    text, message = BAD_CHATS[case]
    path = tmp_path / "chat.json"
    if text is not None:
        path.write_text(text)
    assert main(["generate", "--model", str(model_dirs["llama"]), "--messages", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err


def test_chat_without_a_template_or_with_a_stray_system_exit_code_2(model_dirs, capsys):
    model = ["generate", "--model", str(model_dirs["llama"]), "--runner", "hf"]
    assert main([*model, "--chat", "hi"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert main([*model, "--prompt", "hi", "--system", "be brief"]) == 2
    assert "--system goes with --chat" in capsys.readouterr().err


def test_import_and_help_leave_transformers_models_unloaded():
    """`import paradec` and `paradec --help` do not load transformers' modelling code (~3 s of a process's start on
    this machine's CPU): only a process that runs a transformers model pays for it (`paradec.runners.hf`)."""
    code = (
        "import sys, paradec, paradec.runners, paradec.server, paradec.bench; "
        "print(sorted(m for m in sys.modules if m.startswith('transformers.model')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    help_run = paradec("--help")
    assert help_run.returncode == 0 and "generate" in help_run.stdout
