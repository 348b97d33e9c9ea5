"""Batched decoding (`paradec.batch`): every sequence of a batch emits exactly what it emits alone.

Greedy in fp32 on CPU, for every batchable method, with ragged acceptance (some sequences accept drafts in a step
while others reject them), mixed methods in one batch, sequences joining and leaving (continuous batching), a
cancelled sequence, and speculation turned off on some steps. Sampling: each sequence keeps its own generator, so
a sampled sequence of a batch equals the same request decoded alone; and the chi-square check of the sampled tokens.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

import paradec
from conftest import counting, hf_greedy
from paradec.batch import (
    NEW_GRAPH_DEMAND,
    BatchDecoder,
    DepthRates,
    Shadow,
    SpeculationPolicy,
    StepTimings,
    depth_rates,
)
from paradec.config import SamplingParams
from paradec.errors import ParadecError
from paradec.runners.native import BatchedNativeRunner
from paradec.zoo import code_draft_dir, code_model_dir

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "x",
    "def read_lines(path):\n    with open(path) as f:\n        return",
]
NEW = 24


@pytest.fixture(scope="module")
def code_engine():
    return paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")


def alone(engine, prompt, method, **kw):
    return engine.generate(prompt, method=method, max_new_tokens=kw.pop("max_new_tokens", NEW), **kw)


@pytest.mark.parametrize("method", ["vanilla", "pld", "lookahead", "jacobi", "draft", "medusa", "eagle"])
def test_greedy_batch_equals_each_sequence_alone(code_engine, method):
    # speculating on every step: the engine's decoders share its step timings, and a fitted policy may turn
    # speculation off on these steps (the tests of the policy are below)
    results = code_engine.generate_batch(PROMPTS, method=method, max_new_tokens=NEW, speculate="always")
    for prompt, result in zip(PROMPTS, results, strict=True):
        single = alone(code_engine, prompt, method)
        assert result.token_ids == single.token_ids, (method, prompt)
        assert result.text == single.text and result.finish_reason == single.finish_reason
        assert result.stats.method == method


@pytest.fixture(scope="module")
def static_engine():
    """The zoo pair whose batched runners pad every step to `StaticRagged`'s buckets (the CUDA default, captured as
    graphs there; run eagerly here): dummy sequences, padding inputs, the scratch slot."""
    init = BatchedNativeRunner.__init__

    def static_init(self, model, *, static_shapes=None, **kw):
        init(self, model, static_shapes=True, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BatchedNativeRunner, "__init__", static_init)
        engine = paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")
        # makes both batched runners, with the slots of every test here (a later call asking for more slots would
        # make a new runner outside this patch: unpadded)
        engine.generate_batch(PROMPTS[:1], method="draft", max_new_tokens=2, max_batch=2 * len(PROMPTS))
    assert engine._batched.static_shapes and engine._batched_draft.static_shapes
    return engine


@pytest.mark.parametrize("method", ["vanilla", "pld", "draft", "eagle", "lookahead"])
def test_bucketed_steps_equal_each_sequence_alone(static_engine, code_engine, method):
    results = static_engine.generate_batch(PROMPTS, method=method, max_new_tokens=NEW, speculate="always")
    assert static_engine._batched._static is not None  # the padded runner of the fixture did the steps
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == alone(code_engine, prompt, method).token_ids, (method, prompt)


def test_a_bucket_reads_its_slots_as_a_view_from_slot_0_only(static_engine, code_engine):
    """Continuous batching, more prompts than slots: every step's graph key (`StaticRagged`'s, recorded here by a
    bank that never captures) places its slots one of two ways, slots 0 .. B-1 read as a view or gathered, so the
    placement of a queue's tail or of a slot whose next sequence is still prefilled never makes a new bucket; and
    the outputs stay each prompt's alone."""
    from paradec.runners.native.graphs import GraphBank

    static = static_engine._batched._static
    saved, static.bank = static.bank, GraphBank(torch.device("cpu"), capture_after=10**9)  # eager, keys kept
    try:
        prompts = PROMPTS * 2
        lengths = [8 + 5 * i for i in range(len(prompts))]  # answers ending at different steps
        requests = [
            static_engine.request(p, method="pld", max_new_tokens=n) for p, n in zip(prompts, lengths, strict=True)
        ]
        results = static_engine.generate_batch(requests, max_batch=3)
        keys = list(static.bank._uses)
    finally:
        static.bank = saved
    for prompt, n, result in zip(prompts, lengths, results, strict=True):
        assert result.token_ids == alone(code_engine, prompt, "pld", max_new_tokens=n).token_ids
    placements = {key[4] for key in keys}  # (Bq, Nq, nq, kv, slot_range, taps)
    assert None in placements and any(p is not None for p in placements)  # both kinds were met
    assert all(p is None or p == (0, key[0]) for key, p in zip(keys, (k[4] for k in keys), strict=True))


def test_warm_up_decodes_every_batch_bucket_and_leaves_no_steps_or_text(code_engine, monkeypatch):
    """`BatchDecoder.warm_up`: a batch of each bucket up to max_running (and max_running) per method, speculative
    steps among them (the prompt repeats: lookup drafters propose); afterwards no steps are counted, no per-step
    records are left, suffix's trie of earlier outputs is empty, and decoding is what it is without a warm-up."""
    decoder = code_engine.batch_decoder(5)
    seen = []
    count = decoder._count
    monkeypatch.setattr(decoder, "_count", lambda sequences, inputs, tokens: (seen.append((sequences, inputs)),
                                                                            count(sequences, inputs, tokens)))  # fmt: skip
    steps, methods = decoder.warm_up(["vanilla", "suffix", "layerskip"], max_new_tokens=6)
    assert steps == len(seen) > 0 and methods == ["vanilla", "suffix"]  # layerskip runs alone: passed over
    assert {sequences for sequences, _ in seen} >= {1, 2, 4, 5}  # the buckets under 5, and 5
    assert any(inputs > sequences for sequences, inputs in seen)  # some steps scored proposals
    assert decoder.counts.steps == 0 and not decoder.batch_sizes and not decoder.step_tokens and decoder.idle
    assert not code_engine.method("suffix").tries
    monkeypatch.undo()
    items = [decoder.submit(code_engine.request(p, method="suffix", max_new_tokens=NEW)) for p in PROMPTS]
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=True):
        assert item.result.token_ids == alone(code_engine, prompt, "suffix").token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_batch_equals_transformers(engines, hf_models, arch):
    engine = engines(f"loop-{arch}", arch, runner="native")
    prompts = [[5, 9, 2, 7, 5, 9], [11, 3], [7] * 9, [40, 41, 42, 43, 44, 45, 46]]
    for method in ("vanilla", "pld", "draft"):
        results = engine.generate_batch(prompts, method=method, max_new_tokens=16)
        for prompt, result in zip(prompts, results, strict=True):
            assert result.token_ids == hf_greedy(hf_models(f"loop-{arch}"), prompt, 16), (method, prompt)


