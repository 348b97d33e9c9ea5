"""Self-chat data (Magpie-style): the target writes its own user requests, then answers them.

`paradec train --data self-chat` (the default for a target with a chat template) makes its training chats without
any dataset. The chat template is rendered up to where a user turn's content starts, and the target continues from
there: what it writes is a user request, in the voice its own alignment taught it (Xu et al. 2024, "Magpie").

    prefix:   [ <system turn: one of SYSTEM_PROMPTS, or none> | <user turn opened> ]
    sampled:                                                                      [ request ... end-of-turn ]

The prefix is found for any template by rendering [system, user = PLACEHOLDER] and cutting before the placeholder.
Requests are sampled in left-padded batches; each batch draws its temperature and top-p from the configured ranges
(seeded), each request its system prompt (seeded, evenly spread). A request ends at an end-of-turn token: the
target's end-of-text ids and the special tokens the template puts after a user turn's content.

Filters, in this order (each request is counted under the first one that drops it):
- too_short / too_long: fewer than `min_tokens` tokens, or no end-of-turn within `max_tokens`;
- control_tokens: the request holds a special token or a piece of the template's scaffolding (a role header);
- dev_overlap: it shares a run of 8 words with a bench dev suite (`paradec.train.overlap`);
- duplicate: its normalised text (lower-cased words) equals a kept request's;
- near_duplicate: more than `near_duplicate` of its 8-word shingles (of the smaller of the two) are a kept request's.

The kept requests become chats [system, user = request], rendered with the template up to the opened assistant turn
(`paradec.chat.chat_text`): from there on they are `--data chat` prompts, answered by the target in
`paradec.train.data.build_data`. Validation chats are held out by the request's hash.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from paradec.chat import chat_text, has_chat_template
from paradec.errors import ParadecError
from paradec.train.data import TextSource, split_held_out
from paradec.train.overlap import RUN_WORDS, dev_overlap, word_runs

PLACEHOLDER = "PARADEC-PLACEHOLDER-7f3a9c"  # stands for a message's content while the template is rendered
SYSTEM_PROMPTS: tuple[str | None, ...] = (
    None,
    "You are a helpful assistant.",
    "You are a knowledgeable assistant. Answer clearly and accurately, and keep your answers well organised.",
    "You are an expert software engineer. You help with programming questions, code reviews and debugging.",
    "You are a patient tutor who explains ideas step by step, with simple examples.",
    "You are a creative writing partner who helps with stories, poems and other imaginative writing.",
    "You are a concise assistant. Give short, direct answers.",
    "You are a friendly assistant who helps people plan, organise and solve everyday problems.",
    "You are a careful assistant for mathematics and data questions. Show your reasoning.",
)
DROP_REASONS = ("too_short", "too_long", "control_tokens", "dev_overlap", "duplicate", "near_duplicate")


@dataclass(frozen=True)
class SelfChatSettings:
    requests: int = 2048  # requests the target writes (before the filters)
    temperature: tuple[float, float] = (0.8, 1.1)  # each batch draws its temperature from this range
    top_p: tuple[float, float] = (0.9, 1.0)  # ... and its top-p from this one
    max_tokens: int = 128  # a request that has not ended within this many tokens is dropped (too_long)
    min_tokens: int = 4  # a request of fewer tokens is dropped (too_short)
    near_duplicate: float = 0.5  # drop a request sharing more than this share of 8-word shingles with a kept one
    system_prompts: tuple[str | None, ...] = SYSTEM_PROMPTS  # None: no system turn

    def __post_init__(self) -> None:
        for name, flag in (("requests", "self-chat-requests"), ("max_tokens", "request-max-tokens")):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParadecError(f"{flag} must be an integer >= 1, got {value!r}")
        if not isinstance(self.min_tokens, int) or not 1 <= self.min_tokens <= self.max_tokens:
            raise ParadecError(
                f"request-min-tokens must be an integer in [1, request-max-tokens = {self.max_tokens}], "
                f"got {self.min_tokens!r}"
            )
        for name, flag, top in (("temperature", "request-temperature", 10.0), ("top_p", "request-top-p", 1.0)):
            bounds = tuple(getattr(self, name))
            if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1] <= top:
                raise ParadecError(
                    f"{flag} must be a value or a range LOW HIGH with 0 < LOW <= HIGH <= {top:g}, got {bounds!r}"
                )
        if not 0 < self.near_duplicate <= 1:
            raise ParadecError(f"near-duplicate must be in (0, 1], got {self.near_duplicate!r}")
        if not self.system_prompts:
            raise ParadecError("self-chat needs at least one system prompt (None: no system turn)")


@dataclass
class Request:
    """One request the target wrote."""

    text: str  # decoded (special tokens kept, so that the control filter sees them) and stripped
    tokens: int  # tokens before the end-of-turn
    ended: bool  # an end-of-turn came within max_tokens
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        return [*_system(self.system), {"role": "user", "content": self.text}]


@dataclass
class Template:
    """What self-chat needs to know about a chat template, found by rendering placeholders."""

    prefixes: dict[str | None, str] = field(default_factory=dict)  # system prompt -> text up to the user's content
    markers: set[str] = field(default_factory=set)  # control text a request must not hold
    stop_ids: list[int] = field(default_factory=list)  # end-of-turn token ids


def _render(tokenizer, messages: list[dict[str, str]], *, opened: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
    except TemplateError as exc:
        raise ParadecError(f"the chat template refused the messages: {exc}") from None


def _system(system: str | None) -> list[dict[str, str]]:
    return [] if system is None else [{"role": "system", "content": system}]


def user_turn_prefix(tokenizer, system: str | None = None) -> str:
    """The chat template's text of a conversation (with a system turn holding `system`, if given) up to where the
    content of its user turn starts: render [system, user = PLACEHOLDER] and cut before the placeholder."""
    text = _render(tokenizer, [*_system(system), {"role": "user", "content": PLACEHOLDER}], opened=False)
    if text.count(PLACEHOLDER) != 1:
        raise ParadecError(
            f"the chat template renders a user message's content {text.count(PLACEHOLDER)} times, not once: "
            "cannot find where a user turn starts"
        )
    return text[: text.index(PLACEHOLDER)]


def _special_tokens(tokenizer) -> dict[str, int]:
    """Special token text -> id: the named ones (eos, bos, pad, ...) and the added tokens marked special."""
    found = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            found[added.content] = token_id
    return found


def read_template(tokenizer, system_prompts: tuple[str | None, ...], eos_token_ids: list[int]) -> Template:
    """The user-turn prefix of every system prompt the template renders (one it refuses or drops is left out), the
    control markers and the end-of-turn ids."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "the target"
        raise ParadecError(
            f"self-chat needs a target with a chat template, and {str(name)!r} has none: "
            "give --data python-source, chat or a data file"
        )
    template = Template()
    for system in system_prompts:
        try:
            prefix = user_turn_prefix(tokenizer, system)
        except ParadecError:
            if system is None:
                raise
            continue  # e.g. a template without a system role
        if system is None or system in prefix:
            template.prefixes[system] = prefix
    if not template.prefixes:
        raise ParadecError("the chat template renders none of the self-chat system prompts")
    # scaffolding: what the template writes between the contents of a whole conversation, line by line
    system = next((s for s in template.prefixes if s is not None), None)
    roles = ["user", "assistant", "user"]
    contents = [f"{PLACEHOLDER}{i}" for i in range(len(roles) + 1)]
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents[1:])]
    if system is not None:
        messages.insert(0, {"role": "system", "content": contents[0]})
    pieces = re.split("|".join(map(re.escape, contents)), _render(tokenizer, messages, opened=True))
    special = _special_tokens(tokenizer)
    template.markers = {line.strip() for piece in pieces for line in piece.splitlines() if line.strip()}
    template.markers |= set(special)
    # end of a user turn: the end-of-text ids, and the special tokens the template writes after a user's content
    closing = _render(tokenizer, [{"role": "user", "content": PLACEHOLDER}], opened=True).split(PLACEHOLDER)[-1]
    closing_ids = tokenizer(closing, add_special_tokens=False)["input_ids"]
    ids = dict.fromkeys([*eos_token_ids, *(i for i in closing_ids if i in special.values())])
    template.stop_ids = list(ids)
    if not template.stop_ids:
        raise ParadecError("self-chat: the target has no end-of-text token and its chat template no end-of-turn one")
    return template


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one batch padded on the left: input ids and attention mask [b, T] int64."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def write_requests(
    model,
    tokenizer,
    template: Template,
    settings: SelfChatSettings,
    *,
    seed: int,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[Request], list[dict]]:
    """`settings.requests` requests sampled from the target after the user-turn prefixes, and each batch's sampling
    parameters. Deterministic under `seed` (for a given batch size and device)."""
    from transformers import GenerationConfig

    rng = random.Random(seed)
    systems = list(template.prefixes)
    assigned = [systems[i % len(systems)] for i in range(settings.requests)]
    rng.shuffle(assigned)
    prefix_ids = {s: tokenizer(p, add_special_tokens=False)["input_ids"] for s, p in template.prefixes.items()}
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.stop_ids[0]
    stops = torch.tensor(template.stop_ids)
    requests: list[Request] = []
    batches: list[dict] = []
    starts = range(0, settings.requests, batch_size)
    for index, start in enumerate(tqdm(starts, desc="self-chat requests", unit="batch", disable=not progress)):
        batch = assigned[start : start + batch_size]
        sampling = {"temperature": round(rng.uniform(*settings.temperature), 3)}
        sampling["top_p"] = round(rng.uniform(*settings.top_p), 3)
        batches.append(sampling)
        config = GenerationConfig(
            do_sample=True,
            top_k=0,
            max_new_tokens=settings.max_tokens,
            eos_token_id=template.stop_ids,
            pad_token_id=pad,
            **sampling,
        )
        ids, mask = left_padded([prefix_ids[s] for s in batch], pad)
        torch.manual_seed(seed * 100_003 + index)  # each batch seeded by itself: the same requests for any count
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for system, row in zip(batch, out[:, ids.shape[1] :].cpu()):  # row: [g] int64, g <= max_tokens
            stop_at = torch.isin(row, stops).nonzero()
            ended = len(stop_at) > 0
            written = row[: int(stop_at[0])] if ended else row
            text = tokenizer.decode(written.tolist(), skip_special_tokens=False).strip()
            requests.append(Request(text, len(written), ended, system))
    return requests, batches


