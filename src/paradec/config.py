"""Configuration dataclasses: how to sample, and what the engine loads.

`SamplingParams` describes the *target* distribution that every method preserves: plain sampling from the
model's logits warped by temperature -> top-k -> top-p -> min-p (the order `transformers` applies them).
`temperature == 0` means greedy: exact argmax, never a tiny temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from paradec.errors import ParadecError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off; must lie in (0, 1]
    min_p: float = 0.0  # 0 -> off; must lie in [0, 1]
    seed: int | None = None  # None -> nondeterministic

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise ParadecError(f"temperature must be >= 0, got {self.temperature!r}")
        if math.isinf(self.temperature):
            raise ParadecError(f"temperature must be finite, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ParadecError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ParadecError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not (0.0 <= self.min_p <= 1.0):
            raise ParadecError(f"min_p must lie in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ParadecError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineConfig:
    """What `paradec.load` was asked for (kept on the engine for reports)."""

    model: str
    draft: str | None = None
    heads: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    runner: str = "hf"
    extra: dict = field(default_factory=dict)
