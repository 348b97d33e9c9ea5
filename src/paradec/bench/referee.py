"""Telling rounding from a verification bug when a greedy output differs from vanilla's.

In bf16 or fp16 the target's logits depend on how many inputs a forward scores (the matrix-product and attention
kernels, and so the order of their sums, change with the shape). Scoring a tree of 49 inputs therefore rounds
differently from scoring one, and where the model's two best tokens are nearly tied a lossless method can pick the
other one. That is not a verification bug, but it must not be waved through either: the referee checks every
mismatch against the model in a higher precision.

At a mismatch's first differing position both outputs share the context (prompt + vanilla's tokens before it). The
referee scores that context with `transformers` (its own implementation, not paradec's runner) in float32 (float64
when the engine already runs float32) and calls the mismatch a *near-tie* only when both tokens, vanilla's and the
method's, lie within `TIE_ULPS` machine epsilons of the engine's dtype (relative to the top logit) of the referee's
best logit. A bug that accepts a wrong token gives a token far below the top and stays a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIE_ULPS = 2.0  # how many epsilons of the engine's dtype (relative to the top logit) still count as a tie


@dataclass
class Ruling:
    """The referee's view of one mismatch: the two tokens' logits and the best logit in its precision."""

    vanilla_token: int
    method_token: int
    vanilla_logit: float
    method_logit: float
    top_logit: float
    tolerance: float
    reference_dtype: str

    @property
    def near_tie(self) -> bool:
        return max(self.top_logit - self.vanilla_logit, self.top_logit - self.method_logit) <= self.tolerance

    def text(self) -> str:
        return (
            f"{self.reference_dtype} logits: vanilla's token {self.vanilla_token} {self.vanilla_logit:.4f}, the "
            f"method's {self.method_token} {self.method_logit:.4f}, best {self.top_logit:.4f} (tie tolerance "
            f"{self.tolerance:.4f})"
        )


def tolerance(top_logit: float, dtype: torch.dtype) -> float:
    """Logit gap that rounding in `dtype` can explain: TIE_ULPS epsilons at the scale of the top logit."""
    return TIE_ULPS * torch.finfo(dtype).eps * max(abs(top_logit), 1.0)


def rule(logits: torch.Tensor, vanilla_token: int, method_token: int, dtype: torch.dtype) -> Ruling:
    """A ruling from the referee's next-token `logits` [V] at the first differing position."""
    logits = logits.double()
    top = float(logits.max())
    return Ruling(
        vanilla_token=vanilla_token,
        method_token=method_token,
        vanilla_logit=float(logits[vanilla_token]),
        method_logit=float(logits[method_token]),
        top_logit=top,
        tolerance=tolerance(top, dtype),
        reference_dtype=str(logits_dtype(dtype)).removeprefix("torch."),
    )


def logits_dtype(engine_dtype: torch.dtype) -> torch.dtype:
    """The referee's precision: float32 for a half-precision engine, float64 for a float32 one."""
    return torch.float64 if torch.finfo(engine_dtype).bits >= 32 else torch.float32


class Referee:
    """Scores contexts with the engine's target model loaded through `transformers` in a higher precision (on
    first use; a bench without mismatches never loads it)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.dtype = engine.target.dtype
        self._model = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.engine.config.model, dtype=logits_dtype(self.dtype))
            self._model = model.to(self.engine.target.device).eval()
        return self._model

    @torch.inference_mode()
    def rule(self, context: list[int], vanilla_token: int, method_token: int) -> Ruling:
        model = self._load()
        ids = torch.tensor([context], device=model.device)
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        return rule(logits, vanilla_token, method_token, self.dtype)
