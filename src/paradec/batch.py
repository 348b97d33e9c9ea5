"""Batched speculative decoding with continuous batching: many sequences per target forward.

`BatchDecoder` steps every running sequence in one ragged forward of a batched runner
(`paradec.runners.native.BatchedNativeRunner`: one cache slot per sequence):

    admit     waiting requests take a free slot (at most `max_running` run) and open their drafters
    prefill   a joining prompt is fed in chunks of `prefill_chunk` tokens, one chunk per step; a wave of joining
              sequences shares one forward (within `prefill_tokens` padded inputs) when that costs less than
              feeding each chunk alone (`SHARED_PREFILL`), so a burst of new requests stalls the running
              sequences for one forward, not one per request
    propose   each running sequence's drafter proposes (the speculation policy may shrink or skip proposals)
    score     one forward over every sequence's [pending, proposal, aux] inputs, flattened (`paradec.step.Step`)
    verify    each sequence on its own rows, with its own sampling parameters and generator; the host values of
              the whole batch are copied in one sync (`paradec.verify.verify_all`)
    commit    each slot keeps its accepted path; then each sequence emits, checks its stops and updates its drafter

Sequences join and leave between steps; `cancel` drops one at the next step boundary and frees its slot. Each
sequence's output is what it decodes alone: its rows never see another slot (the runner's contract), its drafter
and generator are its own, and the verifier is the same function.

Drafters run per sequence, behind the same seam as alone. A drafter that runs a model gets a slot of a batched
runner of that model (the draft model: one slot of the engine's batched draft runner), and the drafters of one
class propose together (`Drafter.propose_all`): the draft model runs one forward per draft level for every
`draft` sequence of the step; EAGLE sequences hold the rows of their cache slots in one bank of workspaces (the
head's KV caches) and one step over the bank grows every tree: one head forward per level for all of them, one CUDA
graph (`paradec.drafters.eagle.WorkspaceBank`); Medusa's heads run once for all its sequences. Layerskip runs the
target's own layers through views that serve one sequence, so it is not batched yet (`Drafter.batchable`): a batch refuses it with a clear error.

Speculation policy (`SpeculationPolicy`): from the measured step times (a step that met a new CUDA graph bucket is
not counted: it timed an eager first use or a capture) it fits t(N) = a + b·N (N: the forward's inputs) and keeps
each sequence's tokens and draft inputs per speculative step (`speculative_rates`); each step it compares the
expected tokens per second of speculating (Σ τ_b / t(N_spec)) with that of plain decoding (B / t(B)) and turns proposals off for the step when
plain decoding wins (a large batch on a compute-bound forward). Sequences whose drafters draft on the host (pld,
suffix) may sit a speculative step out: the policy speculates for those whose τ_b - 1 per draft input raise the
step's rate (`SpeculationPolicy.choose`), and the others score their pending token alone. While it is off, a sequence whose drafter drafts on
the host alone (pld, suffix) keeps its rates fresh with shadow drafts (`BatchDecoder._shadow`: a draft made and
never scored, decided by the tokens the target then emits); the others get probes, speculation again now and then
(ever more rarely while it keeps losing). The step timings are the runner's (`StepTimings`), shared by every decoder
an engine makes over it. A speculative step of host drafters that would meet a graph bucket not captured yet runs
without its proposals until that bucket has been asked for `NEW_GRAPH_DEMAND` times (a bucket that keeps coming
back is worth its capture, a rare shape is not). A step that speculates may also cut every proposal to a depth
(`SpeculationPolicy.cap`: 8, 4, 2 or 1) when the shallower proposals promise more tokens per second: each
sequence's acceptance and proposal depth by position, over its uncapped speculative steps (`depth_rates`), give
the tokens and inputs expected at each depth. Until the fit has its samples it speculates, for at most
`max_unfitted` steps. Whatever the policy says, a step's proposals are cut so that its inputs fit the runner's
largest bucketed step (`_within_budget`: 512 inputs, 7 draft tokens per sequence at batch 64), since a larger one
runs without a graph; the estimates take such steps for what speculation yields at that batch size. (A cap bounds
the draft tokens a path may use: the inputs of chains and of suffix's trees; EAGLE, Medusa, lookahead and
multisample trees keep the node counts of their own options.)

Overlapped steps (`overlap`, default on): a step without any proposal (every sequence vanilla, or speculation off
for sequences whose drafters may skip `propose` then: `Drafter.idle_skips_propose`, pld and suffix; none needing
hidden states) knows each sequence's next input before the host reads it: the verifier's pick stays on the device
(`Deferred.final`), the commit of one input per sequence needs no verdict, and the host values travel by an
asynchronous copy. So the step is launched (`_launch_plain`: forward, picks, commit, copy queued) before the step in
flight is landed (`_land`: its tokens emitted, stops checked, drafters updated), and the device runs one while the
host lands the other (vLLM's "async scheduling" does the same). A sequence that ends with the landed step was already
in the next one: its extra token is never emitted and its slot is freed (a stale entry, as after any release); one
that reaches max_new_tokens is not launched again. A step with proposals needs the verdicts first: it lands the step
in flight, then runs as before.

Tensor parallelism: on a sharded target (`paradec.runners.native.tp`) every rank runs the same decoder over the same
requests (SPMD); the one choice a rank would make on its own, the policy's (from its own timings), is made on rank 0
and taken by every rank (`TensorParallel.agree`, over a host group: one small broadcast per decode step).

Samples of one request (`Request.n` > 1, `submit_samples`): n sequences of the batch, sample i seeded seed + i, in one
`SampleGroup`. A sample's drafter may read its siblings' tokens, and nothing else of them, through its resources:
`_SeqResources.siblings()` gives a `Siblings`, whose `others()` are read-only `TokenView`s of the other samples'
tokens (prompt and output so far; a view copies out what it is asked for, never hands out the list) and whose
`shared` dict is the group's, for what the samples' drafters derive from those tokens together (the `multisample`
drafter's n-gram index). Proposals are made before any sequence of the step advances, so every sibling is read as
it stood at the end of the previous step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

import torch

from paradec.decode import Decoding, Result
from paradec.drafters.base import Drafter
from paradec.errors import ParadecError
from paradec.metrics import bump
from paradec.request import Request
from paradec.step import Step
from paradec.types import Proposal, Verdict
from paradec.verify import Deferred, verify_all, verify_deferred, verify_greedy_all

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens a joining sequence feeds per step
DEFAULT_PREFILL_TOKENS = 4096  # padded inputs of one forward over the joining sequences' chunks (`_prefill`)
# One unbucketed forward over a wave of prompt chunks costs about as much as this many chunks fed alone on captured
# CUDA graphs, and as one chunk too long for the buckets fed alone (H200, the 1.5B's shape: 20-31 ms for 1-32
# chunks together, 2.8 ms per 80-token chunk alone, 16-23 ms per 300-token one; scripts/profile_prefill.py,
# bench/results/m14-h200-2026-12-04). `_prefill` shares a forward when feeding alone would cost more.
SHARED_PREFILL = 8
SPECULATE = ("auto", "always", "never")


@dataclass
class BatchItem:
    """One request in a batch: its pieces of text as they become visible, then its result (or error)."""

    request: Request
    decoding: Decoding | None = None
    slot: int | None = None
    pieces: deque[str] = field(default_factory=deque)
    result: Result | None = None
    error: BaseException | None = None
    cancelled: str = ""  # why it was cancelled ("" while not)
    submitted: float = field(default_factory=time.perf_counter)
    prefilled: bool = False
    draft_slot: int | None = None
    group: SampleGroup | None = None  # the samples of its request, when it asked for n > 1
    sample: int = 0  # its index among them (its choice's index)
    # its steps with speculation on and uncapped (`SpeculationPolicy`), the tokens they emitted, the draft inputs
    # they scored, and per draft position i the steps that accepted it and those whose proposal reached it
    spec_steps: int = 0
    spec_tokens: int = 0
    spec_inputs: int = 0
    spec_accepted: list[int] = field(default_factory=list)
    spec_depth: list[int] = field(default_factory=list)
    shadow: Shadow | None = None  # its draft made for nothing while speculation is off, until the target decides it
    shadow_wait: int = 0  # steps since its last shadow draft was decided

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(frozen=True)
class Shadow:
    """A draft made while speculation was off and not scored (`BatchDecoder._shadow`): draft node i predicts the
    token at `start` + its depth - 1 of the sequence's tokens, so once the target has emitted `depth` more tokens,
    what a verdict would have accepted is known. Greedy, that is the verdict's own path (the argmax is the emitted
    token); sampling, the chance that a node's token is the one drawn is the chance a verdict accepts it when the
    draft puts all its mass on it (the host drafters' proposals), so the counts estimate the same rates."""

    start: int  # len(tokens) when drafted: the first draft level predicts tokens[start]
    tokens: list[int]
    parents: tuple[int, ...] | None  # None: a chain
    depth: int

    @staticmethod
    def of(start: int, tokens: list[int], parents: tuple[int, ...] | None) -> Shadow:
        if parents is None:
            return Shadow(start, tokens, None, len(tokens))
        depths: list[int] = []
        for p in parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return Shadow(start, tokens, parents, max(depths))

    def accepted(self, emitted: Sequence[int]) -> int:
        """Draft tokens a verdict would have accepted, given the tokens emitted from `start` on (at least `depth`)."""
        if self.parents is None:
            n = 0
            while n < self.depth and self.tokens[n] == emitted[n]:
                n += 1
            return n
        at, n = -1, 0
        while n < self.depth:
            at = next((i for i, p in enumerate(self.parents) if p == at and self.tokens[i] == emitted[n]), None)
            if at is None:
                break
            n += 1
        return n


@dataclass
class StepCounts:
    """What a `BatchDecoder`'s decode steps were (the bench reports them for its batched rows)."""

    steps: int = 0  # decode steps landed
    speculative: int = 0  # steps the speculation policy let propose (a drafter of the step drafts)
    capped: int = 0  # of those, steps whose proposals it cut to a depth
    plain: int = 0  # steps without proposals launched ahead of their landing (`_launch_plain`)
    overlapped: int = 0  # of those, steps launched while an earlier one was still to land
    drained: int = 0  # steps in flight landed first because the next step had proposals
    captured: int = 0  # steps that replayed no CUDA graph: a bucket's first use (eager) or its capture (untimed)
    capture_seconds: float = 0.0  # the time of those steps
    dropped: int = 0  # speculative steps run without their proposals: they would have met a new graph bucket
    left_out: int = 0  # sequence-steps of speculative steps that went without their proposals (`choose`)
    shadows: int = 0  # shadow drafts decided (`BatchDecoder._shadow`): a speculative step's estimates, not scored


@dataclass
class _Launched:
    """A step `BatchDecoder._launch_plain` queued, for `_land` to finish."""

    step: Step
    items: list[BatchItem]
    rows: tuple[torch.Tensor, ...]  # each sequence's logits rows (its `DecodeState.target_logits` once landed)
    finals: Sequence[torch.Tensor]  # each sequence's emitted token on the device ([1]): its next pending input
    deferred: list[Deferred] | None  # the verifier's verdicts to finish (None: every sequence greedy, one pick each)
    host: torch.Tensor  # the verdicts' host values: the picks, or the deferred verdicts' values back to back
    ready: torch.cuda.Event | None  # recorded after the host copy was queued (None: no device to wait for)


class TokenView(Sequence[int]):
    """A read-only view of one sample's tokens (its prompt, then what it generated so far; the list grows as it
    decodes): a length, and items or slices copied out. `sample` is its index among its request's samples."""

    __slots__ = ("_tokens", "prompt_len", "sample")

    def __init__(self, tokens: list[int], prompt_len: int, sample: int) -> None:
        self._tokens = tokens
        self.prompt_len = prompt_len
        self.sample = sample

    def __len__(self) -> int:
        return len(self._tokens)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index):
        return self._tokens[index]  # an int, or a new list for a slice

    def generated(self) -> list[int]:
        return self._tokens[self.prompt_len :]


