"""`paradec bench` on chat prompts: the dev suites, chat-template rendering (`--chat`), multi-turn (`--turns all`)
and the per-turn exactness check, on tiny random models whose tokenizer has a small chat template."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

import paradec
from paradec.bench import report
from paradec.bench.cli import _models, run_bench
from paradec.bench.harness import Bench, BenchPlan, parse_method_options
from paradec.bench.prompts import (
    CHAT_MODEL,
    DATA_DIR,
    SUITES,
    BenchPrompt,
    answer_text,
    categories,
    get_suite,
    load_prompts,
)
from paradec.cli import main
from paradec.config import SamplingParams
from paradec.errors import ParadecError

TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
CHAT_CATEGORIES = {
    "writing", "roleplay", "reasoning", "math", "coding", "extraction",
    "stem", "humanities", "translation", "summarization", "qa", "rag",
}  # fmt: skip
CODE_CATEGORIES = ("complete", "fix", "explain", "refactor")
CONVERSATION = BenchPrompt(
    "conv", "chat", "def fibonacci(n):", (("user", "def fibonacci(n):"), ("user", "class Stack:"))
)
SYSTEM = BenchPrompt("sys", "chat", "The quick brown fox", (("system", "Be brief."), ("user", "The quick brown fox")))
RAW = BenchPrompt("raw", "chat", "def read_lines(path):")
TURNS = [CONVERSATION, BenchPrompt("single", "chat", "class Stack:", (("user", "class Stack:"),))]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def chat_dir(model_dirs, tmp_path_factory):
    """The tiny llama checkpoint, with a chat template in its tokenizer config."""
    out = tmp_path_factory.mktemp("chat") / "llama-chat"
    shutil.copytree(model_dirs["llama"], out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def engine(chat_dir, model_dirs):
    return paradec.load(chat_dir, model_dirs["llama-draft"], device="cpu", runner="hf")


def plan(methods=("vanilla", "pld", "draft"), **kw) -> BenchPlan:
    return BenchPlan(
        methods=methods,
        explicit=True,
        options=parse_method_options([], methods),
        sampling=SamplingParams(),
        max_new_tokens=kw.pop("max_new_tokens", NEW_TOKENS),
        warmup=kw.pop("warmup", 0),
        **kw,
    )


def meta(engine, bench_plan: BenchPlan) -> dict:
    return report.metadata(engine, bench_plan, command="test", argv="test", suite=None, prompts_source="test")


class Recording:
    """The real engine; every generation is recorded as (method, prompt ids, max_new_tokens, new tokens), and
    `corrupt(method, prompt_ids)` picks generations whose second new token is changed."""

    def __init__(self, engine, corrupt=lambda method, prompt_ids: False) -> None:
        self._engine, self._corrupt, self.calls = engine, corrupt, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, request):
        result = self._engine.generate(request)
        prompt = list(request.prompt_ids)
        if self._corrupt(request.method, prompt) and len(result.token_ids) > 1:
            result.token_ids[1] = (result.token_ids[1] + 1) % self._engine.target.vocab_size
        self.calls.append((request.method, prompt, request.max_new_tokens, list(result.token_ids)))
        return result


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


# --- the dev suites -------------------------------------------------------------------------------------------
def test_chat_suite_has_twelve_categories_of_eight():
    prompts = load_prompts(DATA_DIR / "chat.jsonl")  # every record valid, ids unique
    assert len(prompts) >= 96 and set(categories(prompts)) == CHAT_CATEGORIES
    assert all(sum(p.category == c for p in prompts) == 8 for c in CHAT_CATEGORIES)
    assert all(p.messages and p.id.startswith(p.category + "-") for p in prompts)
    two_turns = [p for p in prompts if len(p.turns) == 2]
    assert 0.2 <= len(two_turns) / len(prompts) <= 0.3 and all(len(p.turns) <= 2 for p in prompts)
    assert sum(p.messages[0][0] == "system" for p in prompts) >= 4  # the system-prompt path is exercised
    for p in prompts:
        if p.category in ("extraction", "summarization", "rag"):  # they quote a passage of several sentences
            passage = max(p.text.split("\n\n"), key=len)
            assert passage.count(". ") >= 2, p.id


def test_code_chat_suite_quotes_a_function_per_request():
    prompts = load_prompts(DATA_DIR / "code_chat.jsonl")
    assert len(prompts) >= 48 and categories(prompts) == list(CODE_CATEGORIES)
    assert all(sum(p.category == c for p in prompts) == 12 for c in CODE_CATEGORIES)
    languages = [p.text.split("```")[1].split("\n")[0] for p in prompts]
    assert all(p.text.count("```") == 2 for p in prompts)
    assert set(languages) == {"python", "javascript", "sql", "go", "rust", "c"} and languages.count("python") > 24
    code_lines = [p.text.split("```")[1].count("\n") for p in prompts]
    assert min(code_lines) < 10 and sum(n >= 30 for n in code_lines) >= 5  # short functions and long ones


def test_suites_name_their_prompts_model_and_length():
    for name in ("chat", "code-chat"):
        suite = get_suite(name)
        assert suite.prompts_path().is_file() and suite.per_category is None
        assert (suite.models, suite.max_new_tokens, suite.peers) == (CHAT_MODEL, 256, "hf")
    assert CHAT_MODEL == "smollm2-135m-instruct"
    smoke = SUITES["smoke"]
    assert (smoke.prompts_path(), smoke.per_category, smoke.models, smoke.max_new_tokens) == (
        DATA_DIR / "chat.jsonl", 1, "default", 48
    )  # fmt: skip
    assert SUITES["code"].models == "bench" and SUITES["code"].max_new_tokens == 128


def test_a_suite_model_is_loaded_by_name_unless_overridden():
    args = argparse.Namespace(model=None, draft=None, device="cpu")
    assert _models(args, get_suite("chat")) == (CHAT_MODEL, None)
    assert _models(args, get_suite("smoke")) == (None, None)  # paradec.load(): the default model
    assert _models(argparse.Namespace(model="m", draft="d", device="cpu"), get_suite("code-chat")) == ("m", "d")


# --- rendering ------------------------------------------------------------------------------------------------
def test_auto_renders_chat_records_with_the_template_and_raw_prompts_as_text(engine):
    bench = Bench(engine, [CONVERSATION, SYSTEM, RAW], plan(), progress=False)
    assert bench.prompt_tokens == [
        engine.encode_chat([{"role": "user", "content": "def fibonacci(n):"}]),
        engine.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": SYSTEM.text}]),
        engine.encode(RAW.text),
    ]
    assert bench.turn_counts == [1, 1, 1]  # --turns first


def test_chat_on_renders_a_raw_prompt_as_one_user_turn(engine):
    bench = Bench(engine, [RAW], plan(chat="on"), progress=False)
    assert bench.prompt_tokens == [engine.encode_chat([{"role": "user", "content": RAW.text}])]


def test_chat_off_uses_the_raw_first_turn(engine):
    bench = Bench(engine, [CONVERSATION, SYSTEM], plan(chat="off"), progress=False)
    assert bench.prompt_tokens == [engine.encode("def fibonacci(n):"), engine.encode("The quick brown fox")]


def test_a_model_without_a_template_gets_raw_text_and_refuses_chat_on(engines):
    plain = engines("llama")
    assert Bench(plain, [CONVERSATION], plan(("vanilla",)), progress=False).prompt_tokens == [
        plain.encode("def fibonacci(n):")
    ]
    with pytest.raises(ParadecError, match="--chat on renders every prompt with the model's chat template"):
        Bench(plain, [CONVERSATION], plan(("vanilla",), chat="on"), progress=False)
    with pytest.raises(ParadecError, match=r"--turns all .* has no chat template: use --turns first"):
        Bench(plain, [CONVERSATION], plan(("vanilla",), turns="all"), progress=False)


def test_turns_all_with_chat_off_is_an_error(engine):
    with pytest.raises(ParadecError, match=r"--turns all .* --chat off renders raw text"):
        Bench(engine, [CONVERSATION], plan(chat="off", turns="all"), progress=False)


def test_a_prompt_id_equal_to_a_turn_id_is_an_error(engine):
    clash = BenchPrompt("conv/turn-2", "chat", "x", (("user", "x"),))
    with pytest.raises(
        ParadecError,
        match="turn 2 of prompt 'conv' and turn 1 of prompt 'conv/turn-2' are both recorded as 'conv/turn-2'",
    ):
        Bench(engine, [CONVERSATION, clash], plan(turns="all"), progress=False)


# --- multi-turn -----------------------------------------------------------------------------------------------
def test_turn_two_is_asked_after_the_methods_own_first_answer(engine):
    # pld's first answer is corrupted: its second turn must carry that answer, not vanilla's
    first_turn = engine.encode_chat([{"role": "user", "content": "def fibonacci(n):"}])
    recording = Recording(engine, corrupt=lambda method, ids: method == "pld" and ids == first_turn)
    bench = Bench(recording, TURNS, plan(turns="all", drift=False), progress=False)  # vanilla timed once
    bench.run()
    assert [r.prompt_ids for r in bench.records if r.method == "draft"] == [["conv"], ["conv/turn-2"], ["single"]]
    timed = [(m, ids, out) for m, ids, n, out in recording.calls if n == NEW_TOKENS]
    for method in ("vanilla", "pld", "draft"):
        (_, turn1, answer1), (_, turn2, _), (_, single, _) = [c for c in timed if c[0] == method]
        assert turn1 == first_turn and single == engine.encode_chat([{"role": "user", "content": "class Stack:"}])
        assert turn2 == engine.encode_chat([
            {"role": "user", "content": "def fibonacci(n):"},
            {"role": "assistant", "content": answer_text(engine, answer1)},
            {"role": "user", "content": "class Stack:"},
        ])  # fmt: skip
        assert turn2[: len(turn1)] == turn1 and contains(turn2[len(turn1) :], answer1)  # its own answer's tokens
    vanilla_turn2, pld_turn2 = (next(c[1] for c in timed if c[0] == m and len(c[1]) > len(first_turn))
                                for m in ("vanilla", "pld"))  # fmt: skip
    assert vanilla_turn2 != pld_turn2


def test_warm_up_runs_whole_conversations(engine):
    recording = Recording(engine)
    Bench(recording, TURNS, plan(("vanilla",), turns="all", warmup=1), progress=False).run()
    full = [ids for _, ids, n, _ in recording.calls if n == NEW_TOKENS]
    assert len(full) == 6 and full[:3] == full[3:]  # the timed pass meets the warm-up's shapes, turn 2 included


def test_a_first_turn_mismatch_leaves_turn_two_uncompared(engine, tmp_path, capsys):
    first_turn = engine.encode_chat([{"role": "user", "content": "def fibonacci(n):"}])
    corrupting = Recording(engine, corrupt=lambda method, ids: method == "pld" and ids == first_turn)
    bench_plan = plan(turns="all")
    assert run_bench(corrupting, TURNS, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True) == 1
    err = capsys.readouterr().err
    assert "pld differs from vanilla on prompt 'conv' from new token 1" in err and "1 later turn(s) not compared" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(m["method"], m["prompt"]) for m in data["exactness"]["mismatches"]] == [("pld", "conv")]
    assert data["exactness"]["not_compared"] == [{"method": "pld", "batch_size": 1, "prompt": "conv/turn-2"}]
    equals = {(r["method"], r["prompt_ids"][0]): r["equals_vanilla"] for r in data["records"]}
    assert equals[("pld", "conv/turn-2")] is None and equals[("pld", "single")] is True
    assert equals[("draft", "conv")] is equals[("draft", "conv/turn-2")] is True
    overall = data["summary"]["all prompts"]
    assert (overall["pld"]["matches"], overall["pld"]["compared"]) == (1, 2)
    assert (overall["draft"]["matches"], overall["draft"]["compared"], overall["draft"]["prompts"]) == (3, 3, 3)
    assert data["meta"]["turns"] == "all" and data["meta"]["turns_measured"] == 3 and data["meta"]["chat_template"]
    assert [(p["id"], p["turns"], p["chat"]) for p in data["prompts"]] == [("conv", 2, True), ("single", 1, True)]
    md = (tmp_path / "results.md").read_text()
    assert "Later turns not compared" in md and "- pld: 'conv/turn-2'" in md
    assert "## all prompts (2 prompts, 3 turns)" in md and "turns: all, 3 measured" in md


def test_a_second_turn_mismatch_is_a_failure_of_that_turn(engine, tmp_path, capsys):
    first_turn = engine.encode_chat([{"role": "user", "content": "def fibonacci(n):"}])

    def second_turn(method: str, ids: list[int]) -> bool:
        return method == "draft" and len(ids) > len(first_turn) and ids[: len(first_turn)] == first_turn

    corrupting = Recording(engine, corrupt=second_turn)
    bench_plan = plan(turns="all")
    assert run_bench(corrupting, TURNS, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True) == 1
    err = capsys.readouterr().err
    assert "EXACTNESS FAILURE: draft differs from vanilla on prompt 'conv/turn-2' from new token 1" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(m["method"], m["prompt"]) for m in data["exactness"]["mismatches"]] == [("draft", "conv/turn-2")]
    assert data["exactness"]["not_compared"] == []
    ruling = next(r["ruling"] for r in data["records"] if r["method"] == "draft" and r["ruling"])
    assert ruling["near_tie"] is False  # the referee scored vanilla's turn-2 context: the corrupt token is far off


def test_peers_answer_every_turn_too(engine, tmp_path):
    bench_plan = plan(("vanilla",), turns="all", peers=("hf-vanilla",), batch_sizes=(1, 2))
    assert run_bench(engine, TURNS, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = [
        (r["batch_size"], r["prompt_ids"], r["equals_vanilla"]) for r in data["records"] if r["method"] != "vanilla"
    ]
    assert rows[:3] == [(1, ["conv"], True), (1, ["conv/turn-2"], True), (1, ["single"], True)]
    assert [(size, ids) for size, ids, _ in rows[3:]] == [(2, ["conv", "single"]), (2, ["conv/turn-2"])]


def test_cli_turns_all(chat_dir, model_dirs, tmp_path, capsys):
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(
        json.dumps({"id": "conv", "turns": ["def fibonacci(n):", "class Stack:"]}) + "\n"
        + json.dumps({"id": "sys", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "The quick brown fox"}]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    common = ["bench", "--device", "cpu", "--runner", "hf", "--prompts", str(prompts), "--methods", "pld",
              "--peers", "none", "--max-new-tokens", "4", "--out", str(out), "--quiet", "--turns", "all"]  # fmt: skip
    assert main([*common, "--model", str(chat_dir)]) == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert (data["meta"]["chat"], data["meta"]["turns"], data["meta"]["turns_measured"]) == ("auto", "all", 3)
    assert "--turns all" in data["meta"]["command"]
    assert main([*common, "--model", str(model_dirs["llama"])]) == 2
    assert "paradec: error: --turns all" in capsys.readouterr().err


def test_the_drift_check_re_times_every_turn_in_its_own_context(engine):
    recording = Recording(engine)
    bench = Bench(recording, TURNS, plan(("vanilla", "pld"), turns="all"), progress=False)
    bench.run()
    first = [r for r in bench.records if r.method == "vanilla"]
    assert len(first) == 3 and bench.drift["tokens"] == sum(r.new_tokens for r in first)
    vanilla = [ids for m, ids, n, _ in recording.calls if m == "vanilla" and n == NEW_TOKENS]
    assert vanilla[3:] == vanilla[:3]  # the same contexts again, turn 2 after vanilla's own first answer
