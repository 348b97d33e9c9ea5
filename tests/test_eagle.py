"""`eagle`: lossless whatever the head says (greedy equality with random-weight heads, sampling distribution over
dynamic trees), and the drafter's batched, cached EAGLE-2 tree equals a brute-force construction."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

import paradec
import paradec.drafters.eagle as eagle_module
from conftest import ARCHS, hf_greedy
from fakes import TableRunner
from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import DecodeState
from paradec.drafters.eagle import Eagle, EagleMethod, EagleOptions, compiled_step
from paradec.errors import ParadecError
from paradec.heads import EagleConfig, EagleHead, save_heads
from paradec.types import Verdict
from test_distribution import NEW, PROMPT, SAMPLES, TARGET_TABLE, VOCAB, WARPS, p_value
from test_heads import chain_outputs, random_eagle

PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop",
    "x",  # a one-token prompt: no hidden state before the first step
]


def random_heads_dir(root, hidden: int, vocab: int, seed: int):
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.for_target(hidden, vocab))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_heads(head, root / "eagle")
    return root


@pytest.fixture(scope="module")
def eagle_engines(model_dirs, tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            engine = paradec.load(model_dirs[arch], runner="hf")
            heads = random_heads_dir(tmp_path_factory.mktemp(f"eagle-{arch}"), 64, engine.target.vocab_size, seed=3)
            cache[arch] = paradec.load(model_dirs[arch], heads=heads, runner="hf")
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_with_random_head(eagle_engines, hf_models, arch):
    engine = eagle_engines(arch)
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
        result = engine.generate(prompt, method="eagle", max_new_tokens=40)
        assert result.token_ids == reference
        assert result.stats.proposed_tokens > 0
    small = engine.generate(PROMPTS[0], method="eagle", max_new_tokens=40, options={"topk": 2, "depth": 2, "nodes": 3})
    assert small.token_ids == hf_greedy(hf_models(arch), engine.encode(PROMPTS[0]), 40)
    assert small.stats.proposed_tokens <= 3 * small.stats.steps


def test_generation_up_to_the_context_limit(eagle_engines, hf_models):
    engine = eagle_engines("llama")  # context 256: the last steps must shrink the tree to fit
    prompt = engine.encode(PROMPTS[1])
    new = engine.target.max_length - len(prompt)
    result = engine.generate(prompt, method="eagle", max_new_tokens=new)
    assert result.token_ids == hf_greedy(hf_models("llama"), prompt, new, eos_token_id=None)[: len(result.token_ids)]
    assert result.finish_reason == "stop" or len(result.token_ids) == new


def test_options_and_missing_heads_are_clear_errors(model_dirs, eagle_engines):
    engine = eagle_engines("llama")
    for bad, message in (
        ({"topk": 0}, r"option topk=0 for method 'eagle' must be an integer in \[1, 64\]"),
        ({"topk": 100000}, r"topk=100000 .* in \[1, 64\]"),
        ({"depth": "x"}, "depth='x'"),
        ({"depth": 17}, r"depth=17 .* in \[1, 16\]"),
        ({"nodes": 128}, r"nodes=128 .* in \[1, 127\] \(127: the runner's largest step less the pending token\)"),
    ):
        with pytest.raises(ParadecError, match=message) as info:
            engine.generate("x", method="eagle", options=bad)
        assert info.value.param == "method_options"
    bare = paradec.load(model_dirs["llama"], runner="hf")
    with pytest.raises(ParadecError, match="method 'eagle' needs trained heads"):
        bare.generate("x", method="eagle")


class FakeTarget:
    def __init__(self, embed: torch.Tensor, lm_head: torch.Tensor, max_length: int = 1000) -> None:
        self.embed, self.lm_head = embed, lm_head
        self.vocab_size, self.hidden_size = lm_head.shape
        self.device, self.dtype, self.max_length = embed.device, embed.dtype, max_length

    def embed_weight(self) -> torch.Tensor:
        return self.embed

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head


class FakeResources:
    def __init__(self, target, heads: dict) -> None:
        self.target, self._heads = target, heads

    def heads(self, kind: str):
        return self._heads[kind]


def reference_tree(head, embed, lm_head, tokens, features, topk, depth, nodes):
    """EAGLE-2 in plain Python: every node's distribution from a from-scratch chain over its path."""
    committed = features.shape[0]

    def logp(path: list[int]) -> torch.Tensor:
        outs = chain_outputs(head, embed, tokens[: committed + 1] + path, features, committed, len(path))
        return F.log_softmax(outs[-1] @ lm_head.t(), -1)

    top = logp([]).topk(topk)
    tree = [(float(s), int(t), -1, [int(t)]) for s, t in zip(top.values, top.indices)]  # (score, token, parent, path)
    frontier = list(range(topk))
    for _ in range(1, depth):
        children = []
        for node in frontier:
            score, _, _, path = tree[node]
            top = logp(path).topk(topk)
            children += [(score + float(s), int(t), node, [*path, int(t)]) for s, t in zip(top.values, top.indices)]
        first = len(tree)
        tree += children
        frontier = [first + i for i in sorted(range(len(children)), key=lambda i: -children[i][0])[:topk]]
    keep = sorted(sorted(range(len(tree)), key=lambda i: -tree[i][0])[:nodes])
    position = {node: i for i, node in enumerate(keep)}
    return [tree[i][1] for i in keep], tuple(position[tree[i][2]] if tree[i][2] >= 0 else -1 for i in keep)


