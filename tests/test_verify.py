"""Hand-worked cases for the verifier and the tree buffers."""

from __future__ import annotations

import random

import pytest
import torch

from paradec.config import SamplingParams
from paradec.tree import build_tree, device_tree
from paradec.types import Proposal
from paradec.verify import verify

GREEDY = SamplingParams()


def one_hot_logits(picks: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(picks), vocab)
    logits[torch.arange(len(picks)), torch.tensor(picks)] = 5.0
    return logits


def test_greedy_chain_accepts_longest_matching_prefix():
    proposal = Proposal(tokens=torch.tensor([3, 4, 5, 6]))
    # target picks after [pending, 3, 4, 5, 6]: 3, 4, 7, ...: accepts 3, 4; emits 7 (recovered = argmax)
    verdict = verify(proposal, one_hot_logits([3, 4, 7, 1, 2]), GREEDY)
    assert verdict.path == [0, 1]
    assert verdict.tokens == [3, 4, 7]
    assert verdict.accepted == 2 and verdict.proposed == 4


def test_greedy_chain_all_accepted_gives_bonus():
    verdict = verify(Proposal(tokens=torch.tensor([3, 4])), one_hot_logits([3, 4, 6]), GREEDY)
    assert verdict.tokens == [3, 4, 6] and verdict.path == [0, 1]


def test_greedy_empty_proposal_is_a_plain_step():
    verdict = verify(Proposal.empty("cpu"), one_hot_logits([5]), GREEDY)
    assert verdict.tokens == [5] and verdict.path == []


def test_tree_buffers_hand_worked():
    # root -> a(0), b(1); a -> c(2), d(3); d -> e(4)
    tree = build_tree((-1, -1, 0, 0, 3))
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 4]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.mask, expected)
    assert tree.paths == ((0, 2), (0, 1, 3), (0, 1, 4, 5))
    assert tree.max_depth == 3 and not tree.is_chain
    assert build_tree((-1, 0, 1)).is_chain


def test_greedy_tree_follows_the_matching_branch():
    # nodes: a=1 (root child), b=2 (root child), c=3 under a, d=4 under a, e=5 under d
    proposal = Proposal(tokens=torch.tensor([1, 2, 3, 4, 5]), parents=(-1, -1, 0, 0, 3))
    # target picks per input [root, a, b, c, d, e]: root->1 (a), a->4 (d), d->6 (no child e=5): emit 6
    verdict = verify(proposal, one_hot_logits([1, 4, 0, 0, 6, 0]), GREEDY)
    assert verdict.path == [0, 3]
    assert verdict.tokens == [1, 4, 6]


def test_greedy_tree_second_sibling_and_full_depth():
    proposal = Proposal(tokens=torch.tensor([1, 2, 3, 4, 5]), parents=(-1, -1, 0, 0, 3))
    assert verify(proposal, one_hot_logits([2, 0, 7, 0, 0, 0]), GREEDY).tokens == [2, 7]
    verdict = verify(proposal, one_hot_logits([1, 4, 0, 0, 5, 3]), GREEDY)
    assert verdict.path == [0, 3, 4] and verdict.tokens == [1, 4, 5, 3]