def _normalised(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def filter_requests(
    requests: list[Request], settings: SelfChatSettings, markers: set[str]
) -> tuple[list[Request], dict[str, int]]:
    """The requests that pass the filters of the module docstring, in order, and the count dropped by each."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    survivors = []
    for request in requests:
        if not request.text or request.tokens < settings.min_tokens:
            dropped["too_short"] += 1
        elif not request.ended:
            dropped["too_long"] += 1
        elif any(marker in request.text for marker in markers):
            dropped["control_tokens"] += 1
        else:
            survivors.append(request)
    overlaps = dev_overlap([r.text for r in survivors])
    dropped["dev_overlap"] = sum(overlaps)
    seen: set[str] = set()
    kept: list[Request] = []
    kept_shingles: list[set[tuple[str, ...]]] = []
    owners: dict[tuple[str, ...], list[int]] = {}  # shingle -> indices of the kept requests that hold it
    for request, overlap in zip(survivors, overlaps):
        if overlap:
            continue
        normalised = _normalised(request.text)
        if normalised in seen:
            dropped["duplicate"] += 1
            continue
        shingles = word_runs(normalised, RUN_WORDS)
        shared = Counter(owner for shingle in shingles for owner in owners.get(shingle, ()))
        if any(n > settings.near_duplicate * min(len(shingles), len(kept_shingles[k])) for k, n in shared.items()):
            dropped["near_duplicate"] += 1
            continue
        seen.add(normalised)
        for shingle in shingles:
            owners.setdefault(shingle, []).append(len(kept))
        kept.append(request)
        kept_shingles.append(shingles)
    return kept, dropped


def self_chat_texts(
    model,
    tokenizer,
    settings: SelfChatSettings,
    *,
    eos_token_ids: list[int],
    seed: int,
    batch_size: int = 64,
    progress: bool = True,
) -> TextSource:
    """Requests written by the target, filtered, rendered as chats with the assistant turn opened, and split into
    training and validation chats; `stats` holds what the card records."""
    started = time.perf_counter()
    template = read_template(tokenizer, settings.system_prompts, eos_token_ids)
    requests, batches = write_requests(
        model, tokenizer, template, settings, seed=seed, batch_size=batch_size, progress=progress
    )
    written = time.perf_counter()
    kept, dropped = filter_requests(requests, settings, template.markers)
    if not kept:
        reasons = ", ".join(f"{name} {count}" for name, count in dropped.items() if count)
        raise ParadecError(
            f"self-chat: none of the {len(requests)} requests the target wrote passed the filters ({reasons}); "
            "write more (--self-chat-requests) or widen the bounds (--request-min-tokens, --request-max-tokens)"
        )
    train, val = split_held_out([(r.text, chat_text(tokenizer, r.messages())) for r in kept])
    stats = {
        "requests_written": len(requests),
        "requests_kept": len(kept),
        "dropped": dropped,
        "dev_overlap_check": {
            "rule": f"a request sharing a run of {RUN_WORDS} words with a bench dev suite record is dropped",
            "dropped": dropped["dev_overlap"],
        },
        "request_tokens_mean": round(sum(r.tokens for r in kept) / len(kept), 1),
        "min_tokens": settings.min_tokens,
        "max_tokens": settings.max_tokens,
        "near_duplicate": settings.near_duplicate,
        "system_prompts": [  # null: no system turn
            {"prompt": system, "requests_kept": sum(r.system == system for r in kept)} for system in template.prefixes
        ],
        "system_prompts_refused": [s for s in settings.system_prompts if s not in template.prefixes],
        "temperature_range": list(settings.temperature),
        "top_p_range": list(settings.top_p),
        "batches": batches,
        "stop_token_ids": template.stop_ids,
        "seed": seed,
        "generate_seconds": round(written - started, 1),
        "train_chats": len(train),
        "validation_chats": len(val),
    }
    description = f"self-chat ({len(kept)} of {len(requests)} requests the target wrote, answered by the target)"
    return TextSource([], [], description, train, val, stats=stats)
