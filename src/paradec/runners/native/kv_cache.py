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


class SlotKVCache:
    """The static KV cache of B sequences (`paradec.runners.native.batch`): one tensor (L, 2, slots, nkv, S, hs) and
    one committed length per slot, kept on the host (the batched forward runs eagerly, its shapes come from them).

    Entries of slot b past `lengths[b]` are garbage, never attended to (zeros at first: 0 * NaN would leak).
    """

    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.data = torch.zeros(n_layers, 2, slots, n_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return self.data.shape[2]

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    def advance(self, slot: int, count: int) -> None:
        """Commit the next `count` columns of `slot` as they are."""
        self.lengths[slot] += count

    def truncate(self, slot: int, length: int) -> None:
        self.lengths[slot] = length

    def compact(self, moves: torch.Tensor) -> None:
        """Copy columns moves[1] of slots moves[0] onto columns moves[2] of the same slots (moves [3, m]; every
        layer, keys and values); lengths are the caller's (`advance`)."""
        view = self.data.permute(2, 4, 0, 1, 3, 5)  # (slots, S, L, 2, nkv, hs)
        view.index_put_((moves[0], moves[2]), view[moves[0], moves[1]])  # the gather is a copy: overlaps are safe
