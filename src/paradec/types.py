"""The two records that cross the drafter -> verifier seam.

A `Proposal` is what a drafter offers: draft tokens arranged as a chain or a token tree, with the draft
distribution each token was *sampled* from when the drafter has one. A `Verdict` is what the verifier decides
after one target forward over [pending token, *proposal tokens]:

- accepted tokens: the draft tokens on the longest verified path;
- one more token from the target itself: the **bonus** token when the whole path was accepted up to a leaf
  with no matching child, or the **recovered** token resampled from the residual after a rejection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.tree import TreeBuffers, build_tree, chain_tree


@dataclass
class AuxInputs:
    """Extra inputs scored in the same target forward but never accepted (e.g. Lookahead decoding's lookahead
    branch). Their logits reach the drafter through `DecodeState.target_logits`; their KV is dropped at commit.

    Forward inputs are ordered [pending, proposal nodes (n), aux inputs (m)]."""

    tokens: torch.Tensor  # [m] int64
    depth: torch.Tensor  # [m] int64 position offsets from the pending token (which sits at offset 0)
    mask: torch.Tensor  # [m, 1 + n + m] bool: what each aux input attends to besides the committed prefix


@dataclass
class Proposal:
    """Draft tokens for one step.

    Node i of the proposal is scored at input index i + 1 of the target forward (index 0 is the pending token,
    the last emitted token whose KV is not yet cached). Its parent is `parents[i]` (-1 = the pending token).
    A chain has parents [-1, 0, 1, ...]. Siblings must carry distinct tokens.

    A drafter that builds its tree on the device (`paradec.tree.device_tree`) passes it as `layout` instead of
    `parents`: then no host sync is needed before the target forward, and the parents reach the host with the
    verifier's verdict.
    """

    tokens: torch.Tensor  # [n] int64, on the target's device
    parents: tuple[int, ...] | None = None  # [n] parent node index or -1; None = chain
    # [n, V] float32: the draft distribution node i was sampled from; None = point masses
    probs: torch.Tensor | None = None
    aux: AuxInputs | None = None  # inputs to score alongside but never to accept
    layout: TreeBuffers | None = None  # the tree, built on the device by the drafter (then `parents` is None)

    def __post_init__(self) -> None:
        if self.layout is not None and (self.parents is not None or self.layout.nodes != self.size):
            raise ValueError(f"a proposal of {self.size} tokens with a device layout of {self.layout.nodes} nodes")

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_chain(self) -> bool:
        return self.parents is None and self.layout is None

    def parent_list(self) -> tuple[int, ...]:
        if self.layout is not None:
            raise ValueError("the parents of a device-built tree are on the device only (see `layout`)")
        return tuple(range(-1, self.size - 1)) if self.parents is None else self.parents

    def tree(self, device: torch.device | str) -> TreeBuffers:
        """The tree's buffers: the drafter's own layout, or built (cached per shape) from the host parents."""
        if self.layout is not None:
            return self.layout
        return chain_tree(self.size, device) if self.parents is None else build_tree(self.parents, device)

    @staticmethod
    def empty(device: torch.device | str) -> Proposal:
        return Proposal(tokens=torch.empty(0, dtype=torch.long, device=device))


@dataclass
class Verdict:
    """The verifier's decision for one step (host values: read after the step's single sync)."""

    path: list[int]  # accepted proposal node indices, root to deepest, e.g. [0, 1, 2] for 3 accepted chain tokens
    tokens: list[int]  # emitted tokens: the accepted draft tokens then the bonus/recovered token (len(path) + 1)
    proposed: int  # number of draft tokens scored this step (the proposal's size)
    depth: int = 0  # depth of the proposal (chain length, or the deepest tree level)
    # [1] the last emitted token (bonus/recovered) still on the device: the next step's pending input, no upload
    final_device: torch.Tensor | None = None

    @property
    def accepted(self) -> int:
        return len(self.path)
