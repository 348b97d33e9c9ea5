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

Fused features (`--feature-layers`, EAGLE-3; the default `auto` is `default_feature_layers`): pass 0 reads the fused
outputs of three target layers, fc_fuse([h_low, h_mid, h_high]) [B, T, 3H] -> [B, T, H], instead of f_j. The head then
predicts in a feature space of its own, which no target hidden state measures, so, as in EAGLE-3, the regression
towards f_{j+1} is dropped: the loss is the KL term of the unrolled passes alone (`reg_weight` unused). A head over
the last hidden state (`--feature-layers none`, EAGLE-1/2) keeps the regression.

Reduced draft vocabulary (`paradec train eagle --draft-vocab N`, EAGLE-3's): the head scores only the N target tokens
that occur most often in the target's own continuations of the training windows (`frequent_tokens`), through an LM
head of its own initialised from the target's rows of those tokens. Its KL target is then the target's distribution
restricted to the draft vocabulary and renormalised, softmax over the N logits f_{j+1} @ lm_head[d2t]^T: the head
cannot put mass on tokens it never drafts. The mass it gives up is measured, not trained: `draft_vocab_coverage`,
the mean share of the target's probability that falls on the draft vocabulary at the validation positions (logged,
and on the card with N). Decoding stays lossless either way (the drafter maps draft ids to target ids and the
verifier checks them over the full vocabulary); coverage only bounds how often a draft can be right.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from paradec.heads.eagle import EagleHead
from paradec.train.data import DistillData

PASS_DECAY = 0.8
DRAFT_VOCAB = 32768  # --draft-vocab's default for targets whose vocabulary is larger (`default_draft_vocab`)


def default_draft_vocab(vocab_size: int) -> int | None:
    """The draft vocabulary of a head trained without --draft-vocab: None (the target's whole vocabulary) up to
    DRAFT_VOCAB tokens, else the DRAFT_VOCAB most frequent ones.

    Why: the draft LM head is the largest matmul and top-k of every tree level, and its cost grows with the
    vocabulary. At 32k tokens or fewer (Llama-2, Mistral) it is already as small as a reduced head would be, and a
    map would only give up coverage. Above (49,152 for SmolLM2, 128,256 for Llama-3, 151,936 for Qwen2.5) a 32k head
    is 1.5-4.6x smaller, and the tokens outside the 32k most frequent ones of the target's own answers carry little
    of its probability mass (the card's coverage says how little); EAGLE-3 uses 32,000 draft ids for Llama-3."""
    return None if vocab_size <= DRAFT_VOCAB else DRAFT_VOCAB


def continuation_mask(data: DistillData) -> torch.Tensor:
    """[N, T] bool: the valid tokens the target wrote, after each window's prompt (every valid token when the data
    hold no continuations, `--new-tokens 0`)."""
    mask = data.valid.clone()
    if data.stats.get("new_tokens", 0) > 0:
        mask[:, : data.stats["prompt_tokens"]] = False
    return mask


