"""Trained drafting heads that sit on a target model: Medusa heads and the EAGLE-style feature head.

Owns the head modules, their on-disk format and loading them next to a target runner. A heads directory holds
one sub-directory per kind, each written by `paradec train <kind>`:

    HEADS/medusa/  config.json (kind + config, the static tree included)  model.safetensors  card.json
    HEADS/eagle/   config.json  model.safetensors  card.json

Heads share the target's token embedding and LM head instead of owning copies; runners lend them through
`embed_weight()` and `lm_head_weight()` (both [V, H]). An EAGLE head with a reduced draft vocabulary owns a small LM
head [N, H] and its draft -> target id map `d2t` [N] (int64, kept as it is in the weights file); heads written
before there was one (no `draft_vocab_size` in their config) load as full-vocabulary heads; likewise heads without
`feature_layers` (EAGLE-1/2: no `fc_fuse` weights) read the target's last hidden state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paradec.errors import ParadecError
from paradec.heads.eagle import EagleConfig, EagleHead, check_draft_map
from paradec.heads.medusa import MedusaConfig, MedusaHeads
from paradec.runners.base import Runner

HEAD_CLASSES: dict[str, type[nn.Module]] = {"medusa": MedusaHeads, "eagle": EagleHead}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _check_kind(kind: str) -> type[nn.Module]:
    if kind not in HEAD_CLASSES:
        raise ParadecError(f"unknown head kind {kind!r} (choose from {', '.join(HEAD_CLASSES)})")
    return HEAD_CLASSES[kind]


def heads_path(kind: str, heads_dir: str | Path) -> Path:
    """The directory holding heads of `kind`: `heads_dir/<kind>/`, or `heads_dir` itself if it is one."""
    _check_kind(kind)
    root = Path(heads_dir)
    for candidate in (root / kind, root):
        config = candidate / CONFIG_FILE
        if config.is_file() and _read_json(config).get("kind") == kind:
            return candidate
    raise ParadecError(
        f"heads directory {str(heads_dir)!r} has no {kind} heads (no {kind}/{CONFIG_FILE}); "
        f"train them with `paradec train {kind} --model MODEL --out {heads_dir}`"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ParadecError(f"cannot read {str(path)!r}: {exc}") from exc


def save_heads(module: nn.Module, out_dir: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write `module` (MedusaHeads | EagleHead) to `out_dir` (created): its config, its weights in `dtype` (integer
    buffers, such as the EAGLE head's id map, as they are)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"kind": module.kind, "config": module.config.to_dict()}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in module.state_dict().items()
    }
    save_file(tensors, str(out / WEIGHTS_FILE))
    return out


def read_config(kind: str, heads_dir: str | Path) -> MedusaConfig | EagleConfig:
    cls = _check_kind(kind)
    path = heads_path(kind, heads_dir)
    raw = _read_json(path / CONFIG_FILE).get("config", {})
    try:
        return cls.config_class(**raw)
    except TypeError as exc:
        raise ParadecError(f"bad {kind} heads config in {str(path)!r}: {exc}") from exc


def load_heads(
    kind: str, heads_dir: str | Path, *, hidden_size: int, vocab_size: int, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Heads of `kind` from `heads_dir`, checked against the target's width and vocabulary, frozen, in eval mode."""
    cls = _check_kind(kind)
    config = read_config(kind, heads_dir)
    path = heads_path(kind, heads_dir)
    if (config.hidden_size, config.vocab_size) != (hidden_size, vocab_size):
        raise ParadecError(
            f"{kind} heads in {str(path)!r} were trained for hidden size {config.hidden_size} and vocabulary "
            f"{config.vocab_size}, but the target has {hidden_size} and {vocab_size}"
        )
    module = cls(config)
    try:
        module.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except (OSError, RuntimeError) as exc:
        raise ParadecError(f"cannot load {kind} heads weights from {str(path)!r}: {exc}") from exc
    if isinstance(module, EagleHead) and module.d2t is not None:  # ids index the target's embedding: check them once
        check_draft_map(module.d2t, config, f"{kind} heads in {str(path)!r}")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def target_weights(runner: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embedding [V, H], LM head [V, H]) of a target runner."""
    if not (hasattr(runner, "embed_weight") and hasattr(runner, "lm_head_weight")):
        raise ParadecError(
            f"the {type(runner).__name__} runner does not lend its embedding and LM head to trained heads "
            "(embed_weight() / lm_head_weight())"
        )
    return runner.embed_weight(), runner.lm_head_weight()


__all__ = [
    "HEAD_CLASSES",
    "EagleConfig",
    "EagleHead",
    "MedusaConfig",
    "MedusaHeads",
    "heads_path",
    "load_heads",
    "read_config",
    "save_heads",
    "target_weights",
]
