"""Fused pointwise work of a decoder layer for the native runner's exact mode (which runs its elementwise work
eagerly, one kernel per op): rotary embedding in one kernel instead of five (neg, cat, two products, a sum), SiLU of
the gate times up in one instead of two. Each element's result depends on that element's inputs alone, so these are
batch-invariant by construction; they round where the eager ops round (each product and the sum to the tensor's
dtype), so their values are the eager ops' up to the last bit of a bf16 product computed in fp32. Triton is imported
lazily (CPU builds have none).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows"])
    def rope_kernel(x_ptr, c_ptr, s_ptr, y_ptr, rows, H, stride_xt, stride_xh, stride_ct, HALF: tl.constexpr,
                    BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)  # one (input, head)
        t = row // H
        h = row % H
        d = tl.arange(0, BLOCK)
        m = d < HALF
        base = x_ptr + t * stride_xt + h * stride_xh
        x1 = tl.load(base + d, mask=m, other=0.0)
        x2 = tl.load(base + HALF + d, mask=m, other=0.0)
        c1 = tl.load(c_ptr + t * stride_ct + d, mask=m, other=0.0)
        c2 = tl.load(c_ptr + t * stride_ct + HALF + d, mask=m, other=0.0)
        s1 = tl.load(s_ptr + t * stride_ct + d, mask=m, other=0.0)
        s2 = tl.load(s_ptr + t * stride_ct + HALF + d, mask=m, other=0.0)
        dt = x1.dtype
        # x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]: written as eager rounds (each product,
        # then the sum), but Triton may fold the bf16 round trips: on the H200 the result was within one ulp of eager,
        # not bitwise (exactness needs only that every row computes alike, which one program per row gives)
        a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt)
        b1 = ((-x2).to(tl.float32) * s1.to(tl.float32)).to(dt)
        a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt)
        b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt)
        out = y_ptr + row * (2 * HALF)
        tl.store(out + d, (a1.to(tl.float32) + b1.to(tl.float32)).to(dt), mask=m)
        tl.store(out + HALF + d, (a2.to(tl.float32) + b2.to(tl.float32)).to(dt), mask=m)

    @triton.jit(do_not_specialize=["rows"])
    def silu_mul_kernel(x_ptr, y_ptr, rows, F, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < F
        g = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0)
        u = tl.load(x_ptr + row * stride_x + F + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds its fp32 result to the input dtype
        tl.store(y_ptr + row * F + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)

    return rope_kernel, silu_mul_kernel


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) (rows may be strided, D contiguous) rotated by cos/sin (T, 1, D): `paradec.layers.apply_rope`."""
    rope_kernel, _ = _kernels()
    T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.reshape(T, D).contiguous(), sin.reshape(T, D).contiguous()
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    if T * H:
        half = D // 2
        rope_kernel[(T * H,)](
            x, cos, sin, out, T * H, H, x.stride(0), x.stride(1), cos.stride(0), HALF=half,
            BLOCK=max(16, 1 << (half - 1).bit_length()), num_warps=1,
        )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2F) [gate, up] -> (..., F) silu(gate) * up."""
    _, silu_mul_kernel = _kernels()
    two_f = gate_up.shape[-1]
    x = gate_up.reshape(-1, two_f)
    if x.stride(-1) != 1:
        x = x.contiguous()
    F = two_f // 2
    out = torch.empty(x.shape[0], F, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        block = 1024
        silu_mul_kernel[(x.shape[0], -(-F // block))](x, out, x.shape[0], F, x.stride(0), BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], F)
