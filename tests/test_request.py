"""The request seam: `Engine.request` checks a generation's whole input once, every refusal naming the value and the
parameter (`ParadecError.param`); method options are typed and bounded by their fields' metadata (the engine's limits
included); engine settings are per engine; sampling has a greedy epsilon and a seed range; stops are bounded."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import paradec
import paradec.drafters.eagle as eagle_module
from paradec.config import GREEDY_EPSILON, SamplingParams
from paradec.decode import Generation
from paradec.drafters import Options, bound
from paradec.drafters.eagle import EagleOptions
from paradec.drafters.lookahead import LookaheadOptions
from paradec.drafters.medusa import MedusaOptions
from paradec.drafters.pld import PLDOptions
from paradec.errors import SHOWN_CHARS, ParadecError, shown
from paradec.heads import EagleConfig, EagleHead, save_heads
from paradec.request import MAX_STOP_CHARS, MAX_STOPS, Request

PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def engine(engines):
    return engines("llama", "llama-draft")


@pytest.fixture(scope="module")
def chat_engine(chat_llama_dir):
    """The tiny llama with a chat template."""
    return paradec.load(chat_llama_dir, runner="hf")


@pytest.fixture
def eagle_engine(model_dirs, tmp_path):
    """A fresh engine with random EAGLE heads (its settings are changed by the tests)."""
    import torch

    bare = paradec.load(model_dirs["llama"], runner="hf")
    torch.manual_seed(3)
    save_heads(EagleHead(EagleConfig.for_target(64, bare.target.vocab_size)), tmp_path / "eagle")
    return paradec.load(model_dirs["llama"], heads=tmp_path, runner="hf")


def refused(param: str, match: str, call, *args, **kwargs) -> ParadecError:
    with pytest.raises(ParadecError, match=match) as info:
        call(*args, **kwargs)
    assert info.value.param == param, (info.value.param, str(info.value))
    return info.value


# --- the request object -----------------------------------------------------------------------------------------
def test_a_request_runs_like_the_keywords(engine):
    request = engine.request(PROMPT, method="pld", options={"max_ngram": 4}, max_new_tokens=16, stop=["\n\n"])
    assert isinstance(request, Request)
    assert request.prompt_ids == tuple(engine.encode(PROMPT)) and request.method == "pld"
    assert request.options == PLDOptions(max_ngram=4) and request.stops == ("\n\n",)
    assert request.drafter is paradec.drafters.get_drafter("pld")
    keywords = engine.generate(PROMPT, method="pld", options={"max_ngram": 4}, max_new_tokens=16, stop=["\n\n"])
    assert engine.generate(request).token_ids == keywords.token_ids
    assert "".join(engine.stream(request)) == keywords.text
    with pytest.raises(TypeError, match="a Request or a prompt"):
        engine.generate(request, method="draft")


def test_prompt_xor_messages(chat_engine, engine):
    messages = [{"role": "user", "content": "def stack():"}]
    request = chat_engine.request(messages=messages, max_new_tokens=4)
    assert list(request.prompt_ids) == chat_engine.encode_chat(messages)
    refused("prompt", "give either a prompt or chat messages", chat_engine.request)
    refused("messages", "not both", chat_engine.request, "x", messages=messages)
    refused("messages", "messages\\[0\\].role must be one of", chat_engine.request, messages=[{"role": "robot"}])
    refused("messages", "messages must not be empty", chat_engine.request, messages=[])
    refused("messages", "has no chat template", engine.request, messages=messages)


@pytest.mark.parametrize(
    ("kwargs", "param", "match"),
    [
        ({"prompt": 5}, "prompt", "prompt must be a string or token ids"),
        ({"prompt": [1, True]}, "prompt", "integer token ids"),
        ({"prompt": list(range(300))}, "prompt", "the prompt is 300 tokens, the model's context is 256"),
        ({"max_new_tokens": True}, "max_new_tokens", "max_new_tokens must be an integer >= 1, got True"),
        ({"method": ["pld"]}, "method", "unknown method \\['pld'\\]"),
        ({"sampling": {"temp": 1.0}}, "sampling", "unknown sampling parameter 'temp'"),
        ({"sampling": {"temperature": True}}, "temperature", "temperature must be >= 0, got True"),
        ({"sampling": {"temperature": float("nan")}}, "temperature", "temperature must be >= 0"),
        ({"sampling": {"temperature": float("inf")}}, "temperature", "temperature must be finite"),
        ({"sampling": {"top_k": 1.0}}, "top_k", "top_k must be an integer"),
        ({"sampling": {"top_p": float("nan")}}, "top_p", "top_p must lie in"),
        ({"sampling": {"min_p": -0.1}}, "min_p", "min_p must lie in"),
        ({"sampling": {"seed": "7"}}, "seed", "seed must be an integer"),
        ({"method": "pld", "options": [1]}, "method_options", "options for method 'pld' must be a dict"),
        ({"stop": 5}, "stop", "stop must be a string or a list of strings"),
    ],
)
def test_every_refusal_names_its_parameter(engine, kwargs, param, match):
    refused(param, match, engine.request, **{"prompt": PROMPT, **kwargs})


def test_errors_echo_a_bounded_value(engine):
    assert shown("x" * 10_000).endswith("…") and len(shown("x" * 10_000)) == SHOWN_CHARS
    assert len(shown([0] * 10_000)) <= SHOWN_CHARS
    assert shown("short") == "'short'"
    for kwargs in (
        {"method": "m" * 100_000},
        {"method": "pld", "options": {"k" * 100_000: 1}},
        {"method": "pld", "options": {"max_ngram": "9" * 100_000}},
        {"stop": ["s" * 100_000]},
    ):
        with pytest.raises(ParadecError) as info:
            engine.request(PROMPT, **kwargs)
        assert len(str(info.value)) < 2 * SHOWN_CHARS + 200


# --- bounded, typed options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "match"),
    [  # the requests of the issue's row 1, and more
        (
            "pld",
            {"max_ngram": 1_000_000_000},
            r"option max_ngram=1000000000 for method 'pld' must be an integer in \[1, 32\]",
        ),
        ("pld", {"num_draft_tokens": 128}, r"num_draft_tokens=128 .* in \[1, 127\] \(127: the runner's largest step"),
        ("pld", {"num_draft_tokens": True}, r"num_draft_tokens=True .* must be an integer"),
        ("pld", {"num_draft_tokens": 4.0}, r"num_draft_tokens=4.0 .* must be an integer"),
        ("pld", {"min_ngram": 4}, r"option min_ngram=4 for method 'pld' exceeds max_ngram=3"),
        ("pld", {"adaptive": 1}, r"option adaptive=1 for method 'pld' must be true or false"),
        ("pld", {"adaptive": "maybe"}, r"adaptive='maybe'"),
        ("lookahead", {"window": 10_000}, r"window=10000 .* in \[0, 32\]"),
        ("lookahead", {"ngram": 17}, r"ngram=17 .* in \[2, 16\]"),
        ("lookahead", {"guesses": 65}, r"guesses=65 .* in \[1, 64\]"),
        ("lookahead", {"window": 32, "ngram": 5}, r"= 171 inputs per step; the runner's largest step is 128"),
        ("jacobi", {"window": 200}, r"window=200 .* in \[1, 127\]"),
        ("jacobi", {"window": 0}, r"window=0 .* in \[1, 127\]"),
        (
            "draft",
            {"k": 1_000_000, "adaptive": True},
            r"option k=1000000 for method 'draft' must be an integer in \[1, 32\]",
        ),
        ("draft", {"k": "x"}, r"k='x' .* must be an integer in \[1, 32\]"),
    ],
)
def test_out_of_range_options_are_refused(engine, method, options, match):
    refused("method_options", match, engine.request, PROMPT, method=method, options=options)


def test_options_in_range_are_accepted(engine):
    for method, options in (
        ("pld", {"max_ngram": 32, "min_ngram": 32, "num_draft_tokens": 127}),
        ("lookahead", {"window": 32, "ngram": 2, "guesses": 64, "lookup": 0}),  # 1 + 64 + 0 + 32 = 97 inputs
        ("jacobi", {"window": 127}),
        ("draft", {"k": 32, "adaptive": "on"}),
    ):
        request = engine.request(PROMPT, method=method, options=options, max_new_tokens=4)
        assert engine.generate(request).token_ids == engine.generate(PROMPT, max_new_tokens=4).token_ids


def test_static_bounds_hold_for_direct_construction_too():
    for make, match in (
        (lambda: MedusaOptions(nodes=True), r"option nodes=True for method 'medusa' must be an integer in \[1, "),
        (lambda: EagleOptions(topk=8192), r"topk=8192 .* in \[1, min\(64, the vocabulary size\)\]"),
        (lambda: EagleOptions(depth=300), r"depth=300 .* in \[1, 16\]"),
        (lambda: LookaheadOptions(window=33), r"window=33"),
        (lambda: PLDOptions(max_ngram=10**9), r"max_ngram=1000000000"),
    ):
        refused("method_options", match, make)
    assert PLDOptions(max_ngram=32).max_ngram == 32


def test_the_engine_limits_lower_the_bounds(engine, monkeypatch):
    """A bound derived from the engine: a runner that scores at most 16 inputs per step allows 15 draft tokens; the
    vocabulary caps EAGLE's top-k (checked here on the options, as the tiny models' vocabulary exceeds 64)."""
    monkeypatch.setattr(engine.target, "max_step_inputs", 16, raising=False)
    refused(
        "method_options",
        r"num_draft_tokens=16 .* in \[1, 15\] \(15: the runner's largest step less the pending token\)",
        engine.request,
        PROMPT,
        method="pld",
        options={"num_draft_tokens": 16},
    )
    assert engine.request(PROMPT, method="pld", options={"num_draft_tokens": 15}).options.num_draft_tokens == 15
    refused("method_options", "the runner's largest step is 16", engine.request, PROMPT, method="lookahead")
    refused(
        "method_options",
        r"topk=50 .* in \[1, 40\] \(40: the vocabulary size\)",
        EagleOptions(topk=50).check,
        {"proposal": 127, "vocab": 40},
    )


@dataclass(frozen=True)
class RatioOptions(Options):
    method = "ratio"
    share: float = field(default=0.5, metadata=bound(0, 1))
    steps: tuple[int, ...] | None = field(default=None, metadata=bound(1, 4))


def test_types_are_strict_but_an_integer_is_a_number():
    assert RatioOptions(share=1).share == 1.0 and isinstance(RatioOptions(share=1).share, float)
    assert RatioOptions(steps=[1, 4]).steps == (1, 4)
    for bad, match in (
        ({"share": True}, r"share=True .* must be a number in \[0, 1\]"),
        ({"share": 1.5}, r"share=1.5 .* in \[0, 1\]"),
        ({"share": float("nan")}, r"share=nan"),
        ({"steps": (1, 5)}, r"steps=\(1, 5\) .* a non-empty list of integers in \[1, 4\] or none"),
        ({"steps": (1, False)}, r"steps=\(1, False\)"),
    ):
        refused("method_options", match, RatioOptions, **bad)


def test_methods_list_each_options_bounds(capsys):
    from paradec.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "pld: max_ngram=3 in [1, 32], min_ngram=1 in [1, 32], num_draft_tokens=10 in [1, 127], adaptive=False" in out
    assert "compile=None (engine setting)" in out and "depth=6 in [1, 16]" in out
    assert "medusa: nodes=None in [1, the nodes of the saved tree]\n" in out  # batches: no mark
    assert "[decodes alone, not in a batch]" in next(line for line in out.splitlines() if line.startswith("layerskip"))


# --- engine settings --------------------------------------------------------------------------------------------
def test_compile_is_an_engine_setting(eagle_engine):
    refused(
        "method_options",
        r"option compile=True for method 'eagle' is an engine setting .*set_default_options\('eagle'",
        eagle_engine.request,
        PROMPT,
        method="eagle",
        options={"compile": True},
    )
    refused(
        "method_options",
        r"compile=True for method 'eagle' needs a CUDA engine; this one runs on cpu",
        eagle_engine.set_default_options,
        "eagle",
        {"compile": "true"},
    )
    eagle_engine.set_default_options("eagle", {"compile": False, "topk": 4})
    assert eagle_engine.request(PROMPT, method="eagle").options == EagleOptions(topk=4, compile=False)
    merged = eagle_engine.request(PROMPT, method="eagle", options={"depth": 3, "compile": False}).options
    assert merged == EagleOptions(topk=4, depth=3, compile=False)  # the request's over the engine's defaults
    instance = eagle_engine.request(PROMPT, method="eagle", options=EagleOptions(topk=2)).options
    assert instance == EagleOptions(topk=2, compile=False)  # an instance's class default takes the engine's value
    refused(
        "method_options",
        "is an engine setting",
        eagle_engine.request,
        PROMPT,
        method="eagle",
        options={"compile": None},
    )


def test_a_failed_compilation_is_not_retried(eagle_engine, monkeypatch):
    """Compiling fails once (on CPU the engine refuses compile=True, so the method opens compiled drafters
    directly): that generation drafts eagerly, stays exact, and no later generation of the engine compiles again."""
    calls = []

    def broken_compile():
        def step(*args):
            calls.append(args)
            raise RuntimeError("C++ compiler not found\n" + "details " * 10_000)

        return step

    monkeypatch.setattr(eagle_module, "compiled_step", broken_compile)
    method = eagle_engine.method("eagle")
    ids = eagle_engine.encode(PROMPT)
    vanilla = eagle_engine.generate(ids, max_new_tokens=16).token_ids
    for _ in range(3):
        drafter = method.open(EagleOptions(compile=True))
        generation = Generation(
            eagle_engine.target, drafter, None, ids, SamplingParams(), 16, eagle_engine.eos_token_ids, [], "eagle"
        )
        assert generation.run().token_ids == vanilla
    assert len(calls) == 1 and method.compile_failed


def test_methods_are_made_once_per_engine(engine):
    assert engine.method("pld") is engine.method("pld")
    engine.set_default_options("pld", {"max_ngram": "5"})
    try:
        assert engine.request(PROMPT, method="pld").options.max_ngram == 5
        assert engine.request(PROMPT, method="pld", options={"min_ngram": 2}).options == PLDOptions(5, 2)
    finally:
        engine.set_default_options("pld", None)
    refused("method", "needs trained heads", engine.request, PROMPT, method="medusa")


# --- sampling ---------------------------------------------------------------------------------------------------
def test_a_temperature_below_the_epsilon_is_greedy(engine):
    assert GREEDY_EPSILON == 1e-5
    assert SamplingParams(temperature=1e-37).greedy and SamplingParams(temperature=9.99e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    greedy = engine.generate(PROMPT, max_new_tokens=12)
    for tiny in (1e-37, 5e-324, 1e-6):
        result = engine.generate(PROMPT, max_new_tokens=12, sampling={"temperature": tiny, "seed": 1})
        assert result.token_ids == greedy.token_ids and result.text == greedy.text


def test_seeds_at_the_edges_of_the_range(engine):
    sampled = {}
    for seed in (2**64 - 1, -(2**63), 0):
        sampling = SamplingParams(temperature=1.0, seed=seed)
        sampled[seed] = engine.generate(PROMPT, max_new_tokens=6, sampling=sampling).token_ids
        assert engine.generate(PROMPT, max_new_tokens=6, sampling=sampling).token_ids == sampled[seed]
    for seed in (2**64, -(2**63) - 1, 10**30):
        refused("seed", r"seed must lie in \[-2\*\*63, 2\*\*64\)", engine.request, PROMPT, sampling={"seed": seed})
    refused("seed", "seed must be an integer, got True", SamplingParams, seed=True)


# --- stops ------------------------------------------------------------------------------------------------------
def test_stop_strings_are_bounded(engine):
    assert MAX_STOPS == 4 and MAX_STOP_CHARS == 256
    assert engine.request(PROMPT, stop=["a", "b", "c", "d" * MAX_STOP_CHARS]).stops[3] == "d" * 256
    refused("stop", "at most 4 stop strings are allowed, got 5", engine.request, PROMPT, stop=list("abcde"))
    refused("stop", "at most 4 stop strings are allowed, got 20000", engine.request, PROMPT, stop=["x"] * 20_000)
    refused("stop", "at most 256 characters, got 257", engine.request, PROMPT, stop="s" * 257)
    refused("stop", "non-empty strings, got 3", engine.request, PROMPT, stop=["a", 3])
