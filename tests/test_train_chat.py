"""Chat training data for the drafters: records read as chats (OpenAI messages, ShareGPT conversations, prompts),
rendered by the target's chat template up to the opened assistant turn; windows that end exactly there, left-filled
with the chats before them or cut from the left; the packaged prompt set (size, no overlap with the bench suites,
reproduced by its script); and one `paradec train eagle --chat on` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_greedy
from paradec.chat import chat_text
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.loading import load_tokenizer
from paradec.train.data import CHAT_DATA, CHAT_PROMPTS, build_data, make_chat_windows, make_prompts, read_texts
from paradec.train.overlap import dev_overlap
from paradec.train.pipeline import DataSettings

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "def fibonacci(n):",
    "class Stack:",
    "The quick brown fox",
    "def read_lines(path):",
    "return a",
    "self.items.append(item)",
]


@pytest.fixture(scope="module")
def tokenizer(chat_llama_dir):
    return load_tokenizer(chat_llama_dir)


def rendered_ids(tokenizer, contents: list[str]) -> list[list[int]]:
    texts = [chat_text(tokenizer, [{"role": "user", "content": c}]) for c in contents]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def chat_of(window: list[int], prompts: list[list[int]]) -> list[int]:
    """The prompt whose tail ends `window` (the longest, should one prompt end another)."""
    matches = [p for p in prompts if window[-len(p) :] == p[-len(window) :]]
    assert matches, f"window {window} ends with no rendered prompt"
    return max(matches, key=len)


def write(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_windows_end_at_rendered_chats_and_are_left_filled(tokenizer):
    chats = [chat_text(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts = rendered_ids(tokenizer, QUESTIONS)
    length = 40
    assert all(len(p) < length for p in prompts)
    windows, stats = make_chat_windows(tokenizer, chats, len(chats), length, seed=3)
    rows = windows.tolist()
    assert windows.shape == (6, length)
    ends = [chat_of(row, prompts) for row in rows]
    assert sorted(map(tuple, ends)) == sorted(map(tuple, prompts))  # one window per prompt
    for k, row in enumerate(rows):  # the fill is the stream of the chats before it, wrapping around the order
        assert row == (rows[k - 1] + ends[k])[-length:]
    assert stats["chats"] == 6 and stats["chat_passes"] == 1 and stats["chat_windows_cut"] == 0
    assert "chat template" in stats["chat_rendering"]


def test_long_chats_are_cut_from_the_left_and_reused_with_another_fill(tokenizer):
    contents = [*QUESTIONS, "def fibonacci(n): " * 20]
    chats = [chat_text(tokenizer, [{"role": "user", "content": c}]) for c in contents]
    prompts = rendered_ids(tokenizer, contents)
    length = 60
    windows, stats = make_chat_windows(tokenizer, chats, 21, length, seed=0)
    rows = windows.tolist()
    assert windows.shape == (21, length) and stats["chat_passes"] == 3
    long = prompts[-1]
    assert len(long) > length and rows.count(long[-length:]) == 3  # the tail kept, once per pass
    assert all(len(p) < length for p in prompts[:-1]) and stats["chat_windows_cut"] == 3
    for row in rows:
        chat_of(row, prompts)
    assert len({tuple(row) for row in rows}) > len(chats)  # reused chats come back with other left fills


def test_read_texts_renders_messages_sharegpt_and_prompts(tokenizer, tmp_path):
    system = {"role": "system", "content": "You write Python."}
    path = write(
        tmp_path / "chats.jsonl",
        {"messages": [system, {"role": "user", "content": "class Stack:"}, {"role": "assistant", "content": "ANS1"}]},
        {"conversations": [{"from": "human", "value": "def f(x):"}, {"from": "gpt", "value": "ANS2"}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "return a"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ANS3"}, {"role": "user", "content": "b"}]},
        {"prompt": "def read_lines(path):"},
        {"text": "plain text stays text"},
        "",
    )  # fmt: skip
    texts = read_texts(path, tokenizer=tokenizer)
    chats = texts.train_chats + texts.val_chats
    expected = [
        [system, {"role": "user", "content": "class Stack:"}],
        [{"role": "user", "content": "def f(x):"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "return a"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],  # every assistant turn dropped
        [{"role": "user", "content": "def read_lines(path):"}],
    ]
    assert sorted(chats) == sorted(chat_text(tokenizer, turns) for turns in expected)
    assert all(chat.endswith("<|assistant|>") and "ANS" not in chat for chat in chats)
    assert set(texts.train + texts.val) == {"plain text stays text"}  # the only text: in both
    assert "1 texts, 5 chats rendered with the target's chat template" in texts.description


def test_chat_off_and_targets_without_a_template_keep_text_windows(tokenizer, tokenizer_dir, tmp_path):
    plain = load_tokenizer(tokenizer_dir)  # the conftest tokenizer: no chat template
    prompts = write(tmp_path / "prompts.jsonl", *({"prompt": q} for q in QUESTIONS))
    for texts in (read_texts(prompts, tokenizer=tokenizer, chat="off"), read_texts(prompts, tokenizer=plain)):
        assert sorted(texts.train + texts.val) == sorted(QUESTIONS) and not texts.train_chats + texts.val_chats
    rendered = read_texts(prompts, tokenizer=tokenizer, chat="on")
    assert len(rendered.train_chats + rendered.val_chats) == 6 and not rendered.train + rendered.val
    chat = write(tmp_path / "chat.jsonl", {"prompt": "x"}, {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ParadecError, match=r"chat\.jsonl:2: a chat record, and --chat off reads 'text' and 'prompt'"):
        read_texts(chat, tokenizer=tokenizer, chat="off")
    with pytest.raises(ParadecError, match=r"chat\.jsonl:2: a chat record, but the target .* has no chat template"):
        read_texts(chat, tokenizer=plain)
    with pytest.raises(ParadecError, match=r"--chat on: the target .* has no chat template"):
        read_texts(prompts, tokenizer=plain, chat="on")
    text_only = write(tmp_path / "text.jsonl", {"text": "a"}, {"text": "b"})
    with pytest.raises(ParadecError, match="holds no chat or prompt records"):
        read_texts(text_only, tokenizer=tokenizer, chat="on")
    with pytest.raises(ParadecError, match="--chat on needs chat or prompt records"):
        read_texts(None, tokenizer=tokenizer, chat="on")
    with pytest.raises(ParadecError, match="chat must be one of auto, on, off, got 'yes'"):
        DataSettings(chat="yes")


BAD_RECORDS = {
    "invalid JSON": ('{"prompt": "x"', "invalid JSON"),
    "not an object": ('["x"]', "expected a JSON object, got list"),
    "no known field": ('{"other": 1}', "expected a JSON object with 'messages', 'conversations', 'text' or 'prompt'"),
    "prompt not a string": ('{"prompt": 3}', "got keys prompt"),
    "messages not a list": ('{"messages": "hi"}', "'messages' must be a list, got str"),
    "bad role": ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role must be one of"),
    "bad content": ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string, got int"),
    "assistant only": ('{"messages": [{"role": "assistant", "content": "x"}]}', "no turn besides the assistant's"),
    "conversations not a list": ('{"conversations": {}}', "'conversations' must be a list, got dict"),
    "bad speaker": ('{"conversations": [{"from": "bot", "value": "x"}]}', "conversations[0].from must be one of"),
    "bad value": ('{"conversations": [{"from": "human", "value": null}]}', "conversations[0].value must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_named_by_file_and_line(tokenizer, tmp_path, case):
    line, message = BAD_RECORDS[case]
    path = write(tmp_path / "data.jsonl", {"prompt": "fine"}, line)
    with pytest.raises(ParadecError) as error:
        read_texts(path, tokenizer=tokenizer)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_mixed_sources_share_the_windows(tokenizer):
    chats = [chat_text(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    texts = ["def fibonacci(n):\n    a, b = 0, 1\n" * 8, "The quick brown fox jumps over the lazy dog. " * 8]
    windows, stats = make_prompts(tokenizer, texts, chats, 8, 32, seed=0)
    assert windows.shape == (8, 32) and stats["chat_windows"] == 6 and stats["text_windows"] == 2


def test_target_continues_each_chat_window_with_its_answer(chat_llama_dir, tokenizer, hf_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_llama_dir, dtype=torch.float32).eval()
    chats = [chat_text(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    data = build_data(
        model, tokenizer, [], chats=chats, sequences=4, prompt_len=32, new_tokens=6, eos_token_ids=[0], progress=False
    )
    prompts = rendered_ids(tokenizer, QUESTIONS)
    assert data.tokens.shape == (4, 38) and data.stats["chat_windows"] == 4 and data.stats["text_windows"] == 0
    for row in data.tokens.tolist():
        chat_of(row[:32], prompts)
        answer = hf_greedy(hf_models("llama"), row[:32], 6)
        assert row[32 : 32 + len(answer)] == answer


def test_packaged_prompt_set(tokenizer):
    records = [json.loads(line) for line in CHAT_PROMPTS.read_text().splitlines()]
    prompts = [r["prompt"] for r in records]
    assert len(set(prompts)) == len(prompts) >= 2048
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert len({r["category"] for r in records}) >= 10
    texts = read_texts(CHAT_DATA, tokenizer=tokenizer)
    assert len(texts.train_chats) + len(texts.val_chats) == len(prompts) and not texts.train + texts.val
    assert len(texts.val_chats) >= 64  # enough held out for the default --val-sequences


def test_training_prompts_share_no_8_words_with_the_bench_suites():
    prompts = [json.loads(line)["prompt"] for line in CHAT_PROMPTS.read_text().splitlines()]
    shared = [p for p, overlap in zip(prompts, dev_overlap(prompts)) if overlap]
    assert not shared, f"{len(shared)} training prompts share 8 words with the bench suites, e.g. {shared[0]!r}"


def test_the_script_reproduces_the_packaged_set(tmp_path):
    out = tmp_path / "chat_prompts.jsonl"
    script = ROOT / "scripts" / "make_chat_train_prompts.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == CHAT_PROMPTS.read_bytes()


def test_train_eagle_on_chat_data_writes_heads(chat_llama_dir, tmp_path):
    data = write(
        tmp_path / "chats.jsonl",
        *({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]} for q in QUESTIONS),
        {"conversations": [{"from": "human", "value": "def add(a, b):"}]},
    )
    args = ["train", "eagle", "--model", str(chat_llama_dir), "--data", str(data), "--chat", "on"]
    args += ["--out", str(tmp_path)]
    args += ["--self-distill", "8", "--prompt-len", "40", "--new-tokens", "8", "--val-sequences", "2"]
    args += ["--val-prompts", "1", "--steps", "3", "--batch-size", "4", "--passes", "2", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    out = tmp_path / "eagle"
    assert (out / "config.json").is_file()
    card = json.loads((out / "card.json").read_text())
    assert card["data"]["chat"] == "on" and "7 chats rendered" in card["data"]["source"]
    train = card["data"]["train"]
    assert train["chat_windows"] == 8 and train["text_windows"] == 0 and train["chat_passes"] >= 2
    assert card["fit"]["steps"] == 3
