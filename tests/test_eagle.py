"""`eagle`: lossless whatever the head says (greedy equality with random-weight heads, sampling distribution over
dynamic trees), and the drafter's batched, cached EAGLE-2 tree equals a brute-force construction; the same for heads
with a reduced draft vocabulary (draft ids mapped to target ids), whose map, when broken, costs acceptance only."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import paradec
import paradec.drafters.eagle as eagle_module
from conftest import ARCHS, CORPUS, hf_greedy, make_config, save_model
from fakes import TableRunner
from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import DecodeState
from paradec.drafters.eagle import Eagle, EagleMethod, EagleOptions, compiled_step
from paradec.errors import ParadecError
from paradec.heads import EagleConfig, EagleHead, load_heads, save_heads
from paradec.train.loop import TrainSettings
from paradec.train.pipeline import DataSettings, HeadSettings, run
from paradec.types import Verdict
from test_distribution import NEW, PROMPT, SAMPLES, TARGET_TABLE, VOCAB, WARPS, p_value
from test_heads import chain_outputs, random_eagle

PROMPTS = [
    "def fibonacci(n):\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop",
    "x",  # a one-token prompt: no hidden state before the first step
]


def randomise(head: EagleHead, seed: int) -> EagleHead:
    """Random weights and, for a reduced head, a random draft -> target id map."""
    torch.manual_seed(seed)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if head.d2t is not None:
        head.d2t.copy_(torch.randperm(head.config.vocab_size)[: head.config.draft_vocab_size])
    return head


def random_heads_dir(
    root, hidden: int, vocab: int, seed: int, draft_vocab: int | None = None, feature_layers: tuple | None = None
):
    config = EagleConfig.for_target(hidden, vocab, draft_vocab_size=draft_vocab, feature_layers=feature_layers)
    save_heads(randomise(EagleHead(config), seed), root / "eagle")
    return root


def random_reduced_eagle(seed: int, draft_vocab: int) -> EagleHead:
    """test_heads' random head (hidden 32, vocabulary 50), scoring `draft_vocab` of the 50 ids."""
    config = EagleConfig(hidden_size=32, vocab_size=50, num_heads=2, head_dim=16, intermediate_size=48)
    return randomise(EagleHead(replace(config, draft_vocab_size=draft_vocab)), seed).eval()