def frequent_tokens(tokens: torch.Tensor, valid: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The draft vocabulary d2t [size] int64 (draft id -> target id): the `size` most frequent ids among the valid
    `tokens` (the target's continuations), most frequent first, ties by id; ids never seen fill the rest by id."""
    counts = torch.bincount(tokens[valid].flatten().cpu(), minlength=vocab_size)  # [V]
    return torch.sort(counts, descending=True, stable=True).indices[:size]


def unroll_mask(length: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[length, (step + 1) * length] bool: what the queries of pass `step` see of passes 0..step (module doc)."""
    j = torch.arange(length, device=device)[:, None]
    i = torch.arange(length, device=device)[None, :]
    blocks = [i <= j - step] + [i == j - step + s for s in range(1, step + 1)]
    return torch.cat(blocks, 1)


def unrolled(head: EagleHead, embeds: torch.Tensor, features: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """Outputs of each pass [B, T, H] for entries reading embeds [B, T, H] (x_{j+1}) and the target's features
    [B, T, k * H] (f_j; k = 1 but for a fused head, whose `fuse` maps them to [B, T, H])."""
    length = embeds.shape[1]
    positions = torch.arange(length, device=embeds.device)
    outs: list[torch.Tensor] = []
    keys = values = None
    features = head.fuse(features)  # [B, T, H]
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
    features: torch.Tensor,  # [B, T, H] last hidden states (the soft labels; the head's input unless fused)
    valid: torch.Tensor,  # [B, T] bool
    *,
    layer_features: torch.Tensor | None = None,  # [B, T, k * H] the fused layers' outputs: a fused head's input
    passes: int = 3,
    reg_weight: float = 1.0,
) -> torch.Tensor:
    fused = head.config.feature_layers is not None
    if fused and layer_features is None:
        raise ValueError("an EAGLE head with feature_layers trains on the target's layer outputs (layer_features)")
    target = features[:, 1:]  # [B, T-1, H] f_{j+1}
    with torch.no_grad():  # over the draft vocabulary (the whole one unless reduced): restricted and renormalised
        target_logp = F.log_softmax((target @ head.target_rows(lm_head).t()).float(), -1)  # [B, T-1, N]
    inputs = layer_features if fused else features  # [B, T, k * H]
    outs = unrolled(head, F.embedding(tokens[:, 1:], embed), inputs[:, :-1], passes)
    total = features.new_zeros((), dtype=torch.float32)
    weights = 0.0
    for step, out in enumerate(outs):
        mask = valid[:, 1:].clone()
        mask[:, :step] = False
        logp = F.log_softmax(head.logits(out, lm_head).float(), -1)  # [B, T-1, N]
        kl = F.kl_div(logp, target_logp, log_target=True, reduction="none").sum(-1)  # [B, T-1]
        if not fused:  # a fused head predicts its own feature space: no target state to regress to (module doc)
            reg = F.smooth_l1_loss(out.float(), target.float(), reduction="none").mean(-1)  # [B, T-1]
            kl = kl + reg_weight * reg
        total = total + PASS_DECAY**step * (kl * mask).sum() / mask.sum().clamp_min(1)
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
    """Top-1 agreement with the target's greedy token (over its whole vocabulary) of each unrolled pass (draft level)
    on `data`; a reduced head's pick counts as its target id."""
    hits = torch.zeros(passes, dtype=torch.float64, device=data.features.device)
    counts = torch.zeros(passes, dtype=torch.float64, device=data.features.device)
    for start in range(0, len(data), batch_size):
        tokens = data.tokens[start : start + batch_size]
        features = data.features[start : start + batch_size]
        inputs = features if head.config.feature_layers is None else data.layer_features[start : start + batch_size]
        valid = data.valid[start : start + batch_size, 1:]
        greedy = (features[:, 1:] @ lm_head.t()).argmax(-1)  # [B, T-1]
        outs = unrolled(head, F.embedding(tokens[:, 1:], embed), inputs[:, :-1], passes)
        for step, out in enumerate(outs):
            mask = valid.clone()
            mask[:, :step] = False
            pick = head.logits(out, lm_head).argmax(-1)  # [B, T-1] draft ids
            pick = pick if head.d2t is None else head.d2t[pick]  # target ids
            hits[step] += ((pick == greedy) & mask).sum().double()
            counts[step] += mask.sum().double()
    return (hits / counts.clamp_min(1)).tolist()


@torch.no_grad()
def draft_vocab_coverage(
    d2t: torch.Tensor, lm_head: torch.Tensor, data: DistillData, *, batch_size: int = 8
) -> dict[str, float]:
    """How much of the target a draft vocabulary `d2t` [N] covers at the positions the loss reads on `data` (every
    valid next token): `target_mass`, the mean share of the target's probability on the N tokens; `greedy_in_vocab`,
    the share of positions whose greedy token is one of them (an upper bound of the head's top-1 accuracy)."""
    mass = torch.zeros((), dtype=torch.float64, device=data.features.device)
    greedy_in = torch.zeros_like(mass)
    positions = torch.zeros_like(mass)
    in_vocab = torch.zeros(lm_head.shape[0], dtype=torch.bool, device=lm_head.device)
    in_vocab[d2t.to(lm_head.device)] = True
    for start in range(0, len(data), batch_size):
        valid = data.valid[start : start + batch_size, 1:]  # [B, T-1]
        logits = (data.features[start : start + batch_size, 1:] @ lm_head.t()).float()  # [B, T-1, V]
        share = (logits[..., in_vocab].logsumexp(-1) - logits.logsumexp(-1)).exp()  # [B, T-1]
        mass += (share * valid).sum().double()
        greedy_in += (in_vocab[logits.argmax(-1)] & valid).sum().double()
        positions += valid.sum().double()
    count = positions.clamp_min(1)
    return {"target_mass": float(mass / count), "greedy_in_vocab": float(greedy_in / count)}
