"""`vanilla`: no draft at all; every step scores the pending token alone (plain autoregressive decoding)."""

from __future__ import annotations

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter
from paradec.types import Proposal


@register
class Vanilla(Drafter):
    name = "vanilla"
    drafts = False
    idle_skips_propose = True
    _empty: Proposal | None = None  # its one proposal, made on first use (each step would make the same again)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        if self._empty is None:
            self._empty = Proposal.empty(state.device)
        return self._empty
