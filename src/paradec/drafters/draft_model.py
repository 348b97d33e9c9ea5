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
from paradec.runners.base import ChainDrafting, Runner, prefill
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

    def propose(self, state: DecodeState, k: int) -> Proposal:
        """A chain of up to k tokens: argmax (greedy) or sampled from the warped draft distribution q (sent along)."""
        k = min(k, self.runner.max_length - len(state.tokens))
        self._base, self._drafted = len(state.tokens), max(k, 0)
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
        k = self.options.k if self.policy is None else self.policy.next_k()
        return self.chain.propose(state, min(k, max_tokens))

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        self.chain.update(verdict)
        if self.policy is not None:
            self.policy.observe(verdict.proposed, verdict.accepted)
