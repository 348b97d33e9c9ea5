"""`medusa`: Medusa heads on the target's last hidden state propose a static token tree (Cai et al. 2024).

Per step, the K heads read the target's hidden state at the last committed token (the one that produced the
pending token) and each lists its top candidates; the tree saved with the heads (`paradec.heads.medusa`) picks
the node tokens out of that [K, ranks] table with one gather. The tree's shape is fixed, so the proposal needs
no host synchronisation. Nodes are point masses (siblings are distinct ranks of one head): the verifier accepts
by token match, which is exact for greedy decoding and for sampling alike. Medusa's lossy "typical acceptance"
is deliberately not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Resources
from paradec.errors import ParadecError
from paradec.heads import target_weights
from paradec.heads.medusa import RankPath, TreeLayout, tree_layout
from paradec.types import Proposal


@dataclass(frozen=True)
class MedusaOptions:
    nodes: int = 64  # tree nodes scored per step (the first ones of the tree saved with the heads)

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ParadecError(f"medusa option nodes must be an integer >= 1, got {self.nodes!r}")


@lru_cache(maxsize=64)
def _layout(
    paths: tuple[RankPath, ...], max_depth: int, max_nodes: int, device: str
) -> tuple[TreeLayout, torch.Tensor]:
    layout = tree_layout(paths, max_depth, max_nodes)
    return layout, torch.tensor(layout.flat_index, dtype=torch.long, device=device)


@register
class Medusa(Drafter):
    name = "medusa"
    options_class = MedusaOptions
    needs_hidden = True

    def __init__(self, resources: Resources, options: MedusaOptions) -> None:
        super().__init__(resources, options)
        self.heads = resources.heads("medusa")
        self.target = resources.target
        _, self.lm_head = target_weights(self.target)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        hidden = state.target_hidden
        # the forward scores 1 + n inputs after len(tokens) - 1 committed ones: stay inside the context
        nodes = min(self.options.nodes, self.target.max_length - len(state.tokens))
        if hidden is None or hidden.shape[0] == 0 or max_tokens < 1 or nodes < 1:
            return Proposal.empty(state.device)
        layout, flat = _layout(self.heads.config.tree, max_tokens, nodes, str(state.device))
        logits = self.heads.logits(hidden[-1], self.lm_head)  # [K, V]
        top = logits.topk(layout.ranks, dim=-1).indices  # [K, ranks]
        return Proposal(tokens=top.reshape(-1)[flat], parents=layout.parents)
