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
entries and growing the tree, is one fixed sequence of kernels (`draft_step`), fused by torch.compile on CUDA and
captured once as a CUDA graph. Every step replays it, the first one too (the prompt's last entry is staged like a
step's), and so do the last steps of a generation (the tree keeps its full depth; the decode loop drops tokens
past max_new_tokens). The tree's buffers (mask, depth, parents) are built inside the same graph
(`paradec.tree.device_tree_tensors`): the drafter adds no host synchronisation, so the host queues the head's
graph, the target's tree forward and the verification back to back, and the tree's shape reaches the host with
the verdict.

Reduced draft vocabulary (EAGLE-3): a head trained with one scores only its N draft ids (its own LM head [N, H],
the biggest matmul and top-k of a level shrunk from the target's V). The ids each level picks are mapped through the
head's `d2t` [N] buffer (draft id -> target id: one gather, on the device, inside the captured graph) before they go
anywhere: the next level's embedding lookups read target ids, and the proposal holds target ids only. Cumulative
scores are log-probabilities over the draft vocabulary; a token outside it is never drafted (q = 0 there).

Fused target features (EAGLE-3): a head with `feature_layers` asks the target for those layers' outputs
(`needs_hidden` is the layer tuple; the decode loop passes it to the runner), [m, k * H] per committed input. They are
staged as they come and fused to the head's feature space (`EagleHead.fuse`) where they are added, inside the step;
deeper levels read the head's own predictions, as for any head.

Lossless whatever the head or its map: nodes are point masses with distinct siblings (top-k ids, a map without
repeats), and the verifier scores them over the target's full vocabulary by token match. Greedy accepts a node iff
it is the target's exact argmax; sampling draws x ~ p from the target and accepts iff x is one of the children,
so the output is exactly plain decoding's. A bad head or a wrong map only lowers acceptance.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch
from torch.nn import functional as F

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Method, Resources
from paradec.drafters.options import Options, bound, engine_setting
from paradec.errors import ParadecError
from paradec.heads import EagleHead, target_weights
from paradec.runners.base import layer_taps
from paradec.tree import TreeBuffers, device_tree_tensors
from paradec.types import Proposal, Verdict

log = logging.getLogger(__name__)
POOL_KEPT = 64  # free workspaces an engine keeps for batched sequences (each one head-sized KV cache and its graphs)


@dataclass(frozen=True)
class EagleOptions(Options):
    method = "eagle"
    topk: int = field(default=8, metadata=bound(1, 64, limit="vocab"))  # children per expanded node, nodes per level
    depth: int = field(default=6, metadata=bound(1, 16))  # draft levels: the most draft tokens on one path
    # tree nodes scored per step (the best by cumulative draft log-probability)
    nodes: int = field(default=48, metadata=bound(1, limit="proposal"))
    # fuse each step's kernels with torch.compile (CUDA only); None: on CUDA when Triton is there. An engine
    # setting: compiling takes seconds to minutes, once per engine
    compile: bool | None = field(default=None, metadata=engine_setting())


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
        # a step's inputs, uploaded with one copy: x_{t+1} of the new entries, their count (<= rows), the first's slot
        self.inputs = torch.zeros(self.rows + 2, dtype=torch.long, device=device)
        self.tokens, self.count, self.start = self.inputs[: self.rows], self.inputs[-2], self.inputs[-1]
        self.features = torch.zeros(self.rows, config.feature_size, device=device, dtype=dtype)  # [rows, k * H] f_t
        self.length = torch.zeros((), dtype=torch.long, device=device)  # committed entries
        self.root = torch.zeros(config.hidden_size, device=device, dtype=dtype)  # predicted hidden of the pending
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}  # by tree size

    def fits(self, options: EagleOptions, length: int) -> bool:
        return options == self.options and length + self.rows <= self.capacity

    def state(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step reads and writes, in `draft_step`'s order."""
        return self.keys, self.values, self.slots, self.tokens, self.features, self.count, self.start, self.length, \
            self.root  # fmt: skip


# A step's math as plain functions of (head, weights, tensors, static ints), so that one `torch.compile` of
# `draft_step` covers a whole step: adding the staged entries and growing every level of the tree. Eagerly a step
# of the default shape is ~600 small kernels, whose latency (not their launch, which the CUDA graph removes) costs
# more than the 115M bench target's own forward; compiled, the elementwise work between the matrix products fuses.
def entries(head: EagleHead, embed: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor, positions):
    """Entries (tokens [T], features [T, H]) at positions [T] -> layer inputs (1, T, H), q, k, v (1, nh, T, hd)."""
    x = head.inputs(F.embedding(tokens, embed), features)[None]
    return (x, *head.project(x, positions))


def top_children(
    hidden: torch.Tensor, lm_head: torch.Tensor, d2t: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted hidden states [..., H] -> the k likeliest next tokens [..., k] as target ids, and their float32
    log-probabilities over the draft vocabulary (lm_head [N, H]; `d2t` [N] maps draft ids to target ids, None when
    the draft vocabulary is the target's)."""
    logits = (hidden @ lm_head.t()).float()  # [..., N]
    values, indices = wide_topk(logits, k)
    tokens = indices if d2t is None else d2t[indices]  # a gather: no host round trip, capturable
    return values - logits.logsumexp(-1, keepdim=True), tokens


def wide_topk(x: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, -1)` for a few long rows (a vocabulary wide), in two rounds: the top k of each chunk of a row,
    then the top k of those. The same values; on CUDA ~10x faster (one thread block per 256 entries instead of one
    per row: a single `topk` over 8 rows of 16k entries took 90 us on an H200, most of an EAGLE level)."""
    width = x.shape[-1]
    if width <= 2 * chunk or k > chunk:
        return x.topk(k, -1)
    pad = -width % chunk
    parts = F.pad(x, (0, pad), value=float("-inf")).unflatten(-1, (-1, chunk)).topk(k, -1)  # [..., chunks, k]
    offsets = torch.arange(0, width + pad, chunk, device=x.device)[:, None]
    values, top = parts.values.flatten(-2).topk(k, -1)
    return values, (parts.indices + offsets).flatten(-2).gather(-1, top)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Masked attention written out for a draft step's few queries (scores and softmax in float32, as fused
    kernels keep them): under torch.compile two matrix products and one fused softmax, cheaper at these sizes than
    the fused attention kernel that scaled_dot_product_attention picks (21 us a level on an H200)."""
    scores = (q.float() @ keys.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
    return weights.to(values.dtype) @ values


def extend(head, embed, keys, values, slots, tokens, features, count, start, length, root, capacity: int) -> None:
    """Add the staged entries (`count` of them, padded to tokens' length) at slots start, start + 1, ...; set
    `root` to the last one's prediction and `length` to the committed entries. Padding rows read stale inputs and
    write slots past the new committed length, which no query sees before they are overwritten."""
    rows = slots[: tokens.shape[0]] + start
    x, q, k, v = entries(head, embed, tokens, head.fuse(features), rows)  # features [rows, k * H] -> [rows, H]
    keys.index_copy_(2, rows, k)
    values.index_copy_(2, rows, v)
    last = (count - 1).view(1)  # only the last entry's prediction is needed: one query row
    mask = slots[None, :capacity] <= (start + last)[:, None]  # [1, capacity] causal over committed slots
    out = head.attend(
        x.index_select(1, last), q.index_select(2, last), keys[:, :, :capacity], values[:, :, :capacity], mask
    )
    root.copy_(out[0, 0])
    length.copy_(start + count)


def draft_step(
    head, embed, lm_head, d2t, keys, values, slots, tokens, features, count, start, length, root,
    capacity: int, topk: int, levels: int, nodes: int, staged: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One drafter step: add the staged entries (if `staged`), then grow the EAGLE-2 tree from `root`; `lm_head` and
    `d2t` are the draft vocabulary's (`top_children`). Returns the kept node tokens [nodes] (target ids) and the
    tree's depth [nodes+1], mask and parent (`device_tree_tensors`)."""
    if staged:
        extend(head, embed, keys, values, slots, tokens, features, count, start, length, root, capacity)
    k, device = topk, keys.device
    front_scores, front_tokens = top_children(root, lm_head, d2t, k)  # [k] level-1 nodes (target ids)
    front_ids = torch.arange(k, device=device)
    front_features = root.expand(k, -1)  # [k, H] each node's parent prediction
    scores, node_tokens, parents = [front_scores], [front_tokens], [torch.full((k,), -1, device=device)]
    count_nodes = k
    committed = (slots[:capacity] < length).expand(k, -1)  # [k, capacity]
    # ancestry of the draft slots: row i = slot i and the slots of its ancestors
    ancestry = torch.eye(keys.shape[2] - capacity, dtype=torch.bool, device=device)
    for level in range(1, levels):
        first = (level - 1) * k  # this level's entries go to draft slots first ... first + k - 1
        positions = (length - 1 + level).expand(k)
        x, q, key, value = entries(head, embed, front_tokens, front_features, positions)
        keys[:, :, capacity + first : capacity + first + k] = key
        values[:, :, capacity + first : capacity + first + k] = value
        mask = torch.cat([committed, ancestry[first : first + k]], 1)  # [k, capacity + draft slots]
        out = head.attend(x, q, keys, values, mask, attention)[0]  # [k, H]
        child_scores, child_tokens = top_children(out, lm_head, d2t, k)  # [k, k]
        cum = (front_scores[:, None] + child_scores).reshape(-1)  # [k * k] cumulative log-probability
        scores.append(cum)
        node_tokens.append(child_tokens.reshape(-1))
        parents.append(front_ids[:, None].expand(k, k).reshape(-1))
        if level < levels - 1:  # the next level expands the k best children
            best = cum.topk(k).indices
            parent_slot = best // k
            ancestry[first + k : first + 2 * k] |= ancestry[first + parent_slot]
            front_ids = count_nodes + best
            front_tokens = child_tokens.reshape(-1)[best]
            front_scores = cum[best]
            front_features = out[parent_slot]
        count_nodes += k * k
    all_scores, all_tokens, all_parents = torch.cat(scores), torch.cat(node_tokens), torch.cat(parents)
    keep = torch.sort(all_scores, descending=True, stable=True).indices[:nodes].sort().values  # parents first
    index = torch.full((count_nodes,), -1, dtype=torch.long, device=device)
    index[keep] = torch.arange(nodes, device=device)
    kept_parents = all_parents[keep]
    kept_parents = torch.where(kept_parents >= 0, index[kept_parents.clamp_min(0)], -1)  # -1 = the pending token
    return (all_tokens[keep], *device_tree_tensors(kept_parents, levels))


@lru_cache(maxsize=4)
def compiled_step(backend: str = "inductor") -> Callable:
    """`draft_step` through torch.compile: static shapes (a workspace's are fixed), one compilation per tree size.
    Without fullgraph: a step dynamo cannot compile runs eagerly instead of failing."""
    return torch.compile(draft_step, dynamic=False, backend=backend)


class EagleMethod(Method):
    """Per engine: the head, its workspace (one: generations run one at a time; replaced when a request's shape
    options or a longer sequence need another), and whether compiling the step failed (then no generation of this
    engine tries again: a failed compilation costs as long as a successful one)."""

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        super().__init__(resources, drafter_class)
        self.head = resources.heads("eagle")
        layers, target = self.head.config.feature_layers, resources.target
        if layers is not None and hasattr(target, "num_layers"):  # an EAGLE-3 head: the target must lend its layers
            layer_taps(layers, target.num_layers, f"the target of this EAGLE head (feature_layers {list(layers)})")
        self.workspace: Workspace | None = None
        self.pool: list[Workspace] = []  # free workspaces of batched sequences (`acquire` / `give_back`)
        self.compile_failed = False

    def limits(self) -> dict[str, int]:
        """topk is bounded by the ids the head scores: its draft vocabulary (the target's whole one by default)."""
        return {**super().limits(), "vocab": self.head.config.draft_vocab_size or self.resources.target.vocab_size}

    def check(self, options: EagleOptions) -> None:
        super().check(options)
        device = self.resources.target.device
        if options.compile and device.type != "cuda":
            raise ParadecError(
                f"option compile=True for method 'eagle' needs a CUDA engine; this one runs on {device.type} "
                "(compiling the draft step there takes minutes and brings nothing)",
                param="method_options",
            )

    def step(self, options: EagleOptions) -> Callable:
        """The draft step of a generation: compiled (by the engine's setting) unless compiling it failed."""
        compile = options.compile
        if compile is None:
            compile = self.resources.target.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return compiled_step() if compile and not self.compile_failed else draft_step

    def workspace_for(self, options: EagleOptions, length: int) -> Workspace:
        """The workspace if it suits `options` and `length` committed entries, else a new, roomier one (which
        replaces it for later generations)."""
        ws = self.workspace
        if ws is None or not ws.fits(options, length):
            ws = Workspace(self.head, options, capacity=max(1024, 2 * (length + options.depth + 1)))
            self.workspace = ws
        return ws

    def open(self, options: EagleOptions) -> Eagle:
        return Eagle(self, options)

    def open_for(self, resources: Resources, options: EagleOptions) -> Eagle:
        """A batched sequence's drafter: a workspace of its own from the pool (the head reads the target's hidden
        states and weights only)."""
        return Eagle(self, options, pooled=True)

    def acquire(self, options: EagleOptions, length: int) -> Workspace:
        """A free workspace that suits `options` and `length` (its graphs kept from earlier sequences), else a new
        one; each batched sequence holds its own until `give_back`."""
        for i, ws in enumerate(self.pool):
            if ws.fits(options, length):
                return self.pool.pop(i)
        return Workspace(self.head, options, capacity=max(1024, 2 * (length + options.depth + 1)))

    def give_back(self, ws: Workspace) -> None:
        self.pool.append(ws)
        del self.pool[:-POOL_KEPT]  # the oldest go first


@register
class Eagle(Drafter):
    name = "eagle"
    options_class = EagleOptions
    method_class = EagleMethod
    needs_hidden = True

    def __init__(self, method: EagleMethod, options: EagleOptions, *, pooled: bool = False) -> None:
        super().__init__(method.resources, options)
        self.method = method
        self.pooled = pooled  # a batched sequence: its own workspace from the method's pool, returned by `close`
        self.head = method.head
        self.needs_hidden = self.head.config.feature_layers or True  # the fused layers, or the last hidden state
        self.target = method.resources.target
        self.embed, target_lm_head = target_weights(self.target)
        self.lm_head, self.d2t = self.head.logits_weight(target_lm_head), self.head.d2t  # the draft vocabulary's
        self.step = method.step(options)
        self.ws: Workspace | None = None
        self.committed = 0  # entries added or staged (the host's copy of ws.length once they are added)
        self.staged = False  # new entries wait in the input buffers (added by the next step)

    # --- the drafter seam ------------------------------------------------------------------------------------
    def begin(self, state: DecodeState) -> None:
        self.committed, self.staged = 0, False
        self.ws = self._workspace(len(state.tokens))
        features = state.target_hidden
        if features is not None and features.shape[0] > 0:
            self._prefill(state.tokens, features)

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        features = state.target_hidden  # [m, k * H] target features of the inputs the step committed
        m = int(features.shape[0])
        end = len(state.tokens) - 1  # committed target positions; tokens[end] is pending
        start = end - m
        if start != self.committed or m > self.ws.rows:
            raise RuntimeError(f"EAGLE head holds {self.committed} entries; the step committed [{start}, {end})")
        if self.staged:  # the last step proposed nothing: add its entries before staging new ones
            self._step(0)
        if not self.ws.fits(self.options, end):  # a larger workspace: carry the committed entries over
            old, self.ws = self.ws, self._workspace(end)
            self.ws.keys[:, :, :start] = old.keys[:, :, :start]
            self.ws.values[:, :, :start] = old.values[:, :, :start]
            if self.pooled:
                self.method.give_back(old)
        self._stage(state.tokens[start + 1 : end + 1], features, start)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        """The full tree whenever the context has room for it, even when fewer than `depth` tokens may still be
        emitted (the decode loop drops what a step emits past max_new_tokens): then every step replays the one
        CUDA graph of the full tree, instead of growing smaller trees eagerly at the end of each generation."""
        k = self.options.topk
        # the forward scores 1 + n inputs after len(tokens) - 1 committed ones: stay inside the context
        budget = min(self.options.nodes, self.target.max_length - len(state.tokens))
        if self.committed == 0 or max_tokens < 1 or budget < 1:
            return Proposal.empty(state.device)
        tokens, layout = self._step(min(budget, k + (self.options.depth - 1) * k * k))
        return Proposal(tokens=tokens, layout=layout)

    def close(self) -> None:
        if self.pooled and self.ws is not None:
            self.method.give_back(self.ws)
        self.ws = None

    # --- decoding ---------------------------------------------------------------------------------------------
    def _workspace(self, length: int) -> Workspace:
        if self.pooled:
            return self.method.acquire(self.options, length)
        return self.method.workspace_for(self.options, length)

    def _stage(self, tokens: list[int], features: torch.Tensor, start: int) -> None:
        """Put the entries (tokens[i], features[i]) at positions start + i into the input buffers: the next step
        adds them. non_blocking: pageable memory is staged at once, and the copy waits for nothing queued before."""
        ws, m = self.ws, len(tokens)
        ws.inputs.copy_(torch.tensor([*tokens, *[0] * (ws.rows - m), m, start]), non_blocking=True)
        ws.features[:m] = features
        self.committed, self.staged = start + m, True

    def _prefill(self, tokens: list[int], features: torch.Tensor) -> None:
        """Entries of the prompt: entry t (t < L) reads (tokens[t + 1], f_t). Entries [0, L - 1) only need their
        keys and values (eagerly, here); the last one is staged, so that even the first step replays the graph."""
        ws, head = self.ws, self.head
        length = int(features.shape[0])
        if length > 1:
            ids = torch.tensor(tokens[1:length], device=ws.keys.device)
            _, _, k, v = entries(head, self.embed, ids, head.fuse(features[:-1]), ws.slots[: length - 1])
            ws.keys[:, :, : length - 1], ws.values[:, :, : length - 1] = k, v
        self._stage(tokens[length : length + 1], features[-1:], length - 1)

    def _step(self, n: int) -> tuple[torch.Tensor, TreeBuffers] | None:
        """Add the staged entries (if any) and grow a tree of n nodes (n = 0: only add them). By CUDA graph replay
        for a tree of the full size after staged entries, eagerly otherwise (shrunk trees at the context's end)."""
        ws, staged, options = self.ws, self.staged, self.options
        self.staged = False
        if n == 0:
            extend(self.head, self.embed, *ws.state(), ws.capacity)
            return None
        full = n == min(options.nodes, options.topk * (1 + ws.draft_slots))
        step = self.step if full else draft_step  # a compiled step per tree size would recompile at every size
        try:
            tokens, depth, mask, parent = self._grow(step, staged, full, n)
        except Exception as exc:  # compiling failed (a compiler error, a missing toolchain): draft eagerly from now on
            if step is draft_step:
                raise
            self.method.compile_failed, self.step = True, draft_step
            first_line = (str(exc).splitlines() or [""])[0][:200]
            log.warning(
                "compiling the EAGLE draft step failed, drafting eagerly: %s: %s", type(exc).__name__, first_line
            )
            tokens, depth, mask, parent = self._grow(draft_step, staged, full, n)
        return tokens, TreeBuffers(parents=None, depth=depth, mask=mask, parent=parent, max_depth=options.depth)

    def _grow(self, step: Callable, staged: bool, full: bool, n: int) -> tuple[torch.Tensor, ...]:
        """`step` over the workspace (the step is idempotent: same inputs, same writes): by CUDA graph replay for a
        full tree after staged entries, else directly. Returns the tokens [n] and the tree's depth, mask and parent."""
        ws, options = self.ws, self.options
        weights = (self.head, self.embed, self.lm_head, self.d2t)
        run = partial(step, *weights, *ws.state(), ws.capacity, options.topk, options.depth, n)
        if not (staged and full and ws.keys.device.type == "cuda"):
            return run(staged)
        if n not in ws.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up and compilation
                run(True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = run(True)
            ws.graphs[n] = (graph, outputs)
        graph, (tokens, *tree) = ws.graphs[n]
        graph.replay()
        return (tokens.clone(), *tree)  # the tree's buffers stay valid until the next replay, after this step
