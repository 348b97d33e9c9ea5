"""Stopping: EOS inside an accepted block, stop strings, exact max_new_tokens, and streaming."""

from __future__ import annotations

import pytest
import torch

import paradec
from conftest import hf_greedy
from paradec.config import SamplingParams
from paradec.decode import Generation
from paradec.drafters.base import DecodeState, Drafter
from paradec.types import Proposal

PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def copy_engine(model_dirs):
    """Draft == target: every draft accepted, blocks of k + 1 = 6 tokens."""
    return paradec.load(model_dirs["llama"], model_dirs["llama"], runner="hf")


@pytest.fixture(scope="module")
def reference(copy_engine, hf_models):
    return hf_greedy(hf_models("llama"), copy_engine.encode(PROMPT), 60, eos_token_id=None)


def test_eos_in_the_middle_of_an_accepted_block(copy_engine, hf_models, reference):
    index = next(i for i in range(7, 40) if i % 6 not in (0, 5) and reference[i] not in reference[:i])
    eos = reference[index]
    saved = copy_engine.eos_token_ids
    copy_engine.eos_token_ids = {eos}
    try:
        result = copy_engine.generate(PROMPT, method="draft", max_new_tokens=60)
    finally:
        copy_engine.eos_token_ids = saved
    assert result.token_ids == reference[: index + 1]
    assert result.token_ids == hf_greedy(hf_models("llama"), copy_engine.encode(PROMPT), 60, eos_token_id=eos)
    assert result.finish_reason == "stop"
    assert result.stats.new_tokens == index + 1


@pytest.mark.parametrize("limit", [1, 5, 6, 7, 13])
@pytest.mark.parametrize("method", ["draft", "pld", "vanilla"])
def test_max_new_tokens_is_never_overshot(copy_engine, reference, limit, method):
    result = copy_engine.generate(PROMPT, method=method, max_new_tokens=limit)
    assert result.token_ids == reference[:limit]
    assert result.finish_reason == "length"


class PastTheLimit(Drafter):
    """Proposes the next 6 reference tokens whatever `max_tokens` allows, as a fixed-shape drafter may."""

    name = "past-the-limit"

    def __init__(self, continuation: list[int]) -> None:
        super().__init__(None, None)
        self.continuation = continuation

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        done = len(state.tokens) - state.prompt_len
        return Proposal(tokens=torch.tensor(self.continuation[done : done + 6]))


@pytest.mark.parametrize("limit", [1, 5, 9])
def test_a_step_past_max_new_tokens_is_cut(copy_engine, reference, limit):
    prompt = copy_engine.encode(PROMPT)
    drafter = PastTheLimit(reference)
    sampling = SamplingParams()
    result = Generation(copy_engine.target, drafter, None, prompt, sampling, limit, set(), [], "x").run()
    assert result.token_ids == reference[:limit]
    assert result.finish_reason == "length"
    assert result.stats.accepted_tokens + result.stats.steps > limit  # the steps did carry past the limit


def test_stop_string_cuts_text_and_matches_transformers(copy_engine, hf_models, reference):
    tokenizer = copy_engine.tokenizer
    full = copy_engine.generate(PROMPT, method="vanilla", max_new_tokens=40).text
    # a 3-letter ASCII piece (transformers matches stop strings through the vocabulary's printable token strings)
    stop = next(
        full[i : i + 3]
        for i in range(8, len(full) - 3)
        if full.find(full[i : i + 3]) == i and full[i : i + 3].isalpha()
    )
    result = copy_engine.generate(PROMPT, method="draft", max_new_tokens=40, stop=[stop, "never-appears"])
    assert result.text == full[: full.find(stop)]
    assert result.finish_reason == "stop"
    ids = copy_engine.encode(PROMPT)
    with torch.no_grad():
        hf = hf_models("llama").generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=40,
            stop_strings=[stop],
            tokenizer=tokenizer,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert result.token_ids == hf[0, len(ids) :].tolist()  # up to the token completing the stop string


@pytest.mark.parametrize("method", ["vanilla", "draft", "pld"])
def test_stream_pieces_concatenate_to_the_result(copy_engine, method):
    stream = copy_engine.stream(PROMPT, method=method, max_new_tokens=50)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == copy_engine.tokenizer.decode(stream.result.token_ids, skip_special_tokens=True)
    assert len(pieces) > 1


def test_stream_never_shows_the_stop_string(copy_engine):
    full = copy_engine.generate(PROMPT, max_new_tokens=40).text
    stop = full[20:24]
    stream = copy_engine.stream(PROMPT, method="draft", max_new_tokens=40, stop=stop)
    pieces = list(stream)
    assert "".join(pieces) == full[: full.find(stop)]
    assert stop not in "".join(pieces)


def test_one_generation_at_a_time(copy_engine):
    first = iter(copy_engine.stream(PROMPT, max_new_tokens=30))
    next(first)
    with pytest.raises(RuntimeError, match="already running"):
        copy_engine.generate(PROMPT, max_new_tokens=5)
    first.close()
    assert copy_engine.generate(PROMPT, max_new_tokens=5).finish_reason == "length"


class _OwnDecode:
    """A tokenizer whose class overrides `decode` (as some transformers tokenizers do): it must be called."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def decode(self, ids, **kwargs) -> str:
        self.calls += 1
        return "<" + self.inner.decode(ids, **kwargs) + ">"


def test_text_decoder_is_the_tokenizers_decode(tokenizer_dir):
    """`detok.text_decoder` calls a plain tokenizers-backed tokenizer's backend directly: it must give what
    `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` gives (special tokens,
    broken UTF-8, empty lists), and a tokenizer of its own `decode` keeps it."""
    import random

    from transformers import AutoTokenizer

    from paradec.detok import _plain_backend, text_decoder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert _plain_backend(type(tok))  # the direct call is what is checked
    decode = text_decoder(tok)
    rng = random.Random(0)
    special = tok.convert_tokens_to_ids("<|endoftext|>")
    lists = [[], [special], *([rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))] for _ in range(300))]
    for ids in lists:
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), ids
    own = _OwnDecode(tok)
    assert text_decoder(own)([special, 65]) == "<" + tok.decode([65]) + ">" and own.calls == 1
