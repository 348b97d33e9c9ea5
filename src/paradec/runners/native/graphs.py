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

from paradec.runners.native.kv_cache import KVCache
from paradec.runners.native.model import Transformer

Q_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128)
KV_ALIGN = 128


def query_bucket(n: int) -> int:
    """Smallest bucket holding n inputs (n <= Q_BUCKETS[-1])."""
    return next(b for b in Q_BUCKETS if b >= n)


def kv_bucket(need: int, capacity: int) -> int:
    """Cache prefix to attend over: `need` rounded up to a multiple of 128, coarser as it grows (waste <= ~1/8)."""
    step = KV_ALIGN
    while step * 8 < need:
        step *= 2
    return min(capacity, -(-need // step) * step)


class GraphBank:
    """CUDA graphs captured lazily, one per key, all sharing one memory pool.

    Sharing the pool is safe because the graphs run one at a time on one stream and keep nothing in pool memory
    between replays: every output is copied into a buffer allocated outside the pool.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def replay(self, key: tuple, step: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is None:
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
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (n, V) float32 (or None) and hidden (n, C): views of static buffers, valid until the next call."""
        n = token_ids.shape[0]
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
            hidden = self.model(
                self.tokens[:q], self.depth[:q], self.tree_mask[:q, :q], self.cache.length_t, self.cache.data, kv,
                self.layer_ids,
            )  # fmt: skip
            self.hidden[:q].copy_(hidden)
            if want_logits:
                self.logits[:q].copy_(self.model.logits(hidden))

        if self.bank is None:
            step()
        else:
            self.bank.replay((q, kv, want_logits), step)
        return (self.logits[:n] if want_logits else None), self.hidden[:n]