class Siblings:
    """What one sample's drafter may read of the other samples of its request: `others()`, their tokens as
    `TokenView`s (those that have started), and `shared`, one dict for the drafters of all the samples."""

    def __init__(self, sample: int, others: Callable[[], list[TokenView]], shared: dict) -> None:
        self.sample = sample
        self._others = others
        self.shared = shared

    def others(self) -> list[TokenView]:
        return self._others()

    @staticmethod
    def alone() -> Siblings:
        return Siblings(0, list, {})


class SampleGroup:
    """The n samples of one request in a batch (`BatchDecoder.submit_samples`), by sample index."""

    def __init__(self) -> None:
        self.items: list[BatchItem] = []
        self.shared: dict = {}  # what the samples' drafters keep together (`Siblings.shared`)
        self._views: dict[int, TokenView] = {}

    def siblings(self, item: BatchItem) -> Siblings:
        return Siblings(item.sample, lambda: self.views(but=item), self.shared)

    def views(self, but: BatchItem | None = None) -> list[TokenView]:
        """The started samples' tokens (those of `but` left out)."""
        out = []
        for it in self.items:
            if it is but or it.decoding is None:
                continue
            view = self._views.get(it.sample)
            if view is None:
                state = it.decoding.state
                view = self._views[it.sample] = TokenView(state.tokens, state.prompt_len, it.sample)
            out.append(view)
        return out


