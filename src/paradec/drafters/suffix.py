"""`suffix`: suffix-tree speculation over the request and across requests (SuffixDecoding, Oliaro et al. 2024,
"SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications"; Arctic Inference's `suffix` method).

Two frequency tries of bounded depth D (`max_depth`) hold every substring of up to D tokens, each node counting how
often its substring occurred:

- the request's own (`SuffixTrie`): its prompt and its output so far, extended by one token per emitted token:
  the trie keeps the nodes of the suffixes that end at the last position and occurred before (its *active*
  nodes), and each new token moves each of them one level down; a substring met once is one leaf, read off the
  sequence (at most D moves a token, usually a few, where the plain trie made D - a few new nodes);
- the engine's (`GlobalSuffixTrie`, owned by the method): the outputs of earlier requests, at most
  `SuffixMethod.max_sequences` of them and `max_tokens` tokens in all; the oldest sequence is taken out when either
  bound is passed (its substrings' counts decremented, nodes at zero removed), so memory stays bounded.

Each step matches the longest suffix of the sequence, of at most `max_match` tokens, that occurred before (in the
request's trie: the deepest active node with a continuation; in the engine's: the deepest node the last tokens
reach; a match of m tokens leaves max_depth - m levels of continuation below it) and proposes a token **tree** of
the most frequent continuations: best-first over the match node's subtree, a node scored by the product of its
empirical conditional probabilities count(child) / count(parent) along the path, nodes below `min_score` left out.
The tree's size follows the match: at most `match_factor` × the match length nodes (a long match predicts far, a
short one little), capped by `max_nodes` (with `adaptive=true`, by `AdaptiveLength`'s choice from the measured
acceptance and step times); a match shorter than `min_match` proposes nothing, so text with nothing
to repeat decodes as plainly as vanilla. Of the two tries, the one whose match is longer proposes (the request's
on a tie). Drafts are point masses (no q), verified by token match: exact for greedy and sampling alike.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from paradec.drafters import register
from paradec.drafters.adaptive import AdaptiveLength
from paradec.drafters.base import DecodeState, Drafter, HostDrafter, Method, Resources
from paradec.drafters.options import Options, bound
from paradec.errors import ParadecError
from paradec.types import Verdict

MAX_DEPTH = 64  # deepest substring a trie holds: every token enters up to max_depth nodes
LEAF = MAX_DEPTH  # a leaf of `SuffixTrie` packs (token index, levels below) as index * LEAF + levels
SPAN = 1 << 20  # and one of `GlobalSuffixTrie` (sequence number, token index) as number * SPAN + index


@dataclass(frozen=True)
class SuffixOptions(Options):
    method = "suffix"
    max_depth: int = field(default=32, metadata=bound(2, MAX_DEPTH))  # longest substring the tries hold
    # longest suffix matched: the continuation below a match of length m is at most max_depth - m tokens deep
    max_match: int = field(default=12, metadata=bound(1, MAX_DEPTH))
    max_nodes: int = field(default=32, metadata=bound(1, limit="proposal"))  # most draft tokens per step
    # draft nodes per matched token, and the shortest match that proposes: chosen by `scripts/replay_drafter.py` on
    # the H200's greedy outputs of the agentic and chat suites (2026-12-02; τ 4.65 -> 5.62 and 1.35 -> 1.50 against
    # the former 2.0 and 2; pld's 4.62 and 1.47)
    match_factor: float = field(default=4.0, metadata=bound(0.1, 64.0))
    min_match: int = field(default=1, metadata=bound(1, MAX_DEPTH))  # shorter matches propose nothing
    min_score: float = field(default=0.05, metadata=bound(0.0, 1.0))  # least path probability a node needs
    use_global: bool = True  # also match the engine's earlier outputs
    adaptive: bool = False  # cap the tree's nodes per step from measured acceptance and step time

    def check_together(self, limits) -> None:
        if self.min_match > self.max_match:
            raise ParadecError(
                f"option min_match={self.min_match} for method 'suffix' exceeds max_match={self.max_match}",
                param="method_options",
            )
        if self.max_match >= self.max_depth:
            raise ParadecError(
                f"option max_match={self.max_match} for method 'suffix' must be below max_depth={self.max_depth} "
                "(a match leaves max_depth - max_match levels to draft from)",
                param="method_options",
            )


class Nodes:
    """A trie's nodes as ints: `children[n]` maps a token to the child's id, `counts[n]` is how often n's substring
    occurred; node 0 is the root. Dicts of ints are not tracked by Python's cyclic garbage collector, so a trie of a
    million nodes adds ~20 ms to a full collection, where one object per node added 0.3 s at 450k nodes (measured:
    a stall of every request in the process, whenever a collection came; on the H200 one prompt's prefill took
    0.42 s instead of 0.01)."""

    __slots__ = ("_free", "_next", "children", "counts")

    def __init__(self) -> None:
        self.children: dict[int, dict[int, int]] = {0: {}}
        self.counts: dict[int, int] = {0: 0}
        self._free: list[int] = []  # ids of removed nodes, reused
        self._next = 1

    def child(self, node: int, token: int) -> int:
        """The child of `node` for `token`, made (count 0) if there is none."""
        kids = self.children[node]
        child = kids.get(token)
        if child is None:
            child = kids[token] = self.make()
        return child

    def make(self) -> int:
        """A new node, childless, count 0 (not linked to a parent yet)."""
        node = self._free.pop() if self._free else self._take()
        self.children[node] = {}
        self.counts[node] = 0
        return node

    def kids(self, node: int) -> dict[int, int]:
        """`node`'s children by token (what `best_tree` walks; `SuffixTrie` answers the same for its leaves)."""
        return self.children[node]

    def count(self, node: int) -> int:
        return self.counts[node]

    def _take(self) -> int:
        self._next += 1
        return self._next - 1

    def remove(self, node: int, token: int) -> int:
        """Take out the child of `node` for `token` and its subtree; the number of nodes removed."""
        stack, removed = [self.children[node].pop(token)], 0
        while stack:
            current = stack.pop()
            stack.extend(child for child in self.children.pop(current).values() if child >= 0)  # (not leaves)
            del self.counts[current]
            self._free.append(current)
            removed += 1
        return removed


