"""`BatchedNativeRunner`: B cache slots over one `Transformer`'s weights; one ragged forward scores a `Step`.

Each sequence of a batch lives in a cache slot (`allocate` / `release`). `forward(step)` scores the flat inputs of
a `paradec.step.Step` (many sequences, each its own chain or tree, back to back, no padding) in one forward:
input j of sequence b (slot s = step.slots[b]) sits at position `length(s) + depth_b[j]`, writes its keys/values
provisionally to column `length(s) + j` of slot s, and attends to the committed columns of slot s and to the
sequence's own inputs its mask row allows; never to another slot. `commit(keeps)` then applies `NativeRunner.commit`'s
rule per sequence (a chain prefix, or a root path compacted onto the columns after the prefix), all slots' moves in
one gather/scatter. `view(slot)` is one slot as a single-sequence `Runner` (`paradec.runners.base`).

Each slot's bookkeeping is a `Ledger` (`paradec.runners.ledger`): its committed length, its part of the pending
forward, the rules of commit and rollback. A forward pends on every slot of its step; a rollback or release of a slot
cancels a forward of that slot alone (the single-sequence rule), while one over several slots is a unit: rolling back
or releasing one of them first is a RuntimeError (commit it, or `cancel()` the whole forward).

Layout of the arithmetic (`paradec.runners.native.model`: `ragged_forward` and friends, the same weights and ops
as `Transformer.forward`):

- the cache is one tensor (L, 2, slots, nkv, S, hs), zeros at first (`SlotKVCache`), so compaction over many slots
  is one gather and one scatter, and a slot's keys for one KV head are contiguous along S;
- the row-wise work (embedding, q/k/v, norms, rope, MLP, LM head: nearly all FLOPs) runs on the flat [N] inputs,
  unpadded, so a batch of one decode token next to a 6-node tree costs 7 rows, not 2 x 6;
- attention is the only per-sequence op. It runs in a padded-query layout: queries scattered to
  [B, nkv, g*n_max, hs] (the batch-1 GQA layout per sequence), keys/values of the step's slots [B, nkv, kv, hs]
  (a view when the slots are consecutive, else a gather), kv = `kv_bucket(max over the step of length + n)`, and an
  additive bias [B, 1, g*n_max, kv] (committed columns of the slot; own provisional inputs by mask; padded query
  rows see column 0 only, so no softmax row is all -inf). One `scaled_dot_product_attention` then covers every
  sequence and only the real rows are gathered back. Why padded queries and not a varlen attention kernel: the
  padding is n_max - n_b query rows per sequence (steps mix chains and trees of tens of inputs, and attention is
  a small share of a step's FLOPs), while SDPA is a stock kernel on every backend and dtype, and a varlen kernel
  (flash-attn's, or our own) would be one more dependency to own, and to capture in graphs later.

Static buckets and CUDA graphs (`static_shapes`, default on CUDA): a step of at most `StaticRagged.max_inputs`
inputs and `Q_BUCKETS[-1]` per sequence is padded to buckets (sequences, flat inputs, inputs per sequence, cache
columns) over static buffers and replayed as one CUDA graph per bucket (`paradec.runners.native.graphs.
StaticRagged`; padding writes go to one scratch slot past the `slots` handed out). The eager ragged block launched
~40 kernels per layer, which made a step at batch 1-16 cost 30-55 ms on an H200 for the 1.5B target
(bench/results/batch-h200-2026-12-02). On a compiled model (the default on CUDA, via `sharing`) each block also
runs through torch.compile(dynamic=True), inside the graphs or not. Shapes come from host ints the runner tracks
(slot lengths, step sizes), so forward/commit do not synchronise with the host: the per-step index lists are built
on the host and go to the device with one non_blocking copy (as `NativeRunner`'s compaction list does).
A single-sequence chain longer than `PREFILL_CHUNK` inputs (a prompt) runs in chunks, so memory stays bounded.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from paradec.errors import ParadecError
from paradec.runners.base import HiddenWanted, LogitsWanted, RunnerOutput, check_inputs, layer_taps
from paradec.runners.ledger import Ledger, Parents, tree_parents
from paradec.runners.native.graphs import KV_ALIGN, StaticRagged, kv_bucket
from paradec.runners.native.kv_cache import SlotKVCache
from paradec.runners.native.loading import load_transformer, read_config, resolve_dtype
from paradec.runners.native.model import (
    ModelArgs,
    RaggedLayout,
    Transformer,
    ragged_attention_bias,
    ragged_forward,
    ragged_index,
    unsupported_reason,
)
from paradec.runners.native.runner import DEFAULT_MAX_CACHE_LEN, NativeRunner
from paradec.step import SeqInputs, Step
from paradec.tree import TreeBuffers, chain_parents
from paradec.types import Proposal

PREFILL_CHUNK = 1024  # a single-sequence chain longer than this runs in chunks (the bias is chunk x cache)
CHAIN_BUFFER = 1024  # chains up to this long take their depth/mask from device buffers built once


@dataclass(frozen=True)
class _Seq:
    """One sequence of a forward, checked: its slot, inputs and (device) layout; parents as its slot's `Ledger`
    keeps them for the commit (None: a chain, DEVICE_TREE: a tree built on the device)."""

    slot: int
    size: int
    depth: torch.Tensor | None  # [n] int64 on the device (None: a chain, from the runner's buffers)
    mask: torch.Tensor | None  # [n, n] bool on the device (None: a chain)
    parents: Parents


class BatchedNativeRunner:
    """B cache slots over one Transformer's weights; one ragged forward scores a `Step` (many sequences)."""

    pard: dict | None = None  # as `NativeRunner.pard`

    def __init__(
        self,
        model: Transformer,
        *,
        slots: int,
        max_cache_len: int | None = None,
        static_shapes: bool | None = None,
    ) -> None:
        """`static_shapes` (default: on CUDA) pads steps to buckets over static buffers (`StaticRagged`), captured
        as CUDA graphs on CUDA; the cache then holds one scratch slot more than `slots`."""
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ParadecError(f"slots must be a positive int, got {slots!r}")
        args = model.args
        self.model = model
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.vocab_size = args.vocab_size
        self.hidden_size = args.hidden_size
        self.num_layers = args.n_layers
        self.slots = slots
        max_cache_len = max_cache_len or min(args.max_position_embeddings, DEFAULT_MAX_CACHE_LEN)
        if not 0 < max_cache_len <= args.max_position_embeddings:
            raise ParadecError(
                f"max_cache_len {max_cache_len} must lie in [1, max_position_embeddings={args.max_position_embeddings}]"
            )
        self.max_length = max_cache_len
        capacity = -(-max_cache_len // KV_ALIGN) * KV_ALIGN
        self.static_shapes = self.device.type == "cuda" if static_shapes is None else static_shapes
        self.cache = SlotKVCache(
            args.n_layers, slots + self.static_shapes, args.n_kv_heads, args.head_dim, capacity, self.device,
            self.dtype,
        )  # fmt: skip
        self._static = (
            StaticRagged(model, self.cache, capture=self.device.type == "cuda") if self.static_shapes else None
        )
        self._free = list(range(slots))  # a heap: `allocate` hands out the lowest free slot
        self._allocated = [False] * slots
        # per slot: the committed length (== cache.lengths[slot]) and its part of the pending forward
        self._ledgers = [
            Ledger(
                max_cache_len,
                name="BatchedNativeRunner",
                what="the batched native runner",
                hint=" (raise max_cache_len)",
            )
            for _ in range(slots)
        ]
        self._pending: tuple[_Seq, ...] | None = None  # the pending forward's sequences, in step order
        size = min(CHAIN_BUFFER, capacity)
        self._arange = torch.arange(size, device=self.device)
        self._tril = torch.ones(size, size, dtype=torch.bool, device=self.device).tril()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = "float32",
        max_cache_len: int | None = None,
        exact: bool = False,
        static_shapes: bool | None = None,
    ) -> BatchedNativeRunner:
        """Load a Llama/Mistral/Qwen2/Qwen3 checkpoint directory (eager: not compiled); `exact` as
        `NativeRunner.from_pretrained`'s, `static_shapes` as the constructor's."""
        config = read_config(path)
        reason = unsupported_reason(config, max_cache_len)
        if reason is not None:
            raise ParadecError(f"{str(path)!r}: {reason}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        model = load_transformer(path, device=device, dtype=resolve_dtype(dtype, config), compile=False, exact=exact)
        return cls(model, slots=slots, max_cache_len=max_cache_len, static_shapes=static_shapes)

    @classmethod
    def sharing(cls, runner: NativeRunner, slots: int, max_cache_len: int | None = None) -> BatchedNativeRunner:
        """B slots over `runner`'s weights (no copy; a cache of their own). `max_cache_len` defaults to the runner's."""
        if tuple(runner.layer_ids) != tuple(range(runner.num_layers)):
            raise ParadecError(
                f"a batched runner runs every layer; this native runner runs layers {list(runner.layer_ids)} only"
            )
        batched = cls(
            runner.model, slots=slots, max_cache_len=max_cache_len or runner.max_length,
            static_shapes=runner.static_shapes,
        )  # fmt: skip
        batched.pard = runner.pard
        return batched

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def embed_weight(self) -> torch.Tensor:
        """Token embedding [V, H]; on a tensor-parallel model the whole matrix, gathered once from the ranks and
        kept (a V x H copy per rank, `Transformer.full_embed_weight`; every rank asks)."""
        return self.model.full_embed_weight()

    def lm_head_weight(self) -> torch.Tensor:
        """LM head [V, H] (the embedding when tied); gathered once under tensor parallelism, as `embed_weight`."""
        return self.model.full_output_weight()

    # --- slots --------------------------------------------------------------------------------------------------

    def allocate(self) -> int:
        """A free slot (the lowest), its length 0."""
        if not self._free:
            raise ParadecError(f"all {self.slots} cache slots of the batched native runner are in use (release one)")
        slot = heapq.heappop(self._free)
        self._allocated[slot] = True
        self._ledgers[slot].reset()
        self.cache.truncate(slot, 0)
        return slot

    def release(self, slot: int) -> None:
        """Free `slot` (its length 0; cancels a forward of it alone). Its stale entries stay in the cache, masked out
        until overwritten."""
        self._check_allocated(slot, "release")
        self._check_alone(slot, "release")
        self._ledgers[slot].reset()
        self._forget_cancelled()
        self.cache.truncate(slot, 0)
        self._allocated[slot] = False
        heapq.heappush(self._free, slot)

    @property
    def free(self) -> int:
        """Free slots."""
        return len(self._free)

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs of batched steps captured so far (one per bucket of `StaticRagged` met twice)."""
        return 0 if self._static is None or self._static.bank is None else len(self._static.bank.graphs)

    @property
    def max_bucketed_inputs(self) -> int | None:
        """Inputs of the largest step that runs on the static buckets (larger ones run unbucketed, without a
        CUDA graph); None without static shapes (every step runs unbucketed)."""
        return None if self._static is None else self._static.max_inputs

    def new_graph_demand(self, step: Step, hidden: HiddenWanted = False) -> int:
        """0 if `step` (a forward not yet run) would replay a CUDA graph, or runs without one either way (no graphs; a
        step too wide for the buckets); else, its bucket not captured yet (its first uses run eagerly, then it is
        captured: tens of ms each for the 1.5B on an H200), how often this has been asked of that bucket, this time
        included (`GraphBank.want`)."""
        static = self._static
        if static is None or static.bank is None or not static.fits(step.size, max(step.sizes)):
            return 0
        taps = layer_taps(hidden, self.num_layers, "the batched native runner")
        lengths = self.cache.lengths
        return static.wanted(static.key([s.slot for s in step.seqs], list(step.sizes), lengths, taps))

    @property
    def graph_misses(self) -> int:
        """Batched steps so far that replayed no CUDA graph: a bucket's first use (run eagerly) or its capture."""
        return 0 if self._static is None or self._static.bank is None else self._static.bank.misses

    @property
    def graphs_uncaptured(self) -> int:
        """Of `graph_misses`, the steps run eagerly because the bank held `StaticRagged.max_graphs` graphs already."""
        return 0 if self._static is None or self._static.bank is None else self._static.bank.uncaptured

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache of every slot, the scratch slot included (allocated up front)."""
        return self.cache.data.numel() * self.cache.data.element_size()

    def length(self, slot: int) -> int:
        """Committed tokens of `slot` (0 for a free one)."""
        self._check_index(slot)
        return self._ledgers[slot].length

    def rollback(self, slot: int, length: int) -> None:
        """Shorten the committed prefix of `slot` to `length` tokens (cancels a forward of it alone); other slots
        are untouched."""
        self._check_allocated(slot, "rollback")
        self._check_alone(slot, "rollback")
        self._ledgers[slot].rollback(length, f" of slot {slot}")  # checked first: a failed rollback cancels nothing
        self._forget_cancelled()
        self.cache.truncate(slot, self._ledgers[slot].length)

    def cancel(self) -> None:
        """Drop the pending forward, if any, on every slot of it (their provisional entries); lengths stay."""
        if self._pending is not None:
            for seq in self._pending:
                self._ledgers[seq.slot].cancel()
            self._pending = None

    def view(self, slot: int) -> SlotRunner:
        """`slot` as a single-sequence `Runner` (valid while the slot stays allocated)."""
        self._check_allocated(slot, "view")
        return SlotRunner(self, slot)

    def _check_index(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise ParadecError(f"cache slot {slot!r} outside [0, {self.slots}) of the batched native runner")

    def _check_allocated(self, slot: int, what: str) -> None:
        self._check_index(slot)
        if not self._allocated[slot]:
            raise ParadecError(f"{what} of cache slot {slot}, which is free (not allocated)")

    def _check_alone(self, slot: int, what: str) -> None:
        """A rollback/release of a slot in the pending forward cancels a forward of that slot alone (as
        `NativeRunner.rollback` does); the forward of a batch is for `commit` (or `cancel`) to settle first."""
        pending = self._pending
        if pending is not None and len(pending) > 1 and any(s.slot == slot for s in pending):
            raise RuntimeError(
                f"{what} of cache slot {slot} while the last forward over slots {[s.slot for s in pending]} "
                "awaits commit(): commit it (or cancel() it) first"
            )

    def _forget_cancelled(self) -> None:
        """The pending forward is gone once its slots' ledgers cancelled it (a one-slot forward's rollback)."""
        if self._pending is not None and all(self._ledgers[s.slot].pending is None for s in self._pending):
            self._pending = None

    def _check_idle(self) -> None:
        if self._pending is not None:
            raise RuntimeError("BatchedNativeRunner.forward() called again before commit() of the previous forward")

    def _begin(self, seqs: tuple[_Seq, ...]) -> None:
        """The forward of `seqs` (run) pends on each of their slots."""
        for seq in seqs:
            self._ledgers[seq.slot].begin(seq.size, seq.parents)
        self._pending = seqs

    # --- forward / commit ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self, step: Step, *, logits: Literal["all", "none"] = "all", hidden: HiddenWanted = False
    ) -> RunnerOutput:
        """Score every sequence of `step` in one forward: rows in the step's flat order; logits [N, V] float32,
        hidden [N, H] (True: after the final norm) or the outputs of decoder layers ([N, k*H], `runners.base`)."""
        if logits not in ("all", "none"):
            raise ValueError(f"logits must be 'all' or 'none', got {logits!r}")
        return self._forward(step, logits, hidden)

    def _forward(self, step: Step, logits: LogitsWanted, hidden: HiddenWanted) -> RunnerOutput:
        """`forward`, and "last" (the last row, [1, V]) for a one-sequence step (`SlotRunner`)."""
        self._check_idle()
        taps = layer_taps(hidden, self.num_layers, "the batched native runner")
        seqs = tuple(self._check_seq(b, s) for b, s in enumerate(step.seqs))
        tokens = step.tokens.to(self.device, non_blocking=True)
        if len(seqs) == 1 and seqs[0].parents is None and seqs[0].size > PREFILL_CHUNK:
            result = self._forward_chain(seqs[0].slot, tokens, logits, bool(hidden), taps)
        else:
            out_logits, states = self._run(tokens, seqs, logits, taps)
            result = RunnerOutput(logits=out_logits, hidden=states if hidden else None)
        self._begin(seqs)
        return result

    @property
    def bucketed_chunk(self) -> int | None:
        """Inputs of the longest one-sequence chain that runs on the static buckets (a CUDA graph once its bucket
        is captured); None without static shapes."""
        return None if self._static is None else min(self._static.max_inputs, self._static.max_seq_inputs)

    @torch.no_grad()
    def prefill(
        self, chains: Sequence[tuple[int, Sequence[int]]], *, hidden: HiddenWanted = False, bucketed: bool = False
    ) -> list[torch.Tensor] | None:
        """Append each (slot, token ids) chain to its slot's committed prefix, every chain in one forward that then
        commits: the prompt chunks of a batch's joining sequences (`paradec.batch.BatchDecoder`). The forward runs
        unbucketed (a wave of prompt chunks comes in too many shapes for CUDA graph buckets, and each would meet
        one of its own) unless `bucketed` and it fits them (one short chunk: its graph is replayed once captured);
        one chain longer than PREFILL_CHUNK runs in chunks, several chains run as one forward (the caller bounds
        their padded size: sequences x the longest). Returns each chain's hidden states (as `forward`'s) when
        `hidden`, else None."""
        self._check_idle()
        if not chains:
            raise ValueError("prefill needs at least one (slot, token ids) chain")
        taps = layer_taps(hidden, self.num_layers, "the batched native runner")
        seqs = []
        for b, (slot, ids) in enumerate(chains):
            if len(ids) == 0:
                raise ValueError(f"chain {b} (slot {slot!r}) of the prefill has no tokens")
            self._check_room(b, slot, len(ids))
            seqs.append(_Seq(slot, len(ids), None, None, None))
        if len({s.slot for s in seqs}) != len(seqs):
            raise ValueError(f"a prefill feeds each cache slot once, got slots {[s.slot for s in seqs]}")
        seqs = tuple(seqs)
        tokens = torch.tensor([t for _, ids in chains for t in ids], dtype=torch.long)
        tokens = tokens.to(self.device, non_blocking=True)
        if len(seqs) == 1 and seqs[0].size > PREFILL_CHUNK:
            states = self._forward_chain(seqs[0].slot, tokens, "none", bool(hidden), taps, bucketed).hidden
        else:
            _, states = self._run(tokens, seqs, "none", taps, bucketed)
            if hidden and bucketed:
                states = states.clone()  # a view of static buffers on the bucketed path
        self._begin(seqs)
        self.commit([s.size for s in seqs])
        return list(states.split([s.size for s in seqs])) if hidden else None

    def _check_seq(self, b: int, seq: SeqInputs) -> _Seq:
        if seq.tokens.dim() != 1 or seq.tokens.shape[0] == 0:
            raise ValueError(f"sequence {b}: tokens must be a non-empty 1-D tensor, got {tuple(seq.tokens.shape)}")
        n, tree = seq.size, seq.tree
        self._check_room(b, seq.slot, n)
        if tree.size != n:
            raise ValueError(f"sequence {b}: its tree has {tree.size} inputs but {n} tokens were given")
        if tree.mask.device != self.device:
            tree = tree.to(self.device)
        return _Seq(seq.slot, n, tree.depth, tree.mask, tree_parents(tree))

    def _check_room(self, b: int, slot: int, n: int) -> None:
        """Sequence b of a step names an allocated slot with room for its n inputs."""
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise ParadecError(f"sequence {b} of the step names cache slot {slot!r}, outside [0, {self.slots})")
        if not self._allocated[slot]:
            raise ParadecError(f"sequence {b} of the step names cache slot {slot}, which is free (allocate() it)")
        self._ledgers[slot].check_forward(n, f"sequence {b} (slot {slot})")

    def _forward_chain(
        self,
        slot: int,
        tokens: torch.Tensor,
        logits: LogitsWanted,
        hidden: bool,
        taps: tuple[int, ...],
        bucketed: bool = True,
    ) -> RunnerOutput:
        """A long chain of one slot in consecutive forwards of PREFILL_CHUNK inputs: each chunk counts as committed
        for the next; the length is restored afterwards, so `commit` sees one forward (`NativeRunner._forward_chain`)."""
        n, start, size = tokens.shape[0], self.cache.lengths[slot], PREFILL_CHUNK
        hiddens, all_logits = [], []
        try:
            for offset in range(0, n, size):
                count = min(size, n - offset)
                want = logits if logits == "all" or offset + count == n else "none"
                chunk = (_Seq(slot, count, None, None, None),)
                out_logits, states = self._run(tokens[offset : offset + count], chunk, want, taps, bucketed)
                if hidden:
                    hiddens.append(states.clone())  # a view of static buffers on the bucketed path
                if out_logits is not None:
                    all_logits.append(out_logits)
                self.cache.advance(slot, count)
        finally:
            self.cache.truncate(slot, start)
        return RunnerOutput(
            logits=torch.cat(all_logits) if all_logits else None, hidden=torch.cat(hiddens) if hidden else None
        )

    def _chain(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth and mask of a chain of n inputs on the device."""
        if n <= self._arange.shape[0]:
            return self._arange[:n], self._tril[:n, :n]
        return (
            torch.arange(n, device=self.device),
            torch.ones(n, n, dtype=torch.bool, device=self.device).tril(),
        )

    def _chain_tree(self, n: int) -> TreeBuffers:
        """A chain of n inputs as `TreeBuffers` (what `SlotRunner.forward` passes for tree=None)."""
        depth, mask = self._chain(n)
        return TreeBuffers(parents=chain_parents(n - 1), depth=depth, mask=mask, parent=depth - 1, max_depth=n - 1)

    def _run(
        self,
        tokens: torch.Tensor,
        seqs: tuple[_Seq, ...],
        logits: LogitsWanted,
        taps: tuple[int, ...],
        bucketed: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One ragged forward of `seqs` (checked) over `tokens` [N] on the device: logits (float32) and the final
        hidden state, or the outputs of layers `taps`; on the static buckets when they fit it, unless `bucketed` is
        False."""
        lengths = self.cache.lengths
        B = len(seqs)
        sizes = [s.size for s in seqs]
        n_max = max(sizes)
        if bucketed and self._static is not None and self._static.fits(int(tokens.shape[0]), n_max):
            # a chain's layout is the one its row of the static buffers holds already: no copy (two per sequence
            # and step were most of a batch-32 step's 67 host copies, 2026-12-03)
            layouts = [
                (s.slot, s.size, None, None) if s.parents is None else (s.slot, s.size, s.depth, s.mask) for s in seqs
            ]
            h, states = self._static(tokens, layouts, lengths, taps)
            if logits == "none":
                return None, states
            return self.model.logits(h[-1:] if logits == "last" else h).float(), states
        kv_len = kv_bucket(max(lengths[s.slot] + s.size for s in seqs), self.cache.capacity)
        # host index lists, one non_blocking copy: rows, slots, columns, positions' starts per input; slots, starts,
        # sizes per sequence
        per_seq = torch.tensor([[s.slot, lengths[s.slot], s.size] for s in seqs], dtype=torch.long)  # (B, 3)
        n_total = int(tokens.shape[0])
        seq_of, j = ragged_index(per_seq[:, 2], n_total)  # (N,) each
        starts = per_seq[seq_of, 1]
        packed = torch.cat([seq_of * n_max + j, per_seq[seq_of, 0], starts + j, starts, per_seq.T.reshape(-1)])
        packed = packed.to(self.device, non_blocking=True)
        rows, row_slots, columns, row_starts = packed[: 4 * n_total].view(4, n_total)
        seq_slots, seq_starts, seq_sizes = packed[4 * n_total :].view(3, B)
        layouts = [self._chain(s.size) if s.depth is None else (s.depth, s.mask) for s in seqs]
        if B == 1:
            depth, masks = layouts[0][0], layouts[0][1][None]
        else:
            depth = torch.cat([d for d, _ in layouts])
            masks = torch.zeros(B, n_max, n_max, dtype=torch.bool, device=self.device)
            for b, (s, (_, mask)) in enumerate(zip(seqs, layouts)):
                masks[b, : s.size, : s.size] = mask
        group = self.args.n_heads // self.args.n_kv_heads
        slot_ids = [s.slot for s in seqs]
        consecutive = slot_ids == list(range(slot_ids[0], slot_ids[0] + B))
        layout = RaggedLayout(
            rows=rows,
            slots=row_slots,
            columns=columns,
            seq_slots=seq_slots,
            bias=ragged_attention_bias(seq_starts, seq_sizes, masks, kv_len, group, self.dtype),
            n_max=n_max,
            kv_len=kv_len,
            slot_range=(slot_ids[0], slot_ids[0] + B) if consecutive else None,
        )
        out = ragged_forward(self.model, tokens, row_starts + depth, layout, self.cache.data, taps)
        h, states = out if taps else (out, out)
        if logits == "none":
            return None, states
        return self.model.logits(h[-1:] if logits == "last" else h).float(), states

    @torch.no_grad()
    def commit(self, keeps: Sequence[list[int] | int]) -> None:
        """One entry per sequence of the last forward, in step order, each with `NativeRunner.commit`'s rule (its
        slot's `Ledger`): an int keeps that chain prefix, a list the inputs of one root path (compacted onto the
        columns after the prefix). Every entry is checked before any is applied: a failed commit leaves the forward
        pending."""
        if self._pending is None:
            raise RuntimeError("BatchedNativeRunner.commit() without a forward() to commit")
        seqs = self._pending
        if isinstance(keeps, (int, str, bytes)) or not isinstance(keeps, Sequence):
            raise TypeError(f"keeps must be a sequence of one keep per sequence of the last forward, got {keeps!r}")
        if len(keeps) != len(seqs):
            raise ValueError(f"commit got {len(keeps)} keeps for the {len(seqs)} sequences of the last forward")
        ledgers = [self._ledgers[seq.slot] for seq in seqs]
        commits = [
            ledger.check(keep, f" of sequence {b} (slot {seq.slot})")
            for b, (seq, ledger, keep) in enumerate(zip(seqs, ledgers, keeps))
        ]
        self._pending = None
        for ledger, commit in zip(ledgers, commits):
            ledger.settle(commit)
        moves = [(seq.slot, source, dest) for seq, c in zip(seqs, commits) for source, dest in c.moves]
        if moves:
            index = torch.tensor(moves, dtype=torch.long).T.contiguous()  # (3, m): slots, sources, destinations
            self.cache.compact(index.to(self.device, non_blocking=True))
        for seq, commit in zip(seqs, commits):
            self.cache.advance(seq.slot, commit.count)


class SlotRunner:
    """One slot of a `BatchedNativeRunner` as a single-sequence `Runner` (`paradec.runners.base`): each forward is
    a one-sequence `Step` of the batched runner (a chain longer than PREFILL_CHUNK runs in chunks)."""

    def __init__(self, batched: BatchedNativeRunner, slot: int) -> None:
        self.batched = batched
        self.slot = slot
        self.pard = batched.pard
        self.device = batched.device
        self.dtype = batched.dtype
        self.vocab_size = batched.vocab_size
        self.max_length = batched.max_length
        self.hidden_size = batched.hidden_size
        self.num_layers = batched.num_layers
        self._empty = Proposal.empty(batched.device)

    @property
    def length(self) -> int:
        return self.batched.length(self.slot)

    def reset(self) -> None:
        self.batched.rollback(self.slot, 0)

    def rollback(self, length: int) -> None:
        self.batched.rollback(self.slot, length)

    def embed_weight(self) -> torch.Tensor:
        return self.batched.embed_weight()

    def lm_head_weight(self) -> torch.Tensor:
        return self.batched.lm_head_weight()

    @torch.no_grad()
    def forward(
        self,
        token_ids: torch.Tensor,
        tree: TreeBuffers | None = None,
        *,
        logits: LogitsWanted = "all",
        hidden: HiddenWanted = False,
    ) -> RunnerOutput:
        check_inputs(token_ids, logits)
        n = int(token_ids.shape[0])
        if tree is None:
            if n > PREFILL_CHUNK:  # a prompt: chunked without ever building its n x n mask
                return self._long_chain(token_ids, logits, hidden)
            tree = self.batched._chain_tree(n)
        return self.batched._forward(Step([SeqInputs(self.slot, token_ids, tree, self._empty)]), logits, hidden)

    def _long_chain(self, token_ids: torch.Tensor, logits: LogitsWanted, hidden: HiddenWanted) -> RunnerOutput:
        batched = self.batched
        batched._check_idle()
        taps = layer_taps(hidden, batched.num_layers, "the batched native runner")
        n = int(token_ids.shape[0])
        batched._check_room(0, self.slot, n)
        tokens = token_ids.to(batched.device, non_blocking=True)
        result = batched._forward_chain(self.slot, tokens, logits, bool(hidden), taps)
        batched._begin((_Seq(self.slot, n, None, None, None),))
        return result

    def commit(self, keep: list[int] | int) -> None:
        if self.batched._ledgers[self.slot].pending is None:  # never another slot's forward
            raise RuntimeError(f"BatchedNativeRunner.commit() of slot {self.slot} without a forward() of it to commit")
        self.batched.commit([keep])
