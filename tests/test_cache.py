"""After rejections the runner's cache equals a cache built from scratch over the accepted tokens."""

from __future__ import annotations

import torch

from paradec.runners import HFRunner, load_hf_model, prefill
from paradec.tree import build_tree


def cache_tensors(runner: HFRunner) -> list[torch.Tensor]:
    return [torch.cat([layer.keys, layer.values]) for layer in runner._cache.layers]


def fresh(path, tokens: list[int]) -> HFRunner:
    runner = HFRunner(load_hf_model(path, torch.device("cpu"), torch.float32))
    prefill(runner, torch.tensor(tokens))
    return runner


def assert_same_cache(a: HFRunner, b: HFRunner) -> None:
    assert a.length == b.length
    for x, y in zip(cache_tensors(a), cache_tensors(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_chain_rejection_then_tree_commit_equal_fresh_cache(model_dirs):
    for arch in ("llama", "gpt2"):
        path = model_dirs[arch]
        runner = HFRunner(load_hf_model(path, torch.device("cpu"), torch.float32))
        prefill(runner, torch.tensor([5, 6, 7]))
        runner.forward(torch.tensor([8, 9, 10, 11]))
        runner.commit(2)  # a chain step that accepted the pending token and one draft
        tree = build_tree((-1, -1, 0, 1, 3))
        out_tree = runner.forward(torch.tensor([12, 13, 14, 15, 16, 17]), tree)
        runner.commit([0, 2, 4, 5])  # pending 12, then node 1 (14), node 3 (16), node 4 (17)
        expected = fresh(path, [5, 6, 7, 8, 9, 12, 14, 16, 17])
        assert_same_cache(runner, expected)
        # tree logits equal scoring the committed path as a chain
        chain = fresh(path, [5, 6, 7, 8, 9])
        out_chain = chain.forward(torch.tensor([12, 14, 16, 17]))
        torch.testing.assert_close(out_tree.logits[[0, 2, 4, 5]], out_chain.logits, rtol=1e-4, atol=1e-4)
        runner.rollback(4)
        assert_same_cache(runner, fresh(path, [5, 6, 7, 8]))


def test_engine_cache_after_generation_with_rejections(model_dirs):
    import paradec

    engine = paradec.load(model_dirs["llama"], model_dirs["llama-draft"], runner="hf")
    result = engine.generate("def fibonacci(n):\n", method="draft", max_new_tokens=30)
    assert result.stats.proposed_tokens > result.stats.accepted_tokens  # there were rejections
    tokens = engine.encode("def fibonacci(n):\n") + result.token_ids
    # the target cache holds every token but the last emitted (pending) one
    assert_same_cache(engine.target, fresh(model_dirs["llama"], tokens[:-1]))


def test_draft_model_cache_rolls_back_to_accepted(model_dirs):
    import paradec
    from paradec.config import SamplingParams
    from paradec.drafters.base import DecodeState
    from paradec.drafters.draft_model import DraftModel, DraftOptions
    from paradec.types import Verdict

    engine = paradec.load(model_dirs["llama"], model_dirs["llama-draft"], runner="hf")
    drafter = DraftModel(engine, DraftOptions(k=4))
    state = DecodeState([5, 6, 7], 3, SamplingParams(), None, torch.device("cpu"), engine.target.vocab_size)
    drafter.begin(state)
    for accepted in (2, 0, 4, 1):
        proposal = drafter.propose(state, max_tokens=10)
        drafts = proposal.tokens.tolist()
        state.tokens += [*drafts[:accepted], 300 + accepted]  # accepted drafts, then a recovered/bonus token
        drafter.update(state, Verdict(path=list(range(accepted)), tokens=[], proposed=4, depth=4))
        valid = len(state.tokens) - 1 - accepted + min(accepted, 3)  # up to the old pending token + cached drafts
        assert drafter.runner.length == valid
        assert_same_cache(drafter.runner, fresh(model_dirs["llama-draft"], state.tokens[:valid]))


def test_aux_inputs_are_scored_but_never_committed(model_dirs):
    path = model_dirs["qwen2"]
    runner = HFRunner(load_hf_model(path, torch.device("cpu"), torch.float32))
    prefill(runner, torch.tensor([5, 6, 7]))
    tree = build_tree((-1, 0))  # a 2-token chain after the pending token 8
    # two aux inputs forming their own chain from the root: 8 -> 20 -> 21 (positions +1, +2)
    aux_mask = torch.tensor([[1, 0, 0, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)
    layout = tree.with_aux(torch.tensor([1, 2]), aux_mask)
    assert layout.size == 5 and not layout.is_chain and layout.parents == tree.parents
    out = runner.forward(torch.tensor([8, 9, 10, 20, 21]), layout)
    runner.commit([0, 1])
    assert_same_cache(runner, fresh(path, [5, 6, 7, 8, 9]))
    chain = fresh(path, [5, 6, 7]).forward(torch.tensor([8, 20, 21]))
    torch.testing.assert_close(out.logits[[0, 3, 4]], chain.logits, rtol=1e-4, atol=1e-4)
    other = fresh(path, [5, 6, 7]).forward(torch.tensor([8, 9, 10]))
    torch.testing.assert_close(out.logits[:3], other.logits, rtol=1e-4, atol=1e-4)
