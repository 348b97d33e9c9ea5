"""`multisample`: the n samples of one prompt draft from each other (n > 1, OpenAI's choices).

When a request asks for n samples, they decode together (`Engine.generate(n=...)`: n sequences of one batch; on a
runner that does not batch, one after another). Samples of one prompt at a moderate temperature write much the same
text, in a different order and with small differences; what one sample wrote is a good guess of what another is
about to write. Each step, a sample's drafter takes the longest suffix of its own tokens (an n-gram of `max_ngram`
down to `min_ngram` tokens) that occurs in its siblings' generated tokens or in its own context, and proposes what
followed each occurrence: the most recent one in each sibling, and the most recent one in its own context (prompt
lookup's candidate, continued with the period of the repetition when it runs into the end, as `pld` does). Where
siblings continue the match differently, the distinct continuations form a token **tree** (a trie: siblings carry
distinct tokens), its nodes ranked by how many candidates pass through them (the siblings that agree), shallower
first on a tie, at most `max_nodes` of them and `num_draft_tokens` deep. Drafts are point masses (no q), verified by
token match: exact for greedy and for sampling alike.

Alone (n == 1, or before any sibling has written a token) the only candidate is the own context's: the drafter
proposes exactly what `pld` with the same n-gram sizes and `min(num_draft_tokens, max_nodes)` tokens proposes.

Siblings reach the drafter through its resources: `resources.siblings()` (`paradec.batch.Siblings`) gives the other
samples' tokens as read-only views (`paradec.batch.TokenView`) and one dict shared by the drafters of the request's
samples, where they keep one n-gram index of all the samples' generated tokens (`SiblingIndex`) instead of one each:
n samples of G tokens cost O(n·G) index entries, not O(n²·G). Resources without `siblings` (a generation alone)
mean no siblings. The drafter never sees another sequence's cache, state or generator.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Resources
from paradec.drafters.options import Options, bound
from paradec.drafters.pld import MAX_NGRAM, NgramIndex
from paradec.errors import ParadecError
from paradec.tree import chain_parents
from paradec.types import Proposal


@dataclass(frozen=True)
class MultiSampleOptions(Options):
    method = "multisample"
    max_ngram: int = field(default=3, metadata=bound(1, MAX_NGRAM))  # longest suffix n-gram matched (as pld)
    min_ngram: int = field(default=1, metadata=bound(1, MAX_NGRAM))  # shortest suffix n-gram matched
    num_draft_tokens: int = field(default=10, metadata=bound(1, limit="proposal"))  # the deepest draft path
    # draft tokens per step (the tree's). 4: replayed over n = 8 samples at temperature 0.7 (`scripts/replay_drafter.py`
    # on SmolLM2's samples, 2026-12-02), τ 1.85 at 24 nodes and 1.66 at 4, for 13.5 and 3.2 draft inputs a sample;
    # at the H200's measured cost of an input in a batch of 8 (0.055 ms against a 4.35 ms step) 4 nodes expect
    # ~1.25x and 24 ~0.8x (the H200 run at 24: 0.96x with τ 2.06)
    max_nodes: int = field(default=4, metadata=bound(1, limit="proposal"))

    def check_together(self, limits) -> None:
        if self.min_ngram > self.max_ngram:
            raise ParadecError(
                f"option min_ngram={self.min_ngram} for method 'multisample' exceeds max_ngram={self.max_ngram}",
                param="method_options",
            )


class SiblingIndex:
    """Per n-gram (n in [min_n, max_n]) of the samples' tokens: for each sample, the position right after its most
    recent occurrence whose continuation is a generated token (not the prompt's). Grows as the samples do; shared
    by the drafters of one request's samples."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)  # longest first
        self.max_n = max_n
        self.maps: dict[int, dict[tuple[int, ...], dict[int, int]]] = {n: {} for n in self.sizes}
        self.indexed: dict[int, int] = {}  # sample -> continuation starts below this were entered

    def extend(self, sample: int, tokens: Sequence[int], prompt_len: int) -> None:
        """Enter the continuation starts of `tokens` (sample `sample`'s prompt and output) not entered yet."""
        begin = max(self.indexed.get(sample, prompt_len), 1)
        end = len(tokens)
        if end <= begin:
            return
        low = max(begin - self.max_n, 0)
        part = tokens[low:end]  # the new tokens and the max_n before them (a copy)
        for start in range(begin, end):
            for n in self.sizes:
                if start >= n:
                    key = tuple(part[start - n - low : start - low])
                    self.maps[n].setdefault(key, {})[sample] = start
        self.indexed[sample] = end

    def starts(self, n: int, key: tuple[int, ...]) -> dict[int, int]:
        """sample -> continuation start of the most recent occurrence of `key` (an n-gram) in that sample."""
        return self.maps[n].get(key, {})


def build_tree(candidates: list[Sequence[int]], depth: int, max_nodes: int) -> tuple[list[int], tuple[int, ...]]:
    """(tokens, parents) of the trie of `candidates` (each cut to `depth`) pruned to its `max_nodes` best nodes: a
    node's weight is the number of candidates through it; best-first from the root, heavier first, then shallower,
    then the earlier candidate's. Parents precede children (-1 = the root, the pending token); siblings distinct."""
    token_of, parent_of, count, level = [-1], [-1], [0], [0]
    children: list[dict[int, int]] = [{}]
    for chain in candidates:
        node = 0
        for token in chain[:depth]:
            child = children[node].get(token)
            if child is None:
                child = len(token_of)
                children[node][token] = child
                children.append({})
                token_of.append(int(token))
                parent_of.append(node)
                count.append(0)
                level.append(level[node] + 1)
            count[child] += 1
            node = child
    heap = [(-count[c], level[c], c) for c in children[0].values()]
    heapq.heapify(heap)
    placed = {0: -1}  # trie node -> proposal node
    tokens: list[int] = []
    parents: list[int] = []
    while heap and len(tokens) < max_nodes:
        _, _, node = heapq.heappop(heap)
        placed[node] = len(tokens)
        tokens.append(token_of[node])
        parents.append(placed[parent_of[node]])
        for child in children[node].values():
            heapq.heappush(heap, (-count[child], level[child], child))
    return tokens, tuple(parents)


@register
class MultiSample(Drafter):
    name = "multisample"
    options_class = MultiSampleOptions
    reads_siblings = True  # decoded one after another, its samples are lent the earlier ones (`Engine.samples`)

    def __init__(self, resources: Resources, options: MultiSampleOptions) -> None:
        super().__init__(resources, options)
        self.own = NgramIndex(options.min_ngram, options.max_ngram)
        siblings = getattr(resources, "siblings", None)
        self.siblings = siblings() if callable(siblings) else None  # None: decoding alone

    def _index(self) -> SiblingIndex:
        key = ("multisample", self.options.min_ngram, self.options.max_ngram)
        shared = self.siblings.shared
        index = shared.get(key)
        if index is None:
            index = shared[key] = SiblingIndex(self.options.min_ngram, self.options.max_ngram)
        return index

    def candidates(self, tokens: list[int], depth: int) -> list[list[int]]:
        """The continuations of the longest suffix n-gram of `tokens` found anywhere: the own context's first, then
        each sibling's (by sample index); empty when no suffix n-gram occurred before."""
        self.own.extend(tokens)
        others = self.siblings.others() if self.siblings is not None else []
        index = None
        if others:
            index = self._index()
            for view in others:
                index.extend(view.sample, view, view.prompt_len)
        views = {view.sample: view for view in others}
        end = len(tokens)
        for n in self.own.sizes:
            if n > end:
                continue
            key = tuple(tokens[end - n :])
            found = []
            start = self.own.maps[n].get(key)
            if start is not None:
                period = end - start  # a repetition of this period is what we assume
                found.append([tokens[start + (i % period)] for i in range(depth)])
            if index is not None:
                for sample, at in sorted(index.starts(n, key).items()):
                    view = views.get(sample)
                    if view is not None:
                        found.append(view[at : at + depth])
            if found:
                return found
        return []

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        depth = min(self.options.num_draft_tokens, max_tokens)
        budget = min(self.options.max_nodes, state.room)
        if depth <= 0 or budget <= 0:
            return Proposal.empty(state.device)
        found = self.candidates(state.tokens, depth)
        if not found:
            return Proposal.empty(state.device)
        tokens, parents = build_tree(found, depth, budget)
        ids = torch.tensor(tokens, dtype=torch.long, device=state.device)
        return Proposal(tokens=ids, parents=None if parents == chain_parents(len(tokens)) else parents)