def best_tree(
    nodes: Nodes | SuffixTrie | GlobalSuffixTrie, match: int, max_nodes: int, min_score: float
) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the best-first tree of up to `max_nodes` continuations below node `match`: a node's
    score is the product of count(child) / count(parent) from `match` down to it; parents index the returned nodes
    (-1: the root, i.e. the pending token). Nodes scoring below `min_score` are left out. `nodes`: a trie's
    `kids(node)` and `count(node)`."""
    tokens: list[int] = []
    parents: list[int] = []
    heap: list[tuple[float, int, int, int, int]] = []  # (-score, tie, parent index, token, node)
    tie = 0
    count = nodes.count

    def push(node: int, index: int, score: float) -> None:
        nonlocal tie
        kids = nodes.kids(node)
        total = sum(count(child) for child in kids.values())
        for token, child in kids.items():
            child_score = score * count(child) / total
            if child_score >= min_score:
                heapq.heappush(heap, (-child_score, tie, index, token, child))
                tie += 1

    push(match, -1, 1.0)
    while heap and len(tokens) < max_nodes:
        neg, _, parent, token, node = heapq.heappop(heap)
        tokens.append(token)
        parents.append(parent)
        push(node, len(tokens) - 1, -neg)
    return tokens, parents


def _below(leaf: int, seq: list[int], index: int, below: int) -> dict[int, int]:
    """A leaf's one child (a leaf at `seq[index]` with `below` levels allowed under it): the next token of its
    occurrence, again a leaf; none past the depth or the sequence's end."""
    return {seq[index + 1]: ~(~leaf + LEAF - 1)} if below and index + 1 < len(seq) else {}


def _grow(nodes: Nodes, kids: dict[int, int], token: int, leaf: int, seq: list[int], index: int, below: int) -> int:
    """The node the leaf `kids[token]` becomes when its path is met again: count 1 (its one occurrence so far), the
    old occurrence's next token a leaf below it."""
    child = kids[token] = nodes.make()
    nodes.counts[child] = 1
    nodes.children[child] = _below(leaf, seq, index, below)
    return child


class SuffixTrie:
    """Substrings of up to `depth` tokens of one growing sequence, with counts; `match()` is the deepest node of a
    suffix of the sequence that has a continuation (its length too).

    A substring that occurred once is left implicit: its path below the last node that occurred more than once is
    one leaf, an int < 0 in its parent's children (`~(i * LEAF + below)`: the token at index i of the sequence,
    `below` levels allowed under it), whose single continuation is read off the sequence itself (count 1 all the
    way down, as the plain trie would count it). A leaf met again becomes a node (count 2) whose child is the old
    occurrence's next token, again a leaf. So `extend` moves only the suffixes that occurred before (the *active*
    ones: the plain trie moved all `depth` of them, creating a chain of count-1 nodes for every token), and every
    count, child and child order is the plain trie's (`kids`, `count`): a draft is the one the plain trie gave.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.nodes = Nodes()
        self.tokens: list[int] = []
        # (node, length) of the suffixes ending at the last token that occurred before, shortest first
        self.active: list[tuple[int, int]] = []

    @property
    def length(self) -> int:
        """Tokens added."""
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        nodes, depth, seq = self.nodes, self.depth, self.tokens
        children, counts = nodes.children, nodes.counts
        for token in tokens:
            i = len(seq)
            seq.append(token)
            moved = []
            for node, level in ((0, 0), *self.active):
                if level >= depth:
                    break
                kids = children[node]
                child = kids.get(token)
                if child is None:  # this suffix occurs once from here on: a leaf, and no longer active
                    kids[token] = ~(i * LEAF + depth - level - 1)
                    continue
                if child < 0:  # met again: the leaf becomes a node
                    child = _grow(nodes, kids, token, child, seq, *divmod(~child, LEAF))
                counts[child] += 1
                moved.append((child, level + 1))
            self.active = moved

    def kids(self, node: int) -> dict[int, int]:
        """Children by token, a leaf's one continuation included."""
        if node >= 0:
            return self.nodes.children[node]
        return _below(node, self.tokens, *divmod(~node, LEAF))

    def count(self, node: int) -> int:
        return 1 if node < 0 else self.nodes.counts[node]

    def match(self, longest: int) -> tuple[int | None, int]:
        """The deepest node of a suffix of at most `longest` tokens that has a continuation, and its length."""
        for node, length in reversed(self.active):
            if length <= longest and self.nodes.children[node]:
                return node, length
        return None, 0


class GlobalSuffixTrie:
    """The engine's trie over earlier outputs: substrings of up to `depth` tokens of at most `max_sequences`
    sequences and `max_tokens` tokens; the oldest sequence goes first when a bound is passed.

    As in `SuffixTrie`, a substring that occurred once is a leaf read off its sequence (`~((no * SPAN + i) * LEAF
    + below)`: sequence number `no`, token index i, levels allowed below), made a node when met again; taking a
    sequence out decrements its path's nodes and drops its leaves (a leaf, count 1, is its own occurrence). Adding
    an output then walks only what repeats: 3.51 -> 0.46 ms on the CI CPU (`scripts/bench_suffix_tries.py`; the
    plain trie made a node for every token of every suffix)."""

    def __init__(self, depth: int, max_sequences: int, max_tokens: int, max_nodes: int) -> None:
        if not 1 <= depth <= MAX_DEPTH or not 1 <= max_tokens <= SPAN:
            raise ValueError(f"depth {depth} or max_tokens {max_tokens} outside [1, {MAX_DEPTH}], [1, {SPAN}]")
        self.depth = depth
        self.max_sequences = max_sequences
        self.max_tokens = max_tokens
        self.max_nodes = max_nodes
        self.trie = Nodes()
        self._sequences: dict[int, list[int]] = {}  # the outputs kept by number, oldest first (what leaves read)
        self.tokens = 0
        self.nodes = 0  # nodes but the root (leaves are not nodes)
        self.added = 0  # sequences added so far (`drop_newest` takes it back; a sequence's number is its rank)

    @property
    def sequences(self) -> list[list[int]]:
        """The outputs kept, oldest first."""
        return list(self._sequences.values())

    def _unpack(self, leaf: int) -> tuple[list[int], int, int]:
        """A leaf's (sequence, token index, levels below)."""
        rest, below = divmod(~leaf, LEAF)
        number, index = divmod(rest, SPAN)
        return self._sequences[number], index, below

    def kids(self, node: int) -> dict[int, int]:
        """Children by token, a leaf's one continuation included (as `SuffixTrie.kids`)."""
        if node >= 0:
            return self.trie.children[node]
        return _below(node, *self._unpack(node))

    def count(self, node: int) -> int:
        return 1 if node < 0 else self.trie.counts[node]

    def _insert(self, number: int, tokens: list[int]) -> None:
        children, counts, depth = self.trie.children, self.trie.counts, self.depth
        for start in range(len(tokens)):
            node = 0
            for i in range(start, min(start + depth, len(tokens))):
                token = tokens[i]
                kids = children[node]
                child = kids.get(token)
                if child is None:  # this suffix occurs once from here on
                    kids[token] = ~((number * SPAN + i) * LEAF + depth - (i - start) - 1)
                    break
                if child < 0:  # met again: the leaf becomes a node
                    child = _grow(self.trie, kids, token, child, *self._unpack(child))
                    self.nodes += 1
                counts[child] += 1
                node = child

    def _remove(self, tokens: list[int]) -> None:
        trie, children, counts = self.trie, self.trie.children, self.trie.counts
        for start in range(len(tokens)):
            node = 0
            for token in tokens[start : start + self.depth]:
                kids = children[node]
                child = kids.get(token)
                if child is None:
                    break
                if child < 0:  # its own occurrence, left implicit: gone with it
                    del kids[token]
                    break
                counts[child] -= 1
                if counts[child] <= 0:
                    self.nodes -= trie.remove(node, token)
                    break
                node = child

    def add(self, tokens: list[int]) -> None:
        tokens = list(tokens[-self.max_tokens :])
        if not tokens:
            return
        number = self.added
        self._sequences[number] = tokens
        self._insert(number, tokens)
        self.tokens += len(tokens)
        self.added += 1
        kept = self._sequences
        while kept and (len(kept) > self.max_sequences or self.tokens > self.max_tokens or self.nodes > self.max_nodes):
            self._take_out(next(iter(kept)))

    def _take_out(self, number: int) -> None:
        tokens = self._sequences.pop(number)  # (taking it out reads none of its leaves)
        self.tokens -= len(tokens)
        self._remove(tokens)

    def drop_newest(self, added: int) -> None:
        """Take out the sequences added after the first `added` (those the bound already took out are gone), exactly
        as the oldest are taken out: `added` is as it was then."""
        for _ in range(min(self.added - added, len(self._sequences))):
            self._take_out(next(reversed(self._sequences)))
        self.added = min(self.added, added)

    def match(self, tokens: list[int], longest: int) -> tuple[int | None, int]:
        """The deepest node that a suffix of `tokens` (of at most `longest` tokens) reaches and that has a
        continuation, and that suffix's length (a node inside a path met once is that path's leaf there)."""
        for length in range(min(longest, len(tokens), self.depth - 1), 0, -1):
            node: int | None = 0
            for token in tokens[len(tokens) - length :]:
                node = self.kids(node).get(token)
                if node is None:
                    break
            if node is not None and self.kids(node):
                return node, length
        return None, 0


