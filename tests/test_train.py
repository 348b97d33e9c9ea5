"""`paradec train`: self-distilled data, losses that go down on toy models, the saved outputs and their cards, and
heads that, once trained, are picked up by `paradec.load` and keep greedy output identical."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import paradec
from conftest import CORPUS, hf_greedy
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.heads import EagleConfig, EagleHead, MedusaConfig, MedusaHeads, save_heads
from paradec.train.data import build_data, continue_with_target, make_windows, read_texts
from paradec.train.draft import draft_loss
from paradec.train.eagle import continuation_mask, draft_vocab_coverage, eagle_loss, frequent_tokens
from paradec.train.loop import TrainSettings, fit
from paradec.train.medusa import medusa_loss
from paradec.train.pipeline import DataSettings, HeadSettings, load_target, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text(CORPUS * 3)
    return path


@pytest.fixture(scope="module")
def toy(model_dirs, data_file):
    """The tiny Llama target and 24 self-distilled windows of 16 + 16 tokens."""
    target = load_target(model_dirs["llama"], CPU, torch.float32)
    texts = read_texts(data_file)
    data = build_data(
        target.model,
        target.tokenizer,
        texts.train,
        sequences=24,
        prompt_len=16,
        new_tokens=16,
        eos_token_ids=target.eos_token_ids,
        progress=False,
    )
    return target, data


def test_self_distilled_windows_are_the_targets_greedy_continuations(toy, hf_models):
    target, data = toy
    assert data.tokens.shape == (24, 32) and data.features.shape == (24, 32, 64)
    for row in (0, 5):
        prompt = data.tokens[row, :16].tolist()
        continuation = hf_greedy(hf_models("llama"), prompt, 16)
        assert data.tokens[row, 16 : 16 + len(continuation)].tolist() == continuation
    with torch.no_grad():  # the features are the hidden states the LM head reads: they give the target's logits
        logits = target.model(data.tokens[:2]).logits
    torch.testing.assert_close(data.features[:2] @ target.lm_head.t(), logits, rtol=1e-4, atol=1e-4)


def test_continuations_stop_being_valid_after_end_of_text(toy):
    target, data = toy
    stop = int(data.tokens[0, 18])  # the target's third token after prompt 0 plays end-of-text
    first = 16 + data.tokens[0, 16:].tolist().index(stop)
    tokens, valid = continue_with_target(target.model, data.tokens[:2, :16], 16, eos_token_ids=[stop], progress=False)
    assert tokens.shape == (2, 32)
    assert valid[0, : first + 1].all() and not valid[0, first + 1 :].any()  # the end-of-text itself is valid
    assert (tokens[0, first + 1 :] == stop).all()  # padded with the pad id (the first end-of-text id)


def test_make_windows_and_read_texts(tmp_path, toy):
    target, _ = toy
    texts = [f"{i} " * 60 for i in range(10)]  # text i holds the digit i only
    windows = make_windows(target.tokenizer, texts, count=10, length=8, seed=0)
    assert windows.shape == (10, 8)
    decoded = [target.tokenizer.decode(w).replace("<|endoftext|>", "") for w in windows.tolist()]
    assert sorted(text.strip()[0] for text in decoded) == list("0123456789")  # one window per text
    assert make_windows(target.tokenizer, texts[:1], count=4, length=8, seed=0).shape == (4, 8)  # several from one
    with pytest.raises(ParadecError, match="fewer tokens than one window of 500"):
        make_windows(target.tokenizer, ["x = 1"], count=3, length=500, seed=0)
    records = tmp_path / "prompts.jsonl"
    records.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x):\n"}) for i in range(40)) + "\n")
    texts = read_texts(records)
    assert len(texts.train) + len(texts.val) == 40 and texts.val
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(ParadecError, match=r"bad\.jsonl:1: expected a JSON object with 'messages', 'conversations'"):
        read_texts(bad)
    with pytest.raises(ParadecError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")


def decreases(loss_fn, params, n: int, steps: int = 40, lr: float = 3e-3) -> tuple[float, float]:
    torch.manual_seed(0)
    settings = TrainSettings(steps=steps, batch_size=8, lr=lr, warmup=5)
    result = fit(params, loss_fn, n, settings, CPU, progress=False)
    return result.first_loss, result.final_loss


def test_medusa_training_decreases_loss(toy):
    target, data = toy
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(64, target.lm_head.shape[0], num_heads=2))
    first, last = decreases(
        lambda i: medusa_loss(heads, target.lm_head, data.features[i], data.valid[i]),
        heads.parameters(),
        len(data),
        steps=100,
        lr=1e-2,
    )
    assert last < 0.8 * first


def test_eagle_training_decreases_loss(toy):
    target, data = toy
    torch.manual_seed(0)
    head = EagleHead(EagleConfig.for_target(64, target.lm_head.shape[0]))
    first, last = decreases(
        lambda i: eagle_loss(
            head, target.embed, target.lm_head, data.tokens[i], data.features[i], data.valid[i], passes=2
        ),
        head.parameters(),
        len(data),
    )
    assert last < 0.8 * first


def test_draft_vocabulary_is_the_most_frequent_continuation_tokens(toy):
    tokens = torch.tensor([[5, 5, 1, 2, 2, 2], [9, 9, 3, 3, 4, 7]])
    valid = torch.tensor([[True] * 6, [True] * 5 + [False]])  # the 7 is past an end-of-text
    assert frequent_tokens(tokens, valid, 10, 4).tolist() == [2, 3, 5, 9]  # 2 x3; then 3, 5, 9 x2 (ties by id)
    assert frequent_tokens(tokens, valid, 10, 8).tolist() == [2, 3, 5, 9, 1, 4, 0, 6]  # then once; unseen last
    _, data = toy  # 16 prompt tokens, then the target's continuation: only the continuation counts
    mask = continuation_mask(data)
    assert not mask[:, :16].any() and torch.equal(mask[:, 16:], data.valid[:, 16:])
    d2t = frequent_tokens(data.tokens, mask, 400, 8)
    counts = torch.bincount(data.tokens[:, 16:][data.valid[:, 16:]], minlength=400)
    assert counts[d2t].tolist() == sorted(counts.tolist(), reverse=True)[:8]


def test_draft_vocabulary_coverage_and_restricted_loss(toy):
    target, data = toy
    V = target.lm_head.shape[0]
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(0))[: V // 3]  # draft-id order is not id order
    coverage = draft_vocab_coverage(d2t, target.lm_head, data)
    probs = torch.softmax(data.features[:, 1:] @ target.lm_head.t(), -1)  # [N, T-1, V]
    valid = data.valid[:, 1:]
    assert coverage["target_mass"] == pytest.approx(float(probs[..., d2t].sum(-1)[valid].mean()), rel=1e-5)
    greedy_in = torch.isin(probs.argmax(-1), d2t)[valid].float().mean()
    assert coverage["greedy_in_vocab"] == pytest.approx(float(greedy_in))
    assert draft_vocab_coverage(torch.arange(V), target.lm_head, data)["target_mass"] == pytest.approx(1.0)

    # the KL target is the target's distribution restricted to the draft ids and renormalised: a head whose own
    # logits are exactly the target's at those ids (an identity layer, the LM head copied) has a KL term of 0
    head = EagleHead(EagleConfig.for_target(64, V, draft_vocab_size=len(d2t)))
    head.init_draft_vocab(d2t, target.lm_head)
    assert torch.equal(head.lm_head.weight, target.lm_head[d2t])
    for module in (head.o, head.down):
        torch.nn.init.zeros_(module.weight)  # the layer passes u through
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, 64:] = torch.eye(64)  # u = norm(feature)
        head.feature_norm.weight.fill_(1.0)
    # features constant along each window and of unit RMS: the head's prediction of f_{j+1} is f_j = f_{j+1}
    features = data.features[:, :1] / data.features[:, :1].pow(2).mean(-1, keepdim=True).sqrt()
    features = features.expand_as(data.features)
    with torch.no_grad():
        loss = eagle_loss(head, target.embed, target.lm_head, data.tokens, features, data.valid, passes=1, reg_weight=0)
    assert float(loss) == pytest.approx(0.0, abs=1e-4)
    first, last = decreases(
        lambda i: eagle_loss(
            head, target.embed, target.lm_head, data.tokens[i], data.features[i], data.valid[i], passes=2
        ),
        head.parameters(),
        len(data),
    )
    assert last < 0.8 * first


def test_draft_vocabulary_setting():
    assert HeadSettings().draft_vocab_for(32768) is None  # the whole vocabulary up to 32k tokens ...
    assert HeadSettings().draft_vocab_for(151936) == 32768  # ... the 32k most frequent above
    assert HeadSettings(draft_vocab=0).draft_vocab_for(151936) is None
    assert HeadSettings(draft_vocab=200).draft_vocab_for(384) == 200
    assert HeadSettings(draft_vocab=384).draft_vocab_for(384) is None
    with pytest.raises(ParadecError, match="draft-vocab must be an integer >= 0, got -1"):
        HeadSettings(draft_vocab=-1)


def test_draft_distillation_decreases_loss(toy, model_dirs):
    from transformers import AutoModelForCausalLM

    target, data = toy
    draft = AutoModelForCausalLM.from_pretrained(model_dirs["llama-draft"], dtype=torch.float32)
    first, last = decreases(
        lambda i: draft_loss(draft, target.lm_head, data.tokens[i], data.features[i], data.valid[i]),
        draft.parameters(),
        len(data),
        lr=1e-2,
    )
    assert last < 0.8 * first


SMALL_DATA = DataSettings(sequences=16, val_sequences=4, prompt_len=16, new_tokens=16, batch_size=16)


@pytest.fixture(scope="module")
def trained_model(model_dirs, tmp_path_factory, data_file):
    """A copy of the tiny Llama with heads trained into its default place, <model>/heads."""
    model = tmp_path_factory.mktemp("trained") / "llama"
    shutil.copytree(model_dirs["llama"], model)
    data = DataSettings(data_file, sequences=16, val_sequences=4, prompt_len=16, new_tokens=16, batch_size=16)
    for kind in ("medusa", "eagle"):
        run(
            kind,
            model=model,
            data=data,
            train=TrainSettings(steps=30, batch_size=8, lr=3e-3, warmup=5),
            heads=HeadSettings(medusa_heads=3, tree_nodes=20, passes=2),
            device="cpu",
            val_prompts=2,
            val_new_tokens=16,
            progress=False,
        )
    return model


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_trained_heads_cards_and_greedy_equality(trained_model, hf_models, kind):
    card = json.loads((trained_model / "heads" / kind / "card.json").read_text())
    for key in ("data", "train", "fit", "seconds", "device", "validation", "validation_acceptance", "parameters"):
        assert key in card
    assert card["fit"]["steps"] == 30 and card["device"].startswith("cpu")
    assert card["validation_acceptance"]["tau"] >= 1.0
    engine = paradec.load(trained_model, runner="hf")  # finds <model>/heads by itself
    assert engine.config.heads == str(trained_model / "heads")
    if kind == "medusa":
        assert len(engine.heads("medusa").config.tree) == 20
        assert len(card["validation"]["topk_accuracy_per_head"]) == 3
    for prompt in ("def fibonacci(n):\n", "class Stack:\n"):
        reference = hf_greedy(hf_models("llama"), engine.encode(prompt), 40)
        assert engine.generate(prompt, method=kind, max_new_tokens=40).token_ids == reference


def test_eagle_learns_a_looping_target(loop_dirs, tmp_path, hf_models):
    """On a target whose next token depends on the current token only, a briefly trained head gets most drafts
    accepted where an untrained one gets almost none; greedy output stays identical."""
    data = tmp_path / "code.txt"
    data.write_text(CORPUS * 3)
    settings = DataSettings(data, sequences=32, val_sequences=4, prompt_len=8, new_tokens=24, batch_size=32)
    out = run(
        "eagle",
        model=loop_dirs["llama"],
        out=tmp_path / "trained",
        data=settings,
        train=TrainSettings(steps=150, batch_size=16, lr=1e-2, warmup=10),
        heads=HeadSettings(passes=2),
        device="cpu",
        val_prompts=2,
        val_new_tokens=32,
        progress=False,
    )
    config = json.loads((out / "config.json").read_text())["config"]
    torch.manual_seed(0)
    save_heads(EagleHead(EagleConfig(**config)), tmp_path / "untrained" / "eagle")
    prompt = "def fibonacci(n):\n"
    tau = {}
    for name in ("trained", "untrained"):
        engine = paradec.load(loop_dirs["llama"], heads=tmp_path / name, runner="hf")
        result = engine.generate(prompt, method="eagle", max_new_tokens=60)
        assert result.token_ids == hf_greedy(hf_models("loop-llama"), engine.encode(prompt), 60)
        tau[name] = result.stats.tau
    assert tau["trained"] > 2.5 and tau["untrained"] < 1.5


def test_cli_trains_a_draft_and_reports_errors(model_dirs, data_file, tmp_path, capsys, hf_models):
    args = ["train", "draft", "--model", str(model_dirs["llama"]), "--draft", str(model_dirs["llama-draft"])]
    small = ["--data", str(data_file), "--self-distill", "16", "--prompt-len", "16", "--new-tokens", "8"]
    small += ["--val-sequences", "4", "--val-prompts", "1", "--steps", "5", "--batch-size", "4", "--device", "cpu"]
    assert main([*args, *small, "--out", str(tmp_path), "--quiet"]) == 0
    card = json.loads((tmp_path / "draft" / "card.json").read_text())
    assert {"top1_agreement_before", "top1_agreement_after"} <= set(card["validation"])
    assert "validation_acceptance_before" in card
    engine = paradec.load(model_dirs["llama"], tmp_path / "draft", runner="hf")  # a checkpoint usable as --draft
    prompt = "def fibonacci(n):\n"
    reference = hf_greedy(hf_models("llama"), engine.encode(prompt), 20)
    assert engine.generate(prompt, method="draft", max_new_tokens=20).token_ids == reference

    capsys.readouterr()
    assert main(["train", "draft", "--model", str(model_dirs["llama"]), *small, "--quiet"]) == 2
    assert "needs --draft DIR" in capsys.readouterr().err
    assert main(["train", "eagle", "--model", str(model_dirs["llama"]), *small, "--steps", "0"]) == 2
    assert "steps must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["train", "eagle", "--model", str(model_dirs["llama"]), *small, "--draft-vocab", "-1"]) == 2
    assert "draft-vocab must be an integer >= 0, got -1" in capsys.readouterr().err
    assert main(["train", "medusa", "--model", str(model_dirs["llama"]), "--data", str(tmp_path / "nope")]) == 2
    assert "data file" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["medusa", "eagle", "draft"])
def test_half_precision_target(model_dirs, data_file, tmp_path, kind):
    """A bfloat16 target (as on a GPU) with float32 trainable weights: mixed precision through training,
    validation and saving."""
    out = run(
        kind,
        model=model_dirs["llama"],
        draft=model_dirs["llama-draft"] if kind == "draft" else None,
        out=tmp_path,
        data=DataSettings(data_file, sequences=8, val_sequences=2, prompt_len=16, new_tokens=8),
        train=TrainSettings(steps=3, batch_size=4, warmup=1),
        device="cpu",
        dtype="bfloat16",
        val_prompts=1,
        val_new_tokens=8,
        progress=False,
    )
    card = json.loads((out / "card.json").read_text())
    assert card["dtype"] == "bfloat16" and card["fit"]["steps"] == 3


def test_cli_trains_a_fused_eagle_head(model_dirs, data_file, tmp_path, capsys, hf_models):
    """`--feature-layers` end to end: the data hold those layers' outputs, the head fuses them, the card says so (and
    how many bytes of hidden states training held), and the head decodes exactly."""
    args = ["train", "eagle", "--model", str(model_dirs["llama"]), "--data", str(data_file), "--self-distill", "8"]
    args += ["--prompt-len", "16", "--new-tokens", "8", "--val-sequences", "2", "--val-prompts", "1", "--steps", "3"]
    args += ["--batch-size", "4", "--device", "cpu", "--quiet", "--passes", "2"]
    assert main([*args, "--feature-layers", "0,0", "--out", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "eagle" / "card.json").read_text())
    assert card["feature_layers"] == [0, 0] and card["config"]["feature_layers"] == [0, 0]
    assert card["reg_weight"] is None  # a fused head's loss is the KL alone
    stats = card["data"]["train"]
    assert stats["feature_layers"] == [0, 0] and stats["feature_bytes"] == 8 * 24 * 64 * 4 * 3  # H + 2H, float32
    engine = paradec.load(model_dirs["llama"], heads=tmp_path, runner="hf")
    assert engine.heads("eagle").config.feature_layers == (0, 0)
    prompt = "def fibonacci(n):\n"
    reference = hf_greedy(hf_models("llama"), engine.encode(prompt), 16)
    assert engine.generate(prompt, method="eagle", max_new_tokens=16).token_ids == reference
    capsys.readouterr()
    assert main([*args, "--feature-layers", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "feature-layers [1]: the target has 2 layers; fuse outputs of layers [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--feature-layers", "low"])


@torch.no_grad()
def test_fused_eagle_loss_drops_the_regression(toy):
    """With feature_layers the loss is the KL alone (EAGLE-3): the regression weight changes nothing; without, it
    does. The fused head reads the layer features, and refuses to train without them."""
    target, data = toy
    layers = torch.randn(*data.features.shape[:2], 3 * 64)  # [N, T, 3H]
    config = EagleConfig.for_target(64, target.lm_head.shape[0])
    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        head = EagleHead(
            config if not fused else EagleConfig.for_target(64, config.vocab_size, feature_layers=(0, 0, 0))
        )
        for weight in (0.0, 5.0):
            extra = {"layer_features": layers} if fused else {}
            losses[fused, weight] = float(
                eagle_loss(
                    head,
                    target.embed,
                    target.lm_head,
                    data.tokens,
                    data.features,
                    data.valid,
                    passes=2,
                    reg_weight=weight,
                    **extra,
                )
            )
    assert losses[True, 0.0] == losses[True, 5.0] and losses[False, 0.0] < losses[False, 5.0]
    with pytest.raises(ValueError, match="layer_features"):
        eagle_loss(head, target.embed, target.lm_head, data.tokens, data.features, data.valid)


def test_a_step_with_a_non_finite_loss_changes_no_weight_and_is_counted():
    """One overflowing batch is skipped on the device (its gradients zeroed before AdamW steps, so no NaN reaches a
    weight) and counted in the result; more than MAX_SKIPPED of the steps is divergence."""
    from paradec.train.loop import MAX_SKIPPED

    param = torch.nn.Parameter(torch.ones(3))
    calls = []

    def loss_fn(index):
        calls.append(len(calls))
        scale = float("nan") if len(calls) == 7 else 1.0
        return ((param - 2.0) ** 2).sum() * scale

    settings = TrainSettings(steps=40, batch_size=2, lr=1e-2, warmup=1)
    result = fit([param], loss_fn, 4, settings, CPU, progress=False)
    assert result.skipped == 1 and result.to_dict()["skipped_steps"] == 1
    assert torch.isfinite(param).all() and result.final_loss < result.first_loss
    assert all(math.isfinite(loss) for _, loss in result.history)
    every_third = [0]

    def mostly_bad(index):
        every_third[0] += 1
        return param.sum() * (float("nan") if every_third[0] % 3 == 0 else 1.0)

    assert MAX_SKIPPED < 1 / 3
    with pytest.raises(ParadecError, match=r"had a non-finite loss or gradient"):
        fit([param], mostly_bad, 4, settings, CPU, progress=False)
