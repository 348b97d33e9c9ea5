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

Inside a batch (`paradec.batch`): the workspaces are the rows of one `WorkspaceBank`, a row per cache slot of the
batch, and `Eagle.propose_all` runs the same `draft_step` over every row at once (every op is per row, with the rows
as its batch dimension; one sequence alone is a bank of one): one head forward per level and one CUDA graph for all
the batch's EAGLE sequences, where each replayed a graph of its own before. A row nobody holds computes its stale
inputs into itself only; adding a row's staged entries again writes the same values, so every row can run.

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


class WorkspaceBank:
    """The static buffers of `slots` workspaces, each a `Workspace` (a view of one row): a sequence decoded alone has
    a bank of one; a batch's EAGLE sequences share one bank, a row per cache slot of the batch, so that one step
    (`draft_step`) adds every row's staged entries and grows every row's tree: one head forward per level
    for the whole batch. A row no sequence holds computes stale inputs into its own row only."""

    def __init__(self, head: EagleHead, options: EagleOptions, capacity: int, slots: int = 1) -> None:
        config = head.config
        device, dtype = head.fc.weight.device, head.fc.weight.dtype
        self.options = options
        self.capacity = capacity  # committed slots of each row's KV cache; draft slots follow
        self.slots = slots
        self.rows = options.depth + 1  # most entries a step commits: the pending token and every draft level
        self.draft_slots = (options.depth - 1) * options.topk
        size = capacity + self.draft_slots
        self.keys = torch.zeros(slots, config.num_heads, size, config.head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.columns = torch.arange(size, device=device)  # the KV cache's slot indices
        # per row, a step's inputs, uploaded with one copy: x_{t+1} of the new entries, their count, the first's slot
        self.inputs = torch.zeros(slots, self.rows + 2, dtype=torch.long, device=device)
        self.features = torch.zeros(slots, self.rows, config.feature_size, device=device, dtype=dtype)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)  # committed entries per row
        self.root = torch.zeros(slots, config.hidden_size, device=device, dtype=dtype)  # the pendings' predictions
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}  # batched, by tree size
        self.workspaces = [Workspace(self, i) for i in range(slots)]

    def state(self) -> tuple[torch.Tensor, ...]:
        """Every row's tensors, in `draft_step`'s order."""
        rows = self.rows
        return self.keys, self.values, self.columns, self.inputs[:, :rows], self.features, self.inputs[:, -2], \
            self.inputs[:, -1], self.length, self.root  # fmt: skip


class Workspace:
    """The buffers for decoding one sequence with an EAGLE head (row `index` of a `WorkspaceBank`): its KV cache, a
    step's inputs, the running prediction, and the CUDA graphs captured over them. Reused by later sequences (of one
    engine, which runs one generation at a time; of a batch's cache slot) while the shape settings stay the same."""

    def __init__(self, bank: WorkspaceBank, index: int) -> None:
        self.bank, self.index = bank, index
        self.options, self.capacity, self.rows = bank.options, bank.capacity, bank.rows
        self.draft_slots = bank.draft_slots
        self.keys, self.values = bank.keys[index : index + 1], bank.values[index : index + 1]  # [1, nh, size, hd]
        self.slots = bank.columns
        self.inputs = bank.inputs[index]  # x_{t+1} of the staged entries, their count, the first's slot
        self.features = bank.features[index]  # [rows, k * H] f_t
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}  # by tree size

    @staticmethod
    def alone(head: EagleHead, options: EagleOptions, capacity: int) -> Workspace:
        return WorkspaceBank(head, options, capacity).workspaces[0]

    def fits(self, options: EagleOptions, length: int) -> bool:
        return options == self.options and length + self.rows <= self.capacity

    def state(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step reads and writes, in `draft_step`'s order: the bank's, row `index` alone (B = 1)."""
        i, rows, bank = self.index, self.rows, self.bank
        return self.keys, self.values, self.slots, bank.inputs[i : i + 1, :rows], bank.features[i : i + 1], \
            bank.inputs[i : i + 1, -2], bank.inputs[i : i + 1, -1], bank.length[i : i + 1], bank.root[i : i + 1]  # fmt: skip


# A step's math as plain functions of (head, weights, tensors, static ints), so that one `torch.compile` of
# `draft_step` covers a whole step: adding the staged entries and growing every level of the tree. Eagerly a step
# of the default shape is ~600 small kernels, whose latency (not their launch, which the CUDA graph removes) costs
# more than the 115M bench target's own forward; compiled, the elementwise work between the matrix products fuses.
def entries(head: EagleHead, embed: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor, positions):
    """Entries (tokens [B, T], features [B, T, H]) at positions [B, T] -> layer inputs (B, T, H), q, k, v
    (B, nh, T, hd); one sequence's (tokens [T], features [T, H], positions [T]) as B = 1."""
    x = head.inputs(F.embedding(tokens, embed), features)
    x = x[None] if x.dim() == 2 else x
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
    """Add each row's staged entries (`count[b]` of them, padded to tokens' length) at slots start[b], start[b] + 1,
    ...; set `root[b]` to the last one's prediction and `length[b]` to the committed entries (a row with count 0 keeps
    both). Padding rows read stale inputs and write slots past the new committed length, which no query sees before
    they are overwritten. Adding the same staged entries again writes the same values (idempotent)."""
    rows = slots[: tokens.shape[1]] + start[:, None]  # [B, R]
    x, q, k, v = entries(head, embed, tokens, head.fuse(features), rows)  # features [B, R, k * H] -> [B, R, H]
    index = rows[:, None, :, None].expand_as(k)
    keys.scatter_(2, index, k)
    values.scatter_(2, index, v)
    last = (count - 1).clamp_min(0)[:, None]  # [B, 1]: only the last entry's prediction is needed, one query row
    mask = slots[:capacity] <= (start[:, None] + last)  # [B, capacity] causal over committed slots
    out = head.attend(
        x.gather(1, last[..., None].expand(-1, -1, x.shape[-1])),
        q.gather(2, last[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])),
        keys[:, :, :capacity], values[:, :, :capacity], mask[:, None, None, :],
    )  # fmt: skip
    staged = count > 0
    root.copy_(torch.where(staged[:, None], out[:, 0], root))
    length.copy_(torch.where(staged, start + count, length))


