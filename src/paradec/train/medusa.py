"""Training Medusa heads with the target frozen, and measuring the accuracies their static tree is built from.

Head k reads the target's hidden state f_t and is trained towards the target's own distribution of x_{t+2+k}
given the true prefix, softmax(lm_head(f_{t+1+k})), by KL divergence (self-distillation, as in Medusa-2); head k's
loss is weighted 0.8^k, as in the Medusa paper. The accuracies are the rates at which rank r of head k is the
target's greedy token on validation data; `paradec.heads.medusa.best_tree` turns them into the tree.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from paradec.heads.medusa import MedusaHeads
from paradec.train.data import DistillData

HEAD_DECAY = 0.8


def medusa_loss(
    heads: MedusaHeads,
    lm_head: torch.Tensor,  # [V, H] frozen
    features: torch.Tensor,  # [B, T, H]
    valid: torch.Tensor,  # [B, T] bool
) -> torch.Tensor:
    with torch.no_grad():
        target_logp = F.log_softmax((features @ lm_head.t()).float(), -1)  # [B, T, V]
    total = features.new_zeros((), dtype=torch.float32)
    weights = 0.0
    for k, block in enumerate(heads.blocks):
        shift = k + 1  # head k at position t is scored against the target's distribution at t + shift
        logp = F.log_softmax((block(features[:, :-shift]) @ lm_head.t()).float(), -1)  # [B, T - shift, V]
        kl = F.kl_div(logp, target_logp[:, shift:], log_target=True, reduction="none").sum(-1)  # [B, T - shift]
        mask = valid[:, shift:]
        total = total + HEAD_DECAY**k * (kl * mask).sum() / mask.sum().clamp_min(1)
        weights += HEAD_DECAY**k
    return total / weights


@torch.no_grad()
def medusa_accuracy(
    heads: MedusaHeads, lm_head: torch.Tensor, data: DistillData, ranks: int, *, batch_size: int = 8
) -> list[list[float]]:
    """accuracy[k][r]: share of valid positions where rank r of head k is the target's greedy token."""
    num_heads = len(heads.blocks)
    hits = torch.zeros(num_heads, ranks, dtype=torch.float64, device=data.features.device)
    counts = torch.zeros(num_heads, dtype=torch.float64, device=data.features.device)
    for start in range(0, len(data), batch_size):
        features = data.features[start : start + batch_size]
        valid = data.valid[start : start + batch_size]
        greedy = (features @ lm_head.t()).argmax(-1)  # [B, T] the target's token after each position
        for k, block in enumerate(heads.blocks):
            shift = k + 1
            top = (block(features[:, :-shift]) @ lm_head.t()).topk(ranks, -1).indices  # [B, T - shift, ranks]
            mask = valid[:, shift:]
            hit = (top == greedy[:, shift:, None]) & mask[..., None]
            hits[k] += hit.sum((0, 1)).double()
            counts[k] += mask.sum().double()
    return (hits / counts.clamp_min(1)[:, None]).tolist()
