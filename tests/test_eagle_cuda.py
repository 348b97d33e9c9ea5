"""`eagle` on CUDA: a step replayed from the captured CUDA graph equals the same step run eagerly, and greedy
output through the engine equals `transformers` on the GPU. Skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

import paradec
from paradec.config import SamplingParams
from paradec.drafters.base import DecodeState
from paradec.drafters.eagle import Eagle, EagleMethod, EagleOptions
from paradec.types import Verdict
from test_eagle import PROMPTS, FakeResources, FakeTarget, random_heads_dir
from test_heads import random_eagle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@torch.inference_mode()
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_step_run_directly(dtype, compiled):
    head = random_eagle(2).to(CUDA, dtype)
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
        args = (drafter.head, drafter.embed, drafter.lm_head, *ws.state(), ws.capacity, 3, 4, 10, True)
        tokens, depth, mask, parent = drafter.step(*args)  # the same step, run directly
        assert replayed.tokens.tolist() == tokens.tolist()
        assert torch.equal(replayed.layout.parent, parent)
        assert torch.equal(replayed.layout.mask, mask) and torch.equal(replayed.layout.depth, depth)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_transformers_on_cuda(model_dirs, tmp_path, arch, compiled):
    from transformers import AutoModelForCausalLM

    engine = paradec.load(model_dirs[arch], runner="hf", device="cuda", dtype="float32")
    heads = random_heads_dir(tmp_path, 64, engine.target.vocab_size, seed=3)
    engine = paradec.load(model_dirs[arch], heads=heads, runner="hf", device="cuda", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32).to(CUDA).eval()
    for prompt in PROMPTS[:2]:
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=CUDA), do_sample=False, max_new_tokens=40, eos_token_id=0, pad_token_id=0
            )
        reference = out[0, len(ids) :].tolist()
        options = {"compile": compiled}
        result = engine.generate(prompt, method="eagle", max_new_tokens=40, options=options)
        assert result.token_ids == reference
        again = engine.generate(prompt, method="eagle", max_new_tokens=40, options=options)
        assert again.token_ids == reference  # graphs reused
