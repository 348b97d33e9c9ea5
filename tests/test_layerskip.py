"""Layer-skip self-speculation: candidate layer sets, the planner, calibration (and its fallback to plain steps when no
plan pays), greedy equality with `transformers` on the native runner, exact sampling against the early-exit q, and
clear errors."""

from __future__ import annotations

import gc
import itertools
import logging
from types import SimpleNamespace

import pytest
import torch

import paradec
from conftest import hf_greedy, make_config, save_model
from paradec.config import SamplingParams
from paradec.drafters import layerskip
from paradec.drafters.layerskip import (
    VIEWS_KEPT,
    LayerSkip,
    LayerSkipMethod,
    LayerSkipOptions,
    candidate_layers,
    expected_speedup,
    expected_tokens,
    plan,
)
from paradec.errors import ParadecError
from paradec.runners.native import NativeRunner
from paradec.sampling import warp
from sampling_check import chi_square_p, sample_counts

PROMPTS = ["def fibonacci(n):\n", "The quick brown fox jumps over the lazy dog. The quick brown fox"]
ARCHS = ("llama", "qwen2")  # the native runner's architectures among the test models


@pytest.fixture(scope="module")
def deep_dirs(tmp_path_factory, tokenizer_dir, vocab_size):
    """arch -> a 4-layer random target (layers to skip)."""
    root = tmp_path_factory.mktemp("deep")
    return {
        arch: save_model(make_config(arch, vocab_size, layers=4), root / arch, tokenizer_dir, seed=400 + i)
        for i, arch in enumerate(ARCHS)
    }


@pytest.fixture(scope="module")
def deep(deep_dirs):
    """arch -> (native engine, transformers model)."""
    from transformers import AutoModelForCausalLM

    return {
        arch: (
            paradec.load(path, runner="native"),
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
        )
        for arch, path in deep_dirs.items()
    }


def test_candidate_layers():
    assert candidate_layers(4) == [(0,), (0, 1), (0, 1, 2), (0, 1, 3), (0, 2, 3)]
    twelve = candidate_layers(12)
    assert (0, 1, 2, 3, 4, 5) in twelve  # early exit at half depth
    assert (0, 1, 2, 3, 10, 11) in twelve  # the same budget on the first and last layers
    assert (0, 2, 4, 6, 8, 10, 11) in twelve  # every other layer
    assert all(0 < len(c) < 12 and list(c) == sorted(set(c)) for c in twelve)
    assert len(twelve) == len(set(twelve))
    assert candidate_layers(2) == [(0,)]


def test_planner_trades_acceptance_against_cost():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    # 8 layers: a 2-layer draft that agrees half the time loses to a 4-layer draft that agrees 95% of the time
    layers, k = plan({(0, 1): 0.5, (0, 1, 2, 3): 0.95}, 8)
    assert layers == (0, 1, 2, 3) and k > 2
    assert plan({(0, 1): 0.5, (0, 1, 2, 3): 0.95}, 8, k=1)[1] == 1  # a given k is kept
    assert plan({(0,): 0.0}, 8) == ((0,), 1)  # nothing is ever accepted: the shortest draft
    assert expected_speedup(0.0, 1, (0,), 8) == pytest.approx(1 / (1 + 2 / 9))  # ... which only costs: < 1
    assert expected_speedup(0.95, 4, (0, 1, 2, 3), 8) == pytest.approx((1 - 0.95**5) / 0.05 / (1 + 4 * 5 / 9))


def agreement_table(engine) -> dict[tuple[int, ...], float]:
    """The engine's measured agreement of every calibration candidate (4 layers)."""

    def unmeasured():
        raise AssertionError("a candidate was not measured")

    return {layers: engine.method("layerskip").agreement.get(layers, unmeasured) for layers in candidate_layers(4)}


