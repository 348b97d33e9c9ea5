"""`jacobi`: Jacobi (fixed-point) iteration over a window of future positions; no draft model.

Greedy decoding of the next W tokens is the fixed point y_i = argmax p(· | prefix, y_1..y_{i-1}), i = 1..W.
Jacobi decoding (Santilli et al. 2023, "Accelerating Transformer Inference for Translation via Parallel
Decoding") iterates all W equations at once: guess the window, score it in one forward, and take each position's
argmax as the next guess for the position after it. A position whose whole left context was already right gets
its right token, so every iteration fixes at least one more token, and often several once the guesses settle.

Here one iteration is one speculative step: the window is proposed as a chain after the pending token, the
verifier accepts the prefix that matches the target (greedy: argmax; sampling: point masses, exact), and the
target's picks past the accepted prefix, which were computed from the old guesses, become the new window:

    inputs   [x, g1, g2, g3, g4]       x pending, g the window (W = 4); accepted g1, rejected g2
    picks    [p0, p1, p2, p3, p4]      p_j = argmax of the target's logits after input j
    emitted  g1, p1                    (the verifier's bonus/recovered token replaces g2)
    window   [p2, p3, p4, p4]          guesses for the positions after p1, padded with the last pick

The window lives on the device and is updated from the target's logits with device ops only: no host sync beyond
the decode loop's one per step. The first window repeats the last prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Resources
from paradec.drafters.options import Options, bound
from paradec.types import Proposal, Verdict


@dataclass(frozen=True)
class JacobiOptions(Options):
    method = "jacobi"
    window: int = field(default=8, metadata=bound(1, limit="proposal"))  # W: positions iterated (and proposed)


@register
class Jacobi(Drafter):
    name = "jacobi"
    options_class = JacobiOptions

    def __init__(self, resources: Resources, options: JacobiOptions) -> None:
        super().__init__(resources, options)
        self.guesses: torch.Tensor | None = None  # [W] int64 on the device
        self._proposed = 0

    def begin(self, state: DecodeState) -> None:
        self.guesses = torch.full((self.options.window,), state.tokens[-1], dtype=torch.long, device=state.device)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        self._proposed = max(min(self.options.window, max_tokens), 0)
        if self._proposed == 0:
            return Proposal.empty(state.device)
        return Proposal(tokens=self.guesses[: self._proposed])

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        k = self._proposed
        if k == 0:
            return
        picks = state.target_logits[: k + 1].argmax(-1)  # [k+1] the target's token after each input
        fresh = picks[verdict.accepted + 1 :]  # [k - accepted] guesses for the positions after the new pending token
        pad = picks[k:].expand(self.options.window - fresh.shape[0])
        self.guesses = torch.cat([fresh, pad])  # [W]
