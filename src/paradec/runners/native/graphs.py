"""Static-shape forwards: fixed buckets, static input/output buffers, and one CUDA graph per bucket.

Why `torch.cuda.CUDAGraph` capture of our own forward rather than `torch.compile(mode="reduce-overhead")`:

- Shapes are ours to choose. A speculative loop sees many query lengths (1 for decode, k+1 for a chain, n+1 for
  a tree) and a growing cache. We pad the query to a bucket (Q_BUCKETS) and the attended cache prefix to a multiple
  of 128, key graphs by (query bucket, cache bucket, logits wanted), and capture each on first use. reduce-overhead
  would re-record on every new shape and needs a recompile per static shape.
- Warm-up is fast: a capture costs one eager forward plus the recording (milliseconds for an 8B model). Kernel
  fusion is a separate, optional choice (`Transformer(compile=True)`, dynamic shapes: compiled once, shared by
  every bucket and every model size), so neither choice multiplies the other's warm-up.
- Nothing is hidden: tokens and the tree's depth/mask are copied into static device buffers (device to device,
  asynchronously), the committed length is a device scalar owned by the KV cache, and outputs land in static
  buffers that the runner copies out. No host synchronisation, no re-recording behind our back.

Padded inputs (rows n..q-1 of a bucket) compute on stale tokens; their keys/values go to slots past the provisional
ones, which nothing reads before a later forward overwrites them, and their outputs are ignored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from paradec.config import SamplingParams
from paradec.runners.native.kv_cache import KVCache, SlotKVCache
from paradec.runners.native.model import (
    RaggedLayout,
    Transformer,
    ragged_attention_bias,
    ragged_forward,
    ragged_index,
)
from paradec.sampling import align_vocab, warp

Q_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128)
KV_ALIGN = 128
B_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # sequences of a batched step


def query_bucket(n: int) -> int:
    """Smallest bucket holding n inputs (n <= Q_BUCKETS[-1])."""
    return next(b for b in Q_BUCKETS if b >= n)


def kv_bucket(need: int, capacity: int) -> int:
    """Cache prefix to attend over: `need` rounded up to a multiple of 128, coarser as it grows (waste <= ~1/8)."""
    step = KV_ALIGN
    while step * 8 < need:
        step *= 2
    return min(capacity, -(-need // step) * step)


def batch_bucket(b: int, slots: int) -> int:
    """Sequences a batched step is padded to: the smallest bucket holding b, at most `slots` (b <= slots)."""
    return min(slots, next((x for x in B_BUCKETS if x >= b), b))


def flat_bucket(n: int, sequences: int, limit: int) -> int:
    """Flat inputs a batched step of n inputs over `sequences` (padded) sequences is padded to: `sequences` times
    the query bucket of the mean inputs per sequence, at most `limit` (n <= limit). A function of the padded
    sequences and one of the few query buckets, so a speculative batch, whose total inputs vary each step, meets a
    handful of graph keys per batch bucket instead of one per multiple of 8 (waste: under 2x the real inputs on
    the bucket's rows, cheap while a step is bound by weight reads)."""
    return min(limit, sequences * query_bucket(min(-(-n // sequences), Q_BUCKETS[-1])))


class GraphBank:
    """CUDA graphs captured lazily, one per key, all sharing one memory pool.

    Sharing the pool is safe because the graphs run one at a time on one stream and keep nothing in pool memory
    between replays: every output is copied into a buffer allocated outside the pool.

    `capture_after`: the use of a key that captures it; the uses before run the step eagerly (the same computation).
    A capture costs an eager run, the recording and the graph's instantiation (50-90 ms for a batched step of
    Qwen2.5-1.5B on the H200, 2026-12-03), so a bank whose keys include one that is met once (a batch's speculative
    probe at one cache bucket) captures only keys met again. `misses` counts the steps that replayed no graph.
    """

    def __init__(self, device: torch.device, max_graphs: int | None = None, capture_after: int = 1) -> None:
        self.device = device
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.max_graphs = max_graphs  # past it, a new key's step runs uncaptured (the same computation, eagerly)
        self.capture_after = capture_after
        self.uncaptured = 0  # steps run uncaptured past max_graphs so far
        self.misses = 0  # steps that replayed no graph: run eagerly (a key's earlier uses, past max_graphs) or captured
        self._uses: dict[tuple, int] = {}  # keys met fewer than capture_after times: their uses so far
        self._wanted: dict[tuple, int] = {}  # keys not captured: how often a step asked for one (`want`)
        self._pool = None  # the graphs' memory pool, made with the first capture

    def want(self, key: tuple) -> int:
        """0 if `key` is captured; else how often a step has asked for it, this time included (a scheduler that may
        run a step another way meets a key only once it keeps coming back: `BatchDecoder._drop`)."""
        if key in self.graphs:
            return 0
        if len(self._wanted) >= 4096:  # bounded: keys asked for long ago start over
            self._wanted.clear()
        wanted = self._wanted[key] = self._wanted.get(key, 0) + 1
        return wanted

    def replay(self, key: tuple, step: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            self.misses += 1
            if self.max_graphs is not None and len(self.graphs) >= self.max_graphs:
                self.uncaptured += 1
                step()
                return
            uses = self._uses.pop(key, 0) + 1
            if uses < self.capture_after:
                if len(self._uses) >= 4096:  # bounded: keys met once long ago start over
                    self._uses.clear()
                self._uses[key] = uses
                step()
                return
            graph = self._capture(step)
            self.graphs[key] = graph
        graph.replay()

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream first: compilation, cuBLAS handles and lazy allocations may not happen in capture.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        return graph


class StaticForward:
    """The model's forward on bucketed shapes over static buffers; captured as CUDA graphs when `capture` is set.

    Without capture (on CPU) it runs the same padded computation eagerly, which is how the CPU tests cover the
    padding and stale-buffer logic that the graphs rely on.
    """

    def __init__(self, model: Transformer, cache: KVCache, layer_ids: tuple[int, ...], *, capture: bool) -> None:
        self.model, self.cache, self.layer_ids = model, cache, layer_ids
        device, size = cache.data.device, Q_BUCKETS[-1]
        args = model.args
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.depth = torch.zeros(size, dtype=torch.long, device=device)
        self.tree_mask = torch.eye(size, dtype=torch.bool, device=device)
        self.hidden = torch.zeros(size, args.hidden_size, dtype=model.embed.weight.dtype, device=device)
        self.layer_states: dict[tuple[int, ...], torch.Tensor] = {}  # per requested layer set: (size, k * C)
        self.logits = torch.zeros(size, args.vocab_size, dtype=torch.float32, device=device)
        self._loaded: tuple[int, ...] = ()  # input-index parents whose depth/mask rows the buffers hold
        self.bank = GraphBank(device) if capture else None

    def __call__(
        self,
        token_ids: torch.Tensor,  # (n,)
        parents: tuple[int, ...],  # (n,) input-index parents, -1 for the root
        depth: torch.Tensor,  # (n,)
        tree_mask: torch.Tensor,  # (n, n)
        want_logits: bool,
        taps: tuple[int, ...] = (),  # layers whose outputs to return instead of the final hidden state
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (n, V) float32 (or None) and hidden (n, C), or with `taps` those layers' outputs (n, len(taps) * C):
        views of static buffers, valid until the next call. Each layer set has its own buffer and graphs."""
        n = token_ids.shape[0]
        if taps and taps not in self.layer_states:
            self.layer_states[taps] = self.hidden.new_zeros(self.hidden.shape[0], len(taps) * self.hidden.shape[1])
        self.tokens[:n].copy_(token_ids, non_blocking=True)
        if len(parents) < n or self._loaded[:n] != parents:
            # a tree's rows depend only on its first n nodes, so a loaded superset tree (or longer chain) still fits;
            # inputs beyond the parents (auxiliary inputs) have rows of their own: always reload those
            self.depth[:n].copy_(depth, non_blocking=True)
            self.tree_mask[:n, :n].copy_(tree_mask, non_blocking=True)
            self._loaded = parents
        q = query_bucket(n)
        kv = kv_bucket(self.cache.length + q, self.cache.capacity)

        def step() -> None:
            out = self.model(
                self.tokens[:q], self.depth[:q], self.tree_mask[:q, :q], self.cache.length_t, self.cache.data, kv,
                self.layer_ids, taps,
            )  # fmt: skip
            hidden = out[0] if taps else out
            if taps:
                self.layer_states[taps][:q].copy_(out[1])
            else:
                self.hidden[:q].copy_(hidden)
            if want_logits:
                self.logits[:q].copy_(self.model.logits(hidden))

        if self.bank is None:
            step()
        else:
            self.bank.replay((q, kv, want_logits, taps), step)
        states = self.layer_states[taps] if taps else self.hidden
        return (self.logits[:n] if want_logits else None), states[:n]


class ChainGraph:
    """A draft model's whole chain of k tokens in one go: k forwards back to back, each choosing the next input on
    the device; captured as one CUDA graph per (inputs fed first, k, cache buckets of the k forwards, warp) when
    `bank` is set, run eagerly otherwise (on CPU), with no host synchronisation either way.

        forward 0: the fed tokens (the pending one last) -> draft 1
        forward i: draft i                                -> draft i + 1     (i = 1 .. k-1)

    Forward i runs at the running length `start` (a device scalar of its own, started from the cache's committed
    length), writes its keys/values after the previous forwards' and attends to all of them: the same slots,
    positions and cache buckets as k single forwards each committed in turn, so the chain equals the step-by-step
    one. Greedy picks the argmax of the logits (aligned to the target's vocabulary); sampling warps them to q (kept:
    the verifier needs the draft's real distribution) and takes `paradec.sampling.sample`'s exponential race
    argmax(q / E) with E ~ Exp(1) drawn before the graph from the generation's generator (a captured graph would
    replay fixed random numbers; drawn outside, every replay gets fresh ones and the graph does not depend on which
    generator the generation uses).
    """

    max_tokens = 32  # longest chain (rows of the output buffers)
    max_fed = 2  # most tokens fed to the first forward (a chain after all drafts were accepted feeds two)

    def __init__(
        self, model: Transformer, cache: KVCache, layer_ids: tuple[int, ...], vocab_size: int, *, capture: bool
    ) -> None:
        self.model, self.cache, self.layer_ids, self.vocab_size = model, cache, layer_ids, vocab_size
        device = cache.data.device
        self.fed = torch.zeros(self.max_fed, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.tokens = torch.zeros(self.max_tokens, dtype=torch.long, device=device)  # [k] the drafts
        self.race = torch.ones(self.max_tokens, vocab_size, dtype=torch.float32, device=device)  # [k, V] E ~ Exp(1)
        self.probs = torch.zeros(self.max_tokens, vocab_size, dtype=torch.float32, device=device)  # [k, V] q
        self._arange = torch.arange(self.max_fed, device=device)
        self._tril = torch.ones(self.max_fed, self.max_fed, dtype=torch.bool, device=device).tril()
        self.bank = GraphBank(device) if capture else None

    def __call__(
        self, token_ids: torch.Tensor, k: int, sampling: SamplingParams, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [k] int64 and, when sampling, q [k, V] float32 (copies). The caller commits the n + k - 1 inputs."""
        n = token_ids.shape[0]
        self.fed[:n].copy_(token_ids, non_blocking=True)
        length = self.cache.length
        kvs = tuple(kv_bucket(length + n + i, self.cache.capacity) for i in range(k))  # forward i's cache bucket
        warping = None if sampling.greedy else sampling
        if warping is not None:
            self.race[:k].exponential_(1.0, generator=generator)
        warp_key = None if warping is None else (warping.temperature, warping.top_k, warping.top_p, warping.min_p)

        def step() -> None:
            self._chain(n, k, kvs, warping)

        if self.bank is None:
            step()
        else:
            self.bank.replay(("chain", n, k, kvs, warp_key), step)
        return self.tokens[:k].clone(), None if warping is None else self.probs[:k].clone()

    def _chain(self, n: int, k: int, kvs: tuple[int, ...], warping: SamplingParams | None) -> None:
        self.start.copy_(self.cache.length_t)
        inputs = self.fed[:n]
        for i in range(k):
            count = inputs.shape[0]
            hidden = self.model(
                inputs, self._arange[:count], self._tril[:count, :count], self.start, self.cache.data, kvs[i],
                self.layer_ids,
            )  # fmt: skip
            logits = align_vocab(self.model.logits(hidden[-1:]).float()[0], self.vocab_size)  # [V] float32
            if warping is None:
                token = logits.argmax(-1, keepdim=True)  # [1]
            else:
                q = warp(logits, warping)  # [V]
                self.probs[i].copy_(q)
                token = (q / self.race[i]).argmax(-1, keepdim=True)  # [1] the exponential race of `sample`
            self.tokens[i : i + 1].copy_(token)
            self.start.add_(count)
            inputs = self.tokens[i : i + 1]


class StaticRagged:
    """`ragged_forward` (the batched runner's step) on bucketed shapes over static buffers, captured as one CUDA
    graph per (sequences, flat inputs, inputs per sequence, cache columns, slot placement, taps) bucket when
    `capture` is set, run eagerly otherwise (on CPU, where the tests cover the padding).

    Padding: the B sequences become `batch_bucket(B)` (dummy sequences of 0 inputs: their rows see column 0 only,
    their output is dropped), each sequence's inputs `query_bucket(n_max)` rows of the padded-query layout, and the
    N flat inputs `flat_bucket(N, Bq)`: a padding input embeds a stale token, writes its keys/values to the cache's
    scratch slot (its last: the runner allocates one more than it hands out) and its query to a spare row; its
    output is dropped. Row-wise work is per row, so the real rows are what the unpadded forward computes, and
    attention is per sequence over its own slot. When the step's slots are 0 .. B-1 (the scheduler hands out the
    lowest free ones) the dummies take the slots after them and keys/values are read as a view of the cache;
    otherwise they read the scratch slot and keys/values are gathered. Only a view from slot 0 counts: a view from
    any first slot made the first slot part of the graph key, and continuous batching meets many (a slot freed while
    its next sequence is prefilled, the tail of a queue), each a new bucket to run eagerly and capture inside a
    timed run; so a step's slot placement is one of two per bucket (from 0, or gathered).

    What changes between replays goes in by copies before the replay: the tokens (device to device), one host list
    of every index (one non_blocking copy), and each tree's depth and mask into the row of its place in the step
    (a chain's row holds the chain layout, loaded once). The committed lengths are in that host list, so the
    graphs read no host state.
    """

    max_inputs = 512  # flat inputs of the largest bucketed step; larger steps (long prefill chunks) run unpadded
    max_seq_inputs = Q_BUCKETS[-1]  # inputs of one sequence in a bucketed step
    # graphs kept: buckets multiply (sequences x inputs x per-sequence inputs x cache columns x slot placement), and
    # a long-running server with speculation would otherwise capture without end; later new buckets run eagerly
    max_graphs = 512
    capture_after = 2  # a bucket is captured when met again (`GraphBank`): a speculative probe's is often met once

    def __init__(self, model: Transformer, cache: SlotKVCache, *, capture: bool) -> None:
        self.model, self.cache = model, cache
        self.scratch = cache.slots - 1
        device, n, b, q = cache.data.device, self.max_inputs, cache.slots - 1, self.max_seq_inputs
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.index = torch.zeros(6 * n + 3 * b, dtype=torch.long, device=device)
        self._chain_depth = torch.arange(q, device=device)  # a chain's layout, copied into a row a tree held
        self._chain_mask = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        self.depth = self._chain_depth.repeat(b, 1)  # [b, q]: row b holds sequence b's depths
        self.masks = self._chain_mask.repeat(b, 1, 1)  # [b, q, q]
        self._chain_rows = [True] * b  # rows holding the chain layout
        self.hidden = torch.zeros(n, model.args.hidden_size, dtype=model.embed.weight.dtype, device=device)
        self.layer_states: dict[tuple[int, ...], torch.Tensor] = {}
        self.bank = GraphBank(device, max_graphs=self.max_graphs, capture_after=self.capture_after) if capture else None

    def fits(self, n_inputs: int, n_max: int) -> bool:
        return n_inputs <= self.max_inputs and n_max <= self.max_seq_inputs

    def key(self, slot_ids: list[int], sizes: list[int], lengths: list[int], taps: tuple[int, ...]) -> tuple:
        """The graph key of a step of sequences in `slot_ids` with `sizes` inputs each, at the slots' committed
        `lengths`: (padded sequences, flat inputs, inputs per sequence, cache columns, slot placement, taps)."""
        B = len(slot_ids)
        nq, Bq = query_bucket(max(sizes)), batch_bucket(B, self.scratch)
        Nq = flat_bucket(sum(sizes), Bq, self.max_inputs)
        kv = kv_bucket(max(lengths[slot] + size for slot, size in zip(slot_ids, sizes)), self.cache.capacity)
        view = slot_ids == list(range(B)) and Bq <= self.cache.slots  # slots 0 .. B-1 (see the class docstring)
        return Bq, Nq, nq, kv, (0, Bq) if view else None, taps

    def wanted(self, key: tuple) -> int:
        """`GraphBank.want`: 0 if a step of graph `key` replays a captured graph (always, without capture: nothing to
        meet); else how often a step has asked for it."""
        return 0 if self.bank is None else self.bank.want(key)

    def __call__(
        self,
        tokens: torch.Tensor,  # [N] on the device
        seqs: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]],  # (slot, size, depth, mask) each
        lengths: list[int],  # committed length per slot
        taps: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden state [N, C] and the states the caller asked for (`taps`' layer outputs, else the same
        hidden state): views of static buffers, valid until the next call."""
        N, B = tokens.shape[0], len(seqs)
        sizes = [size for _, size, _, _ in seqs]
        slot_ids = [slot for slot, _, _, _ in seqs]
        Bq, Nq, nq, kv, slot_range, _ = self.key(slot_ids, sizes, lengths, taps)
        view = slot_range is not None
        dummies = list(range(B, Bq)) if view else [self.scratch] * (Bq - B)
        starts = [lengths[slot] for slot in slot_ids]
        for b, (_, size, depth, mask) in enumerate(seqs):
            if depth is not None:  # a tree: its layout into row b
                self.depth[b, :size].copy_(depth, non_blocking=True)
                self.masks[b, :size, :size].copy_(mask, non_blocking=True)
                self._chain_rows[b] = False
            elif not self._chain_rows[b]:
                self.depth[b].copy_(self._chain_depth)
                self.masks[b].copy_(self._chain_mask)
                self._chain_rows[b] = True
        # per input: query row in, output row, cache slot, cache column, sequence, index in its sequence
        per_seq = torch.tensor([slot_ids, starts, sizes], dtype=torch.long)  # (3, B)
        seq_of, j = ragged_index(per_seq[2], N)
        rows = seq_of * nq + j
        pad = Nq - N
        spare = torch.full((pad,), Bq * nq, dtype=torch.long)
        zeros = torch.zeros(pad, dtype=torch.long)
        packed = torch.cat([
            rows, spare,  # query rows (padding: the spare row)
            rows, zeros,  # output rows
            per_seq[0][seq_of], torch.full((pad,), self.scratch, dtype=torch.long),  # cache slots
            per_seq[1][seq_of] + j, zeros,  # cache columns
            seq_of, zeros,
            j, zeros,
            torch.tensor(slot_ids + dummies), torch.tensor(starts + [0] * (Bq - B)), torch.tensor(sizes + [0] * (Bq - B)),
        ])  # fmt: skip
        self.index[: packed.shape[0]].copy_(packed, non_blocking=True)
        self.tokens[:N].copy_(tokens, non_blocking=True)
        if taps and taps not in self.layer_states:
            self.layer_states[taps] = self.hidden.new_zeros(self.hidden.shape[0], len(taps) * self.hidden.shape[1])

        def step() -> None:
            rows_in, rows_out, row_slots, columns, seq, within = self.index[: 6 * Nq].view(6, Nq)
            seq_slots, seq_starts, seq_sizes = self.index[6 * Nq : 6 * Nq + 3 * Bq].view(3, Bq)
            group = self.model.args.n_heads // self.model.args.n_kv_heads
            bias = ragged_attention_bias(seq_starts, seq_sizes, self.masks[:Bq, :nq, :nq], kv, group, self.hidden.dtype)
            layout = RaggedLayout(
                rows=rows_in, slots=row_slots, columns=columns, seq_slots=seq_slots, bias=bias, n_max=nq,
                kv_len=kv, slot_range=slot_range, out_rows=rows_out, spare_rows=1,
            )  # fmt: skip
            positions = seq_starts[seq] + self.depth[seq, within]
            out = ragged_forward(self.model, self.tokens[:Nq], positions, layout, self.cache.data, taps)
            if taps:
                self.hidden[:Nq].copy_(out[0])
                self.layer_states[taps][:Nq].copy_(out[1])
            else:
                self.hidden[:Nq].copy_(out)

        if self.bank is None:
            step()
        else:
            self.bank.replay((Bq, Nq, nq, kv, slot_range, taps), step)
        states = self.layer_states[taps] if taps else self.hidden
        return self.hidden[:N], states[:N]
