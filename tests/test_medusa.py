"""`medusa`: the static tree is filled from the heads' top-k table, and decoding stays lossless whatever the heads
say (greedy equality with random-weight heads, sampling distribution over trees)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import paradec
from conftest import ARCHS, hf_greedy
from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import DecodeState
from paradec.drafters.medusa import Medusa, MedusaMethod, MedusaOptions
from paradec.errors import ParadecError
from paradec.heads import MedusaConfig, MedusaHeads, save_heads
from paradec.sampling import sample, warp
from paradec.types import Verdict
from paradec.verify import verify
from test_distribution import NEW, PROMPT, SAMPLES, TARGET_TABLE, VOCAB, WARPS, p_value
from test_eagle import PROMPTS, FakeResources, FakeTarget, HiddenTableRunner


def random_medusa(hidden: int, vocab: int, num_heads: int = 3, tree=(), seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(hidden, vocab, num_heads, tree))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads.eval()


@pytest.fixture(scope="module")
def medusa_engines(model_dirs, tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            vocab = paradec.load(model_dirs[arch], runner="hf").target.vocab_size
            root = tmp_path_factory.mktemp(f"medusa-{arch}")
            save_heads(random_medusa(64, vocab), root / "medusa")
            cache[arch] = paradec.load(model_dirs[arch], heads=root, runner="hf")
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_with_random_heads(medusa_engines, hf_models, arch):
    engine = medusa_engines(arch)
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
        result = engine.generate(prompt, method="medusa", max_new_tokens=40)
        assert result.token_ids == reference
        assert result.stats.proposed_tokens > 0
    small = engine.generate(PROMPTS[0], method="medusa", max_new_tokens=40, options={"nodes": 5})
    assert small.token_ids == hf_greedy(hf_models(arch), engine.encode(PROMPTS[0]), 40)
    assert small.stats.proposed_tokens <= 5 * small.stats.steps


def test_generation_up_to_the_context_limit(medusa_engines, hf_models):
    engine = medusa_engines("llama")
    prompt = engine.encode(PROMPTS[1])
    new = engine.target.max_length - len(prompt)
    result = engine.generate(prompt, method="medusa", max_new_tokens=new)
    assert result.token_ids == hf_greedy(hf_models("llama"), prompt, new, eos_token_id=None)[: len(result.token_ids)]


def test_options_are_checked(medusa_engines):
    engine = medusa_engines("llama")
    tree = len(engine.method("medusa").heads.config.tree)
    for nodes in (0, tree + 1, True):
        with pytest.raises(
            ParadecError, match=rf"option nodes={nodes} for method 'medusa' must be an integer in \[1, {tree}\]"
        ):
            engine.generate("x", method="medusa", options={"nodes": nodes})
    assert engine.request("x", method="medusa", options={"nodes": tree}).options.nodes == tree


@torch.no_grad()
def test_proposal_takes_the_tree_tokens_from_the_heads_top_k():
    V, H = 40, 16
    tree = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    heads = random_medusa(H, V, num_heads=3, tree=tree, seed=4)
    torch.manual_seed(6)
    lm_head = torch.randn(V, H)
    method = MedusaMethod(FakeResources(FakeTarget(torch.randn(V, H), lm_head), {"medusa": heads}), Medusa)
    drafter = method.open(MedusaOptions())
    hidden = torch.randn(3, H)
    state = DecodeState([1, 2, 3, 4], 4, SamplingParams(), None, torch.device("cpu"), V, target_hidden=hidden)
    top = heads.logits(hidden[-1], lm_head).topk(2, -1).indices  # [3 heads, 2 ranks]
    proposal = drafter.propose(state, max_tokens=8)
    assert proposal.parents == (-1, -1, 0, 0, 1, 2)
    expected = [top[0, 0], top[0, 1], top[1, 0], top[1, 1], top[1, 0], top[2, 0]]
    assert proposal.tokens.tolist() == [int(t) for t in expected]
    assert drafter.propose(state, max_tokens=1).parents == (-1, -1)  # depth bounded by max_tokens
    assert drafter.propose(state, max_tokens=0).size == 0


def accept_argmax(proposal, logits, sp, generator=None, tree=None):
    """WRONG: accepts tree nodes that match the target's argmax (greedy), then samples the last token from p."""
    greedy = verify(proposal, logits, SamplingParams(), None, tree)
    deepest = greedy.path[-1] + 1 if greedy.path else 0
    final = int(sample(warp(logits[deepest], sp), generator))
    return Verdict(path=greedy.path, tokens=[*greedy.tokens[:-1], final], proposed=greedy.proposed, depth=greedy.depth)


def sampled_counts(verifier=verify) -> tuple[Counter, int]:
    sp = WARPS["warped"]
    target = HiddenTableRunner(TARGET_TABLE)
    # all four tokens at depth 1: every step accepts a first draft token, whatever the target picks
    heads = random_medusa(16, VOCAB, num_heads=2, tree=((0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0)), seed=2)
    method = MedusaMethod(FakeResources(target, {"medusa": heads}), Medusa)
    counts, accepted = Counter(), 0
    for seed in range(SAMPLES):
        sp_i = SamplingParams(sp.temperature, sp.top_k, sp.top_p, sp.min_p, seed=seed)
        drafter = method.open(MedusaOptions())
        result = Generation(target, drafter, None, PROMPT, sp_i, NEW, set(), [], "medusa", verifier=verifier).run()
        counts[tuple(result.token_ids)] += 1
        accepted += result.stats.accepted_tokens
    return counts, accepted


def test_medusa_sampling_matches_plain_sampling():
    counts, accepted = sampled_counts()
    assert accepted > SAMPLES  # more than one accepted draft token per generation: depth 2 is exercised too
    assert p_value(counts, WARPS["warped"]) > 1e-3


def test_wrong_tree_verifier_is_caught():
    counts, _ = sampled_counts(accept_argmax)
    assert p_value(counts, WARPS["warped"]) < 1e-6
