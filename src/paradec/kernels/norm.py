"""Batch-invariant RMSNorm for the native runner's exact mode: one program per row, the whole row in one block.

`paradec.layers.RMSNorm`'s arithmetic (normalise in float32, round to the input dtype, then scale), with a reduction
whose order depends on the row's length alone. PyTorch's own reduction kernels choose their split of a row by the
number of rows, and torch.compile chooses a reduction config per shape it specialises on (one for a single input,
another for many), so neither keeps a row's bits across forwards of different sizes.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows"])
    def rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rows, C, stride_x, stride_r, stride_y, stride_s, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # the residual stream's pending add, rounded as the eager add rounds: s = r + x
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
        y = x.to(tl.float32)
        y = y * tl.rsqrt(tl.sum(y * y, 0) / C + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = w.to(tl.float32) * y.to(x.dtype).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, out.to(y_ptr.dtype.element_ty), mask=mask)

    return rms_norm_kernel


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of x, each row on its own (CUDA). With `residual`: (norm(residual + x),
    residual + x) in one kernel, the add rounded to x's dtype as the eager add is."""
    C = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    r2 = _rows(residual) if residual is not None else x2
    total = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        block = max(16, 1 << (C - 1).bit_length())
        _kernel()[(x2.shape[0],)](
            x2, r2, weight, out, total, x2.shape[0], C, x2.stride(0), r2.stride(0), out.stride(0), total.stride(0),
            eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=4 if C > 1024 else 2,
        )  # fmt: skip
    out = out.view(*x.shape[:-1], C)
    return out if residual is None else (out, total.view(*x.shape[:-1], C))