def _propose(items: list[BatchItem], cap: int | None) -> list:
    """Every item's proposal; the drafters of one class propose together (`Drafter.propose_all`: the draft model
    runs once per level for all its sequences)."""
    by_class: dict[type, list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault(type(it.decoding.drafter), []).append(i)
    proposals: list = [None] * len(items)
    for cls, indices in by_class.items():
        decodings = [items[i].decoding for i in indices]
        made = cls.propose_all(
            [d.drafter for d in decodings], [d.state for d in decodings], [d.max_tokens(cap) for d in decodings]
        )
        for i, proposal in zip(indices, made, strict=True):
            proposals[i] = proposal
    return proposals


def _kept_hidden(step: Step, verdicts: list[Verdict], hidden: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each sequence's hidden states of its committed inputs, picked for the whole step with one upload and one
    gather (per sequence, two small kernels each)."""
    if hidden is None:
        return [None] * len(verdicts)
    rows = [step.kept_rows(b, v) for b, v in enumerate(verdicts)]
    index = torch.tensor([r for seq in rows for r in seq]).to(hidden.device, non_blocking=True)
    picked, start, kept = hidden.index_select(0, index), 0, []
    for seq in rows:
        kept.append(picked[start : start + len(seq)])
        start += len(seq)
    return kept


class StepTimings:
    """What a batched runner's decode steps cost, measured: the steps the host waited for, (inputs, seconds), with
    the line t(N) = a + b·N fitted to them, and the overlapped plain steps' periods. They describe the runner on its
    device, not one batch, so an engine keeps one for its batched runner and every `BatchDecoder` over that runner
    shares it (`Engine.batch_decoder`): a second `generate_batch` starts from what the first measured instead of
    speculating unmeasured again (a bench row of 72 prompts at batch 8 is nine calls: each one's first 32 steps
    speculated on no fit, 95 of its 1,165 steps, on the H200, 2026-12-03)."""

    window = 64  # step timings kept for the fit

    def __init__(self) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=self.window)  # (inputs, seconds) of waited-for steps
        # (inputs, seconds) of overlapped plain steps: their period, which hides the host's work behind the device's
        self.plain_samples: deque[tuple[int, float]] = deque(maxlen=self.window // 4)
        # per depth cut: (draft inputs per sequence, steps) measured on the steps cut there; a tree cut to depth c
        # may keep more nodes than its depth share (a drafter spends its node budget where it may)
        self.cut_inputs: dict[int, tuple[float, int]] = {}
        self._fit: tuple[float, float] | None = None  # (intercept, slope) of the samples, until the next one

    def cost(self, inputs: int, min_samples: int) -> float | None:
        """The fitted seconds of a step of `inputs` inputs (None until `min_samples` steps were timed)."""
        if len(self.samples) < min_samples:
            return None
        if self._fit is None:
            xs = [float(n) for n, _ in self.samples]
            ys = [t for _, t in self.samples]
            mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mean_x) ** 2 for x in xs)
            slope = 0.0 if var == 0 else sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
            slope = max(slope, 0.0)
            self._fit = (max(mean_y - slope * mean_x, 1e-9), slope)
        intercept, slope = self._fit
        return intercept + slope * inputs

    def observe(self, inputs: int, seconds: float, *, overlapped: bool = False) -> None:
        if overlapped:
            self.plain_samples.append((inputs, seconds))
            return
        self.samples.append((inputs, seconds))
        self._fit = None

    def observe_cut(self, cap: int, draft_inputs_per_sequence: float) -> None:
        mean, steps = self.cut_inputs.get(cap, (0.0, 0))
        self.cut_inputs[cap] = ((mean * steps + draft_inputs_per_sequence) / (steps + 1), steps + 1)


class SpeculationPolicy:
    """Per step: speculate or not, from measured step costs (see the module docstring)."""

    min_samples = 8  # speculate until this many steps were timed ...
    max_unfitted = 32  # ... for at most this many steps (then plain, with probes, until they are)
    probe_every = 16  # while off, speculate one step in this many to refresh the estimates ...
    max_probe_every = 256  # ... a gap that doubles with each probe that leaves it off, up to this
    plain_every = 64  # while on and plain steps would overlap, probe them after this many steps untimed
    plain_probe = 3  # steps a plain probe runs (two are needed for one overlapped period)
    # while off, a sequence whose drafter drafts on the host alone drafts for nothing once in this many steps and
    # learns from the tokens the target then emits what its draft would have accepted (`BatchDecoder._shadow`);
    # 0: never (probes only)
    shadow_every = 4

    def __init__(self, mode: str = "auto", timings: StepTimings | None = None) -> None:
        if mode not in SPECULATE:
            raise ParadecError(f"speculate must be one of {', '.join(SPECULATE)}, got {mode!r}", param="speculate")
        self.mode = mode
        self.timings = StepTimings() if timings is None else timings
        self.off_steps = 0
        self.unfitted = 0  # steps decided before the fit had its samples
        self.probe_gap = self.probe_every  # off steps until the next probe
        self.on_steps = 0  # speculative steps since plain steps were last timed
        self._probing = 0  # plain steps still to run in a plain probe
        self.capped_steps = 0
        # the last decision's expected tokens per second speculating over those of plain decoding (None: not
        # decided from the fit: a fixed mode, a plain probe, no fit yet)
        self.gain: float | None = None
        self.chosen: list[bool] | None = None  # the last decision's sequences that propose (None: every one)

    @property
    def samples(self) -> deque[tuple[int, float]]:
        return self.timings.samples

    @property
    def plain_samples(self) -> deque[tuple[int, float]]:
        return self.timings.plain_samples

    @property
    def cut_inputs(self) -> dict[int, tuple[float, int]]:
        return self.timings.cut_inputs

    def cost(self, inputs: int) -> float | None:
        """The fitted seconds of a step of `inputs` inputs (None until enough steps were timed)."""
        return self.timings.cost(inputs, self.min_samples)

    def plain_cost(self, inputs: int) -> float | None:
        """The seconds of a plain step of `inputs` inputs: the overlapped plain steps' measured period when there is
        one (scaled to `inputs` by the fit), else the fit's cost."""
        fitted = self.cost(inputs)
        if not self.plain_samples:
            return fitted
        seconds = sum(t for _, t in self.plain_samples) / len(self.plain_samples)
        mean_inputs = round(sum(n for n, _ in self.plain_samples) / len(self.plain_samples))
        at = self.cost(mean_inputs)
        return seconds if fitted is None or at is None else seconds * fitted / at

    def speculate(
        self,
        taus: list[float],
        proposed: list[float],
        *,
        overlap: bool = False,
        probe: bool = True,
        optional: list[bool] | None = None,
    ) -> bool:
        """Whether this step speculates, for sequences expected to emit `taus` tokens per speculative step with
        `proposed` draft inputs each. `overlap`: plain steps of these sequences would overlap (`BatchDecoder`);
        then, while speculating wins, a short plain probe every `plain_every` steps times them (overlapped, a plain
        step costs less than the fit over the steps the host waited for says). `probe`: while off, speculate now and
        then to refresh the estimates; not needed when every sequence learns its rates from shadow drafts.
        `optional`: per sequence, whether it may go without its proposal in a speculative step (a host drafter's);
        then only the sequences `choose` picks speculate, and `chosen` says which (None: every one)."""
        self.gain = None
        self.chosen = None
        if self.mode != "auto":
            return self.mode == "always"
        if self._probing:
            self._probing -= 1
            return False
        batch = len(taus)
        spec, plain = self.cost(batch + round(sum(proposed))), self.plain_cost(batch)
        if spec is None or plain is None:
            # no fit yet: speculate, to time speculative steps; steps that meet new graph buckets are not timed,
            # so a batch whose every step meets one would speculate on unmeasured: past `max_unfitted` such
            # steps, plain decoding until probes have timed enough
            self.unfitted += 1
            return self.unfitted <= self.max_unfitted or self._off(backoff=False)
        tokens = sum(taus)
        chosen = self.choose(taus, proposed, optional) if optional is not None and any(optional) else None
        if chosen is not None and any(chosen):
            self.chosen = chosen
            chosen_taus, chosen_inputs = sitting_out(taus, proposed, chosen)
            tokens, spec = sum(chosen_taus), self.cost(batch + round(sum(chosen_inputs)))
        # (none chosen: no draft pays, and speculating for all, weighed as before, loses; a probe proposes for all)
        self.gain = (tokens / spec) / (batch / plain)
        if self.gain >= 1.0:
            self.off_steps, self.probe_gap = 0, self.probe_every
            self.on_steps += 1
            if overlap and self.on_steps % self.plain_every == 0:
                self._probing = self.plain_probe - 1
                return False
            return True
        return self._off() if probe else False

    def choose(self, taus: list[float], proposed: list[float], optional: list[bool]) -> list[bool]:
        """Which sequences of a speculative step propose: every one that must (not `optional`), and of the others
        those that raise the step's expected tokens per second. On the fitted line t(N) = a + b·N, a sequence adds
        τ_b - 1 tokens for its d_b draft inputs, so the best set holds the sequences of highest (τ_b - 1) / d_b,
        a prefix in that order (the ratio of two sums grows with an item exactly while the item's own ratio
        exceeds it): the prefix whose rate is highest. A batch where a few sequences repeat their context (a
        summary, a rewrite: τ 3) while the others accept nothing then speculates for the few only (goodput-driven
        choice of proposal lengths per request: SmartSpec, Liu et al. 2024)."""
        chosen = [not o for o in optional]
        forced_taus, forced_inputs = sitting_out(taus, proposed, chosen)
        tokens, inputs = sum(forced_taus), len(taus) + sum(forced_inputs)
        order = sorted(
            (b for b, o in enumerate(optional) if o and proposed[b] > 0 and taus[b] > 1.0),
            key=lambda b: (taus[b] - 1.0) / proposed[b],
            reverse=True,
        )
        best, best_k = tokens / self.cost(round(inputs)), 0
        for k, b in enumerate(order, 1):
            tokens += taus[b] - 1.0
            inputs += proposed[b]
            rate = tokens / self.cost(round(inputs))
            if rate > best:
                best, best_k = rate, k
        for b in order[:best_k]:
            chosen[b] = True
        return chosen

    def _off(self, backoff: bool = True) -> bool:
        """A step off, unless it is time for a probe. A probe is a waited-for step (the overlap is lost) and may meet
        a new graph bucket: while speculation keeps losing (`backoff`), probes get rarer (the estimates still
        follow the batch's size and rates every step); while the fit lacks samples, one in `probe_every`."""
        self.off_steps += 1
        if self.off_steps < self.probe_gap:
            return False
        self.off_steps = 0
        self.probe_gap = min(2 * self.probe_gap, self.max_probe_every) if backoff else self.probe_every
        return True

    def observe(self, inputs: int, seconds: float, *, overlapped: bool = False) -> None:
        """A step of `inputs` inputs took `seconds`; `overlapped`: a plain step's period, launched before the step
        in flight landed (timed apart: the fit is over steps the host waited for)."""
        if overlapped:
            self.on_steps = 0
        self.timings.observe(inputs, seconds, overlapped=overlapped)

    def observe_cut(self, cap: int, draft_inputs_per_sequence: float) -> None:
        """A step cut to depth `cap` scored this many draft inputs per sequence (a running mean per depth)."""
        self.timings.observe_cut(cap, draft_inputs_per_sequence)

    def cap(self, taus: list[float], proposed: list[float], depths: list[DepthRates]) -> int | None:
        """The depth this speculative step's proposals are cut to: None (as the drafters make them) or one of
        `CAPS`, whichever the fitted step cost says emits the most tokens per second, from each sequence's uncapped
        speculative steps (`depth_rates`): cut to depth c, a sequence is expected to emit 1 + Σ_{i<c} accepted[i]
        tokens for its draft inputs times the share of its proposals' depth mass up to c (once steps were cut to
        c, the draft inputs measured there: a tree keeps more nodes than its depth share). A cut wins only by
        `CAP_GAIN`, and one capped step in `probe_every` runs uncapped, to keep the uncapped estimates fresh."""
        if self.mode != "auto":
            return None
        batch = len(taus)
        uncapped = self.cost(batch + round(sum(proposed)))
        if uncapped is None:
            return None
        best, best_rate = None, sum(taus) / uncapped * CAP_GAIN
        for c in CAPS:
            tokens = sum(1.0 + sum(d.accepted[:c]) for d in depths)
            measured, steps = self.cut_inputs.get(c, (0.0, 0))
            if steps >= MEASURED_CUT_STEPS:
                inputs = batch * measured
            else:
                inputs = sum(n * d.depth_share(c) for n, d in zip(proposed, depths, strict=True))
            rate = tokens / self.cost(batch + round(inputs))
            if rate > best_rate:
                best, best_rate = c, rate
        if best is None:
            self.capped_steps = 0
            return None
        self.capped_steps += 1
        return None if self.capped_steps % self.probe_every == 0 else best


# a speculative step of host drafters that would meet a CUDA graph bucket not captured yet (its first uses run
# eagerly, then the capture: 35-90 ms each for the 1.5B on an H200, against a 3-5 ms step, so a speculative gain
# of 25% pays for it only after ~100 steps of that bucket) runs without its proposals until this many steps have
# asked for the bucket: a bucket that keeps coming back is captured, a shape met now and then never costs its
# capture (m14: NEW_GRAPH_GAIN = 1.25 instead, a gain to expect; suffix at batch 32 still met 30 new buckets, 1.8 s
# of the row's 3.96)
NEW_GRAPH_DEMAND = 4
CAPS = (8, 4, 2, 1)  # the depths a speculative step may cut its proposals to (`SpeculationPolicy.cap`)
CAP_GAIN = 1.02  # a cut must promise this many times the uncapped step's tokens per second
MEASURED_CUT_STEPS = 3  # steps cut to a depth after which its measured draft inputs replace the estimate


@dataclass(frozen=True)
class DepthRates:
    """One sequence's uncapped speculative steps by draft position: `accepted[i]` the share that accepted draft
    position i (and so every one before it), `depth[i]` the share whose proposal reached depth i + 1."""

    accepted: list[float]
    depth: list[float]

    def depth_share(self, cap: int) -> float:
        """The share of the proposals' depth mass at depths <= `cap`: for a chain, of its draft inputs."""
        total = sum(self.depth)
        return 1.0 if total == 0 else sum(self.depth[:cap]) / total


def depth_rates(items: list[BatchItem]) -> list[DepthRates]:
    """Per sequence, `DepthRates` over its uncapped speculative steps; a sequence without one takes the others'
    mean (none has one: nothing accepted, nothing proposed)."""
    rates = [
        DepthRates([c / it.spec_steps for c in it.spec_accepted], [c / it.spec_steps for c in it.spec_depth])
        if it.spec_steps
        else None
        for it in items
    ]
    known = [r for r in rates if r is not None]
    default = DepthRates(_mean([r.accepted for r in known]), _mean([r.depth for r in known]))
    return [default if r is None else r for r in rates]


def _mean(rows: list[list[float]]) -> list[float]:
    """The element-wise mean of lists of different lengths (a missing element counts 0)."""
    width = max((len(r) for r in rows), default=0)
    return [sum(r[i] for r in rows if i < len(r)) / len(rows) for i in range(width)] if rows else []


def sitting_out(taus: list[float], proposed: list[float], chosen: list[bool]) -> tuple[list[float], list[float]]:
    """The rates of a speculative step where only the `chosen` sequences propose: the others count as plain, one
    token and no draft input (`SpeculationPolicy.choose`)."""
    return (
        [t if c else 1.0 for t, c in zip(taus, chosen, strict=True)],
        [n if c else 0.0 for n, c in zip(proposed, chosen, strict=True)],
    )


def speculative_rates(items: list[BatchItem]) -> tuple[list[float], list[float]]:
    """Per sequence, over its steps with speculation on: tokens emitted per step and draft inputs scored per step,
    what `SpeculationPolicy.speculate` weighs. Not the sequence's overall τ: that also counts the steps the policy
    turned speculation off (one token each), so it would sink towards 1 while speculation is off and keep it off for
    good. A sequence without such a step yet takes the others' mean (none has one: 1 token, 1 input)."""
    known = [it for it in items if it.spec_steps]
    if known:
        default_tau = sum(it.spec_tokens / it.spec_steps for it in known) / len(known)
        default_inputs = sum(it.spec_inputs / it.spec_steps for it in known) / len(known)
    else:
        default_tau, default_inputs = 1.0, 1.0
    taus = [it.spec_tokens / it.spec_steps if it.spec_steps else default_tau for it in items]
    inputs = [it.spec_inputs / it.spec_steps if it.spec_steps else default_inputs for it in items]
    return taus, inputs


class _SeqResources:
    """What one sequence's drafter is lent inside a batch: its slot of the target (for reading shapes and weights;
    drafters never run the target) and, on first use, a slot of the batched draft runner."""

    def __init__(self, decoder: BatchDecoder, item: BatchItem) -> None:
        self._decoder = decoder
        self._item = item
        self.target = decoder.runner.view(item.slot)

    def draft_runner(self):
        item, draft = self._item, self._decoder.draft_runner()
        if item.draft_slot is None:
            item.draft_slot = draft.allocate()
        return draft.view(item.draft_slot)

    def heads(self, kind: str) -> torch.nn.Module:
        return self._decoder.engine.heads(kind)

    def siblings(self) -> Siblings:
        """The other samples of this sequence's request (none for a request of one sample): their tokens only."""
        group = self._item.group
        return Siblings.alone() if group is None else group.siblings(self._item)


class BatchDecoder:
    """Continuous batching over one engine's batched runner (see the module docstring). Not thread-safe: one thread
    submits and steps (the server's worker does both)."""

    def __init__(
        self,
        engine,
        runner,
        *,
        max_running: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        speculate: str = "auto",
        draft_runner=None,
        overlap: bool = True,
        timings: StepTimings | None = None,
    ) -> None:
        """`prefill_chunk`: prompt tokens a joining sequence feeds per step; `prefill_tokens`: padded inputs of one
        forward over the joining sequences' chunks (`_prefill`); `timings`: the runner's measured step costs, shared
        by the decoders over it (`StepTimings`)."""
        if not isinstance(max_running, int) or not 1 <= max_running <= runner.slots:
            raise ParadecError(
                f"max_running must be an integer in [1, {runner.slots}] (the runner's slots), got {max_running!r}",
                param="max_running",
            )
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ParadecError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}", param="prefill_chunk")
        if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) or prefill_tokens < 1:
            raise ParadecError(
                f"prefill_tokens must be an integer >= 1, got {prefill_tokens!r}", param="prefill_tokens"
            )
        self.engine = engine
        self.runner = runner
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens
        self.policy = SpeculationPolicy(speculate, timings)
        self.verifier = verify_deferred  # replaceable only so tests can prove they catch a wrong one
        self._draft_runner = draft_runner  # a batched runner of the draft model, or a callable making one
        self.waiting: deque[BatchItem] = deque()
        self.running: list[BatchItem] = []
        # per decode step, as it lands (for metrics; a reader may clear them): sequences, inputs, tokens emitted
        self.batch_sizes: list[int] = []
        self.step_inputs: list[int] = []
        self.step_tokens: list[int] = []
        self.counts = StepCounts()  # its `steps`: decode steps landed so far
        self.overlap = overlap  # steps without proposals launch before the step in flight is landed (`_plain`)
        self._inflight: _Launched | None = None  # such a step, queued on the device, its verdicts not advanced yet
        self._empty: Proposal | None = None  # the proposal of those steps

    # --- warm-up ------------------------------------------------------------------------------------------------
    def warm_up(
        self, methods: Iterable[str], *, sizes: Iterable[int] | None = None, max_new_tokens: int = 24
    ) -> tuple[int, list[str]]:
        """Decode synthetic requests before serving: for each method, a batch of each size of `sizes` (default: the
        batch buckets up to `max_running`, and `max_running`), so that the compilation of the batched step (12 s
        inside the first batched round of a load run on an H200, 2026-12-03) and the CUDA graphs of those sizes'
        first cache bucket happen now, not in the first requests. The prompt repeats itself, so that lookup
        drafters propose and speculative steps are met too: under `auto` the warm-up speculates on every step (its
        timings are the fit's samples of speculative steps; a fitted policy would turn them off and learn from
        shadow drafts); then steps over slots that do not start at 0 (`_warm_gathered`), and the unbucketed
        prefill forwards those batches may not meet (`_warm_prefill`). What it
        leaves: the compiled code, the graphs and the policy's step timings; not its steps (`counts` and the
        per-step records start again) nor its text (each method forgets it: suffix's trie of earlier outputs). A
        method that does not batch is passed over. Returns the decode steps it ran and the methods it ran them
        with."""
        from paradec.runners.native.graphs import B_BUCKETS

        if sizes is None:
            sizes = sorted({b for b in B_BUCKETS if b < self.max_running} | {self.max_running})
        vocab = self.runner.vocab_size
        prompt = [(17 + 31 * i) % vocab for i in range(24)] * 3
        warmed = []
        mode, self.policy.mode = self.policy.mode, "always" if self.policy.mode == "auto" else self.policy.mode
        try:
            self._warm(methods, sizes, prompt, max_new_tokens, warmed)
        finally:
            self.policy.mode = mode
        steps, self.counts = self.counts.steps, StepCounts()
        self.batch_sizes.clear()
        self.step_inputs.clear()
        self.step_tokens.clear()
        return steps, warmed

    def _warm(self, methods, sizes, prompt: list[int], max_new_tokens: int, warmed: list[str]) -> None:
        from paradec.drafters import get_drafter

        kinds: set = set()  # the kinds of hidden state whose unbucketed prefill forwards were warmed
        for method in methods:
            if not get_drafter(method).batchable:
                continue  # it runs alone (`_check_batchable`): nothing of the batch to warm
            warmed.append(method)
            wanted = set()
            for size in sizes:
                items = self._warm_batch(method, size, prompt, max_new_tokens)
                wanted |= {it.decoding.drafter.needs_hidden for it in items if it.decoding is not None}
            self._warm_gathered(method, prompt, max_new_tokens)
            self.engine.method(method).forget()
            for hidden in wanted - kinds:
                self._warm_prefill(hidden)
                kinds.add(hidden)

    def _warm_gathered(self, method: str, prompt: list[int], max_new_tokens: int) -> None:
        """Decode `method` at one sequence and at two over slots that do not start at 0: steps that gather the cache
        rows instead of viewing them, the kind every step of a server becomes once a sequence has left. The
        warm-up's batches, all in slots 0 .. B-1, never meet them, and each kind (one sequence or several, plain
        or speculative) compiles on first use (seconds on CUDA). Only with buckets (on CUDA), and room for it."""
        runner = self.runner
        if runner.bucketed_chunk is None or runner.free < 3 or self.max_running < 2:
            return
        held = runner.allocate()  # the lowest free slot, 0 on an idle runner: the batch's start after it
        try:
            for size in (1, 2):
                self._warm_batch(method, size, prompt, max_new_tokens)
        finally:
            runner.release(held)

    def _warm_batch(self, method: str, size: int, prompt: list[int], max_new_tokens: int) -> list[BatchItem]:
        """`size` requests of `prompt` decoded together to their end; a failure is raised."""
        items = [
            self.submit(self.engine.request(prompt, method=method, max_new_tokens=max_new_tokens)) for _ in range(size)
        ]
        for _ in self.run(items):
            pass
        failed = next((it.error for it in items if it.error is not None), None)
        if failed is not None:
            raise failed
        return items

    def _warm_prefill(self, hidden) -> None:
        """Run each kind of unbucketed prefill forward, so that its compilation (10-19 s each for the 1.5B on an
        H200, bench/results/m15-h200-2026-12-04/prefill-kinds.json) does not stall the first requests that meet it:
        one chunk too long for the buckets alone, and a wave over consecutive slots (a view of the cache) and one
        over slots out of order (gathered: a burst of requests joining a running batch). Past those three kinds,
        waves of other sizes, lengths and first slots compiled nothing more there. Their cache entries are rolled
        back."""
        runner = self.runner
        if runner.bucketed_chunk is None or runner.free < 2:
            return
        n = min(runner.bucketed_chunk + 8, runner.max_length - 1)
        chain = [(11 + 29 * i) % runner.vocab_size for i in range(n)]
        slots = [runner.allocate() for _ in range(min(3, runner.free))]
        try:
            for wave in ([slots[0]], sorted(slots), sorted(slots, reverse=True)):
                runner.prefill([(slot, chain) for slot in wave], hidden=hidden)
                for slot in wave:
                    runner.rollback(slot, 0)
        finally:
            for slot in slots:
                runner.release(slot)

    # --- membership ---------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> BatchItem:
        """Queue `request` (of one sample); it joins the batch at a step boundary, when a slot is free."""
        if request.n != 1:
            raise ParadecError(
                f"a request of n={request.n} samples is n sequences: queue it with submit_samples", param="n"
            )
        self._check_batchable(request)
        item = BatchItem(request)
        self.waiting.append(item)
        return item

    def submit_samples(self, request: Request) -> list[BatchItem]:
        """Queue the `request.n` samples of `request` (`Request.samples`: sample i seeded seed + i) as n sequences
        of one `SampleGroup`, in sample order; each joins when a slot is free, and its drafter may read the tokens of
        the others that have joined (`_SeqResources.siblings`)."""
        self._check_batchable(request)
        group = SampleGroup()
        for i, sample in enumerate(request.samples()):
            group.items.append(BatchItem(sample, group=group, sample=i))
        self.waiting.extend(group.items)
        return list(group.items)

    @staticmethod
    def _check_batchable(request: Request) -> None:
        if not request.drafter.batchable:
            raise ParadecError(
                f"method {request.method!r} does not run in a batch yet (its drafter keeps engine-wide state for one "
                "sequence); decode it alone with Engine.generate",
                param="method",
            )

    def cancel(self, item: BatchItem, reason: str = "cancelled") -> None:
        """Stop `item` at the next step boundary (or now, when it waits); the others are not affected."""
        if item.done:
            return
        item.cancelled = reason
        if item in self.waiting:
            self.waiting.remove(item)
            item.error = ParadecError(f"request cancelled: {reason}")

    @property
    def steps(self) -> int:
        """Decode steps landed so far."""
        return self.counts.steps

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def draft_runner(self):
        if self._draft_runner is None:
            raise ParadecError("method 'draft' needs a draft model: pass draft=... to paradec.load() or --draft DIR")
        if callable(self._draft_runner) and not hasattr(self._draft_runner, "allocate"):
            self._draft_runner = self._draft_runner()
        return self._draft_runner

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running and self.runner.free:
            item = self.waiting.popleft()
            request = item.request
            try:
                item.slot = self.runner.allocate()
                resources = _SeqResources(self, item)
                method = self.engine.method(request.method)
                drafter: Drafter = method.open_for(resources, request.options)
                item.decoding = Decoding(
                    drafter,
                    self.engine.tokenizer,
                    list(request.prompt_ids),
                    request.sampling,
                    request.max_new_tokens,
                    self.engine.eos_token_ids,
                    list(request.stops),
                    request.method,
                    device=self.runner.device,
                    vocab_size=self.runner.vocab_size,
                    max_length=self.runner.max_length,
                    verifier=self.verifier,
                )
            except Exception as exc:
                item.error = exc
                self._release(item)
                continue
            self.running.append(item)

    def _release(self, item: BatchItem) -> None:
        if item.decoding is not None:
            item.decoding.drafter.close()
        if item.slot is not None:
            self.runner.release(item.slot)
            item.slot = None
        if item.draft_slot is not None:
            self.draft_runner().release(item.draft_slot)
            item.draft_slot = None

    def _finish(self, item: BatchItem, error: BaseException | None = None) -> None:
        if error is not None:
            item.error = error
        elif item.cancelled:
            item.error = ParadecError(f"request cancelled: {item.cancelled}")
        else:
            item.result = item.decoding.result()
        self._release(item)

    # --- stepping -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[BatchItem]:
        """Admit, prefill one chunk per joining sequence, then one decode step for every prefilled one. Returns
        the items that got text or finished in this call."""
        touched: list[BatchItem] = []
        for item in [i for i in self.running if i.cancelled]:
            self.running.remove(item)
            self._finish(item)
            touched.append(item)
        self._admit()
        decoding = [item for item in self.running if item.prefilled]
        joining = [item for item in self.running if not item.prefilled]
        if joining:
            touched += self._prefill(joining)
        if decoding:
            touched += self._decode(decoding)
        elif self._inflight is not None:  # its sequences ended or were cancelled: nothing more to launch
            touched += self._land(self._inflight)
            self._inflight = None
        return touched

    def _prefill(self, items: list[BatchItem]) -> list[BatchItem]:
        """Feed the next prompt chunk of each joining sequence (at most `prefill_chunk` tokens). The chunks whose
        drafters want the same kind of hidden state form a wave within `prefill_tokens` padded inputs (sequences x
        the longest chunk, what a shared forward's attention pads to; a chunk that does not fit waits for a later
        step, the first always fits). A wave goes through one unbucketed forward when feeding its chunks alone would
        cost more (`SHARED_PREFILL`: on CUDA, a few short chunks replay their graphs alone), else chunk by chunk.
        Returns the items that failed (a drafter's `begin` may)."""
        failed: list[BatchItem] = []
        groups: dict[object, list[tuple[BatchItem, list[int]]]] = {}
        for item in items:
            try:
                ids = item.decoding.to_prefill(min(self.prefill_chunk, self.prefill_tokens))
            except Exception as exc:
                failed += self._fail([item], exc)
                continue
            if not ids:  # a one-token prompt: nothing to feed before its first step
                self._begun(item, 0, None, failed)
                continue
            group = groups.setdefault(item.decoding.drafter.needs_hidden, [])
            widest = max([len(ids)] + [len(chunk) for _, chunk in group])
            if (len(group) + 1) * widest <= self.prefill_tokens:
                group.append((item, ids))
        for wanted, group in groups.items():
            # fed alone, a chunk that fits the runner's buckets replays a CUDA graph, one that does not runs an
            # unbucketed forward; one unbucketed forward for the whole wave pays when it costs less than those
            # (a wave of one-token chunks alone: its shared forward is a kind of its own, compiled on first use for
            # 7-10 s on the H200, bench/results/m15-h200-2026-12-04/prefill-kinds.json)
            limit = self.runner.bucketed_chunk
            alone = sum(1 if limit is not None and len(ids) <= limit else SHARED_PREFILL for _, ids in group)
            one_token = all(len(ids) == 1 for _, ids in group)
            shared = limit is None or (alone > SHARED_PREFILL and not one_token)
            forwards = [group] if shared else [[one] for one in group]
            for forward in forwards:
                try:
                    hidden = self.runner.prefill(
                        [(item.slot, ids) for item, ids in forward], hidden=wanted, bucketed=len(forward) == 1
                    )
                except Exception as exc:
                    failed += self._fail([item for item, _ in forward], exc)
                    continue
                for b, (item, ids) in enumerate(forward):
                    self._begun(item, len(ids), None if hidden is None else hidden[b], failed)
        return failed

    def _begun(self, item: BatchItem, count: int, hidden: torch.Tensor | None, failed: list[BatchItem]) -> None:
        try:
            item.prefilled = item.decoding.prefilled(count, hidden)
        except Exception as exc:
            failed.extend(self._fail([item], exc))

    def _decode(self, items: list[BatchItem]) -> list[BatchItem]:
        started = time.perf_counter()
        tp = self.runner.model.tp
        speculating, cap, chosen = False, 0, None
        if tp is None or tp.rank == 0:  # a sharded target's ranks take rank 0's choice (each times its own steps)
            taus, proposed = speculative_rates(items)
            shadows = [self._shadows(it) for it in items]
            speculating = self.policy.speculate(
                taus, proposed, overlap=self._plain(items, speculating=False), probe=not all(shadows), optional=shadows
            )
            if speculating:
                chosen = self.policy.chosen
                depths = depth_rates(items)
                if chosen is not None:  # the others count as plain: one token, no draft input
                    taus, proposed = sitting_out(taus, proposed, chosen)
                    depths = [d if c else DepthRates([], []) for d, c in zip(depths, chosen, strict=True)]
                cap = self.policy.cap(taus, proposed, depths)
        if tp is not None:
            speculating, cap, chosen = tp.agree((speculating, cap, chosen))
        # sequences of a speculative step that go without their proposals (`SpeculationPolicy.choose`)
        left_out = set() if chosen is None else {id(it) for it, c in zip(items, chosen, strict=True) if not c}
        misses = self.runner.graph_misses
        inflight, self._inflight = self._inflight, None
        touched: list[BatchItem] = []
        counts = self.counts
        if self._plain(items, speculating):
            # launch this step before the one in flight is landed: the device runs it while the host lands that one
            launching = [it for it in items if it.decoding.remaining > 0]  # (the rest end with the step in flight)
            if launching:
                self._inflight, touched = self._launch_plain(launching)
                counts.plain += 1
                counts.overlapped += inflight is not None
            if inflight is not None:
                touched += self._land(inflight)
            # one step's period: this one's launch to the last one's landing
            if self._timed(misses, started) and inflight is not None:
                self.policy.observe(inflight.step.size, time.perf_counter() - started, overlapped=True)
            self._shadow(launching)  # (after the period: the host works while the launched step runs)
            return touched
        proposing = speculating and any(it.decoding.drafter.drafts and id(it) not in left_out for it in items)
        if not proposing:
            speculating = False  # (no sequence was chosen: a plain step, waited for)
        counts.speculative += proposing
        counts.capped += bool(proposing and cap)
        if inflight is not None:  # this step's proposals need the verdicts in flight
            counts.drained += 1
            touched += self._land(inflight)
            items = [it for it in items if not it.done]
            if not items:
                return touched
            started, misses = time.perf_counter(), self.runner.graph_misses
        # one forward per kind of hidden state the drafters need: those that need none join any group
        groups: dict[object, list[BatchItem]] = {}
        for it in items:
            groups.setdefault(it.decoding.drafter.needs_hidden, []).append(it)
        if False in groups and len(groups) > 1:
            plain = groups.pop(False)
            groups[next(iter(groups))] += plain
        inputs, stepped, emitted, dropped_any = 0, 0, 0, False
        for needs, group in groups.items():
            try:
                proposals = self._proposals(group, self._within_budget(cap, len(group)), left_out)
                step = Step([it.decoding.inputs(it.slot, proposal=p) for it, p in zip(group, proposals, strict=True)])
                dropped = self._drop(step, group, needs)
                if dropped:
                    step = Step([it.decoding.inputs(it.slot, proposal=self._no_proposal()) for it in group])
                out = self.runner.forward(step, logits="all", hidden=needs)
                verdicts = self._verify(step, group, out.logits)
                self.runner.commit([Step.keep(v) for v in verdicts])
            except Exception as exc:  # a failed forward fails the sequences in it; the others go on
                touched += self._fail(group, exc)
                continue
            inputs += step.size
            stepped += len(group)
            dropped_any |= dropped
            kept = _kept_hidden(step, verdicts, out.hidden)
            if speculating and cap is None and not dropped:  # what the drafters propose: the policy's estimates
                for it, verdict in zip(group, verdicts, strict=True):
                    if id(it) not in left_out:
                        self._decided(it, verdict.proposed, verdict.accepted, verdict.depth)
            advanced, tokens = self._advance(step, group, verdicts, out.hidden, kept)
            touched += advanced
            emitted += tokens
        self._count(len(items), inputs, emitted)
        self.counts.left_out += len(left_out) if speculating else 0
        self._shadow([it for it in items if not it.done and (not speculating or id(it) in left_out)])
        if cap and stepped and not dropped_any:  # a cut step: what the drafters proposed under it
            self.policy.observe_cut(cap, (inputs - stepped) / stepped)
        if self._timed(misses, started):  # a step that met a new graph bucket timed that, not the step
            self.policy.observe(inputs, time.perf_counter() - started)
        return touched

    def _drop(self, step: Step, group: list[BatchItem], hidden) -> bool:
        """Whether this speculative step runs without its proposals (`NEW_GRAPH_DEMAND`): every drafter of the group
        drafts on the host alone (its proposals may go unscored), and the step would meet a graph bucket that is
        not captured and that fewer than `NEW_GRAPH_DEMAND` steps before it asked for."""
        if step.size == len(group) or self.runner.model.tp is not None:  # (other ranks would not drop alike)
            return False
        if not all(it.decoding.drafter.idle_skips_propose for it in group):
            return False
        demand = self.runner.new_graph_demand(step, hidden)
        if demand == 0 or demand > NEW_GRAPH_DEMAND:
            return False
        self.counts.dropped += 1
        return True

    def _proposals(self, group: list[BatchItem], cap: int | None, left_out: set[int]) -> list[Proposal]:
        """The group's proposals (`_propose`), an empty one for each sequence left out."""
        if not left_out:
            return _propose(group, cap)
        made = iter(_propose([it for it in group if id(it) not in left_out], cap))
        return [self._no_proposal() if id(it) in left_out else next(made) for it in group]

    def _no_proposal(self) -> Proposal:
        if self._empty is None:
            self._empty = Proposal.empty(self.runner.device)
        return self._empty

    def _shadows(self, item: BatchItem) -> bool:
        """Whether `item` learns its speculative rates from shadow drafts while speculation is off: its drafter
        drafts on the host alone, from the tokens (`Drafter.idle_skips_propose`: pld, suffix), and the policy
        decides (`auto`, `shadow_every` > 0)."""
        drafter = item.decoding.drafter
        return (
            self.policy.mode == "auto"
            and self.policy.shadow_every > 0
            and drafter.drafts
            and drafter.idle_skips_propose
            and not drafter.needs_hidden
        )

    def _shadow(self, items: list[BatchItem]) -> None:
        """After a step without proposals: each sequence that shadows (`_shadows`), has no shadow draft pending and
        has waited `shadow_every` steps since its last drafts for nothing (`Shadow`): host work only, no input
        scored. An empty draft is decided at once (a speculative step of one token and no draft input)."""
        budget = None
        for it in items:
            if it.shadow is not None or it.done or not self._shadows(it):
                continue
            it.shadow_wait += 1
            if it.shadow_wait < self.policy.shadow_every:
                continue
            if budget is None:
                budget = self._within_budget(None, len(items))
            decoding = it.decoding
            tokens, parents = decoding.drafter.draft(decoding.state, decoding.max_tokens(budget))
            it.shadow_wait = 0
            if tokens:
                it.shadow = Shadow.of(len(decoding.state.tokens), list(tokens), parents)
            else:
                self._decided(it, 0, 0, 0)

    def _settle_shadow(self, item: BatchItem) -> None:
        """Decide `item`'s shadow draft once the target has emitted the tokens it predicted."""
        shadow, tokens = item.shadow, item.decoding.state.tokens
        if shadow is None or len(tokens) < shadow.start + shadow.depth:
            return
        item.shadow = None
        accepted = shadow.accepted(tokens[shadow.start : shadow.start + shadow.depth])
        self._decided(item, len(shadow.tokens), accepted, shadow.depth)
        self.counts.shadows += 1

    @staticmethod
    def _decided(item: BatchItem, proposed: int, accepted: int, depth: int) -> None:
        """One uncapped speculative step of `item` (scored, or a shadow draft's), for the policy's estimates."""
        item.spec_steps += 1
        item.spec_tokens += accepted + 1
        item.spec_inputs += proposed
        bump(item.spec_accepted, accepted)
        bump(item.spec_depth, depth)

    def _within_budget(self, cap: int | None, sequences: int) -> int | None:
        """`cap` lowered so that a step of `sequences` stays within the runner's largest bucketed step
        (`max_bucketed_inputs`): a larger one would run unbucketed, without a graph, at several times a step's cost.
        The cap bounds the draft tokens of a path, so the inputs of chain drafters and suffix; the other tree
        drafters keep the node counts of their options."""
        budget = self.runner.max_bucketed_inputs
        if budget is None:
            return cap
        share = max(0, (budget - sequences) // sequences)
        return share if cap is None else min(cap, share)

    def _timed(self, misses: int, started: float) -> bool:
        """Whether the step begun at `started` (with `misses` graph misses then) replayed graphs only (or ran
        unbucketed), so that its time is a step's; one that met a new bucket (run eagerly the first time, captured
        the second: `GraphBank.capture_after`) is counted in `counts` instead."""
        if self.runner.graph_misses == misses:
            return True
        self.counts.captured += 1
        self.counts.capture_seconds += time.perf_counter() - started
        return False

    def _plain(self, items: list[BatchItem], speculating: bool) -> bool:
        """Whether this step goes without any proposal and may overlap with the next (`overlap`): every sequence's
        drafter never drafts, or speculation is off and its propose may be skipped (`Drafter.idle_skips_propose`),
        and none needs hidden states (a step's hidden rows live in static buffers the next step overwrites)."""
        if not self.overlap or self.verifier is not verify_deferred:
            return False
        for it in items:
            drafter = it.decoding.drafter
            if drafter.needs_hidden or not (not drafter.drafts or (not speculating and drafter.idle_skips_propose)):
                return False
        return True

    def _launch_plain(self, items: list[BatchItem]) -> tuple[_Launched | None, list[BatchItem]]:
        """Queue a step without proposals: the forward, the verifier's device work (one argmax when every sequence
        is greedy), the commit of each pending token, each sequence's next pending token left on the device
        (`Decoding.launched`) and the copy of the verdicts' host values. Nothing here waits for the device; `_land`
        finishes the verdicts. A failed forward fails its sequences (the second value: those it touched)."""
        greedy = all(it.decoding.sampling.greedy for it in items)
        deferred: list[Deferred] | None = None
        try:
            step = Step([it.decoding.inputs(it.slot, proposal=self._no_proposal()) for it in items])
            logits = self.runner.forward(step, logits="all").logits  # [B, V]: one row per sequence
            rows = step.split(logits)
            if greedy:
                values = logits.argmax(-1)
                finals = values.split(1)
            else:
                deferred = [it.decoding.verdict(step, b, r) for b, (it, r) in enumerate(zip(items, rows, strict=True))]
                finals = [d.final for d in deferred]  # (a walk without draft tokens knows its token on the device)
                values = torch.cat([piece for d in deferred for piece in d.host])
            self.runner.commit([[0]] * len(items))
        except Exception as exc:
            return None, self._fail(items, exc)
        for it, final in zip(items, finals, strict=True):
            it.decoding.launched(final)
        host = values.to("cpu", non_blocking=True)  # pinned, and asynchronous, from a GPU
        ready = None
        if values.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(step, items, rows, finals, deferred, host, ready), []

    def _land(self, launched: _Launched) -> list[BatchItem]:
        """The verdicts of a step `_launch_plain` queued (its host copy waited for), advanced for its sequences that
        still run: one may have ended at the step before (a stop string or EOS) or been cancelled since."""
        if launched.ready is not None:
            launched.ready.synchronize()
        values = launched.host.tolist()
        if launched.deferred is None:
            verdicts = [
                Verdict(path=[], tokens=[value], proposed=0, final_device=final)
                for value, final in zip(values, launched.finals, strict=True)
            ]
        else:
            verdicts, start = [], 0
            for d in launched.deferred:
                verdicts.append(d.finish(values[start : start + d.count]))
                start += d.count
        for it, rows in zip(launched.items, launched.rows, strict=True):
            it.decoding.state.target_logits = rows  # (the launch of a later step set its own)
        touched, tokens = self._advance(launched.step, launched.items, verdicts, None, [None] * len(verdicts))
        self._count(len(launched.items), launched.step.size, tokens)
        return touched

    def _advance(
        self,
        step: Step,
        group: list[BatchItem],
        verdicts: list[Verdict],
        hidden: torch.Tensor | None,
        kept: list[torch.Tensor | None],
    ) -> tuple[list[BatchItem], int]:
        """Each sequence of `step` emits its verdict's tokens, checks its stops and updates its drafter; a finished one
        leaves the batch. A sequence that ended while its step was in flight is passed over. Returns the sequences
        advanced and the tokens they emitted."""
        touched, tokens = [], 0
        for b, it in enumerate(group):
            if it.done:
                continue
            before = len(it.decoding.new_ids)
            piece = it.decoding.advance(step, b, verdicts[b], hidden, kept=kept[b])
            tokens += len(it.decoding.new_ids) - before
            self._settle_shadow(it)
            if piece:
                it.pieces.append(piece)
            if it.decoding.finish:
                self.running.remove(it)
                self._finish(it)
            touched.append(it)
        return touched, tokens

    def _fail(self, group: list[BatchItem], exc: BaseException) -> list[BatchItem]:
        """A failed step fails the sequences in it (the forward's provisional entries dropped, so the slots can go)."""
        self.runner.cancel()
        for it in group:
            if it in self.running:
                self.running.remove(it)
            if not it.done:
                self._finish(it, exc)
        return group

    def _count(self, sequences: int, inputs: int, tokens: int) -> None:
        """A decode step landed: `sequences` in its forward of `inputs` inputs emitted `tokens`."""
        self.counts.steps += 1
        self.batch_sizes.append(sequences)
        self.step_inputs.append(inputs)
        self.step_tokens.append(tokens)

    def _verify(self, step: Step, group: list[BatchItem], logits: torch.Tensor) -> list[Verdict]:
        """Every sequence's verdict, with one host copy for the step. A step of greedy sequences only (on the
        standard verifier) is verified in one go (`verify_greedy_all`: one argmax, walks on the host)."""
        rows = step.split(logits)
        if self.verifier is verify_deferred and all(it.decoding.sampling.greedy for it in group):
            for it, seq_rows in zip(group, rows, strict=True):
                it.decoding.state.target_logits = seq_rows  # as `Decoding.verdict` leaves it
            offsets = step.offsets
            return verify_greedy_all(logits, [(offsets[b], s.proposal, s.tree) for b, s in enumerate(step.seqs)])
        return verify_all([it.decoding.verdict(step, b, r) for b, (it, r) in enumerate(zip(group, rows, strict=True))])

    def run(self, items: Iterable[BatchItem] | None = None) -> Iterator[BatchItem]:
        """Step until every submitted item (or those of `items`) is done; yields items as they get text or finish."""
        wanted = None if items is None else list(items)
        while not (self.idle if wanted is None else all(i.done for i in wanted)):
            yield from self.step()
