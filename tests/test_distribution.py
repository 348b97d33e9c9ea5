"""Speculative sampling reproduces plain sampling: the joint distribution of the first new tokens.

A fake target (logits from a table indexed by the last two tokens, vocabulary of 4) lets us enumerate the exact
distribution of three new tokens under plain sampling with the same warping, and run the real decode loop
thousands of times per method. A chi-square test must accept every verifier path (chain with q, point-mass chain,
point-mass tree, tree with q) and must reject deliberately wrong verifiers.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fakes import TableRunner, exact_joint, random_table
from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import DecodeState, Drafter
from paradec.drafters.vanilla import Vanilla
from paradec.sampling import sample, warp
from paradec.types import Proposal, Verdict
from paradec.verify import verify
from sampling_check import chi_square_p

VOCAB = 4
NEW = 3
PROMPT = [1, 2]


class TableDraft(Drafter):
    """Samples a chain from its own (different) table, reporting q."""

    name = "table-draft"

    def __init__(self, table: torch.Tensor, k: int) -> None:
        super().__init__(None, None)
        self.table, self.k = table, k

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        context = list(state.tokens)
        tokens, probs = [], []
        for _ in range(min(self.k, max_tokens)):
            q = warp(self.table[context[-2] if len(context) > 1 else 0, context[-1]], state.sampling)
            token = int(sample(q, state.generator))
            tokens.append(token)
            probs.append(q)
            context.append(token)
        if not tokens:
            return Proposal.empty("cpu")
        return Proposal(tokens=torch.tensor(tokens), probs=torch.stack(probs))


class FixedChain(Drafter):
    """Point masses: always proposes the same tokens (as prompt lookup would, with no q)."""

    name = "fixed-chain"

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(None, None)
        self.tokens = tokens

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        return Proposal(tokens=torch.tensor(self.tokens[: max(max_tokens, 0)], dtype=torch.long))


class FixedTree(Drafter):
    """Point-mass tree: two children of the root, each with two children (distinct siblings)."""

    name = "fixed-tree"
    parents = (-1, -1, 0, 0, 1, 1)
    tokens = (0, 1, 2, 3, 1, 0)

    def __init__(self) -> None:
        super().__init__(None, None)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        if max_tokens >= 2:
            return Proposal(tokens=torch.tensor(self.tokens), parents=self.parents)
        if max_tokens == 1:
            return Proposal(tokens=torch.tensor(self.tokens[:2]), parents=self.parents[:2])
        return Proposal.empty("cpu")


class SampledTree(Drafter):
    """Tree with q: at the root draws 2 children without replacement from q, then one child below each."""

    name = "sampled-tree"

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(None, None)
        self.table = table

    def _q(self, context, sp):
        return warp(self.table[context[-2] if len(context) > 1 else 0, context[-1]], sp)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        if max_tokens < 2:
            return Proposal.empty("cpu")
        q_root = self._q(state.tokens, state.sampling)
        first = int(sample(q_root, state.generator))
        q_rest = q_root.clone()
        q_rest[first] = 0
        if q_rest.sum() == 0:
            return Proposal(tokens=torch.tensor([first]), parents=(-1,), probs=q_root.view(1, -1))
        second = int(sample(q_rest / q_rest.sum(), state.generator))
        tokens, parents, probs = [first, second], [-1, -1], [q_root, q_root]
        for i, child in enumerate((first, second)):
            q = self._q([*state.tokens, child], state.sampling)
            tokens.append(int(sample(q, state.generator)))
            parents.append(i)
            probs.append(q)
        return Proposal(tokens=torch.tensor(tokens), parents=tuple(parents), probs=torch.stack(probs))


def test_warps_leave_many_outcomes():
    """Guards the test's power: each warp leaves many 3-token outcomes, and warping really removes some."""
    for sp in WARPS.values():
        assert len(exact_joint(TARGET_TABLE, PROMPT, NEW, sp)) >= 20
    assert len(exact_joint(TARGET_TABLE, PROMPT, NEW, WARPS["warped"])) < VOCAB**NEW


def run_many(drafter_factory, sp: SamplingParams, samples: int, verifier=verify, seed: int = 0) -> Counter:
    target = TableRunner(TARGET_TABLE)
    counts: Counter = Counter()
    generator_seed = seed
    for _ in range(samples):
        generator_seed += 1
        sp_i = SamplingParams(sp.temperature, sp.top_k, sp.top_p, sp.min_p, seed=generator_seed)
        gen = Generation(target, drafter_factory(), None, PROMPT, sp_i, NEW, set(), [], "test", verifier=verifier)
        counts[tuple(gen.run().token_ids)] += 1
    return counts


def p_value(counts: Counter, sp: SamplingParams) -> float:
    return chi_square_p(counts, exact_joint(TARGET_TABLE, PROMPT, NEW, sp), VOCAB, NEW)


TARGET_TABLE = random_table(VOCAB, seed=1, scale=0.8)
DRAFT_TABLE = random_table(VOCAB, seed=7, scale=1.5)
WARPS = {
    "plain": SamplingParams(temperature=1.0),
    "warped": SamplingParams(temperature=1.3, top_k=3, top_p=0.9),
    "min_p": SamplingParams(temperature=1.0, min_p=0.2),
}
DRAFTERS = {
    "vanilla": lambda: Vanilla(None, None),
    "chain_q": lambda: TableDraft(DRAFT_TABLE, k=2),
    "chain_points": lambda: FixedChain([3, 1]),
    "tree_points": FixedTree,
    "tree_q": lambda: SampledTree(DRAFT_TABLE),
}
SAMPLES = 2000


@pytest.mark.parametrize("drafter", list(DRAFTERS))
@pytest.mark.parametrize("warp_name", list(WARPS))
def test_speculative_sampling_matches_plain_sampling(drafter, warp_name):
    sp = WARPS[warp_name]
    counts = run_many(DRAFTERS[drafter], sp, SAMPLES)
    assert p_value(counts, sp) > 1e-3


def resample_from_target(proposal, logits, sp, generator=None, tree=None):
    """WRONG: chain rejection sampling that draws the recovered token from p instead of norm(max(0, p - q))."""
    p = warp(logits, sp)
    draft = proposal.tokens.tolist()
    for i, token in enumerate(draft):
        if float(torch.rand((), generator=generator)) * float(proposal.probs[i, token]) >= float(p[i, token]):
            recovered = int(sample(p[i], generator))  # the bug: should be the residual
            return Verdict(path=list(range(i)), tokens=[*draft[:i], recovered], proposed=len(draft), depth=len(draft))
    bonus = int(sample(p[len(draft)], generator))
    return Verdict(path=list(range(len(draft))), tokens=[*draft, bonus], proposed=len(draft), depth=len(draft))


def accept_everything(proposal, logits, sp, generator=None, tree=None):
    """WRONG: accepts every chain draft, then samples the bonus token from p."""
    n = proposal.size
    bonus = int(sample(warp(logits[n], sp), generator))
    return Verdict(path=list(range(n)), tokens=[*proposal.tokens.tolist(), bonus], proposed=n, depth=n)


@pytest.mark.parametrize("wrong", [resample_from_target, accept_everything])
def test_wrong_verifier_is_caught(wrong):
    sp = WARPS["plain"]
    counts = run_many(DRAFTERS["chain_q"], sp, SAMPLES, verifier=wrong)
    assert p_value(counts, sp) < 1e-6
