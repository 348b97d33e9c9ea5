"""`paradec.bench.prompts`: JSONL loaders (HumanEval, Spec-Bench and OpenAI-messages records), conversations,
malformed files, suites."""

from __future__ import annotations

import json

import pytest

from paradec.bench.prompts import SUITES, BenchPrompt, categories, get_suite, load_prompts, take_per_category
from paradec.errors import ParadecError


def write(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


SYSTEM = {"role": "system", "content": "Be brief."}


def test_every_record_style(tmp_path):
    path = write(
        tmp_path,
        json.dumps({"task_id": "HumanEval/0", "prompt": "def f(x):\n", "category": "code"}),
        "",
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}),
        json.dumps({"prompt": "plain"}),
        json.dumps({"id": "m", "category": "qa", "messages": [SYSTEM, {"role": "user", "content": "Why?"}]}),
    )
    prompts = load_prompts(path)
    assert [(p.id, p.category, p.text, p.turns) for p in prompts] == [
        ("HumanEval/0", "code", "def f(x):\n", ("def f(x):\n",)),
        ("81", "writing", "Write a poem.", ("Write a poem.", "Shorter.")),  # raw text: the first turn
        ("line-4", "default", "plain", ("plain",)),  # no id: the line number; no category: "default"
        ("m", "qa", "Why?", ("Why?",)),  # raw text: the first user turn, the system prompt dropped
    ]
    assert [p.messages for p in prompts] == [
        (),
        (("user", "Write a poem."), ("user", "Shorter.")),
        (),
        (("system", "Be brief."), ("user", "Why?")),
    ]
    assert categories(prompts) == ["code", "writing", "default", "qa"]


def test_a_conversation_puts_each_answer_after_its_turn():
    prompt = BenchPrompt(
        "c", "chat", "one", (("system", "Be brief."), ("user", "one"), ("system", "Now in French."), ("user", "two"))
    )
    assert prompt.conversation([]) == [SYSTEM, {"role": "user", "content": "one"}]
    assert prompt.conversation(["un"]) == [
        SYSTEM,
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "un"},
        {"role": "system", "content": "Now in French."},
        {"role": "user", "content": "two"},
    ]
    assert BenchPrompt("p", "code", "def f():").conversation([]) == [{"role": "user", "content": "def f():"}]
    with pytest.raises(ValueError, match="has 2 turns, 2 answers given"):
        prompt.conversation(["un", "deux"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"', "prompts.jsonl:2: invalid JSON"),
        ('["prompt"]', "prompts.jsonl:2: expected a JSON object, got list"),
        ('{"text": "x"}', "prompts.jsonl:2: record has none of 'prompt', 'turns', 'messages' (keys: text)"),
        ('{"prompt": "x", "turns": ["y"]}', "prompts.jsonl:2: record has both 'prompt' and 'turns': give exactly one"),
        ('{"prompt": ""}', "prompts.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"turns": []}', "prompts.jsonl:2: 'turns' must be a non-empty list of non-empty strings, got []"),
        ('{"turns": [3]}', "prompts.jsonl:2: 'turns'[0] must be a non-empty string, got 3"),
        ('{"turns": ["a", ""]}', "prompts.jsonl:2: 'turns'[1] must be a non-empty string, got ''"),
        ('{"messages": "hi"}', "prompts.jsonl:2: 'messages' must be a non-empty list of {'role', 'content'} objects"),
        ('{"messages": ["hi"]}', "prompts.jsonl:2: 'messages'[0] must be an object with 'role' and 'content'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            "prompts.jsonl:2: 'messages'[1].role must be 'system' or 'user', got 'assistant' (the answers",
        ),
        ('{"messages": [{"role": "user"}]}', "prompts.jsonl:2: 'messages'[0].content must be a non-empty string"),
        (
            '{"messages": [{"role": "user", "content": "a", "name": "x"}]}',
            "prompts.jsonl:2: 'messages'[0] has unknown key 'name'",
        ),
        ('{"messages": [{"role": "system", "content": "a"}]}', "prompts.jsonl:2: 'messages' holds no user message"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
            "prompts.jsonl:2: 'messages' must end with a user message (it ends with a system message)",
        ),
        ('{"prompt": "x", "category": 5}', "prompts.jsonl:2: 'category' must be a non-empty string, got 5"),
        ('{"prompt": "x", "id": "a"}', "prompts.jsonl:2: duplicate prompt id 'a' (first on line 1)"),
    ],
)
def test_malformed_line_is_named(tmp_path, line, message):
    path = write(tmp_path, '{"id": "a", "prompt": "ok"}', line)
    with pytest.raises(ParadecError) as err:
        load_prompts(path)
    assert str(err.value).startswith(str(tmp_path)) and message in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ParadecError, match=r"cannot read prompts file .*nope\.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ParadecError, match="holds no records"):
        load_prompts(write(tmp_path, "", "  "))


def test_take_per_category_keeps_file_order(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}", "category": "ab"[i % 2]}) for i in range(7)]
    prompts = load_prompts(write(tmp_path, *lines))
    assert [p.text for p in take_per_category(prompts, 2)] == ["p0", "p1", "p2", "p3"]
    assert len(take_per_category(prompts, None)) == 7
    with pytest.raises(ParadecError, match="--per-category must be >= 1, got 0"):
        take_per_category(prompts, 0)


def test_suites_and_the_zoo_dev_prompts():
    from paradec import zoo

    prompts = load_prompts(zoo.dev_prompts_path())
    assert len(prompts) >= 80 and len(categories(prompts)) >= 2
    assert get_suite("code").prompts_path() == zoo.dev_prompts_path() and get_suite("code").models == "bench"
    code = take_per_category(prompts, SUITES["code"].per_category)
    assert len(code) == SUITES["code"].per_category * len(categories(prompts))
    chat = load_prompts(SUITES["smoke"].prompts_path())
    smoke = take_per_category(chat, SUITES["smoke"].per_category)
    assert len(smoke) == len(categories(chat)) == 12  # one chat prompt per category
    with pytest.raises(ParadecError, match="unknown suite 'huge'"):
        get_suite("huge")
