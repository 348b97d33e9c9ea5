"""Adaptive draft length: the policy on scripted steps (fake clock), and losslessness in the chain drafters."""

from __future__ import annotations

from collections import Counter

import pytest

import paradec
from conftest import hf_greedy
from paradec.drafters import get_drafter, parse_options
from paradec.drafters.adaptive import AdaptiveLength
from paradec.errors import ParadecError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(policy: AdaptiveLength, clock: FakeClock, steps: int, accepted_of, cost_of) -> Counter:
    """Run `steps` scripted steps: a draft of k tokens gets `accepted_of(step, k)` accepted and takes
    `cost_of(k)` seconds. Returns how often each k was chosen over the second half."""
    chosen: Counter = Counter()
    policy.start()
    for step in range(steps):
        k = policy.next_k()
        if step >= steps // 2:
            chosen[k] += 1
        clock.now += cost_of(k)
        policy.observe(k, accepted_of(step, k))
    return chosen


def make(max_k: int, draft_cost: float = 0.1) -> tuple[AdaptiveLength, FakeClock]:
    clock = FakeClock()
    return AdaptiveLength(max_k, draft_cost=draft_cost, clock=clock), clock


def test_full_acceptance_and_cheap_drafts_keep_the_longest_draft():
    policy, clock = make(6)
    chosen = simulate(policy, clock, 40, lambda step, k: k, lambda k: 1.0 + 0.02 * k)
    assert chosen.most_common(1)[0][0] == 6
    assert policy.best_k() == 6


def test_draft_stops_where_acceptance_stops():
    """The first two positions are always accepted, the third never: drafting past two only costs time."""
    policy, clock = make(6)
    chosen = simulate(policy, clock, 60, lambda step, k: min(k, 2), lambda k: 1.0 + 0.1 * k)
    assert chosen.most_common(1)[0][0] == 2
    beta = policy.acceptance()
    assert beta[0] > 0.9 and beta[1] > 0.9 and beta[2] < 0.5


def test_measured_cost_decides_between_equal_acceptance():
    """Same acceptance (about 70% per token); drafts as expensive as a target step favour short drafts,
    nearly free drafts (prompt lookup on a GPU) favour long ones."""

    def accepted(step: int, k: int) -> int:
        pattern = [1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1]  # 70% ones
        run = 0
        while run < k and pattern[(step * 3 + run) % len(pattern)]:
            run += 1
        return run

    cheap, clock = make(8)
    cheap_k = simulate(cheap, clock, 80, accepted, lambda k: 1.0 + 0.01 * k).most_common(1)[0][0]
    costly, clock = make(8)
    costly_k = simulate(costly, clock, 80, accepted, lambda k: 1.0 + 1.0 * k).most_common(1)[0][0]
    assert costly_k <= 2 < 5 <= cheap_k


def test_step_cost_estimates():
    policy, clock = make(4, draft_cost=0.5)
    assert policy.step_cost() == [1.0, 1.5, 2.0, 2.5, 3.0]  # prior, before any timing
    policy.start()
    for k, seconds in ((2, 4.0), (2, 4.0)):
        clock.now += seconds
        policy.observe(k, 0)
    assert policy.step_cost() == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0])  # one measured length, prior slope
    for k, seconds in ((4, 5.0), (4, 5.0)):
        clock.now += seconds
        policy.observe(k, 0)
    assert policy.step_cost() == pytest.approx([3.0, 3.5, 4.0, 4.5, 5.0])  # the line through measured lengths


def test_unreached_positions_fall_back_to_the_global_rate():
    policy, _ = make(4)
    policy.start()
    for _ in range(20):
        policy.observe(1, 1)  # only position 0 was ever proposed, always accepted
    beta = policy.acceptance()
    total = sum(policy.accepted)  # decayed count of accepted tokens; no rejections
    assert beta[0] > 0.9
    assert beta[1] == beta[2] == beta[3] == pytest.approx((total + 1) / (total + 2))  # the smoothed global rate


def test_options_parse_and_validate():
    for method in ("draft", "pld", "layerskip"):
        cls = get_drafter(method)
        assert parse_options(cls, {"adaptive": "true"}).adaptive is True
        assert parse_options(cls, {"adaptive": "false"}).adaptive is False
        assert parse_options(cls, None).adaptive is False  # off by default: step counts are reproducible
        with pytest.raises(ParadecError, match="adaptive='maybe'"):
            parse_options(cls, {"adaptive": "maybe"})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adaptive_chain_drafters_stay_lossless(model_dirs, loop_dirs, hf_models, arch):
    engine = paradec.load(model_dirs[arch], model_dirs[f"{arch}-draft"], runner="hf")
    looping = paradec.load(loop_dirs[arch], runner="hf")
    prompt = "def fibonacci(n):\n"
    reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
    result = engine.generate(prompt, method="draft", options={"k": 4, "adaptive": True}, max_new_tokens=40)
    assert result.token_ids == reference
    reference = hf_greedy(hf_models(f"loop-{arch}"), looping.encode(prompt), 80)
    result = looping.generate(prompt, method="pld", options={"adaptive": True}, max_new_tokens=80)
    assert result.token_ids == reference
