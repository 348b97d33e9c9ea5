"""Adaptive draft length for chain drafters: choose k to maximise expected tokens per second of step time.

A chain drafter that proposes k tokens gains E(k) tokens per step at a step cost c(k). This module owns the
policy that picks k in [1, max_k] before every step from what the generation has observed so far:

- acceptance, per draft position: β_i = P(position i accepted | position i - 1 accepted), from decayed counts of
  the steps that reached position i, shrunk towards the global per-token rate α (accepted / (accepted +
  rejections)) so a position seldom proposed falls back to α. Then E(k) = 1 + Σ_{j=1..k} Π_{i<j} β_i
  (the accepted prefix plus the bonus/recovered token).
- cost: the wall time of each step, measured from one `observe` to the next (every step ends with the verifier's
  host sync, so this is the step's real time: drafting, target forward, verification). c(k) is the median of the
  recent steps that proposed k tokens; for lengths not seen recently, a least-squares line through the measured
  lengths (or, with a single measured length, the drafter's prior cost ratio per draft token).

k* = argmax E(k) / c(k) (ties go to the longer draft). Every `explore_every`-th step tries a neighbour of k*
so the cost and acceptance of the lengths next to it stay measured. HF's heuristic (k += 2 after a fully accepted
draft, k -= 1 otherwise) is the acceptance-only special case; here the measured cost decides too, e.g. a
prompt-lookup draft is nearly free to score on a GPU, a draft-model token is not.

The policy only changes how many tokens are proposed, never how they are verified: every method stays lossless.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from statistics import median


class AdaptiveLength:
    """The draft-length policy of one generation: `start`, then per step `next_k` -> (the step) -> `observe`."""

    def __init__(
        self,
        max_k: int,
        *,
        draft_cost: float,
        start_k: int | None = None,
        decay: float = 0.95,
        prior_strength: float = 2.0,
        window: int = 8,
        explore_every: int = 8,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`max_k`: the longest draft; `draft_cost`: prior cost of one draft token relative to a step that proposes
        nothing (used until step times are measured); `start_k`: the first draft length (default max_k); `decay`:
        weight kept by past steps' acceptance counts per step; `window`: step times kept per draft length;
        `explore_every`: steps between tries of a neighbouring length; `clock`: seconds (tests pass a fake one)."""
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        self.max_k = max_k
        self.draft_cost = draft_cost
        self.decay = decay
        self.prior_strength = prior_strength
        self.window = window
        self.explore_every = explore_every
        self.clock = clock
        self.reached = [0.0] * max_k  # [max_k] decayed count of steps that proposed position i with i - 1 accepted
        self.accepted = [0.0] * max_k  # [max_k] decayed count of steps that accepted position i
        self.rejections = 0.0  # decayed count of steps that rejected a draft token
        self.times: dict[int, deque[float]] = {}  # proposal length -> recent step times (seconds)
        self.steps = 0
        self.k = max_k if start_k is None else min(max(start_k, 1), max_k)
        self._last: float | None = None

    def start(self) -> None:
        """Start timing: the next `observe` measures the step from now."""
        self._last = self.clock()

    def next_k(self) -> int:
        """The draft length for the next step."""
        return self.k

    def observe(self, proposed: int, accepted: int) -> None:
        """Record a finished step (its draft length and accepted count) and choose the next k."""
        now = self.clock()
        if self._last is not None:
            self.times.setdefault(proposed, deque(maxlen=self.window)).append(now - self._last)
        self._last = now
        if proposed > 0:
            for i in range(self.max_k):
                self.reached[i] *= self.decay
                self.accepted[i] *= self.decay
            self.rejections *= self.decay
            for i in range(min(accepted + 1, proposed, self.max_k)):
                self.reached[i] += 1.0
            for i in range(min(accepted, self.max_k)):
                self.accepted[i] += 1.0
            if accepted < proposed:
                self.rejections += 1.0
        self.steps += 1
        best = self.best_k()
        if self.explore_every and self.steps % self.explore_every == 0 and self.max_k > 1:
            best = best + 1 if best < self.max_k else best - 1
        self.k = best

    def acceptance(self) -> list[float]:
        """[max_k] estimated β_i: the probability that position i is accepted given position i - 1 was."""
        total = sum(self.accepted)
        alpha = (total + 1.0) / (total + self.rejections + 2.0)  # per-token rate, Laplace-smoothed
        s = self.prior_strength
        return [(a + s * alpha) / (n + s) for a, n in zip(self.accepted, self.reached)]

    def expected_tokens(self) -> list[float]:
        """[max_k + 1] E(k): expected tokens emitted by a step proposing k draft tokens (k = 0..max_k)."""
        out, reach = [1.0], 1.0
        for beta in self.acceptance():
            reach *= beta
            out.append(out[-1] + reach)
        return out

    def step_cost(self) -> list[float]:
        """[max_k + 1] c(k): estimated step time for k draft tokens (seconds, or relative units before timing)."""
        measured = {k: median(t) for k, t in self.times.items() if t}
        if not measured:
            return [1.0 + self.draft_cost * k for k in range(self.max_k + 1)]
        if len(measured) == 1:
            k0, t0 = next(iter(measured.items()))
            line = [t0 * (1.0 + self.draft_cost * k) / (1.0 + self.draft_cost * k0) for k in range(self.max_k + 1)]
        else:
            ks, ts = list(measured), list(measured.values())
            mean_k, mean_t = sum(ks) / len(ks), sum(ts) / len(ts)
            slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts)) / sum((k - mean_k) ** 2 for k in ks)
            slope = max(slope, 0.0)  # longer drafts never cost less: a negative slope is noise
            line = [mean_t + slope * (k - mean_k) for k in range(self.max_k + 1)]
        return [max(measured.get(k, line[k]), 1e-9) for k in range(self.max_k + 1)]  # a coarse clock may read 0

    def best_k(self) -> int:
        gain, cost = self.expected_tokens(), self.step_cost()
        rate = [gain[k] / cost[k] for k in range(self.max_k + 1)]
        return max(range(1, self.max_k + 1), key=lambda k: (rate[k], k))
