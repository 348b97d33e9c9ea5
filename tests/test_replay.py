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
