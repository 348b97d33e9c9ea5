"""`pard`: a PARD-adapted draft proposes k tokens from one forward; lossless; trained end to end at toy size."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import paradec
from conftest import counting, hf_greedy
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.train.pard import choose_mask_token, many_splits, parallel_batch, pard_batch, run_masked, splits

PROMPTS = [[5, 9, 2, 7, 5, 9], [11, 3], [7] * 9, [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def pard_dirs(model_dirs, tmp_path_factory):
    """arch -> a copy of the tiny '<arch>-draft' marked as PARD-adapted (untrained: exactness does not need it)."""
    root = tmp_path_factory.mktemp("pard")
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        path = root / arch
        shutil.copytree(model_dirs[f"{arch}-draft"], path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "pard": {"mask_token_id": 3, "k": 4}}))
        out[arch] = path
    return out


def test_batches_cut_at_splits_and_end_in_masks():
    tokens = torch.arange(20).view(2, 10)
    inputs, attention, rows, positions, sources = pard_batch(tokens, torch.tensor([3, 6]), k=3, mask=99, pad=0)
    assert inputs[0].tolist()[:6] == [0, 1, 2, 3, 99, 99] and attention[0].tolist() == [1] * 6 + [0] * 3
    assert inputs[1].tolist() == [10, 11, 12, 13, 14, 15, 16, 99, 99] and attention[1].sum() == 9
    assert positions[rows == 0].tolist() == list(range(6)) and torch.equal(positions, sources)
    valid = torch.ones(4, 30, dtype=torch.bool)
    valid[0, 12:] = False
    s = splits(valid, prompt_len=8, k=4, generator=torch.Generator().manual_seed(0))
    assert (s >= 7).all() and s[0] <= 10 and (s <= 28).all()


def test_mask_token_is_a_spare_embedding_row(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert choose_mask_token(tokenizer, len(tokenizer) + 10) == len(tokenizer)
    assert 0 <= choose_mask_token(tokenizer, len(tokenizer)) < len(tokenizer)


@pytest.mark.parametrize(
    ("arch", "runner"), [("llama", "native"), ("qwen2", "native"), ("llama", "hf"), ("gpt2", "hf")]
)
def test_greedy_equals_transformers(model_dirs, pard_dirs, hf_models, arch, runner):
    engine = paradec.load(model_dirs[arch], pard_dirs[arch], runner=runner, dtype="float32")
    for prompt in PROMPTS:
        reference = hf_greedy(hf_models(arch), prompt, 20)
        for options in (None, {"k": 2}):
            result = engine.generate(prompt, method="pard", options=options, max_new_tokens=20)
            assert result.token_ids == reference, (prompt, options)
    assert result.stats.proposed_tokens > 0


def test_one_draft_forward_per_step_and_a_batch_drafts_in_one(model_dirs, pard_dirs):
    engine = paradec.load(model_dirs["llama"], pard_dirs["llama"], runner="native", dtype="float32")
    with counting(engine.draft_runner()) as calls:
        result = engine.generate(PROMPTS[0], method="pard", max_new_tokens=12)
    # one per step (the first one feeds the prompt too), but the last: it may emit one token only, so no draft
    assert len(calls) == result.stats.steps - 1
    alone = [engine.generate(p, method="pard", max_new_tokens=12).token_ids for p in PROMPTS]
    decoder = engine.batch_decoder(len(PROMPTS), speculate="always")
    items = [decoder.submit(engine.request(p, method="pard", max_new_tokens=12)) for p in PROMPTS]
    while not all(i.prefilled for i in items):
        decoder.step()
    with counting(decoder.draft_runner()) as steps:
        decoder.step()
    assert [len(step) for step in steps] == [len(PROMPTS)]  # every sequence's k drafts in one forward
    for _ in decoder.run(items):
        pass
    assert [i.result.token_ids for i in items] == alone


def test_sampling_follows_plain_sampling(model_dirs, pard_dirs):
    """Chain rejection sampling with each position's q: the first two sampled tokens follow plain sampling."""
    from collections import Counter

    from scipy.stats import chisquare

    engine = paradec.load(model_dirs["llama"], pard_dirs["llama"], runner="native", dtype="float32")
    prompt = [5, 9, 2, 7]
    runner = engine.target
    with torch.no_grad():
        runner.reset()
        out = runner.forward(torch.tensor(prompt), logits="all")
        runner.commit(0)
    first = torch.softmax(out.logits[-1].double(), -1)
    samples = 800
    requests = [
        engine.request(prompt, method="pard", max_new_tokens=1, sampling={"temperature": 1.0, "seed": s})
        for s in range(samples)
    ]
    counts = Counter(r.token_ids[0] for r in engine.generate_batch(requests, max_batch=32, speculate="always"))
    cells = [t for t in range(first.shape[0]) if first[t] * samples >= 5]
    observed = [counts.get(t, 0) for t in cells] + [samples - sum(counts.get(t, 0) for t in cells)]
    expected = [float(first[t]) * samples for t in cells]
    expected.append(samples - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3


def test_a_draft_that_is_not_pard_adapted_is_refused(model_dirs):
    engine = paradec.load(model_dirs["llama"], model_dirs["llama-draft"], runner="native", dtype="float32")
    with pytest.raises(ParadecError, match="method 'pard' needs a PARD-adapted draft model") as info:
        engine.generate(PROMPTS[0], method="pard", max_new_tokens=4)
    assert info.value.param == "method"


def test_train_pard_end_to_end(model_dirs, tmp_path, capsys, hf_models):
    args = ["train", "pard", "--model", str(model_dirs["llama"]), "--draft", str(model_dirs["llama-draft"])]
    args += ["--data", "python-source", "--self-distill", "8", "--prompt-len", "16", "--new-tokens", "12"]
    args += ["--val-sequences", "2", "--val-prompts", "1", "--steps", "3", "--batch-size", "4", "--k", "4"]
    args += ["--device", "cpu", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "pard"
    config = json.loads((out / "config.json").read_text())
    assert config["pard"]["k"] == 4 and isinstance(config["pard"]["mask_token_id"], int)
    card = json.loads((out / "card.json").read_text())
    assert (
        card["kind"] == "pard" and card["fit"]["steps"] == 3 and len(card["validation"]["top1_by_position_after"]) == 4
    )
    assert card["validation_acceptance"]["method"] == "pard"
    assert card["pard"]["splits_per_window"] == 16  # the parallel layout (`parallel_batch`) by default
    assert card["pard"]["parallel_agreement"] == 1.0  # checked before training on it (fp32: every mask agrees)
    engine = paradec.load(model_dirs["llama"], out, runner="native", dtype="float32")
    reference = hf_greedy(hf_models("llama"), PROMPTS[3], 16)
    assert engine.generate(PROMPTS[3], method="pard", max_new_tokens=16).token_ids == reference
    assert main([*args[:-3], "--k", "0", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "pard-k must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main([*args[:-3], "--splits", "0", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "pard-splits must be an integer >= 1, got 0" in capsys.readouterr().err


def test_a_spare_mask_row_holding_nan_is_reset_and_a_diverging_fit_stops(model_dirs):
    from transformers import AutoModelForCausalLM

    from paradec.train.loop import TrainSettings, fit
    from paradec.train.pard import init_mask_embedding

    draft = AutoModelForCausalLM.from_pretrained(model_dirs["llama-draft"])
    weight = draft.get_input_embeddings().weight
    used = weight.shape[0] - 4
    with torch.no_grad():
        weight[used] = float("nan")  # a spare row of a dequantized checkpoint
        keep = weight[3].clone()
    init_mask_embedding(draft, used, used)
    assert torch.isfinite(weight[used]).all()
    torch.testing.assert_close(weight[used], weight[:used].mean(0))
    init_mask_embedding(draft, 3, used)  # a real, finite row is left as it is
    assert torch.equal(weight[3], keep)
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(
        ParadecError,
        match=r"pard training diverged: the mean loss of steps 1\.\.1 is nan \(no step of them was finite\)",
    ):
        fit(
            [param],
            lambda index: param.sum() * float("nan"),
            4,
            TrainSettings(steps=1, batch_size=2),
            torch.device("cpu"),
            desc="pard",
            progress=False,
        )


def test_padding_features_do_not_reach_the_loss(model_dirs):
    """The target's features past a window's end are padding: a NaN there (a zero weight times NaN is NaN) must not
    make the loss or its gradient non-finite, and the loss must not depend on them at all."""
    from transformers import AutoModelForCausalLM

    from paradec.train.pard import pard_loss

    torch.manual_seed(0)
    draft = AutoModelForCausalLM.from_pretrained(model_dirs["llama-draft"])
    vocab, hidden = draft.config.vocab_size, 16
    lm_head = torch.randn(vocab, hidden)
    tokens = torch.randint(3, vocab - 1, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 7:] = False  # the second window's answer ends at position 6
    features = torch.randn(2, 12, hidden)
    split = torch.tensor([4, 5])  # the second row's masks reach past its end
    args = (tokens, features, valid, split, 4, vocab - 1, 0)
    clean = pard_loss(draft, lm_head, *args)
    features[1, 7:] = float("nan")
    poisoned = pard_loss(draft, lm_head, *args)
    poisoned.backward()
    assert torch.isfinite(poisoned) and torch.equal(clean, poisoned)
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters() if p.grad is not None)
    # the parallel layout too: splits 4 and 5 of the second row put masks past its end
    draft.zero_grad()
    many = torch.tensor([[2, 4, 6], [3, 4, 5]])
    features[1, 7:] = 0.0
    clean = pard_loss(draft, lm_head, tokens, features, valid, many, 4, vocab - 1, 0)
    features[1, 7:] = float("nan")
    poisoned = pard_loss(draft, lm_head, tokens, features, valid, many, 4, vocab - 1, 0)
    poisoned.backward()
    assert torch.isfinite(poisoned) and torch.equal(clean, poisoned)
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters() if p.grad is not None)


def test_many_splits_are_distinct_sorted_answer_positions():
    valid = torch.ones(3, 30, dtype=torch.bool)
    valid[1, 12:] = False  # an answer of positions 7 .. 10: four splits at most
    s = many_splits(valid, prompt_len=8, count=6, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 6)
    for row in s.tolist():
        kept = [t for t in row if t >= 0]
        assert kept == sorted(set(kept)) and all(7 <= t <= 28 for t in kept)
    assert sorted(t for t in s[1].tolist() if t >= 0) == [7, 8, 9, 10] and s[1].tolist().count(-1) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_parallel_layout_gives_each_splits_single_row_outputs(model_dirs, arch):
    """One forward of `parallel_batch` (m splits per row) = m forwards of `pard_batch` (one split each), output for
    output, and the scored outputs are the ones `pard_batch` scores: PARD's parallel training is the same loss."""
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(model_dirs[f"{arch}-draft"], dtype=torch.float32).eval()
    k, mask, T = 4, 3, 16
    tokens = torch.randint(5, 60, (2, T), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, 13:] = False
    split = torch.tensor([[4, 7, 12], [5, 10, -1]])
    inputs, positions, allowed, rows, where, sources = parallel_batch(tokens, valid, split, k, mask)
    with torch.no_grad():
        hidden = run_masked(draft, inputs, positions, allowed)
        for b in range(2):
            for j, t in enumerate(split[b].tolist()):
                if t < 0:
                    continue
                single, attention, *_ = pard_batch(tokens[b : b + 1], torch.tensor([t]), k, mask, pad=0)
                alone = draft.base_model(input_ids=single, attention_mask=attention).last_hidden_state[0]
                for i in range(k):  # the split's last real token (i = 0), then its masks
                    at = t if i == 0 else T + (i - 1) * split.shape[1] + j
                    torch.testing.assert_close(hidden[b, at], alone[t + i], rtol=1e-5, atol=1e-5)
    scored = set(zip(rows.tolist(), where.tolist(), sources.tolist(), strict=True))
    # every real position with a real next token, and each mask with a real label
    assert (0, 0, 0) in scored and (1, 11, 11) in scored and (1, 12, 12) not in scored
    assert (0, T + 2 * 3 + 2, 12 + 3) not in scored  # mask 3 of split 12 would predict token 16: past the row
    assert (1, T + 0 * 3 + 1, 11) in scored and (1, T + 1 * 3 + 1, 12) not in scored  # row 1's label 13 is padding
    assert all(w < T or inputs[r, w] == mask for r, w, _ in scored)


def test_the_parallel_layout_is_checked_before_training_on_it(model_dirs, monkeypatch):
    """`parallel_agreement` is 1 where the backend runs the layout as designed, and falls where it does not (here:
    the 4D mask dropped, so every mask sees every earlier split's masks too)."""
    from transformers import AutoModelForCausalLM

    from paradec.train import pard

    draft = AutoModelForCausalLM.from_pretrained(model_dirs["llama-draft"], dtype=torch.float32).eval()
    tokens = torch.randint(5, 60, (2, 24), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(2, 24, dtype=torch.bool)
    split = torch.tensor([[3, 9, 15], [6, 12, 18]])
    assert pard.parallel_agreement(draft, tokens, valid, split, 4, 3) == 1.0

    def unmasked(model, inputs, positions, allowed):
        return model.base_model(input_ids=inputs, position_ids=positions).last_hidden_state

    monkeypatch.setattr(pard, "run_masked", unmasked)
    assert pard.parallel_agreement(draft, tokens, valid, split, 4, 3) < 0.9
