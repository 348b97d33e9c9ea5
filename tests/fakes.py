"""A fake target for statistical tests: next-token logits are a fixed table indexed by the last two tokens.

`TableRunner` implements the Runner protocol (chains and trees) over a tiny vocabulary, so the decode loop can be
run tens of thousands of times in seconds and the exact distribution of a few new tokens can be enumerated.
"""

from __future__ import annotations

import itertools

import torch

from paradec.config import SamplingParams
from paradec.runners.base import RunnerOutput
from paradec.sampling import warp
from paradec.tree import TreeBuffers


class TableRunner:
    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [V, V, V]: logits after (previous, current)
        self.vocab_size = table.shape[-1]
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.max_length = 1 << 20
        self.hidden_size = 0
        self.tokens: list[int] = []
        self.provisional: list[tuple[int, int]] = []  # (token, parent input index)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []
        self.provisional = []

    def forward(self, token_ids, tree: TreeBuffers | None = None, *, logits="all", hidden=False) -> RunnerOutput:
        ids = token_ids.tolist()
        parents = list(range(-1, len(ids) - 1)) if tree is None else tree.parent.tolist()
        rows = []
        for j, token in enumerate(ids):
            p = parents[j]
            previous = ids[p] if p >= 0 else (self.tokens[-1] if self.tokens else 0)
            rows.append(self.table[previous, token])
        self.provisional = list(zip(ids, parents))
        out = torch.stack(rows)
        return RunnerOutput(logits=out if logits == "all" else out[-1:])

    def commit(self, keep) -> None:
        keep = list(range(keep)) if isinstance(keep, int) else keep
        self.tokens += [self.provisional[j][0] for j in keep]
        self.provisional = []

    def rollback(self, length: int) -> None:
        self.tokens = self.tokens[:length]


def random_table(vocab: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, vocab, vocab, generator=gen) * scale


def exact_joint(table: torch.Tensor, prompt: list[int], steps: int, sp: SamplingParams) -> dict[tuple[int, ...], float]:
    """Exact probability of every sequence of `steps` new tokens under plain sampling from the warped table."""
    vocab = table.shape[-1]
    out = {}
    for seq in itertools.product(range(vocab), repeat=steps):
        context = list(prompt)
        prob = 1.0
        for token in seq:
            p = warp(table[context[-2] if len(context) > 1 else 0, context[-1]], sp)
            prob *= float(p[token])
            context.append(token)
        if prob > 0:
            out[seq] = prob
    return out
