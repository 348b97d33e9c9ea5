"""`pld`: prompt lookup decoding — draft by copying what followed the last n-gram's previous occurrence.

The sequence so far (prompt + output) is indexed incrementally: for each n in [min_ngram, max_ngram], a map from
n-gram to the position right after its most recent occurrence. To propose, the drafter takes the longest suffix
n-gram seen before and copies the tokens that followed its most recent occurrence. When the copy would run past
the end of the sequence (the match is close behind, as in a repeating pattern), it continues with the period
of the repetition, so a loop of period p yields a full draft. Drafts are point masses (no q): verified by token
match, exactly, also when sampling (Saxena 2023, "Prompt Lookup Decoding"; Yang et al. 2023, "Inference with
Reference"). With `adaptive=true` the number of tokens copied per step follows
`paradec.drafters.adaptive.AdaptiveLength` (num_draft_tokens is then the longest draft).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paradec.drafters import register
from paradec.drafters.adaptive import AdaptiveLength
from paradec.drafters.base import DecodeState, HostDrafter, Resources
from paradec.drafters.options import Options, bound
from paradec.errors import ParadecError
from paradec.types import Verdict

MAX_NGRAM = 32  # each position enters max_ngram - min_ngram + 1 n-grams: at 32, ~40 MB of index for 4k tokens


@dataclass(frozen=True)
class PLDOptions(Options):
    method = "pld"
    max_ngram: int = field(default=3, metadata=bound(1, MAX_NGRAM))  # longest suffix n-gram matched
    min_ngram: int = field(default=1, metadata=bound(1, MAX_NGRAM))  # shortest suffix n-gram matched
    # tokens copied per step (with adaptive: the longest draft)
    num_draft_tokens: int = field(default=10, metadata=bound(1, limit="proposal"))
    adaptive: bool = False  # choose the draft length per step from measured acceptance and step time

    def check_together(self, limits) -> None:
        if self.min_ngram > self.max_ngram:
            raise ParadecError(
                f"option min_ngram={self.min_ngram} for method 'pld' exceeds max_ngram={self.max_ngram}",
                param="method_options",
            )


class NgramIndex:
    """Most recent continuation start of every n-gram (n in [min_n, max_n]) of a growing token list."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)  # longest first
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # positions < indexed have been entered as continuation starts

    def extend(self, tokens: list[int]) -> None:
        for start in range(max(self.indexed, 1), len(tokens)):
            for n in self.sizes:
                if start >= n:
                    self.maps[n][tuple(tokens[start - n : start])] = start
        self.indexed = max(self.indexed, len(tokens))

    def lookup(self, tokens: list[int], count: int) -> list[int]:
        """Up to `count` tokens predicted to follow `tokens` (empty if no suffix n-gram occurred before)."""
        self.extend(tokens)
        end = len(tokens)
        for n in self.sizes:
            if n > end:
                continue
            start = self.maps[n].get(tuple(tokens[end - n :]))
            if start is None:
                continue
            period = end - start  # a repetition of this period is what we assume
            return [tokens[start + (i % period)] for i in range(count)]
        return []


@register
class PromptLookup(HostDrafter):
    name = "pld"
    idle_skips_propose = True  # its draft with max_tokens = 0 is empty; update reads the tokens alone
    options_class = PLDOptions
    draft_token_cost = 0.02  # prior cost of scoring one more token relative to a step (until steps are timed)

    def __init__(self, resources: Resources, options: PLDOptions) -> None:
        super().__init__(resources, options)
        self.index = NgramIndex(options.min_ngram, options.max_ngram)
        self.policy: AdaptiveLength | None = None

    def begin(self, state: DecodeState) -> None:
        if self.options.adaptive:
            self.policy = AdaptiveLength(self.options.num_draft_tokens, draft_cost=self.draft_token_cost)
            self.policy.start()

    def draft(self, state: DecodeState, max_tokens: int) -> tuple[list[int], None]:
        count = self.options.num_draft_tokens if self.policy is None else self.policy.next_k()
        count = min(count, max_tokens)
        return (self.index.lookup(state.tokens, count) if count > 0 else []), None

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        if self.policy is not None:
            self.policy.observe(verdict.proposed, verdict.accepted)