@pytest.fixture(scope="module")
def eagle_engines(model_dirs, tmp_path_factory):
    """(arch, draft vocabulary: "full" or "reduced", half the target's) -> an engine with a random EAGLE head."""
    cache = {}

    def get(arch: str, vocab: str = "full"):
        if (arch, vocab) not in cache:
            engine = paradec.load(model_dirs[arch], runner="hf")
            size = engine.target.vocab_size
            root = tmp_path_factory.mktemp(f"eagle-{arch}-{vocab}")
            heads = random_heads_dir(root, 64, size, seed=3, draft_vocab=size // 2 if vocab == "reduced" else None)
            cache[arch, vocab] = paradec.load(model_dirs[arch], heads=heads, runner="hf")
        return cache[arch, vocab]

    return get


@pytest.mark.parametrize("vocab", ["full", "reduced"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_with_random_head(eagle_engines, hf_models, arch, vocab):
    engine = eagle_engines(arch, vocab)
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
    """EAGLE-2 in plain Python: every node's distribution from a from-scratch chain over its path (over the head's
    draft vocabulary, its picks mapped to target ids)."""
    committed = features.shape[0]
    to_target = (lambda i: int(i)) if head.d2t is None else (lambda i: int(head.d2t[i]))

    def top(path: list[int]) -> list[tuple[float, int]]:
        outs = chain_outputs(head, embed, tokens[: committed + 1] + path, features, committed, len(path))
        best = F.log_softmax(head.logits(outs[-1], lm_head), -1).topk(topk)
        return [(float(s), to_target(i)) for s, i in zip(best.values, best.indices)]

    tree = [(s, t, -1, [t]) for s, t in top([])]  # (score, token, parent, path)
    frontier = list(range(topk))
    for _ in range(1, depth):
        children = []
        for node in frontier:
            score, _, _, path = tree[node]
            children += [(score + s, t, node, [*path, t]) for s, t in top(path)]
        first = len(tree)
        tree += children
        frontier = [first + i for i in sorted(range(len(children)), key=lambda i: -children[i][0])[:topk]]
    keep = sorted(sorted(range(len(tree)), key=lambda i: -tree[i][0])[:nodes])
    position = {node: i for i, node in enumerate(keep)}
    return [tree[i][1] for i in keep], tuple(position[tree[i][2]] if tree[i][2] >= 0 else -1 for i in keep)


@torch.no_grad()
@pytest.mark.parametrize("draft_vocab", [None, 20])
def test_drafter_tree_equals_brute_force_eagle2(draft_vocab):
    head = random_eagle(2) if draft_vocab is None else random_reduced_eagle(2, draft_vocab)
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
            if draft_vocab is not None:  # target ids, of the draft vocabulary only
                assert set(proposal.tokens.tolist()) <= set(head.d2t.tolist())
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
@pytest.mark.parametrize("draft_vocab", [None, 20])
def test_compiled_step_drafts_the_same_trees(monkeypatch, draft_vocab):
    """`compile=true` runs a whole step (adding entries, growing every level) through torch.compile. Here with
    dynamo's "eager" backend: it proves the step traces into one whole graph (no break, so Inductor gets all of it;
    the draft -> target id map included) and stays exact, in a second rather than Inductor's minute of C++ builds on
    CPU."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(eagle_module, "compiled_step", lambda: compiled_step("eager"))
    counters.clear()
    torch._dynamo.reset()  # a fresh cache: the other parametrisation's graph is not counted again
    head = random_eagle(2) if draft_vocab is None else random_reduced_eagle(2, draft_vocab)
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

    num_layers = 4  # layer i's output: (i + 1) times the last hidden state, for heads that fuse layers

    def forward(self, token_ids, tree=None, *, logits="all", hidden=False):
        out = super().forward(token_ids, tree, logits=logits)
        if hidden:
            ids = token_ids.tolist()
            previous = [ids[p] if p >= 0 else (self.tokens[-1] if self.tokens else 0) for _, p in self.provisional]
            out.hidden = self.states[previous, ids]
            if isinstance(hidden, tuple):  # [n, len(layers) * H]
                out.hidden = torch.cat([out.hidden * (i + 1) for i in hidden], -1)
        return out

    def embed_weight(self) -> torch.Tensor:
        return self.embed

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head


# draft -> target id maps over the table target's 4 tokens: none (the full vocabulary), two tokens, and the same
# two swapped (a broken map: the head's drafts go to the wrong ids; the output distribution must not move); "fused":
# the full vocabulary, features fused from three layers (EAGLE-3)
DRAFT_MAPS = {"full": None, "reduced": [2, 0], "swapped": [0, 2], "fused": None}


@pytest.mark.parametrize("draft_map", list(DRAFT_MAPS))
def test_eagle_sampling_matches_plain_sampling(draft_map):
    sp = WARPS["warped"]  # temperature, top-k and top-p: the verifier compares warped distributions
    target = HiddenTableRunner(TARGET_TABLE)
    torch.manual_seed(0)
    d2t = DRAFT_MAPS[draft_map]
    layers = (0, 2, 1) if draft_map == "fused" else None
    config = EagleConfig(
        hidden_size=16, vocab_size=VOCAB, num_heads=1, head_dim=16, intermediate_size=16, feature_layers=layers
    )
    head = EagleHead(replace(config, draft_vocab_size=None if d2t is None else len(d2t)))
    if d2t is not None:
        head.init_draft_vocab(torch.tensor(d2t), target.lm_head)
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


@pytest.fixture(scope="module")
def reduced_loop_heads(loop_dirs, tmp_path_factory):
    """arch -> a heads directory holding an EAGLE head with a draft vocabulary of half the looping target's,
    briefly trained (`paradec.train.pipeline.run`)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"reduced-{arch}")
            data = root / "code.txt"
            data.write_text(CORPUS * 3)
            vocab = json.loads((loop_dirs[arch] / "config.json").read_text())["vocab_size"]
            cache[arch] = run(
                "eagle",
                model=loop_dirs[arch],
                out=root / "heads",
                data=DataSettings(data, sequences=32, val_sequences=4, prompt_len=8, new_tokens=24, batch_size=32),
                train=TrainSettings(steps=150, batch_size=16, lr=1e-2, warmup=10),
                heads=HeadSettings(passes=2, draft_vocab=vocab // 2),
                device="cpu",
                val_prompts=1,
                val_new_tokens=16,
                progress=False,
            ).parent
        return cache[arch]

    return get


def broken_map_copy(heads, out):
    """A copy of the heads directory `heads` whose draft -> target map is shifted by one (a permutation: a valid
    map, loaded without complaint, that sends every draft id to the wrong target id)."""
    (out / "eagle").mkdir(parents=True)
    for name in ("config.json", "card.json"):
        (out / "eagle" / name).write_bytes((heads / "eagle" / name).read_bytes())
    tensors = load_file(str(heads / "eagle" / "model.safetensors"))
    tensors["d2t"] = tensors["d2t"].roll(1)
    save_file(tensors, str(out / "eagle" / "model.safetensors"))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trained_reduced_vocab_head_is_exact_and_a_broken_map_costs_acceptance_only(
    reduced_loop_heads, loop_dirs, hf_models, tmp_path, arch
):
    """A briefly trained head over half the vocabulary (fusing the target's layers, the default) gets most drafts accepted on a looping target, its output
    equal to `transformers`; the same head with a broken map still decodes exactly (the verifier rejects the wrong
    drafts), its acceptance gone."""
    heads = reduced_loop_heads(arch)
    card = json.loads((heads / "eagle" / "card.json").read_text())
    vocab = card["draft_vocab"]["target_vocab"]
    assert card["draft_vocab"]["size"] == vocab // 2
    assert card["feature_layers"] == [0, 0, 0]  # the default: EAGLE-3's fused layers, clamped for 2 layers
    coverage = card["draft_vocab"]["validation_coverage"]
    assert 0 < coverage["target_mass"] <= 1 and 0.8 < coverage["greedy_in_vocab"] <= 1  # the frequent ids hold it
    tau = {}
    for name, where in (("trained", heads), ("broken", broken_map_copy(heads, tmp_path / "broken"))):
        engine = paradec.load(loop_dirs[arch], heads=where, runner="hf")
        assert engine.heads("eagle").config.draft_vocab_size == vocab // 2
        taus = []
        for prompt in PROMPTS[:2]:
            result = engine.generate(prompt, method="eagle", max_new_tokens=48)
            assert result.token_ids == hf_greedy(hf_models(f"loop-{arch}"), engine.encode(prompt), 48)
            taus.append(result.stats.tau)
        tau[name] = min(taus)
    assert tau["trained"] > 2.5 and tau["broken"] < 1.5


def test_old_full_vocabulary_heads_still_load_and_decode(model_dirs, hf_models, tmp_path):
    """A heads directory written before draft vocabularies (no draft_vocab_size in its config, no d2t in its
    weights) loads as a full-vocabulary head and decodes exactly."""
    engine = paradec.load(model_dirs["qwen2"], runner="hf")
    root = random_heads_dir(tmp_path, 64, engine.target.vocab_size, seed=4)
    config_path = root / "eagle" / "config.json"
    config = json.loads(config_path.read_text())
    del config["config"]["draft_vocab_size"], config["config"]["feature_layers"]
    config_path.write_text(json.dumps(config))
    assert not {"d2t", "fc_fuse.weight"} & set(load_file(str(root / "eagle" / "model.safetensors")))
    engine = paradec.load(model_dirs["qwen2"], heads=root, runner="hf")
    assert engine.heads("eagle").d2t is None and engine.heads("eagle").lm_head is None
    assert engine.heads("eagle").config.feature_layers is None and engine.heads("eagle").fc_fuse is None
    reference = hf_greedy(hf_models("qwen2"), engine.encode(PROMPTS[0]), 32)
    result = engine.generate(PROMPTS[0], method="eagle", max_new_tokens=32)
    assert result.token_ids == reference and result.stats.proposed_tokens > 0


def test_draft_map_round_trip_and_checks(tmp_path):
    """The map is saved as int64 whatever the weights' dtype (float16 would round ids above 2048), loads back
    exactly, and a map that is not distinct ids of the target's vocabulary is a clear error at load."""
    config = EagleConfig(hidden_size=32, vocab_size=5000, num_heads=2, head_dim=16, intermediate_size=48)
    head = randomise(EagleHead(replace(config, draft_vocab_size=300)), seed=1)
    head.d2t.copy_(torch.randperm(5000)[:300])
    save_heads(head, tmp_path / "good")  # float16 weights
    saved = load_file(str(tmp_path / "good" / "model.safetensors"))
    assert saved["d2t"].dtype == torch.int64 and saved["lm_head.weight"].dtype == torch.float16
    cpu = torch.device("cpu")
    loaded = load_heads("eagle", tmp_path / "good", hidden_size=32, vocab_size=5000, device=cpu, dtype=torch.bfloat16)
    assert loaded.config.draft_vocab_size == 300 and torch.equal(loaded.d2t, head.d2t)
    assert loaded.d2t.dtype == torch.int64 and loaded.lm_head.weight.dtype == torch.bfloat16
    for name, d2t in (("repeats", torch.zeros(300, dtype=torch.long)), ("outside", torch.arange(4800, 5100))):
        tensors = dict(saved, d2t=d2t)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes((tmp_path / "good" / "config.json").read_bytes())
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        with pytest.raises(ParadecError, match=r"map must hold 300 distinct target ids in \[0, 5000\)"):
            load_heads("eagle", tmp_path / name, hidden_size=32, vocab_size=5000, device=cpu, dtype=torch.float32)
    with pytest.raises(ParadecError, match=r"draft_vocab_size must be an integer in \[1, 5000\].*got 5001"):
        replace(config, draft_vocab_size=5001)


def test_topk_is_bounded_by_the_draft_vocabulary():
    head = random_reduced_eagle(0, 5)
    V, H = head.config.vocab_size, head.config.hidden_size
    method = EagleMethod(FakeResources(FakeTarget(torch.randn(V, H), torch.randn(V, H)), {"eagle": head}), Eagle)
    assert method.request_options({"topk": 5}).topk == 5
    with pytest.raises(ParadecError, match=r"option topk=6 for method 'eagle' must be an integer in \[1, 5\]"):
        method.request_options({"topk": 6})


FUSED = (2, 0, 1)  # fused layers of the 4-layer targets below (any order: the head's fc_fuse learns which is which)


def make_deep_dirs(root, tokenizer_dir, vocab_size: int) -> dict:
    """arch -> a 4-layer random target (so that fused layers are distinct) and a random EAGLE-3 head fusing FUSED."""
    out = {}
    for i, arch in enumerate(ARCHS):
        path = save_model(make_config(arch, vocab_size, layers=4), root / arch, tokenizer_dir, seed=400 + i)
        out[arch] = (path, random_heads_dir(root / f"{arch}-heads", 64, vocab_size, seed=5, feature_layers=FUSED))
    return out


@pytest.fixture(scope="module")
def deep_dirs(tmp_path_factory, tokenizer_dir, vocab_size):
    return make_deep_dirs(tmp_path_factory.mktemp("deep"), tokenizer_dir, vocab_size)


@pytest.mark.parametrize("runner", ["hf", "native", "static"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_head_greedy_equals_transformers(deep_dirs, arch, runner):
    """A random EAGLE-3 head reading the outputs of three target layers decodes exactly, on both runners (the
    native one over its static buckets too: "static"); the drafter asks the runner for those layers."""
    from transformers import AutoModelForCausalLM

    from paradec.engine import Engine
    from paradec.runners.native import NativeRunner

    if arch == "gpt2" and runner != "hf":
        pytest.skip("the native runner runs Llama-family models only")
    path, heads = deep_dirs[arch]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = paradec.load(path, heads=heads, runner="hf" if runner == "hf" else "native", device="cpu")
    if runner == "static":
        target = NativeRunner.from_pretrained(path, static_shapes=True)
        engine = Engine(target, engine.tokenizer, engine.config, heads_dir=heads, eos_token_ids={0})
    assert engine.heads("eagle").config.feature_layers == FUSED
    for prompt in PROMPTS:
        result = engine.generate(prompt, method="eagle", max_new_tokens=32)
        assert result.token_ids == hf_greedy(model, engine.encode(prompt), 32)
        assert result.stats.proposed_tokens > 0


def test_fused_head_needs_layers_the_target_lends(deep_dirs):
    """A head fusing a layer the target cannot lend (its last, or one it lacks) is a clear error, not a crash."""
    path, _ = deep_dirs["llama"]
    engine = paradec.load(path, runner="hf")
    head = randomise(EagleHead(EagleConfig.for_target(64, engine.target.vocab_size, feature_layers=(0, 3))), 1)
    with pytest.raises(ParadecError, match=r"feature_layers \[0, 3\].*lends the outputs of layers \[0, 3\) of its 4"):
        EagleMethod(FakeResources(engine.target, {"eagle": head}), Eagle)


def test_feature_layers_round_trip_and_checks(tmp_path):
    config = EagleConfig(hidden_size=32, vocab_size=50, num_heads=2, head_dim=16, intermediate_size=48)
    head = randomise(EagleHead(replace(config, feature_layers=(3, 1, 7))), seed=2)
    assert head.fc_fuse.weight.shape == (32, 3 * 32) and head.config.feature_size == 96
    save_heads(head, tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["config"]["feature_layers"] == [3, 1, 7]
    cpu = torch.device("cpu")
    loaded = load_heads("eagle", tmp_path / "fused", hidden_size=32, vocab_size=50, device=cpu, dtype=torch.float32)
    assert loaded.config == head.config and loaded.config.feature_layers == (3, 1, 7)
    torch.testing.assert_close(loaded.fc_fuse.weight, head.fc_fuse.weight.half().float())
    features = torch.randn(5, 96)  # [n, 3H] -> [n, H]
    assert loaded.fuse(features).shape == (5, 32) and torch.equal(
        EagleHead(config).fuse(features[:, :32]), features[:, :32]
    )
    for bad in ((), (1, -1), (1.5,), "1,2"):
        with pytest.raises(ParadecError, match="feature_layers must be"):
            replace(config, feature_layers=bad)
