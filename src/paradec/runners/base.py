"""The runner seam: the only code that owns model weights and a KV cache.

A runner holds one model and its cache for one sequence. Its cache holds the *committed* prefix
(`runner.length` tokens). `forward` scores new inputs placed after that prefix: a chain (positions
length, length+1, ...) or a token tree (positions length + depth, attention by `TreeBuffers.mask`). Their KV
entries are provisional until `commit` keeps the accepted ones, compacted into contiguous slots right after
the prefix, and drops the rest. `rollback` shortens the committed prefix (a length reset).

    prefix (committed)        provisional (last forward)
    [t0 t1 ... t(L-1)] | [x0 x1 x2 x3 ...]
    commit([0, 2]) ->  [t0 ... t(L-1) x0 x2]    length = L + 2

Drafters never touch the target's runner; a drafter that runs a model (a draft LM) owns a runner of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from paradec.tree import TreeBuffers

LogitsWanted = Literal["all", "last", "none"]


@dataclass
class RunnerOutput:
    logits: torch.Tensor | None  # [n, V] float32 ("all"), [1, V] ("last") or None ("none")
    hidden: torch.Tensor | None = None  # [n, H] last hidden state (after the final norm) if asked for


@runtime_checkable
class Runner(Protocol):
    """What the decode loop and drafters need from a model (batch size 1)."""

    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # logits width
    max_length: int  # context length (max_position_embeddings)
    hidden_size: int

    @property
    def length(self) -> int:
        """Committed tokens in the cache."""
        ...

    def reset(self) -> None:
        """Forget the sequence (empty cache)."""
        ...

    def forward(
        self,
        token_ids: torch.Tensor,  # [n] int64
        tree: TreeBuffers | None = None,  # None -> chain
        *,
        logits: LogitsWanted = "all",
        hidden: bool = False,
    ) -> RunnerOutput:
        """Score n inputs after the committed prefix; their KV stays provisional until `commit`."""
        ...

    def commit(self, keep: list[int] | int) -> None:
        """Keep the provisional entries at input indices `keep` (ascending, along one tree path) or the first
        `keep` inputs when an int; drop the others. Must be called after every `forward`."""
        ...

    def rollback(self, length: int) -> None:
        """Shorten the committed prefix to `length` tokens."""
        ...


def prefill(
    runner: Runner, token_ids: torch.Tensor, *, logits: LogitsWanted = "none", hidden: bool = False
) -> RunnerOutput:
    """Append `token_ids` to the committed prefix."""
    out = runner.forward(token_ids, logits=logits, hidden=hidden)
    runner.commit(int(token_ids.shape[0]))
    return out
