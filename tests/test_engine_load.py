"""What `paradec.load` adds to a zoo model by itself: the heads found for it, and its registered draft, loaded on
first use. The zoo is played by the tiny test models, registered and cached in a temporary paradec cache."""

from __future__ import annotations

import json
import shutil

import pytest

import paradec
from conftest import build_tokenizer, make_config, save_model
from paradec import engine as engine_module
from paradec import zoo
from paradec.engine import resolve_heads
from paradec.errors import ParadecError
from paradec.zoo import fetch as fetching

PROMPT = "def fibonacci(n):\n"


@pytest.fixture
def package_heads(tmp_path, monkeypatch):
    """An empty packaged-heads folder in place of `paradec/assets/heads`."""
    root = tmp_path / "package-heads"
    root.mkdir()
    monkeypatch.setattr(zoo, "PACKAGED_HEADS", root)
    return root


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("other-vocab")
    tokenizer = build_tokenizer(root / "tok", vocab_size=300)
    return save_model(make_config("llama", len(tokenizer)), root / "model", root / "tok", seed=5)


@pytest.fixture
def registry(model_dirs, other_vocab_dir, tmp_path, monkeypatch):
    """Zoo models `tiny-target` (draft `tiny-draft`) and `tiny-odd` (draft `tiny-other-vocab`), already fetched:
    each a complete entry of a temporary cache, so resolving a name never reaches the network."""
    monkeypatch.setenv("PARADEC_CACHE", str(tmp_path / "cache"))
    entries = {
        "tiny-target": (model_dirs["llama"], "tiny-draft"),
        "tiny-draft": (model_dirs["llama-draft"], None),
        "tiny-odd": (model_dirs["llama"], "tiny-other-vocab"),
        "tiny-other-vocab": (other_vocab_dir, None),
    }
    for name, (source, draft) in entries.items():
        shutil.copytree(source, fetching.model_cache_dir(name))
        (fetching.model_cache_dir(name) / "card.json").write_text(json.dumps({"name": name}))
        model = fetching.RealModel(name, f"example/{name}", "F32", 0, "0" * 64, (), draft=draft)
        monkeypatch.setitem(fetching.REAL_MODELS, name, model)
    return fetching.model_cache_dir


@pytest.fixture
def loaded(monkeypatch):
    """The checkpoint directories `paradec.load` builds runners for, in order."""
    dirs, load_runner = [], engine_module.load_runner

    def recording(path, *args, **kwargs):
        dirs.append(path)
        return load_runner(path, *args, **kwargs)

    monkeypatch.setattr(engine_module, "load_runner", recording)
    return dirs


# --- heads ---------------------------------------------------------------------------------------------------------


def test_heads_are_the_users_then_the_models_own_then_the_packaged_ones(tmp_path, package_heads):
    model_dir, mine = tmp_path / "model", tmp_path / "mine"
    for path in (model_dir, mine, package_heads / "some-zoo-model"):
        path.mkdir()
    assert resolve_heads(None, model_dir, "some-zoo-model") == package_heads / "some-zoo-model"
    assert resolve_heads(None, model_dir, "other-zoo-model") is None  # nothing packaged for it
    assert resolve_heads(None, model_dir, None) is None  # not a zoo model
    (model_dir / "heads").mkdir()
    assert resolve_heads(None, model_dir, "some-zoo-model") == model_dir / "heads"
    assert resolve_heads(mine, model_dir, "some-zoo-model") == mine
    with pytest.raises(ParadecError, match="heads path '/no/heads' does not exist"):
        resolve_heads("/no/heads", model_dir, "some-zoo-model")


def test_a_zoo_model_gets_its_packaged_heads_by_name_or_by_its_cache_dir(
    registry, package_heads, model_dirs, tmp_path, monkeypatch
):
    (package_heads / "tiny-target").mkdir()
    for named in ("tiny-target", registry("tiny-target")):
        assert paradec.load(named, runner="hf").config.heads == str(package_heads / "tiny-target")
    assert paradec.load(model_dirs["llama"], runner="hf").config.heads is None  # the same weights, not the zoo's
    monkeypatch.chdir(tmp_path)  # a local directory that shares the zoo name is not the zoo model
    shutil.copytree(model_dirs["llama"], tmp_path / "tiny-target")
    local = paradec.load("tiny-target", runner="hf")
    assert local.config.model == "tiny-target" and local.config.heads is None and local.config.draft is None