def test_rejection_chain_identical_distributions_accepts_all():
    vocab = 6
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    sp = SamplingParams(temperature=1.0, seed=1)
    q = torch.softmax(logits[:3], -1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        draft = torch.multinomial(q, 1, generator=gen).view(-1)
        verdict = verify(Proposal(tokens=draft, probs=q), logits, sp, gen)
        assert verdict.accepted == 3  # p == q: min(1, p/q) = 1
        assert verdict.tokens[:3] == draft.tolist()


def test_rejection_chain_rejects_token_target_forbids():
    # target puts zero mass on token 0 (top-k 1 keeps only token 2): a draft of 0 is always rejected
    logits = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    sp = SamplingParams(temperature=1.0, top_k=1)
    q = torch.tensor([[1.0, 0.0, 0.0]])
    verdict = verify(Proposal(tokens=torch.tensor([0]), probs=q), logits, sp, torch.Generator().manual_seed(0))
    assert verdict.path == [] and verdict.tokens == [2]


def random_parents(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(-1, i) for i in range(n))


@pytest.mark.parametrize("seed", range(40))
def test_device_tree_equals_host_tree(seed):
    rng = random.Random(seed)
    parents = random_parents(rng, rng.randint(0, 40))
    host = build_tree(parents)
    slack = rng.randint(0, 3)  # any upper bound on the depth gives the same buffers
    device = device_tree(torch.tensor(parents, dtype=torch.long), max(host.max_depth, 1) + slack)
    assert torch.equal(device.mask, host.mask) and torch.equal(device.depth, host.depth)
    assert torch.equal(device.parent, host.parent)
    assert device.parents is None and not device.on_host and device.host_parents() == parents


def test_device_tree_too_shallow_bound_is_detectably_wrong():
    # the bound is a promise: a depth-3 tree walked only twice misses the root in its deepest row
    tree = device_tree(torch.tensor([-1, 0, 1]), 2)
    assert tree.depth.tolist() != build_tree((-1, 0, 1)).depth.tolist()


@pytest.mark.parametrize("seed", range(30))
def test_walk_over_a_device_tree_equals_the_host_tree_walk(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    parents = random_parents(rng, n)
    vocab = 6
    tokens = []  # siblings distinct: a child's token is its index among its siblings
    seen: dict[int, int] = {}
    for p in parents:
        tokens.append(seen.get(p, 0))
        seen[p] = seen.get(p, 0) + 1
    logits = torch.randn(n + 1, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    host = verify(Proposal(tokens=torch.tensor(tokens), parents=parents), logits, GREEDY)
    layout = device_tree(torch.tensor(parents, dtype=torch.long), n)
    device = verify(Proposal(tokens=torch.tensor(tokens), layout=layout), logits, GREEDY)
    assert (device.path, device.tokens, device.proposed) == (host.path, host.tokens, host.proposed)
    assert device.depth == host.depth == build_tree(parents).max_depth


def test_proposal_with_layout_rejects_host_parents_and_wrong_sizes():
    layout = device_tree(torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError, match="device layout of 2 nodes"):
        Proposal(tokens=torch.tensor([1, 2, 3]), layout=layout)
    with pytest.raises(ValueError, match="device layout"):
        Proposal(tokens=torch.tensor([1, 2]), parents=(-1, 0), layout=layout)
    assert not Proposal(tokens=torch.tensor([1, 2]), layout=layout).is_chain


@pytest.mark.parametrize("seed", range(12))
def test_greedy_batch_verdicts_equal_each_sequence_verified_alone(seed):
    """`verify_greedy_all` (one argmax and one copy for a whole batch step) gives each sequence the verdict `verify`
    gives it alone: chains, host trees with repeated sibling tokens, device trees, empty proposals, aux rows after
    a proposal; and its pending token for the next step is the same device value."""
    from paradec.verify import verify_greedy_all

    rng = random.Random(seed)
    vocab = 5  # few tokens: many accepted edges, ties between siblings
    seqs, expected, start = [], [], 0
    for b in range(6):
        kind = rng.choice(["empty", "chain", "tree", "device"])
        n = 0 if kind == "empty" else rng.randint(1, 12)
        parents = tuple(range(-1, n - 1)) if kind in ("empty", "chain") else random_parents(rng, n)
        tokens = torch.tensor([rng.randrange(vocab) for _ in range(n)], dtype=torch.long)
        if kind == "device":
            proposal = Proposal(tokens=tokens, layout=device_tree(torch.tensor(parents, dtype=torch.long), n))
        else:
            proposal = Proposal(tokens=tokens, parents=None if kind != "tree" else parents)
        tree = proposal.tree("cpu")
        aux = rng.randint(0, 2) if b % 2 else 0  # rows past the proposal (lookahead's window) are not verified
        seqs.append((start, proposal, tree))
        start += n + 1 + aux
    logits = torch.randn(start, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    for first, proposal, tree in seqs:
        expected.append(verify(proposal, logits[first : first + proposal.size + 1], GREEDY, tree=tree))
    got = verify_greedy_all(logits, seqs)
    for g, e in zip(got, expected, strict=True):
        assert (g.path, g.tokens, g.proposed, g.depth) == (e.path, e.tokens, e.proposed, e.depth)
        assert torch.equal(g.final_device, e.final_device)


def test_a_chain_proposal_takes_the_chain_tree_by_length():
    """`Proposal.tree` of a chain comes from `chain_tree` (looked up by length): the buffers of its parents."""
    from paradec.tree import chain_parents, chain_tree

    for n in (0, 1, 5):
        built = build_tree(chain_parents(n))
        tree = Proposal(tokens=torch.arange(n)).tree("cpu")
        assert tree is chain_tree(n, "cpu") and tree.parents == built.parents == chain_parents(n)
        assert torch.equal(tree.depth, built.depth) and torch.equal(tree.mask, built.mask) and tree.is_chain
