"""Distilling a small draft model towards the target (knowledge distillation on the target's own outputs).

The draft reads the same self-distilled windows and is trained by KL(target || draft) at every valid position,
the target's distribution being softmax(lm_head(f_t)) from the stored hidden states (Zhou et al. 2024,
"DistillSpec": on-policy data from the target and a forward-KL objective). Where the two vocabularies differ in
width, both are cut to the narrower one (the tokenizer must be the same, so the extra rows are padding).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def draft_loss(
    draft,
    lm_head: torch.Tensor,  # [V, H] the target's LM head, frozen
    tokens: torch.Tensor,  # [B, T]
    features: torch.Tensor,  # [B, T, H] the target's hidden states
    valid: torch.Tensor,  # [B, T] bool
) -> torch.Tensor:
    logits = draft(input_ids=tokens).logits  # [B, T, Vd]
    width = min(logits.shape[-1], lm_head.shape[0])
    with torch.no_grad():
        target_logp = F.log_softmax((features @ lm_head[:width].t()).float(), -1)  # [B, T, width]
    logp = F.log_softmax(logits[..., :width].float(), -1)
    kl = F.kl_div(logp, target_logp, log_target=True, reduction="none").sum(-1)  # [B, T]
    return (kl * valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def draft_accuracy(draft, lm_head: torch.Tensor, data, *, batch_size: int = 8) -> float:
    """Share of valid positions where the draft's greedy token is the target's."""
    hits = total = 0
    for start in range(0, data.tokens.shape[0], batch_size):
        tokens = data.tokens[start : start + batch_size]
        valid = data.valid[start : start + batch_size]
        logits = draft(input_ids=tokens).logits
        width = min(logits.shape[-1], lm_head.shape[0])
        greedy = (data.features[start : start + batch_size] @ lm_head[:width].t()).argmax(-1)
        hits += int(((logits[..., :width].argmax(-1) == greedy) & valid).sum())
        total += int(valid.sum())
    return hits / max(total, 1)
