"""The training corpus: the Python source files installed on this machine.

Owns finding the files (the standard library and site-packages by default), reading them in parallel,
deduplicating by content hash, dropping files that are not source a person wrote (undecodable, huge, minified),
capping the total size and splitting train/validation *by file*.

Every choice is a function of file contents alone, so it is deterministic for a given machine image:
- duplicates keep the first path in sorted order;
- the size cap keeps files in the order of their content hash (an unbiased, stable sample across packages);
- a file is in validation iff its content hash falls in the first `val_per_mille` of 1000 buckets, so adding or
  removing other files never moves a file between train and validation.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from paradec.errors import ParadecError

MAX_FILE_BYTES = 500_000  # larger .py files are almost always generated tables or vendored bundles
MAX_LINE_CHARS = 1_000  # minified or data-carrying source
MIN_FILE_CHARS = 64  # empty __init__.py files and one-line stubs


@dataclass(frozen=True)
class SourceFile:
    path: str  # display path: "<root label>/<relative path>", e.g. "stdlib/json/decoder.py"
    digest: str  # sha1 of the file's bytes (hex)
    text: str


@dataclass
class Corpus:
    train: list[SourceFile]
    val: list[SourceFile]
    stats: dict = field(default_factory=dict)  # files found / unique / kept, chars; tokens are added by the tokenizer

    @property
    def digest(self) -> str:
        """Fingerprint of the kept files and their split (caches of tokenizers and token arrays key on it)."""
        h = hashlib.sha1()
        for split, files in (("train", self.train), ("val", self.val)):
            h.update(split.encode())
            for f in files:
                h.update(bytes.fromhex(f.digest))
        return h.hexdigest()


def default_roots() -> list[Path]:
    """The running interpreter's standard library and site-packages directories."""
    paths = sysconfig.get_paths()
    roots = [Path(paths[key]) for key in ("stdlib", "purelib", "platlib")]
    roots += [Path(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    unique: list[Path] = []
    for root in roots:
        root = root.resolve()
        if root.is_dir() and root not in unique:
            unique.append(root)
    return unique


def is_validation(digest: str, val_per_mille: int) -> bool:
    """The split rule: depends on the file's content hash only."""
    return int(digest[:8], 16) % 1000 < val_per_mille


def _root_label(root: Path, stdlib: Path) -> str:
    if root == stdlib:
        return "stdlib"
    if root.name in ("site-packages", "dist-packages"):
        return root.name
    return root.name or "root"


def find_source_files(roots: Iterable[Path]) -> list[tuple[str, Path]]:
    """(display path, file path) of every *.py file under the roots, sorted by display path."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    found: dict[str, Path] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ParadecError(f"corpus root {str(root)!r} is not a directory")
        label = _root_label(root.resolve(), stdlib)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = Path(dirpath).relative_to(root)
            for name in filenames:
                if name.endswith(".py"):
                    found.setdefault(str(Path(label) / rel / name), Path(dirpath) / name)
    return sorted(found.items())


def _read(path: Path) -> tuple[bytes, str] | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data, hashlib.sha1(data).hexdigest()


def _is_source(text: str) -> bool:
    if len(text) < MIN_FILE_CHARS or "\x00" in text:
        return False
    return max(map(len, text.splitlines()), default=0) <= MAX_LINE_CHARS


def load_corpus(
    roots: Iterable[Path] | None = None,
    *,
    max_chars: int,
    val_per_mille: int = 20,
    workers: int | None = None,
    progress: bool = True,
) -> Corpus:
    """Read, deduplicate, filter, cap and split the Python files under `roots` (default: `default_roots()`)."""
    roots = default_roots() if roots is None else [Path(r) for r in roots]
    listing = find_source_files(roots)
    if not listing:
        raise ParadecError(f"no .py files under {[str(r) for r in roots]}")
    seen: set[str] = set()
    kept: list[SourceFile] = []
    duplicates = skipped = 0
    with ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1)) as pool:
        results = pool.map(_read, [path for _, path in listing], chunksize=64)
        bar = tqdm(results, total=len(listing), desc="reading corpus", unit="file", disable=not progress)
        for (display, _), result in zip(listing, bar):
            if result is None:
                skipped += 1
                continue
            data, digest = result
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            if not _is_source(text):
                skipped += 1
                continue
            kept.append(SourceFile(display, digest, text))
    total_chars = 0
    capped: list[SourceFile] = []
    for f in sorted(kept, key=lambda f: f.digest):
        if total_chars + len(f.text) > max_chars and capped:
            break
        capped.append(f)
        total_chars += len(f.text)
    capped.sort(key=lambda f: f.path)
    train = [f for f in capped if not is_validation(f.digest, val_per_mille)]
    val = [f for f in capped if is_validation(f.digest, val_per_mille)]
    if not train or not val:
        raise ParadecError(
            f"the corpus under {[str(r) for r in roots]} has {len(train)} train and {len(val)} validation files; "
            "it needs at least one of each (add files or raise val_per_mille)"
        )
    stats = {
        "roots": [str(r) for r in roots],
        "files_found": len(listing),
        "files_duplicate": duplicates,
        "files_skipped": skipped,
        "files_unique_kept": len(kept),
        "files": len(capped),
        "chars": total_chars,
        "max_chars": max_chars,
        "train_files": len(train),
        "val_files": len(val),
        "train_chars": sum(len(f.text) for f in train),
        "val_chars": sum(len(f.text) for f in val),
        "val_per_mille": val_per_mille,
    }
    return Corpus(train=train, val=val, stats=stats)
