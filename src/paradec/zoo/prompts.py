"""The code dev prompt set: prompts cut from validation files only, for benchmarks and the zoo's loop check.

Three categories (each record: id, category, prompt, reference, source):
- `docstring`     a function's decorators, signature and docstring; the model writes the body (reference: the body).
- `edit`          "edit this function" prompts that quote a whole function, state a change, and open the rewritten
                  `def name(`; the answer mostly copies the quoted code, as real editing requests do.
- `continuation`  the opening of a file (after its licence/comment header); the model continues the file.

No prompt is taken from a training file. Exact duplicates are gone by construction (the split is by content hash),
and to catch near-duplicates (vendored copies with small edits) a function is used only if its `def` line occurs
in no training file, and a file only if most of its `def` lines occur in none.

Selection is deterministic: candidates are visited in hash order, each file is used at most once, and each
top-level package contributes at most `per_package` prompts per category, which spreads the set across packages.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from paradec.errors import ParadecError
from paradec.zoo.corpus import Corpus, SourceFile

CATEGORIES = ("docstring", "edit", "continuation")
DEFAULT_COUNTS = {"docstring": 48, "edit": 32, "continuation": 40}
MAX_PROMPT_CHARS = 1600
_DEF_LINE = re.compile(r"^[ \t]*((?:async[ \t]+)?def[ \t]+\w+.*)$", re.M)
_EDITS = (
    "Add type hints to every parameter and to the return value of the function below. Keep its behaviour.",
    "Rename the local variables of the function below to more descriptive names. Keep its behaviour.",
    "Add a short comment above each non-trivial statement of the function below. Keep the code unchanged.",
    "Make the function below log its arguments with the logging module when it is called.",
    "Remove the docstring of the function below. Keep everything else unchanged.",
    "Reformat the function below to follow PEP 8 and the Black code style. Keep its behaviour.",
)


@dataclass(frozen=True)
class _Function:
    source: str  # display path of the file
    name: str
    signature: str  # the stripped `def ...` line
    header: str  # decorators + signature + docstring, dedented
    body: str  # the rest of the function, dedented
    def_prefix: str  # decorators + the `def` line up to and including "(", dedented


def _hash(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()


def def_lines(text: str) -> set[str]:
    return {m.strip() for m in _DEF_LINE.findall(text)}


def training_def_lines(files: Iterable[SourceFile]) -> set[str]:
    """Every stripped `def` line of the training files (the near-duplicate filter)."""
    lines: set[str] = set()
    for f in files:
        lines |= def_lines(f.text)
    return lines


def _dedent(lines: list[str], indent: int) -> str:
    return "\n".join(line[indent:] if not line[:indent].strip() else line for line in lines)


def _functions(f: SourceFile) -> list[_Function]:
    try:
        tree = ast.parse(f.text)
    except (SyntaxError, ValueError):
        return []
    lines = f.text.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("test"):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2 or node.end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        doc_end = node.body[0].end_lineno
        body_lines = lines[doc_end : node.end_lineno]
        if not 3 <= sum(bool(line.strip()) for line in body_lines) <= 30:
            continue
        indent = node.col_offset
        sig = lines[node.lineno - 1]
        if "(" not in sig:
            continue
        found.append(
            _Function(
                source=f.path,
                name=node.name,
                signature=sig.strip(),
                header=_dedent(lines[start - 1 : doc_end], indent) + "\n",
                body=_dedent(body_lines, indent) + "\n",
                def_prefix=_dedent([*lines[start - 1 : node.lineno - 1], sig[: sig.index("(") + 1]], indent),
            )
        )
    return found


def _package(path: str) -> str:
    """The top-level package of a display path ("site-packages/torch/nn/x.py" -> "torch")."""
    parts = [p for p in path.split("/")[1:] if p not in ("site-packages", "dist-packages")]
    return parts[0].removesuffix(".py") if parts else path


def _continuation(f: SourceFile, train_defs: set[str]) -> tuple[str, str] | None:
    """(prompt, reference) from the opening of a file, or None if the file does not suit."""
    lines = f.text.splitlines()
    first = 0
    while first < len(lines) and (not lines[first].strip() or lines[first].lstrip().startswith("#")):
        first += 1
    prompt_lines, size = [], 0
    for line in lines[first:]:
        if size + len(line) + 1 > MAX_PROMPT_CHARS - 100:
            break
        prompt_lines.append(line)
        size += len(line) + 1
    reference = lines[first + len(prompt_lines) : first + len(prompt_lines) + 40]
    if size < 600 or len(reference) < 20:
        return None
    defs = def_lines(f.text)
    if not defs or sum(d in train_defs for d in defs) > 0.2 * len(defs):
        return None
    return "\n".join(prompt_lines) + "\n", "\n".join(reference) + "\n"


def build_dev_prompts(
    corpus: Corpus, counts: dict[str, int] | None = None, *, per_package: int = 3, train_defs: set[str] | None = None
) -> list[dict]:
    """The dev prompt records (see the module docstring), built from `corpus.val` only."""
    counts = DEFAULT_COUNTS if counts is None else counts
    unknown = set(counts) - set(CATEGORIES)
    if unknown:
        raise ParadecError(f"unknown prompt categories {sorted(unknown)}; choose from {', '.join(CATEGORIES)}")
    train_defs = training_def_lines(corpus.train) if train_defs is None else train_defs
    used_files: set[str] = set()
    records: list[dict] = []
    val_files = sorted(corpus.val, key=lambda f: f.digest)
    functions = sorted(
        (fn for f in val_files for fn in _functions(f) if fn.signature not in train_defs),
        key=lambda fn: _hash(fn.source, fn.name, fn.signature),
    )

    def take(category: str, candidates: Iterable[tuple[str, str, str, str]]) -> None:
        per_pkg: Counter[str] = Counter()
        chosen = 0
        for source, name, prompt, reference in candidates:
            if chosen >= counts.get(category, 0):
                break
            if source in used_files or per_pkg[_package(source)] >= per_package or len(prompt) > MAX_PROMPT_CHARS:
                continue
            used_files.add(source)
            per_pkg[_package(source)] += 1
            chosen += 1
            records.append(
                {
                    "id": f"{category}-{chosen:03d}",
                    "category": category,
                    "prompt": prompt,
                    "reference": reference,
                    "source": source if not name else f"{source}:{name}",
                }
            )

    take("docstring", ((fn.source, fn.name, fn.header, fn.body) for fn in functions))

    def edits():
        for fn in functions:
            instruction = _EDITS[int(_hash(fn.source, fn.name)[:8], 16) % len(_EDITS)]
            quoted = fn.header + fn.body.rstrip("\n")
            yield fn.source, fn.name, f"# {instruction}\n\n# Before:\n{quoted}\n\n\n# After:\n{fn.def_prefix}", quoted

    take("edit", edits())

    def continuations():
        for f in val_files:
            pair = _continuation(f, train_defs)
            if pair is not None:
                yield f.path, "", pair[0], pair[1]

    take("continuation", continuations())
    return records


def write_prompts(records: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def load_prompts(path: Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ParadecError(f"cannot read dev prompts {str(path)!r}: {exc}") from exc
    return [json.loads(line) for line in text.splitlines() if line.strip()]
