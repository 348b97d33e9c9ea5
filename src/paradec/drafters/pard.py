"""`pard`: a draft model that proposes k tokens in ONE forward (PARD, "Accelerating LLM Inference with Low-Cost
PARallel Draft Model Adaptation", An et al. 2025; also ParallelSpec and DFlash).

A PARD-adapted draft (`paradec train pard`) reads the sequence followed by k - 1 mask tokens and predicts, at the
last real token and at each mask, the token that many places ahead: one forward over
[fresh tokens ..., pending, MASK x (k - 1)] gives k draft distributions q_1..q_k. Only the real tokens are kept in
the draft's cache (the masks are provisional and dropped at commit), so after verification the cache holds the
sequence up to the old pending token and the next step feeds just the tokens emitted since: no rollback, one draft
forward per step instead of the draft model's k.

Exactness. Greedy takes each position's argmax. Sampling draws draft i from q_i, which was computed before any draft
was drawn and does not depend on d_i; the verifier's chain rejection sampling (accept d_i with min(1, p_i/q_i),
else resample from norm(max(0, p_i - q_i))) needs exactly that: the distribution each draft was drawn from. That
q_i ignores d_1..d_{i-1} (the draft guesses them jointly) costs acceptance, not exactness.

The mask token and the k it was trained for come with the checkpoint (`config.json` key `pard`:
{"mask_token_id", "k"}), read by the runners (`Runner.pard`). In a batch, every `pard` sequence of a step drafts in
the same single forward of the batched draft runner (`propose_all`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.base import DecodeState, Drafter, Method, Resources
from paradec.drafters.options import Options, bound
from paradec.errors import ParadecError
from paradec.runners.base import SlotView
from paradec.sampling import align_vocab, sample, warp
from paradec.types import Proposal, Verdict

MAX_K = 32


@dataclass(frozen=True)
class PardOptions(Options):
    method = "pard"
    # draft tokens per step (one forward); None: the k the draft was trained for
    k: int | None = field(default=None, metadata=bound(1, MAX_K, limit="proposal"))


def pard_config(runner, where: str = "method 'pard'") -> dict:
    """The draft runner's PARD settings, checked."""
    pard = getattr(runner, "pard", None)
    if not isinstance(pard, dict) or not isinstance(pard.get("mask_token_id"), int):
        raise ParadecError(
            f"{where} needs a PARD-adapted draft model (its config.json names a mask token): make one with "
            "`paradec train pard --model TARGET --draft SMALL` and pass its directory as --draft",
            param="method",
        )
    if not 0 <= pard["mask_token_id"] < runner.vocab_size:
        raise ParadecError(
            f"the PARD draft's mask_token_id {pard['mask_token_id']} lies outside its vocabulary of {runner.vocab_size}"
        )
    return pard


class PardMethod(Method):
    """The draft model is this engine's resource, and it must be PARD-adapted: checked when the method is made."""

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        super().__init__(resources, drafter_class)
        self.pard = pard_config(resources.draft_runner())


@register
class Pard(Drafter):
    name = "pard"
    options_class = PardOptions
    method_class = PardMethod

    def __init__(self, resources: Resources, options: PardOptions) -> None:
        super().__init__(resources, options)
        self.runner = resources.draft_runner()
        pard = pard_config(self.runner)
        self.mask = int(pard["mask_token_id"])
        self.k = options.k or int(pard.get("k") or 4)

    def begin(self, state: DecodeState) -> None:
        if len(state.tokens) > self.runner.max_length:
            raise ParadecError(
                f"prompt of {len(state.tokens)} tokens exceeds the PARD draft's context of {self.runner.max_length}"
            )
        self.runner.reset()

    def _count(self, state: DecodeState, max_tokens: int) -> int:
        # the forward holds the fresh tokens and k - 1 masks after the draft's cache: stay inside its context
        return min(self.k, max_tokens, self.runner.max_length - len(state.tokens) + 1)

    def _inputs(self, state: DecodeState, k: int) -> torch.Tensor:
        fresh = state.tokens[self.runner.length :]  # emitted since the last step, the pending token last
        return torch.tensor([*fresh, *[self.mask] * (k - 1)], device=self.runner.device)

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        k = self._count(state, max_tokens)
        if k < 1:
            return Proposal.empty(state.device)
        inputs = self._inputs(state, k)
        fresh = inputs.shape[0] - (k - 1)
        out = self.runner.forward(inputs, logits="all")
        self.runner.commit(fresh)  # the real tokens stay; the masks go
        return _drafts(out.logits[fresh - 1 : fresh - 1 + k], state)

    @classmethod
    def propose_all(cls, drafters: list[Drafter], states: list[DecodeState], max_tokens: list[int]) -> list[Proposal]:
        """Inside a batch: one forward of the batched draft runner for every sequence's [fresh, masks] chain."""
        views = [d.runner for d in drafters]
        batched = getattr(views[0], "batched", None)
        if len(drafters) == 1 or not all(isinstance(v, SlotView) and v.batched is batched for v in views):
            return super().propose_all(drafters, states, max_tokens)
        from paradec.step import SeqInputs, Step
        from paradec.tree import build_tree, chain_parents

        ks = [d._count(s, m) for d, s, m in zip(drafters, states, max_tokens, strict=True)]
        active = [b for b, k in enumerate(ks) if k >= 1]
        proposals = [Proposal.empty(s.device) for s in states]
        if not active:
            return proposals
        seqs, fresh = [], {}
        for b in active:
            inputs = drafters[b]._inputs(states[b], ks[b])
            fresh[b] = inputs.shape[0] - (ks[b] - 1)
            tree = build_tree(chain_parents(inputs.shape[0] - 1), inputs.device)
            seqs.append(SeqInputs(views[b].slot, inputs, tree, Proposal.empty(inputs.device)))
        step = Step(seqs)
        out = batched.forward(step, logits="all")
        batched.commit([fresh[b] for b in active])
        for i, b in enumerate(active):
            start = step.offsets[i] + fresh[b] - 1
            proposals[b] = _drafts(out.logits[start : start + ks[b]], states[b])
        return proposals

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        pass  # the draft's cache holds only real tokens: the next step feeds what was emitted since


def _drafts(logits: torch.Tensor, state: DecodeState) -> Proposal:
    """A chain from k rows of draft logits: argmax each (greedy), or a draw from each row's warped q."""
    logits = align_vocab(logits, state.vocab_size)  # [k, V]
    if state.sampling.greedy:
        return Proposal(tokens=logits.argmax(-1).to(state.device))
    q = warp(logits, state.sampling)  # [k, V]
    return Proposal(tokens=sample(q, state.generator).to(state.device), probs=q.to(state.device))