def test_packaged_heads_live_in_the_package_assets():
    assert zoo.code_model_dir().parents[1] / "heads" == zoo.PACKAGED_HEADS
    assert zoo.packaged_heads_dir("no-such-model") is None


# --- the registered draft ------------------------------------------------------------------------------------------


def test_the_registered_draft_is_loaded_on_first_use(registry, loaded, engines):
    engine = paradec.load("tiny-target", runner="hf")
    assert engine.config.draft == "tiny-draft" and loaded == [registry("tiny-target")]
    vanilla = engine.generate(PROMPT, max_new_tokens=24)
    assert engine.generate(PROMPT, method="pld", max_new_tokens=24).token_ids == vanilla.token_ids
    assert loaded == [registry("tiny-target")]  # methods without a draft never load it
    result = engine.generate(PROMPT, method="draft", options={"k": 3}, max_new_tokens=24)
    assert result.token_ids == vanilla.token_ids
    assert loaded == [registry("tiny-target"), registry("tiny-draft")]
    engine.generate(PROMPT, method="draft", max_new_tokens=8)
    draft = engine.draft_runner()
    assert len(loaded) == 2 and engine.draft_runner() is draft
    assert (type(draft), draft.device, draft.dtype) == (type(engine.target), engine.target.device, engine.target.dtype)
    # the same pair, loaded eagerly by path, decodes the same tokens
    eager = engines("llama", "llama-draft")
    assert eager.generate(PROMPT, method="draft", options={"k": 3}, max_new_tokens=24).token_ids == result.token_ids


def test_a_draft_given_by_the_user_replaces_the_registered_one_and_loads_at_once(registry, loaded, model_dirs):
    engine = paradec.load("tiny-target", model_dirs["gpt2-draft"], runner="hf")
    assert engine.config.draft == str(model_dirs["gpt2-draft"])
    assert loaded == [model_dirs["gpt2-draft"], registry("tiny-target")]


def test_a_model_without_a_registered_draft_has_none(registry, loaded):
    engine = paradec.load("tiny-draft", runner="hf")
    assert engine.config.draft is None
    with pytest.raises(ParadecError, match="method 'draft' needs a draft model"):
        engine.generate(PROMPT, method="draft", max_new_tokens=4)
    assert loaded == [registry("tiny-draft")]


def test_a_registered_draft_with_another_vocabulary_fails_at_first_use(registry, loaded):
    engine = paradec.load("tiny-odd", runner="hf")
    assert engine.config.draft == "tiny-other-vocab"
    for _ in range(2):  # a failed load is not remembered as a loaded draft
        with pytest.raises(ParadecError, match="has a different vocabulary"):
            engine.generate(PROMPT, method="draft", max_new_tokens=4)
    assert loaded == [registry("tiny-odd")]


def test_the_registry_names_the_real_drafts():
    assert zoo.registered_draft("qwen2.5-coder-1.5b-instruct") == "qwen2.5-coder-0.5b-instruct"
    assert zoo.registered_draft(zoo.DEFAULT_MODEL) is None and zoo.registered_draft(None) is None
    assert zoo.registered_draft(zoo.CODE_MODEL) == zoo.CODE_DRAFT


def test_train_draft_distils_the_registered_draft_by_default(registry, model_dirs):
    from paradec.train.pipeline import _draft_path

    assert _draft_path("draft", zoo.code_model_dir(), None) == zoo.code_draft_dir()
    assert _draft_path("draft", registry("tiny-target"), None) == registry("tiny-draft")
    with pytest.raises(ParadecError, match=r"needs --draft DIR.*has no registered draft"):
        _draft_path("draft", model_dirs["llama"], None)
