"""Token-tree buffers: built once per tree shape on the host, or by the drafter on the device.

A proposal of n nodes is scored in one target forward over n + 1 inputs: index 0 is the pending token (the
tree's root, already emitted but not yet in the KV cache) and index i + 1 is node i. A chain is the tree whose
node i has parent i - 1.

Buffers (all indexed by forward input index 0..n):
- `depth`    [n+1]      root 0, its children 1, ...; the position of input j is `cache_length + depth[j]`.
- `mask`     [n+1, n+1] bool, True where input j may attend to input k: k is j itself or one of j's ancestors.
                        Every input also attends to the whole committed cache (the runner adds that part).
- `parent`   [n+1]      parent input index (-1 for the root).
- `paths`    root-to-leaf input-index tuples (for tests and for "score every path separately"); host trees only.

Two ways to get them:
- `build_tree(parents)`: from host parents (chains, tries, static trees). Cached per shape; a new shape costs
  O(n) Python steps (rows are copied as bytes) and one host-to-device copy.
- `device_tree(parents_tensor, max_depth)`: from a tensor of node parents that lives on the device, with device
  ops only, so a drafter can build its tree inside its own CUDA graph and the step needs no host sync before the
  target forward (EAGLE's dynamic tree). Its host `parents` is None: the verifier reads the parents together with
  its verdict, in the step's one sync.

`with_aux` appends auxiliary inputs (scored, never accepted; see `types.AuxInputs`) after the tree's inputs: the
result's `mask` and `depth` cover all inputs, while `parents`, `parent` and `paths` still describe the tree part
that the verifier walks (and `max_depth` its depth). Runners read only `mask`, `depth`, `size`, `parents` (None =
unknown on the host) and `is_chain`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import torch

from paradec.errors import ParadecError


@dataclass(frozen=True)
class TreeBuffers:
    parents: tuple[int, ...] | None  # [n] proposal-node parents (-1 = root); None: on the device only (`parent`)
    depth: torch.Tensor  # [n+1] int64
    mask: torch.Tensor  # [n+1, n+1] bool
    parent: torch.Tensor  # [n+1] int64, -1 for the root
    max_depth: int  # the deepest node's depth (a device tree: an upper bound)

    @property
    def size(self) -> int:
        """Number of forward inputs (root and auxiliary inputs included)."""
        return int(self.depth.shape[0])

    @property
    def nodes(self) -> int:
        """Number of proposal nodes (auxiliary inputs excluded)."""
        return int(self.parent.shape[0]) - 1

    @property
    def on_host(self) -> bool:
        return self.parents is not None

    @property
    def is_chain(self) -> bool:
        return (
            self.parents is not None
            and self.size == len(self.parents) + 1
            and self.parents == tuple(range(-1, len(self.parents) - 1))
        )

    def host_parents(self) -> tuple[int, ...]:
        """The node parents on the host (for a device tree: read from the device, a sync)."""
        if self.parents is not None:
            return self.parents
        return tuple(p - 1 for p in self.parent[1:].tolist())

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Root-to-leaf input-index paths, each starting with 0 (host trees only)."""
        if self.parents is None:
            raise ValueError("paths of a device tree: its parents are not on the host")
        parent = [-1] + [p + 1 for p in self.parents]
        has_child = [False] * len(parent)
        for p in parent[1:]:
            has_child[p] = True
        paths = []
        for j in range(len(parent)):
            if not has_child[j]:
                path, k = [], j
                while k >= 0:
                    path.append(k)
                    k = parent[k]
                paths.append(tuple(reversed(path)))
        return tuple(paths)

    def to(self, device: torch.device | str) -> TreeBuffers:
        return replace(self, depth=self.depth.to(device), mask=self.mask.to(device), parent=self.parent.to(device))

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
        return replace(self, depth=depth, mask=mask)


def build_tree(parents: tuple[int, ...] | list[int], device: torch.device | str = "cpu") -> TreeBuffers:
    """Buffers for a tree given each node's parent node index (-1 = the root). Cached per (shape, device)."""
    return _build(tuple(int(p) for p in parents), str(torch.device(device)))


def chain_parents(n: int) -> tuple[int, ...]:
    return tuple(range(-1, n - 1))


@lru_cache(maxsize=256)
def chain_tree(nodes: int, device: torch.device | str = "cpu") -> TreeBuffers:
    """`build_tree(chain_parents(nodes), device)`, looked up by length (a chain proposal's tree, every step)."""
    return build_tree(chain_parents(nodes), device)


@lru_cache(maxsize=1024)
def _build(parents: tuple[int, ...], device: str) -> TreeBuffers:
    n1 = len(parents) + 1
    parent = [-1] + [p + 1 for p in parents]  # input-index parents
    depth = [0] * n1
    rows = bytearray(n1 * n1)  # the mask, row-major; row j = its parent's row plus j itself
    rows[0] = 1
    for j in range(1, n1):
        p = parent[j]
        if not (0 <= p < j):
            raise ParadecError(f"tree node {j - 1} has parent {parents[j - 1]}; parents must precede their children")
        depth[j] = depth[p] + 1
        rows[j * n1 : (j + 1) * n1] = rows[p * n1 : (p + 1) * n1]
        rows[j * n1 + j] = 1
    # one host-to-device copy: [depth | parent | mask]
    packed = torch.cat([torch.tensor(depth + parent), torch.frombuffer(rows, dtype=torch.uint8).long()]).to(device)
    return TreeBuffers(
        parents=parents,
        depth=packed[:n1],
        mask=packed[2 * n1 :].view(n1, n1).bool(),
        parent=packed[n1 : 2 * n1],
        max_depth=max(depth),
    )


def device_tree(parents: torch.Tensor, max_depth: int) -> TreeBuffers:
    """Buffers for the tree whose node i hangs below node `parents[i]` (-1 = the root), a [n] int64 tensor that
    may live on the device, where parents precede their children and no node is deeper than `max_depth`.
    Device ops only, fixed shapes, no host sync (capturable in a CUDA graph); see `device_tree_tensors`."""
    depth, mask, parent = device_tree_tensors(parents, max_depth)
    return TreeBuffers(parents=None, depth=depth, mask=mask, parent=parent, max_depth=max_depth)


def device_tree_tensors(parents: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(depth [n+1], mask [n+1, n+1], parent [n+1]) of `device_tree`, as plain tensors (so a compiled drafter
    can build them inside its own graph); parents [..., n] give them for each tree of a batch ([..., n+1], ...).
    The mask is filled by walking every input up `max_depth` times at once (the root is its own parent, so finished
    walks stay on it)."""
    device, lead = parents.device, parents.shape[:-1]
    n1 = int(parents.shape[-1]) + 1
    parent = torch.cat([parents.new_full((*lead, 1), -1), parents + 1], -1)  # input-index parents
    up = parent.clamp_min(0)  # the root's "parent" is itself
    columns = torch.arange(n1, device=device)
    mask = (columns[:, None] == columns).expand(*lead, n1, n1).clone()  # every input attends to itself
    ancestor = up
    for _ in range(max_depth):
        mask |= ancestor[..., None] == columns
        ancestor = up.gather(-1, ancestor)
    return mask.sum(-1) - 1, mask, parent