def test_calibration_falls_back_to_plain_steps_when_no_plan_pays(deep_dirs, deep, caplog):
    """Random weights: the early exits rarely agree with the full model, so the best plan expects less than
    vanilla's speed. The drafter then proposes nothing (every step is a plain target step, τ = 1), says so once per
    engine, and the output stays exact; options that fix layers and k still draft."""
    engine, model = paradec.load(deep_dirs["qwen2"], runner="native"), deep["qwen2"][1]  # a fresh engine
    with caplog.at_level(logging.WARNING, logger=layerskip.__name__):
        for prompt in PROMPTS:
            result = engine.generate(prompt, method="layerskip", max_new_tokens=24)
            assert result.token_ids == hf_greedy(model, engine.encode(prompt), 24)
            assert result.stats.proposed_tokens == 0 and result.stats.steps == result.stats.new_tokens
    table = agreement_table(engine)
    layers, k = plan(table, 4)
    assert expected_speedup(table[layers], k, layers, 4) <= 1.0  # what the test is about: no plan pays
    notes = [r.getMessage() for r in caplog.records if "decoding without drafts" in r.getMessage()]
    assert len(notes) == 1 and f"expects {expected_speedup(table[layers], k, layers, 4):.2f}x" in notes[0]
    given = engine.generate(PROMPTS[0], method="layerskip", options={"layers": "0,1", "k": 2}, max_new_tokens=24)
    assert given.stats.proposed_tokens > 0
    assert given.token_ids == hf_greedy(model, engine.encode(PROMPTS[0]), 24)


def test_calibration_drafts_when_a_plan_pays(deep_dirs, deep, monkeypatch, caplog):
    """The same engine with early exits that (as measured here) agree 95% of the time: the planner drafts."""
    monkeypatch.setattr(layerskip, "measure_agreement", lambda target, tokens, missing: dict.fromkeys(missing, 0.95))
    engine, model = paradec.load(deep_dirs["qwen2"], runner="native"), deep["qwen2"][1]
    with caplog.at_level(logging.WARNING, logger=layerskip.__name__):
        result = engine.generate(PROMPTS[0], method="layerskip", max_new_tokens=24)
    assert result.stats.proposed_tokens > 0 and not caplog.records
    assert result.token_ids == hf_greedy(model, engine.encode(PROMPTS[0]), 24)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(deep, arch):
    engine, model = deep[arch]
    for prompt in PROMPTS:
        reference = hf_greedy(model, engine.encode(prompt), 32)
        for options in ({"layers": (0, 1), "k": 3}, {"layers": "0,3", "k": 2}, {"layers": [0, 1, 2], "k": 1}):
            assert (
                engine.generate(prompt, method="layerskip", options=options, max_new_tokens=32).token_ids == reference
            )


def test_calibration_chooses_layers_once_per_engine(deep, monkeypatch):
    engine, model = deep["llama"]
    prompt = PROMPTS[1]
    reference = hf_greedy(model, engine.encode(prompt), 32)
    assert engine.generate(prompt, method="layerskip", max_new_tokens=32).token_ids == reference
    agreement = engine.method("layerskip").agreement
    assert all(layers in agreement for layers in candidate_layers(4))
    assert all(0.0 <= share <= 1.0 for share in agreement.values())

    def fail(*args):
        raise AssertionError("calibrated twice")

    monkeypatch.setattr(layerskip, "measure_agreement", fail)
    assert engine.generate(PROMPTS[0], method="layerskip", max_new_tokens=32).token_ids == hf_greedy(
        model, engine.encode(PROMPTS[0]), 32
    )


def test_agreement_of_the_full_depth_is_one_and_of_a_different_model_is_not(deep):
    """Calibration measures what it says: all layers agree with the full model everywhere; one layer does not."""
    engine, _ = deep["qwen2"]
    ids = engine.encode(PROMPTS[0])
    measured = layerskip.measure_agreement(engine.target, ids, [(0, 1, 2, 3), (0,)])
    assert measured[(0, 1, 2, 3)] == 1.0
    assert measured[(0,)] < 1.0


