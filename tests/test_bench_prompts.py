"""`paradec.bench.prompts`: JSONL loaders (HumanEval and Spec-Bench records), malformed files, suites."""

from __future__ import annotations

import json

import pytest

from paradec.bench.prompts import SUITES, categories, get_suite, load_prompts, take_per_category
from paradec.errors import ParadecError


def write(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_both_record_styles(tmp_path):
    path = write(
        tmp_path,
        json.dumps({"task_id": "HumanEval/0", "prompt": "def f(x):\n", "category": "code"}),
        "",
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}),
        json.dumps({"prompt": "plain"}),
    )
    prompts = load_prompts(path)
    assert [(p.id, p.category, p.text) for p in prompts] == [
        ("HumanEval/0", "code", "def f(x):\n"),
        ("81", "writing", "Write a poem."),  # the first turn
        ("line-4", "default", "plain"),  # no id: the line number; no category: "default"
    ]
    assert categories(prompts) == ["code", "writing", "default"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"', "prompts.jsonl:2: invalid JSON"),
        ('["prompt"]', "prompts.jsonl:2: expected a JSON object, got list"),
        ('{"text": "x"}', "prompts.jsonl:2: record has neither 'prompt' nor 'turns' (keys: text)"),
        ('{"prompt": ""}', "prompts.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"turns": []}', "prompts.jsonl:2: 'turns' must be a list whose first item is a non-empty string"),
        ('{"turns": [3]}', "prompts.jsonl:2: 'turns' must be a list"),
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
    smoke = take_per_category(prompts, SUITES["smoke"].per_category)
    assert len(smoke) == SUITES["smoke"].per_category * len(categories(prompts))
    assert get_suite("code").models == "bench"
    with pytest.raises(ParadecError, match="unknown suite 'huge'"):
        get_suite("huge")
