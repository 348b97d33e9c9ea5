"""Benchmark prompt sets: JSONL records, how a record becomes prompt ids (rendering), and the built-in suites.

A prompt file is JSONL, one JSON object per line (blank lines are skipped). Each record holds exactly one of:

- `prompt`: raw text, e.g. HumanEval's `{"prompt": "def f(x):\n", ...}`;
- `turns`: user turns, e.g. Spec-Bench's `{"turns": ["first user turn", "a follow-up"], ...}`;
- `messages`: an OpenAI-style conversation of `system` and `user` messages, e.g.
  `{"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}`; its user turns are
  the `user` messages, and every system message is kept where it stands. There are no `assistant` messages:
  the answers to earlier turns are each method's own.

Optional fields: `category` (a string; default "default") and an id (`id`, `question_id` or `task_id`;
default `line-N`). Any malformed line raises a `ParadecError` naming the file, the line number and the problem.

Rendering (`--chat`, see `Rendering`): `auto` renders `turns` and `messages` records with the model's chat template
(`Engine.encode_chat`, the assistant turn opened) when the model has one and as raw text (the first user turn)
otherwise, and `prompt` records as raw text; `on` renders every record with the template (a `prompt` record
becomes one user turn) and is an error for a model without one; `off` uses raw text for every record.
`--turns first` asks only the first user turn; `--turns all` asks every turn of a templated record, turn k in the
context of turns 1..k-1 and the asking method's own answers to them (as Spec-Bench does), which needs the template.

Suites are named recipes (`--suite`): which prompts, how many per category, which model and how many new tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from paradec.errors import ParadecError

DEFAULT_CATEGORY = "default"
DATA_DIR = Path(__file__).parent / "data"
CHAT_MODES = ("auto", "on", "off")
TURN_MODES = ("first", "all")
_ID_FIELDS = ("id", "question_id", "task_id")
_BODY_FIELDS = ("prompt", "turns", "messages")
_RECORD_ROLES = ("system", "user")


@dataclass(frozen=True)
class BenchPrompt:
    """One record: its raw text (the `prompt`, or the first user turn) and, for a chat record, its conversation
    without answers as (role, content) pairs, system and user messages in file order."""

    id: str
    category: str
    text: str
    messages: tuple[tuple[str, str], ...] = ()  # empty: a `prompt` record

    @property
    def turns(self) -> tuple[str, ...]:
        """The user turns (a `prompt` record: its text as the one turn)."""
        if not self.messages:
            return (self.text,)
        return tuple(content for role, content in self.messages if role == "user")

    def conversation(self, answers: Sequence[str]) -> list[dict[str, str]]:
        """The messages that ask user turn `len(answers) + 1`: the record's messages up to that turn, each earlier
        user turn followed by its answer (`answers[j]`) as an assistant message."""
        if len(answers) >= len(self.turns):
            raise ValueError(f"prompt {self.id!r} has {len(self.turns)} turns, {len(answers)} answers given")
        out: list[dict[str, str]] = []
        asked = 0
        for role, content in self.messages or (("user", self.text),):
            out.append({"role": role, "content": content})
            if role == "user":
                if asked == len(answers):
                    break
                out.append({"role": "assistant", "content": answers[asked]})
                asked += 1
        return out


@dataclass(frozen=True)
class Rendering:
    """How records become prompt ids for one model: `chat` (auto | on | off) and `turns` (first | all), checked
    against whether the model has a chat template (`template`) by `rendering`."""

    chat: str
    turns: str
    template: bool

    def templated(self, prompt: BenchPrompt) -> bool:
        """Whether `prompt` is rendered with the chat template (else: its raw text)."""
        return self.chat == "on" or (self.chat == "auto" and self.template and bool(prompt.messages))

    def turn_count(self, prompt: BenchPrompt) -> int:
        """How many of `prompt`'s user turns are asked."""
        return len(prompt.turns) if self.turns == "all" and self.templated(prompt) else 1

    def encode(self, engine, prompt: BenchPrompt, answers: Sequence[str] = ()) -> list[int]:
        """Prompt ids of turn `len(answers) + 1` of `prompt`, after the asking method's `answers` to the earlier
        turns."""
        if self.templated(prompt):
            return engine.encode_chat(prompt.conversation(answers))
        return engine.encode(prompt.text)  # raw text has one turn (`turn_count`)


