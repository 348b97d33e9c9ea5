"""Batch-invariant kernels: the native runner's exact mode (`Transformer(exact=True)`).

A forward's row i must come out bitwise the same whatever else the forward holds: 1 input or 64, a chain or a tree,
a cache bucket of 256 or 1024 columns, other sequences beside it. Three ops reduce in an order that libraries choose
per shape: the matrix products (cuBLAS picks a kernel per M), attention (the softmax and the weighted sum over the
cache) and RMSNorm (PyTorch's reduction kernels split a row by the number of rows; torch.compile picks a reduction
config per specialised shape, which is why an exact model runs its elementwise work eagerly). The rest is pointwise:
each element's result depends on that element's inputs alone.

- `linear(x, w, b)`: on CUDA the fixed-schedule Triton product of `paradec.kernels.matmul`; on CPU one product per
  row (the same call for every row, so no row depends on M).
- `attention(q, k, v, columns)`: each row over its visible columns packed in order (`visible_columns(bias)`), so a
  tree node sees the same sequence of keys as the token decoded alone. On CUDA the split-KV online-softmax Triton
  kernel of `paradec.kernels.flash` (chunks and steps fixed from position 0 of the packed list, merged in order,
  so the row count, the cache bucket and the tree around a row change no bit); on CPU one token at a time.

- `rms_norm(x, w, eps)`: on CUDA one Triton program per row (`paradec.kernels.norm`); on CPU the eager ops.
  `add_rms_norm` also does the residual stream's pending add in the same kernel.
- `rope`, `silu_mul` (`paradec.kernels.pointwise`): a layer's pointwise work in one kernel each instead of five and
  two (an exact model's elementwise work runs eagerly, one kernel per op, and a small model is launch-bound).

All three are registered as custom ops, so `torch.compile` treats them as opaque calls and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from paradec.kernels import flash, matmul, norm, pointwise
from paradec.layers import apply_rope


@torch.library.custom_op("paradec::exact_linear", mutates_args=())
def _exact_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.is_cuda:
        return matmul.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.cat([F.linear(row, weight, bias) for row in rows.split(1)]) if rows.shape[0] else None
    if out is None:
        out = x.new_empty(0, weight.shape[0])
    return out.view(*x.shape[:-1], weight.shape[0])


@_exact_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("paradec::exact_attention", mutates_args=())
def _exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    if q.is_cuda:
        return flash.attention(q, k, v, columns)
    B, R, T = q.shape[0], q.shape[-2], columns.shape[-2]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    with sdpa_kernel([SDPBackend.MATH]):
        for b in range(B):
            lists = columns[b if columns.shape[0] > 1 else 0, 0]  # (T, S)
            for t in range(T):
                seen = lists[t][lists[t] >= 0].long()  # the token's visible columns, packed in order
                rows = slice(t, R, T)  # its query heads: rows g * T + t
                out[b, :, rows] = F.scaled_dot_product_attention(q[b, :, rows], k[b][:, seen], v[b][:, seen])
    return out


@_exact_attention.register_fake
def _(q, k, v, bias):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("paradec::exact_rms_norm", mutates_args=())
def _exact_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:
        return norm.rms_norm(x, weight, eps)
    y = x.float()  # CPU: the eager ops, whose reduction over a row does not depend on the row count
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@_exact_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)


@torch.library.custom_op("paradec::exact_add_rms_norm", mutates_args=())
def _exact_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return norm.rms_norm(x, weight, eps, residual=residual)
    total = residual + x
    return _exact_rms_norm(total, weight, eps), total


@_exact_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device), torch.empty_like(x)


@torch.library.custom_op("paradec::exact_rope", mutates_args=())
def _exact_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return pointwise.rope(x, cos, sin)
    return apply_rope(x, cos, sin)


@_exact_rope.register_fake
def _(x, cos, sin):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("paradec::exact_silu_mul", mutates_args=())
def _exact_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.is_cuda:
        return pointwise.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@_exact_silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


fused = True  # exact mode's fused pointwise kernels (add + norm, rope, silu * up); False: the eager ops (to compare)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x) with rows independent of the row count: one kernel on CUDA."""
    return _exact_add_rms_norm(x, residual, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`paradec.layers.apply_rope` of x (T, H, D) in one kernel on CUDA (five eager ops otherwise)."""
    return _exact_rope(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a [gate, up] product in one kernel on CUDA."""
    return _exact_silu_mul(gate_up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`paradec.layers.RMSNorm`'s arithmetic with rows independent of the row count."""
    return _exact_rms_norm(x, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias with rows independent of the batch."""
    return _exact_linear(x, weight, bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of q (B, H, G*T, D) over each token's visible columns (`visible_columns`), packed
    in order: rows independent of the row count, the cache padding and where in the cache those columns sit."""
    return _exact_attention(q, k, v, columns)


visible_columns = flash.visible_columns
