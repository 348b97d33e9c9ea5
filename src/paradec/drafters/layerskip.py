"""`layerskip`: self-speculation — the target drafts with a subset of its own layers and verifies with all of them.

The draft is the target's own network with layers left out (Elhoushi et al. 2024, "LayerSkip"; Zhang et al. 2024,
"Draft & Verify"): an early exit (layers 0..E-1, then the final norm and the LM head) or a skip pattern (e.g.
the first and last layers, or every other layer). No second model and no training: it runs on a weight-sharing
view of the native runner (`NativeRunner.view(layers)`: the same weights, a KV cache and CUDA graphs of its own),
drafts a chain of k tokens like the `draft` method, and the full target verifies them — greedy by argmax,
sampling by rejection against the early-exit distribution q, so the output is exactly the target's.

The draft keeps its own cache rather than reading the target's: the first E layers' keys/values of the
committed tokens would be the same, but drafters never touch the target's cache (DESIGN.md, rule 1). What it
costs: the view prefills the prompt through its layers (a fraction of the target's prefill) and catches up on
one or two tokens per step.

Choosing the layers (when `layers` is not given): the full model continues the first prompt the engine decodes with
this method for 64 greedy tokens, and each candidate (early exits at 1/4..3/4 of the depth, the same budgets spent
on the first and last layers, and every other layer) is scored teacher-forced on that continuation: α = how often
its argmax equals the full model's next token there (the model's own output, not the prompt: acceptance is
measured on what the target generates, which is often far more predictable than its prompts).
With α as the per-token acceptance, a chain of k drafts yields E(k) = (1 - α^(k+1)) / (1 - α) tokens per step for
a cost of 1 + k·r target steps, r = (draft layers + 1) / (target layers + 1) (the + 1 stands for the embedding,
LM head and launch overhead). The candidate and k with the most tokens per unit cost win. That ratio is the plan's
expected speedup over vanilla decoding (1 token per step of cost 1); when even the best plan's is <= 1 (the exits
agree too rarely with the full model: τ ≈ 1 at the price of the drafts), drafting would only slow decoding down, so
the drafter proposes nothing and the generation runs plain target steps, as `vanilla` does; the engine logs that once
(per requested layers and k). Options that fix both `layers` and `k` are used as given.

Per engine (`LayerSkipMethod`): the agreement table, so calibration costs one 64-token greedy decode plus one
teacher-forced forward per candidate, once; and the drafting views of the last VIEWS_KEPT layer sets, so their
CUDA graphs are captured once, while a request per layer set cannot pile up KV caches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from paradec.drafters import register
from paradec.drafters.adaptive import AdaptiveLength
from paradec.drafters.base import LRU, DecodeState, Drafter, Method, Resources
from paradec.drafters.draft_model import MAX_K as MAX_DRAFT_K
from paradec.drafters.draft_model import DraftChain
from paradec.drafters.options import Options, bound
from paradec.errors import ParadecError, shown
from paradec.runners.native import NativeRunner
from paradec.types import Proposal, Verdict

log = logging.getLogger(__name__)

MAX_K = 8  # longest draft the planner (and the adaptive policy, when k is not given) considers
CALIBRATION_PROMPT_TOKENS = 256  # the first prompt's last tokens, continued greedily by the full model ...
CALIBRATION_NEW_TOKENS = 64  # ... for this many tokens, on which each candidate's agreement is measured
VIEWS_KEPT = 4  # drafting views (each with its own KV cache and graphs) an engine keeps, most recently used
AGREEMENTS_KEPT = 64  # measured layer sets an engine remembers (the calibration candidates and a request's own)


@dataclass(frozen=True)
class LayerSkipOptions(Options):
    method = "layerskip"
    # the draft's layers, ascending ("0,1,2,3"); None = chosen on a prompt
    layers: tuple[int, ...] | None = field(default=None, metadata=bound(0, limit="layer"))
    # draft tokens per step (with adaptive: the longest draft); None = chosen with the layers
    k: int | None = field(default=None, metadata=bound(1, MAX_DRAFT_K, limit="proposal"))
    adaptive: bool = False  # choose the draft length per step from measured acceptance and step time

    def check_together(self, limits) -> None:
        if self.layers is not None and list(self.layers) != sorted(set(self.layers)):
            raise ParadecError(
                f"option layers={shown(self.layers)} for method 'layerskip' must list distinct layers in ascending "
                "order",
                param="method_options",
            )


def candidate_layers(n_layers: int) -> list[tuple[int, ...]]:
    """Draft layer sets tried by calibration: early exits, first+last blocks and every other layer (each skipping
    at least one of the `n_layers` layers), without repeats."""
    out: list[tuple[int, ...]] = []
    for share in (1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4):
        keep = min(max(round(n_layers * share), 1), n_layers - 1)
        out.append(tuple(range(keep)))  # early exit after `keep` layers
        head = -(-2 * keep // 3)
        out.append(tuple(range(head)) + tuple(range(n_layers - (keep - head), n_layers)))  # skip a middle block
    out.append((*range(0, n_layers - 1, 2), n_layers - 1))  # every other layer, then the last
    return [layers for layers in dict.fromkeys(out) if len(layers) < n_layers]


def draft_cost(layers: tuple[int, ...], n_layers: int) -> float:
    """Cost of one draft forward relative to a target forward."""
    return (len(layers) + 1) / (n_layers + 1)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per step of a k-token chain whose tokens are each accepted with probability alpha."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, layers: tuple[int, ...], n_layers: int) -> float:
    """The planner's speedup of a plan over vanilla decoding: expected tokens per step / the step's cost (a target
    step costs 1; vanilla: 1 token for 1)."""
    return expected_tokens(alpha, k) / (1.0 + k * draft_cost(layers, n_layers))


def plan(agreement: dict[tuple[int, ...], float], n_layers: int, k: int | None = None) -> tuple[tuple[int, ...], int]:
    """(layers, k) with the most expected tokens per unit of step cost; `k` fixes the draft length."""
    lengths = range(1, MAX_K + 1) if k is None else (k,)
    options = [(layers, length) for layers in agreement for length in lengths]
    return max(options, key=lambda o: expected_speedup(agreement[o[0]], o[1], o[0], n_layers))


@torch.no_grad()
def measure_agreement(
    target: NativeRunner, prompt: list[int], candidates: list[tuple[int, ...]]
) -> dict[tuple[int, ...], float]:
    """{layers: share of positions where the layers' argmax equals the full model's} over the full model's own greedy
    continuation of `prompt` (teacher-forced). Runs on temporary eager runners over the target's weights; never
    touches the target's cache."""
    new_tokens = min(CALIBRATION_NEW_TOKENS, target.max_length // 2)
    prompt = prompt[-min(CALIBRATION_PROMPT_TOKENS, target.max_length - new_tokens) :]
    length = len(prompt) + new_tokens
    full = NativeRunner(target.model, max_cache_len=length, static_shapes=False)
    token = full.forward(torch.tensor(prompt, device=target.device), logits="last").logits[-1].argmax(-1)
    full.commit(len(prompt))
    continuation = [token]
    for _ in range(new_tokens - 1):
        token = full.forward(token.view(1), logits="last").logits[-1].argmax(-1)  # stays on the device: no sync
        full.commit(1)
        continuation.append(token)
    sequence = torch.cat([torch.tensor(prompt, device=target.device), torch.stack(continuation)])  # [length]
    agreement = {}
    for layers in candidates:
        draft = NativeRunner(target.model, max_cache_len=length, layers=layers, static_shapes=False)
        picks = draft.forward(sequence, logits="all").logits.argmax(-1)  # [length] the draft's next-token argmax
        agreement[layers] = (picks[len(prompt) - 1 : -1] == sequence[len(prompt) :]).float().mean()
    return {layers: float(share) for layers, share in agreement.items()}  # one host sync for all candidates


class LayerSkipMethod(Method):
    """Per engine: the agreement table of calibration and the drafting views (both bounded, most recently used)."""

    def __init__(self, resources: Resources, drafter_class: type[Drafter]) -> None:
        super().__init__(resources, drafter_class)
        target = resources.target
        if not isinstance(target, NativeRunner):
            raise ParadecError(
                f"method 'layerskip' drafts with a subset of the target's own layers and needs the native runner; "
                f"this target runs on {type(target).__name__} (load it with runner='native' / --runner native)"
            )
        self.target = target
        self.n_layers = target.args.n_layers
        if self.n_layers < 2:
            raise ParadecError(f"method 'layerskip' needs a target of at least 2 layers, this one has {self.n_layers}")
        self.agreement: LRU[tuple[int, ...], float] = LRU(AGREEMENTS_KEPT)  # layers -> argmax agreement
        self.views: LRU[tuple[int, ...], NativeRunner] = LRU(VIEWS_KEPT)  # layers -> drafting view
        self.vanilla_noted: set[tuple] = set()  # requested (layers, k) whose fallback to vanilla steps was logged

    def limits(self) -> dict[str, int]:
        return {**super().limits(), "layer": self.n_layers - 1}

    def check(self, options: LayerSkipOptions) -> None:
        super().check(options)
        if options.layers is not None and len(options.layers) == self.n_layers:
            raise ParadecError(
                f"option layers={shown(options.layers)} for method 'layerskip' keeps all {self.n_layers} layers; "
                "leave at least one out",
                param="method_options",
            )

    def note_vanilla(self, options: LayerSkipOptions, layers: tuple[int, ...], k: int, alpha: float) -> None:
        """Log, once per requested (layers, k), that the best plan would not pay and steps run without drafts."""
        key = (options.layers, options.k)
        if key in self.vanilla_noted:
            return
        self.vanilla_noted.add(key)
        log.warning(
            "layerskip: the best plan (layers %s, k=%d, agreement %.3f) expects %.2fx vanilla's speed; decoding "
            "without drafts (plain target steps). Give both layers and k to draft anyway",
            ",".join(map(str, layers)), k, alpha, expected_speedup(alpha, k, layers, self.n_layers),
        )  # fmt: skip

    def view(self, layers: tuple[int, ...]) -> NativeRunner:
        """The drafting view over `layers` (made now if it is not among the last VIEWS_KEPT used)."""
        return self.views.get(layers, lambda: self.target.view(layers))

    def open(self, options: LayerSkipOptions) -> LayerSkip:
        return LayerSkip(self, options)


@register
class LayerSkip(Drafter):
    batchable = False  # one engine-wide workspace per option set serves one sequence (see paradec.batch)
    name = "layerskip"
    options_class = LayerSkipOptions
    method_class = LayerSkipMethod

    def __init__(self, method: LayerSkipMethod, options: LayerSkipOptions) -> None:
        super().__init__(method.resources, options)
        self.method = method
        self.target = method.target
        self.n_layers = method.n_layers
        self.layers: tuple[int, ...] | None = options.layers
        self.k: int | None = options.k
        self.chain: DraftChain | None = None  # None: no drafts (the chosen plan would not pay)
        self.policy: AdaptiveLength | None = None

    def begin(self, state: DecodeState) -> None:
        if self.layers is None or self.k is None:
            self.layers, self.k, alpha = self._plan(state.tokens)
            if expected_speedup(alpha, self.k, self.layers, self.n_layers) <= 1.0:
                self.method.note_vanilla(self.options, self.layers, self.k, alpha)
                return
        self.chain = DraftChain(self.method.view(self.layers), "the layerskip draft")
        self.chain.begin(state)
        if self.options.adaptive:
            longest = MAX_K if self.options.k is None else self.k
            cost = draft_cost(self.layers, self.n_layers)
            self.policy = AdaptiveLength(longest, draft_cost=cost, start_k=min(self.k, longest))
            self.policy.start()

    def propose(self, state: DecodeState, max_tokens: int) -> Proposal:
        if self.chain is None:
            return Proposal.empty(state.device)
        k = self.k if self.policy is None else self.policy.next_k()
        return self.chain.propose(state, min(k, max_tokens))

    def update(self, state: DecodeState, verdict: Verdict) -> None:
        if self.chain is None:
            return
        self.chain.update(verdict)
        if self.policy is not None:
            self.policy.observe(verdict.proposed, verdict.accepted)

    def _plan(self, tokens: list[int]) -> tuple[tuple[int, ...], int, float]:
        """(layers, k) of the best plan for what the options leave open, and the layers' agreement α."""
        candidates = [self.layers] if self.layers is not None else candidate_layers(self.n_layers)
        known = self.method.agreement
        missing = [layers for layers in candidates if layers not in known]
        measured = measure_agreement(self.target, tokens, missing) if missing else {}
        table = {layers: known.get(layers, lambda layers=layers: measured[layers]) for layers in candidates}
        layers, k = plan(table, self.n_layers, self.k)
        return layers, k, table[layers]
