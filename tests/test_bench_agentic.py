"""The `agentic` dev suite (suffix decoding's workload): 32 records of 4 categories, multi-turn edits of quoted code
and data, tool-call transcripts with a system message, long mechanical refactors; every record, every turn,
renders with a chat template."""

from __future__ import annotations

import json
import re

import pytest

import paradec
from paradec.bench.prompts import DATA_DIR, Rendering, categories, get_suite, load_prompts
from paradec.cli import main

CATEGORIES = ["code-edit", "data-edit", "tool-calls", "refactor-repeat"]
PATH = DATA_DIR / "agentic.jsonl"


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(get_suite("agentic").prompts_path())  # every record valid, ids unique


@pytest.fixture(scope="module")
def engine(chat_llama_dir):
    return paradec.load(chat_llama_dir, device="cpu", runner="hf")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[\w-]*\n(.*?)```", text, re.S)


def test_the_suite_names_its_file_model_and_length():
    suite = get_suite("agentic")
    assert suite.prompts_path() == PATH and PATH.is_file() and suite.per_category is None
    assert (suite.models, suite.max_new_tokens, suite.peers) == ("qwen2.5-coder-1.5b-instruct", 256, "hf")
    assert PATH.stat().st_size < 120_000


def test_thirty_two_records_eight_per_category(prompts):
    assert len(prompts) == 32 and categories(prompts) == CATEGORIES
    assert all(sum(p.category == c for p in prompts) == 8 for c in CATEGORIES)
    assert len({p.id for p in prompts}) == 32
    assert all(p.messages and p.id.startswith(p.category + "-") for p in prompts)


def test_multi_turn_edits_and_tool_calls_with_a_system_message(prompts):
    multi = [p for p in prompts if len(p.turns) > 1]
    assert len(multi) >= 8
    for category in ("code-edit", "data-edit"):
        assert sum(p.category == category and len(p.turns) == 2 for p in prompts) == 4
    for p in prompts:
        if p.category == "tool-calls":
            assert p.messages[0][0] == "system" and "JSON" in p.messages[0][1], p.id
            assert len(p.messages[0][1].splitlines()) >= 5, p.id  # 2-4 tools with their schemas
        else:
            assert all(role == "user" for role, _ in p.messages), p.id
    quoting = [p for p in prompts if p.category == "tool-calls" and "Previous calls returned:" in p.text]
    assert len(quoting) >= 4


def test_edit_records_quote_one_block_of_the_requested_size(prompts):
    sizes = {"code-edit": (15, 60), "data-edit": (20, 80), "refactor-repeat": (40, 100)}
    for p in prompts:
        if p.category in sizes:
            blocks = code_blocks(p.text)
            assert len(blocks) == 1, p.id
            low, high = sizes[p.category]
            assert low <= blocks[0].count("\n") <= high, p.id


def test_tool_call_schemas_are_json(prompts):
    for p in prompts:
        if p.category != "tool-calls":
            continue
        schemas = re.findall(r"arguments schema: (.*)", p.messages[0][1])
        assert 2 <= len(schemas) <= 4, p.id
        assert all(json.loads(schema)["type"] == "object" for schema in schemas), p.id


def test_every_turn_renders_with_a_chat_template(prompts, engine):
    rendering = Rendering(chat="auto", turns="all", template=True)
    for p in prompts:
        assert rendering.templated(p) and rendering.turn_count(p) == len(p.turns)
        for k in range(len(p.turns)):
            answers = [f"answer {j}" for j in range(k)]
            ids = rendering.encode(engine, p, answers)
            assert ids == engine.encode_chat(p.conversation(answers))
            text = engine.tokenizer.decode(ids)
            assert p.turns[k] in text and all(a in text for a in answers), (p.id, k)
            if p.messages[0][0] == "system":
                assert p.messages[0][1] in text, p.id


def test_bench_help_lists_the_suite(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "agentic:" in capsys.readouterr().out
