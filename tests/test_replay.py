"""scripts/replay_drafter.py: replaying a token-only drafter over vanilla's greedy output gives the decode loop's
own steps (the claim the script's τ rests on)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from paradec.drafters import get_drafter
from paradec.drafters.base import parse_options

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "replay_drafter.py"
PROMPTS = ["the cat sat on the mat and the cat", "def fibonacci(n):\n    if n < 2:\n        return n\n", "1 2 3 4 1 2"]


def load_script():
    spec = importlib.util.spec_from_file_location("replay_drafter", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accept_walks_the_deepest_matching_path():
    replay = load_script()
    assert replay.accept([5, 6, 7], None, [5, 6, 9]) == [0, 1]
    # a tree: 5 -> (6 | 8), 8 -> 9; the truth goes through the second branch
    assert replay.accept([5, 6, 8, 9], (-1, 0, 0, 2), [5, 8, 9, 1]) == [0, 2, 3]
    assert replay.accept([5], None, [4]) == []


@pytest.mark.parametrize(
    ("method", "options"),
    [("pld", {}), ("suffix", {"use_global": False}), ("suffix", {"use_global": False, "max_nodes": 5})],
)
def test_replayed_steps_equal_the_decode_loop(engines, method, options):
    replay = load_script()
    engine = engines("loop-llama")
    cls = get_drafter(method)
    resources = SimpleNamespace(target=SimpleNamespace(max_length=1 << 30, vocab_size=1 << 20, max_step_inputs=128))
    fresh = cls.method_class(resources, cls)
    total_steps = total_tokens = 0
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        vanilla = engine.generate(ids, method="vanilla", max_new_tokens=40)
        spec = engine.generate(ids, method=method, options=options, max_new_tokens=40)
        assert spec.token_ids == vanilla.token_ids
        steps, proposed, accepted = replay.replay(fresh, parse_options(cls, options), ids, vanilla.token_ids, 40)
        assert steps == spec.stats.steps, (method, options, prompt)
        assert accepted == spec.stats.accepted_tokens
        assert proposed == spec.stats.proposed_tokens
        total_steps, total_tokens = total_steps + steps, total_tokens + len(vanilla.token_ids)
    assert total_steps < total_tokens / 2  # the looping model repeats itself: much was accepted


TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


def test_the_script_replays_a_bench_run_turn_by_turn(loop_dirs, tmp_path, capsys):
    """End to end: `paradec bench --turns all` on a looping chat model, then the script over its results.json
    gives each turn's τ of the bench's own rows (a later turn rendered after vanilla's answers, as the bench did)."""
    import json
    import shutil

    from paradec.cli import main

    model = tmp_path / "loop-chat"
    shutil.copytree(loop_dirs["llama"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    prompts = tmp_path / "turns.jsonl"
    prompts.write_text(
        json.dumps({"id": "conv", "turns": ["the cat sat on the mat", "and the cat sat again"]}) + "\n"
        + json.dumps({"id": "one", "turns": ["1 2 3 4 1 2 3 4"]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    args = ["bench", "--device", "cpu", "--runner", "hf", "--model", str(model), "--prompts", str(prompts)]
    args += ["--methods", "pld,suffix", "--peers", "none", "--max-new-tokens", "24", "--turns", "all"]
    assert main([*args, "--out", str(out), "--quiet", "--no-drift-check"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    records = json.loads((out / "results.json").read_text())["records"]
    replay = load_script()
    assert replay.main([str(out), "--model", str(model), "--prompts", str(prompts), "--per-prompt",
                        "--method", "pld", "--method", "suffix"]) == 0  # fmt: skip
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and "/" not in cells[0] and cells[1] in ("conv", "conv/turn-2", "one"):
            printed[(cells[0], cells[1])] = float(cells[2])
    bench = {
        (r["method"], r["prompt_ids"][0]): r["new_tokens"] / r["steps"] for r in records if r["method"] != "vanilla"
    }
    assert set(printed) == set(bench) and len(bench) == 6
    for key, tau in bench.items():
        assert printed[key] == pytest.approx(tau, abs=0.005), key


@pytest.mark.parametrize("method", ["multisample", "pld"])
def test_samples_replay_in_lockstep_like_a_batch(engines, method):
    """n greedy samples of one request (all equal): the lockstep replay takes the batch's steps, sample by sample,
    and `multisample` drafts from its siblings there as in the batch."""
    replay = load_script()
    engine = engines("loop-llama", runner="native")
    cls = get_drafter(method)
    resources = SimpleNamespace(target=SimpleNamespace(max_length=1 << 30, vocab_size=1 << 20, max_step_inputs=128))
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        results = engine.generate(ids, method=method, max_new_tokens=40, n=3, speculate="always")
        outputs = [r.token_ids for r in results]
        fresh = cls.method_class(resources, cls)
        steps, proposed, accepted = replay.replay_samples(fresh, parse_options(cls, {}), ids, outputs, 40)
        assert steps == sum(r.stats.steps for r in results), (method, prompt)
        assert accepted == sum(r.stats.accepted_tokens for r in results)
        assert proposed == sum(r.stats.proposed_tokens for r in results)
