"""The step seam: one record owns the layout of one target forward over B sequences.

A step scores, for each sequence b of the batch, its pending token, its proposal's nodes and its auxiliary inputs,
flattened back to back (no padding to a common length):

    flat inputs:  [ pending_0 nodes_0 aux_0 | pending_1 nodes_1 aux_1 | ... ]
    offsets:      [ 0,                      n_0,                     n_0 + n_1, ..., N ]

Within sequence b, input j sits at position `length_b + depth_b[j]` (length_b: the sequence's committed cache) and
attends to the sequence's committed cache and to the inputs `mask_b[j]` allows: never to another sequence's inputs
or cache. Row `offsets[b] + j` of the forward's logits (and hidden states) belongs to input j of sequence b.

Who reads what (nobody else does the arithmetic):
- the runner: `tokens`, `depth`, `offsets`, `slots`, `masks` (its forward); `keeps` (its commit);
- the verifier: `verify_rows(b)` (the pending token and the nodes: the rows a verdict is decided on), `tree(b)`;
- the drafters: `rows(b)` / `split` (every row of the sequence, aux inputs included: `DecodeState.target_logits`) and
  `kept_rows(b, verdict)` (the committed inputs' rows: `DecodeState.target_hidden`);
- the decode loops: `keep(verdict)` (the input indices a verdict commits, per sequence).

B = 1 is the same record (`Step.single`), which the single-sequence loop uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch

from paradec.tree import TreeBuffers
from paradec.types import Proposal, Verdict


@dataclass(frozen=True)
class SeqInputs:
    """One sequence's part of a step."""

    slot: int  # the runner's cache slot of the sequence (0 for a single-sequence runner)
    tokens: torch.Tensor  # [n] int64 on the device: pending token, proposal nodes, auxiliary inputs
    tree: TreeBuffers  # the layout of those n inputs (aux included): depth [n], mask [n, n]; its tree part walks
    proposal: Proposal

    @staticmethod
    def of(slot: int, pending: torch.Tensor, proposal: Proposal, device: torch.device | str) -> SeqInputs:
        """The inputs of `proposal` after the pending token ([1] on the device)."""
        tree = proposal.tree(device)
        pieces = [pending, proposal.tokens] if proposal.size else [pending]  # (no cat of an empty proposal: a kernel)
        if proposal.aux is not None:
            pieces.append(proposal.aux.tokens)
            tree = tree.with_aux(proposal.aux.depth, proposal.aux.mask)
        return SeqInputs(slot, torch.cat(pieces) if len(pieces) > 1 else pending, tree, proposal)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


class Step:
    """The flat layout of one forward over `seqs` (see the module docstring)."""

    def __init__(self, seqs: Sequence[SeqInputs]) -> None:
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        slots = [s.slot for s in seqs]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a step scores each cache slot once, got slots {slots}")
        self.seqs = tuple(seqs)
        self.sizes: tuple[int, ...] = tuple(s.size for s in seqs)  # n_b: each sequence's inputs
        self.offsets = (0, *accumulate(self.sizes))

    @staticmethod
    def single(pending: torch.Tensor, proposal: Proposal, device: torch.device | str, slot: int = 0) -> Step:
        return Step([SeqInputs.of(slot, pending, proposal, device)])

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def size(self) -> int:
        """N: the forward's inputs, all sequences together."""
        return self.offsets[-1]

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(s.slot for s in self.seqs)

    @cached_property
    def tokens(self) -> torch.Tensor:
        """[N] int64: every sequence's inputs, back to back."""
        return self.seqs[0].tokens if len(self.seqs) == 1 else torch.cat([s.tokens for s in self.seqs])

    @cached_property
    def depth(self) -> torch.Tensor:
        """[N] int64: each input's position offset from its sequence's committed length."""
        return self.seqs[0].tree.depth if len(self.seqs) == 1 else torch.cat([s.tree.depth for s in self.seqs])

    @property
    def masks(self) -> tuple[torch.Tensor, ...]:
        """Per sequence [n_b, n_b] bool: what each of its inputs attends to among the sequence's own inputs."""
        return tuple(s.tree.mask for s in self.seqs)

    def tree(self, b: int) -> TreeBuffers:
        return self.seqs[b].tree

    def proposal(self, b: int) -> Proposal:
        return self.seqs[b].proposal

    def rows(self, b: int) -> slice:
        """Sequence b's rows of the forward's outputs: every input, aux inputs included."""
        return slice(self.offsets[b], self.offsets[b + 1])

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every sequence's rows of a forward's output ([N, ...]), as `rows(b)` slices them: views, in one call."""
        return (rows,) if len(self.seqs) == 1 else rows[: self.size].split(self.sizes)

    def verify_rows(self, b: int) -> slice:
        """Sequence b's rows the verifier decides on: the pending token and the proposal nodes."""
        start = self.offsets[b]
        return slice(start, start + 1 + self.seqs[b].proposal.size)

    @staticmethod
    def keep(verdict: Verdict) -> list[int]:
        """The input indices (within the sequence) a verdict commits: the pending token and the accepted path."""
        return [0, *(i + 1 for i in verdict.path)]

    def kept_rows(self, b: int, verdict: Verdict) -> list[int]:
        """The flat rows of the inputs sequence b commits (hidden states of the committed inputs)."""
        start = self.offsets[b]
        return [start + i for i in self.keep(verdict)]
