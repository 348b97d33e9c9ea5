"""Chi-square check that a method's sampled tokens follow plain sampling, for any prompt, target and drafter.

The harness of tests/test_distribution.py (which fixes its prompt and target), opened up: run the real
decode loop many times with seeds 1..samples and compare the counts of the first `new` tokens with their exact
probabilities under plain sampling (`exact` maps every sequence of `new` tokens to its probability).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Callable

from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import Drafter
from paradec.runners.base import Runner


def sample_counts(
    target: Runner, make_drafter: Callable[[], Drafter], prompt: list[int], sp: SamplingParams, new: int, samples: int
) -> Counter:
    counts: Counter = Counter()
    for seed in range(1, samples + 1):
        gen = Generation(
            target, make_drafter(), None, prompt, dataclasses.replace(sp, seed=seed), new, set(), [], "test"
        )
        counts[tuple(gen.run().token_ids)] += 1
    return counts


def chi_square_p(counts: Counter, exact: dict[tuple[int, ...], float], vocab: int, new: int) -> float:
    """p-value of the counts against the exact distribution (cells expecting < 5 pooled into one)."""
    from scipy.stats import chisquare  # here: the GPU machine has no scipy, and its CUDA tests import this module

    assert set(counts) <= set(exact), "sampled a sequence of probability 0"
    total = sum(counts.values())
    observed, expected = [], []
    small_obs = small_exp = 0.0
    for seq in itertools.product(range(vocab), repeat=new):
        e = exact.get(seq, 0.0) * total
        if e < 5:
            small_obs += counts.get(seq, 0)
            small_exp += e
        else:
            observed.append(counts.get(seq, 0))
            expected.append(e)
    if small_exp > 0:
        observed.append(small_obs)
        expected.append(small_exp)
    scale = total / sum(expected)  # exact probabilities sum to 1 up to float rounding
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)
