"""The zoo pipeline at toy size on CPU: corpus split, tokenizer, training module vs transformers, cards, prompts, CLI."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from paradec.errors import ParadecError
from paradec.zoo import dev_prompts_path
from paradec.zoo.build import build_pair, ensure_bench_pair, preset_cache_dir
from paradec.zoo.cli import main as zoo_main
from paradec.zoo.corpus import Corpus, SourceFile, is_validation, load_corpus
from paradec.zoo.model import ZooLlama, save_hf
from paradec.zoo.presets import BENCH, TINY, ModelShape, Preset, TrainPlan
from paradec.zoo.prompts import CATEGORIES, build_dev_prompts, load_prompts
from paradec.zoo.quality import is_verbatim_loop, loop_rate
from paradec.zoo.tokenizer import EOT_ID, save_tokenizer, train_tokenizer
from paradec.zoo.train import lr_at, train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOY_MODULES = (
    "json",
    "email",
    "textwrap.py",
    "string.py",
    "shlex.py",
    "fnmatch.py",
    "heapq.py",
    "difflib.py",
    "csv.py",
)
TOY_PLAN = TrainPlan(steps=4, batch_tokens=2 * 64, micro_batch=1, lr=1e-3, warmup_steps=2)
TOY = Preset(
    name="toy",
    vocab_size=400,
    context=64,
    target=ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    draft=ModelShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
    target_plan=TOY_PLAN,
    draft_plan=TOY_PLAN,
    save_dtype="float32",
    max_corpus_chars=2_000_000,
    val_per_mille=250,
    tokenizer_sample_chars=300_000,
    val_tokens=1024,
    loop_new_tokens=24,
    loop_batch=4,
)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    """A few real Python modules (this interpreter's stdlib), plus a duplicate and two files the filters drop."""
    root = tmp_path_factory.mktemp("corpus") / "toy"
    root.mkdir()
    for name in TOY_MODULES:
        src = STDLIB / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(src, root / name)
    shutil.copyfile(STDLIB / "textwrap.py", root / "textwrap_copy.py")
    (root / "minified.py").write_text("x = [" + ", ".join(map(str, range(600))) + "]\n")
    (root / "empty.py").write_text("")
    return root


@pytest.fixture(scope="module")
def toy_pair(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pair")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARADEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        build_pair(TOY, out, device="cpu", roots=[toy_root], loop_prompts=4, command="toy-command", progress=False)
    return out


def test_corpus_dedup_filters_and_stats(toy_root):
    corpus = load_corpus([toy_root], max_chars=TOY.max_corpus_chars, val_per_mille=TOY.val_per_mille, progress=False)
    paths = [f.path for f in corpus.train + corpus.val]
    assert corpus.stats["files_duplicate"] >= 1  # textwrap_copy.py (and empty files)
    assert sum(p.endswith(("textwrap.py", "textwrap_copy.py")) for p in paths) == 1
    assert not any(p.endswith(("minified.py", "empty.py")) for p in paths)
    assert corpus.stats["files"] == len(paths) == corpus.stats["train_files"] + corpus.stats["val_files"]
    assert corpus.stats["chars"] == sum(len(f.text) for f in corpus.train + corpus.val)
    assert all(p.startswith("toy/") for p in paths)


def test_split_is_stable(toy_root, tmp_path):
    before = load_corpus([toy_root], max_chars=TOY.max_corpus_chars, val_per_mille=TOY.val_per_mille, progress=False)
    again = load_corpus([toy_root], max_chars=TOY.max_corpus_chars, val_per_mille=TOY.val_per_mille, progress=False)
    assert [f.path for f in before.val] == [f.path for f in again.val] and before.digest == again.digest
    assert before.val and all(is_validation(f.digest, TOY.val_per_mille) for f in before.val)
    assert not any(is_validation(f.digest, TOY.val_per_mille) for f in before.train)
    # Other files coming and going never move a file between the splits.
    changed = tmp_path / "toy"
    shutil.copytree(toy_root, changed)
    (changed / "json" / "decoder.py").unlink()
    (changed / "extra.py").write_text("def extra(x):\n    '''A new file.'''\n    return x * 2\n" * 4)
    after = load_corpus([changed], max_chars=TOY.max_corpus_chars, val_per_mille=TOY.val_per_mille, progress=False)
    split_before = {f.path: f in before.val for f in before.train + before.val}
    split_after = {f.path: f in after.val for f in after.train + after.val}
    common = split_before.keys() & split_after.keys()
    assert len(common) == len(split_before) - 1
    assert all(split_before[p] == split_after[p] for p in common)


def test_size_cap_is_deterministic(toy_root):
    small = load_corpus([toy_root], max_chars=200_000, val_per_mille=TOY.val_per_mille, progress=False)
    again = load_corpus([toy_root], max_chars=200_000, val_per_mille=TOY.val_per_mille, progress=False)
    assert small.stats["chars"] <= 200_000 and small.digest == again.digest


def test_bad_corpus_root_is_a_clear_error(tmp_path):
    with pytest.raises(ParadecError, match="nowhere"):
        load_corpus([tmp_path / "nowhere"], max_chars=1000)


def test_tokenizer_is_deterministic_and_loads_through_auto_tokenizer(toy_root, tmp_path):
    from transformers import AutoTokenizer

    corpus = load_corpus([toy_root], max_chars=TOY.max_corpus_chars, val_per_mille=TOY.val_per_mille, progress=False)
    texts = [f.text for f in corpus.train]
    first, second = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert first.to_str() == second.to_str()
    save_tokenizer(first, tmp_path, context=64)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == EOT_ID
    code = 'def f(x):\n    """Twice x."""\n    return 2 * x\n'
    ids = tok(code)["input_ids"]
    assert ids[0] == EOT_ID and EOT_ID not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == code
    # A prompt that stops at a line break tokenizes as a prefix of the longer file: no newline+indent token.
    prompt = tok('def f(x):\n    """Twice x."""\n')["input_ids"]
    assert ids[: len(prompt)] == prompt
    assert len(tok) == 400


@pytest.mark.parametrize("tie", [True, False])
def test_saved_weights_give_the_same_logits_in_transformers(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    shape = ModelShape(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, tie_embeddings=tie
    )
    model = ZooLlama(shape, vocab_size=300, context=32, rope_theta=10000.0).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    save_hf(model, tmp_path, "float32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.num_parameters() == model.num_parameters() == shape.num_parameters(300)
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_preset_sizes():
    def count(shape, vocab):
        with torch.device("meta"):
            return ZooLlama(shape, vocab, 16, 10000.0).num_parameters()

    for preset in (TINY, BENCH):
        for shape in (preset.target, preset.draft):
            assert shape.num_parameters(preset.vocab_size) == count(shape, preset.vocab_size)
    assert TINY.target.num_parameters(TINY.vocab_size) <= 10_000_000
    assert TINY.draft.num_parameters(TINY.vocab_size) <= 2_000_000
    tiny_fp16_mib = (
        2 * (TINY.target.num_parameters(TINY.vocab_size) + TINY.draft.num_parameters(TINY.vocab_size)) / 2**20
    )
    assert tiny_fp16_mib <= 19
    assert 100e6 <= BENCH.target.num_parameters(BENCH.vocab_size) <= 150e6
    assert 5e6 <= BENCH.draft.num_parameters(BENCH.vocab_size) <= 10e6
    for preset in (TINY, BENCH):
        for plan in (preset.target_plan, preset.draft_plan):
            assert plan.batch_tokens % (plan.micro_batch * preset.context) == 0
    assert TINY.config_hash() != TINY.with_options(seconds=60).config_hash()


def test_lr_schedule():
    plan = TrainPlan(steps=100, batch_tokens=1, micro_batch=1, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, plan, 100) == pytest.approx(1e-4)
    assert lr_at(9, plan, 100) == pytest.approx(1e-3)
    assert lr_at(55, plan, 100) == pytest.approx(0.55e-3)
    assert lr_at(100, plan, 100) == pytest.approx(1e-4)
    assert all(lr_at(s, plan, 100) >= lr_at(s + 1, plan, 100) for s in range(10, 100))


def test_training_is_deterministic_and_lowers_the_loss():
    data = torch.arange(2000, dtype=torch.int32) % 7  # a periodic sequence: easy to learn
    shape = ModelShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    plan = TrainPlan(steps=20, batch_tokens=4 * 16, micro_batch=2, lr=1e-2, warmup_steps=3)
    weights, results = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = ZooLlama(shape, vocab_size=8, context=16, rope_theta=10000.0)
        results.append(train(model, data, plan, seed=3, progress=False))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert results[0].steps == 20 and results[0].tokens_seen == 20 * 64
    assert results[0].train_loss < 0.5 * math.log(8)


def test_time_budget_sets_the_step_count():
    data = torch.arange(500, dtype=torch.int32) % 5
    shape = ModelShape(hidden_size=16, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=32)
    plan = TrainPlan(steps=10_000, batch_tokens=8, micro_batch=1, lr=1e-3, warmup_steps=2)
    model = ZooLlama(shape, vocab_size=5, context=8, rope_theta=10000.0)
    result = train(model, data, plan, seconds=1e-6, progress=False)  # a budget already spent: the minimum run
    assert result.steps == 9 and result.tokens_seen == 9 * 8


def test_loop_detector():
    assert is_verbatim_loop([1, 2, 3] * 80)
    assert is_verbatim_loop(list(range(50)) + list(range(100)) * 2)  # a 100-token cycle
    assert not is_verbatim_loop(list(range(256)))
    assert not is_verbatim_loop([5] * 100)  # too short to call: stopped at end-of-text early
    assert loop_rate([[1, 2] * 128, list(range(256))]) == 0.5


def test_dev_prompts_come_from_validation_files_only():
    def fn(name: str, doc: str) -> str:
        return f'def {name}(a, b):\n    """{doc}"""\n    c = a + b\n    d = c * 2\n    return d - a\n\n\n'

    val = [SourceFile(f"lib/pkg{i}/m.py", f"{i:040x}", fn(f"helper_{i}", f"Helper {i}.")) for i in range(6)]
    val.append(SourceFile("lib/leak/m.py", "f" * 40, fn("vendored", "Copied.")))
    train_files = [SourceFile("lib/other/m.py", "e" * 40, fn("vendored", "Copied, slightly edited."))]
    corpus = Corpus(train=train_files, val=val)
    records = build_dev_prompts(corpus, {"docstring": 3, "edit": 2})
    assert [r["category"] for r in records] == ["docstring"] * 3 + ["edit"] * 2
    assert not any("vendored" in r["prompt"] for r in records)  # its def line is in a training file
    val_paths = {f.path for f in val}
    assert all(r["source"].split(":")[0] in val_paths for r in records)
    assert len({r["source"].split(":")[0] for r in records}) == 5  # each file used once
    doc = records[0]
    assert doc["prompt"].startswith("def helper_") and doc["prompt"].rstrip().endswith('."""')
    assert doc["reference"].strip().startswith("c = a + b")
    edit = records[3]
    assert "# Before:" in edit["prompt"] and edit["prompt"].endswith(f"def {edit['source'].split(':')[1]}(")
    with pytest.raises(ParadecError, match="poems"):
        build_dev_prompts(corpus, {"poems": 1})


def test_committed_dev_prompts():
    records = load_prompts(dev_prompts_path())
    assert len(records) >= 80
    assert {r["category"] for r in records} == set(CATEGORIES)
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert {"id", "category", "prompt", "reference", "source"} <= r.keys() and r["prompt"].strip()


def test_pair_is_saved_in_hugging_face_format(toy_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for role, shape in (("target", TOY.target), ("draft", TOY.draft)):
        d = toy_pair / role
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "card.json"} <= names
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        assert model.config.hidden_size == shape.hidden_size and model.config.num_hidden_layers == shape.num_layers
        assert model.config.vocab_size == len(tok) == TOY.vocab_size
        assert model.generation_config.eos_token_id == EOT_ID
        ids = torch.tensor([tok("def add(a, b):\n")["input_ids"]])
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], TOY.vocab_size) and torch.isfinite(logits).all()
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 5)
    assert (toy_pair / "target" / "tokenizer.json").read_bytes() == (toy_pair / "draft" / "tokenizer.json").read_bytes()


def test_cards(toy_pair):
    cards = {role: json.loads((toy_pair / role / "card.json").read_text()) for role in ("target", "draft")}
    for role, card in cards.items():
        shape = TOY.target if role == "target" else TOY.draft
        assert card["preset"] == "toy" and card["role"] == role
        assert card["parameters"] == shape.num_parameters(TOY.vocab_size)
        assert card["steps"] == TOY_PLAN.steps and card["tokens_seen"] == TOY_PLAN.steps * TOY_PLAN.batch_tokens
        assert card["seconds"] >= 0 and card["tokens_per_second"] > 0
        assert 0 < card["val_loss"] < math.log(TOY.vocab_size) + 1 and card["val_loss_unit"] == "nats/token"
        assert card["val_tokens_scored"] == TOY.val_tokens
        assert 0 <= card["loop_rate"] <= 1 and card["loop_prompts"] == 4
        assert card["device"].startswith("cpu") and card["command"] == "toy-command"
        assert card["corpus"]["files"] > card["corpus"]["val_files"] > 0
        assert card["corpus"]["train_tokens"] > 0 and card["corpus"]["val_tokens"] > 0 and card["corpus"]["chars"] > 0
        assert card["pair"]["target"]["val_loss"] == cards["target"]["val_loss"]


def test_ensure_bench_pair_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARADEC_CACHE", str(tmp_path))
    cached = preset_cache_dir(BENCH)
    assert cached.parent == tmp_path / "zoo" and cached.name == f"bench-{BENCH.config_hash()}"
    for role in ("target", "draft"):
        (cached / role).mkdir(parents=True)
        (cached / role / "card.json").write_text("{}")
    assert ensure_bench_pair(device="cpu") == (cached / "target", cached / "draft")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["build", "--preset", "huge"], "'huge'"),
        (["build", "--preset", "tiny", "--seconds", "-5"], "-5"),
        (["build", "--preset", "tiny", "--device", "tpu"], "'tpu'"),
        (["build", "--preset", "tiny", "--device", "cpu", "--roots", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_cli_rejects_bad_arguments(argv, named, capsys):
    assert zoo_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err
