"""Adapting a small draft model to PARD: k tokens per forward (An et al. 2025, "PARD").

The draft learns to read a sequence followed by k - 1 mask tokens and to predict, at the last real token and at
mask i, the target's distribution 1 and i + 1 places ahead. Each training row is one self-distilled window
(`paradec.train.data`) cut at a random split s inside the target's answer: inputs w[0..s] + MASK x (k - 1); the loss
is KL(target || draft) at positions s .. s + k - 1 against the target's own distributions there (softmax of its LM
head over the stored hidden states f_{s+i}, which predict w[s+i+1]), plus the same KL at the real positions before
s, which keeps the draft an ordinary next-token model too. Rows are right-padded to the longest and masked.

The mask token is a row of the draft's embedding no text uses (`choose_mask_token`): the first id past the
tokenizer's vocabulary when the embedding has spare rows (Qwen2.5's 151,936 rows hold 151,665 tokens), else the pad
token, else the last id. Its embedding starts at the mean of the used rows (`init_mask_embedding`: a spare row may
hold anything, NaN included); training gives it its meaning; the checkpoint's config records it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def choose_mask_token(tokenizer, vocab_size: int) -> int:
    """An id of the draft's embedding for the mask token (see the module docstring)."""
    used = len(tokenizer)
    if used < vocab_size:
        return used
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(pad, int) and pad != eos and 0 <= pad < vocab_size:
        return pad
    return vocab_size - 1


@torch.no_grad()
def init_mask_embedding(draft, mask: int, used: int) -> None:
    """Start a spare (or non-finite) mask row of the input embedding at the mean of the `used` rows: a spare row of
    a checkpoint can hold anything (a NaN there makes every mask position's output NaN)."""
    weight = draft.get_input_embeddings().weight
    if mask < used and bool(torch.isfinite(weight[mask]).all()):
        return  # a real token's row (the pad token's, or the last one's): trained from what it is
    weight[mask] = weight[: min(used, weight.shape[0])].float().mean(0).to(weight.dtype)


def splits(valid: torch.Tensor, prompt_len: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A split s per row [B]: uniform over the answer's positions [prompt_len - 1, last valid - 1] (a window whose
    answer is too short splits at prompt_len - 1)."""
    last = valid.long().cumsum(1).argmax(1)  # [B] the last valid position
    low = torch.full_like(last, prompt_len - 1)
    high = torch.maximum(low, last - 1)
    u = torch.rand(last.shape, generator=generator)
    return (low + (u * (high - low + 1).float()).long().clamp_max(high - low)).clamp_min(0)


def pard_batch(tokens: torch.Tensor, split: torch.Tensor, k: int, mask: int, pad: int):
    """Inputs [B, L] (w[0..s] + mask x (k - 1), right-padded), attention mask [B, L] and, per row, the positions
    whose outputs are scored: (rows, positions, source positions, is_mask) of the real positions < s and the k
    prediction positions s .. s + k - 1 (source: the window position whose target distribution is the label)."""
    B, T = tokens.shape
    lengths = split + k  # s + 1 real tokens and k - 1 masks
    L = int(lengths.max())
    inputs = torch.full((B, L), pad, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    rows, positions, sources = [], [], []
    for b in range(B):
        s = int(split[b])
        inputs[b, : s + 1] = tokens[b, : s + 1]
        inputs[b, s + 1 : s + k] = mask
        attention[b, : s + k] = 1
        for p in range(s + k):
            source = p  # real positions predict their next token; mask i (p = s + i) predicts i + 1 ahead
            if source < T - 1:
                rows.append(b)
                positions.append(p)
                sources.append(source)
    return inputs, attention, torch.tensor(rows), torch.tensor(positions), torch.tensor(sources)


def many_splits(valid: torch.Tensor, prompt_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct splits per row [B, count], sorted, drawn uniformly from the answer's positions as `splits`
    draws one (-1 where an answer has fewer positions than `count`)."""
    B = valid.shape[0]
    last = valid.long().cumsum(1).argmax(1)  # [B] the last valid position
    low = prompt_len - 1
    out = torch.full((B, count), -1, dtype=torch.long)
    for b in range(B):
        high = max(low, int(last[b]) - 1)  # splits in [low, high]
        span = high - low + 1
        pick = torch.randperm(span, generator=generator)[:count] + low
        out[b, : pick.shape[0]] = pick.sort().values.clamp_min(0)
    return out


