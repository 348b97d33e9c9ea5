"""A batch-invariant matrix product for the native runner's exact mode: y = x @ w.T (+ b).

Row i of the result is bitwise the same whatever the number of rows M of x and whatever the other rows hold. cuBLAS
does not promise that: it picks a different kernel (a GEMV at M = 1, tiles and split-K by shape) for each M, and each
rounds its fp32 sums in its own order, so a verify forward over 49 inputs and a decode forward over 1 differ in the
last bits of bf16 (the flips the referee explains). Here the reduction schedule comes from the weight's shape alone
(`plan`): every row block of every M walks K in the same BLOCK_K steps through the same MMA, split K the same way, and
adds the split partial sums in the same order. M only decides how many row blocks run. The approach is the one of
"Defeating Nondeterminism in LLM Inference" (He et al., Thinking Machines, 2025): keep the reduction order of each
output element independent of the batch.

Triton is imported lazily: CPU builds of PyTorch have none, and only CUDA tensors take the kernel path.
`reference` is the same schedule in PyTorch (fp32 sums over the same BLOCK_K and split boundaries), for tests.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

BLOCK_M = 64  # rows per program; every M, 1 included, runs in blocks of this many rows
# Rows per program of a product of more than BLOCK_M rows (0: BLOCK_M for every M). 128 reads each weight once up to
# M = 128 (a 64-node tree on the 8B shape now reads it twice: 10.8 ms against 5.5 for one token, H200 2026-12-02);
# it keeps exact mode exact only if a row's bits do not depend on the row tile, which `scripts/probe_exact.py`
# measures (`rows_differing_64_vs_128_row_tiles`). Off until that is measured; `scripts/bench_runner.py`'s
# `graphs+compile+exact-wide` variant turns it on.
WIDE_ROWS = 0


@dataclass(frozen=True)
class Plan:
    """The reduction schedule of one weight shape (N outputs, K inputs): fixed for every M."""

    block_n: int
    block_k: int
    split_k: int  # K is cut into split_k ranges of k_blocks blocks of block_k, their fp32 sums added in order
    k_blocks: int
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = BLOCK_M  # rows per program: fixed for every M (128 would read each weight once up to M = 128)


@functools.cache
def plan(n: int, k: int, sms: int = 132, block_n: int = 64, block_k: int = 64, waves: float = 1.0) -> Plan:
    """The schedule for an (n, k) weight: enough programs for `waves` x `sms` at one row block, split-K where the
    output alone has too few tiles. A function of the shape and the device's SM count only, never of M."""
    n_tiles = -(-n // block_n)
    k_blocks = -(-k // block_k)
    split = 1
    while n_tiles * split < waves * sms and k_blocks // (split * 2) >= 2:
        split *= 2
    return Plan(block_n=block_n, block_k=block_k, split_k=split, k_blocks=-(-k_blocks // split))


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def matmul_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        part_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        K_BLOCKS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_BLOCKS * BLOCK_K
        for kb in range(0, K_BLOCKS):
            ks = k_start + kb * BLOCK_K + rk
            a = tl.load(
                x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0
            )
            b = tl.load(
                w_ptr + rn[None, :] * stride_wn + ks[:, None], mask=(rn[None, :] < N) & (ks[:, None] < K), other=0.0
            )
            acc = tl.dot(a, b, acc)
        out_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(part_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=out_mask)

    @triton.jit(do_not_specialize=["M"])
    def reduce_kernel(
        part_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        acc = tl.load(part_ptr + row * N + cols, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)

    return matmul_kernel, reduce_kernel


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_for(weight: torch.Tensor) -> Plan:
    n, k = weight.shape
    return plan(n, k, sms=_sm_count(weight.device.index or 0))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, p: Plan | None = None):
    """x (..., K) @ weight (N, K).T + bias (N,): a CUDA kernel whose rows do not depend on the batch."""
    matmul_kernel, reduce_kernel = _kernels()
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if p is None:
        p = plan_for(weight)
        if WIDE_ROWS and m > p.block_m:
            p = dataclasses.replace(p, block_m=WIDE_ROWS)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    part = torch.empty(p.split_k, m, n, dtype=torch.float32, device=x.device) if p.split_k > 1 else y
    grid = (-(-n // p.block_n), -(-m // p.block_m), p.split_k)
    b = bias if bias is not None else y
    matmul_kernel[grid](
        x2,
        weight,
        b,
        y,
        part,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        SPLIT_K=p.split_k,
        K_BLOCKS=p.k_blocks,
        BLOCK_M=p.block_m,
        BLOCK_N=p.block_n,
        BLOCK_K=p.block_k,
        num_warps=p.num_warps,
        num_stages=p.num_stages,
    )
    if p.split_k > 1:
        block = 1024
        reduce_kernel[(-(-n // block), m)](
            part, b, y, m, n, y.stride(0), HAS_BIAS=bias is not None, SPLIT_K=p.split_k, BLOCK=block
        )
    return y.view(*lead, n)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, p: Plan | None = None):
    """The kernel's schedule in PyTorch: fp32 partial sums over the same K ranges, added in order (for tests)."""
    n, k = weight.shape
    p = p or plan(n, k)
    xf, wf = x.float(), weight.float()
    acc = None
    for s in range(p.split_k):
        lo, hi = s * p.k_blocks * p.block_k, min((s + 1) * p.k_blocks * p.block_k, k)
        part = xf[..., lo:hi] @ wf[:, lo:hi].T if lo < k else xf.new_zeros(*x.shape[:-1], n)
        acc = part if acc is None else acc + part
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)