def test_acceptance_is_ragged_inside_one_step(code_engine):
    """Some step must accept drafts for one sequence and none for another: the case padded batches get wrong."""
    decoder = code_engine.batch_decoder(len(PROMPTS), speculate="always")
    items = [decoder.submit(code_engine.request(p, method="pld", max_new_tokens=NEW)) for p in PROMPTS]
    ragged = 0
    while not all(item.done for item in items):
        before = {id(i): i.decoding.stats.accepted_tokens for i in items if i.decoding is not None}
        running = [i for i in decoder.running if i.prefilled]
        decoder.step()
        gained = {i.decoding.stats.accepted_tokens - before.get(id(i), 0) for i in running}
        ragged += len(gained) > 1 and 0 in gained
    assert ragged > 0
    for prompt, item in zip(PROMPTS, items, strict=True):
        assert item.result.token_ids == alone(code_engine, prompt, "pld").token_ids


def test_mixed_methods_share_a_step(code_engine):
    methods = ["vanilla", "pld", "draft", "medusa", "eagle"]
    decoder = code_engine.batch_decoder(len(methods), speculate="always")
    items = [
        decoder.submit(code_engine.request(p, method=m, max_new_tokens=NEW))
        for p, m in zip(PROMPTS, methods, strict=True)
    ]
    for _ in decoder.run(items):
        pass
    assert max(decoder.batch_sizes) == len(methods)
    for prompt, method, item in zip(PROMPTS, methods, items, strict=True):
        assert item.result.token_ids == alone(code_engine, prompt, method).token_ids, method


def test_sequences_join_and_leave(code_engine):
    """Continuous batching: 2 slots for 5 requests of different lengths; a request submitted while others run."""
    decoder = code_engine.batch_decoder(2, prefill_chunk=3, speculate="always")
    lengths = [5, 30, 12, 8, 20]
    items = [
        decoder.submit(code_engine.request(p, method="pld", max_new_tokens=n))
        for p, n in zip(PROMPTS[:4], lengths, strict=False)
    ]
    for _ in range(4):
        decoder.step()
    late = decoder.submit(code_engine.request(PROMPTS[4], method="draft", max_new_tokens=lengths[4]))
    for _ in decoder.run():
        assert len(decoder.running) <= 2
    for prompt, n, item in zip(PROMPTS[:4], lengths, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, "pld", max_new_tokens=n).token_ids
    assert late.result.token_ids == alone(code_engine, PROMPTS[4], "draft", max_new_tokens=20).token_ids
    assert decoder.runner.free == decoder.runner.slots  # every slot came back


class Overlaps:
    """Records, per decode step of a `BatchDecoder`, when it was launched and landed (`_launch_plain`, `_land`)."""

    def __init__(self, decoder: BatchDecoder) -> None:
        self.events: list[tuple[str, int]] = []
        launch, land = decoder._launch_plain, decoder._land

        def launching(items):
            launched, touched = launch(items)
            if launched is not None:
                self.events.append(("launch", id(launched)))
            return launched, touched

        def landing(launched):
            self.events.append(("land", id(launched)))
            return land(launched)

        decoder._launch_plain, decoder._land = launching, landing

    @property
    def overlapped(self) -> int:
        """Steps launched while an earlier one was still to land."""
        waiting, count = 0, 0
        for kind, _ in self.events:
            count += kind == "launch" and waiting > 0
            waiting += 1 if kind == "launch" else -1
        return count


@pytest.mark.parametrize("method", ["vanilla", "pld", "suffix"])
def test_steps_without_proposals_overlap_and_keep_the_output(code_engine, method):
    """A step without proposals (vanilla; pld and suffix with speculation off) is launched before the step in flight
    is landed: the device runs one while the host emits the other. Sequences end while a step holding them is in
    flight (a stop string, EOS, max_new_tokens, a cancellation), others join on their slots, and each emits what it
    emits alone, greedy and sampled."""
    stop = alone(code_engine, PROMPTS[2], "vanilla").text[20:26]
    asked = [
        (PROMPTS[0], {"max_new_tokens": NEW}),
        (PROMPTS[1], {"max_new_tokens": 7}),
        (PROMPTS[2], {"max_new_tokens": NEW, "stop": stop}),
        (PROMPTS[3], {"max_new_tokens": NEW, "sampling": {"temperature": 0.8, "seed": 3}}),
        (PROMPTS[4], {"max_new_tokens": 40}),  # cancelled
        (PROMPTS[1], {"max_new_tokens": NEW}),  # joins when a slot frees
    ]
    requests = [code_engine.request(p, method=method, **kw) for p, kw in asked]
    decoder = code_engine.batch_decoder(5, speculate="never")
    overlaps = Overlaps(decoder)
    items = [decoder.submit(r) for r in requests]
    for _ in range(6):
        decoder.step()
    assert decoder._inflight is not None and items[4] in decoder._inflight.items
    decoder.cancel(items[4], "disconnect")
    for _ in decoder.run(items):
        pass
    assert overlaps.overlapped > 20
    assert isinstance(items[4].error, ParadecError) and "disconnect" in str(items[4].error)
    for i, item in enumerate(items):
        if i == 4:
            continue
        # speculation off draws what plain decoding draws: a sampled sequence follows vanilla's solo run
        single = code_engine.generate(code_engine.request(asked[i][0], method="vanilla", **asked[i][1]))
        assert item.result.token_ids == single.token_ids and item.result.text == single.text, (method, i)
        assert item.result.finish_reason == single.finish_reason
    assert items[2].result.finish_reason == "stop" and items[2].result.token_ids != items[0].result.token_ids
    assert decoder.runner.free == decoder.runner.slots
    serial = code_engine.batch_decoder(4, speculate="never", overlap=False)
    plain = Overlaps(serial)
    again = [serial.submit(r) for r in requests[:4]]
    for _ in serial.run(again):
        pass
    assert plain.events == [] and [i.result.token_ids for i in again] == [i.result.token_ids for i in items[:4]]


