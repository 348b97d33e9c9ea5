"""Layer math shared by every model paradec computes itself: the native runner's Transformer
(`paradec.runners.native.model`), the EAGLE head (`paradec.heads.eagle`) and the zoo's training model
(`paradec.zoo.model`). None of them owns it; each imports it from here, so a change of rounding order (which decides
bitwise results in half precision) happens in one place.

- `RMSNorm`: normalise in float32, round back to the input dtype, then scale (the Hugging Face Llama order);
- `rotate_half` / `apply_rope`: rotary embeddings in the half-split layout of the Hugging Face checkpoints;
- `inv_frequencies`: the default rotary inverse frequencies 1 / theta^(2i / d), float32.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    exact = False  # the batch-invariant kernel (`paradec.kernels.rms_norm`); the native model's exact mode sets it

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            from paradec import kernels

            return kernels.rms_norm(x, self.weight, self.eps)
        # normalise in float32, round back to the model dtype, then scale (the reference order of roundings)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by angles whose cos/sin broadcast against it (last dimension: head_dim, both halves repeated)."""
    return x * cos + rotate_half(x) * sin


def inv_frequencies(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] float32: 1 / theta^(2i / head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)
