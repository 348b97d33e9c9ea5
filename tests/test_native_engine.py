"""Through the engine, every method on the native runner gives `transformers` greedy output, token for token."""

from __future__ import annotations

import pytest
import torch

import paradec
from conftest import hf_greedy, make_config, save_model
from paradec.runners.native import NativeRunner

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
PROMPTS = ["def fibonacci(n):\n", "The quick brown fox jumps over the lazy dog. The quick brown fox"]


@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory, tokenizer_dir, vocab_size):
    """arch -> (target dir, draft dir): a 2-layer target and a different 1-layer draft."""
    root = tmp_path_factory.mktemp("native-models")
    out = {}
    for i, arch in enumerate(ARCHS):
        target = save_model(make_config(arch, vocab_size), root / arch, tokenizer_dir, seed=500 + i)
        draft = save_model(
            make_config(arch, vocab_size, layers=1, hidden=32), root / f"{arch}-draft", tokenizer_dir, seed=600 + i
        )
        out[arch] = (target, draft)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_on_native_runner_equals_transformers(native_dirs, arch):
    from transformers import AutoModelForCausalLM

    target, draft = native_dirs[arch]
    engine = paradec.load(target, draft, runner="native", device="cpu")
    assert isinstance(engine.target, NativeRunner) and isinstance(engine.draft_runner(), NativeRunner)
    reference_model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        reference = hf_greedy(reference_model, engine.encode(prompt), 32)
        for method, options in (("vanilla", None), ("pld", None), ("draft", {"k": 3})):
            result = engine.generate(prompt, method=method, options=options, max_new_tokens=32)
            assert result.token_ids == reference, (method, prompt)
