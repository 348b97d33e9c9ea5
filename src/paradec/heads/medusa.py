"""Medusa heads (Cai et al. 2024): K small heads on the target's last hidden state, head k predicting the token
k + 2 places ahead, and the static token tree they are verified as.

The target's hidden state h_t (after the final norm, at the last token it has scored) gives the next token x_{t+1}
through its LM head; that token is the pending token of the decode loop. Head k turns h_t into a guess at
x_{t+2+k}:

    logits_k = lm_head(h_t + SiLU(W_k h_t + b_k))        W_k starts at zero: every head starts as the LM head

The LM head is the target's own (shared, frozen), so a head costs H * (H + 1) parameters.

The static tree lists root-to-node *rank paths*: the node (r_0, ..., r_{d-1}) carries the r_{d-1}-th most likely
token of head d - 1 and hangs below the node (r_0, ..., r_{d-2}). Siblings differ in rank, so their tokens are
distinct. `best_tree` picks the paths with the highest estimated probability of being accepted, the product of
the per-head top-k accuracies measured on validation data (the greedy construction of the Medusa paper, which
assumes the heads are right independently); the expected number of accepted tokens is the sum of those products.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from paradec.errors import ParadecError

RankPath = tuple[int, ...]


def default_accuracies(num_heads: int, ranks: int) -> list[list[float]]:
    """A prior for an untrained tree: head k's top-1 is right with probability 0.6 * 0.8^k, rank r decays as 2^-r."""
    return [[0.6 * 0.8**k * 0.5**r for r in range(ranks)] for k in range(num_heads)]


def best_tree(accuracy: Sequence[Sequence[float]], nodes: int) -> tuple[tuple[RankPath, ...], float]:
    """The `nodes` rank paths of highest accuracy product, parents before children, and their expected accepted
    length (the sum of the products). `accuracy[k][r]`: probability that rank r of head k is the right token."""
    if nodes < 1:
        raise ParadecError(f"a Medusa tree needs at least 1 node, got {nodes}")
    heap: list[tuple[float, RankPath]] = [(-float(a), (r,)) for r, a in enumerate(accuracy[0])]
    heapq.heapify(heap)
    paths: list[RankPath] = []
    expected = 0.0
    while heap and len(paths) < nodes:
        neg_prob, path = heapq.heappop(heap)  # a child is pushed only once its parent is taken: parents come first
        paths.append(path)
        expected -= neg_prob
        if len(path) < len(accuracy):
            for r, a in enumerate(accuracy[len(path)]):
                heapq.heappush(heap, (neg_prob * float(a), (*path, r)))
    return tuple(paths), expected


@dataclass(frozen=True)
class TreeLayout:
    """A rank-path tree as a proposal shape: node i takes the token `top.view(-1)[flat_index[i]]` of the heads'
    top-`ranks` table `top` [K, ranks] and hangs below node `parents[i]` (-1 = the pending token)."""

    parents: tuple[int, ...]
    flat_index: tuple[int, ...]  # head * ranks + rank
    ranks: int


def tree_layout(paths: Sequence[RankPath], max_depth: int, max_nodes: int) -> TreeLayout:
    """The first `max_nodes` paths no deeper than `max_depth`, as parents and flat top-k indices."""
    kept = [p for p in paths if len(p) <= max_depth][:max_nodes]
    index = {p: i for i, p in enumerate(kept)}
    ranks = 1 + max((r for p in kept for r in p), default=0)
    parents = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in kept)
    flat = tuple((len(p) - 1) * ranks + p[-1] for p in kept)
    return TreeLayout(parents=parents, flat_index=flat, ranks=ranks)


@dataclass(frozen=True)
class MedusaConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    tree: tuple[RankPath, ...] = field(default=())  # () -> best_tree(default_accuracies(...), 64)

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ParadecError(f"Medusa num_heads must be an integer >= 1, got {self.num_heads!r}")
        tree = (
            tuple(tuple(int(r) for r in p) for p in self.tree)
            or best_tree(default_accuracies(self.num_heads, 8), 64)[0]
        )
        seen: set[RankPath] = set()
        for path in tree:
            if not path or len(path) > self.num_heads or min(path) < 0 or (len(path) > 1 and path[:-1] not in seen):
                raise ParadecError(f"bad Medusa tree path {list(path)} (depth 1..{self.num_heads}, parents first)")
            seen.add(path)
        object.__setattr__(self, "tree", tree)

    def to_dict(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "tree": [list(p) for p in self.tree],
        }


class ResBlock(nn.Module):
    """h + SiLU(W h + b), starting as the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    kind = "medusa"
    config_class = MedusaConfig

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(ResBlock(config.hidden_size) for _ in range(config.num_heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> each head's predicted hidden state [K, ..., H] (to be read by the LM head)."""
        return torch.stack([block(hidden) for block in self.blocks])

    def logits(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], lm_head [V, H] -> logits [K, ..., V]."""
        return self(hidden) @ lm_head.t()