def draft_step(
    head, embed, lm_head, d2t, keys, values, slots, tokens, features, count, start, length, root,
    capacity: int, topk: int, levels: int, nodes: int, staged: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One drafter step for every row b of a `WorkspaceBank` (one sequence's workspace: B = 1): add the staged
    entries (if `staged`), then grow each row's EAGLE-2 tree from `root[b]`; `lm_head` and `d2t` are the draft
    vocabulary's (`top_children`). Returns the kept node tokens [B, nodes] (target ids) and each tree's depth
    [B, nodes+1], mask and parent (`device_tree_tensors`). Rows never mix: every op is per row."""
    if staged:
        extend(head, embed, keys, values, slots, tokens, features, count, start, length, root, capacity)
    k, device, B = topk, keys.device, keys.shape[0]
    front_scores, front_tokens = top_children(root, lm_head, d2t, k)  # [B, k] level-1 nodes (target ids)
    front_ids = torch.arange(k, device=device).expand(B, k)
    front_features = root[:, None].expand(B, k, root.shape[-1])  # [B, k, H] each node's parent prediction
    scores, node_tokens, parents = [front_scores], [front_tokens], [torch.full((B, k), -1, device=device)]
    count_nodes = k
    committed = (slots[:capacity] < length[:, None])[:, None].expand(B, k, capacity)  # [B, k, capacity]
    # ancestry of the draft slots: row i = slot i and the slots of its ancestors
    draft = keys.shape[2] - capacity
    ancestry = torch.eye(draft, dtype=torch.bool, device=device).expand(B, draft, draft).clone()
    for level in range(1, levels):
        first = (level - 1) * k  # this level's entries go to draft slots first ... first + k - 1
        positions = (length - 1 + level)[:, None].expand(B, k)
        x, q, key, value = entries(head, embed, front_tokens, front_features, positions)
        keys[:, :, capacity + first : capacity + first + k] = key
        values[:, :, capacity + first : capacity + first + k] = value
        mask = torch.cat([committed, ancestry[:, first : first + k]], -1)  # [B, k, capacity + draft slots]
        out = head.attend(x, q, keys, values, mask[:, None], attention)  # [B, k, H]
        child_scores, child_tokens = top_children(out, lm_head, d2t, k)  # [B, k, k]
        cum = (front_scores[:, :, None] + child_scores).reshape(B, -1)  # [B, k * k] cumulative log-probability
        scores.append(cum)
        node_tokens.append(child_tokens.reshape(B, -1))
        parents.append(front_ids[:, :, None].expand(B, k, k).reshape(B, -1))
        if level < levels - 1:  # the next level expands the k best children
            best = cum.topk(k, -1).indices  # [B, k]
            parent_slot = best // k
            ancestry[:, first + k : first + 2 * k] |= ancestry.gather(
                1, (first + parent_slot)[..., None].expand(-1, -1, draft)
            )
            front_ids = count_nodes + best
            front_tokens = child_tokens.reshape(B, -1).gather(1, best)
            front_scores = cum.gather(1, best)
            front_features = out.gather(1, parent_slot[..., None].expand(-1, -1, out.shape[-1]))
        count_nodes += k * k
    all_scores, all_tokens, all_parents = torch.cat(scores, 1), torch.cat(node_tokens, 1), torch.cat(parents, 1)
    keep = (
        torch.sort(all_scores, dim=-1, descending=True, stable=True).indices[:, :nodes].sort(-1).values
    )  # parents first
    index = torch.full((B, count_nodes), -1, dtype=torch.long, device=device)
    index.scatter_(1, keep, torch.arange(nodes, device=device).expand(B, nodes))
    kept_parents = all_parents.gather(1, keep)
    kept_parents = torch.where(kept_parents >= 0, index.gather(1, kept_parents.clamp_min(0)), -1)  # -1: the pending
    return (all_tokens.gather(1, keep), *device_tree_tensors(kept_parents, levels))


def captured(graphs: dict, key: int, run: Callable[[], tuple]) -> tuple[torch.Tensor, ...]:
    """`run()`, a step over static buffers, replayed from its CUDA graph in `graphs` (captured under `key` on first
    use, after a warm-up on a side stream: compilation and lazy allocations may not happen in a capture). The
    outputs are the graph's buffers: valid until its next replay."""
    if key not in graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        graphs[key] = (graph, outputs)
    graph, outputs = graphs[key]
    graph.replay()
    return outputs


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
        self.banks: dict[EagleOptions, WorkspaceBank] = {}  # the rows of batched sequences, per shape options
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
            ws = Workspace.alone(self.head, options, capacity=max(1024, 2 * (length + options.depth + 1)))
            self.workspace = ws
        return ws

    def open(self, options: EagleOptions) -> Eagle:
        return Eagle(self, options)

    def open_for(self, resources: Resources, options: EagleOptions) -> Eagle:
        """A batched sequence's drafter: the row of its cache slot in the bank of the batch's slots (`bank`), which
        `Eagle.propose_all` steps for all the batch's EAGLE sequences at once (the head reads the target's hidden
        states and weights only)."""
        target = resources.target  # the sequence's slot of the batched runner (`SlotRunner`)
        return Eagle(self, options, row=(target.batched.slots, target.slot))

    def bank(self, options: EagleOptions, slots: int) -> WorkspaceBank:
        """The workspaces of a batch's `slots` cache slots under `options` (a row per slot, each with room for the
        whole context), made on first use; a larger batch makes a larger one (sequences on the old keep it)."""
        bank = self.banks.get(options)
        if bank is None or bank.slots < slots:
            capacity = self.resources.target.max_length + options.depth + 1
            bank = self.banks[options] = WorkspaceBank(self.head, options, capacity, slots)
        return bank


@register
class Eagle(Drafter):
    name = "eagle"
    options_class = EagleOptions
    method_class = EagleMethod
    needs_hidden = True

    def __init__(self, method: EagleMethod, options: EagleOptions, *, row: tuple[int, int] | None = None) -> None:
        super().__init__(method.resources, options)
        self.method = method
        self.row = row  # a batched sequence: (the batch's slots, its slot), its row of the method's `bank`
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
        self._stage(state.tokens[start + 1 : end + 1], features, start)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        """The full tree whenever the context has room for it, even when fewer than `depth` tokens may still be
        emitted (the decode loop drops what a step emits past max_new_tokens): then every step replays the one
        CUDA graph of the full tree, instead of growing smaller trees eagerly at the end of each generation."""
        n = self._tree_size(state, max_tokens)
        if n == 0:
            return Proposal.empty(state.device)
        tokens, layout = self._step(n)
        return Proposal(tokens=tokens, layout=layout)

    @classmethod
    def propose_all(cls, drafters: list[Drafter], states: list[DecodeState], max_tokens: list[int]) -> list[Proposal]:
        """The proposals of a batch step's EAGLE sequences: those of one bank that grow the full tree, in one step
        over the bank (`draft_step` over every row: one head forward per level for all of them, one CUDA graph);
        the others (a shrunk tree at the context's end, nothing to propose, a bank of their own) one by one."""
        proposals: list[Proposal | None] = [None] * len(drafters)
        banks: dict[int, list[int]] = {}
        for i, (d, s, m) in enumerate(zip(drafters, states, max_tokens, strict=True)):
            if d.row is not None and d.ws is not None and d._tree_size(s, m) == d._full_size():
                banks.setdefault(id(d.ws.bank), []).append(i)
        for members in banks.values():
            if len(members) > 1:
                for i, proposal in zip(members, drafters[members[0]]._step_bank([drafters[i] for i in members])):
                    proposals[i] = proposal
        return [
            p if p is not None else d.propose(s, m)
            for p, d, s, m in zip(proposals, drafters, states, max_tokens, strict=True)
        ]

    def close(self) -> None:
        self.ws = None

    # --- decoding ---------------------------------------------------------------------------------------------
    def _workspace(self, length: int) -> Workspace:
        if self.row is not None:
            slots, slot = self.row
            return self.method.bank(self.options, slots).workspaces[slot]
        return self.method.workspace_for(self.options, length)

    def _tree_size(self, state: DecodeState, max_tokens: int) -> int:
        """The nodes of this step's tree (0: nothing to propose)."""
        k = self.options.topk
        # the forward scores 1 + n inputs after len(tokens) - 1 committed ones: stay inside the context
        budget = min(self.options.nodes, self.target.max_length - len(state.tokens))
        if self.committed == 0 or max_tokens < 1 or budget < 1:
            return 0
        return min(budget, k + (self.options.depth - 1) * k * k)

    def _full_size(self) -> int:
        """The nodes of a full tree (the one a step's CUDA graph holds)."""
        return min(self.options.nodes, self.options.topk * (1 + self.ws.draft_slots))

    def _step_bank(self, members: list[Eagle]) -> list[Proposal]:
        """One step over every row of this drafter's bank (`members`: the sequences on it that propose a full
        tree, this one among them): every row adds its staged entries (a row whose entries were added adds them
        again: the same writes) and grows its tree; each member's proposal is its row's."""
        bank, options, n = self.ws.bank, self.options, self._full_size()
        weights = (self.head, self.embed, self.lm_head, self.d2t)

        def run(step: Callable) -> tuple:
            go = partial(step, *weights, *bank.state(), bank.capacity, options.topk, options.depth, n, True)
            return captured(bank.graphs, n, go) if bank.keys.device.type == "cuda" else go()

        outputs = self._drafting(members, run)
        tokens, depth, mask, parent = outputs
        proposals = []
        for d in members:
            d.staged = False
            b = d.ws.index
            tree = TreeBuffers(parents=None, depth=depth[b], mask=mask[b], parent=parent[b], max_depth=options.depth)
            proposals.append(Proposal(tokens=tokens[b].clone(), layout=tree))
        return proposals

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
        if n == self._full_size():
            tokens, depth, mask, parent = self._drafting([self], lambda step: self._grow(step, staged, True, n))
        else:  # a compiled step per tree size would recompile at every size
            tokens, depth, mask, parent = self._grow(draft_step, staged, False, n)
        return tokens, TreeBuffers(parents=None, depth=depth, mask=mask, parent=parent, max_depth=options.depth)

    def _drafting(self, members: list[Eagle], run: Callable[[Callable], tuple]) -> tuple:
        """`run(step)` with this drafter's step; when compiling it fails (a compiler error, a missing toolchain),
        every member drafts eagerly from now on, and so does this run."""
        step = self.step
        try:
            return run(step)
        except Exception as exc:
            if step is draft_step:
                raise
            self.method.compile_failed = True
            for d in members:
                d.step = draft_step
            first_line = (str(exc).splitlines() or [""])[0][:200]
            log.warning(
                "compiling the EAGLE draft step failed, drafting eagerly: %s: %s", type(exc).__name__, first_line
            )
            return run(draft_step)

    def _grow(self, step: Callable, staged: bool, full: bool, n: int) -> tuple[torch.Tensor, ...]:
        """`step` over the workspace (the step is idempotent: same inputs, same writes): by CUDA graph replay for a
        full tree after staged entries, else directly. Returns the tokens [n] and the tree's depth, mask and parent."""
        ws, options = self.ws, self.options
        weights = (self.head, self.embed, self.lm_head, self.d2t)
        run = partial(step, *weights, *ws.state(), ws.capacity, options.topk, options.depth, n)
        if staged and full and ws.keys.device.type == "cuda":
            tokens, *tree = captured(ws.graphs, n, partial(run, True))
        else:
            tokens, *tree = run(staged)
        # (the tree's buffers stay valid until the next replay, after this step)
        return (tokens[0].clone(), *(t[0] for t in tree))
