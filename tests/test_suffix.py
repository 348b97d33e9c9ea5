"""`suffix`: the frequency tries, the best-first tree, the engine's bounded trie, and losslessness."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from conftest import hf_greedy
from fakes import TableRunner, exact_joint, random_table
from paradec.config import SamplingParams
from paradec.drafters.base import DecodeState
from paradec.drafters.suffix import (
    GlobalSuffixTrie,
    SuffixDrafter,
    SuffixMethod,
    SuffixOptions,
    SuffixTrie,
    best_tree,
)
from paradec.errors import ParadecError
from sampling_check import chi_square_p, sample_counts

PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\nimport sys\n\nprint("]


def dump(trie, node: int = 0) -> list:
    """A trie as nested [(token, count, children)] in its children's order (which breaks `best_tree`'s ties), for
    comparisons: its paths met once (leaves) spelled out."""
    return [(token, trie.count(child), dump(trie, child)) for token, child in trie.kids(node).items()]


def reference_trie(sequences: list[list[int]], depth: int) -> list:
    """The same, built the plain way (nested dicts of counts, children in the order of their first occurrence)."""
    root: dict = {}
    for tokens in sequences:
        for start in range(len(tokens)):
            level = root
            for token in tokens[start : start + depth]:
                count, below = level.get(token, (0, {}))
                level[token] = (count + 1, below)
                level = below

    def listed(level: dict) -> list:
        return [(token, count, listed(below)) for token, (count, below) in level.items()]

    return listed(root)


def unordered(tree: list) -> list:
    """A dumped trie with its children sorted by token: the engine's trie after removals keeps the order of its
    history, which a trie built afresh over the sequences it kept does not have."""
    return sorted((token, count, unordered(below)) for token, count, below in tree)


def test_request_trie_counts_every_substring_and_matches_the_longest_repeated_suffix():
    trie = SuffixTrie(depth=4)
    tokens = [1, 2, 3, 1, 2, 4, 1, 2]
    trie.extend(tokens[:3])
    trie.extend(tokens[3:])  # incremental == at once
    assert dump(trie) == reference_trie([tokens], 4)
    node, length = trie.match(8)  # "1 2" occurred twice before, continued by 3 and 4
    assert length == 2 and {t: trie.count(c) for t, c in trie.kids(node).items()} == {3: 1, 4: 1}
    fresh = SuffixTrie(depth=4)
    fresh.extend([5, 6, 7])
    assert fresh.match(8) == (None, 0)  # nothing repeats: nothing to say


def test_request_trie_leaves_paths_met_once_implicit_and_counts_as_the_plain_trie():
    """A substring met once is a leaf read off the sequence, made a node when met again: fed in pieces of any
    size, every count and child equals the plain trie's, while only suffixes that occurred before stay active."""
    rng = random.Random(3)
    for _ in range(150):
        depth, vocab = rng.randrange(2, 9), rng.randrange(1, 6)
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
        trie, fed = SuffixTrie(depth), 0
        while fed < len(tokens):
            step = rng.randrange(1, 5)
            trie.extend(tokens[fed : fed + step])
            fed = min(fed + step, len(tokens))
            assert dump(trie) == reference_trie([tokens[:fed]], depth)
            assert all(trie.count(node) >= 2 for node, _ in trie.active)
    unique = SuffixTrie(depth=32)
    unique.extend(list(range(100)))  # nothing repeats: 100 leaves, no node, nothing active
    assert len(unique.nodes.children) == 1 and not unique.active and len(unique.kids(0)) == 100
    for _ in range(30):  # the engine's trie alike, across sequences (in order, while nothing was taken out)
        depth, vocab = rng.randrange(2, 9), rng.randrange(1, 5)
        sequences = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 30))] for _ in range(6)]
        shared = GlobalSuffixTrie(depth, max_sequences=100, max_tokens=10_000, max_nodes=10_000)
        for tokens in sequences:
            shared.add(tokens)
        assert dump(shared) == reference_trie(sequences, depth)
        assert shared.nodes == len(shared.trie.children) - 1  # (leaves are not nodes)


def test_best_tree_is_best_first_by_path_probability():
    trie = SuffixTrie(depth=6)
    trie.extend([9, 1, 2, 3, 9, 1, 2, 3, 9, 1, 5, 9])  # after 9: "1 2 3" twice, "1 5" once
    node, length = trie.match(8)
    assert length == 1
    tokens, parents = best_tree(trie, node, 8, min_score=0.0)
    assert tokens[:3] == [1, 2, 3] and parents[:3] == [-1, 0, 1]  # 1 (p=1), 2 (2/3), 3 (2/3)
    assert 5 in tokens and parents[tokens.index(5)] == 0  # the sibling of 2, at 1/3
    assert best_tree(trie, node, 2, min_score=0.0) == ([1, 2], [-1, 0])
    pruned, _ = best_tree(trie, node, 8, min_score=0.5)
    assert 5 not in pruned  # 1/3 < 0.5


