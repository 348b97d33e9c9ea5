"""Configuration dataclasses: how to sample, and what the engine loads.

`SamplingParams` describes the *target* distribution that every method preserves: plain sampling from the
model's logits warped by temperature -> top-k -> top-p -> min-p (the order `transformers` applies them).
A temperature below GREEDY_EPSILON (0 included) means greedy: exact argmax, never a division by a tiny
temperature (which overflows the logits to inf/NaN: vLLM draws the same line at the same 1e-5).
Every bad value is a `ParadecError` whose `param` is the field's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from paradec.errors import ParadecError, shown

GREEDY_EPSILON = 1e-5  # temperatures in [0, GREEDY_EPSILON) decode greedily
# seeds torch's generators take, [-2**63, 2**64): torch maps a negative seed s to 2**64 - 1 + s, deterministically
SEED_RANGE = (-(2**63), 2**64)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # < GREEDY_EPSILON -> greedy (argmax)
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off; must lie in (0, 1]
    min_p: float = 0.0  # 0 -> off; must lie in [0, 1]
    seed: int | None = None  # None -> nondeterministic; else in SEED_RANGE

    def __post_init__(self) -> None:
        temperature, top_p, min_p = self.temperature, self.top_p, self.min_p
        if not _is_number(temperature) or math.isnan(temperature) or temperature < 0:
            raise ParadecError(f"temperature must be >= 0, got {shown(temperature)}", param="temperature")
        if math.isinf(temperature):
            raise ParadecError(f"temperature must be finite, got {shown(temperature)}", param="temperature")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ParadecError(f"top_k must be an integer >= 0, got {shown(self.top_k)}", param="top_k")
        if not _is_number(top_p) or not (0.0 < top_p <= 1.0):
            raise ParadecError(f"top_p must lie in (0, 1], got {shown(top_p)}", param="top_p")
        if not _is_number(min_p) or not (0.0 <= min_p <= 1.0):
            raise ParadecError(f"min_p must lie in [0, 1], got {shown(min_p)}", param="min_p")
        if self.seed is not None:
            low, high = SEED_RANGE
            if not _is_int(self.seed):
                raise ParadecError(f"seed must be an integer, got {shown(self.seed)}", param="seed")
            if not low <= self.seed < high:
                raise ParadecError(f"seed must lie in [-2**63, 2**64), got {shown(self.seed)}", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    """What `paradec.load` was asked for (kept on the engine for reports)."""

    model: str
    draft: str | None = None
    heads: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    runner: str = "hf"
    exact: bool = False  # the target runs the batch-invariant kernels (`paradec.kernels`)
    extra: dict = field(default_factory=dict)