def test_eagle_sequences_draft_together_one_head_forward_per_level(code_engine):
    """A batch's EAGLE sequences hold the rows of their cache slots in one bank of workspaces, and one step over the
    bank drafts all their trees: one head forward per level for the whole batch (alone: one per sequence). Each
    drafts what it drafts alone: the same steps and accepted tokens, the same output."""
    decoder = code_engine.batch_decoder(3, speculate="always")
    items = [decoder.submit(code_engine.request(p, method="eagle", max_new_tokens=NEW)) for p in PROMPTS[:3]]
    while not all(i.prefilled for i in items):
        decoder.step()
    spaces = [i.decoding.drafter.ws for i in items]
    assert len({id(ws.bank) for ws in spaces}) == 1 and [ws.index for ws in spaces] == [i.slot for i in items]
    method = code_engine.method("eagle")
    assert method.workspace not in spaces
    with counting(method.head, "attend") as forwards:
        decoder.step()
    assert (
        len(forwards) == items[0].decoding.drafter.options.depth
    )  # adding the staged entries, then each level after the first
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        single = alone(code_engine, prompt, "eagle")
        assert item.result.token_ids == single.token_ids
        assert (item.result.stats.steps, item.result.stats.accepted_tokens) == (
            single.stats.steps, single.stats.accepted_tokens
        )  # fmt: skip


def test_medusa_sequences_share_one_head_forward_per_step(code_engine):
    decoder = code_engine.batch_decoder(3, speculate="always")
    items = [decoder.submit(code_engine.request(p, method="medusa", max_new_tokens=NEW)) for p in PROMPTS[:3]]
    while not all(i.prefilled for i in items):
        decoder.step()
    with counting(code_engine.method("medusa").heads, "logits") as forwards:
        decoder.step()
    assert len(forwards) == 1 and forwards[0].shape[0] == 3  # the three last hidden states, in one forward
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, "medusa").token_ids


def test_cancelling_one_sequence_leaves_the_others_unchanged(code_engine):
    decoder = code_engine.batch_decoder(3, speculate="always")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    items = [decoder.submit(code_engine.request(p, method="draft", max_new_tokens=64)) for p in prompts]
    for _ in range(2):
        decoder.step()
    assert not items[1].done and items[1].decoding.stats.steps >= 1  # cancelled mid-generation
    decoder.cancel(items[1], "disconnect")
    for _ in decoder.run(items):
        pass
    assert isinstance(items[1].error, ParadecError) and "disconnect" in str(items[1].error)
    for i in (0, 2):
        assert items[i].result.token_ids == alone(code_engine, prompts[i], "draft", max_new_tokens=64).token_ids
    assert decoder.runner.free == decoder.runner.slots


class Alternating(SpeculationPolicy):
    """Speculation off on every other step: the drafters must pick up again after a step without a proposal."""

    def __init__(self) -> None:
        super().__init__("auto")
        self.calls = 0

    def speculate(self, taus, proposed, **kw) -> bool:
        self.calls += 1
        return self.calls % 2 == 0


@pytest.mark.parametrize("method", ["pld", "draft", "medusa", "lookahead", "jacobi", "eagle"])
def test_steps_without_speculation_keep_the_output(code_engine, method):
    decoder = code_engine.batch_decoder(3)
    decoder.policy = Alternating()
    items = [decoder.submit(code_engine.request(p, method=method, max_new_tokens=NEW)) for p in PROMPTS[:3]]
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, method).token_ids


class Scripted(SpeculationPolicy):
    """On for the first `on` steps, then off; records what each step was told. No shadow drafts: the estimates are
    the scored steps' alone."""

    shadow_every = 0

    def __init__(self, on: int) -> None:
        super().__init__("auto")
        self.on, self.seen = on, []

    def speculate(self, taus, proposed, **kw) -> bool:
        self.seen.append((list(taus), list(proposed)))
        return len(self.seen) <= self.on

    def cap(self, taus, proposed, depths):
        return None  # the drafters' own proposals whenever on


def test_the_policy_weighs_the_speculative_steps_only(code_engine):
    """The tokens per step (and draft inputs per step) the policy weighs are those of the steps that speculated:
    steps with speculation off emit one token each and must not talk it out of speculating for good (the overall τ
    sinks towards 1 while speculation is off; on the H200 a batch of 8 samples then speculated in 7% of its steps)."""
    decoder = code_engine.batch_decoder(2)
    decoder.policy = Scripted(on=10)
    items = [decoder.submit(code_engine.request(p, method="pld", max_new_tokens=48)) for p in PROMPTS[0:3:2]]
    for _ in decoder.run(items):
        pass
    both = [seen for seen in decoder.policy.seen if len(seen[0]) == 2]  # the steps before one of them finished
    assert len(both) > 25
    after_on, later = both[10], both[-1]
    assert all(tau > 1.0 for tau in after_on[0]) and all(n > 0 for n in after_on[1])  # pld copied on these prompts
    assert later == after_on  # twenty-odd steps without speculation changed neither estimate
    assert [it.spec_steps for it in items] == [10, 10], [it.spec_steps for it in items]
    assert items[0].decoding.stats.tau < after_on[0][0]  # the overall τ, which counts the plain steps, is lower