@torch.no_grad()
def test_drafter_tree_equals_brute_force_eagle2():
    head = random_eagle(2)
    V, H = head.config.vocab_size, head.config.hidden_size
    torch.manual_seed(5)
    embed, lm_head = torch.randn(V, H), torch.randn(V, H) * 0.5
    tokens = torch.randint(V, (8,)).tolist()  # 7 committed positions, tokens[7] pending
    features = torch.randn(7, H)
    options = EagleOptions(topk=3, depth=4, nodes=10)
    drafter = Eagle(EagleMethod(FakeResources(FakeTarget(embed, lm_head), {"eagle": head}), Eagle), options)
    state = DecodeState(tokens, 8, SamplingParams(), None, torch.device("cpu"), V, target_hidden=features)
    drafter.begin(state)
    # later rounds follow a step: the first tree's draft entries must be gone. max_tokens 1: still the full tree
    # (the decode loop drops the excess); 0: nothing, and the staged entries wait for the next update
    for max_tokens in (10, 1, 0, 10):
        proposal = drafter.propose(state, max_tokens=max_tokens)
        if max_tokens:
            expected = reference_tree(head, embed, lm_head, state.tokens, features, 3, 4, 10)
            assert (proposal.tokens.tolist(), proposal.layout.host_parents()) == expected
            emitted = [proposal.tokens[0].item(), 7]  # as if node 0 was accepted and 7 came from the target
        else:
            assert proposal.size == 0
            emitted = [7]
        state.tokens += emitted
        new_features = torch.randn(len(emitted), H)
        features = torch.cat([features, new_features])
        state.target_hidden = new_features
        drafter.update(state, Verdict(path=[0][: len(emitted) - 1], tokens=emitted, proposed=proposal.size))


