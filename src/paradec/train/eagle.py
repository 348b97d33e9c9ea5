"""Training the EAGLE-style head with the target frozen, unrolled over several draft levels ("training-time test").

Entry j of a window reads (x_{j+1}, g_j) and is trained towards the target's next hidden state f_{j+1} (smooth L1,
weighted by `reg_weight`) and the target's distribution softmax(lm_head(f_{j+1})) (KL divergence), as in EAGLE.

At decode time only the first draft level reads real hidden states; level s reads the head's own predictions.
So each training step runs `passes` forwards: pass 0 is the plain causal pass over real features, and pass s
feeds entry j the prediction that pass s - 1 made at entry j - 1 (EAGLE-3's training-time test). The masks
reproduce what a level-s tree node sees at decode time, where the committed prefix ends at entry j - s:

    query (pass s, entry j) sees  pass 0 keys at entries <= j - s    (the committed prefix, real features)
                                  pass s' keys at entry j - s + s'   for 1 <= s' <= s (its draft ancestors, itself)

Entries j < s have no such history and are left out of pass s's loss. Pass s's loss is weighted 0.8^s.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from paradec.heads.eagle import EagleHead
from paradec.train.data import DistillData

PASS_DECAY = 0.8


def unroll_mask(length: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[length, (step + 1) * length] bool: what the queries of pass `step` see of passes 0..step (module doc)."""
    j = torch.arange(length, device=device)[:, None]
    i = torch.arange(length, device=device)[None, :]
    blocks = [i <= j - step] + [i == j - step + s for s in range(1, step + 1)]
    return torch.cat(blocks, 1)


def unrolled(head: EagleHead, embeds: torch.Tensor, features: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """Outputs of each pass [B, T, H] for entries reading embeds [B, T, H] (x_{j+1}) and features [B, T, H] (f_j)."""
    length = embeds.shape[1]
    positions = torch.arange(length, device=embeds.device)
    outs: list[torch.Tensor] = []
    keys = values = None
    inputs = features
    for step in range(passes):
        x = head.inputs(embeds, inputs)
        mask = unroll_mask(length, step, embeds.device)
        out, k, v = head(x, positions, mask, None if keys is None else (keys, values))
        keys = k if keys is None else torch.cat([keys, k], 2)
        values = v if values is None else torch.cat([values, v], 2)
        outs.append(out)
        inputs = torch.cat([features[:, :1], out[:, :-1]], 1)  # entry j reads the prediction made at entry j - 1
    return outs


def eagle_loss(
    head: EagleHead,
    embed: torch.Tensor,  # [V, H] the target's token embedding, frozen
    lm_head: torch.Tensor,  # [V, H] frozen
    tokens: torch.Tensor,  # [B, T]
    features: torch.Tensor,  # [B, T, H]
    valid: torch.Tensor,  # [B, T] bool
    *,
    passes: int = 3,
    reg_weight: float = 1.0,
) -> torch.Tensor:
    target = features[:, 1:]  # [B, T-1, H] f_{j+1}
    with torch.no_grad():
        target_logp = F.log_softmax((target @ lm_head.t()).float(), -1)  # [B, T-1, V]
    outs = unrolled(head, F.embedding(tokens[:, 1:], embed), features[:, :-1], passes)
    total = features.new_zeros((), dtype=torch.float32)
    weights = 0.0
    for step, out in enumerate(outs):
        mask = valid[:, 1:].clone()
        mask[:, :step] = False
        logp = F.log_softmax((out @ lm_head.t()).float(), -1)
        kl = F.kl_div(logp, target_logp, log_target=True, reduction="none").sum(-1)  # [B, T-1]
        reg = F.smooth_l1_loss(out.float(), target.float(), reduction="none").mean(-1)  # [B, T-1]
        total = total + PASS_DECAY**step * ((kl + reg_weight * reg) * mask).sum() / mask.sum().clamp_min(1)
        weights += PASS_DECAY**step
    return total / weights


@torch.no_grad()
def eagle_accuracy(
    head: EagleHead,
    embed: torch.Tensor,
    lm_head: torch.Tensor,
    data: DistillData,
    passes: int,
    *,
    batch_size: int = 8,
) -> list[float]:
    """Top-1 agreement with the target's greedy token of each unrolled pass (draft level) on `data`."""
    hits = torch.zeros(passes, dtype=torch.float64, device=data.features.device)
    counts = torch.zeros(passes, dtype=torch.float64, device=data.features.device)
    for start in range(0, len(data), batch_size):
        tokens = data.tokens[start : start + batch_size]
        features = data.features[start : start + batch_size]
        valid = data.valid[start : start + batch_size, 1:]
        greedy = (features[:, 1:] @ lm_head.t()).argmax(-1)  # [B, T-1]
        outs = unrolled(head, F.embedding(tokens[:, 1:], embed), features[:, :-1], passes)
        for step, out in enumerate(outs):
            mask = valid.clone()
            mask[:, :step] = False
            hits[step] += (((out @ lm_head.t()).argmax(-1) == greedy) & mask).sum().double()
            counts[step] += mask.sum().double()
    return (hits / counts.clamp_min(1)).tolist()