def test_overlapped_plain_steps_are_timed_apart_and_probed_while_speculating():
    """An overlapped plain step's period hides the host's work: it is kept apart from the fit over the steps the host
    waited for, and is what plain decoding costs. While speculation wins on the fit alone, a plain probe (3 steps in
    `plain_every`) times it, but only where plain steps would overlap."""
    taus, proposed = [1.4] * 8, [5.0] * 8  # 8 sequences, 11.2 tokens for 48 inputs
    policy = SpeculationPolicy("auto")
    for inputs in range(8, 72, 4):  # waited-for steps: 4 ms + 0.02 ms per input
        policy.observe(inputs, 0.004 + 0.00002 * inputs)
    assert policy.plain_cost(8) == pytest.approx(policy.cost(8))
    decisions = [policy.speculate(taus, proposed, overlap=True) for _ in range(policy.plain_every + 2)]
    assert all(decisions[: policy.plain_every - 1]) and decisions[policy.plain_every - 1 :] == [False] * 3
    never = [policy.speculate(taus, proposed) for _ in range(3 * policy.plain_every)]
    assert all(never)  # plain steps that would not overlap cost what the fit says: no probe
    policy.observe(8, 0.0025, overlapped=True)  # the probe's period: 2.5 ms for 8 tokens beats 2.26 tokens per ms
    assert len(policy.samples) == 16 and policy.plain_cost(8) == pytest.approx(0.0025)
    assert not policy.speculate(taus, proposed, overlap=True)
    assert policy.speculate([3.0] * 8, proposed, overlap=True)  # τ 3: speculation still wins


def test_policy_without_timings_speculates_for_a_bounded_number_of_steps():
    """Steps that meet new graph buckets are not timed: a batch meeting one every step must not speculate on
    unmeasured for ever. Past `max_unfitted` undecided steps it decodes plainly, probing one step in
    `probe_every` (no backoff: the fit needs those samples), and decides from the fit once it has them."""
    policy = SpeculationPolicy("auto")
    first = [policy.speculate([1.5] * 8, [6.0] * 8) for _ in range(policy.max_unfitted)]
    assert all(first)
    later = [policy.speculate([1.5] * 8, [6.0] * 8) for _ in range(4 * policy.probe_every)]
    assert sum(later) == 4 and all(later[i] for i in range(policy.probe_every - 1, len(later), policy.probe_every))
    for inputs in range(8, 72, 8):  # the probes got timed: a launch-bound forward, speculation wins
        policy.observe(inputs, 0.002)
    assert all(policy.speculate([1.5] * 8, [6.0] * 8) for _ in range(8))


def test_policy_turns_speculation_off_when_verification_costs_more():
    policy = SpeculationPolicy("auto")
    assert policy.speculate([3.0] * 4, [5.0] * 4)  # no timings yet: speculate
    for inputs in range(4, 60, 4):  # a compute-bound forward: time grows with every input
        policy.observe(inputs, 0.001 * inputs)
    assert not policy.speculate([1.2] * 8, [6.0] * 8)  # τ 1.2 for 7x the inputs: plain decoding wins
    assert policy.speculate([5.0] * 2, [2.0] * 2)  # τ 5 for 3x the inputs: speculation wins
    off = [policy.speculate([1.2] * 8, [6.0] * 8) for _ in range(2 * policy.max_probe_every)]
    probes = [i for i, on in enumerate(off) if on]  # off, but probing now and then, rarer while it keeps losing
    gaps = [b - a for a, b in zip([-1, *probes], probes, strict=False)]
    assert gaps[:5] == [16, 32, 64, 128, 256] and set(gaps[4:]) == {policy.max_probe_every}
    assert policy.speculate([5.0] * 2, [2.0] * 2) and policy.probe_gap == policy.probe_every  # on again: reset
    cheap = SpeculationPolicy("auto")
    for inputs in range(4, 60, 4):  # a launch-bound forward: the inputs cost nothing
        cheap.observe(inputs, 0.002)
    assert cheap.speculate([1.2] * 8, [6.0] * 8)
    assert SpeculationPolicy("never").speculate([5.0], [1.0]) is False
    with pytest.raises(ParadecError, match="speculate must be one of"):
        SpeculationPolicy("sometimes")


class Capped(SpeculationPolicy):
    """Speculation always on, every proposal cut to depth `depth` but one step in three left alone."""

    def __init__(self, depth: int) -> None:
        super().__init__("auto")
        self.depth, self.calls = depth, 0

    def speculate(self, taus, proposed, **kw) -> bool:
        return True

    def cap(self, taus, proposed, depths):
        self.calls += 1
        return None if self.calls % 3 == 0 else self.depth


@pytest.mark.parametrize("method", ["pld", "draft", "lookahead", "eagle", "suffix"])
def test_proposals_cut_to_a_depth_keep_the_output_and_the_estimates(code_engine, method):
    decoder = code_engine.batch_decoder(3)
    decoder.policy = Capped(1)
    items = [decoder.submit(code_engine.request(p, method=method, max_new_tokens=NEW)) for p in PROMPTS[:3]]
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, method).token_ids
        # the estimates count the uncapped steps only: a cut step accepts one draft token at most
        assert item.spec_steps < item.decoding.stats.steps / 2
        assert sum(item.spec_accepted) + item.spec_steps == item.spec_tokens


@pytest.mark.parametrize("method", ["pld", "draft", "suffix"])
def test_a_step_stays_within_the_largest_bucketed_step(code_engine, method, monkeypatch):
    """Where the runner pads steps to graph buckets, a speculative step whose inputs would pass the largest one
    runs unbucketed (no graph): proposals are cut so that it does not; the outputs stay each sequence's own."""
    decoder = code_engine.batch_decoder(3, speculate="always")
    assert decoder.runner.max_bucketed_inputs is None  # unpadded steps (the CPU default): no such bound
    monkeypatch.setattr(type(decoder.runner), "max_bucketed_inputs", property(lambda self: 9))  # 2 drafts each
    items = [decoder.submit(code_engine.request(p, method=method, max_new_tokens=NEW)) for p in PROMPTS[:3]]
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, method).token_ids
    assert max(decoder.step_inputs) <= 9 and max(decoder.step_inputs) > 3  # cut, not turned off