def test_engine_trie_is_bounded_and_forgets_the_oldest_exactly():
    rng = random.Random(0)
    trie = GlobalSuffixTrie(depth=5, max_sequences=4, max_tokens=10_000, max_nodes=10_000)
    sequences = [[rng.randrange(6) for _ in range(rng.randrange(3, 30))] for _ in range(12)]
    for i, tokens in enumerate(sequences):
        trie.add(tokens)
        kept = sequences[max(0, i - 3) : i + 1]
        assert unordered(dump(trie)) == unordered(reference_trie(kept, 5))  # removal undoes insertion exactly
        assert trie.nodes == len(trie.trie.children) - 1 == len(trie.trie.counts) - 1  # nothing left behind
    small = GlobalSuffixTrie(depth=8, max_sequences=1000, max_tokens=10_000, max_nodes=300)
    for _ in range(200):
        small.add([rng.randrange(50) for _ in range(40)])
        assert small.nodes <= 300 + 40 * 8  # one sequence over the cap at most, before it goes
    assert small.nodes <= 300 and len(small.sequences) >= 1
    with pytest.raises(ValueError, match="max_tokens 1048577"):  # a leaf packs a token index below 2**20
        GlobalSuffixTrie(depth=8, max_sequences=10, max_tokens=2**20 + 1, max_nodes=100)
    node, length = trie.match(sequences[-1][:4], 8)
    assert length >= 1 and node is not None


def test_engine_trie_takes_back_the_newest_exactly():
    """`drop_newest` (a benchmark's repeats of one prompt, `SuffixMethod.rewind`) undoes the sequences added since a
    mark, also when the bound has taken out older ones meanwhile; a trie made after the mark empties."""
    rng = random.Random(2)
    sequences = [[rng.randrange(6) for _ in range(rng.randrange(3, 30))] for _ in range(9)]
    trie = GlobalSuffixTrie(depth=5, max_sequences=4, max_tokens=10_000, max_nodes=10_000)
    for tokens in sequences[:3]:
        trie.add(tokens)
    mark = trie.added
    for tokens in sequences[3:6]:  # the bound (4 sequences) takes out the two oldest
        trie.add(tokens)
    trie.drop_newest(mark)
    assert unordered(dump(trie)) == unordered(reference_trie(sequences[2:3], 5)) and trie.added == mark == 3
    assert trie.nodes == len(trie.trie.children) - 1 and trie.tokens == len(sequences[2])
    trie.add(sequences[6])  # it goes on as before
    assert unordered(dump(trie)) == unordered(reference_trie([sequences[2], sequences[6]], 5))

    method = SuffixMethod(SimpleNamespace(target=None), SuffixDrafter)
    method.global_trie(5).add(sequences[0])
    mark = method.mark()
    method.global_trie(5).add(sequences[1])
    method.global_trie(8).add(sequences[2])  # made after the mark
    method.rewind(mark)
    assert dump(method.global_trie(5)) == reference_trie(sequences[:1], 5)
    assert method.global_trie(8).nodes == 0 and not method.global_trie(8).sequences


def test_trie_nodes_cost_the_garbage_collector_nothing():
    """Node ids in dicts of ints: the cyclic collector does not track them (one object per node made a full
    collection take 0.3 s at 450k nodes, a stall of every request; the H200 agentic run saw 0.42 s)."""
    import gc

    trie = GlobalSuffixTrie(depth=16, max_sequences=100, max_tokens=100_000, max_nodes=100_000)
    rng = random.Random(1)
    for _ in range(50):
        trie.add([rng.randrange(3) for _ in range(400)])  # (a path met once is a leaf, not a node: repeats)
    assert trie.nodes > 15_000
    assert not any(gc.is_tracked(kids) for kids in trie.trie.children.values())
    assert not gc.is_tracked(trie.trie.counts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_transformers(engines, hf_models, arch):
    engine = engines(f"loop-{arch}")
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(f"loop-{arch}"), engine.encode(prompt), 40)
        for options in ({}, {"max_nodes": 4, "min_match": 1, "use_global": False}, {"adaptive": True}):
            result = engine.generate(prompt, method="suffix", options=options, max_new_tokens=40)
            assert result.token_ids == reference, options
    assert result.stats.tau > 1.5  # the looping target repeats itself: the tries predict it


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_on_the_native_runner_and_in_a_batch(engines, hf_models, arch):
    engine = engines(f"loop-{arch}", runner="native")
    prompts = [engine.encode(p) for p in PROMPTS]
    references = [hf_greedy(hf_models(f"loop-{arch}"), ids, 40) for ids in prompts]
    for ids, reference in zip(prompts, references, strict=True):
        assert engine.generate(ids, method="suffix", max_new_tokens=40).token_ids == reference
    batched = engine.generate_batch(prompts, method="suffix", max_new_tokens=40)
    assert [r.token_ids for r in batched] == references