def rendering(chat: str, turns: str, engine) -> Rendering:
    """The `Rendering` for `engine`'s model; raises `ParadecError` for a mode the model cannot be asked in."""
    if chat not in CHAT_MODES:
        raise ParadecError(f"--chat must be one of {', '.join(CHAT_MODES)}, got {chat!r}")
    if turns not in TURN_MODES:
        raise ParadecError(f"--turns must be one of {', '.join(TURN_MODES)}, got {turns!r}")
    template = engine.has_chat_template()
    if chat == "on" and not template:
        raise ParadecError(
            f"--chat on renders every prompt with the model's chat template, but model {engine.config.model!r} "
            "has none: use --chat auto (raw text for such a model) or --chat off"
        )
    if turns == "all" and (chat == "off" or not template):
        why = "--chat off renders raw text" if chat == "off" else f"model {engine.config.model!r} has no chat template"
        raise ParadecError(
            f"--turns all asks each later turn after the method's own answers, in the model's chat template, but "
            f"{why}: use --turns first"
        )
    return Rendering(chat=chat, turns=turns, template=template)


def answer_text(engine, token_ids: Sequence[int]) -> str:
    """A generated answer as the assistant message of the next turn: the text, special tokens (the EOS) dropped
    and surrounding whitespace stripped (the template writes its own separators)."""
    return engine.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


@dataclass(frozen=True)
class Suite:
    """A benchmark recipe: a prompt set, a subset of it, a default model (pair) and a length."""

    name: str
    prompts: str  # a file in `paradec/bench/data`, or "zoo": the zoo's code dev prompts
    per_category: int | None  # prompts taken from each category, in file order (None = all)
    # "default": the model of `paradec.load()` (`paradec.zoo.DEFAULT_MODEL`); "bench": the zoo's bench pair (built
    # if missing); anything else: the model to load (a zoo name, a hub id or a directory) with its registered draft
    models: str
    max_new_tokens: int
    peers: str  # default --peers
    description: str
    categories: tuple[str, ...] | None = None  # the prompts of these categories only (None = all)

    def prompts_path(self) -> Path:
        if self.prompts == "zoo":
            from paradec import zoo

            return zoo.dev_prompts_path()
        return DATA_DIR / self.prompts


