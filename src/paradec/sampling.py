"""Logits -> the warped target distribution, and sync-free sampling from it.

The distribution every method preserves is the one plain sampling draws from: softmax of the logits after
temperature -> top-k -> top-p -> min-p, applied in that order with `transformers`' semantics (ties at the k-th
logit are kept; top-p keeps the smallest set whose mass exceeds p; min-p drops tokens below min_p * max prob;
each filter keeps at least one token). Drafters that sample warp their own logits with the same function, so the
verifier compares p and q after the same warping.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is a draw from p. It needs no host
sync (unlike `torch.multinomial`'s checks) and is reproducible from a `torch.Generator`.
"""

from __future__ import annotations

import torch

from paradec.config import SamplingParams


def warp(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Warped probabilities, float32, same shape as `logits` ([..., V]). Greedy params give a one-hot argmax."""
    logits = logits.float()
    if sp.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sp.temperature
    if sp.top_k > 0 and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1.0 - sp.top_p)
        # keep at least the most likely token (`fill_`: a kernel argument; an assigned scalar is a host-to-device
        # copy, which a CUDA graph capture refuses: the one-graph draft chain warps inside one)
        remove_sorted[..., -1].fill_(False)
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(-1)
    if sp.min_p > 0.0:
        top = probs.amax(-1, keepdim=True)
        keep = probs >= sp.min_p * top
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` ([..., V] -> [...]) by the exponential race; zero-probability tokens never win."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def make_generator(sp: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator on `device` (None for greedy: no randomness is used)."""
    if sp.greedy:
        return None
    gen = torch.Generator(device=device)
    if sp.seed is None:
        gen.seed()
    else:
        gen.manual_seed(sp.seed)
    return gen


def align_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cut or pad (with -inf) the last dimension to `vocab_size` (a draft model's logits to the target's width)."""
    width = logits.shape[-1]
    if width == vocab_size:
        return logits
    if width > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - width), float("-inf"))
    return torch.cat([logits, pad], -1)
