"""Benchmark prompt sets: JSONL loaders and the built-in suites.

A prompt file is JSONL, one JSON object per line (blank lines are skipped). Two record styles are read:

- HumanEval style: `{"prompt": "def f(x):\n", ...}`
- Spec-Bench style: `{"turns": ["first user turn", ...], ...}`; the benchmark uses the first turn.

Optional fields: `category` (a string; default "default") and an id (`id`, `question_id` or `task_id`;
default `line-N`). Prompts are used as raw text (no chat template). Any malformed line raises a `ParadecError`
naming the file and the line number.

Suites are named recipes (`--suite`): which prompts, how many per category, and which model pair to measure.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from paradec.errors import ParadecError

DEFAULT_CATEGORY = "default"
_ID_FIELDS = ("id", "question_id", "task_id")


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    text: str


@dataclass(frozen=True)
class Suite:
    """A benchmark recipe: the zoo's dev code prompts, a subset of them, a default model pair and length."""

    name: str
    per_category: int | None  # prompts taken from each category, in file order (None = all)
    models: str  # "default": the embedded default pair; "bench": the zoo's bench pair (built if missing)
    max_new_tokens: int
    peers: str  # default --peers
    description: str


SUITES = {
    "smoke": Suite(
        "smoke", 2, "default", 48, "hf", "2 dev prompts per category, the embedded default pair (minutes on CPU)"
    ),
    "code": Suite(
        "code", 8, "bench", 128, "hf", "8 dev prompts per category, the zoo's bench pair (one GPU device call)"
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ParadecError(f"unknown suite {name!r} (choose from {', '.join(SUITES)})")
    return SUITES[name]


def _record(path: Path, line_no: int, line: str) -> BenchPrompt:
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ParadecError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise ParadecError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text:
            raise ParadecError(f"{where}: 'prompt' must be a non-empty string, got {text!r:.60}")
    elif "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0]:
            raise ParadecError(f"{where}: 'turns' must be a list whose first item is a non-empty string")
        text = turns[0]
    else:
        raise ParadecError(f"{where}: record has neither 'prompt' nor 'turns' (keys: {', '.join(record) or 'none'})")
    category = record.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise ParadecError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    ident = next((record[key] for key in _ID_FIELDS if key in record), f"line-{line_no}")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise ParadecError(f"{where}: the prompt id must be a string or an integer, got {ident!r}")
    return BenchPrompt(id=str(ident), category=category, text=text)


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