def test_the_policy_cuts_proposals_when_their_tails_cost_more_than_they_give():
    """Sequences that accept their first draft token but rarely the later ones, on a forward whose time grows
    with its inputs: cut to one token per sequence, a step costs far less for nearly the same tokens."""
    policy = SpeculationPolicy("auto")
    tails = [DepthRates(accepted=[0.9, 0.1, 0.05] + [0.0] * 5, depth=[1.0] * 8)] * 8  # chains of 8
    taus = [1 + sum(d.accepted) for d in tails]
    assert policy.cap(taus, [8.0] * 8, tails) is None  # no timings yet: as the drafters propose
    for inputs in range(8, 80, 4):
        policy.observe(inputs, 0.001 + 0.0005 * inputs)  # each input costs half a step of one
    assert policy.cap(taus, [8.0] * 8, tails) == 1
    cuts = [policy.cap(taus, [8.0] * 8, tails) for _ in range(2 * policy.probe_every)]
    assert cuts.count(None) == 2 and set(cuts) == {1, None}  # an uncapped step now and then refreshes the estimates
    deep = [DepthRates(accepted=[0.95, 0.9, 0.9, 0.85, 0.8, 0.8, 0.75, 0.7], depth=[1.0] * 8)] * 8
    deep_taus = [1 + sum(d.accepted) for d in deep]
    assert policy.cap(deep_taus, [8.0] * 8, deep) == 2  # deep accepters, but inputs this dear: a cut still pays
    mild = SpeculationPolicy("auto")
    for inputs in range(8, 80, 4):
        mild.observe(inputs, 0.004 + 0.00005 * inputs)  # an input costs 1/80 of a step
    assert mild.cap(deep_taus, [8.0] * 8, deep) is None  # ... and here they keep every draft token
    assert mild.cap(taus, [8.0] * 8, tails) == 1
    flat = SpeculationPolicy("auto")
    for inputs in range(8, 80, 4):
        flat.observe(inputs, 0.002)  # launch-bound: the inputs cost nothing
    assert flat.cap(taus, [8.0] * 8, tails) is None
    # trees that keep their width when cut (a drafter spends its node budget at depth 1): once measured, the cut's
    # real inputs decide, and cutting wide trees to depth 1 no longer looks cheap
    wide = SpeculationPolicy("auto")
    for inputs in range(8, 80, 4):
        wide.observe(inputs, 0.004 + 0.00005 * inputs)
    assert wide.cap(taus, [8.0] * 8, tails) == 1
    for _ in range(3):
        wide.observe_cut(1, 8.0)  # cut to depth 1, each sequence still scored 8 draft inputs
    assert wide.cap(taus, [8.0] * 8, tails) == 2
    assert SpeculationPolicy("always").cap(taus, [8.0] * 8, tails) is None
    assert depth_rates([]) == []


def test_sampled_sequences_of_a_batch_equal_their_solo_runs(code_engine):
    """Each sequence owns its generator: the draws a batch makes for it are the ones it makes alone."""
    # the draft model's one-graph chain draws its tokens by an exponential race, the per-token loop by sampling:
    # both exact, but they spend the generator differently, and a batch's draft slots run the loop. Speculation
    # stays on: a step the policy runs without a proposal would draw fewer numbers than the solo run
    for method, options in (("vanilla", None), ("pld", None), ("draft", {"one_graph": False})):
        requests = [
            code_engine.request(
                p, method=method, options=options, max_new_tokens=NEW, sampling={"temperature": 0.9, "seed": 7 + i}
            )
            for i, p in enumerate(PROMPTS)
        ]
        results = code_engine.generate_batch(requests, speculate="always")
        for request, result in zip(requests, results, strict=True):
            assert result.token_ids == code_engine.generate(request).token_ids, method


def test_sampling_in_a_batch_follows_plain_sampling(engines):
    """Chi-square: the first two tokens sampled by pld and draft inside batches follow plain sampling's."""
    from scipy.stats import chisquare

    engine = engines("loop-llama", "llama", runner="native")
    prompt = [5, 9, 2, 7, 5, 9, 2]
    samples = 600
    sp = SamplingParams(temperature=1.0)
    with torch.no_grad():
        runner = engine.target
        runner.reset()
        out = runner.forward(torch.tensor(prompt), logits="all")
        runner.commit(0)
        first = torch.softmax(out.logits[-1].double(), -1)
    for method in ("pld", "draft"):
        requests = [
            engine.request(prompt, method=method, max_new_tokens=1, sampling=dataclasses.replace(sp, seed=s))
            for s in range(samples)
        ]
        counts = Counter(r.token_ids[0] for r in engine.generate_batch(requests, max_batch=32))
        cells = [t for t in range(first.shape[0]) if first[t] * samples >= 5]
        observed = [counts.get(t, 0) for t in cells] + [samples - sum(counts.get(t, 0) for t in cells)]
        expected = [float(first[t]) * samples for t in cells]
        expected.append(samples - sum(expected))
        assert chisquare(observed, expected).pvalue > 1e-3, method


def test_batch_errors(code_engine, engines):
    with pytest.raises(ParadecError, match="method 'layerskip' does not run in a batch") as info:
        code_engine.batch_decoder(2).submit(code_engine.request("x", method="layerskip"))
    assert info.value.param == "method"
    with pytest.raises(ParadecError, match="max_running must be an integer >= 1, got 0"):
        code_engine.batch_decoder(0)
    with pytest.raises(ParadecError, match="prompts must be a non-empty list"):
        code_engine.generate_batch([])
    with pytest.raises(ParadecError, match="max_running must be an integer in"):
        BatchDecoder(code_engine, code_engine.batch_decoder(2).runner, max_running=10**6)
    hf = engines("llama")  # the generic runner: one after another, same results
    prompts = [[5, 9, 2], [11, 3, 4, 5]]
    assert [r.token_ids for r in hf.generate_batch(prompts, method="pld", max_new_tokens=8)] == [
        hf.generate(p, method="pld", max_new_tokens=8).token_ids for p in prompts
    ]
    with pytest.raises(ParadecError, match="batched decoding needs the native runner"):
        hf.batch_decoder(2)


def test_the_draft_model_runs_once_per_level_for_the_whole_batch(code_engine):
    decoder = code_engine.batch_decoder(3, speculate="always")
    items = [
        decoder.submit(code_engine.request(p, method="draft", options={"k": 4}, max_new_tokens=NEW))
        for p in PROMPTS[:3]
    ]
    while not all(i.prefilled for i in items):
        decoder.step()
    with counting(decoder.draft_runner()) as steps:
        decoder.step()
    assert [len(step) for step in steps] == [3, 3, 3, 3]  # k = 4 levels, each one forward over the 3 sequences
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, "draft", options={"k": 4}).token_ids


