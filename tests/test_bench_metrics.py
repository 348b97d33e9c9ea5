"""`paradec.bench.metrics`: τ, speedup and acceptance by position on hand-made run records."""

from __future__ import annotations

import pytest

from paradec.bench.metrics import RunRecord, first_mismatch, summarize, tokens_per_second


def rec(method, pid, tokens, seconds, steps=None, accepted_at=(), proposed_at=(), **kw) -> RunRecord:
    return RunRecord(
        method=method,
        category=kw.pop("category", "code"),
        prompt_ids=[pid] if isinstance(pid, str) else list(pid),
        new_tokens=tokens,
        wall_seconds=seconds,
        steps=steps,
        accepted_at=list(accepted_at),
        proposed_at=list(proposed_at),
        **kw,
    )


@pytest.fixture
def vanilla():
    return {
        "p1": rec("vanilla", "p1", 10, 1.0, steps=10),
        "p2": rec("vanilla", "p2", 20, 4.0, steps=20),
    }


def test_tau_speedup_and_acceptance_by_position(vanilla):
    records = [
        rec("draft", "p1", 10, 0.5, steps=4, accepted_at=[3, 2, 1], proposed_at=[4, 4, 4, 4], proposed_tokens=16,
            accepted_tokens=6, equals_vanilla=True),
        rec("draft", "p2", 20, 1.0, steps=8, accepted_at=[6, 4], proposed_at=[8, 8, 8, 8], proposed_tokens=32,
            accepted_tokens=10, equals_vanilla=False),
    ]  # fmt: skip
    s = summarize(records, vanilla)
    assert s.tau == pytest.approx(30 / 12)
    assert s.tokens_per_second == pytest.approx(30 / 1.5)
    assert s.speedup == pytest.approx(5.0 / 1.5)  # ratio of sums (equal token counts: ratio of times)
    assert s.speedup_mean == pytest.approx((1.0 / 0.5 + 4.0 / 1.0) / 2)  # mean of per-prompt ratios
    # every proposed position appears, also the never-accepted fourth one
    assert s.acceptance_by_position == pytest.approx([9 / 12, 6 / 12, 1 / 12, 0.0])
    assert s.acceptance_rate == pytest.approx(16 / 48)
    assert (s.matches, s.compared, s.prompts, s.steps) == (1, 2, 2, 12)


def test_vanilla_against_itself_is_one(vanilla):
    s = summarize(list(vanilla.values()), vanilla)
    assert s.speedup == pytest.approx(1.0) and s.speedup_mean == pytest.approx(1.0)
    assert s.tau == 1.0 and s.acceptance_by_position == [] and s.acceptance_rate is None
    assert s.matches is None and s.compared is None


def test_speedup_counts_seconds_per_token_when_lengths_differ(vanilla):
    # sample mode: the method wrote twice as many tokens in the same time as vanilla -> twice as fast
    s = summarize([rec("pld", "p1", 20, 1.0, steps=5)], vanilla)
    assert s.speedup == pytest.approx(2.0) and s.speedup_mean == pytest.approx(2.0)


def test_batched_peer_rows(vanilla):
    # one batch of both prompts: throughput over the batch; no per-prompt ratio and no τ
    s = summarize([rec("hf-vanilla", ["p1", "p2"], 30, 2.5, batch_size=2)], vanilla)
    assert s.speedup == pytest.approx((5.0 / 30) / (2.5 / 30))
    assert s.speedup_mean is None and s.tau is None and s.steps is None
    assert s.prompts == 2 and s.batch_size == 2 and tokens_per_second([rec("x", "p", 30, 2.5)]) == 12.0


def test_no_speedup_without_vanilla_for_every_prompt(vanilla):
    assert summarize([rec("pld", "p1", 10, 1.0, steps=5)], None).speedup is None
    s = summarize([rec("pld", "p1", 10, 1.0, steps=5), rec("pld", "p3", 10, 1.0, steps=5)], vanilla)
    assert s.speedup is None and s.speedup_mean is None
    with pytest.raises(ValueError):
        summarize([], vanilla)


def test_first_mismatch():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2], [1, 2, 3]) == 2
    assert first_mismatch([1, 2, 3, 4], [1, 2]) == 2
