"""Self-chat data: the user-turn prefix cut out of different chat templates, the end-of-turn and control markers,
left-padded request sampling (deterministic under a seed), the filters (length, control tokens, dev-suite overlap,
duplicates and near-duplicates), `--keep-responses` windows holding the given answers, the source defaults, and one
`paradec train eagle --data self-chat` run with its card."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import hf_greedy
from paradec.chat import chat_text
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.loading import load_tokenizer
from paradec.train import overlap, pipeline
from paradec.train.data import PYTHON_SOURCE_DATA, SELF_CHAT_DATA, build_data, data_source, read_texts
from paradec.train.pipeline import DataSettings
from paradec.train.selfchat import (
    SYSTEM_PROMPTS,
    Request,
    SelfChatSettings,
    filter_requests,
    left_padded,
    read_template,
    user_turn_prefix,
    write_requests,
)

# Llama-2 style: the system prompt goes inside the first user turn
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}"
    "\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(chat_llama_dir):
    return load_tokenizer(chat_llama_dir)


def with_template(chat_llama_dir, template: str):
    tokenizer = load_tokenizer(chat_llama_dir)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def model(chat_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(chat_llama_dir, dtype=torch.float32).eval()


def messages(system: str | None, request: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": request}]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tiny", {None: "<|user|>", "Be brief.": "<|system|>Be brief.\n<|user|>"}),
        ("llama2", {None: "[INST] ", "Be brief.": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n"}),
    ],
)
def test_user_turn_prefix_ends_where_the_user_content_starts(chat_llama_dir, name, expected):
    tokenizer = load_tokenizer(chat_llama_dir) if name == "tiny" else with_template(chat_llama_dir, LLAMA2_TEMPLATE)
    for system, prefix in expected.items():
        assert user_turn_prefix(tokenizer, system) == prefix
        rendered = chat_text(tokenizer, messages(system, "How do I sort a list?"))
        assert rendered.startswith(prefix + "How do I sort a list?")  # the request continues the prefix


def test_template_markers_and_end_of_turn_tokens(chat_llama_dir, tokenizer, tokenizer_dir):
    template = read_template(tokenizer, SYSTEM_PROMPTS, [0])
    assert list(template.prefixes) == list(SYSTEM_PROMPTS)
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"} == template.markers
    assert template.stop_ids == [0]  # the tiny template closes a user turn with a newline only

    chatml = with_template(chat_llama_dir, CHATML_TEMPLATE)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    template = read_template(chatml, (None, "Be brief."), [0])
    end, start = chatml.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert template.prefixes["Be brief."] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert template.stop_ids == [0, end, start]  # end-of-text, then what the template writes after a user turn
    assert {"<|im_start|>user", "<|im_start|>assistant", "<|im_end|>"} <= template.markers

    refusing = with_template(chat_llama_dir, NO_SYSTEM_TEMPLATE)
    assert list(read_template(refusing, SYSTEM_PROMPTS, [0]).prefixes) == [None]  # system prompts left out
    with pytest.raises(ParadecError, match="self-chat needs a target with a chat template"):
        read_template(load_tokenizer(tokenizer_dir), SYSTEM_PROMPTS, [0])


def test_left_padded_rows_generate_what_they_generate_alone(model, tokenizer):
    rows = [tokenizer(user_turn_prefix(tokenizer, s), add_special_tokens=False)["input_ids"] for s in SYSTEM_PROMPTS]
    ids, mask = left_padded(rows, pad=0)
    assert ids.shape == (len(rows), max(map(len, rows))) and int(mask.sum()) == sum(map(len, rows))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0
        )
    for row, generated in zip(rows, out[:, ids.shape[1] :].tolist()):
        assert generated == hf_greedy(model, row, 6, eos_token_id=None)


def test_requests_are_deterministic_under_a_seed(model, tokenizer):
    template = read_template(tokenizer, SYSTEM_PROMPTS, list(range(48)))  # many end-of-turn ids: requests end
    settings = SelfChatSettings(requests=18, max_tokens=10, temperature=(0.7, 1.2), top_p=(0.8, 1.0))

    def write(seed: int):
        return write_requests(model, tokenizer, template, settings, seed=seed, batch_size=8, progress=False)

    requests, batches = write(0)
    again, batches_again = write(0)
    assert requests == again and batches == batches_again
    assert len(requests) == 18 and len(batches) == 3  # batches of 8, 8 and 2
    assert all(0.7 <= b["temperature"] <= 1.2 and 0.8 <= b["top_p"] <= 1.0 for b in batches)
    assert len({b["temperature"] for b in batches}) == 3  # varied per batch
    assert Counter(r.system for r in requests) == Counter({s: 2 for s in SYSTEM_PROMPTS})  # spread evenly
    assert any(r.ended for r in requests) and all(r.tokens <= 10 for r in requests)
    other, _ = write(1)
    assert [r.text for r in other] != [r.text for r in requests]


def test_filters_drop_short_long_control_dev_overlap_and_duplicates(tokenizer, monkeypatch):
    markers = read_template(tokenizer, SYSTEM_PROMPTS, [0]).markers
    dev = "please list the seven largest lakes of northern europe by area"
    monkeypatch.setattr(overlap, "dev_suite_texts", lambda: [dev])
    kept_texts = [
        "Write a short poem about the sea and the wind at night, please.",
        "How do I sort a list of numbers in Python without the built-in sort function?",
        "Name the seven largest lakes of northern europe and their depths",  # 7 words of the dev text in a row
        "Hi there friend",  # 3 words, no shingles: only exact duplicates apply
    ]
    planted = {
        "too_short": Request("Hi", 1, True),
        "too_long": Request("Tell me about the history of " + "the " * 30, 128, False),
        "control_tokens": Request("Summarise this.\n<|assistant|>Sure, here", 12, True),
        "dev_overlap": Request("Could you please list the seven largest lakes of northern europe by area?", 16, True),
        "duplicate": Request("write a SHORT poem about the sea -- and the wind at night please", 14, True),
        "near_duplicate": Request(
            "Write a short poem about the sea and the wind at night, please, with rhymes.", 18, True
        ),
    }
    requests = [Request(text, 12, True) for text in kept_texts[:2]] + list(planted.values())
    requests += [Request(text, 12, True) for text in kept_texts[2:]]
    settings = SelfChatSettings(min_tokens=4, max_tokens=128, near_duplicate=0.5)
    kept, dropped = filter_requests(requests, settings, markers)
    assert [r.text for r in kept] == kept_texts
    assert dropped == {reason: 1 for reason in planted}


def test_a_request_copying_a_bench_prompt_is_dropped(tokenizer):
    bench = json.loads((overlap.DEV_SUITES / "chat.jsonl").read_text().splitlines()[0])["turns"][0]
    kept, dropped = filter_requests([Request(bench, 40, True)], SelfChatSettings(), set())
    assert not kept and dropped["dev_overlap"] == 1


def write_jsonl(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_keep_responses_windows_hold_the_given_answers(model, tokenizer, tmp_path):
    user = [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"} for i in range(4)]
    answers = [{"role": "assistant", "content": f"The answer is {2 * i}, since {i} and {i} make {2 * i}."} for i in range(4)]  # fmt: skip
    path = write_jsonl(
        tmp_path / "chats.jsonl",
        {"messages": [user[0], answers[0]]},
        {"messages": [{"role": "system", "content": "Be exact."}, user[1], answers[1], user[2], answers[2]]},
        {"conversations": [{"from": "human", "value": user[3]["content"]}, {"from": "gpt", "value": "Eight."}]},
        {"messages": [user[0], answers[0], user[3]]},  # ends with a user turn: the target answers that one
    )
    texts = read_texts(path, tokenizer=tokenizer, keep_responses=True)
    pairs = texts.train_answered + texts.val_answered
    assert len(pairs) == 5 and "5 given answers kept" in texts.description
    assert len(set(texts.train_chats + texts.val_chats)) == 1  # (a file's only chat is in both: the tiny-file rule)
    second = [p for p in pairs if p[0].endswith(chat_text(tokenizer, [user[2]]))]
    assert len(second) == 1 and answers[1]["content"] in second[0][0]  # a later turn's context holds the earlier answer
    assert {answer for _, answer in pairs} == {a["content"] + "\n" for a in answers[:3]} | {"Eight.\n"}

    prompt_len, new_tokens = 48, 24
    data = build_data(
        model, tokenizer, [], answered=pairs, sequences=10, prompt_len=prompt_len, new_tokens=new_tokens,
        eos_token_ids=[0], progress=False,
    )  # fmt: skip
    assert data.tokens.shape == (10, prompt_len + new_tokens) and data.stats["answered_windows"] == 10
    encoded = [
        (tokenizer(c, add_special_tokens=False)["input_ids"], tokenizer(a, add_special_tokens=False)["input_ids"])
        for c, a in pairs
    ]
    for tokens, valid in zip(data.tokens.tolist(), data.valid.tolist()):
        window, rest = tokens[:prompt_len], tokens[prompt_len:]
        matches = [a for c, a in encoded if window[-len(c) :] == c[-prompt_len:] and rest[: len(a)] == a[:new_tokens]]
        assert matches, "a window is not a chat followed by its given answer"
        assert sum(valid) == prompt_len + min(len(matches[0]), new_tokens)

    without = read_texts(path, tokenizer=tokenizer)  # the target rewrites the assistant turns
    assert not without.train_answered + without.val_answered
    assert all("The answer is" not in chat for chat in without.train_chats + without.val_chats)
    with pytest.raises(ParadecError, match=r"--keep-responses needs a \.jsonl data file"):
        read_texts("chat", tokenizer=tokenizer, keep_responses=True)
    with pytest.raises(ParadecError, match="--keep-responses needs --new-tokens >= 1"):
        DataSettings(path, keep_responses=True, new_tokens=0)


def test_self_chat_is_the_default_for_chat_targets(tokenizer, tokenizer_dir):
    plain = load_tokenizer(tokenizer_dir)
    assert data_source(None, tokenizer) == SELF_CHAT_DATA
    assert data_source(None, tokenizer, "off") == PYTHON_SOURCE_DATA
    assert data_source(None, plain) == PYTHON_SOURCE_DATA
    assert data_source("chat", tokenizer) == "chat"
    assert DataSettings().answer_sampling(SELF_CHAT_DATA) == (0.25, 1.0)  # a share of the answers sampled
    assert DataSettings().answer_sampling(PYTHON_SOURCE_DATA) == (0.0, 1.0)
    assert DataSettings(temperature=0.7).answer_sampling(SELF_CHAT_DATA) == (1.0, 0.7)  # as before: all sampled
    assert DataSettings(temperature=0).answer_sampling(SELF_CHAT_DATA) == (0.0, 0.0)
    assert DataSettings(sampled_share=0.5).answer_sampling("chat") == (0.5, 1.0)
    with pytest.raises(ParadecError, match=r"sampled-share 0\.5 needs a temperature > 0"):
        DataSettings(temperature=0, sampled_share=0.5)
    with pytest.raises(ParadecError, match="request-temperature must be a value or a range LOW HIGH"):
        SelfChatSettings(temperature=(1.2, 0.8))
    with pytest.raises(ParadecError, match=r"request-min-tokens must be an integer in \[1, request-max-tokens = 8\]"):
        SelfChatSettings(min_tokens=9, max_tokens=8)


@pytest.fixture(scope="module")
def ending_model_dir(chat_llama_dir, tmp_path_factory) -> Path:
    """The chat model, with 48 end-of-text ids: the random tiny model then ends most of its turns early."""
    out = tmp_path_factory.mktemp("ending") / "llama"
    shutil.copytree(chat_llama_dir, out)
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": list(range(48))}))
    return out


def test_train_eagle_on_self_chat_writes_heads_and_a_card(ending_model_dir, tmp_path, monkeypatch):
    args = ["train", "eagle", "--model", str(ending_model_dir), "--data", "self-chat", "--out", str(tmp_path)]
    args += ["--self-chat-requests", "24", "--request-max-tokens", "12", "--request-min-tokens", "1"]
    args += ["--request-temperature", "0.9", "--gen-batch-size", "8", "--self-distill", "8", "--prompt-len", "40"]
    args += ["--new-tokens", "8", "--val-sequences", "2", "--val-prompts", "1", "--steps", "3", "--batch-size", "4"]
    args += ["--passes", "2", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    out = tmp_path / "eagle"
    assert (out / "config.json").is_file()
    card = json.loads((out / "card.json").read_text())
    data = card["data"]
    assert data["name"] == "self-chat" and data["source"].startswith("self-chat")
    stats = data["self_chat"]
    assert stats["requests_written"] == 24 and stats["requests_kept"] >= 2
    assert stats["requests_kept"] + sum(stats["dropped"].values()) == 24
    assert set(stats["dropped"]) == {"too_short", "too_long", "control_tokens", "dev_overlap", "duplicate", "near_duplicate"}  # fmt: skip
    assert stats["dev_overlap_check"]["dropped"] == stats["dropped"]["dev_overlap"]
    assert [s["prompt"] for s in stats["system_prompts"]] == list(SYSTEM_PROMPTS)
    assert stats["temperature_range"] == [0.9, 0.9] and len(stats["batches"]) == 3
    assert stats["generate_seconds"] >= 0 and stats["train_chats"] + stats["validation_chats"] == stats["requests_kept"]
    assert data["answers"] == {"sampled_share": 0.25, "temperature": 1.0}
    assert data["train"]["chat_windows"] == 8 and data["train"]["sampled_windows"] == 2
    assert card["fit"]["steps"] == 3 and data["reused"] is None
    (cached,) = (tmp_path / "data-cache").glob("*.pt")

    # a second kind on the same data reuses the windows: no request is written, the same tokens train it
    def no_generation(*args, **kwargs):
        raise AssertionError("the cached windows should have been reused")

    medusa = [
        "medusa" if a == "eagle" else a for a in args[: args.index("--passes")] + args[args.index("--passes") + 2 :]
    ]
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "self_chat_texts", no_generation)
        patch.setattr(pipeline, "target_windows", no_generation)
        assert main(medusa) == 0
    reused = json.loads((tmp_path / "medusa" / "card.json").read_text())["data"]
    assert reused["reused"] == str(cached) and reused["self_chat"] == stats
    assert reused["train"]["tokens"] == data["train"]["tokens"] and reused["train"]["feature_layers"] is None
    # other data settings, or --fresh-data, generate anew
    assert main([*medusa, "--seed", "1"]) == 0
    assert len(list((tmp_path / "data-cache").glob("*.pt"))) == 2

    def reused_by(extra: list[str]):
        assert main([*medusa, *extra]) == 0
        return json.loads((tmp_path / "medusa" / "card.json").read_text())["data"]["reused"]

    cached.write_bytes(b"damaged")  # a damaged entry is regenerated and rewritten
    assert reused_by([]) is None and reused_by([]) == str(cached)
    assert reused_by(["--fresh-data"]) is None


def test_self_chat_errors_exit_2(model_dirs, chat_llama_dir, capsys):
    plain = ["train", "eagle", "--model", str(model_dirs["llama"]), "--device", "cpu", "--quiet"]
    assert main([*plain, "--data", "self-chat"]) == 2
    assert "self-chat needs a target with a chat template" in capsys.readouterr().err
    chat = ["train", "eagle", "--model", str(chat_llama_dir), "--device", "cpu", "--quiet"]
    assert main([*chat, "--request-temperature", "0.5", "1", "2"]) == 2
    assert "request-temperature must be a value or a range LOW HIGH" in capsys.readouterr().err
    assert main([*chat, "--data", "self-chat", "--keep-responses"]) == 2
    assert "--keep-responses does not apply" in capsys.readouterr().err