def test_a_failed_step_fails_its_sequences_and_the_decoder_goes_on(code_engine, monkeypatch):
    decoder = code_engine.batch_decoder(2, speculate="always")  # (verified steps: the broken verifier is met)
    items = [decoder.submit(code_engine.request(p, method="pld", max_new_tokens=NEW)) for p in PROMPTS[:2]]
    while not all(i.prefilled for i in items):
        decoder.step()

    def broken(*_):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(decoder, "_verify", broken)
        decoder.step()
    assert all(isinstance(i.error, RuntimeError) and "device lost" in str(i.error) for i in items)
    assert decoder.runner.free == decoder.runner.slots  # the slots came back, the forward was dropped
    again = decoder.submit(code_engine.request(PROMPTS[2], method="pld", max_new_tokens=NEW))
    for _ in decoder.run([again]):
        pass
    assert again.result.token_ids == alone(code_engine, PROMPTS[2], "pld").token_ids


def test_a_step_that_captured_a_graph_is_not_timed(code_engine, monkeypatch):
    """A CUDA graph's capture makes its step slow once: the policy's fit must not take that for the step's cost."""
    decoder = code_engine.batch_decoder(2)
    runner = type(decoder.runner)
    steps = {"n": 0}
    forward = runner.forward

    def counting(self, *args, **kwargs):
        steps["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(runner, "forward", counting)
    monkeypatch.setattr(runner, "graph_misses", property(lambda self: min(steps["n"], 3)))  # the first 3 steps
    decoder.policy.timings = StepTimings()  # (not the engine's, which earlier tests' steps filled)
    item = decoder.submit(code_engine.request(PROMPTS[0], method="pld", max_new_tokens=20))
    for _ in decoder.run([item]):
        pass
    assert decoder.steps > 5 and len(decoder.policy.samples) == decoder.steps - 3


def test_a_shadow_draft_accepts_what_a_verdict_would():
    """Greedy, a verdict accepts the draft's path that the target's tokens follow: a chain's matching prefix, a
    tree's root path down the children whose tokens are the next ones (siblings' tokens differ)."""
    chain = Shadow.of(10, [5, 6, 7, 8], None)
    assert chain.depth == 4
    assert [chain.accepted(e) for e in ([5, 6, 7, 8], [5, 6, 9, 8], [4, 6, 7, 8], [5, 6, 7, 9])] == [4, 2, 0, 3]
    # depth 1: node 0 (5) and node 1 (6); node 2 (7) under node 1, node 3 (8) under node 2, node 4 (9) under node 0
    tree = Shadow.of(0, [5, 6, 7, 8, 9], (-1, -1, 1, 2, 0))
    assert tree.depth == 3
    assert tree.accepted([6, 7, 8]) == 3 and tree.accepted([5, 9, 1]) == 2 and tree.accepted([6, 7, 1]) == 2
    assert tree.accepted([5, 7, 8]) == 1 and tree.accepted([4, 7, 8]) == 0


class Off(SpeculationPolicy):
    """Never speculates (a fitted policy that finds speculation losing), with shadow drafts."""

    def speculate(self, taus, proposed, **kw) -> bool:
        return False


@pytest.mark.parametrize("method", ["pld", "suffix"])
def test_shadow_drafts_learn_the_rates_without_scoring_a_draft(code_engine, method):
    """While speculation is off, host drafters draft for nothing now and then, and the tokens the target emits
    decide those drafts: the policy's per-sequence rates grow without one draft input scored, near what scored
    steps of the same prompts accept (copy-friendly prompts: well above one token a step)."""
    decoder = code_engine.batch_decoder(3)
    decoder.policy = Off("auto")
    new = 64  # (a shadow draft is decided once the target has emitted as many tokens as it is deep)
    items = [decoder.submit(code_engine.request(p, method=method, max_new_tokens=new)) for p in PROMPTS[:3]]
    for _ in decoder.run(items):
        pass
    assert decoder.step_inputs == decoder.batch_sizes  # one input per sequence and step: nothing scored
    assert decoder.counts.shadows > 0 and decoder.counts.speculative == 0
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, method, max_new_tokens=new).token_ids
        assert sum(item.spec_accepted) + item.spec_steps == item.spec_tokens
    long = [it for it in items if len(it.result.token_ids) >= 16]  # (one may stop within a shadow's depth)
    assert len(long) >= 2 and all(it.spec_steps > 0 for it in long)
    shadow_tau = sum(it.spec_tokens for it in items) / sum(it.spec_steps for it in items)
    scored = code_engine.batch_decoder(3, speculate="always")
    again = [scored.submit(code_engine.request(p, method=method, max_new_tokens=new)) for p in PROMPTS[:3]]
    for _ in scored.run(again):
        pass
    scored_tau = sum(it.spec_tokens for it in again) / sum(it.spec_steps for it in again)
    # shadows sample every position alike, scored steps the positions after an accepted run, and a few dozen
    # steps either way: near, not equal (pld here: 6.9 against 11.0, suffix 2.9 against 2.4)
    assert shadow_tau > 1.5 and 0.5 * scored_tau <= shadow_tau <= 1.5 * scored_tau, (shadow_tau, scored_tau)


def test_a_policy_that_learns_from_shadows_does_not_probe():
    """Probes exist to refresh the rates; with shadow drafts for every sequence (`probe=False`) an off policy
    stays off, and turns on as soon as the rates say speculation wins."""
    policy = SpeculationPolicy("auto")
    for inputs in range(4, 60, 4):
        policy.observe(inputs, 0.001 * inputs)
    assert not any(policy.speculate([1.2] * 8, [6.0] * 8, probe=False) for _ in range(2 * policy.max_probe_every))
    assert policy.speculate([5.0] * 2, [2.0] * 2, probe=False)


def test_decoders_over_one_runner_share_its_step_timings(code_engine):
    """Step costs describe the runner, not a batch: a second decoder starts fitted (a bench row of many
    `generate_batch` calls speculated unmeasured at the start of each)."""
    first = code_engine.batch_decoder(2)
    items = [first.submit(code_engine.request(p, method="pld", max_new_tokens=NEW)) for p in PROMPTS[:2]]
    for _ in first.run(items):
        pass
    second = code_engine.batch_decoder(2)
    assert second.policy.timings is first.policy.timings and second.policy.cost(4) is not None
    assert second.policy is not first.policy and second.policy.unfitted == 0


class Always(SpeculationPolicy):
    """Speculates on every step, uncapped."""

    shadow_every = 0

    def __init__(self) -> None:
        super().__init__("auto")

    def speculate(self, taus, proposed, **kw) -> bool:
        return True

    def cap(self, taus, proposed, depths):
        return None


