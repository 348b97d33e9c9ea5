"""Batch-invariant attention for the native runner's exact mode: softmax(q k^T / sqrt(d) + bias) v.

Row r of the output is bitwise the same whatever the number of query rows, whatever the other rows, and whatever
the number of key columns beyond the ones its bias lets it see (the runner pads the cache it attends over to
buckets). The schedule is fixed by constants, not by the shapes: keys are cut into chunks of CHUNK columns starting
at column 0 (split-KV, for parallelism at one query), each chunk is walked in BLOCK_N steps with an online softmax,
and the chunks' partial results are merged in chunk order. A column a row may not see has bias -inf and adds an
exact zero, and a chunk past the last visible column merges with weight exactly 0, so a larger bucket changes no
bit. Query rows are independent lanes of the same MMAs, so the row count changes nothing either.

The runner's layouts: q (B, H, R, D) with GQA's query heads folded into rows, k and v (B, H, S, D) (views of the
cache), bias (B or 1, 1, R, S) additive. Triton is imported lazily (CPU builds have none).
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

    @triton.jit(do_not_specialize=["R", "S", "n_chunks"])
    def partial_kernel(
        q_ptr, k_ptr, v_ptr, b_ptr, acc_ptr, ml_ptr, R, S, H, n_chunks,
        sq_b, sq_h, sq_r, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sb_b, sb_r, scale,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        c = tl.program_id(0)
        rb = tl.program_id(1)
        bh = tl.program_id(2)
        b = bh // H
        h = bh % H
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D_PAD)
        row_ok = rows < R
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_r + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)  # fmt: skip
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        denom = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for j in tl.static_range(0, CHUNK, BLOCK_N):
            cols = c * CHUNK + j + tl.arange(0, BLOCK_N)
            col_ok = cols < S
            kt = tl.load(k_ptr + b * sk_b + h * sk_h + cols[None, :] * sk_s + d[:, None],
                         mask=col_ok[None, :] & (d[:, None] < D), other=0.0)  # fmt: skip
            s = tl.dot(q, kt) * scale
            bias = tl.load(b_ptr + b * sb_b + rows[:, None] * sb_r + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))  # fmt: skip
            s = s + bias.to(tl.float32)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_s + d[None, :],
                        mask=col_ok[:, None] & (d[None, :] < D), other=0.0)  # fmt: skip
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q (B, H, R, D), k/v (B, H, S, D), bias (B or 1, 1, R, S) -> (B, H, R, D), rows independent of R and S."""
    partial_kernel, merge_kernel = _kernels()
    B, H, R, D = q.shape
    S = k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    out = torch.empty(B, H, R, D, dtype=q.dtype, device=q.device)
    if R == 0:
        return out
    d_pad = max(16, 1 << (D - 1).bit_length())
    n_chunks = -(-S // CHUNK)
    acc = torch.empty(B * H * n_chunks * R, d_pad, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * n_chunks * R, 2, dtype=torch.float32, device=q.device)
    sb_b = bias.stride(0) if bias.shape[0] > 1 else 0
    partial_kernel[(n_chunks, -(-R // BLOCK_M), B * H)](
        q, k, v, bias, acc, ml, R, S, H, n_chunks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sb_b, bias.stride(2), 1.0 / math.sqrt(D),
        D=D, D_PAD=d_pad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CHUNK=CHUNK, num_warps=4, num_stages=2,
    )  # fmt: skip
    merge_kernel[(R, B * H)](
        acc, ml, out, R, H, n_chunks, out.stride(0), out.stride(1), out.stride(2), D=D, D_PAD=d_pad, num_warps=1
    )
    return out
