"""The committed default pair loads offline through `transformers` Auto classes, fits its size cap, and writes Python."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from paradec.zoo import default_draft_dir, default_model_dir

SIZE_CAP_MIB = 20  # target + draft + tokenizers; trained heads must still fit under the 24 MiB package cap


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir, draft_dir = default_model_dir(), default_draft_dir()
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    return tok, target, draft


def test_size_and_format():
    total = 0
    for d in (default_model_dir(), default_draft_dir()):
        total += sum(p.stat().st_size for p in d.iterdir())
        with safe_open(d / "model.safetensors", "pt") as f:
            assert {f.get_slice(name).get_dtype() for name in list(f.keys())} == {"F16"}
        assert (d / "model.safetensors").stat().st_size < 16 * 2**20
    assert total <= SIZE_CAP_MIB * 2**20
    assert (default_model_dir() / "tokenizer.json").read_bytes() == (
        default_draft_dir() / "tokenizer.json"
    ).read_bytes()


def test_cards():
    target = json.loads((default_model_dir() / "card.json").read_text())
    draft = json.loads((default_draft_dir() / "card.json").read_text())
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
