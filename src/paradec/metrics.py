"""Per-generation statistics: steps, τ, acceptance by position, timings.

A *step* is one target forward that scores a proposal. τ (tau) = new tokens / steps (vanilla: 1).
Acceptance by position i = share of steps whose accepted path reached draft position i (depth i + 1 in a tree).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target forwards after the prefill
    proposed_tokens: int = 0  # draft tokens scored, all steps
    accepted_tokens: int = 0  # draft tokens accepted, all steps
    accepted_at: list[int] = field(default_factory=list)  # [i] = steps that accepted draft position i
    proposed_at: list[int] = field(default_factory=list)  # [i] = steps that proposed a draft position i
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0  # prefill + decode, as the caller saw it
    first_token_seconds: float = 0.0  # time to the first emitted token
    finish_reason: str = ""

    def record_step(self, proposed_depth: int, proposed_size: int, accepted: int) -> None:
        self.steps += 1
        self.proposed_tokens += proposed_size
        self.accepted_tokens += accepted
        bump(self.proposed_at, proposed_depth)
        bump(self.accepted_at, accepted)

    @property
    def tau(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / self.steps for a in self.accepted_at] if self.steps else []

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            tau=self.tau,
            acceptance_by_position=self.acceptance_by_position,
            acceptance_rate=self.acceptance_rate,
            tokens_per_second=self.tokens_per_second,
        )
        return out

    def summary(self) -> str:
        return (
            f"[{self.method}] {self.new_tokens} tokens in {self.steps} steps, tau {self.tau:.2f}, "
            f"{self.tokens_per_second:.1f} tok/s, {self.wall_seconds:.2f} s, finish: {self.finish_reason}"
        )


def bump(counts: list[int], upto: int) -> None:
    """counts[i] += 1 for i < upto."""
    if len(counts) < upto:
        counts.extend([0] * (upto - len(counts)))
    for i in range(upto):
        counts[i] += 1
