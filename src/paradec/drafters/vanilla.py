"""`vanilla`: no draft at all; every step scores the pending token alone (plain autoregressive decoding)."""

from __future__ import annotations

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter
from paradec.types import Proposal


@register
class Vanilla(Drafter):
    name = "vanilla"

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        return Proposal.empty(state.device)
