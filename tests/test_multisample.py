"""n samples of one prompt (`Request.n`, `Engine.generate(n=...)`) and the `multisample` drafter.

Samples: sample i of a seeded request is the request of one sample seeded seed + i; n > 1 decodes as n sequences of
one batch on the native runner and one after another elsewhere; a method whose drafter reads nothing of its siblings
(vanilla, pld) gives each sample exactly what it gives alone. `multisample`: a unit test with handcrafted siblings
(the longest suffix match, the tree of the distinct continuations ranked by agreement, the node budget, the shared
index, read-only views), alone it proposes what pld proposes; greedy equality with `transformers` for n = 1 and 3;
the chi-square check of its sampled tokens, and that the check catches a verifier that accepts every draft. Then the
checks of `n`.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter, deque

import pytest
import torch
from scipy.stats import binomtest

import paradec
import paradec.drafters.multisample as multisample
from conftest import hf_greedy
from paradec.batch import Siblings, TokenView
from paradec.cli import main
from paradec.config import SamplingParams
from paradec.drafters.base import DecodeState
from paradec.drafters.multisample import MultiSample, MultiSampleOptions, SiblingIndex, build_tree
from paradec.drafters.pld import PLDOptions, PromptLookup
from paradec.errors import ParadecError
from paradec.sampling import sample, warp
from paradec.types import Verdict
from paradec.zoo import code_draft_dir, code_model_dir
from sampling_check import chi_square_p

PROMPT = "def fibonacci(n):\n"
NEW = 24
HOT = {"temperature": 0.8, "seed": 11}


@pytest.fixture(scope="module")
def code_engine():
    return paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")


# --- samples ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vanilla", "pld"])
def test_each_sample_equals_its_seed_alone(code_engine, method):
    """Sample i of n = 4 (one batch, speculation forced on) is the generation of one sample seeded seed + i."""
    choices = code_engine.generate(PROMPT, method=method, n=4, max_new_tokens=NEW, sampling=HOT, speculate="always")
    assert isinstance(choices, list) and len(choices) == 4
    for i, choice in enumerate(choices):
        alone = code_engine.generate(PROMPT, method=method, max_new_tokens=NEW, sampling={**HOT, "seed": 11 + i})
        assert choice.token_ids == alone.token_ids and choice.text == alone.text, (method, i)
        assert choice.finish_reason == alone.finish_reason and choice.stats.method == method
    assert len({tuple(c.token_ids) for c in choices}) > 1  # the seeds differ, so do the choices


def test_multisample_choices_are_reproducible_and_differ(code_engine):
    """A multisample sample reads its siblings' tokens, so its draws differ from its seed's alone (the verifier
    spends the generator per scored input: other drafts, other draws; each is still an exact sample, see the
    chi-square test); the same request gives the same choices again under a fixed speculation policy (`auto`
    decides from measured step times, so a sampled request's draws may follow the machine's timing there)."""
    first = code_engine.generate(
        PROMPT, method="multisample", n=4, max_new_tokens=NEW, sampling=HOT, speculate="always"
    )
    again = code_engine.generate(
        PROMPT, method="multisample", n=4, max_new_tokens=NEW, sampling=HOT, speculate="always"
    )
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1
    assert all(c.stats.method == "multisample" and len(c.token_ids) >= 1 for c in first)


def test_greedy_samples_are_n_equal_answers(code_engine, engines):
    alone = code_engine.generate(PROMPT, method="multisample", max_new_tokens=NEW)
    for method in ("vanilla", "multisample"):
        choices = code_engine.generate(PROMPT, method=method, n=3, max_new_tokens=NEW)
        assert [c.token_ids for c in choices] == [alone.token_ids] * 3, method
    hf = engines("llama")  # the generic runner: one after another
    single = hf.generate([5, 9, 2, 7], method="multisample", max_new_tokens=12)
    assert [c.token_ids for c in hf.generate([5, 9, 2, 7], method="multisample", n=3, max_new_tokens=12)] == [
        single.token_ids
    ] * 3


def test_samples_one_after_another_read_the_earlier_ones(engines, monkeypatch):
    """On a runner that does not batch (HF), sample i's drafter is lent samples 0..i-1 as siblings; samples of a
    method that reads nothing of them equal their seeds alone."""
    engine = engines("loop-llama")
    prompt = [5, 9, 2, 7, 5, 9, 2]
    sampling = {"temperature": 1.0, "seed": 3}
    for method in ("vanilla", "pld"):
        choices = engine.generate(prompt, method=method, n=3, max_new_tokens=10, sampling=sampling)
        for i, choice in enumerate(choices):
            expected = engine.generate(prompt, method=method, max_new_tokens=10, sampling={**sampling, "seed": 3 + i})
            assert choice.token_ids == expected.token_ids
    seen = []
    real = MultiSample.candidates

    def spy(self, tokens, depth):
        seen.append((self.siblings.sample, [list(v.generated()) for v in self.siblings.others()]))
        return real(self, tokens, depth)

    monkeypatch.setattr(MultiSample, "candidates", spy)
    choices = engine.generate(prompt, method="multisample", n=3, max_new_tokens=10, sampling=sampling)
    last = {sample: others for sample, others in seen}
    assert last[0] == [] and last[2] == [choices[0].token_ids, choices[1].token_ids]


def test_a_batch_holds_requests_of_several_samples(code_engine):
    prompts = ["x", PROMPT]
    requests = [code_engine.request(p, method="multisample", max_new_tokens=12, n=2) for p in prompts]
    requests.append(code_engine.request("class Stack:\n", method="pld", max_new_tokens=12))
    results = code_engine.generate_batch(requests, max_batch=3)  # 5 sequences through 3 slots
    assert [len(r) for r in results[:2]] == [2, 2] and not isinstance(results[2], list)
    for prompt, choices in zip(prompts, results, strict=False):
        alone = code_engine.generate(prompt, method="multisample", max_new_tokens=12)
        assert [c.token_ids for c in choices] == [alone.token_ids] * 2
    assert results[2].token_ids == code_engine.generate("class Stack:\n", method="pld", max_new_tokens=12).token_ids


# --- the drafter, with handcrafted siblings -----------------------------------------------------------------------
class Lent:
    """Resources of a sample whose siblings are fixed token lists (`shared` as a group's)."""

    def __init__(self, others: list[list[int]], prompt_len: int, shared: dict | None = None, sample: int = 0):
        views = [TokenView(tokens, prompt_len, sample + 1 + i) for i, tokens in enumerate(others)]
        self._siblings = Siblings(sample, lambda: views, {} if shared is None else shared)
        self.target = None

    def siblings(self) -> Siblings:
        return self._siblings


def state_of(tokens: list[int], prompt_len: int, max_length: int = 1 << 20) -> DecodeState:
    return DecodeState(
        tokens=list(tokens),
        prompt_len=prompt_len,
        sampling=SamplingParams(),
        generator=None,
        device=torch.device("cpu"),
        vocab_size=64,
        max_length=max_length,
    )


def proposed(drafter, tokens, prompt_len, max_tokens=64, **kw) -> tuple[list[int], tuple[int, ...] | None]:
    proposal = drafter.propose(state_of(tokens, prompt_len, **kw), max_tokens)
    return proposal.tokens.tolist(), proposal.parents


P = [1, 2, 3]


def test_siblings_continuations_make_a_tree_ranked_by_agreement():
    others = [[*P, 7, 8, 4, 5], [*P, 7, 8, 4, 6], [*P, 7, 8, 9], [*P, 5]]
    options = MultiSampleOptions(max_ngram=2, min_ngram=1, max_nodes=24)
    drafter = MultiSample(Lent(others, len(P)), options)
    # own suffix (7, 8) occurs in three siblings: 4 (two agree) then 5 | 6, and 9; the fourth has no match
    assert proposed(drafter, [*P, 7, 8], len(P)) == ([4, 9, 5, 6], (-1, -1, 0, 0))
    small = MultiSample(Lent(others, len(P)), dataclasses.replace(options, max_nodes=3))
    assert proposed(small, [*P, 7, 8], len(P)) == ([4, 9, 5], (-1, -1, 0))
    shallow = MultiSample(Lent(others, len(P)), dataclasses.replace(options, num_draft_tokens=1))
    assert proposed(shallow, [*P, 7, 8], len(P)) == ([4, 9], (-1, -1))
    assert proposed(drafter, [*P, 7, 8], len(P), max_tokens=1) == ([4, 9], (-1, -1))  # the step's depth
    assert proposed(drafter, [*P, 7, 8], len(P), max_length=len(P) + 4) == ([4, 9], (-1, -1))  # the context's room
    assert proposed(drafter, [*P, 7, 8], len(P), max_tokens=0) == ([], None)


def test_the_longest_match_wins_and_a_sibling_ahead_is_copied():
    # a sibling ahead of us on the same path: the two-token match (3, 7) beats the other's one-token match (7)
    drafter = MultiSample(Lent([[*P, 7, 8, 9, 10], [*P, 6, 7, 0]], len(P)), MultiSampleOptions(max_ngram=3))
    assert proposed(drafter, [*P, 7], len(P)) == ([8, 9, 10], None)  # one candidate: a chain
    # a match inside the sibling's prompt is not a sibling's continuation (the own context has the prompt)
    drafter = MultiSample(Lent([[*P, 9]], len(P)), MultiSampleOptions(max_ngram=1, max_nodes=10))
    assert proposed(drafter, [*P, 1], len(P)) == ([2, 3, 1, 2, 3, 1, 2, 3, 1, 2], None)  # own: the prompt's period
    # own context and siblings at the same match length: own first, merged where they agree
    drafter = MultiSample(Lent([[*P, 5, 2, 3, 6]], len(P)), MultiSampleOptions(max_ngram=2, num_draft_tokens=3))
    assert proposed(drafter, [*P, 4, 2, 3], len(P)) == ([4, 6, 2, 3], (-1, -1, 0, 2))
    # nothing matches anywhere: no proposal
    drafter = MultiSample(Lent([[*P, 5]], len(P)), MultiSampleOptions(max_ngram=2, min_ngram=2))
    assert proposed(drafter, [*P, 9, 8], len(P)) == ([], None)


def test_the_samples_share_one_index_and_read_views_only():
    shared: dict = {}
    a, b = [[*P, 7, 8, 4]], [[*P, 7, 8, 5]]
    first = MultiSample(Lent(a, len(P), shared, sample=0), MultiSampleOptions())
    second = MultiSample(Lent(b, len(P), shared, sample=5), MultiSampleOptions())
    first.propose(state_of([*P, 7], len(P)), 8)
    second.propose(state_of([*P, 7], len(P)), 8)
    assert len(shared) == 1 and isinstance(next(iter(shared.values())), SiblingIndex)
    index = next(iter(shared.values()))
    assert set(index.indexed) == {1, 6}  # each sample's tokens entered once, under its sample index
    tokens = [*P, 7, 8]
    view = TokenView(tokens, len(P), 2)
    copy = view[:]
    copy.append(99)
    assert len(view) == 5 and view[-1] == 8 and view.generated() == [7, 8] and tokens == [*P, 7, 8]
    assert not hasattr(view, "append") and not hasattr(view, "__setitem__")


def test_alone_it_proposes_what_pld_proposes():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        max_ngram = rng.randrange(1, 5)
        min_ngram = rng.randrange(1, max_ngram + 1)
        draft = rng.randrange(1, 12)
        options = MultiSampleOptions(max_ngram=max_ngram, min_ngram=min_ngram, num_draft_tokens=draft, max_nodes=draft)
        ours = MultiSample(None, options)
        pld = PromptLookup(None, PLDOptions(max_ngram=max_ngram, min_ngram=min_ngram, num_draft_tokens=draft))
        state = state_of(tokens, 1)
        assert ours.propose(state, 64).tokens.tolist() == pld.propose(state, 64).tokens.tolist()
        assert ours.propose(state, 64).parents is None


def test_build_tree_keeps_siblings_distinct_and_parents_first():
    tokens, parents = build_tree([[1, 2, 3], [1, 2, 4], [1, 5], [6]], depth=3, max_nodes=10)
    assert (tokens, parents) == ([1, 2, 6, 5, 3, 4], (-1, 0, -1, 0, 1, 1))
    assert all(p < i for i, p in enumerate(parents))
    assert build_tree([[1, 2, 3], [1, 2, 4], [1, 5], [6]], depth=2, max_nodes=2) == ([1, 2], (-1, 0))


def test_options_are_bounded_and_listed(capsys):
    with pytest.raises(ParadecError, match="min_ngram=5 for method 'multisample' exceeds max_ngram=3"):
        MultiSampleOptions(min_ngram=5)
    with pytest.raises(ParadecError, match="option max_nodes=0 for method 'multisample' must be an integer in"):
        MultiSampleOptions(max_nodes=0)
    assert main(["methods"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("multisample"))
    assert "max_ngram=3 in [1, 32], min_ngram=1 in [1, 32], num_draft_tokens=10 in [1, 127]" in line
    assert "max_nodes=4 in [1, 127]" in line and "alone" not in line


# --- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_multisample_equals_transformers(engines, hf_models, arch):
    engine = engines(f"loop-{arch}", runner="native")
    prompts = [[5, 9, 2, 7, 5, 9], [11, 3], [7] * 9, [40, 41, 42, 43, 44, 45, 46]]
    for prompt in prompts:
        expected = hf_greedy(hf_models(f"loop-{arch}"), prompt, 16)
        assert engine.generate(prompt, method="multisample", max_new_tokens=16).token_ids == expected, prompt
        choices = engine.generate(prompt, method="multisample", n=3, max_new_tokens=16, speculate="always")
        assert [c.token_ids for c in choices] == [expected] * 3, prompt


def accept_everything(proposal, logits, sp, generator=None, tree=None):
    """WRONG: accepts the whole draft (a tree's first root-to-leaf path), then samples the bonus token from p."""
    if tree is None:
        tree = proposal.tree(logits.device)
    path = [j - 1 for j in tree.paths[0][1:]]
    draft = proposal.tokens.tolist()
    deepest = path[-1] + 1 if path else 0  # the input the bonus token follows
    bonus = int(sample(warp(logits[deepest], sp), generator))
    return Verdict(path=path, tokens=[draft[i] for i in path] + [bonus], proposed=len(draft), depth=tree.max_depth)


def accept_what_is_possible(proposal, logits, sp, generator=None, tree=None):
    """WRONG: accepts each draft token the target could have drawn (p > 0) instead of with probability p, then
    samples the next token from p."""
    if tree is None:
        tree = proposal.tree(logits.device)
    p = warp(logits, sp)
    draft = proposal.tokens.tolist()
    path, current = [], 0  # the deepest accepted input
    while True:
        child = next(
            (i for i, parent in enumerate(tree.parents) if parent + 1 == current and p[current, draft[i]] > 0), None
        )
        if child is None:
            break
        path.append(child)
        current = child + 1
    final = int(sample(p[current], generator))
    return Verdict(path=path, tokens=[draft[i] for i in path] + [final], proposed=len(draft), depth=tree.max_depth)


def sampled(engine, prompt, sp, groups, n, new, verifier=None) -> tuple[list[list[tuple[int, ...]]], Counter]:
    """Each group's n samples (first `new` tokens) from one batch decoder, and what the drafts were made of."""
    decoder = engine.batch_decoder(48, speculate="always")
    if verifier is not None:
        decoder.verifier = verifier
    made: Counter = Counter()
    real = multisample.build_tree

    def counted(candidates, depth, max_nodes):
        tokens, parents = real(candidates, depth, max_nodes)
        made["siblings"] += len(candidates) > 1
        made["trees"] += parents != tuple(range(-1, len(tokens) - 1))
        return tokens, parents

    multisample.build_tree = counted
    try:
        items = [
            decoder.submit_samples(
                engine.request(
                    prompt, method="multisample", max_new_tokens=new, n=n, sampling=dataclasses.replace(sp, seed=n * g)
                )
            )
            for g in range(groups)
        ]
        # the first half of every group's samples decodes first, the second half after: those see finished siblings
        decoder.waiting = deque(sorted(decoder.waiting, key=lambda item: item.sample >= n // 2))
        for _ in decoder.run():
            pass
    finally:
        multisample.build_tree = real
    return [[tuple(item.result.token_ids) for item in group] for group in items], made


def exact_sequences(engine, prompt, sp, new) -> dict[tuple[int, ...], float]:
    """Under the loop model each token's distribution depends on the previous token only: the exact probability of
    every `new`-token continuation, from the target's own next-token table."""
    runner, vocab = engine.target, engine.target.vocab_size
    rows = []
    with torch.no_grad():
        for start in range(0, vocab, 128):
            runner.reset()
            rows.append(runner.forward(torch.arange(start, min(start + 128, vocab)), logits="all").logits)
        runner.reset()
    table = warp(torch.cat(rows).double(), sp)  # [V, V]: next-token probabilities after each token
    out = {(): 1.0}
    for _ in range(new):
        grown = {}
        for seq, prob in out.items():
            after = table[(prompt + list(seq))[-1]]
            for token in torch.nonzero(after).flatten().tolist():
                grown[(*seq, token)] = prob * float(after[token])
        out = grown
    return out


def test_multisample_sampling_follows_plain_sampling(engines):
    """Chi-square over every 3-token continuation of 4 samples x 300 prompts, the second half of each prompt's
    samples drafted from the first half's (trees included); the samples drafted from a sibling are as often equal to
    it as independent samples are. The same checks reject a verifier that accepts every draft (continuations plain
    sampling never draws), and one that accepts every draft the target could have drawn: its samples copy their
    siblings, each still distributed as plain sampling, but no longer independent of them."""
    engine = engines("loop-llama", runner="native")
    prompt = [5, 9, 2, 7, 5, 9, 2]
    sp, new, n = SamplingParams(temperature=1.0, top_k=3), 3, 4
    exact = exact_sequences(engine, prompt, sp, new)
    cells = {seq: i for i, seq in enumerate(exact)}  # chi_square_p enumerates its cells: give it them as one token
    same = sum(p * p for p in exact.values())  # P(two independent samples are equal)

    def marginal(groups) -> bool:
        counts = Counter(seq for group in groups for seq in group)
        if not set(counts) <= set(exact):  # sampled a continuation of probability 0
            return False
        observed = Counter({(cells[seq],): count for seq, count in counts.items()})
        return chi_square_p(observed, {(cells[seq],): p for seq, p in exact.items()}, len(cells), 1) > 1e-3

    def independent(groups) -> bool:
        equal = sum(g[0] == g[2] for g in groups) + sum(g[1] == g[3] for g in groups)  # (2 drafted from 0, 3 from 1)
        return binomtest(equal, 2 * len(groups), same).pvalue > 1e-3

    groups, made = sampled(engine, prompt, sp, 300, n, new)
    assert made["siblings"] > 300 and made["trees"] > 100  # the drafts came from siblings, as trees too
    assert marginal(groups) and independent(groups)

    wrong, _ = sampled(engine, prompt, sp, 100, n, new, verifier=accept_everything)
    assert not marginal(wrong)
    copied, _ = sampled(engine, prompt, sp, 100, n, new, verifier=accept_what_is_possible)
    assert marginal(copied) and not independent(copied)


# --- checks of n ----------------------------------------------------------------------------------------------------
def test_n_is_checked(engines):
    engine = engines("llama")
    for bad, shown in ((0, "0"), (17, "17"), ("2", "'2'"), (True, "True"), (2.0, "2.0"), (None, "None")):
        with pytest.raises(ParadecError, match=rf"n must be an integer in \[1, 16\], got {shown}") as info:
            engine.request("x", n=bad)
        assert info.value.param == "n"
    with pytest.raises(ParadecError, match=re.escape("seed + i, which must stay below 2**64")) as info:
        engine.request("x", n=3, sampling={"temperature": 1.0, "seed": 2**64 - 2})
    assert info.value.param == "seed"
    request = engine.request("x", n=3, sampling={"temperature": 1.0, "seed": 2**64 - 3})
    assert [s.sampling.seed for s in request.samples()] == [2**64 - 3, 2**64 - 2, 2**64 - 1]
    assert all(s.n == 1 and s.prompt_ids == request.prompt_ids for s in request.samples())
    unseeded = engine.request("x", n=2, sampling={"temperature": 1.0})
    assert [s.sampling for s in unseeded.samples()] == [unseeded.sampling] * 2
    one = engine.request("x")
    assert one.n == 1 and one.samples() == (one,)
    with pytest.raises(ParadecError, match=re.escape("stream() runs one sample, the request has n=3")) as info:
        engine.stream(request)
    assert info.value.param == "n"
    with pytest.raises(TypeError, match="a Request or a prompt"):
        engine.generate(one, n=2)
    with pytest.raises(ParadecError, match="speculate must be one of") as info:
        engine.generate("x", n=2, speculate="sometimes")
    assert info.value.param == "speculate"
    assert isinstance(engine.generate("x", max_new_tokens=2), paradec.decode.Result)
    assert len(engine.generate(engine.request("x", n=3, max_new_tokens=2))) == 3


def test_a_batch_takes_samples_through_submit_samples(code_engine):
    decoder = code_engine.batch_decoder(4)
    request = code_engine.request("x", n=2, max_new_tokens=4)
    with pytest.raises(ParadecError, match="n=2 samples is n sequences: queue it with submit_samples") as info:
        decoder.submit(request)
    assert info.value.param == "n"
    items = decoder.submit_samples(request)
    assert [i.sample for i in items] == [0, 1] and items[0].group is items[1].group
    for _ in decoder.run(items):
        pass
    assert items[0].result.token_ids == items[1].result.token_ids
    assert decoder.runner.free == decoder.runner.slots
    assert len(decoder.submit_samples(code_engine.request("x"))) == 1