def test_earlier_outputs_are_matched_across_requests(engines):
    """The engine's trie: a second request that repeats the first one's output gets it proposed from the start."""
    engine = engines("loop-llama")
    first = engine.generate(PROMPTS[0], method="suffix", max_new_tokens=40)
    trie = engine.method("suffix").global_trie(SuffixOptions().max_depth)
    assert any(seq == first.token_ids for seq in trie.sequences)
    again = engine.generate(PROMPTS[0], method="suffix", max_new_tokens=40)
    alone = engine.generate(PROMPTS[0], method="suffix", options={"use_global": False}, max_new_tokens=40)
    assert again.token_ids == alone.token_ids == first.token_ids
    assert again.stats.steps < alone.stats.steps  # the earlier output was drafted


def test_nothing_to_repeat_proposes_nothing():
    target = TableRunner(random_table(8, seed=0))
    method = SuffixMethod(SimpleNamespace(target=target), SuffixDrafter)
    drafter = method.open(SuffixOptions(use_global=False))
    state = DecodeState([1, 2, 3, 4, 5], 5, SamplingParams(), None, torch.device("cpu"), 8)
    drafter.begin(state)
    assert drafter.propose(state, max_tokens=10).size == 0
    state.tokens += [1, 2]  # "1 2" occurred before, followed by 3
    assert drafter.propose(state, max_tokens=10).tokens.tolist()[:3] == [3, 4, 5]
    assert drafter.propose(state, max_tokens=1).size == 1


def test_sampling_matches_plain_sampling():
    """Point-mass verification of suffix trees keeps plain sampling's distribution (a prompt with repeats, so
    trees with siblings are proposed)."""
    table = random_table(4, seed=2, scale=0.8)
    sp = SamplingParams(temperature=1.0)
    prompt = [3, 1, 2, 0, 2, 3, 1, 2, 1, 1, 3, 1, 2]  # '3 1 2' was followed by 0 and by 1: siblings
    target = TableRunner(table)
    method = SuffixMethod(SimpleNamespace(target=target), SuffixDrafter)
    options = SuffixOptions(min_match=1, use_global=False, min_score=0.0, max_nodes=6)
    probe = method.open(options)
    state = DecodeState(list(prompt), len(prompt), sp, None, torch.device("cpu"), 4)
    probe.begin(state)
    assert probe.propose(state, max_tokens=6).parents is not None  # a tree, not a chain
    counts = sample_counts(target, lambda: method.open(options), prompt, sp, 3, 2000)
    assert chi_square_p(counts, exact_joint(table, prompt, 3, sp), 4, 3) > 1e-3


def test_options_are_validated(engines):
    engine = engines("llama")
    with pytest.raises(ParadecError, match="option min_match=9 for method 'suffix' exceeds max_match=4"):
        engine.request("x", method="suffix", options={"min_match": 9, "max_match": 4})
    with pytest.raises(ParadecError, match="option max_match=12 for method 'suffix' must be below max_depth=8"):
        engine.request("x", method="suffix", options={"max_depth": 8})
    with pytest.raises(ParadecError, match=r"option max_depth=.* must be an integer in"):
        engine.request("x", method="suffix", options={"max_depth": 1000})


def test_a_long_copy_is_drafted_deep():
    """Copying a long passage: the match is capped at max_match, so the continuation below it runs max_depth -
    max_match levels deep (a match at the trie's full depth would leave nothing to draft)."""
    target = TableRunner(random_table(64, seed=0))
    method = SuffixMethod(SimpleNamespace(target=target), SuffixDrafter)
    options = SuffixOptions(use_global=False)
    drafter = method.open(options)
    passage = list(range(1, 60))
    state = DecodeState([*passage, 0, *passage[:30]], 90, SamplingParams(), None, torch.device("cpu"), 64)
    drafter.begin(state)
    proposal = drafter.propose(state, max_tokens=64)
    assert proposal.parents is None  # one continuation: a chain
    assert proposal.tokens.tolist() == passage[30 : 30 + options.max_depth - options.max_match]
