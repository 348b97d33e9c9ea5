"""Token-tree buffers, built once per tree shape.

A proposal of n nodes is scored in one target forward over n + 1 inputs: index 0 is the pending token (the
tree's root, already emitted but not yet in the KV cache) and index i + 1 is node i. A chain is the tree whose
node i has parent i - 1.

Buffers (all indexed by forward input index 0..n):
- `depth`    [n+1]      root 0, its children 1, ...; the position of input j is `cache_length + depth[j]`.
- `mask`     [n+1, n+1] bool, True where input j may attend to input k: k is j itself or one of j's ancestors.
                        Every input also attends to the whole committed cache (the runner adds that part).
- `parent`   [n+1]      parent input index (-1 for the root).
- `paths`    tuple of root-to-leaf input-index tuples (for tests and for "score every path separately").

`with_aux` appends auxiliary inputs (scored, never accepted; see `types.AuxInputs`) after the tree's inputs: the
result's `mask` and `depth` cover all inputs, while `parents`, `parent` and `paths` still describe the tree part
that the verifier walks (and `max_depth` its depth). Runners read only `mask`, `depth`, `size` and `is_chain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from paradec.errors import ParadecError


@dataclass(frozen=True)
class TreeBuffers:
    parents: tuple[int, ...]  # [n] proposal-node parents (-1 = root), as given
    depth: torch.Tensor  # [n+1] int64
    mask: torch.Tensor  # [n+1, n+1] bool
    parent: torch.Tensor  # [n+1] int64, -1 for the root
    paths: tuple[tuple[int, ...], ...]  # root-to-leaf input indices, each starting with 0
    max_depth: int

    @property
    def size(self) -> int:
        """Number of forward inputs (root and auxiliary inputs included)."""
        return int(self.depth.shape[0])

    @property
    def is_chain(self) -> bool:
        return self.size == len(self.parents) + 1 and self.parents == tuple(range(-1, len(self.parents) - 1))

    def with_aux(self, aux_depth: torch.Tensor, aux_mask: torch.Tensor) -> TreeBuffers:
        """These buffers plus m auxiliary inputs: `aux_depth` [m], `aux_mask` [m, size + m] (see the module doc)."""
        m = int(aux_depth.shape[0])
        n1 = self.size
        if aux_mask.shape != (m, n1 + m):
            raise ValueError(f"aux mask of shape {tuple(aux_mask.shape)}, expected {(m, n1 + m)}")
        device = self.mask.device
        mask = torch.zeros(n1 + m, n1 + m, dtype=torch.bool, device=device)
        mask[:n1, :n1] = self.mask
        mask[n1:] = aux_mask.to(device)
        depth = torch.cat([self.depth, aux_depth.to(device)])
        # max_depth stays the verified tree's (reading the aux depth would cost a host sync)
        return TreeBuffers(self.parents, depth, mask, self.parent, self.paths, self.max_depth)


def build_tree(parents: tuple[int, ...] | list[int], device: torch.device | str = "cpu") -> TreeBuffers:
    """Buffers for a tree given each node's parent node index (-1 = the root). Cached per (shape, device)."""
    return _build(tuple(int(p) for p in parents), str(torch.device(device)))


def chain_parents(n: int) -> tuple[int, ...]:
    return tuple(range(-1, n - 1))


@lru_cache(maxsize=256)
def _build(parents: tuple[int, ...], device: str) -> TreeBuffers:
    n = len(parents)
    parent = [-1] + [p + 1 for p in parents]  # input-index parents
    depth = [0] * (n + 1)
    for j in range(1, n + 1):
        p = parent[j]
        if not (0 <= p < j):
            raise ParadecError(f"tree node {j - 1} has parent {parents[j - 1]}; parents must precede their children")
        depth[j] = depth[p] + 1
    rows = []  # row j: input j's own row of the mask, from its parent's row (parents precede children)
    for j in range(n + 1):
        row = list(rows[parent[j]]) if j else [False] * (n + 1)
        row[j] = True
        rows.append(row)
    mask = torch.tensor(rows, dtype=torch.bool)
    has_child = [False] * (n + 1)
    for j in range(1, n + 1):
        has_child[parent[j]] = True
    paths = []
    for j in range(n + 1):
        if not has_child[j]:
            path, k = [], j
            while k >= 0:
                path.append(k)
                k = parent[k]
            paths.append(tuple(reversed(path)))
    return TreeBuffers(
        parents=parents,
        depth=torch.tensor(depth, dtype=torch.long, device=device),
        mask=mask.to(device),
        parent=torch.tensor(parent, dtype=torch.long, device=device),
        paths=tuple(paths),
        max_depth=max(depth),
    )
