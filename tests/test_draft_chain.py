"""One-graph drafting: the native runner's `draft_chain` proposes what the step-by-step chain proposes.

Same tokens (greedy, and sampling under the same generator seed), the same q rows, the same draft cache after
rejections (equal to one built from scratch), for every draft length; through the engine greedy output equals
`transformers` with `one_graph` on and off, and sampling keeps plain sampling's distribution (chi-square).
On CUDA the captured graph's chain equals the eager chain's.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

import paradec
from conftest import hf_greedy
from paradec.config import SamplingParams
from paradec.drafters.base import DecodeState
from paradec.drafters.draft_model import DraftChain, DraftModel, DraftOptions
from paradec.runners.base import ChainDrafting, prefill
from paradec.runners.native import NativeRunner
from paradec.sampling import make_generator, warp
from paradec.types import Verdict
from sampling_check import chi_square_p, sample_counts

PROMPT = [5, 6, 7, 8, 9]
SAMPLING = {
    "greedy": SamplingParams(),
    "plain": SamplingParams(temperature=1.0, seed=11),
    "warped": SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02, seed=12),
}
# (k, accepted) per step: rejections, a full accept (the next chain is fed two tokens), k = 1 and a varying k
STEPS = [(4, 1), (4, 4), (1, 0), (3, 3), (2, 0), (5, 2), (4, 4), (4, 0)]


def cache_prefix(runner: NativeRunner) -> torch.Tensor:
    return runner.cache.data[:, :, :, : runner.length]


def run_chain(path, sp: SamplingParams, one_graph: bool, vocab_size: int, static: bool = False):
    """Proposals of a DraftChain over STEPS (accepting as told, then a made-up bonus token) and its runner."""
    runner = NativeRunner.from_pretrained(path, static_shapes=static)
    chain = DraftChain(runner, one_graph=one_graph)
    assert chain.one_graph == one_graph
    generator = make_generator(sp, runner.device)
    state = DecodeState(list(PROMPT), len(PROMPT), sp, generator, runner.device, vocab_size)
    chain.begin(state)
    proposals = []
    for step, (k, accepted) in enumerate(STEPS):
        proposal = chain.propose(state, k)
        proposals.append(proposal)
        drafts = proposal.tokens.tolist()
        state.tokens += [*drafts[:accepted], 40 + step]
        chain.update(Verdict(path=list(range(accepted)), tokens=[], proposed=k, depth=k))
    return proposals, runner, state


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", list(SAMPLING))
@pytest.mark.parametrize("static", [False, True])
def test_one_graph_chain_equals_step_by_step(model_dirs, vocab_size, arch, mode, static):
    path, sp = model_dirs[f"{arch}-draft"], SAMPLING[mode]
    wide = vocab_size + 3  # a target vocabulary wider than the draft's: q is 0 on the padding
    for width in (vocab_size, wide):
        chained, runner, state = run_chain(path, sp, True, width, static)
        looped, reference, _ = run_chain(path, sp, False, width, static)
        for a, b in zip(chained, looped):
            assert a.tokens.tolist() == b.tokens.tolist()
            if sp.greedy:
                assert a.probs is None and b.probs is None
            else:
                assert a.probs.shape == (a.tokens.shape[0], width)
                torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-6)
                assert float(a.probs[:, vocab_size:].sum()) == 0.0
        assert runner.length == reference.length
        torch.testing.assert_close(cache_prefix(runner), cache_prefix(reference), rtol=1e-5, atol=1e-5)
        scratch = NativeRunner.from_pretrained(path)
        prefill(scratch, torch.tensor(state.tokens[: runner.length]))
        torch.testing.assert_close(cache_prefix(runner), cache_prefix(scratch), rtol=1e-5, atol=1e-5)
    if not sp.greedy:  # the proposals really were sampled: the chain does not just repeat the argmax
        assert any(not torch.equal(p.tokens, p.probs.argmax(-1)) for p in chained)


def test_runners_offer_chain_drafting(model_dirs):
    from paradec.runners import HFRunner, load_hf_model

    assert isinstance(NativeRunner.from_pretrained(model_dirs["llama-draft"]), ChainDrafting)
    hf = HFRunner(load_hf_model(model_dirs["llama-draft"], torch.device("cpu"), torch.float32))
    assert not isinstance(hf, ChainDrafting)
    assert not DraftChain(hf).one_graph  # the loop


def test_draft_chain_errors(model_dirs):
    runner = NativeRunner.from_pretrained(model_dirs["llama-draft"], max_cache_len=16)
    sp = SamplingParams()
    with pytest.raises(ValueError, match="k must lie in"):
        runner.draft_chain(torch.tensor([1]), runner.max_chain + 1, sp, None, runner.vocab_size)
    prefill(runner, torch.arange(1, 13))
    with pytest.raises(paradec.ParadecError, match="exceeds the native runner's max_length 16"):
        runner.draft_chain(torch.tensor([1]), 5, sp, None, runner.vocab_size)
    runner.forward(torch.tensor([1]))
    with pytest.raises(RuntimeError, match="before commit"):
        runner.draft_chain(torch.tensor([1]), 2, sp, None, runner.vocab_size)


def test_a_long_feed_is_prefilled_first(model_dirs):
    path = model_dirs["qwen2-draft"]
    runner, reference = NativeRunner.from_pretrained(path), NativeRunner.from_pretrained(path)
    sp = SamplingParams()
    tokens, _ = runner.draft_chain(torch.tensor([3, 4, 5, 6, 7]), 3, sp, None, runner.vocab_size)
    prefill(reference, torch.tensor([3, 4, 5, 6]))
    expected, _ = reference.draft_chain(torch.tensor([7]), 3, sp, None, reference.vocab_size)
    assert tokens.tolist() == expected.tolist()
    assert runner.length == reference.length == 5 + 3 - 1


@pytest.fixture
def count_chains(monkeypatch):
    calls = []
    original = NativeRunner.draft_chain

    def counted(self, *args, **kwargs):
        calls.append(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NativeRunner, "draft_chain", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_draft_equals_transformers_with_and_without_one_graph(model_dirs, hf_models, count_chains, arch):
    engine = paradec.load(model_dirs[arch], model_dirs[f"{arch}-draft"], runner="native", device="cpu")
    prompt = "def fibonacci(n):\n"
    reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
    for options in ({"k": 4}, {"k": 4, "one_graph": False}, {"k": 6, "adaptive": True}):
        count_chains.clear()
        result = engine.generate(prompt, method="draft", options=options, max_new_tokens=40)
        assert result.token_ids == reference, options
        if options.get("one_graph") is False:
            assert not count_chains
        else:  # every step drafted by one chain (the last may have no room for drafts)
            assert result.stats.steps - 1 <= len(count_chains) <= result.stats.steps
        if options.get("adaptive"):
            assert len(set(count_chains)) > 1  # k varied: one graph per k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_draft_copy_of_target_accepts_everything_in_one_graph(model_dirs, hf_models, count_chains, arch):
    engine = paradec.load(model_dirs[arch], model_dirs[arch], runner="native", device="cpu")
    prompt = "def fibonacci(n):\n"
    reference = hf_greedy(hf_models(arch), engine.encode(prompt), 30)
    result = engine.generate(prompt, method="draft", options={"k": 4}, max_new_tokens=30)
    assert result.token_ids == reference
    assert result.stats.acceptance_by_position == [1.0] * 4  # every chain after the first is fed two tokens
    assert result.stats.steps - 1 <= len(count_chains) <= result.stats.steps


@pytest.fixture(scope="module")
def four_token_pair(tmp_path_factory):
    """A 3-layer Llama target and a different 1-layer Llama draft over a vocabulary of 4 (enumerable exactly)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    paths = []
    for layers, seed in ((3, 5), (1, 9)):
        config = LlamaConfig(
            vocab_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        path = tmp_path_factory.mktemp(f"vocab4-{layers}")
        model.save_pretrained(path)
        paths.append(path)
    return AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32).eval(), paths[0], paths[1]


