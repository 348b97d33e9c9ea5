"""Greedy output of every method equals `transformers` greedy `generate`, token for token.

Covered: three architectures (Llama, Qwen2, GPT-2), several prompts, random drafts (mostly rejected), a draft
that is a copy of the target (always accepted), prompt lookup on targets that loop (mostly accepted).
"""

from __future__ import annotations

import pytest

from conftest import ARCHS, hf_greedy

PROMPTS = [
    "def fibonacci(n):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop",
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_vanilla_and_pld_equal_transformers(engines, hf_models, arch, prompt):
    engine = engines(arch)
    ids = engine.encode(prompt)
    reference = hf_greedy(hf_models(arch), ids, 48)
    assert engine.generate(prompt, method="vanilla", max_new_tokens=48).token_ids == reference
    assert engine.generate(prompt, method="pld", max_new_tokens=48).token_ids == reference


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 4])
def test_draft_random_equal_transformers(engines, hf_models, arch, k):
    engine = engines(arch, f"{arch}-draft")
    for prompt in PROMPTS[:2]:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 40)
        result = engine.generate(prompt, method="draft", options={"k": k}, max_new_tokens=40)
        assert result.token_ids == reference
        assert result.stats.steps > 40 / (k + 1)  # a random draft gets few tokens accepted


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_copy_of_target_accepts_everything(engines, hf_models, arch):
    engine = engines(arch, arch)
    prompt = PROMPTS[0]
    reference = hf_greedy(hf_models(arch), engine.encode(prompt), 60)
    result = engine.generate(prompt, method="draft", options={"k": 5}, max_new_tokens=60)
    assert result.token_ids == reference
    assert result.stats.tau == pytest.approx(6.0)  # k + 1 tokens per step
    assert result.stats.acceptance_by_position == [1.0] * 5


@pytest.mark.parametrize("arch", ARCHS)
def test_pld_on_looping_target_mostly_accepted(engines, hf_models, arch):
    engine = engines(f"loop-{arch}")
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(f"loop-{arch}"), engine.encode(prompt), 120)
        result = engine.generate(prompt, method="pld", max_new_tokens=120)
        assert result.token_ids == reference
        if result.stats.new_tokens == 120:
            assert result.stats.tau > 2.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_ids_and_single_token_prompt(engines, hf_models, arch):
    engine = engines(arch, f"{arch}-draft")
    for ids in ([5], [17, 42, 99, 3]):
        reference = hf_greedy(hf_models(arch), ids, 20)
        for method in ("vanilla", "pld", "draft"):
            assert engine.generate(ids, method=method, max_new_tokens=20).token_ids == reference
