"""Jacobi decoding: the window update, greedy equality with `transformers`, and exact sampling."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, hf_greedy
from fakes import TableRunner, exact_joint, random_table
from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import DecodeState
from paradec.drafters.jacobi import Jacobi, JacobiOptions
from paradec.drafters.vanilla import Vanilla
from paradec.errors import ParadecError
from paradec.types import Verdict
from sampling_check import chi_square_p, sample_counts

PROMPTS = ["def fibonacci(n):\n", "The quick brown fox jumps over the lazy dog. The quick brown fox"]


def one_hot_logits(picks: list[int], vocab: int = 50) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(picks), vocab).float()


def test_window_takes_the_picks_after_the_accepted_prefix():
    drafter = Jacobi(None, JacobiOptions(window=4))
    state = DecodeState([1, 2, 3], 3, SamplingParams(), None, torch.device("cpu"), 50)
    drafter.begin(state)
    assert drafter.propose(state, max_tokens=10).tokens.tolist() == [3, 3, 3, 3]  # the last prompt token
    # inputs [3, g1..g4]; the target picks 11..15 after them; g1 accepted, g2 rejected
    state.target_logits = one_hot_logits([11, 12, 13, 14, 15])
    drafter.update(state, Verdict(path=[0], tokens=[3, 12], proposed=4, depth=4))
    assert drafter.guesses.tolist() == [13, 14, 15, 15]  # picks after inputs 2..4, padded with the last pick
    # a short step (max_tokens caps the window) with nothing accepted
    assert drafter.propose(state, max_tokens=2).tokens.tolist() == [13, 14]
    state.target_logits = one_hot_logits([21, 22, 23])
    drafter.update(state, Verdict(path=[], tokens=[21], proposed=2, depth=2))
    assert drafter.guesses.tolist() == [22, 23, 23, 23]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(engines, hf_models, arch):
    engine = engines(arch)
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 32)
        for window in (1, 5):
            result = engine.generate(prompt, method="jacobi", options={"window": window}, max_new_tokens=32)
            assert result.token_ids == reference


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_on_the_native_runner(engines, hf_models, arch):
    engine = engines(arch, runner="native")
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), engine.encode(prompt), 32)
        assert engine.generate(prompt, method="jacobi", max_new_tokens=32).token_ids == reference


def test_fixed_point_iteration_gains_where_tokens_skip_a_dependency():
    """A target whose next token depends on the token before the current one only: position i is right once
    position i - 2 is, so each Jacobi iteration settles about two tokens (a target that depends on the current
    token only gives Jacobi nothing: each iteration fixes exactly one)."""
    table = random_table(12, seed=3, scale=3.0)[:, :1].expand(12, 12, 12).contiguous()  # logits after (p, c) = T[p]
    prompt, new = [4, 7], 40
    plain = Generation(TableRunner(table), Vanilla(None, None), None, prompt, SamplingParams(), new, set(), [], "v")
    jacobi = Generation(
        TableRunner(table), Jacobi(None, JacobiOptions(window=6)), None, prompt, SamplingParams(), new, set(), [], "j"
    )
    expected, result = plain.run(), jacobi.run()
    assert result.token_ids == expected.token_ids
    assert result.stats.tau > 1.8


def test_sampling_matches_plain_sampling():
    table = random_table(4, seed=1, scale=0.8)
    sp = SamplingParams(temperature=1.3, top_k=3, top_p=0.9)
    prompt = [1, 2]
    counts = sample_counts(TableRunner(table), lambda: Jacobi(None, JacobiOptions(window=2)), prompt, sp, 3, 2000)
    assert chi_square_p(counts, exact_joint(table, prompt, 3, sp), 4, 3) > 1e-3


def test_bad_window_is_rejected(engines):
    with pytest.raises(ParadecError, match="window"):
        engines("llama").generate("def", method="jacobi", options={"window": 0})
    with pytest.raises(ParadecError, match="window='x'"):
        engines("llama").generate("def", method="jacobi", options={"window": "x"})
