"""Batch-invariant attention for the native runner's exact mode: softmax(q k^T / sqrt(d)) v over each row's
visible columns.

Row r of the output is bitwise the same whatever the number of query rows, whatever the other rows, whatever the
number of key columns it does not see (the runner pads the cache it attends over to buckets), and wherever its
visible columns sit: a row sees the columns its entry of `columns` lists, in that order, and the kernel walks that
packed list from position 0, as if those keys were columns 0, 1, 2, ... of a contiguous cache. That is what makes a
tree exact: a node's visible provisional columns are its ancestors, scattered between its siblings' columns, and
packed they are the same sequence of keys that the same token decoded alone sees contiguously (the committed
prefix, then the accepted tokens in order, then itself). Block sums (the running max per block, the sum of the
weights, the `p @ v` MMA over a block) group their terms by position in the block, so without the packing the
same terms would be grouped differently and round differently (bench/results/exact-h200-2026-12-02: lookahead's
trees differed from vanilla on 9 of 20 prompts, chains on none).

The schedule is fixed by constants, not by the shapes: the packed list is cut into chunks of CHUNK positions (split-
KV, for parallelism at one query), each chunk is walked in BLOCK_N steps with an online softmax, and the chunks'
partial results are merged in chunk order; positions past a row's count add exact zeros and chunks past it merge
with weight exactly 0. A program holds the query heads of one token (GQA's group, up to BLOCK_M of them), which
share its list; heads are independent lanes of the same MMAs.

The runner's layouts: q (B, H, R, D) with GQA's G query heads folded into rows, row g * T + t for token t; k and v
(B, H, S, D) (views of the cache); columns (B or 1, 1, T, S) int32 (`visible_columns`). Triton is imported lazily
(CPU builds have none).
"""

from __future__ import annotations

import functools
import math

import torch

CHUNK = 256  # key columns per program (split-KV); the merge walks chunks in order
BLOCK_N = 64  # key columns per online-softmax step
BLOCK_M = 16  # query rows per program


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["T", "S", "n_chunks"])
    def partial_kernel(
        q_ptr, k_ptr, v_ptr, c_ptr, acc_ptr, ml_ptr, G, T, S, H, n_chunks, g_blocks,
        sq_b, sq_h, sq_r, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sc_b, sc_t, scale,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        c = tl.program_id(0)
        t = tl.program_id(1) // g_blocks
        heads = (tl.program_id(1) % g_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(2)
        b = bh // H
        h = bh % H
        R = G * T
        rows = heads * T + t  # the token's query heads
        d = tl.arange(0, D_PAD)
        row_ok = heads < G
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_r + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)  # fmt: skip
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        denom = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for j in tl.static_range(0, CHUNK, BLOCK_N):
            pos = c * CHUNK + j + tl.arange(0, BLOCK_N)  # positions in the token's packed list
            cols = tl.load(c_ptr + b * sc_b + t * sc_t + pos, mask=pos < S, other=-1)
            seen = cols >= 0
            kt = tl.load(k_ptr + b * sk_b + h * sk_h + cols[None, :] * sk_s + d[:, None],
                         mask=seen[None, :] & (d[:, None] < D), other=0.0)  # fmt: skip
            s = tl.where(seen[None, :], tl.dot(q, kt) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_s + d[None, :],
                        mask=seen[:, None] & (d[None, :] < D), other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        base = (bh * n_chunks + c) * R + rows
        tl.store(acc_ptr + base[:, None] * D_PAD + d[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ptr + base * 2, m, mask=row_ok)
        tl.store(ml_ptr + base * 2 + 1, denom, mask=row_ok)

    @triton.jit(do_not_specialize=["R", "n_chunks"])
    def merge_kernel(acc_ptr, ml_ptr, o_ptr, R, H, n_chunks, so_b, so_h, so_r,
                     D: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
        r = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, D_PAD)
        m_max = float("-inf")
        for c in range(0, n_chunks):
            m_max = tl.maximum(m_max, tl.load(ml_ptr + ((bh * n_chunks + c) * R + r) * 2))
        denom = 0.0
        acc = tl.zeros((D_PAD,), tl.float32)
        for c in range(0, n_chunks):
            base = (bh * n_chunks + c) * R + r
            w = tl.exp(tl.load(ml_ptr + base * 2) - m_max)
            denom += tl.load(ml_ptr + base * 2 + 1) * w
            acc += tl.load(acc_ptr + base * D_PAD + d) * w
        out = acc / denom
        tl.store(o_ptr + b * so_b + h * so_h + r * so_r + d, out.to(o_ptr.dtype.element_ty), mask=d < D)

    return partial_kernel, merge_kernel


def visible_columns(bias: torch.Tensor) -> torch.Tensor:
    """An additive bias (..., T, S) (0 where a row sees a column, -inf where not) as `attention`'s `columns`
    (..., T, S) int32: each row's visible columns in increasing order, then -1. Device ops only, no sort (a cumsum
    and a scatter), so CUDA graphs capture it."""
    seen = ~torch.isinf(bias)
    S = bias.shape[-1]
    position = seen.to(torch.int32).cumsum(-1) - 1  # where each visible column goes in the packed list
    out = torch.full((*bias.shape[:-1], S + 1), -1, dtype=torch.int32, device=bias.device)
    index = torch.where(seen, position.long(), S)  # hidden columns all land in the extra last column
    out.scatter_(-1, index, torch.arange(S, dtype=torch.int32, device=bias.device).expand(bias.shape).contiguous())
    return out[..., :S]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """q (B, H, G*T, D), k/v (B, H, S, D), columns (B or 1, 1, T, S) -> (B, H, G*T, D), each row over its token's
    visible columns in `columns`' order: its bits independent of the rows, the cache padding and where those
    columns sit."""
    partial_kernel, merge_kernel = _kernels()
    B, H, R, D = q.shape
    S, T = k.shape[2], columns.shape[-2]
    G = R // T
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if columns.stride(-1) != 1:
        columns = columns.contiguous()
    out = torch.empty(B, H, R, D, dtype=q.dtype, device=q.device)
    if R == 0:
        return out
    d_pad = max(16, 1 << (D - 1).bit_length())
    n_chunks = -(-S // CHUNK)
    g_blocks = -(-G // BLOCK_M)
    acc = torch.empty(B * H * n_chunks * R, d_pad, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * n_chunks * R, 2, dtype=torch.float32, device=q.device)
    sc_b = columns.stride(0) if columns.shape[0] > 1 else 0
    partial_kernel[(n_chunks, T * g_blocks, B * H)](
        q, k, v, columns, acc, ml, G, T, S, H, n_chunks, g_blocks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sc_b, columns.stride(-2), 1.0 / math.sqrt(D),
        D=D, D_PAD=d_pad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CHUNK=CHUNK, num_warps=4, num_stages=2,
    )  # fmt: skip
    merge_kernel[(R, B * H)](
        acc, ml, out, R, H, n_chunks, out.stride(0), out.stride(1), out.stride(2), D=D, D_PAD=d_pad, num_warps=1
    )
    return out