def test_one_graph_sampling_matches_plain_sampling(four_token_pair, count_chains):
    """Drafts drawn inside the chain from the draft's q, verified by rejection sampling: plain sampling's law."""
    model, target_path, draft_path = four_token_pair
    sp, prompt, new = SamplingParams(temperature=1.2, top_k=3), [1, 2, 3], 3
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(4), repeat=new):
            p = warp(model(torch.tensor([prompt + list(seq)])).logits[0, len(prompt) - 1 : -1], sp)  # [new, V]
            exact[seq] = float(p[torch.arange(new), torch.tensor(seq)].prod())
    target, draft = NativeRunner.from_pretrained(target_path), NativeRunner.from_pretrained(draft_path)
    resources = SimpleNamespace(draft_runner=lambda: draft)
    counts = sample_counts(target, lambda: DraftModel(resources, DraftOptions(k=2)), prompt, sp, new, 800)
    assert count_chains  # the chain drafted
    assert chi_square_p(counts, exact, 4, new) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", list(SAMPLING))
def test_captured_chain_equals_eager_chain(model_dirs, mode):
    path, sp = model_dirs["qwen2-draft"], SAMPLING[mode]
    runs = []
    for static in (True, False):  # static shapes on CUDA: captured graphs; off: the same chain, eagerly
        runner = NativeRunner.from_pretrained(path, device="cuda", compile=False, static_shapes=static)
        generator = make_generator(sp, runner.device)
        prefill(runner, torch.tensor(PROMPT[:-1], device="cuda"))
        fed, out = torch.tensor(PROMPT[-1:]), []
        for step, (k, accepted) in enumerate(STEPS):
            start = runner.length + fed.shape[0]  # the fed tokens stay valid
            tokens, probs = runner.draft_chain(fed, k, sp, generator, runner.vocab_size)
            out.append((tokens.tolist(), probs))
            runner.rollback(start + min(accepted, k - 1))
            bonus = torch.tensor([40 + step])
            fed = torch.cat([tokens[-1:].cpu(), bonus]) if accepted == k else bonus
        runs.append((out, runner.chain_graphs_captured))
    (graphed, captured), (eager, none) = runs
    assert captured > 0 and none == 0
    for (tokens_a, probs_a), (tokens_b, probs_b) in zip(graphed, eager):
        assert tokens_a == tokens_b
        if probs_a is not None:
            torch.testing.assert_close(probs_a, probs_b)
