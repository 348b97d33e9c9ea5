"""Resolving what the user named: a model (directory, `.gguf` file, zoo name or hub id), a device, a dtype,
a tokenizer.

Everything here raises `ParadecError` with the offending value on bad input: a missing or unreadable path, a hub
id that cannot be fetched, an unknown device or dtype. Real models and GGUF files are handled by
`paradec.zoo.fetch`, imported only when one is named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from paradec.errors import ParadecError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# what a checkpoint needs from a hub repository: config, weights, tokenizer files
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParadecError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParadecError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ParadecError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ParadecError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(sorted(set(DTYPES)))})")
    return DTYPES[dtype]


def resolve_model_dir(name: str | os.PathLike, what: str = "model") -> Path:
    """The checkpoint directory of what the user named, tried in this order:

    a `.gguf` file (converted once, cached by content hash), a local checkpoint directory, a real-model name of
    `paradec zoo list` (fetched when missing), the committed code pair's name (`code-8m`, `code-8m-draft`), a hub
    id (downloaded into the local hub cache).
    """
    text = os.fspath(name)
    if not text.strip():
        raise ParadecError(f"{what} path is empty")
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from paradec.zoo.fetch import gguf_checkpoint

        return gguf_checkpoint(path)
    if path.exists():
        if not path.is_dir():
            raise ParadecError(f"{what} path {text!r} is not a directory")
        config = path / "config.json"
        if not config.is_file():
            raise ParadecError(f"{what} path {text!r} has no config.json (not a Hugging Face checkpoint)")
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise ParadecError(f"{what} path {text!r}: cannot read config.json ({exc})") from exc
        return path
    from paradec.zoo import committed_model_dir
    from paradec.zoo.fetch import REAL_MODELS, fetch

    if text in REAL_MODELS:
        return fetch(text)
    committed = committed_model_dir(text)
    if committed is not None:
        return committed
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or text.lower().endswith(".gguf"):
        raise ParadecError(f"{what} path {text!r} does not exist")
    return _download(text, what)


def _download(repo_id: str, what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS))
    except Exception as exc:  # any hub/network failure becomes one clear message
        raise ParadecError(
            f"{what} {repo_id!r} is not a local directory and could not be fetched from the hub: {exc}"
        ) from exc
    return Path(local)


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ParadecError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc
