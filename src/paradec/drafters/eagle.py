"""`eagle`: an EAGLE-style feature head drafts a dynamic token tree (Li et al. 2024, EAGLE-2's tree).

The head (`paradec.heads.eagle`) keeps one entry per committed target position t, built from the target's own
hidden state f_t and the token x_{t+1}; the entry of the last committed position holds the pending token and
predicts the hidden state after it, whose LM-head distribution q gives the candidates for the first draft level.
After each step the entries of the newly committed positions are added with the target's real hidden states.

Tree growth (EAGLE-2):
- level 1: the top-k tokens of q, scored by their log-probability;
- each further level expands the k nodes of the previous level with the highest cumulative draft
  log-probability (the sum along the path): one head forward over those k entries (token, parent's predicted
  hidden state), each attending to the committed entries and its own ancestors; each yields its top-k
  children, k * k new nodes;
- rerank: keep the `nodes` nodes of highest cumulative log-probability over all levels. A child never scores
  above its parent and a stable sort keeps the older parent first on ties, so the kept nodes form a tree.

Static shapes: the head's KV cache has `capacity` committed slots followed by (depth - 1) * k draft slots; masks
are built from device scalars (committed length, first new slot), and a step's new entries (at most depth + 1:
the pending token and the accepted drafts) sit in fixed-size input buffers. So a whole step, adding the new
entries and growing the tree, is one fixed sequence of kernels, captured once as a CUDA graph and replayed.
The tree's buffers (mask, depth, parents) are built on the device too (`paradec.tree.device_tree`), inside the
same graph: the drafter adds no host synchronisation, so the host queues the head's graph, the target's tree
forward and the verification back to back, and the tree's shape reaches the host with the verdict.

Nodes are point masses with distinct siblings (top-k tokens), so the verifier's token-match walk keeps greedy and
sampled output exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.nn import functional as F

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Resources
from paradec.errors import ParadecError
from paradec.heads import EagleHead, target_weights
from paradec.tree import TreeBuffers, device_tree
from paradec.types import Proposal, Verdict


@dataclass(frozen=True)
class EagleOptions:
    topk: int = 8  # children per expanded node, and nodes expanded per level
    depth: int = 6  # draft levels: the most draft tokens on one path
    nodes: int = 48  # tree nodes scored per step (the best by cumulative draft log-probability)
    compile: bool = False  # fuse the head's math with torch.compile (experimental: not yet measured on a GPU)

    def __post_init__(self) -> None:
        for name in ("topk", "depth", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParadecError(f"eagle option {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.compile, bool):
            raise ParadecError(f"eagle option compile must be true or false, got {self.compile!r}")


class Workspace:
    """Static buffers for decoding one sequence with an EAGLE head: its KV cache, a step's inputs, the running
    prediction, and the CUDA graphs captured over them. Reused by the generations of one engine (which runs one
    at a time) while the shape settings stay the same."""

    def __init__(self, head: EagleHead, options: EagleOptions, capacity: int) -> None:
        config = head.config
        device, dtype = head.fc.weight.device, head.fc.weight.dtype
        self.options = options
        self.capacity = capacity  # committed slots; draft slots follow
        self.rows = options.depth + 1  # most entries a step commits: the pending token and every draft level
        self.draft_slots = (options.depth - 1) * options.topk
        size = capacity + self.draft_slots
        self.keys = torch.zeros(1, config.num_heads, size, config.head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.slots = torch.arange(size, device=device)
        self.tokens = torch.zeros(self.rows, dtype=torch.long, device=device)  # x_{t+1} of the new entries
        self.features = torch.zeros(self.rows, config.hidden_size, device=device, dtype=dtype)  # f_t
        self.count = torch.ones((), dtype=torch.long, device=device)  # new entries this step (<= rows)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # slot of the first new entry
        self.length = torch.zeros((), dtype=torch.long, device=device)  # committed entries
        self.root = torch.zeros(config.hidden_size, device=device, dtype=dtype)  # predicted hidden of the pending
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, TreeBuffers]]] = {}

    def fits(self, options: EagleOptions, length: int) -> bool:
        return options == self.options and length + self.rows <= self.capacity


_WORKSPACES: weakref.WeakKeyDictionary[EagleHead, Workspace] = weakref.WeakKeyDictionary()


# The head's math in three plain functions of (head, tensors), compiled or not. Eagerly, one tree of the default
# shape is ~700 small kernels (~115 per level: norms, rotary, casts); the CUDA graph removes their launch cost but
# not their latency, and on the zoo's 115M bench target they cost more than the target's own forward (see
# bench/results/code-h200-2026-11-26-v2/NOTES.md). With `compile=true` the elementwise work between the matrix
# products fuses (Triton, as in the native runner's blocks). Without fullgraph: a frame dynamo cannot compile (or
# one recompiled too often, e.g. many different heads in one process) runs eagerly instead of failing.
def _embed_project(
    head: EagleHead, embed: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries (tokens [T], features [T, H]) at positions [T] -> layer inputs (1, T, H), q, k, v (1, nh, T, hd)."""
    x = head.inputs(F.embedding(tokens, embed), features)[None]
    return (x, *head.project(x, positions))


def _attend(
    head: EagleHead, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    return head.attend(x, q, keys, values, mask)


def _log_probs(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """Predicted hidden states [..., H] -> float32 log-probabilities of the next token [..., V]."""
    return F.log_softmax((hidden @ lm_head.t()).float(), -1)


@lru_cache(maxsize=4)
def head_math(compiled: bool, backend: str = "inductor") -> tuple[Callable, Callable, Callable]:
    """(_embed_project, _attend, _log_probs), through `torch.compile(dynamic=True)` when `compiled`."""
    fns = (_embed_project, _attend, _log_probs)
    if not compiled:
        return fns
    return tuple(torch.compile(fn, dynamic=True, backend=backend) for fn in fns)


@register
class Eagle(Drafter):
    name = "eagle"
    options_class = EagleOptions
    needs_hidden = True

    def __init__(self, resources: Resources, options: EagleOptions) -> None:
        super().__init__(resources, options)
        self.head = resources.heads("eagle")
        self.target = resources.target
        self.embed, self.lm_head = target_weights(self.target)
        if options.topk > self.target.vocab_size:
            raise ParadecError(f"eagle option topk={options.topk} exceeds the vocabulary of {self.target.vocab_size}")
        self.embed_project, self.attend, self.log_probs = head_math(options.compile)
        self.ws: Workspace | None = None
        self.committed = 0  # host copy of ws.length
        self.staged = False  # new entries wait in the input buffers (added by the next propose)

    # --- the drafter seam ------------------------------------------------------------------------------------
    def begin(self, state: DecodeState) -> None:
        self.committed, self.staged = 0, False
        self.ws = self._workspace(len(state.tokens))
        features = state.target_hidden
        if features is not None and features.shape[0] > 0:
            self._prefill(state.tokens, features)

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        features = state.target_hidden  # [m, H] hidden states of the inputs the step committed
        m = int(features.shape[0])
        end = len(state.tokens) - 1  # committed target positions; tokens[end] is pending
        start = end - m
        if start != self.committed or m > self.ws.rows:
            raise RuntimeError(f"EAGLE head holds {self.committed} entries; the step committed [{start}, {end})")
        if not self.ws.fits(self.options, end):  # a larger workspace: carry the committed entries over
            old, self.ws = self.ws, self._workspace(end)
            self.ws.keys[:, :, :start] = old.keys[:, :, :start]
            self.ws.values[:, :, :start] = old.values[:, :, :start]
        ws = self.ws
        # non_blocking: pageable memory is staged at once, and the copy waits for nothing queued before it
        ws.tokens[:m].copy_(torch.tensor(state.tokens[start + 1 : end + 1]), non_blocking=True)
        ws.features[:m] = features
        ws.count.fill_(m)
        ws.start.fill_(start)
        self.committed, self.staged = end, True

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        k = self.options.topk
        levels = min(self.options.depth, max_tokens)
        # the forward scores 1 + n inputs after len(tokens) - 1 committed ones: stay inside the context
        budget = min(self.options.nodes, self.target.max_length - len(state.tokens))
        if self.committed == 0 or levels < 1 or budget < 1:
            return Proposal.empty(state.device)
        n = min(budget, k + (levels - 1) * k * k)
        tokens, layout = self._run(levels, n)
        return Proposal(tokens=tokens, layout=layout)

    # --- decoding ---------------------------------------------------------------------------------------------
    def _workspace(self, length: int) -> Workspace:
        """The head's workspace if it suits these options and `length` committed entries, else a new, roomier
        one (which replaces it for later generations)."""
        ws = _WORKSPACES.get(self.head)
        if ws is None or not ws.fits(self.options, length):
            ws = Workspace(self.head, self.options, capacity=max(1024, 2 * (length + self.options.depth + 1)))
            _WORKSPACES[self.head] = ws
        return ws

    def _prefill(self, tokens: list[int], features: torch.Tensor) -> None:
        """Entries of the prompt: positions [0, L) read (tokens[t + 1], f_t); causal attention among them."""
        ws, head = self.ws, self.head
        length = int(features.shape[0])
        ids = torch.tensor(tokens[1 : length + 1], device=ws.keys.device)
        x, q, k, v = self.embed_project(head, self.embed, ids, features, ws.slots[:length])  # x: (1, L, H)
        ws.keys[:, :, :length], ws.values[:, :, :length] = k, v
        mask = torch.ones(length, length, dtype=torch.bool, device=ws.keys.device).tril()
        out = self.attend(head, x, q, ws.keys[:, :, :length], ws.values[:, :, :length], mask)
        ws.root.copy_(out[0, -1])
        ws.length.fill_(length)
        self.committed = length

    def _run(self, levels: int, n: int) -> tuple[torch.Tensor, TreeBuffers]:
        """Add the staged entries (if any) and grow the tree: by CUDA graph replay for the full-size tree after a
        step, eagerly otherwise (the first proposal after the prompt, and the small trees of the last steps)."""
        ws, staged, k = self.ws, self.staged, self.options.topk
        self.staged = False
        full = levels == self.options.depth and n == min(self.options.nodes, k + ws.draft_slots * k)
        if not (staged and full and ws.keys.device.type == "cuda"):
            if staged:
                self._extend()
            return self._grow(levels, n)
        key = (levels, n)
        if key not in ws.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (the step is idempotent: same inputs, same writes)
                self._extend()
                self._grow(levels, n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._extend()
                outputs = self._grow(levels, n)
            ws.graphs[key] = (graph, outputs)
        graph, (tokens, layout) = ws.graphs[key]
        graph.replay()
        return tokens.clone(), layout  # the layout's buffers stay valid until the next replay, after this step

    def _extend(self) -> None:
        """Add the staged entries (ws.count of them, padded to ws.rows) at slots ws.start ...; static shapes.
        Padding rows read stale inputs and write slots past the new committed length, which no query sees before
        they are overwritten."""
        ws, head = self.ws, self.head
        slots = ws.start + ws.slots[: ws.rows]  # [rows]
        x, q, k, v = self.embed_project(head, self.embed, ws.tokens, ws.features, slots)  # x: (1, rows, H)
        ws.keys.index_copy_(2, slots, k)
        ws.values.index_copy_(2, slots, v)
        mask = ws.slots[None, : ws.capacity] <= slots[:, None]  # [rows, capacity] causal over committed slots
        out = self.attend(head, x, q, ws.keys[:, :, : ws.capacity], ws.values[:, :, : ws.capacity], mask)
        ws.root.copy_(out[0].index_select(0, ws.count.view(1) - 1)[0])
        ws.length.copy_(ws.start + ws.count)

    def _grow(self, levels: int, n: int) -> tuple[torch.Tensor, TreeBuffers]:
        """The EAGLE-2 tree from ws.root: kept node tokens [n] and the tree's buffers (built on the device)."""
        ws, head, k = self.ws, self.head, self.options.topk
        device = ws.keys.device
        logp = self.log_probs(ws.root, self.lm_head)  # [V]
        front_scores, front_tokens = logp.topk(k)  # [k] level-1 nodes
        front_ids = torch.arange(k, device=device)
        front_features = ws.root.expand(k, -1)  # [k, H] each node's parent prediction
        scores, tokens, parents = [front_scores], [front_tokens], [torch.full((k,), -1, device=device)]
        count = k
        committed = (ws.slots[: ws.capacity] < ws.length).expand(k, -1)  # [k, capacity]
        # ancestry of the draft slots: row i = slot i and the slots of its ancestors
        ancestry = torch.eye(ws.draft_slots, dtype=torch.bool, device=device)
        for level in range(1, levels):
            first = (level - 1) * k  # this level's entries go to draft slots first ... first + k - 1
            positions = (ws.length - 1 + level).expand(k)
            x, q, key, value = self.embed_project(head, self.embed, front_tokens, front_features, positions)
            ws.keys[:, :, ws.capacity + first : ws.capacity + first + k] = key
            ws.values[:, :, ws.capacity + first : ws.capacity + first + k] = value
            mask = torch.cat([committed, ancestry[first : first + k]], 1)  # [k, capacity + draft slots]
            out = self.attend(head, x, q, ws.keys, ws.values, mask)[0]  # [k, H]
            child_logp = self.log_probs(out, self.lm_head)  # [k, V]
            child_scores, child_tokens = child_logp.topk(k, -1)  # [k, k]
            cum = (front_scores[:, None] + child_scores).reshape(-1)  # [k * k] cumulative log-probability
            scores.append(cum)
            tokens.append(child_tokens.reshape(-1))
            parents.append(front_ids[:, None].expand(k, k).reshape(-1))
            if level < levels - 1:  # the next level expands the k best children
                best = cum.topk(k).indices
                parent_slot = best // k
                ancestry[first + k : first + 2 * k] |= ancestry[first + parent_slot]
                front_ids = count + best
                front_tokens = child_tokens.reshape(-1)[best]
                front_scores = cum[best]
                front_features = out[parent_slot]
            count += k * k
        all_scores, all_tokens, all_parents = torch.cat(scores), torch.cat(tokens), torch.cat(parents)
        keep = torch.sort(all_scores, descending=True, stable=True).indices[:n].sort().values  # parents first
        index = torch.full((count,), -1, dtype=torch.long, device=device)
        index[keep] = torch.arange(n, device=device)
        kept_parents = all_parents[keep]
        parents = torch.where(kept_parents >= 0, index[kept_parents.clamp_min(0)], -1)  # [n], -1 = the pending token
        return all_tokens[keep], device_tree(parents, levels)
