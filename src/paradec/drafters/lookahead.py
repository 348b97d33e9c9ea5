"""`lookahead`: Lookahead decoding — Jacobi trajectories feed an n-gram pool whose n-grams are verified as drafts.

Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding". Every step scores,
in one target forward, the pending token and two branches:

- the **verification branch**: up to G candidate continuations of the pending token from the n-gram pool (plus
  one copied from the longest earlier match of the context's suffix, as prompt lookup does), merged into a token
  trie so siblings are distinct. The verifier accepts a path of it like any token tree: greedy by argmax, sampling
  by point masses (exact, no draft distribution needed). These are the proposal's nodes.
- the **lookahead branch** (`Proposal.aux`, scored but never accepted): a 2D window of N - 1 levels by W columns
  of Jacobi guesses. Level l, column i sits at offset 1 + l + i from the pending token x and attends to x, to
  level 0's columns 0..i and to the levels 1..l of its own column, so it sees one consistent sequence
  x, (0,0), (0,1), ..., (0,i), (1,i), ..., (l,i) of consecutive positions. For W = 3, N = 3, the mask over
  [x, branch] (every input also sees the committed prefix, and never the verification branch):

                  x  (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
        offset    0    1     2     3     2     3     4
        (0,0)     1    1
        (0,1)     1    1     1
        (0,2)     1    1     1     1
        (1,0)     1    1                 1
        (1,1)     1    1     1                 1
        (1,2)     1    1     1     1                 1

  The target's argmax after the top level's column i is a new guess; the column's levels plus that guess form an
  N-gram of consecutive positions, which goes into the pool. Then the window shifts by one level: level l + 1
  becomes level l, and the new guesses become the top level.

The pool maps a token to the most recent (at most G) (N-1)-token continuations seen after it; it is seeded with
the prompt's n-grams and grows with the generated text's n-grams and the lookahead branch's.

Host syncs: none of its own (the decode loop has its one per step). The new n-grams are copied to the host
asynchronously (pinned memory on CUDA) and enter the pool at the next step's update, after the verifier's sync has
made them available; the pool is a heuristic, so one step of delay costs nothing in correctness. The branch's
layout is the same every step (built once). Near the end of the context the tree is cut to the inputs that still
fit and the branch is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Resources
from paradec.drafters.options import Options, bound
from paradec.drafters.pld import NgramIndex
from paradec.errors import ParadecError
from paradec.types import AuxInputs, Proposal, Verdict


@dataclass(frozen=True)
class LookaheadOptions(Options):
    """The bounds keep a step inside the runner's largest step: 1 + n + W(N - 1) inputs, the verification branch's
    n nodes being at most G(N - 1) + lookup (`check_together`)."""

    method = "lookahead"
    # W: columns of the lookahead branch (0 = no branch: the pool holds the text's n-grams only)
    window: int = field(default=8, metadata=bound(0, 32))
    ngram: int = field(default=4, metadata=bound(2, 16))  # N: n-gram size (N - 1 levels; candidates of N - 1 tokens)
    guesses: int = field(default=8, metadata=bound(1, 64))  # G: pool candidates verified per step (kept per key)
    # tokens of the extra prompt-lookup candidate (0 = none; 10 = pld's default)
    lookup: int = field(default=10, metadata=bound(0, limit="proposal"))

    def step_inputs(self) -> int:
        """The most inputs a step scores: the pending token, the verification branch, the lookahead branch."""
        return 1 + self.guesses * (self.ngram - 1) + self.lookup + self.window * (self.ngram - 1)

    def check_together(self, limits) -> None:
        most = limits["proposal"] + 1
        if self.step_inputs() > most:
            raise ParadecError(
                f"lookahead options window={self.window}, ngram={self.ngram}, guesses={self.guesses}, "
                f"lookup={self.lookup} score up to 1 + guesses*(ngram-1) + lookup + window*(ngram-1) = "
                f"{self.step_inputs()} inputs per step; the runner's largest step is {most}",
                param="method_options",
            )


class NgramPool:
    """Key token -> its most recent continuations (tuples of n - 1 tokens), at most `capacity` of them."""

    def __init__(self, n: int, capacity: int) -> None:
        self.n = n
        self.capacity = capacity
        self.table: dict[int, OrderedDict[tuple[int, ...], None]] = {}
        self._next_start = 0  # n-grams of the text starting before this index were added

    def add(self, gram: Sequence[int]) -> None:
        """Add one n-gram (a repeat becomes the most recent; the oldest goes when over capacity)."""
        continuations = self.table.setdefault(gram[0], OrderedDict())
        key = tuple(gram[1:])
        continuations[key] = None
        continuations.move_to_end(key)
        if len(continuations) > self.capacity:
            continuations.popitem(last=False)

    def extend(self, tokens: list[int]) -> None:
        """Add the n-grams of a growing text that were not added yet."""
        for start in range(self._next_start, len(tokens) - self.n + 1):
            self.add(tokens[start : start + self.n])
        self._next_start = max(self._next_start, len(tokens) - self.n + 1)

    def candidates(self, key: int, limit: int) -> list[tuple[int, ...]]:
        """Up to `limit` continuations of `key`, most recent first."""
        continuations = self.table.get(key)
        return list(reversed(continuations))[:limit] if continuations else []


def build_trie(
    candidates: Sequence[Sequence[int]], max_depth: int, max_nodes: int | None = None
) -> tuple[list[int], tuple[int, ...]]:
    """Merge token chains (each cut to `max_depth`) into a tree of at most `max_nodes` nodes: (node tokens, node
    parents with -1 = root). Chains sharing a prefix share its nodes, so siblings always carry distinct tokens;
    parents precede children, and earlier chains win the node budget."""
    tokens: list[int] = []
    parents: list[int] = []
    nodes: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for chain in candidates:
        parent = -1
        for token in chain[:max_depth]:
            node = nodes.get((parent, token))
            if node is None:
                if max_nodes is not None and len(tokens) >= max_nodes:
                    break
                node = len(tokens)
                nodes[(parent, token)] = node
                tokens.append(token)
                parents.append(parent)
            parent = node
    return tokens, tuple(parents)


def lookahead_layout(window: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lookahead branch of `levels` x `window` inputs, input l * window + i for level l, column i:
    depth [m] (offset from the pending token) and mask [m, 1 + m] (column 0 is the pending token)."""
    m = levels * window
    depth = torch.tensor([1 + level + i for level in range(levels) for i in range(window)], dtype=torch.long)
    mask = torch.zeros(m, 1 + m, dtype=torch.bool)
    mask[:, 0] = True
    for level in range(levels):
        for i in range(window):
            row = level * window + i
            mask[row, 1 : 2 + i] = True  # level 0, columns 0..i
            for above in range(1, level + 1):
                mask[row, 1 + above * window + i] = True  # levels 1..l of column i
    return depth, mask


