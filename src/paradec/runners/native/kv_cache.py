"""The static KV cache of one sequence: preallocated once, never reallocated.

All layers' keys and values live in one tensor (L, 2, nkv, S, hs), so moving entries between slots is one gather
and one scatter for the whole model. The committed length is kept twice: as a host int (for bookkeeping and
shapes) and as a 0-dim device tensor that the forward reads (so a captured CUDA graph sees the current length
without any host-to-device copy). Both change only through `advance`, `truncate` and `compact`:

- rollback is a length reset: slots past the length are garbage and get overwritten by the next forward;
- `compact` moves the accepted provisional entries of a token tree onto contiguous slots after the prefix.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        # zeros, not empty: slots past the length are multiplied by zero attention weights, and 0 * NaN would leak
        self.data = torch.zeros(n_layers, 2, n_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.length_t = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    def advance(self, count: int) -> None:
        """Commit the next `count` slots as they are."""
        if count:
            self.length += count
            self.length_t.add_(count)

    def truncate(self, length: int) -> None:
        self.length = length
        self.length_t.fill_(length)

    def compact(self, moves: torch.Tensor, count: int) -> None:
        """Copy slots moves[0] onto slots moves[1] (both [m], every layer, keys and values), then commit `count`."""
        self.data.index_copy_(3, moves[1], self.data.index_select(3, moves[0]))
        self.advance(count)
