"""Training data made by the target itself (self-distillation).

Drafters must learn the *target's* distribution, not the corpus': the data are token windows (prompts) continued
by the target's own greedy (or sampled) decoding, plus the target's last hidden state at every position. The
target's next-token distribution at position t is softmax(lm_head(f_t)), so storing the hidden states f [N, T, H]
is enough to recover every soft label without keeping [N, T, V] logits around. An EAGLE-3 head's data also hold the
outputs of its fused target layers [N, T, k * H] (`target_features(layers=...)`), in the target's dtype: k + 1 times
the hidden-state storage (`stats["feature_bytes"]` on the card).

Sources (`--data`):
- `self-chat` (the default for a target with a chat template): requests written by the target itself
  (`paradec.train.selfchat`), rendered as chats;
- `chat`: the packaged chat prompt set `paradec/train/data/chat_prompts.jsonl`;
- `python-source` (the default for a target without a chat template): the Python source on this machine, read by
  the zoo's corpus reader;
- FILE: a .jsonl file of records, or any text file, cut into chunks. A .jsonl record is one of
  - `{"messages": [{"role", "content"}, ...]}` (OpenAI) or `{"conversations": [{"from": "human"|"gpt"|"system",
    "value"}, ...]}` (ShareGPT): a chat, its assistant turns dropped (the target answers itself); with
    `--keep-responses` its assistant turns are kept as given answers (below);
  - `{"prompt": ...}`: a chat of one user turn when chat rendering is on (`--chat on`, or `auto` with a target that
    has a chat template), else text;
  - `{"text": ...}`: text.
(A file named like a source is given by its path: `./chat`.)

Text is cut into fixed-length windows; the target continues each one. A chat is rendered by the target's chat
template up to its opened assistant turn (`paradec.chat.chat_text`), and its window ENDS there, so the target's
continuation is its own answer:

    window (prompt_len tokens):  [ ...tail of the prompts before it in a seeded order | rendered chat ]
    continued by the target:                                                           [ its answer ... ]

With `--keep-responses` a given assistant turn takes the place of the target's answer (teacher forcing on the
user's data): the window of the chat up to that turn, then the turn's first new_tokens tokens as the template
renders them. The target answers greedily, except a configurable share of the windows, sampled.

The left fill keeps batches rectangular; a rendered chat longer than the window keeps its tail. Validation
records are held out by content hash (the zoo's rule), so with the Python source they are the zoo's validation
files.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from paradec.chat import chat_text, check_messages, has_chat_template
from paradec.errors import ParadecError

TEXT_CHUNK_CHARS = 4000  # plain text files are cut into chunks of about this size
VAL_PER_MILLE = 50  # share of --data records held out for validation (by content hash)
CHAT_MODES = ("auto", "on", "off")  # --chat: render chats and prompts with the target's template (auto: if it has one)
SELF_CHAT_DATA = "self-chat"  # --data self-chat: requests and answers written by the target (paradec.train.selfchat)
CHAT_DATA = "chat"  # --data chat: the packaged chat prompt set
PYTHON_SOURCE_DATA = "python-source"  # --data python-source: the Python source files of this machine
CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.jsonl"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
T = TypeVar("T")


@dataclass
class TextSource:
    train: list[str]  # texts, cut into windows
    val: list[str]
    description: str
    train_chats: list[str] = field(default_factory=list)  # chats rendered by the target's template, turn opened
    val_chats: list[str] = field(default_factory=list)
    train_answered: list[tuple[str, str]] = field(default_factory=list)  # (rendered chat, its given answer's text)
    val_answered: list[tuple[str, str]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # what the source records on the card (self-chat: its filters)


@dataclass
class DistillData:
    """Token windows and the target's hidden states over them (on the training device)."""

    tokens: torch.Tensor  # [N, T] int64
    valid: torch.Tensor  # [N, T] bool: real tokens (False after an end-of-text the target emitted)
    features: torch.Tensor  # [N, T, H] the target's last hidden states (after its final norm), target dtype
    stats: dict = field(default_factory=dict)
    # [N, T, k * H] the outputs of the target's layers `stats["feature_layers"]` (an EAGLE-3 head's input), target
    # dtype; None unless asked for (k + 1 times the feature storage in all)
    layer_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _held_out(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 1000 < VAL_PER_MILLE


def _chunks(text: str) -> list[str]:
    """Cut `text` at line ends into pieces of about TEXT_CHUNK_CHARS characters."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= TEXT_CHUNK_CHARS:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def split_held_out(items: list[tuple[str, T]]) -> tuple[list[T], list[T]]:
    """(hash key, item) pairs -> train and validation items, held out by the key's hash."""
    val = [item for key, item in items if _held_out(key)]
    train = [item for key, item in items if not _held_out(key)]
    if not val:  # tiny files: hold out the last item, unless it is the only one
        val = train[-1:]
        train = train[:-1] or train
    return train, val


def _chat_messages(record: dict, where: str) -> list[dict] | None:
    """The checked messages of a chat record, assistant turns included; None when `record` is not a chat."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ParadecError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    elif "conversations" in record:
        conversation = record["conversations"]
        if not isinstance(conversation, list):
            raise ParadecError(f"{where}: 'conversations' must be a list, got {type(conversation).__name__}")
        messages = []
        for index, turn in enumerate(conversation):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            if speaker not in SHAREGPT_ROLES:
                raise ParadecError(
                    f"{where}: conversations[{index}].from must be one of {', '.join(SHAREGPT_ROLES)}, "
                    f"got {speaker!r:.60}"
                )
            if not isinstance(turn.get("value"), str):
                raise ParadecError(
                    f"{where}: conversations[{index}].value must be a string, got {type(turn.get('value')).__name__}"
                )
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    else:
        return None
    try:
        check_messages(messages)
    except ParadecError as exc:
        raise ParadecError(f"{where}: {exc}") from None
    if all(m["role"] == "assistant" for m in messages):
        raise ParadecError(f"{where}: the chat has no turn besides the assistant's")
    return messages


def _given_answers(tokenizer, messages: list[dict]) -> list[tuple[str, str]]:
    """(the chat up to an assistant turn, rendered with that turn opened; the turn's rendered text) for every
    assistant turn after the first message: the text the template writes for the turn after the opened turn."""
    from jinja2 import TemplateError

    pairs = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index == 0:
            continue
        context = chat_text(tokenizer, messages[:index])
        try:
            full = tokenizer.apply_chat_template(messages[: index + 1], add_generation_prompt=False, tokenize=False)
        except TemplateError as exc:
            raise ParadecError(f"the chat template refused the messages: {exc}") from None
        if not full.startswith(context) or len(full) == len(context):
            raise ParadecError(
                f"--keep-responses: the chat template does not write messages[{index}] (an assistant turn) after "
                "the chat before it with the assistant turn opened, so its tokens cannot follow that prompt"
            )
        pairs.append((context, full[len(context) :]))
    return pairs


def _record(line: str, where: str, prompts_as_chat: bool) -> tuple[str, str | list[dict]] | None:
    """One .jsonl line -> (hash key, text) or (hash key, chat messages); None for an empty text or prompt."""
    try:
        record = json.loads(line)
    except ValueError:
        raise ParadecError(f"{where}: invalid JSON") from None
    if not isinstance(record, dict):
        raise ParadecError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = _chat_messages(record, where)
    if messages is not None:  # keyed by its turns besides the assistant's: one side for chats that differ in answers
        return json.dumps([m for m in messages if m["role"] != "assistant"], sort_keys=True), messages
    name = "text" if "text" in record else "prompt"
    value = record.get(name)
    if not isinstance(value, str):
        raise ParadecError(
            f"{where}: expected a JSON object with 'messages', 'conversations', 'text' or 'prompt' (a string), "
            f"got keys {', '.join(record) or 'none'}"
        )
    if not value.strip():
        return None
    if name == "prompt" and prompts_as_chat:
        return value, [{"role": "user", "content": value}]
    return value, value


def data_source(data: str | Path | None, tokenizer, chat: str = "auto") -> str | Path:
    """What `--data` names: SELF_CHAT_DATA, CHAT_DATA, PYTHON_SOURCE_DATA or a file. None is self-chat for a target
    with a chat template (unless `chat` is "off"), else the Python source files."""
    if data is not None:
        return data
    return SELF_CHAT_DATA if chat != "off" and has_chat_template(tokenizer) else PYTHON_SOURCE_DATA


def read_texts(
    data: str | Path | None,
    *,
    tokenizer=None,
    chat: str = "auto",
    keep_responses: bool = False,
    max_corpus_chars: int = 40_000_000,
    progress: bool = True,
) -> TextSource:
    """Training and validation texts and rendered chats from the file `data` or the packaged chat prompts (CHAT_DATA),
    see the module docstring, or from the machine's Python corpus (None or PYTHON_SOURCE_DATA). `chat` (one of
    CHAT_MODES) says what the chat template of `tokenizer` (the target's) renders: "auto" chats, and prompts if the
    target has a template; "on" chats and prompts (an error without a template); "off" nothing (prompts are text, a
    chat record is an error). With `keep_responses`, the assistant turns of chat records are kept as given answers
    (`train_answered`); a chat that does not end with one is also answered by the target."""
    template = tokenizer is not None and has_chat_template(tokenizer)
    name = getattr(tokenizer, "name_or_path", "")
    target = f"the target {str(name)!r}" if name else "the target"
    if chat == "on" and not template:
        raise ParadecError(f"--chat on: {target} has no chat template")
    prompts_as_chat = {"auto": template, "on": True, "off": False}[chat]
    if data is None or str(data) == PYTHON_SOURCE_DATA:
        if chat == "on":
            raise ParadecError("--chat on needs chat or prompt records: --data self-chat, chat or a .jsonl file")
        if keep_responses:
            raise ParadecError("--keep-responses needs a .jsonl data file of chats with assistant turns")
        from paradec.zoo.corpus import load_corpus

        corpus = load_corpus(max_chars=max_corpus_chars, progress=progress)
        return TextSource(
            [f.text for f in corpus.train],
            [f.text for f in corpus.val],
            f"python corpus of this machine ({corpus.stats['files']} files, {corpus.stats['chars']} chars)",
        )
    if str(data) == SELF_CHAT_DATA:
        raise ParadecError("--data self-chat is written by the target: see paradec.train.selfchat.self_chat_texts")
    path = CHAT_PROMPTS if str(data) == CHAT_DATA else Path(data)
    if keep_responses and (path == CHAT_PROMPTS or path.suffix != ".jsonl"):
        raise ParadecError(
            f"--keep-responses needs a .jsonl data file of chats with assistant turns, got {str(data)!r}"
        )
    if not path.is_file():
        raise ParadecError(f"data file {str(data)!r} does not exist")
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParadecError(f"cannot read data file {str(data)!r}: {exc}") from exc
    texts, chats, answered = [], [], []  # (hash key, text), (hash key, rendered chat), (hash key, (chat, answer))
    if path.suffix != ".jsonl":
        texts = [(t, t) for t in _chunks(raw) if t.strip()]
    for number, line in enumerate(raw.splitlines() if path.suffix == ".jsonl" else [], 1):
        where = f"{path}:{number}"
        item = _record(line, where, prompts_as_chat) if line.strip() else None
        if item is None:
            continue
        key, content = item
        if isinstance(content, str):
            texts.append((key, content))
            continue
        if chat == "off":
            raise ParadecError(f"{where}: a chat record, and --chat off reads 'text' and 'prompt' records only")
        if not template:
            raise ParadecError(f"{where}: a chat record, but {target} has no chat template")
        try:
            if not keep_responses:  # the target writes every assistant turn: the chat without them
                chats.append((key, chat_text(tokenizer, [m for m in content if m["role"] != "assistant"])))
                continue
            answered += [(key, pair) for pair in _given_answers(tokenizer, content)]
            if content[-1]["role"] != "assistant":
                chats.append((key, chat_text(tokenizer, content)))
        except ParadecError as exc:
            raise ParadecError(f"{where}: {exc}") from None
    if chat == "on" and not chats and not answered:
        raise ParadecError(f"--chat on: data file {str(data)!r} holds no chat or prompt records")
    if not texts and not chats and not answered:
        raise ParadecError(f"data file {str(data)!r} holds no text")
    kinds = [f"{len(texts)} texts"] if texts else []
    if chats:
        kinds.append(f"{len(chats)} chats rendered with the target's chat template")
    if answered:
        kinds.append(f"{len(answered)} given answers kept")
    train, val = split_held_out(texts)
    train_chats, val_chats = split_held_out(chats)
    train_answered, val_answered = split_held_out(answered)
    description = f"{path.name} ({', '.join(kinds)}, {len(raw)} chars)"
    return TextSource(train, val, description, train_chats, val_chats, train_answered, val_answered)


def make_windows(tokenizer, texts: list[str], count: int, length: int, *, seed: int) -> torch.Tensor:
    """Up to `count` windows of `length` tokens, spread over the texts: visiting them in a seeded order, each text
    (followed by end-of-text) gives up to ceil(count / texts) of its non-overlapping windows, picked at random;
    texts shorter than a window are joined until they fill one. An error if not even one window fits."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    per_text = -(-count // max(1, len(texts)))
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    windows: list[list[int]] = []
    carry: list[int] = []
    for start in range(0, len(order), 64):
        batch = [texts[i] for i in order[start : start + 64]]
        for ids in tokenizer(batch, verbose=False)["input_ids"]:  # long texts are cut into windows below
            ids = ids + eos
            if len(ids) < length:
                carry += ids
                if len(carry) >= length:
                    windows.append(carry[:length])
                    carry = []
                continue
            pieces = len(ids) // length
            for piece in sorted(rng.sample(range(pieces), min(per_text, pieces))):
                windows.append(ids[piece * length : (piece + 1) * length])
        if len(windows) >= count:
            break
    if not windows:
        raise ParadecError(f"the texts hold fewer tokens than one window of {length}")
    return torch.tensor(windows[:count], dtype=torch.long)


def _left_filled(
    ids: list[list[int]], count: int, length: int, rng: random.Random
) -> tuple[list[list[int]], list[int]]:
    """`count` windows of `length` tokens, each the tail of the token stream of the `ids` rows in a seeded order
    (a fresh one for every pass) up to the end of its row; and the row each window ends with."""
    order: list[int] = []
    while len(order) < count:
        visit = list(range(len(ids)))
        rng.shuffle(visit)
        order += visit
    order = order[:count]
    stream: list[int] = []  # the last `length` tokens before the next row
    back = len(order)
    while len(stream) < length:  # the first window's fill: the rows at the end of the order, wrapping around
        back -= 1
        stream = ids[order[back % len(order)]] + stream
    windows = []
    for i in order:
        stream = (stream + ids[i])[-length:]
        windows.append(stream)
    return windows, order


def make_chat_windows(tokenizer, chats: list[str], count: int, length: int, *, seed: int) -> tuple[torch.Tensor, dict]:
    """`count` windows of `length` tokens, each ending exactly where one rendered chat ends (its assistant turn
    opened), and stats. The chats are visited in a seeded order, a fresh one for every pass when `count` exceeds
    them (a chat then comes back with another left fill); each window is the tail of the token stream of the
    chats in that order, up to the end of its chat: the chat, left-filled with the chats before it (the first
    windows take theirs from the end of the order). A chat longer than `length` keeps its tail."""
    # the rendered text holds the template's special tokens: add none
    ids = [row for row in tokenizer(chats, add_special_tokens=False, verbose=False)["input_ids"] if row]
    if not ids:
        raise ParadecError("the rendered chats hold no tokens")
    windows, order = _left_filled(ids, count, length, random.Random(seed))
    stats = {
        "chat_rendering": "the target's chat template up to the opened assistant turn; windows end there",
        "chat_windows": count,
        "chats": len(ids),
        "chat_passes": -(-count // len(ids)),  # > 1: chats reused, each time with another left fill
        "chat_windows_cut": sum(len(ids[i]) > length for i in order),  # chats longer than a window: tail kept
        "chat_tokens_mean": round(sum(len(row) for row in ids) / len(ids), 1),
    }
    return torch.tensor(windows, dtype=torch.long), stats


def make_answered_windows(
    tokenizer, answered: list[tuple[str, str]], count: int, prompt_len: int, new_tokens: int, *, seed: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`count` windows of `prompt_len + new_tokens` tokens over (rendered chat, given answer) pairs (`--keep-responses`):
    the chat's window as `make_chat_windows` cuts it, then the first `new_tokens` tokens of its given answer in place
    of the target's continuation. Tokens [count, P + new_tokens], valid [count, P + new_tokens] (False after a
    shorter answer, where the tokens are `pad`), and stats."""
    if new_tokens < 1:
        raise ParadecError(
            "--keep-responses needs --new-tokens >= 1: the tokens of the given answers each window holds"
        )
    chats = [chat for chat, _ in answered]
    contexts = tokenizer(chats, add_special_tokens=False, verbose=False)["input_ids"]
    answers = tokenizer([answer for _, answer in answered], add_special_tokens=False, verbose=False)["input_ids"]
    windows, order = _left_filled(contexts, count, prompt_len, random.Random(seed))
    tokens = torch.full((count, prompt_len + new_tokens), pad, dtype=torch.long)
    valid = torch.zeros((count, prompt_len + new_tokens), dtype=torch.bool)
    for row, (window, i) in enumerate(zip(windows, order)):
        answer = answers[i][:new_tokens]
        tokens[row, : prompt_len + len(answer)] = torch.tensor(window + answer, dtype=torch.long)
        valid[row, : prompt_len + len(answer)] = True
    stats = {
        "answered_windows": count,
        "given_answers": len(answered),
        "given_answer_tokens_mean": round(sum(len(a) for a in answers) / len(answers), 1),
        "given_answers_cut": sum(len(answers[i]) > new_tokens for i in order),  # longer than new_tokens: head kept
    }
    return tokens, valid, stats


def make_prompts(
    tokenizer, texts: list[str], chats: list[str], count: int, length: int, *, seed: int
) -> tuple[torch.Tensor, dict]:
    """`count` windows of `length` tokens from texts (`make_windows`) and rendered chats (`make_chat_windows`),
    each kind taking a share of `count` proportional to its number of items, mixed in a seeded order; and stats."""
    if not texts and not chats:
        raise ParadecError("no texts or chats to cut windows from")
    chat_count = round(count * len(chats) / (len(chats) + len(texts)))
    parts, stats = [], {}
    if chat_count:
        windows, stats = make_chat_windows(tokenizer, chats, chat_count, length, seed=seed)
        parts.append(windows)
    if chat_count < count:
        parts.append(make_windows(tokenizer, texts, count - chat_count, length, seed=seed))
    windows = torch.cat(parts)
    stats = {"text_windows": len(windows) - chat_count, **stats}
    if len(parts) > 1:
        windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))]
    return windows, stats


@torch.no_grad()
def continue_with_target(
    model,
    prompts: torch.Tensor,  # [N, P] int64
    new_tokens: int,
    *,
    eos_token_ids: list[int],
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "self-distillation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own continuations: tokens [N, P + new_tokens] and valid [N, P + new_tokens] (False after the
    first end-of-text the target emitted; those slots hold the pad id)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = eos_token_ids[0] if eos_token_ids else 0
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        eos_token_id=eos_token_ids or None,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    n, p = prompts.shape
    tokens = torch.full((n, p + new_tokens), pad, dtype=torch.long)
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size].to(device)
        out = model.generate(
            input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config
        )  # [b, P + g], g <= new_tokens
        tokens[start : start + batch.shape[0], : out.shape[1]] = out.cpu()
    generated = tokens[:, p:]
    is_eos = torch.zeros_like(generated, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= generated == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first end-of-text
    valid = torch.cat([torch.ones(n, p, dtype=torch.bool), ~after_eos], 1)
    return tokens, valid


@torch.no_grad()
def target_features(
    model,
    tokens: torch.Tensor,
    *,
    layers: tuple[int, ...] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's last hidden states (after its final norm: what its LM head reads) [N, T, H], and with `layers`
    the outputs of those decoder layers concatenated [N, T, k * H] (`hidden_states[i + 1]`, before any norm; what
    `Runner.forward(hidden=layers)` returns at decode time), on its device in its dtype."""
    device = next(model.parameters()).device
    base = model.base_model
    chunks, layer_chunks = [], []
    for start in tqdm(
        range(0, tokens.shape[0], batch_size), desc="target features", unit="batch", disable=not progress
    ):
        out = base(input_ids=tokens[start : start + batch_size].to(device), output_hidden_states=layers is not None)
        chunks.append(out.last_hidden_state)  # [B, T, H]
        if layers is not None:
            layer_chunks.append(torch.cat([out.hidden_states[i + 1] for i in layers], -1))  # [B, T, k * H]
    return torch.cat(chunks), (torch.cat(layer_chunks) if layers is not None else None)


def target_windows(
    model,
    tokenizer,
    texts: list[str],
    *,
    chats: Sequence[str] = (),
    answered: Sequence[tuple[str, str]] = (),
    sequences: int,
    prompt_len: int,
    new_tokens: int,
    eos_token_ids: list[int],
    temperature: float = 0.0,
    sampled_share: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`sequences` windows from `texts`, rendered `chats` and `answered` (chat, given answer) pairs, each kind
    taking a share proportional to its number of items, mixed in a seeded order. Text and chat windows (`make_prompts`, `prompt_len` tokens) are continued by the target for `new_tokens` tokens
    (none: the windows alone): greedily, except a `sampled_share` of them sampled at `temperature` (None: all of
    them when `temperature` > 0). Answered windows hold the given answer instead (`make_answered_windows`). Returns
    tokens [N, T] and valid [N, T] on the CPU, with their stats."""
    started = time.perf_counter()
    share = (1.0 if temperature > 0 else 0.0) if sampled_share is None else sampled_share
    if share > 0 and not temperature > 0:
        raise ParadecError(f"a sampled share of {share} needs a temperature > 0, got {temperature!r}")
    pad = eos_token_ids[0] if eos_token_ids else 0
    items = len(texts) + len(chats) + len(answered)
    answered_count = round(sequences * len(answered) / max(items, 1))
    parts, stats = [], {}
    if answered_count:
        tokens, valid, stats = make_answered_windows(
            tokenizer, list(answered), answered_count, prompt_len, new_tokens, seed=seed, pad=pad
        )
        parts.append((tokens, valid))
    sampled = 0
    if answered_count < sequences:
        prompts, window_stats = make_prompts(
            tokenizer, texts, list(chats), sequences - answered_count, prompt_len, seed=seed
        )
        stats = {**window_stats, **stats}
        sampled = round(len(prompts) * share) if new_tokens > 0 else 0
        what = "target answers" if not window_stats["text_windows"] else "target continuations"
        greedy = len(prompts) - sampled
        for rows, temp, desc in ((prompts[:greedy], 0.0, what), (prompts[greedy:], temperature, f"{what}, sampled")):
            if not len(rows):
                continue
            if new_tokens == 0:
                parts.append((rows, torch.ones_like(rows, dtype=torch.bool)))
                continue
            parts.append(
                continue_with_target(
                    model,
                    rows,
                    new_tokens,
                    eos_token_ids=eos_token_ids,
                    temperature=temp,
                    batch_size=batch_size,
                    seed=seed,
                    progress=progress,
                    desc=desc,
                )
            )
    tokens = torch.cat([t for t, _ in parts])
    valid = torch.cat([v for _, v in parts])
    if answered_count and answered_count < sequences:  # mix the answered windows in
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
        tokens, valid = tokens[order], valid[order]
    stats = {
        "sequences": int(tokens.shape[0]),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "sampled_windows": sampled,  # continued by sampling; the other continued windows are greedy
        "temperature": temperature if sampled else None,
        "tokens": int(valid.sum()),
        **stats,
        "generate_seconds": round(time.perf_counter() - started, 1),
    }
    return tokens, valid, stats


def with_features(
    model,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    stats: dict,
    *,
    feature_layers: tuple[int, ...] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> DistillData:
    """The windows of `target_windows` with the target's hidden states over them (and with `feature_layers`, those
    layers' outputs), all on the target's device."""
    started = time.perf_counter()
    features, layer_features = target_features(
        model, tokens, layers=feature_layers, batch_size=batch_size, progress=progress
    )
    stats = {
        **stats,
        "feature_seconds": round(time.perf_counter() - started, 1),
        "feature_layers": None if feature_layers is None else list(feature_layers),
        # hidden states held for training, in the target's dtype: [N, T, H] (+ [N, T, k * H] of the fused layers)
        "feature_bytes": features.nbytes + (0 if layer_features is None else layer_features.nbytes),
    }
    device = next(model.parameters()).device
    return DistillData(tokens.to(device), valid.to(device), features, stats, layer_features)


def build_data(
    model, tokenizer, texts: list[str], *, feature_layers: tuple[int, ...] | None = None, **kwargs
) -> DistillData:
    """`target_windows` with the target's hidden states (`with_features`): the training data of one drafter."""
    tokens, valid, stats = target_windows(model, tokenizer, texts, **kwargs)
    batch_size, progress = kwargs.get("batch_size", 64), kwargs.get("progress", True)
    return with_features(
        model, tokens, valid, stats, feature_layers=feature_layers, batch_size=batch_size, progress=progress
    )