@register
class Lookahead(Drafter):
    name = "lookahead"
    options_class = LookaheadOptions

    def __init__(self, resources: Resources, options: LookaheadOptions) -> None:
        super().__init__(resources, options)
        self.levels_count = options.ngram - 1
        self.pool = NgramPool(options.ngram, options.guesses)
        self.index = NgramIndex(1, 3)  # the prompt-lookup candidate: suffix matches of 3, 2, then 1 tokens
        self.levels: torch.Tensor | None = None  # [N-1, W] int64 on the device: the Jacobi window, level-major
        self.fresh_levels = 0  # levels computed by the target (the others still hold their initial tokens)
        self._depth: torch.Tensor | None = None  # [m] the branch's offsets
        self._mask: torch.Tensor | None = None  # [m, 1 + m] the branch's attention
        self._masks: dict[int, torch.Tensor] = {}  # proposal size n -> [m, 1 + n + m] (n columns of zeros inserted)
        self._grams_in_flight: torch.Tensor | None = None  # [W, N] host copy of the last step's n-grams
        self._proposed = 0
        self._with_branch = False

    def begin(self, state: DecodeState) -> None:
        self.pool.extend(state.tokens)
        width, count = self.options.window, self.levels_count
        if width == 0:
            return
        # initial guesses: prompt tokens (Fu et al. draw them at random from the prompt); the target replaces them
        # level by level, and n-grams enter the pool once every level is the target's own
        seed = state.tokens[-width * count :]
        init = [seed[i % len(seed)] for i in range(width * count)]
        self.levels = torch.tensor(init, dtype=torch.long).view(count, width).to(state.device)
        depth, mask = lookahead_layout(width, count)
        self._depth, self._mask = depth.to(state.device), mask.to(state.device)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        self._proposed, self._with_branch = 0, False
        if max_tokens <= 0:
            return Proposal.empty(state.device)
        key = state.tokens[-1]
        candidates = []
        if self.options.lookup:
            copied = self.index.lookup(state.tokens, self.options.lookup)
            if copied:
                candidates.append(copied)
        candidates += self.pool.candidates(key, self.options.guesses)
        # inputs that fit after the committed prefix: the loop bounds a tree's depth, its node count is ours to bound
        room = self.resources.target.max_length - (len(state.tokens) - 1)
        tokens, parents = build_trie(candidates, max_tokens, max_nodes=room - 1)
        n = len(tokens)
        node_tokens = torch.tensor(tokens, dtype=torch.long).to(state.device, non_blocking=True)
        proposal = Proposal(tokens=node_tokens, parents=parents if n else None)
        self._proposed = n
        if self.levels is not None:
            if 1 + n + self._depth.shape[0] <= room:
                proposal.aux = AuxInputs(tokens=self.levels.view(-1), depth=self._depth, mask=self._aux_mask(n))
                self._with_branch = True
            else:
                self.levels = None  # the context only shrinks from here: the branch stays off
        return proposal

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        if self._grams_in_flight is not None:  # last step's n-grams: their copy completed before this step's sync
            for gram in self._grams_in_flight.tolist():
                self.pool.add(gram)
            self._grams_in_flight = None
        self.pool.extend(state.tokens)
        if not self._with_branch:
            return
        width, count = self.options.window, self.levels_count
        top = 1 + self._proposed + (count - 1) * width  # logits row of the top level's column 0
        guesses = state.target_logits[top : top + width].argmax(-1)  # [W] the target's next token per column
        if self.fresh_levels == count:
            grams = torch.cat([self.levels.T, guesses[:, None]], 1)  # [W, N] column i: its levels, then its guess
            self._grams_in_flight = _to_host(grams)
        self.levels = torch.cat([self.levels[1:], guesses[None]])  # [N-1, W]
        self.fresh_levels = min(self.fresh_levels + 1, count)

    def _aux_mask(self, n: int) -> torch.Tensor:
        """[m, 1 + n + m]: the branch sees the pending token and itself, never the verification branch's n nodes."""
        mask = self._masks.get(n)
        if mask is None:
            m = self._mask.shape[0]
            gap = torch.zeros(m, n, dtype=torch.bool, device=self._mask.device)
            mask = torch.cat([self._mask[:, :1], gap, self._mask[:, 1:]], 1)
            self._masks[n] = mask
        return mask


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to the host without waiting (pinned memory on CUDA); read it after a sync."""
    if values.device.type != "cuda":
        return values.cpu()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host
