"""Never train on the bench's dev suites: the word-run overlap check.

A training text overlaps the dev suites when it shares a run of `RUN_WORDS` consecutive words (lower-cased,
split at whitespace) with any string of any record of `paradec/bench/data/*.jsonl` (prompts, turns, message
contents). Used by the packaged chat prompts' script (`scripts/make_chat_train_prompts.py`), its test, and the
self-chat filters (`paradec.train.selfchat`), which also use `word_runs` as the shingles of near-duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

RUN_WORDS = 8
DEV_SUITES = Path(__file__).resolve().parents[1] / "bench" / "data"


def word_runs(text: str, words: int = RUN_WORDS) -> set[tuple[str, ...]]:
    """Every run of `words` consecutive words of `text`, lower-cased and split at whitespace."""
    tokens = text.lower().split()
    return {tuple(tokens[i : i + words]) for i in range(len(tokens) - words + 1)}


def _strings(value) -> Iterator[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def dev_suite_texts(folder: Path = DEV_SUITES) -> list[str]:
    """Every string of every record of the dev suites `folder/*.jsonl`."""
    texts = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                texts.extend(_strings(json.loads(line)))
    return texts


def dev_overlap(texts: Sequence[str]) -> list[bool]:
    """For each of `texts`: whether it shares a run of RUN_WORDS words with a dev-suite text."""
    banned: set[tuple[str, ...]] = set()
    for text in dev_suite_texts():
        banned |= word_runs(text)
    return [not banned.isdisjoint(word_runs(text)) for text in texts]
