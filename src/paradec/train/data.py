"""Training data made by the target itself (self-distillation).

Drafters must learn the *target's* distribution, not the corpus': the data are token windows (prompts) continued
by the target's own greedy (or sampled) decoding, plus the target's last hidden state at every position. The
target's next-token distribution at position t is softmax(lm_head(f_t)), so storing the hidden states f [N, T, H]
is enough to recover every soft label without keeping [N, T, V] logits around.

Sources: `--data FILE` (a .jsonl file of records, or any text file, cut into chunks), `--data chat` (the packaged
chat prompt set `paradec/train/data/chat_prompts.jsonl`), or by default the Python source on this machine read by
the zoo's corpus reader. A .jsonl record is one of
- `{"messages": [{"role", "content"}, ...]}` (OpenAI) or `{"conversations": [{"from": "human"|"gpt"|"system",
  "value"}, ...]}` (ShareGPT): a chat, its assistant turns dropped (the target answers itself);
- `{"prompt": ...}`: a chat of one user turn when chat rendering is on (`--chat on`, or `auto` with a target that
  has a chat template), else text;
- `{"text": ...}`: text.

Text is cut into fixed-length windows; the target continues each one. A chat is rendered by the target's chat
template up to its opened assistant turn (`paradec.chat.chat_text`), and its window ENDS there, so the target's
continuation is its own answer:

    window (prompt_len tokens):  [ ...tail of the prompts before it in a seeded order | rendered chat ]
    continued by the target:                                                           [ its answer ... ]

The left fill keeps batches rectangular; a rendered chat longer than the window keeps its tail. Validation
records are held out by content hash (the zoo's rule), so with the default corpus they are the zoo's validation
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

import torch
from tqdm import tqdm

from paradec.chat import chat_text, check_messages, has_chat_template
from paradec.errors import ParadecError

TEXT_CHUNK_CHARS = 4000  # plain text files are cut into chunks of about this size
VAL_PER_MILLE = 50  # share of --data records held out for validation (by content hash)
CHAT_MODES = ("auto", "on", "off")  # --chat: render chats and prompts with the target's template (auto: if it has one)
CHAT_DATA = "chat"  # --data chat: the packaged chat prompt set
CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.jsonl"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass
class TextSource:
    train: list[str]  # texts, cut into windows
    val: list[str]
    description: str
    train_chats: list[str] = field(default_factory=list)  # chats rendered by the target's template, turn opened
    val_chats: list[str] = field(default_factory=list)


@dataclass
class DistillData:
    """Token windows and the target's hidden states over them (on the training device)."""

    tokens: torch.Tensor  # [N, T] int64
    valid: torch.Tensor  # [N, T] bool: real tokens (False after an end-of-text the target emitted)
    features: torch.Tensor  # [N, T, H] the target's last hidden states (after its final norm), target dtype
    stats: dict = field(default_factory=dict)

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