class SuffixMethod(Method):
    """Per engine: the trie of earlier outputs (bounded), shared by the engine's generations."""

    max_sequences = 256  # earlier outputs kept
    max_tokens = 131_072  # tokens kept over all of them
    max_nodes = 1_000_000  # trie nodes (~150 bytes each; a path met once is one leaf, an int): the memory bound

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        super().__init__(resources, drafter_class)
        self.tries: dict[int, GlobalSuffixTrie] = {}  # by depth

    def global_trie(self, depth: int) -> GlobalSuffixTrie:
        if depth not in self.tries:
            self.tries[depth] = GlobalSuffixTrie(depth, self.max_sequences, self.max_tokens, self.max_nodes)
        return self.tries[depth]

    def forget(self) -> None:
        """Empty the tries of earlier outputs."""
        self.tries.clear()

    def mark(self) -> dict[int, int]:
        return {depth: trie.added for depth, trie in self.tries.items()}

    def rewind(self, mark: dict[int, int]) -> None:
        """Take the outputs added since `mark` out of the tries (a trie made since then empties)."""
        for depth, trie in self.tries.items():
            trie.drop_newest(mark.get(depth, 0))

    def open(self, options: SuffixOptions) -> SuffixDrafter:
        return SuffixDrafter(self, options)

    def open_for(self, resources: Resources, options: SuffixOptions) -> SuffixDrafter:
        return SuffixDrafter(self, options)


@register
class SuffixDrafter(HostDrafter):
    name = "suffix"
    idle_skips_propose = True  # its draft with max_tokens = 0 is empty; update reads the tokens alone
    options_class = SuffixOptions
    method_class = SuffixMethod
    draft_token_cost = 0.02  # prior cost of scoring one more token relative to a step (adaptive, until timed)

    def __init__(self, method: SuffixMethod, options: SuffixOptions) -> None:
        super().__init__(method.resources, options)
        self.method = method
        self.trie = SuffixTrie(options.max_depth)
        self.shared = method.global_trie(options.max_depth) if options.use_global else None
        self.state: DecodeState | None = None
        self.policy: AdaptiveLength | None = None
        self.closed = False

    def begin(self, state: DecodeState) -> None:
        self.state = state
        self.trie.extend(state.tokens)
        if self.options.adaptive:
            self.policy = AdaptiveLength(self.options.max_nodes, draft_cost=self.draft_token_cost)
            self.policy.start()

    def draft(self, state: DecodeState, max_tokens: int) -> tuple[list[int], tuple[int, ...] | None]:
        self.trie.extend(state.tokens[self.trie.length :])
        options = self.options
        node, length = self.trie.match(options.max_match)
        nodes: SuffixTrie | GlobalSuffixTrie = self.trie
        if self.shared is not None:
            other, other_length = self.shared.match(state.tokens, options.max_match)
            if other_length > length:
                node, length, nodes = other, other_length, self.shared
        room = self.method.resources.target.max_length - len(state.tokens)
        budget = options.max_nodes if self.policy is None else self.policy.next_k()
        size = min(budget, round(options.match_factor * length), max_tokens, room)
        if node is None or length < options.min_match or size < 1:
            return [], None
        tokens, parents = best_tree(nodes, node, size, options.min_score)
        is_chain = all(p == i - 1 for i, p in enumerate(parents))
        return tokens, None if is_chain else tuple(parents)

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        self.trie.extend(state.tokens[self.trie.length :])
        if self.policy is not None:
            self.policy.observe(verdict.proposed, verdict.accepted)

    def close(self) -> None:
        """The generation ended: its output joins the engine's trie (once)."""
        if self.closed or self.shared is None or self.state is None:
            return
        self.closed = True
        self.shared.add(self.state.tokens[self.state.prompt_len :])