@torch.no_grad()
def test_compiled_step_drafts_the_same_trees(monkeypatch):
    """`compile=true` runs a whole step (adding entries, growing every level) through torch.compile. Here with
    dynamo's "eager" backend: it proves the step traces into one whole graph (no break, so Inductor gets all of it)
    and stays exact, in a second rather than Inductor's minute of C++ builds on CPU."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(eagle_module, "compiled_step", lambda: compiled_step("eager"))
    counters.clear()
    head = random_eagle(2)
    V, H = head.config.vocab_size, head.config.hidden_size
    torch.manual_seed(6)
    embed, lm_head = torch.randn(V, H), torch.randn(V, H) * 0.5
    tokens = torch.randint(V, (9,)).tolist()
    features = torch.randn(8, H)
    proposals = []
    for compiled in (False, True):
        drafter = Eagle(
            EagleMethod(FakeResources(FakeTarget(embed, lm_head), {"eagle": head}), Eagle),
            EagleOptions(topk=3, depth=3, nodes=8, compile=compiled),
        )
        state = DecodeState(list(tokens), 9, SamplingParams(), None, torch.device("cpu"), V, target_hidden=features)
        drafter.begin(state)
        first = drafter.propose(state, max_tokens=10)  # the prompt's last entry was staged
        state.tokens += [first.tokens[0].item(), 5]
        state.target_hidden = features[:2] * 0.5
        drafter.update(state, Verdict(path=[0], tokens=state.tokens[-2:], proposed=first.size))
        second = drafter.propose(state, max_tokens=10)  # after a step: two staged entries
        proposals.append([(p.tokens.tolist(), p.layout.host_parents()) for p in (first, second)])
    assert proposals[0] == proposals[1]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    with pytest.raises(ParadecError, match="option compile='yes' for method 'eagle' must be true or false"):
        EagleOptions(compile="yes")


class HiddenTableRunner(TableRunner):
    """The table target of test_distribution, also reporting a hidden state per input (a fixed random vector per
    (previous, current) token pair) and lending an embedding and an LM head to trained heads."""

    def __init__(self, table: torch.Tensor, hidden_size: int = 16) -> None:
        super().__init__(table)
        gen = torch.Generator().manual_seed(11)
        self.hidden_size = hidden_size
        self.states = torch.randn(self.vocab_size, self.vocab_size, hidden_size, generator=gen)
        self.embed = torch.randn(self.vocab_size, hidden_size, generator=gen)
        self.lm_head = torch.randn(self.vocab_size, hidden_size, generator=gen)

    def forward(self, token_ids, tree=None, *, logits="all", hidden=False):
        out = super().forward(token_ids, tree, logits=logits)
        if hidden:
            ids = token_ids.tolist()
            previous = [ids[p] if p >= 0 else (self.tokens[-1] if self.tokens else 0) for _, p in self.provisional]
            out.hidden = self.states[previous, ids]
        return out

    def embed_weight(self) -> torch.Tensor:
        return self.embed

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head


def test_eagle_sampling_matches_plain_sampling():
    sp = WARPS["warped"]  # temperature, top-k and top-p: the verifier compares warped distributions
    target = HiddenTableRunner(TARGET_TABLE)
    torch.manual_seed(0)
    head = EagleHead(EagleConfig(hidden_size=16, vocab_size=VOCAB, num_heads=1, head_dim=16, intermediate_size=16))
    method = EagleMethod(FakeResources(target, {"eagle": head.eval()}), Eagle)
    options = EagleOptions(topk=2, depth=2, nodes=4)
    counts, accepted = Counter(), 0
    for seed in range(SAMPLES):
        sp_i = SamplingParams(sp.temperature, sp.top_k, sp.top_p, sp.min_p, seed=seed)
        gen = Generation(target, method.open(options), None, PROMPT, sp_i, NEW, set(), [], "eagle")
        result = gen.run()
        counts[tuple(result.token_ids)] += 1
        accepted += result.stats.accepted_tokens
    assert accepted > SAMPLES // 4  # the trees do get accepted, so the tree paths of the verifier are exercised
    assert p_value(counts, sp) > 1e-3


def test_cli_generate_with_heads(model_dirs, eagle_engines, capsys):
    from paradec.cli import main

    heads = eagle_engines("llama").config.heads
    common = ["generate", "--model", str(model_dirs["llama"]), "--runner", "hf", "--prompt", "def f(x):"]
    assert main([*common, "--heads", heads, "--method", "eagle", "--max-new-tokens", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "eagle" and len(record["token_ids"]) == 8
    assert main([*common, "--heads", "/nonexistent/heads", "--method", "eagle"]) == 2
    assert "heads path '/nonexistent/heads' does not exist" in capsys.readouterr().err


def test_wide_topk_and_written_out_attention_equal_the_library_ones():
    gen = torch.Generator().manual_seed(0)
    for shape, k in (((5, 16384), 8), ((3, 1000), 3), ((600,), 8), ((2, 70), 4)):  # padded chunks, 1-D, short
        x = torch.randn(shape, generator=gen)
        expected, got = x.topk(k, -1), eagle_module.wide_topk(x, k)
        assert torch.equal(expected.values, got[0]) and torch.equal(expected.indices, got[1])
    q, keys, values = (torch.randn(1, 2, n, 8, generator=gen) for n in (3, 10, 10))
    mask = torch.rand(3, 10, generator=gen) > 0.5
    mask[:, 0] = True  # no row without a key
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    torch.testing.assert_close(eagle_module.attention(q, keys, values, attn_mask=mask), expected)