@pytest.mark.parametrize("demand, dropped", [(NEW_GRAPH_DEMAND, True), (NEW_GRAPH_DEMAND + 1, False), (0, False)])
def test_a_speculative_step_meets_a_new_graph_only_once_its_bucket_keeps_coming_back(
    code_engine, monkeypatch, demand, dropped
):
    """A speculative step of host drafters that would meet an uncaptured graph bucket (tens of ms on a GPU) runs
    without its proposals until that bucket has been asked for more than `NEW_GRAPH_DEMAND` times (0: the step
    replays a graph); the outputs stay each sequence's own, and the dropped steps' proposals do not enter the
    estimates (as unaccepted drafts)."""
    decoder = code_engine.batch_decoder(3)
    decoder.policy = Always()
    asked = []
    monkeypatch.setattr(
        type(decoder.runner), "new_graph_demand", lambda self, step, hidden=False: asked.append(step.size) or demand
    )
    items = [decoder.submit(code_engine.request(p, method="pld", max_new_tokens=NEW)) for p in PROMPTS[:3]]
    for _ in decoder.run(items):
        pass
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, "pld").token_ids
    assert asked  # (only steps with proposals ask)
    if dropped:
        assert decoder.counts.dropped == len(asked) and decoder.step_inputs == decoder.batch_sizes
        assert all(it.spec_inputs == 0 and not any(it.spec_accepted) for it in items)
    else:
        assert decoder.counts.dropped == 0 and max(decoder.step_inputs) > 3
        assert all(it.spec_steps > 0 for it in items)


def test_a_graph_bucket_counts_the_steps_that_asked_for_it_until_captured():
    from paradec.runners.native.graphs import GraphBank

    bank = GraphBank(torch.device("cpu"))
    assert [bank.want(("a",)), bank.want(("a",)), bank.want(("b",)), bank.want(("a",))] == [1, 2, 1, 3]
    bank.graphs[("a",)] = object()  # captured
    assert bank.want(("a",)) == 0 and bank.want(("b",)) == 2


@pytest.mark.parametrize(
    ("method", "budget", "forwards"),
    [("pld", 4096, [5]), ("eagle", 4096, [5]), ("pld", 36, None)],  # eagle: the prefill's hidden states
)
def test_joining_sequences_prefill_together(code_engine, method, budget, forwards):
    """The prompt chunks of the sequences that join in a step go through one forward (one per kind of hidden
    state their drafters want), within `prefill_tokens` padded inputs (sequences x the longest chunk); what does not
    fit waits for a later step. Each sequence still emits what it emits alone."""
    decoder = BatchDecoder(
        code_engine, code_engine.batch_decoder(6).runner, max_running=6, prefill_chunk=12, prefill_tokens=budget,
        speculate="always", timings=StepTimings(),
    )  # fmt: skip
    prompts = [*PROMPTS, [7]]  # the last: one token, nothing to feed before its first step
    requests = [code_engine.request(p, method=method, max_new_tokens=NEW) for p in prompts]
    lengths = [len(r.prompt_ids) - 1 for r in requests]  # fed before the first step
    assert lengths[-1] == 0 and min(lengths[:-1]) >= 1 and sorted(lengths)[-3] > 12
    items = [decoder.submit(r) for r in requests]
    with counting(decoder.runner, "prefill") as calls:
        decoder.step()
        assert items[-1].prefilled  # it decodes from the next step on
        if forwards is not None:
            assert [len(chains) for chains in calls] == forwards  # all five others in one forward
            assert [len(ids) for _, ids in calls[0]] == [min(12, n) for n in lengths if n]
        for _ in decoder.run(items):
            pass
    fed = Counter()
    for chains in calls:
        assert len(chains) * max(len(ids) for _, ids in chains) <= budget
        for slot, ids in chains:
            fed[slot] += len(ids)
    if forwards is None:
        assert len(calls) > 2 and max(len(chains) for chains in calls) == 3  # 3 x 12 <= 36 < 4 x 12
    assert sorted(fed.values()) == sorted(n for n in lengths if n)  # every prompt fed once, in chunks
    for prompt, item in zip(prompts, items, strict=True):
        assert item.result.token_ids == alone(code_engine, prompt, method).token_ids, (method, prompt)


def test_prefill_tokens_must_be_a_positive_integer(code_engine):
    runner = code_engine.batch_decoder(2).runner
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ParadecError, match=rf"prefill_tokens must be an integer >= 1, got {bad!r}") as info:
            BatchDecoder(code_engine, runner, max_running=2, prefill_tokens=bad)
        assert info.value.param == "prefill_tokens"


def test_a_wave_shares_a_forward_only_when_feeding_alone_costs_more(static_engine, code_engine, monkeypatch):
    """With CUDA graph buckets (the CUDA default), a chunk that fits them replays a graph alone, while one unbucketed
    forward costs about `SHARED_PREFILL` of those: a few short chunks are fed one by one on the buckets, and a wave
    of chunks too long for the buckets (each an unbucketed forward alone) shares one forward; a wave of one-token
    chunks goes chunk by chunk however many (its shared forward would be a kind of its own to compile). Outputs as
    alone."""
    runner = static_engine._batched
    assert runner.bucketed_chunk == 128
    calls = []
    real = runner.prefill

    def recording(chains, **kw):
        calls.append(([len(ids) for _, ids in chains], kw["bucketed"]))
        return real(chains, **kw)

    monkeypatch.setattr(runner, "prefill", recording)
    vocab = runner.vocab_size
    short = [(3 + 7 * i) % vocab for i in range(40)]
    long = [(5 + 11 * i) % vocab for i in range(300)]
    for prompts, expect in (
        ([short, short[:30], short[:20]], [([39], True), ([29], True), ([19], True)]),
        ([long, long[:200], short], [([299, 199, 39], False)]),  # alone: 8 + 8 + 1 > 8
        ([short[i : i + 2] for i in range(10)], [([1], True)] * 10),  # one-token chunks: never shared
    ):
        calls.clear()
        decoder = BatchDecoder(static_engine, runner, max_running=10, speculate="always", timings=StepTimings())
        items = [decoder.submit(static_engine.request(p, method="pld", max_new_tokens=8)) for p in prompts]
        for _ in decoder.run(items):
            pass
        assert calls == expect
        for prompt, item in zip(prompts, items, strict=True):
            assert item.result.token_ids == alone(code_engine, prompt, "pld", max_new_tokens=8).token_ids