def test_adaptive_draft_length_stays_lossless(deep):
    engine, model = deep["qwen2"]
    for prompt in PROMPTS:
        reference = hf_greedy(model, engine.encode(prompt), 32)
        result = engine.generate(
            prompt, method="layerskip", options={"layers": (0, 1), "adaptive": True}, max_new_tokens=32
        )
        assert result.token_ids == reference


def test_clear_errors(deep, model_dirs):
    engine, _ = deep["llama"]
    hf_engine = paradec.load(model_dirs["llama"], runner="hf")
    with pytest.raises(ParadecError, match=r"needs the native runner.*runner='native'") as info:
        hf_engine.generate("def", method="layerskip")
    assert info.value.param == "method"
    for options, message in (
        ({"layers": "0,4"}, r"option layers=\(0, 4\) .* in \[0, 3\] or none \(3: the target's last layer\)"),
        ({"layers": "0,1,2,3"}, "keeps all 4 layers"),
        ({"layers": "2,1"}, "distinct layers in ascending order"),
        ({"layers": [0, True]}, r"option layers=\[0, True\]|option layers=\(0, True\)"),
        ({"k": 0}, r"option k=0 for method 'layerskip' must be an integer in \[1, 32\]"),
        ({"k": 33}, r"option k=33 .* in \[1, 32\]"),
    ):
        with pytest.raises(ParadecError, match=message) as info:
            engine.generate("def", method="layerskip", options=options)
        assert info.value.param == "method_options"


def test_views_are_bounded_per_engine_and_outputs_stay_exact(tmp_path, tokenizer_dir, vocab_size):
    """20 requests with 20 different layer sets keep at most VIEWS_KEPT drafting views (each with its own KV cache)
    alive, and every output equals vanilla's."""
    path = save_model(make_config("llama", vocab_size, layers=6), tmp_path / "six", tokenizer_dir, seed=7)
    engine = paradec.load(path, runner="native")
    prompt = engine.encode(PROMPTS[0])
    reference = engine.generate(prompt, max_new_tokens=8).token_ids
    subsets = [s for n in range(1, 6) for s in itertools.combinations(range(6), n)][::3][:20]
    assert len(set(subsets)) == 20
    for layers in subsets:
        result = engine.generate(prompt, method="layerskip", options={"layers": layers, "k": 2}, max_new_tokens=8)
        assert result.token_ids == reference
    gc.collect()
    views = [o for o in gc.get_objects() if isinstance(o, NativeRunner) and o.model is engine.target.model]
    views.remove(engine.target)
    assert sorted(view.layer_ids for view in views) == sorted(subsets[-VIEWS_KEPT:])  # the most recently used
    one_layer = engine.target.cache.data.nbytes // 6  # a view's cache holds its layers' keys and values
    assert sum(view.cache.data.nbytes for view in views) == one_layer * sum(len(s) for s in subsets[-VIEWS_KEPT:])


@pytest.fixture(scope="module")
def four_token_model(tmp_path_factory):
    """A 3-layer Llama over a vocabulary of 4: small enough to enumerate every continuation exactly."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.15, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("vocab4")
    model.save_pretrained(path)
    return model, path


def test_sampling_matches_plain_sampling(four_token_model):
    """Drafts sampled from the early exit's q, verified by rejection sampling: plain sampling's distribution."""
    model, path = four_token_model
    sp, prompt, new = SamplingParams(temperature=1.0), [1, 2, 3], 2
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(4), repeat=new):
            context = torch.tensor([prompt + list(seq)])
            p = warp(model(context).logits[0, len(prompt) - 1 : -1], sp)  # [new, V]
            exact[seq] = float(p[torch.arange(new), torch.tensor(seq)].prod())
    target = NativeRunner.from_pretrained(path)
    method = LayerSkipMethod(SimpleNamespace(target=target), LayerSkip)
    options = LayerSkipOptions(layers=(0,), k=1)
    counts = sample_counts(target, lambda: method.open(options), prompt, sp, new, 600)
    assert chi_square_p(counts, exact, 4, new) > 1e-3
