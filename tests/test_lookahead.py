"""Lookahead decoding: the n-gram pool, the candidate trie, the lookahead branch's layout (hand-worked and against
scoring each of its sequences as a chain), greedy equality with `transformers`, and exact sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import ARCHS, hf_greedy
from fakes import TableRunner, exact_joint, random_table
from paradec.config import SamplingParams
from paradec.drafters.base import DecodeState
from paradec.drafters.lookahead import Lookahead, LookaheadOptions, NgramPool, build_trie, lookahead_layout
from paradec.errors import ParadecError
from paradec.runners import HFRunner, load_hf_model, prefill
from paradec.runners.base import RunnerOutput
from paradec.tree import build_tree
from sampling_check import chi_square_p, sample_counts

PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop",
]


def test_pool_keeps_the_most_recent_continuations_per_token():
    pool = NgramPool(n=3, capacity=2)
    pool.extend([1, 2, 3, 1, 4, 5, 1, 2, 3])
    assert pool.candidates(1, 5) == [(2, 3), (4, 5)]  # (1, 2, 3) seen again last: most recent first
    pool.add([1, 6, 7])
    assert pool.candidates(1, 5) == [(6, 7), (2, 3)]  # over capacity: the oldest, (4, 5), is gone
    assert pool.candidates(1, 1) == [(6, 7)]
    assert pool.candidates(9, 3) == []


def test_pool_extends_incrementally():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    grown, whole = NgramPool(3, 4), NgramPool(3, 4)
    for end in range(len(tokens) + 1):
        grown.extend(tokens[:end])
    whole.extend(tokens)
    assert grown.table == whole.table


def test_trie_merges_shared_prefixes():
    tokens, parents = build_trie([(1, 2, 3), (1, 2, 4), (5, 6, 7), (1, 2, 3)], max_depth=3)
    assert tokens == [1, 2, 3, 4, 5, 6, 7]
    assert parents == (-1, 0, 1, 1, -1, 4, 5)
    tokens, parents = build_trie([(1, 2, 3), (1, 8)], max_depth=2)  # chains cut to the depth limit
    assert tokens == [1, 2, 8] and parents == (-1, 0, 0)
    assert build_trie([], max_depth=4) == ([], ())
    tokens, parents = build_trie([(1, 2, 3), (1, 4, 5), (6,)], max_depth=3, max_nodes=4)  # node budget
    assert tokens == [1, 2, 3, 4] and parents == (-1, 0, 1, 0)


def test_lookahead_branch_layout_hand_worked():
    """W = 3, N = 3 (the table in the module docstring): level l, column i at offset 1 + l + i."""
    depth, mask = lookahead_layout(window=3, levels=2)
    assert depth.tolist() == [1, 2, 3, 2, 3, 4]
    x = 1  # columns: pending token, (0,0), (0,1), (0,2), (1,0), (1,1), (1,2)
    expected = [
        [x, 1, 0, 0, 0, 0, 0],
        [x, 1, 1, 0, 0, 0, 0],
        [x, 1, 1, 1, 0, 0, 0],
        [x, 1, 0, 0, 1, 0, 0],
        [x, 1, 1, 0, 0, 1, 0],
        [x, 1, 1, 1, 0, 0, 1],
    ]
    assert mask.int().tolist() == expected


def test_lookahead_branch_logits_equal_its_sequences_scored_as_chains(model_dirs):
    """Each branch input sees exactly the sequence x, (0,0..i), (1..l, i): scored together with a verification
    tree, its logits equal that sequence's last logits from a plain chain forward, and nothing of it is kept."""
    path = model_dirs["llama"]
    runner = HFRunner(load_hf_model(path, torch.device("cpu"), torch.float32))
    prefill(runner, torch.tensor([5, 6, 7]))
    window, levels = 3, 3
    levels_tokens = torch.arange(20, 20 + window * levels).view(levels, window)  # [N-1, W]
    depth, mask = lookahead_layout(window, levels)
    tree = build_tree((-1, 0, -1))  # verification branch: 8 -> (9 -> 10), 11
    n = 3
    aux_mask = torch.cat([mask[:, :1], torch.zeros(window * levels, n, dtype=torch.bool), mask[:, 1:]], 1)
    layout = tree.with_aux(depth, aux_mask)
    out = runner.forward(torch.cat([torch.tensor([8, 9, 10, 11]), levels_tokens.view(-1)]), layout)
    runner.commit([0, 1])
    for level in range(levels):
        for i in range(window):
            sequence = [8, *levels_tokens[0, : i + 1].tolist(), *levels_tokens[1 : level + 1, i].tolist()]
            chain = HFRunner(load_hf_model(path, torch.device("cpu"), torch.float32))
            prefill(chain, torch.tensor([5, 6, 7]))
            expected = chain.forward(torch.tensor(sequence), logits="last").logits[0]
            torch.testing.assert_close(out.logits[1 + n + level * window + i], expected, rtol=1e-4, atol=1e-4)
    fresh = HFRunner(load_hf_model(path, torch.device("cpu"), torch.float32))
    prefill(fresh, torch.tensor([5, 6, 7, 8, 9]))
    for a, b in zip(runner._cache.layers, fresh._cache.layers):
        torch.testing.assert_close(torch.cat([a.keys, a.values]), torch.cat([b.keys, b.values]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(engines, hf_models, arch):
    engine = engines(arch)
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
        for options in ({}, {"window": 3, "ngram": 2, "guesses": 2, "lookup": 0}):
            assert (
                engine.generate(prompt, method="lookahead", options=options, max_new_tokens=40).token_ids == reference
            )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_on_the_native_runner(engines, hf_models, arch):
    engine = engines(arch, runner="native")
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
        assert engine.generate(prompt, method="lookahead", max_new_tokens=40).token_ids == reference


def test_lookahead_branch_adds_accepted_drafts(engines, hf_models):
    """On a looping target, with prompt lookup off: the text's own n-grams get drafts accepted, and the Jacobi
    branch's n-grams (guesses of what comes next) get more accepted."""
    engine = engines("loop-llama")
    prompt = PROMPTS[0]
    reference = hf_greedy(hf_models("loop-llama"), engine.encode(prompt), 60)
    text_only = engine.generate(prompt, method="lookahead", options={"lookup": 0, "window": 0}, max_new_tokens=60)
    branch = engine.generate(prompt, method="lookahead", options={"lookup": 0}, max_new_tokens=60)
    assert text_only.token_ids == branch.token_ids == reference
    assert len(reference) == 60
    assert 1.5 < text_only.stats.tau < branch.stats.tau


def test_branch_is_dropped_where_it_would_not_fit_the_context(engines, hf_models):
    """Near the end of the context (256 positions) the branch's inputs and a full tree no longer fit; decoding goes
    on without the branch and with a smaller tree."""
    engine = engines("gpt2")  # learned position embeddings: a position past the context would fail loudly
    ids = engine.encode(PROMPTS[1] * 12)[:200]
    assert len(ids) == 200
    reference = hf_greedy(hf_models("gpt2"), ids, 56)
    assert engine.generate(ids, method="lookahead", options={"window": 10}, max_new_tokens=56).token_ids == reference


class AuxTableRunner(TableRunner):
    """`fakes.TableRunner` that also scores auxiliary inputs: an aux input's predecessor is the input it attends to
    one position before it."""

    def forward(self, token_ids, tree=None, *, logits="all", hidden=False) -> RunnerOutput:
        if tree is None or tree.size == len(tree.parents) + 1:
            return super().forward(token_ids, tree, logits=logits, hidden=hidden)
        tree_size = len(tree.parents) + 1
        out = super().forward(token_ids[:tree_size], build_tree(tree.parents), logits="all")
        ids, rows = token_ids.tolist(), [out.logits]
        for j in range(tree_size, len(ids)):
            before = [k for k in range(j) if tree.mask[j, k] and tree.depth[k] == tree.depth[j] - 1]
            rows.append(self.table[ids[before[-1]], ids[j]][None])
        return RunnerOutput(logits=torch.cat(rows))


def test_sampling_matches_plain_sampling():
    """Point-mass verification of pool trees (three distinct continuations of the pending token 2 from the
    prompt's n-grams, plus the prompt-lookup candidate) keeps plain sampling's distribution."""
    table = random_table(4, seed=1, scale=0.8)
    sp = SamplingParams(temperature=1.0)
    prompt = [2, 3, 1, 2, 0, 1, 2, 1, 3, 2]
    target = AuxTableRunner(table)
    resources = SimpleNamespace(target=target)
    options = LookaheadOptions(window=2, ngram=3, guesses=3, lookup=3)
    first = Lookahead(resources, options)
    state = DecodeState(list(prompt), len(prompt), sp, None, torch.device("cpu"), 4)
    first.begin(state)
    assert first.propose(state, max_tokens=2).parents == (-1, 0, -1, 2, -1, 4)  # siblings 1, 0, 3 under the root
    counts = sample_counts(target, lambda: Lookahead(resources, options), prompt, sp, 3, 2000)
    assert chi_square_p(counts, exact_joint(table, prompt, 3, sp), 4, 3) > 1e-3


def test_options_are_validated(engines):
    engine = engines("llama")
    for options, name in (({"ngram": 1}, "ngram"), ({"window": -1}, "window"), ({"guesses": 0}, "guesses")):
        with pytest.raises(ParadecError, match=f"option {name}=.* for method 'lookahead' must be an integer in"):
            engine.generate("def", method="lookahead", options=options)
    with pytest.raises(ParadecError, match="unknown option 'W'"):
        engine.generate("def", method="lookahead", options={"W": 4})
