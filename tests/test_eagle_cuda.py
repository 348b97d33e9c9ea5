"""`eagle` on CUDA: a step replayed from the captured CUDA graph equals the same step run eagerly, and greedy
output through the engine equals `transformers` on the GPU; both for heads over the full vocabulary and heads with a
reduced draft vocabulary (the draft -> target map inside the graph), and for EAGLE-3 heads fusing three target layers
(the fusion inside the drafter's graph, the layers from the native runner's captured graphs). Skipped where there is
no GPU."""

from __future__ import annotations

import pytest
import torch

import paradec
from paradec.config import SamplingParams
from paradec.drafters.base import DecodeState
from paradec.drafters.eagle import Eagle, EagleMethod, EagleOptions
from paradec.types import Verdict
from test_eagle import FUSED, PROMPTS, FakeResources, FakeTarget, make_deep_dirs, random_heads_dir, random_reduced_eagle
from test_heads import random_eagle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@torch.inference_mode()
@pytest.mark.parametrize("draft_vocab", [None, 20])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_step_run_directly(dtype, compiled, draft_vocab):
    head = (random_eagle(2) if draft_vocab is None else random_reduced_eagle(2, draft_vocab)).to(CUDA, dtype)
    V, H = head.config.vocab_size, head.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    embed, lm_head = torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5
    target = FakeTarget(embed.to(CUDA, dtype), lm_head.to(CUDA, dtype))
    options = EagleOptions(topk=3, depth=4, nodes=10, compile=compiled)
    drafter = Eagle(EagleMethod(FakeResources(target, {"eagle": head}), Eagle), options)
    tokens = torch.randint(V, (8,), generator=gen).tolist()
    state = DecodeState(tokens, 8, SamplingParams(), None, CUDA, V, target_hidden=torch.randn(7, H).to(CUDA, dtype))
    drafter.begin(state)
    assert drafter.propose(state, max_tokens=10).size == 10 and 10 in drafter.ws.graphs  # the first step replays
    for step in range(4):
        state.tokens += [step + 1, step + 2]
        state.target_hidden = torch.randn(2, H, generator=gen).to(CUDA, dtype)
        drafter.update(state, Verdict(path=[0], tokens=state.tokens[-2:], proposed=10))
        ws = drafter.ws
        keys, values = ws.keys.clone(), ws.values.clone()
        replayed = drafter.propose(state, max_tokens=10)
        ws.keys.copy_(keys)
        ws.values.copy_(values)
        weights = (drafter.head, drafter.embed, drafter.lm_head, drafter.d2t)
        run = drafter.step(*weights, *ws.state(), ws.capacity, 3, 4, 10, True)  # directly: the workspace's row
        tokens, depth, mask, parent = (t[0] for t in run)
        assert replayed.tokens.tolist() == tokens.tolist()
        if draft_vocab is not None:  # target ids of the draft vocabulary
            assert set(replayed.tokens.tolist()) <= set(head.d2t.tolist())
        assert torch.equal(replayed.layout.parent, parent)
        assert torch.equal(replayed.layout.mask, mask) and torch.equal(replayed.layout.depth, depth)


@pytest.mark.parametrize("vocab", ["full", "reduced"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_transformers_on_cuda(model_dirs, tmp_path, arch, compiled, vocab):
    from transformers import AutoModelForCausalLM

    engine = paradec.load(model_dirs[arch], runner="hf", device="cuda", dtype="float32")
    size = engine.target.vocab_size
    heads = random_heads_dir(tmp_path, 64, size, seed=3, draft_vocab=size // 2 if vocab == "reduced" else None)
    engine = paradec.load(model_dirs[arch], heads=heads, runner="hf", device="cuda", dtype="float32")
    engine.set_default_options("eagle", {"compile": compiled})  # an engine setting, not a request's
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32).to(CUDA).eval()
    for prompt in PROMPTS[:2]:
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=CUDA), do_sample=False, max_new_tokens=40, eos_token_id=0, pad_token_id=0
            )
        reference = out[0, len(ids) :].tolist()
        result = engine.generate(prompt, method="eagle", max_new_tokens=40)
        assert result.token_ids == reference
        again = engine.generate(prompt, method="eagle", max_new_tokens=40)
        assert again.token_ids == reference  # graphs reused


@pytest.fixture(scope="module")
def deep_dirs(tmp_path_factory, tokenizer_dir, vocab_size):
    return make_deep_dirs(tmp_path_factory.mktemp("deep"), tokenizer_dir, vocab_size)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_head_greedy_equals_transformers_on_cuda(deep_dirs, arch, compiled):
    """The native runner on CUDA returns the fused layers from its captured graphs (one per layer set) and the
    drafter's graph fuses them: greedy output equals `transformers`, again when every graph is replayed."""
    from transformers import AutoModelForCausalLM

    path, heads = deep_dirs[arch]
    engine = paradec.load(path, heads=heads, runner="native", device="cuda", dtype="float32")
    assert engine.heads("eagle").config.feature_layers == FUSED
    engine.set_default_options("eagle", {"compile": compiled})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(CUDA).eval()
    for prompt in PROMPTS[:2]:
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=CUDA), do_sample=False, max_new_tokens=40, eos_token_id=0, pad_token_id=0
            )
        reference = out[0, len(ids) :].tolist()
        for _ in range(2):  # graphs captured, then reused
            result = engine.generate(prompt, method="eagle", max_new_tokens=40)
            assert result.token_ids == reference and result.stats.proposed_tokens > 0
    assert engine.target.graphs_captured > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_a_batch_of_eagle_sequences_drafts_in_one_captured_step(model_dirs, tmp_path, compiled):
    """On CUDA the bank of a batch's EAGLE sequences replays one captured step for all of them, and each sequence
    drafts and emits what it does alone (`tests/test_batch.py` checks the same eagerly on the CPU)."""
    probe = paradec.load(model_dirs["llama"], runner="native", device="cuda", dtype="float32")
    heads = random_heads_dir(tmp_path, 64, probe.target.vocab_size, seed=3)
    engine = paradec.load(model_dirs["llama"], heads=heads, runner="native", device="cuda", dtype="float32")
    engine.set_default_options("eagle", {"compile": compiled})
    prompts = PROMPTS[:3]
    results = engine.generate_batch(prompts, method="eagle", max_new_tokens=16, speculate="always")
    bank = next(iter(engine.method("eagle").banks.values()))
    assert bank.graphs  # the batched step was captured
    for prompt, result in zip(prompts, results, strict=True):
        single = engine.generate(prompt, method="eagle", max_new_tokens=16)
        assert result.token_ids == single.token_ids
        assert (result.stats.steps, result.stats.accepted_tokens) == (single.stats.steps, single.stats.accepted_tokens)
