"""`medusa`: Medusa heads on the target's last hidden state propose a static token tree (Cai et al. 2024).

Per step, the K heads read the target's hidden state at the last committed token (the one that produced the
pending token) and each lists its top candidates; the tree saved with the heads (`paradec.heads.medusa`) picks
the node tokens out of that [K, ranks] table with one gather. The tree's shape is fixed, so the proposal needs
no host synchronisation. Nodes are point masses (siblings are distinct ranks of one head): the verifier accepts
by token match, which is exact for greedy decoding and for sampling alike. Medusa's lossy "typical acceptance"
is deliberately not offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.base import LRU, DecodeState, Drafter, Method, Resources
from paradec.drafters.options import Options, bound
from paradec.heads import target_weights
from paradec.heads.medusa import TreeLayout, tree_layout
from paradec.types import Proposal

LAYOUTS_KEPT = 64  # tree layouts (one per depth x node budget met, near the context's end) kept per engine


@dataclass(frozen=True)
class MedusaOptions(Options):
    method = "medusa"
    # tree nodes scored per step: the first ones of the tree saved with the heads; None = all (up to the runner's step)
    nodes: int | None = field(default=None, metadata=bound(1, limit="tree"))


class MedusaMethod(Method):
    """Per engine: the heads, and the tree's layouts by (depth, nodes) as device buffers, built once each."""

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        super().__init__(resources, drafter_class)
        self.heads = resources.heads("medusa")
        self.layouts: LRU[tuple[int, int], tuple[TreeLayout, torch.Tensor]] = LRU(LAYOUTS_KEPT)
        self.depth = max(len(path) for path in self.heads.config.tree)  # the saved tree's deepest level

    def limits(self) -> dict[str, int]:
        limits = super().limits()
        return {**limits, "tree": min(len(self.heads.config.tree), limits["proposal"])}

    def layout(self, max_depth: int, max_nodes: int, device: torch.device) -> tuple[TreeLayout, torch.Tensor]:
        """The saved tree cut to `max_depth` levels and `max_nodes` nodes, and its gather index [n] on `device`."""
        max_depth = min(max_depth, self.depth)  # a deeper cut is the whole tree: one key for all of them

        def make() -> tuple[TreeLayout, torch.Tensor]:
            layout = tree_layout(self.heads.config.tree, max_depth, max_nodes)
            return layout, torch.tensor(layout.flat_index, dtype=torch.long, device=device)

        return self.layouts.get((max_depth, max_nodes), make)

    def open(self, options: MedusaOptions) -> Medusa:
        return Medusa(self, options)

    def open_for(self, resources: Resources, options: MedusaOptions) -> Medusa:
        return Medusa(self, options)  # the heads read the target's hidden states and weights only


@register
class Medusa(Drafter):
    name = "medusa"
    options_class = MedusaOptions
    method_class = MedusaMethod
    needs_hidden = True

    def __init__(self, method: MedusaMethod, options: MedusaOptions) -> None:
        super().__init__(method.resources, options)
        self.method = method
        self.heads = method.heads
        self.target = method.resources.target
        _, self.lm_head = target_weights(self.target)
        self.nodes = method.limits()["tree"] if options.nodes is None else options.nodes

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        return self.propose_all([self], [state], [max_tokens])[0]

    @classmethod
    def propose_all(cls, drafters: list[Drafter], states: list[DecodeState], max_tokens: list[int]) -> list[Proposal]:
        """Every sequence's tree from its last hidden state; the sequences of one tree layout (and heads) in one
        forward of the heads and one top-k for all of them (a batch's Medusa sequences: one head forward per step)."""
        proposals: list[Proposal | None] = [None] * len(drafters)
        groups: dict[tuple[int, int], tuple[TreeLayout, torch.Tensor, list[int]]] = {}
        for i, (d, state, m) in enumerate(zip(drafters, states, max_tokens, strict=True)):
            hidden = state.target_hidden
            # the forward scores 1 + n inputs after len(tokens) - 1 committed ones: stay inside the context
            nodes = min(d.nodes, d.target.max_length - len(state.tokens))
            if hidden is None or hidden.shape[0] == 0 or m < 1 or nodes < 1:
                proposals[i] = Proposal.empty(state.device)
                continue
            layout, flat = d.method.layout(m, nodes, state.device)
            groups.setdefault((id(d.method), id(layout)), (layout, flat, []))[2].append(i)
        for layout, flat, members in groups.values():
            first = drafters[members[0]]
            last = torch.stack([states[i].target_hidden[-1] for i in members])  # [B, H]
            top = first.heads.logits(last, first.lm_head).topk(layout.ranks, dim=-1).indices  # [K, B, ranks]
            tokens = top.transpose(0, 1).reshape(len(members), -1)[:, flat]  # [B, n]
            for row, i in enumerate(members):
                proposals[i] = Proposal(tokens=tokens[row], parents=layout.parents)
        return proposals