CHAT_MODEL = "smollm2-135m-instruct"  # the zoo's default instruct model
AGENTIC_MODEL = "qwen2.5-coder-1.5b-instruct"  # a zoo coder model (its registered draft: the 0.5b)
SUITES = {
    "smoke": Suite(
        "smoke", "chat.jsonl", 1, "default", 48, "hf", "1 chat prompt per category, the default model (minutes on CPU)"
    ),
    "code": Suite(
        "code", "zoo", 8, "bench", 128, "hf", "8 dev prompts per category, the zoo's bench pair (one GPU device call)"
    ),
    "chat": Suite(
        "chat", "chat.jsonl", None, CHAT_MODEL, 256, "hf", f"the chat dev prompts (12 categories), {CHAT_MODEL}"
    ),
    "code-chat": Suite(
        "code-chat",
        "code_chat.jsonl",
        None,
        CHAT_MODEL,
        256,
        "hf",
        f"code requests (complete, fix, explain, refactor) in chat form, {CHAT_MODEL}",
    ),
    "agentic": Suite(
        "agentic",
        "agentic.jsonl",
        None,
        AGENTIC_MODEL,
        256,
        "hf",
        f"code and data edits, tool calls, repeated refactors (suffix decoding's workload), {AGENTIC_MODEL}",
    ),
    "samples": Suite(
        "samples",
        "chat.jsonl",
        None,
        AGENTIC_MODEL,
        256,
        "none",
        "the chat prompts' math and reasoning categories, for n samples of each (multisample's workload: "
        f"--samples 8 --mode sample --temperature 0.7), {AGENTIC_MODEL}",
        categories=("math", "reasoning"),
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ParadecError(f"unknown suite {name!r} (choose from {', '.join(SUITES)})")
    return SUITES[name]


def _turns(where: str, turns: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(turns, list) or not turns:
        raise ParadecError(f"{where}: 'turns' must be a non-empty list of non-empty strings, got {turns!r:.60}")
    for index, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn:
            raise ParadecError(f"{where}: 'turns'[{index}] must be a non-empty string, got {turn!r:.60}")
    return tuple(("user", turn) for turn in turns)


def _messages(where: str, messages: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ParadecError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for index, message in enumerate(messages):
        name = f"{where}: 'messages'[{index}]"
        if not isinstance(message, dict):
            raise ParadecError(f"{name} must be an object with 'role' and 'content', got {message!r:.60}")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise ParadecError(f"{name} has unknown key {unknown[0]!r} (a message holds 'role' and 'content')")
        role, content = message.get("role"), message.get("content")
        if role not in _RECORD_ROLES:
            raise ParadecError(
                f"{name}.role must be 'system' or 'user', got {role!r:.60} (the answers to earlier turns are each "
                "method's own: a record holds no assistant messages)"
            )
        if not isinstance(content, str) or not content:
            raise ParadecError(f"{name}.content must be a non-empty string, got {content!r:.60}")
        out.append((role, content))
    if not any(role == "user" for role, _ in out):
        raise ParadecError(f"{where}: 'messages' holds no user message")
    if out[-1][0] != "user":
        raise ParadecError(f"{where}: 'messages' must end with a user message (it ends with a {out[-1][0]} message)")
    return tuple(out)


def _record(path: Path, line_no: int, line: str) -> BenchPrompt:
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ParadecError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise ParadecError(f"{where}: expected a JSON object, got {type(record).__name__}")
    bodies = [key for key in _BODY_FIELDS if key in record]
    if not bodies:
        raise ParadecError(
            f"{where}: record has none of 'prompt', 'turns', 'messages' (keys: {', '.join(record) or 'none'})"
        )
    if len(bodies) > 1:
        raise ParadecError(f"{where}: record has both {bodies[0]!r} and {bodies[1]!r}: give exactly one")
    messages: tuple[tuple[str, str], ...] = ()
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text:
            raise ParadecError(f"{where}: 'prompt' must be a non-empty string, got {text!r:.60}")
    else:
        messages = _turns(where, record["turns"]) if "turns" in record else _messages(where, record["messages"])
        text = next(content for role, content in messages if role == "user")
    category = record.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise ParadecError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    ident = next((record[key] for key in _ID_FIELDS if key in record), f"line-{line_no}")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise ParadecError(f"{where}: the prompt id must be a string or an integer, got {ident!r}")
    return BenchPrompt(id=str(ident), category=category, text=text, messages=messages)


def load_prompts(path: str | Path) -> list[BenchPrompt]:
    """Read a JSONL prompt file (see the module docstring); ids must be unique."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParadecError(f"cannot read prompts file {str(path)!r}: {exc}") from exc
    prompts: list[BenchPrompt] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt = _record(path, line_no, line)
        if prompt.id in seen:
            raise ParadecError(f"{path}:{line_no}: duplicate prompt id {prompt.id!r} (first on line {seen[prompt.id]})")
        seen[prompt.id] = line_no
        prompts.append(prompt)
    if not prompts:
        raise ParadecError(f"prompts file {str(path)!r} holds no records")
    return prompts


def take_per_category(prompts: list[BenchPrompt], count: int | None) -> list[BenchPrompt]:
    """The first `count` prompts of each category, in file order (all of them when `count` is None)."""
    if count is None:
        return list(prompts)
    if count < 1:
        raise ParadecError(f"--per-category must be >= 1, got {count}")
    taken: Counter[str] = Counter()
    chosen = []
    for prompt in prompts:
        if taken[prompt.category] < count:
            taken[prompt.category] += 1
            chosen.append(prompt)
    return chosen


def categories(prompts: list[BenchPrompt]) -> list[str]:
    """Category names in order of first appearance."""
    return list(dict.fromkeys(p.category for p in prompts))