def test_warm_up_runs_the_unbucketed_prefill_forwards_once_per_kind_of_hidden_state(static_engine, monkeypatch):
    """With buckets, a warm-up's batches feed their short prompts on the buckets (or in one wave over consecutive
    slots): it then runs each kind of unbucketed prefill that serving would meet first otherwise (a compilation of
    seconds on CUDA): a chunk too long for the buckets alone, a wave over consecutive slots and one over slots out
    of order, once for each kind of hidden state its methods want (pld: none; eagle: its layers), and leaves every
    slot free."""
    runner = static_engine._batched
    calls = []
    real = runner.prefill

    def recording(chains, **kw):
        if not kw.get("bucketed"):
            calls.append(([slot for slot, _ in chains], [len(ids) for _, ids in chains], kw.get("hidden")))
        return real(chains, **kw)

    monkeypatch.setattr(runner, "prefill", recording)
    decoder = BatchDecoder(static_engine, runner, max_running=3, timings=StepTimings())
    decoder.warm_up(["pld", "vanilla", "eagle"], sizes=[1, 3], max_new_tokens=4)
    layers = static_engine.method("eagle").head.config.feature_layers or True
    assert calls == [([0], [136], False), ([0, 1, 2], [136] * 3, False), ([2, 1, 0], [136] * 3, False),
                     ([0], [136], layers), ([0, 1, 2], [136] * 3, layers), ([2, 1, 0], [136] * 3, layers)]  # fmt: skip
    assert runner.free == runner.slots and decoder.idle


def test_warm_up_decodes_over_gathered_slots_too(static_engine, monkeypatch):
    """A warm-up's batches sit in slots 0 .. B-1, where a step views the cache; once a sequence has left, a
    server's steps gather it instead, each kind compiled on first use on CUDA. The warm-up decodes each method at
    one sequence and at two over slots after a held one: gathered steps of one and of several sequences, plain
    (vanilla) and speculative (pld), and every slot is free again."""
    runner = static_engine._batched
    static = runner._static
    keys = []
    real = static.key

    def recording(*args):
        keys.append(real(*args))
        return keys[-1]

    monkeypatch.setattr(static, "key", recording)
    decoder = BatchDecoder(static_engine, runner, max_running=3, timings=StepTimings())
    decoder.warm_up(["pld", "vanilla"], sizes=[1, 3], max_new_tokens=6)
    gathered = {(bq, nq > 1) for bq, _, nq, _, view, _ in keys if view is None}
    assert {(1, False), (1, True), (2, False), (2, True)} <= gathered
    assert runner.free == runner.slots and decoder.idle


def test_the_policy_chooses_the_sequences_whose_drafts_pay():
    """`SpeculationPolicy.choose`: on the fitted t(N) = a + b·N, the sequences that may go without proposals
    speculate only while their τ - 1 per draft input raises the step's tokens per second; those that must always
    do; and `speculate` weighs the chosen ones only."""
    policy = SpeculationPolicy("auto")
    for inputs in range(4, 60, 4):
        policy.observe(inputs, 0.001 + 0.0001 * inputs)  # 1 ms + 0.1 ms per input
    taus, proposed = [3.0, 1.05, 1.0, 1.1], [4.0, 8.0, 8.0, 8.0]
    assert policy.choose(taus, proposed, [True] * 4) == [True, False, False, False]
    assert policy.choose(taus, proposed, [True, False, True, True]) == [True, True, False, False]  # 1 must
    assert policy.choose([1.0] * 4, proposed, [True] * 4) == [False] * 4  # nothing to gain
    # all four speculating: 6.15 tokens in 4.2 ms against plain decoding's 4 in 1.4 ms; the first alone: 6 in 1.8
    assert not policy.speculate(taus, proposed) and policy.chosen is None
    assert policy.speculate(taus, proposed, optional=[True] * 4) and policy.chosen == [True, False, False, False]
    assert policy.gain == pytest.approx((6.0 / 0.0018) / (4 / 0.0014))
    # no draft pays: off (a step proposing nothing would be waited for, where a plain one overlaps)
    assert not policy.speculate([1.0] * 4, proposed, optional=[True] * 4, probe=False) and policy.chosen is None
    cheap = SpeculationPolicy("auto")
    for inputs in range(4, 60, 4):  # launch-bound: every sequence that accepts anything pays its inputs
        cheap.observe(inputs, 0.002)
    assert cheap.choose(taus, proposed, [True] * 4) == [True, True, False, True]


class Choosy(SpeculationPolicy):
    """Speculates on every step, for the sequences at even positions of the step only (those that may go without)."""

    shadow_every = 2

    def speculate(self, taus, proposed, *, optional=None, **kw) -> bool:
        self.gain = None
        self.chosen = [b % 2 == 0 for b in range(len(taus))] if optional is not None and any(optional) else None
        return True

    def cap(self, taus, proposed, depths):
        return None


@pytest.mark.parametrize("method", ["pld", "suffix"])
def test_sequences_left_out_of_a_speculative_step_score_no_draft_and_keep_their_output(code_engine, method):
    """A sequence the policy leaves out of a speculative step scores its pending token alone, learns its rates from
    shadow drafts meanwhile (not from the steps it sat out), and emits what it emits alone."""
    decoder = code_engine.batch_decoder(3)
    decoder.policy = Choosy("auto")
    items = [decoder.submit(code_engine.request(p, method=method, max_new_tokens=NEW)) for p in PROMPTS[:3]]
    with counting(decoder.runner, "forward") as steps:
        for _ in decoder.run(items):
            pass
    speculative = [s for s in steps if s.size > len(s)]
    assert speculative and all(size == 1 for s in speculative for b, size in enumerate(s.sizes) if b % 2)
    assert any(len(s) > 1 for s in speculative)
    assert decoder.counts.left_out > 0 and decoder.counts.shadows > 0
    for prompt, item in zip(PROMPTS, items, strict=False):
        assert item.result.token_ids == alone(code_engine, prompt, method).token_ids
        assert sum(item.spec_accepted) + item.spec_steps == item.spec_tokens