def _split(items: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(hash key, item) pairs -> train and validation items, held out by the key's hash."""
    val = [item for key, item in items if _held_out(key)]
    train = [item for key, item in items if not _held_out(key)]
    if not val:  # tiny files: hold out the last item, unless it is the only one
        val = train[-1:]
        train = train[:-1] or train
    return train, val


def _chat_turns(record: dict, where: str) -> list[dict] | None:
    """The messages of a chat record without its assistant turns; None when `record` is not a chat."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ParadecError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
        turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "assistant")]
    elif "conversations" in record:
        conversation = record["conversations"]
        if not isinstance(conversation, list):
            raise ParadecError(f"{where}: 'conversations' must be a list, got {type(conversation).__name__}")
        turns = []
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
            if SHAREGPT_ROLES[speaker] != "assistant":
                turns.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    else:
        return None
    if not turns:
        raise ParadecError(f"{where}: the chat has no turn besides the assistant's (which the target writes itself)")
    try:
        check_messages(turns)
    except ParadecError as exc:
        raise ParadecError(f"{where}: {exc}") from None
    return turns


def _record(line: str, where: str, prompts_as_chat: bool) -> tuple[str, str | list[dict]] | None:
    """One .jsonl line -> (hash key, text) or (hash key, chat turns); None for an empty text or prompt."""
    try:
        record = json.loads(line)
    except ValueError:
        raise ParadecError(f"{where}: invalid JSON") from None
    if not isinstance(record, dict):
        raise ParadecError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = _chat_turns(record, where)
    if turns is not None:
        return json.dumps(turns, sort_keys=True), turns
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


def read_texts(
    data: str | Path | None,
    *,
    tokenizer=None,
    chat: str = "auto",
    max_corpus_chars: int = 40_000_000,
    progress: bool = True,
) -> TextSource:
    """Training and validation texts and rendered chats from `data` (see the module docstring), or from the
    machine's Python corpus. `chat` (one of CHAT_MODES) says what the chat template of `tokenizer` (the target's)
    renders: "auto" chats, and prompts if the target has a template; "on" chats and prompts (an error without a
    template); "off" nothing (prompts are text, a chat record is an error)."""
    template = tokenizer is not None and has_chat_template(tokenizer)
    name = getattr(tokenizer, "name_or_path", "")
    target = f"the target {str(name)!r}" if name else "the target"
    if chat == "on" and not template:
        raise ParadecError(f"--chat on: {target} has no chat template")
    prompts_as_chat = {"auto": template, "on": True, "off": False}[chat]
    if data is None:
        if chat == "on":
            raise ParadecError("--chat on needs chat or prompt records: --data chat or a .jsonl file")
        from paradec.zoo.corpus import load_corpus

        corpus = load_corpus(max_chars=max_corpus_chars, progress=progress)
        return TextSource(
            [f.text for f in corpus.train],
            [f.text for f in corpus.val],
            f"python corpus of this machine ({corpus.stats['files']} files, {corpus.stats['chars']} chars)",
        )
    path = CHAT_PROMPTS if str(data) == CHAT_DATA else Path(data)
    if not path.is_file():
        raise ParadecError(f"data file {str(data)!r} does not exist")
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParadecError(f"cannot read data file {str(data)!r}: {exc}") from exc
    if path.suffix != ".jsonl":
        texts = [(t, t) for t in _chunks(raw) if t.strip()]
        chats = []
    else:
        texts, chats = [], []  # (hash key, text), (hash key, rendered chat)
        for number, line in enumerate(raw.splitlines(), 1):
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
                chats.append((key, chat_text(tokenizer, content)))
            except ParadecError as exc:
                raise ParadecError(f"{where}: {exc}") from None
    if chat == "on" and not chats:
        raise ParadecError(f"--chat on: data file {str(data)!r} holds no chat or prompt records")
    if not texts and not chats:
        raise ParadecError(f"data file {str(data)!r} holds no text")
    kinds = [f"{len(texts)} texts"] if texts else []
    if chats:
        kinds.append(f"{len(chats)} chats rendered with the target's chat template")
    train, val = _split(texts)
    train_chats, val_chats = _split(chats)
    return TextSource(train, val, f"{path.name} ({', '.join(kinds)}, {len(raw)} chars)", train_chats, val_chats)


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


def make_chat_windows(tokenizer, chats: list[str], count: int, length: int, *, seed: int) -> tuple[torch.Tensor, dict]:
    """`count` windows of `length` tokens, each ending exactly where one rendered chat ends (its assistant turn
    opened), and stats. The chats are visited in a seeded order, a fresh one for every pass when `count` exceeds
    them (a chat then comes back with another left fill); each window is the tail of the token stream of the
    chats in that order, up to the end of its chat: the chat, left-filled with the chats before it (the first
    windows take theirs from the end of the order). A chat longer than `length` keeps its tail."""
    rng = random.Random(seed)
    # the rendered text holds the template's special tokens: add none
    ids = [row for row in tokenizer(chats, add_special_tokens=False, verbose=False)["input_ids"] if row]
    if not ids:
        raise ParadecError("the rendered chats hold no tokens")
    order: list[int] = []
    while len(order) < count:
        visit = list(range(len(ids)))
        rng.shuffle(visit)
        order += visit
    order = order[:count]
    stream: list[int] = []  # the last `length` tokens before the next chat
    back = len(order)
    while len(stream) < length:  # the first window's fill: the chats at the end of the order, wrapping around
        back -= 1
        stream = ids[order[back % len(order)]] + stream
    windows = []
    for i in order:
        stream = (stream + ids[i])[-length:]
        windows.append(stream)
    stats = {
        "chat_rendering": "the target's chat template up to the opened assistant turn; windows end there",
        "chat_windows": count,
        "chats": len(ids),
        "chat_passes": -(-count // len(ids)),  # > 1: chats reused, each time with another left fill
        "chat_windows_cut": sum(len(ids[i]) > length for i in order),  # chats longer than a window: tail kept
        "chat_tokens_mean": round(sum(len(row) for row in ids) / len(ids), 1),
    }
    return torch.tensor(windows, dtype=torch.long), stats


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
    for start in tqdm(range(0, n, batch_size), desc="self-distillation", unit="batch", disable=not progress):
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
def target_features(model, tokens: torch.Tensor, *, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """The target's last hidden states (after its final norm: what its LM head reads) [N, T, H], on its device."""
    device = next(model.parameters()).device
    base = model.base_model
    chunks = []
    for start in tqdm(
        range(0, tokens.shape[0], batch_size), desc="target features", unit="batch", disable=not progress
    ):
        chunks.append(base(input_ids=tokens[start : start + batch_size].to(device)).last_hidden_state)
    return torch.cat(chunks)


def build_data(
    model,
    tokenizer,
    texts: list[str],
    *,
    chats: Sequence[str] = (),
    sequences: int,
    prompt_len: int,
    new_tokens: int,
    eos_token_ids: list[int],
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> DistillData:
    """`sequences` windows of `prompt_len` tokens from `texts` and rendered `chats` (`make_prompts`), each
    continued by the target for `new_tokens` tokens (none: the windows alone), with the target's hidden states."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    prompts, window_stats = make_prompts(tokenizer, texts, list(chats), sequences, prompt_len, seed=seed)
    if new_tokens > 0:
        tokens, valid = continue_with_target(
            model,
            prompts,
            new_tokens,
            eos_token_ids=eos_token_ids,
            temperature=temperature,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    else:
        tokens, valid = prompts, torch.ones_like(prompts, dtype=torch.bool)
    generated = time.perf_counter()
    features = target_features(model, tokens, batch_size=batch_size, progress=progress)
    stats = {
        "sequences": int(tokens.shape[0]),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "temperature": temperature if new_tokens > 0 else None,
        "tokens": int(valid.sum()),
        **window_stats,
        "generate_seconds": round(generated - started, 1),
        "feature_seconds": round(time.perf_counter() - generated, 1),
    }
    return DistillData(tokens.to(device), valid.to(device), features, stats)
