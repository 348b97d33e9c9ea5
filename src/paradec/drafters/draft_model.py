"""`draft`: a smaller language model with the target's vocabulary proposes a chain of k tokens.

The draft model has its own runner and cache, kept in step with the committed sequence: before proposing, the
draft cache holds the first `runner.length` tokens of the sequence; the drafter feeds the rest (the tokens
emitted since, the pending one last) and then its own k - 1 draft tokens. After verification it rolls the cache
back to the tokens that are still valid (the sequence up to the pending token plus the accepted drafts).
Sampling draws each draft token from the draft's warped distribution q, which goes to the verifier for
rejection sampling (Leviathan et al. 2023). With `adaptive=true` the draft length follows
`paradec.drafters.adaptive.AdaptiveLength` (k is then the longest draft).

With `one_graph=true` (the default) and a runner that offers `ChainDrafting` (the native runner), the whole chain is
one call: on CUDA one graph replay of k forwards, the tokens chosen on the device (same tokens, same q, same cache
as the loop below). Other runners, and `one_graph=false`, run one forward per draft token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.adaptive import AdaptiveLength
from paradec.drafters.base import DecodeState, Drafter, Method, Resources
from paradec.drafters.options import Options, bound
from paradec.errors import ParadecError
from paradec.runners.base import ChainDrafting, Runner, SlotView, prefill
from paradec.sampling import align_vocab, sample, warp
from paradec.types import Proposal, Verdict

MAX_K = 32  # longest draft chain: every draft token is one forward of the draft model, one after the other


@dataclass(frozen=True)
class DraftOptions(Options):
    method = "draft"
    k: int = field(default=5, metadata=bound(1, MAX_K, limit="proposal"))  # draft tokens per step (adaptive: most)
    adaptive: bool = False  # choose the draft length per step from measured acceptance and step time
    one_graph: bool = True  # the whole chain as one CUDA graph where the draft runner offers it (native runner)


class DraftChain:
    """A drafting runner (its own cache) kept in step with the sequence; proposes chains of draft tokens."""

    def __init__(self, runner: Runner, what: str = "the draft model", *, one_graph: bool = True) -> None:
        self.runner = runner
        self.what = what  # names the drafter in errors
        self.one_graph = one_graph and isinstance(runner, ChainDrafting)
        self._base = 0  # sequence length (pending token included) when the last proposal was made
        self._drafted = 0

    def begin(self, state: DecodeState) -> None:
        if len(state.tokens) > self.runner.max_length:
            raise ParadecError(
                f"prompt of {len(state.tokens)} tokens exceeds {self.what}'s context of {self.runner.max_length}"
            )
        self.runner.reset()
        if len(state.tokens) > 1:
            prefill(self.runner, torch.tensor(state.tokens[:-1], device=self.runner.device))

    def _start(self, state: DecodeState, k: int) -> int:
        """The chain length this step drafts (k cut to the context), noted for `update`."""
        k = min(k, self.runner.max_length - len(state.tokens))
        self._base, self._drafted = len(state.tokens), max(k, 0)
        return k

    def propose(self, state: DecodeState, k: int) -> Proposal:
        """A chain of up to k tokens: argmax (greedy) or sampled from the warped draft distribution q (sent along)."""
        k = self._start(state, k)
        if k <= 0:
            return Proposal.empty(state.device)
        fresh = torch.tensor(state.tokens[self.runner.length :], device=self.runner.device)
        if self.one_graph and k <= self.runner.max_chain:
            tokens, probs = self.runner.draft_chain(fresh, k, state.sampling, state.generator, state.vocab_size)
            return Proposal(tokens=tokens.to(state.device), probs=None if probs is None else probs.to(state.device))
        out = prefill(self.runner, fresh, logits="last")
        tokens, probs = [], []
        for i in range(k):
            logits = align_vocab(out.logits[-1], state.vocab_size)  # [V]
            if state.sampling.greedy:
                token = logits.argmax(-1)
            else:
                q = warp(logits, state.sampling)  # [V]
                token = sample(q, state.generator)
                probs.append(q)
            tokens.append(token)
            if i < k - 1:
                out = prefill(self.runner, token.view(1), logits="last")
        return Proposal(
            tokens=torch.stack(tokens).to(state.device),
            probs=torch.stack(probs).to(state.device) if probs else None,
        )

    @staticmethod
    def propose_together(chains: list[DraftChain], states: list[DecodeState], ks: list[int]) -> list[Proposal]:
        """Chains of several sequences at once, when their runners are slots of one batched runner (`SlotView`):
        one forward per level for all of them (the first one feeds each its fresh tokens). Each sequence draws
        exactly what `propose` draws for it with `one_graph` off: the same tokens, q and generator calls, in order."""
        from paradec.step import SeqInputs, Step
        from paradec.tree import build_tree, chain_parents

        views = [c.runner for c in chains]
        batched = getattr(views[0], "batched", None)
        if not all(isinstance(v, SlotView) and v.batched is batched for v in views):
            return [c.propose(s, k) for c, s, k in zip(chains, states, ks, strict=True)]
        ks = [c._start(s, k) for c, s, k in zip(chains, states, ks, strict=True)]
        active = [b for b, k in enumerate(ks) if k > 0]
        drafted: dict[int, list[torch.Tensor]] = {b: [] for b in active}
        probs: dict[int, list[torch.Tensor]] = {b: [] for b in active}
        feed = {b: torch.tensor(states[b].tokens[views[b].length :], device=views[b].device) for b in active}
        level = 0
        while feed:
            order = list(feed)
            step = Step(
                [
                    SeqInputs(views[b].slot, feed[b], build_tree(chain_parents(feed[b].shape[0] - 1), feed[b].device),
                              Proposal.empty(feed[b].device))
                    for b in order
                ]
            )  # fmt: skip
            out = batched.forward(step, logits="all")
            batched.commit([s.size for s in step.seqs])
            feed = {}
            for i, b in enumerate(order):
                state = states[b]
                logits = align_vocab(out.logits[step.offsets[i + 1] - 1], state.vocab_size)  # [V]
                if state.sampling.greedy:
                    token = logits.argmax(-1)
                else:
                    q = warp(logits, state.sampling)
                    token = sample(q, state.generator)
                    probs[b].append(q)
                drafted[b].append(token)
                if level < ks[b] - 1:
                    feed[b] = token.view(1)
            level += 1
        proposals = []
        for b, state in enumerate(states):
            if ks[b] <= 0:
                proposals.append(Proposal.empty(state.device))
                continue
            proposals.append(
                Proposal(
                    tokens=torch.stack(drafted[b]).to(state.device),
                    probs=torch.stack(probs[b]).to(state.device) if probs[b] else None,
                )
            )
        return proposals

    def update(self, verdict: Verdict) -> None:
        # cached now: the sequence up to the pending token, then drafts 1..k-1; keep what was accepted
        valid = self._base + min(verdict.accepted, self._drafted - 1) if self._drafted else self.runner.length
        self.runner.rollback(min(valid, self.runner.length))


class DraftMethod(Method):
    """The draft model is this engine's resource: a request for `draft` on an engine without one fails when it is
    built, not when it runs."""

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        super().__init__(resources, drafter_class)
        resources.draft_runner()


@register
class DraftModel(Drafter):
    name = "draft"
    options_class = DraftOptions
    method_class = DraftMethod
    draft_token_cost = 0.1  # prior cost of one draft token relative to a target step (until steps are timed)

    def __init__(self, resources: Resources, options: DraftOptions) -> None:
        super().__init__(resources, options)
        self.chain = DraftChain(resources.draft_runner(), one_graph=options.one_graph)
        self.runner = self.chain.runner
        self.policy: AdaptiveLength | None = None

    def begin(self, state: DecodeState) -> None:
        self.chain.begin(state)
        if self.options.adaptive:
            self.policy = AdaptiveLength(self.options.k, draft_cost=self.draft_token_cost)
            self.policy.start()

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        return self.chain.propose(state, self._k(max_tokens))

    def _k(self, max_tokens: int) -> int:
        k = self.options.k if self.policy is None else self.policy.next_k()
        return min(k, max_tokens)

    @classmethod
    def propose_all(cls, drafters: list[Drafter], states: list[DecodeState], max_tokens: list[int]) -> list[Proposal]:
        """Inside a batch: every sequence's draft chain together, one draft-model forward per level
        (`DraftChain.propose_together`), unless a drafter drafts in one graph of its own."""
        if len(drafters) == 1 or any(d.chain.one_graph for d in drafters):
            return super().propose_all(drafters, states, max_tokens)
        ks = [d._k(m) for d, m in zip(drafters, max_tokens, strict=True)]
        return DraftChain.propose_together([d.chain for d in drafters], states, ks)

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        self.chain.update(verdict)
        if self.policy is not None:
            self.policy.observe(verdict.proposed, verdict.accepted)