def parallel_batch(tokens: torch.Tensor, valid: torch.Tensor, split: torch.Tensor, k: int, mask: int):
    """Every split of a row in one sequence (PARD's parallel training layout): the row's T tokens, then for each
    mask level i = 1 .. k - 1 one mask token per split t_j (`split`: [B, m], -1 = none). Mask (i, j) stands where
    mask i stands in `pard_batch`'s single-split row cut at t_j: position t_j + i, seeing the real tokens 0 .. t_j
    and the masks (1 .. i, j). Real tokens see the real tokens before them (causal), never a mask. So one forward
    gives the outputs of m single-split rows (up to rounding; tested).

    Returns inputs [B, L], positions [B, L], allowed [B, L, L] (bool: query row sees key column) and the scored
    outputs (rows, positions, sources): every real position whose next token is real (source: itself), and every
    mask whose label is real (source t_j + i: the target's distribution i + 1 places after t_j)."""
    B, T = tokens.shape
    m = split.shape[1]
    L = T + (k - 1) * m
    index = torch.arange(L)
    real = index < T
    level = torch.where(real, 0, (index - T) // max(m, 1) + 1)  # [L] mask level (0: a real token)
    column = torch.where(real, 0, (index - T) % max(m, 1))  # [L] which split a mask belongs to
    inputs = torch.cat((tokens, torch.full((B, L - T), mask, dtype=tokens.dtype)), dim=1)
    anchor = torch.where(real[None, :], index[None, :], split[:, column])  # [B, L] the last real token seen
    positions = torch.where(real[None, :], index[None, :], anchor + level[None, :]).clamp_min(0)
    sees_real = real[None, None, :] & (index[None, None, :] <= anchor[:, :, None])  # [B, L, L]
    same_split = (column[:, None] == column[None, :]) & (level[None, :] <= level[:, None])  # [L, L]
    sees_mask = (~real[:, None]) & (~real[None, :]) & same_split
    allowed = sees_real | sees_mask[None]
    # scored outputs: real p -> its next token; mask (i, j) -> token t_j + i + 1
    source = torch.where(real[None, :], index[None, :], anchor + level[None, :])  # [B, L]
    label = source + 1
    has_label = (anchor >= 0) & (label < T)
    has_label &= valid.gather(1, label.clamp_max(T - 1))
    rows, where = has_label.nonzero(as_tuple=True)
    return inputs, positions, allowed, rows, where, source[rows, where]


def run_masked(draft, inputs: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The draft's last hidden states [B, L, H] of `inputs` under a custom attention pattern (`allowed`, bool [B, L,
    L]) and position ids: an additive 4D mask, which `transformers` takes as given (eager and SDPA alike)."""
    dtype = draft.get_input_embeddings().weight.dtype
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    out = draft.base_model(input_ids=inputs, position_ids=positions, attention_mask=bias[:, None])
    return out.last_hidden_state


def pard_loss(
    draft,
    lm_head: torch.Tensor,  # [V, H] the target's LM head, frozen
    tokens: torch.Tensor,  # [B, T]
    features: torch.Tensor,  # [B, T, H] the target's hidden states (f_t predicts token t + 1)
    valid: torch.Tensor,  # [B, T] bool
    split: torch.Tensor,  # [B]: a row per window cut there (`pard_batch`); [B, m]: m cuts in one row (`parallel_batch`)
    k: int,
    mask: int,
    pad: int,
) -> torch.Tensor:
    """The mean KL(target || draft) of every scored output of the windows cut at `split`."""
    device = features.device
    if split.dim() == 2:
        inputs, positions, allowed, rows, where, sources = parallel_batch(tokens.cpu(), valid.cpu(), split, k, mask)
        hidden = run_masked(draft, inputs.to(device), positions.to(device), allowed.to(device))
        rows, where, sources = rows.to(device), where.to(device), sources.to(device)
        logits = draft.get_output_embeddings()(hidden[rows, where])  # [M, Vd]: the LM head on scored rows only
    else:
        inputs, attention, rows, where, sources = pard_batch(tokens.cpu(), split.cpu(), k, mask, pad)
        inputs, attention = inputs.to(device), attention.to(device)
        rows, where, sources = rows.to(device), where.to(device), sources.to(device)
        # only where the label token is real (not past the target's end of text): the target's features there are
        # padding, and a non-finite one would turn the whole loss to NaN even times a zero weight
        keep = valid[rows, sources + 1].nonzero().squeeze(1)
        rows, where, sources = rows[keep], where[keep], sources[keep]
        logits = draft(input_ids=inputs, attention_mask=attention).logits[rows, where]  # [M, Vd]
    width = min(logits.shape[-1], lm_head.shape[0])
    with torch.no_grad():
        target_logp = F.log_softmax((features[rows, sources] @ lm_head[:width].t()).float(), -1)
    logp = F.log_softmax(logits[..., :width].float(), -1)
    kl = F.kl_div(logp, target_logp, log_target=True, reduction="none").sum(-1)  # [M]
    return kl.sum() / max(1, kl.shape[0])


@torch.no_grad()
def parallel_agreement(
    draft, tokens: torch.Tensor, valid: torch.Tensor, split: torch.Tensor, k: int, mask: int
) -> float:
    """The share of `parallel_batch`'s scored outputs whose top-1 token equals that of the same output computed
    from `pard_batch`'s single-split row: how faithfully this model and backend (attention kernel, `transformers`'
    handling of a 4D mask) run the parallel layout, checked before training on it."""
    device = tokens.device
    inputs, positions, allowed, rows, where, _ = parallel_batch(tokens.cpu(), valid.cpu(), split, k, mask)
    hidden = run_masked(draft, inputs.to(device), positions.to(device), allowed.to(device))
    head = draft.get_output_embeddings()
    T, m = tokens.shape[1], split.shape[1]
    same = total = 0
    for b in range(tokens.shape[0]):
        for j, t in enumerate(split[b].tolist()):
            if t < 0:
                continue
            single, attention, *_ = pard_batch(tokens[b : b + 1].cpu(), torch.tensor([t]), k, mask, pad=0)
            alone = draft.base_model(input_ids=single.to(device), attention_mask=attention.to(device))
            for i in range(1, k):  # the masks (i = 0 is the real token t, the same causal row in both)
                at = T + (i - 1) * m + j
                if not bool(((rows == b) & (where == at)).any()):
                    continue  # past the window's end: not scored
                total += 1
                same += int(head(hidden[b, at]).argmax() == head(alone.last_hidden_state[0, t + i]).argmax())
    return same / total if total else 1.0


@torch.no_grad()
def pard_accuracy(draft, lm_head: torch.Tensor, data, k: int, mask: int, pad: int, prompt_len: int) -> list[float]:
    """Top-1 agreement with the target's greedy token at each of the k prediction positions, on `data` cut at
    fixed (seeded) splits."""
    generator = torch.Generator().manual_seed(0)
    split = splits(data.valid.cpu(), prompt_len, k, generator)
    hits, totals = [0] * k, [0] * k
    device = data.features.device
    for start in range(0, data.tokens.shape[0], 8):
        tokens = data.tokens[start : start + 8]
        s = split[start : start + 8]
        inputs, attention, _, _, _ = pard_batch(tokens.cpu(), s, k, mask, pad)
        logits = draft(input_ids=inputs.to(device), attention_mask=attention.to(device)).logits
        width = min(logits.shape[-1], lm_head.shape[0])
        for b in range(tokens.shape[0]):
            for i in range(k):
                p, source = int(s[b]) + i, int(s[b]) + i
                if source + 1 >= tokens.shape[1] or not bool(data.valid[start + b, source + 1]):
                    continue
                target = int((data.features[start + b, source] @ lm_head[:width].t()).argmax())
                hits[i] += int(int(logits[b, p, :width].argmax()) == target)
                totals[i] += 1
    return [round(h / t, 4) if t else 0.0 for h, t in zip(hits, totals)]
