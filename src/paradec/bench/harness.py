"""The benchmark loop: every method on every prompt, then the Hugging Face peers, timed the same way.

Methodology (Spec-Bench's, extended): batch size 1; per method first a 1-token probe (a method whose resources
are missing is skipped, or is an error when the user named it), then `warmup` untimed passes over *every* prompt
(a greedy generation repeats its shapes exactly, so CUDA graph capture and compilation for every shape the timed
pass meets happen here; a warm-up over a few prompts left new cache-length buckets to compile while timed);
each timed generation sits between two `torch.cuda.synchronize()` calls (on CUDA) and is repeated `repeats`
times, keeping the median. Prompts are rendered (`paradec.bench.prompts.Rendering`: the chat template or raw
text) and encoded outside the timed calls, so tokenization is never timed. Our own vanilla always runs first: it
is the reference for speedups and, in greedy mode, for exactness (every lossless method must emit vanilla's token
ids on every prompt; after the run `paradec.bench.referee` rules on each mismatch: a rounding near-tie in half
precision, or a failure). The Hugging Face peers run eagerly (no graphs, nothing compiled per shape), so their
warm-up is `warmup` passes over the first turns of the first batch only. In sample mode prompt i is sampled with
seed `seed + i`, the same for every method, turn and repeat.

Multi-turn (`--turns all`): each measured turn of a prompt is one timed generation, recorded under its turn id
(`turn_id`: the prompt id for turn 1, `<id>/turn-<k>` after it). Turn k is asked after turns 1..k-1 and the
asking row's own answers to them, so its context is the row's own; a warm-up pass runs whole conversations too.
Turn k of a row is compared with vanilla's turn k only when its context equals vanilla's (every earlier answer
decoded to vanilla's text); otherwise the two continue different conversations, and the turn is listed as not
compared (`Bench.not_compared`) rather than as a mismatch.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from paradec.bench.metrics import RunRecord, first_mismatch
from paradec.bench.peers import BATCHED_PEERS, HFPeers
from paradec.bench.prompts import BenchPrompt, answer_text, rendering
from paradec.bench.referee import Referee
from paradec.config import SamplingParams
from paradec.drafters import get_drafter, methods, parse_options
from paradec.errors import ParadecError

MIXED = "(mixed)"  # the category of a batch whose prompts come from several categories (in the overall summary only)


@dataclass(frozen=True)
class BenchPlan:
    methods: tuple[str, ...]  # paradec methods, vanilla first
    explicit: bool  # named by the user: a method that cannot run is an error (else it is skipped)
    options: dict[str, Any]  # method -> its parsed options
    sampling: SamplingParams  # greedy (temperature 0) or the sampling parameters, `seed` the base seed
    max_new_tokens: int
    warmup: int = 1
    repeats: int = 1
    peers: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = (1,)
    chat: str = "auto"  # --chat: how records are rendered (`paradec.bench.prompts.Rendering`)
    turns: str = "first"  # --turns: the first user turn, or every turn after the row's own earlier answers
    samples: int = 1  # --samples: n samples of each prompt decoded together (one request of n; batch size 1 only)
    drift: bool = True  # re-time vanilla after the other batch-1 methods (`Bench.drift`)


@dataclass
class Outcome:
    """What became of one benchmarked row (a method, or a peer at one batch size)."""

    method: str
    kind: str  # "paradec" or "peer"
    batch_size: int = 1
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    lossy: bool = False
    options: dict = field(default_factory=dict)


def resolve_methods(text: str | None) -> tuple[tuple[str, ...], bool]:
    """(methods to run with vanilla first, whether the user named them) from a comma list (None = all)."""
    if text is None:
        return tuple(methods()), False
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ParadecError(f"--methods names no method: {text!r}")
    for name in names:
        get_drafter(name)  # raises, naming the unknown method
    return tuple(dict.fromkeys(["vanilla", *names])), True


def parse_method_options(texts: list[str], selected: tuple[str, ...]) -> dict[str, Any]:
    """`--opt METHOD.NAME=VALUE` texts -> {method: parsed options} for every selected method."""
    raw: dict[str, dict[str, str]] = {}
    for text in texts:
        key, equals, value = text.partition("=")
        method, dot, name = key.strip().partition(".")
        if not equals or not dot or not method or not name:
            raise ParadecError(f"--opt {text}: expected METHOD.NAME=VALUE (e.g. draft.k=6)")
        get_drafter(method)
        if method not in selected:
            raise ParadecError(f"--opt {text}: method {method!r} is not benchmarked (--methods)")
        raw.setdefault(method, {})[name] = value.strip()
    return {method: parse_options(get_drafter(method), raw.get(method)) for method in selected}


def turn_id(prompt_id: str, turn: int) -> str:
    """The id a measured turn (0-based) is recorded under: the prompt's id for the first turn."""
    return prompt_id if turn == 0 else f"{prompt_id}/turn-{turn + 1}"


def _summed(counts: list[list[int]], depth: int) -> list[int]:
    """Element-wise sums of per-position step counts of different lengths."""
    return [sum(c[i] for c in counts if i < len(c)) for i in range(depth)]


def _summed_record(method: str, category: str, prompt_ids: list[str], results, walls: list[float], size: int):
    """One record of sequences decoded together (a batch, or a request's n samples): their counts summed (steps
    are sequence steps, so τ is per sequence), the median of the repeats' wall times."""
    depth = max(len(r.stats.proposed_at) for r in results)
    return RunRecord(
        method=method,
        category=category,
        prompt_ids=prompt_ids,
        new_tokens=sum(r.stats.new_tokens for r in results),
        wall_seconds=statistics.median(walls),
        batch_size=size,
        steps=sum(r.stats.steps for r in results),
        proposed_tokens=sum(r.stats.proposed_tokens for r in results),
        accepted_tokens=sum(r.stats.accepted_tokens for r in results),
        accepted_at=_summed([r.stats.accepted_at for r in results], depth),
        proposed_at=_summed([r.stats.proposed_at for r in results], depth),
        prefill_seconds=None,
        finish_reason="stop" if all(r.finish_reason == "stop" for r in results) else "length",
    )


def _options_dict(options: Any) -> dict:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


DRIFT_WARN = 0.05  # vanilla's re-timed speed this far from its first: the run warns


class Bench:
    """Runs a `BenchPlan` over prompts with one engine; `records` and `outcomes` grow as it goes."""

    def __init__(
        self,
        engine,
        prompts: list[BenchPrompt],
        plan: BenchPlan,
        *,
        progress: bool = True,
        checkpoint: Callable[[Bench], None] | None = None,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.plan = plan
        self.checkpoint = checkpoint
        self.records: list[RunRecord] = []
        self.outcomes: list[Outcome] = []
        self.rendering = rendering(plan.chat, plan.turns, engine)
        self.turn_counts = [self.rendering.turn_count(p) for p in prompts]  # turns measured per prompt
        self._check_turn_ids()
        self.prompt_tokens = [self._encode(index) for index in range(len(prompts))]  # first turns
        self.vanilla_tokens: dict[str, list[int]] = {}  # turn id -> vanilla's new tokens
        self.vanilla_prompts: dict[str, list[int]] = {}  # turn id -> the prompt ids vanilla answered
        self.not_compared: list[dict] = []  # {method, batch_size, prompt}: later turns whose context differs
        # vanilla re-timed after the other batch-1 methods: {first_seconds, again_seconds, tokens, ratio}
        self.drift: dict | None = None
        # batch size -> vanilla's batched row re-timed after the other methods of that size (`_retime_batched`)
        self.batched_drift: dict[int, dict] = {}
        self._progress = progress
        self._bar: tqdm | None = None

    # --- setup ----------------------------------------------------------------------------------------------
    def _check_turn_ids(self) -> None:
        seen: dict[str, str] = {}
        for prompt, count in zip(self.prompts, self.turn_counts):
            for turn in range(count):
                ident, where = turn_id(prompt.id, turn), f"turn {turn + 1} of prompt {prompt.id!r}"
                if ident in seen:
                    raise ParadecError(f"{seen[ident]} and {where} are both recorded as {ident!r}: rename a prompt")
                seen[ident] = where

    def _encode(self, index: int, answers: Sequence[str] = ()) -> list[int]:
        """Prompt ids of turn `len(answers) + 1` of prompt `index`, after the asking row's `answers`."""
        ids = self.rendering.encode(self.engine, self.prompts[index], answers)
        limit = self.engine.target.max_length
        if len(ids) + self.plan.max_new_tokens > limit:
            raise ParadecError(
                f"prompt {turn_id(self.prompts[index].id, len(answers))!r} has {len(ids)} tokens: with "
                f"--max-new-tokens {self.plan.max_new_tokens} it exceeds the model's context of {limit} tokens"
            )
        return ids

    def _context(self, index: int, answers: list[str]) -> list[int]:
        return self._encode(index, answers) if answers else self.prompt_tokens[index]

    def _converse(self, group: list[int], ask: Callable[[int, list[int], list[list[int]]], list[list[int]]]) -> None:
        """Ask the measured turns of the prompts in `group` turn by turn: turn k of every prompt that has one, in
        the context of its earlier turns and the asker's own answers to them. `ask(turn, indices, contexts)` returns
        each asked prompt's new tokens."""
        answers: dict[int, list[str]] = {index: [] for index in group}
        for turn in range(max(self.turn_counts[index] for index in group)):
            asked = [index for index in group if self.turn_counts[index] > turn]
            outputs = ask(turn, asked, [self._context(index, answers[index]) for index in asked])
            for index, tokens in zip(asked, outputs):
                if turn + 1 < self.turn_counts[index]:
                    answers[index].append(answer_text(self.engine, tokens))

    def _sampling(self, index: int) -> SamplingParams:
        """Prompt `index`'s sampling: seed + index, or with n samples seed + index·n (its samples take the n seeds
        from there: no two samples of a run share one)."""
        sp = self.plan.sampling
        return sp if sp.greedy or sp.seed is None else replace(sp, seed=sp.seed + index * self.plan.samples)

    def _batches(self, size: int, *, by_category: bool = True) -> list[list[int]]:
        """Prompt indices in groups of `size`, in file order, each group inside one category (the padded batches of
        the HF peers, whose rows should have alike lengths); or, `by_category=False`, every prompt in one group:
        paradec's continuous batching decodes at most `size` of them at once, and a finished sequence's slot goes to
        the next prompt (until 2026-12-02: groups of `size`, each a batch of its own, whose slots emptied as its
        answers ended)."""
        if not by_category:
            return [list(range(len(self.prompts)))]
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(self.prompts):
            groups.setdefault(prompt.category, []).append(i)
        return [idx[s : s + size] for idx in groups.values() for s in range(0, len(idx), size)]

    def _peer_batch_sizes(self, peer: str) -> tuple[int, ...]:
        return self.plan.batch_sizes if peer in BATCHED_PEERS else (1,)

    def _peer_generations(self, size: int) -> int:
        """Timed `generate` calls per repeat at batch size `size`: one per turn of each batch's longest prompt."""
        return sum(max(self.turn_counts[index] for index in group) for group in self._batches(size))

    def _method_ticks(self, size: int = 1) -> int:
        if size == 1 or self.plan.samples > 1:
            return 1 + sum(self.turn_counts) * (self.plan.warmup + self.plan.repeats)
        return 1 + self._batched_turns(size) * (self.plan.warmup + self.plan.repeats)

    def _batched_turns(self, size: int) -> int:
        return sum(max(self.turn_counts[index] for index in group) for group in self._batches(size, by_category=False))

    def _total(self) -> int:
        plan = self.plan
        total = len(plan.methods) * sum(self._method_ticks(size) for size in plan.batch_sizes)
        if self._drift_checked():
            for size in plan.batch_sizes:  # vanilla re-timed
                total += sum(self.turn_counts) if size == 1 else self._batched_turns(size) * plan.repeats
        for peer in plan.peers:
            for size in self._peer_batch_sizes(peer):
                total += plan.warmup + self._peer_generations(size) * plan.repeats
        return total

    # --- timing ---------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        device = self.engine.target.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self._sync()
        started = time.perf_counter()
        out = fn()
        self._sync()
        return out, time.perf_counter() - started

    def _tick(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    # --- running --------------------------------------------------------------------------------------------
    def run(self) -> None:
        # redraw at most every 30 s into a log file (a device run's output), continuously on a terminal
        interval = 0.1 if sys.stderr.isatty() else 30.0
        with tqdm(
            total=self._total(), unit="gen", disable=not self._progress, file=sys.stderr, mininterval=interval
        ) as bar:
            self._bar = bar
            for size in self.plan.batch_sizes:
                for method in self.plan.methods:
                    if self.plan.samples > 1:
                        bar.set_description(f"{method}@n{self.plan.samples}")
                        self._guarded(self._outcome(method, "paradec", self.plan.samples), self._run_samples)
                        continue
                    bar.set_description(method if size == 1 else f"{method}@bs{size}")
                    run = self._run_method if size == 1 else self._run_batched
                    self._guarded(self._outcome(method, "paradec", size), run)
                if self._drift_checked():
                    bar.set_description("vanilla again" if size == 1 else f"vanilla@bs{size} again")
                    self._retime_vanilla() if size == 1 else self._retime_batched(size)
            peers = self._make_peers() if self.plan.peers else None
            for peer in self.plan.peers:
                for size in self._peer_batch_sizes(peer):
                    bar.set_description(peer if size == 1 else f"{peer}@bs{size}")
                    outcome = self._outcome(peer, "peer", size)
                    reason = peers.unavailable(peer)
                    if reason:
                        self._skip(outcome, reason)
                        self._tick(self.plan.warmup + self._peer_generations(size) * self.plan.repeats)
                        continue
                    self._guarded(outcome, lambda o, peers=peers: self._run_peer(o, peers))
        self._bar = None
        self.referee()

    def referee(self) -> None:
        """Rule on every greedy mismatch of a lossless method: a near-tie of the two tokens (rounding) or not.
        See `paradec.bench.referee`. On an exact target (`paradec.kernels`) there is nothing to rule: its forwards
        round the same whatever they score, so every difference is a failure."""
        if self.engine.config.exact:
            return
        judge = None
        for record in self._lossless_mismatches():
            out = record.token_ids if record.mismatch_ids is None else record.mismatch_ids
            i = record.first_mismatch
            reference = self.vanilla_tokens[record.mismatch_prompt or record.prompt_ids[0]]
            if out is None or i is None or i >= min(len(out), len(reference)):
                continue  # a repeat differed but not the kept output, or one output stopped early: no token to rule on
            judge = judge or Referee(self.engine)
            context = (
                self.vanilla_prompts[record.mismatch_prompt or record.prompt_ids[0]] + reference[:i]
            )  # the row's context too (compared)
            try:
                ruling = judge.rule(context, reference[i], out[i])
            except Exception as exc:  # no ruling: the mismatch stays a failure, and the results are still written
                tqdm.write(
                    f"paradec bench: the exactness referee could not run: {type(exc).__name__}: {exc}", file=sys.stderr
                )
                return
            record.ruling = {**dataclasses.asdict(ruling), "near_tie": ruling.near_tie, "text": ruling.text()}

    def _outcome(self, method: str, kind: str, batch_size: int) -> Outcome:
        outcome = Outcome(method=method, kind=kind, batch_size=batch_size)
        if kind == "paradec":
            outcome.lossy = get_drafter(method).lossy
            outcome.options = _options_dict(self.plan.options.get(method))
        self.outcomes.append(outcome)
        return outcome

    def _skip(self, outcome: Outcome, reason: str) -> None:
        outcome.status, outcome.reason = "skipped", reason
        tqdm.write(f"paradec bench: skipping {outcome.method}: {reason}", file=sys.stderr)

    def _guarded(self, outcome: Outcome, body: Callable[[Outcome], None]) -> None:
        """Run one row; a crash in one method must not cost the other rows of a long device run: it is
        recorded as failed (and makes the command exit non-zero) and the benchmark goes on."""
        try:
            body(outcome)
        except ParadecError:
            raise
        except Exception as exc:
            tqdm.write(traceback.format_exc(), file=sys.stderr)
            outcome.status, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
            self.records = [
                r for r in self.records if not (r.method == outcome.method and r.batch_size == outcome.batch_size)
            ]
            self.not_compared = [
                n for n in self.not_compared if (n["method"], n["batch_size"]) != (outcome.method, outcome.batch_size)
            ]
            tqdm.write(f"paradec bench: {outcome.method} FAILED: {outcome.reason}", file=sys.stderr)
        if self.checkpoint is not None:
            self.checkpoint(self)

    def _request(self, method: str, index: int, prompt_ids: list[int], max_new_tokens: int, n: int = 1):
        """The checked request (built outside the timed call); its options are the engine's defaults."""
        return self.engine.request(
            prompt_ids, method=method, sampling=self._sampling(index), max_new_tokens=max_new_tokens, n=n
        )

    def _probe(self, outcome: Outcome) -> bool:
        """Does the row's method run with this engine (draft model, heads, runner kind; at a batch size above 1, in
        a batch)? A 1-token generation says; a method that cannot is skipped (an error when the user named it)."""
        method, plan, engine, size = outcome.method, self.plan, self.engine, outcome.batch_size
        try:
            # the --opt METHOD.NAME=VALUE options become the engine's for the method, its settings included
            engine.set_default_options(method, plan.options.get(method))
            probe = self._request(method, 0, self.prompt_tokens[0], 1)
            if size == 1:
                engine.generate(probe)
            elif plan.samples > 1:  # n samples of one request: batched where the runner and the method can
                engine.generate(self._request(method, 0, self.prompt_tokens[0], 1, n=size))
            else:
                engine.batch_decoder(size)  # refuses an engine that cannot batch (the generic HF runner)
                engine.generate_batch([probe], max_batch=size)  # ... and a method that cannot
        except ParadecError as exc:
            if plan.explicit and (size == 1 or plan.samples > 1):
                raise
            self._skip(outcome, str(exc))
            self._tick(self._method_ticks(size))
            return False
        self._tick()
        return True

    def _run_batched(self, outcome: Outcome) -> None:
        """One method at batch size > 1: each batch of prompts (`_batches`) decoded together by
        `Engine.generate_batch` (continuous batching, at most `size` sequences per step), one record per batch.
        Its outputs are compared with vanilla's alone: a batch must not change what a sequence emits."""
        method, size = outcome.method, outcome.batch_size
        if not self._probe(outcome):
            return
        for _ in range(self.plan.warmup):
            for group in self._batches(size, by_category=False):
                self._converse(group, self._batched_ask(method, size, timed=False))
        self._forget(method)
        for group in self._batches(size, by_category=False):
            self._converse(group, self._batched_ask(method, size, timed=True))

    def _batched_ask(self, method: str, size: int, *, timed: bool, sink: list[RunRecord] | None = None):
        """`_converse`'s asker for a batched row: every asked context decoded by `Engine.generate_batch` (at most
        `size` at once); `timed`: `repeats` times, one record per turn, appended to `records` and compared with
        vanilla alone, or with `sink` appended there only (the re-timing of `_retime_batched`)."""
        plan, engine = self.plan, self.engine

        def run(turn: int, asked: list[int], contexts: list[list[int]]) -> list[list[int]]:
            requests = [self._request(method, index, ids, plan.max_new_tokens) for index, ids in zip(asked, contexts)]
            runs, walls, counts = [], [], []
            for _ in self._repeats(method, plan.repeats if timed else 1):
                results, wall = self._timed(lambda: engine.generate_batch(requests, max_batch=size))
                runs.append(results)
                walls.append(wall)
                counts.append(engine.last_batch_counts)
                self._tick()
            first = runs[0]
            if not timed:
                return [r.token_ids for r in first]
            categories = {self.prompts[i].category for i in asked}
            category = categories.pop() if len(categories) == 1 else MIXED
            prompt_ids = [turn_id(self.prompts[i].id, turn) for i in asked]
            record = _summed_record(method, category, prompt_ids, first, walls, size)
            if counts[0] is not None:
                # the steps of the repeat whose time is the row's (the median; the lower middle one of an even count)
                median = sorted(range(len(walls)), key=walls.__getitem__)[(len(walls) - 1) // 2]
                record.batch_steps = dataclasses.asdict(counts[median])
            if sink is None:
                self._remember_vanilla(record, contexts, [r.token_ids for r in first])
                self._compare(record, contexts, [r.token_ids for r in first])
            (self.records if sink is None else sink).append(record)
            return [r.token_ids for r in first]

        return run

    def _run_samples(self, outcome: Outcome) -> None:
        """One method with n samples per prompt (`--samples`): each prompt is one request of n
        (`Engine.generate(n=...)`, its samples decoded together as one batch on the native runner, sample i seeded
        from the prompt's seed + i), one record per prompt summing its samples. The speedup is against vanilla's
        n samples of the same prompts; in greedy mode every sample must equal vanilla's (the first one's)."""
        method, n, plan, engine = outcome.method, outcome.batch_size, self.plan, self.engine
        if not self._probe(outcome):
            return
        for _ in range(plan.warmup):
            for index, prompt_ids in enumerate(self.prompt_tokens):
                engine.generate(self._request(method, index, prompt_ids, plan.max_new_tokens, n=n))
                self._tick()
        self._forget(method)
        for index, prompt_ids in enumerate(self.prompt_tokens):
            checked = self._request(method, index, prompt_ids, plan.max_new_tokens, n=n)
            runs, walls = [], []
            for _ in self._repeats(method, plan.repeats):
                results, wall = self._timed(lambda checked=checked: engine.generate(checked))
                runs.append(results)
                walls.append(wall)
                self._tick()
            first = runs[0]
            pid = self.prompts[index].id
            record = _summed_record(method, self.prompts[index].category, [pid], first, walls, n)
            record.sample_token_ids = [list(r.token_ids) for r in first]  # what an offline replay needs
            self._remember_vanilla(record, [prompt_ids], [first[0].token_ids])
            self._compare(record, [prompt_ids], [r.token_ids for results in runs for r in results])
            self.records.append(record)

    def _drift_checked(self) -> bool:
        plan = self.plan
        return plan.drift and plan.samples == 1 and "vanilla" in plan.methods and len(plan.methods) > 1

    def _retime_vanilla(self) -> None:
        """Time vanilla once more on every context it answered, after the other methods: how far the card's speed
        moved during the run (clocks, heat, a neighbour), which every ratio of the run carries. No warm-up: its
        shapes are compiled and captured already."""
        first = [r for r in self.records if r.method == "vanilla" and r.batch_size == 1]
        if not first:
            return
        index_of = {p.id: i for i, p in enumerate(self.prompts)}
        again, tokens = 0.0, 0
        for record in first:
            pid = record.prompt_ids[0]
            index = index_of[pid.split("/turn-")[0]]
            checked = self._request("vanilla", index, self.vanilla_prompts[pid], self.plan.max_new_tokens)
            result, wall = self._timed(lambda checked=checked: self.engine.generate(checked))
            again += wall
            tokens += result.stats.new_tokens
            self._tick()
        first_seconds = sum(r.wall_seconds for r in first)
        first_tokens = sum(r.new_tokens for r in first)
        # seconds per token, again / first: 1.10 means vanilla ran 10% slower at the end than at the start
        ratio = (again / tokens) / (first_seconds / first_tokens) if tokens and first_tokens else None
        self.drift = {"first_seconds": first_seconds, "again_seconds": again, "tokens": tokens, "ratio": ratio}
        if ratio is not None and abs(ratio - 1) > DRIFT_WARN:
            tqdm.write(
                f"paradec bench: vanilla re-timed after the other methods took {ratio:.2f}x its first time per "
                "token: the card's speed moved during the run, and every ratio carries that",
                file=sys.stderr,
            )

    def _retime_batched(self, size: int) -> None:
        """Vanilla's batched row timed once more, after the other methods of its batch size (no warm-up: its steps
        are compiled and captured), as `_retime_vanilla` does at batch size 1. Its records keep the faster of the
        two passes, so that no method's speedup at this size stands on a slow first pass of vanilla: on 2026-12-03
        (H200) vanilla's rows at batch 32 and 64 took twice as long as the same rows of an earlier run, each the
        first row of its size, and pld's and suffix's ratios against them were 1.4-1.9x."""
        first = [r for r in self.records if r.method == "vanilla" and r.batch_size == size]
        if not first:
            return
        again: list[RunRecord] = []
        for group in self._batches(size, by_category=False):
            self._converse(group, self._batched_ask("vanilla", size, timed=True, sink=again))
        first_seconds, again_seconds = sum(r.wall_seconds for r in first), sum(r.wall_seconds for r in again)
        tokens = sum(r.new_tokens for r in again)
        first_tokens = sum(r.new_tokens for r in first)
        ratio = (again_seconds / tokens) / (first_seconds / first_tokens) if tokens and first_tokens else None
        self.batched_drift[size] = {
            "first_seconds": first_seconds, "again_seconds": again_seconds, "tokens": tokens, "ratio": ratio,
        }  # fmt: skip
        if ratio is not None and ratio < 1:  # the faster pass is the reference of this size's ratios
            for record, later in zip(first, again, strict=True):
                record.wall_seconds = min(record.wall_seconds, later.wall_seconds)
        if ratio is not None and abs(ratio - 1) > DRIFT_WARN:
            tqdm.write(
                f"paradec bench: vanilla@bs{size} re-timed after the other methods took {ratio:.2f}x its first time "
                "per token" + ("; its faster pass is this size's reference" if ratio < 1 else ""),
                file=sys.stderr,
            )

    def _forget(self, method: str) -> None:
        """Before a timed pass: the method forgets the warm-up's text (`Method.forget`), which holds the very answers
        the timed pass is about to write (the suffix method's trie of earlier outputs would replay them). What
        the timed pass's earlier prompts wrote stays, as a server's earlier requests would."""
        self.engine.method(method).forget()

    def _repeats(self, method: str, count: int) -> Iterator[int]:
        """`range(count)` for the repeats of one timed generation; before each repeat but the first the method
        forgets what the one before taught it (`Method.rewind`): the suffix method's trie of earlier outputs would
        replay the answer it is timing (m15: suffix at 4.25x vanilla with 3 repeats, where 1 repeat gave 1.20x).
        The last repeat's text stays, as the first one's would."""
        learned = self.engine.method(method)
        mark = learned.mark()
        for repeat in range(count):
            if repeat:
                learned.rewind(mark)
            yield repeat

    def _remember_vanilla(self, record: RunRecord, contexts: list[list[int]], outputs: list[list[int]]) -> None:
        """Vanilla's outputs are the reference of every comparison: alone (batch size 1) when it ran so, else from
        its first batched row."""
        if record.method != "vanilla":
            return
        for pid, ids, out in zip(record.prompt_ids, contexts, outputs):
            if record.batch_size == 1 or pid not in self.vanilla_tokens:
                self.vanilla_tokens[pid] = out
                self.vanilla_prompts[pid] = ids

    def _run_method(self, outcome: Outcome) -> None:
        method, plan, engine = outcome.method, self.plan, self.engine
        request = partial(self._request, method)
        if not self._probe(outcome):
            return

        def untimed(turn: int, asked: list[int], contexts: list[list[int]]) -> list[list[int]]:
            (index,), (prompt_ids,) = asked, contexts
            result = engine.generate(request(index, prompt_ids, plan.max_new_tokens))
            self._tick()
            return [result.token_ids]

        def timed(turn: int, asked: list[int], contexts: list[list[int]]) -> list[list[int]]:
            (index,), (prompt_ids,) = asked, contexts
            checked = request(index, prompt_ids, plan.max_new_tokens)
            results, walls = [], []
            for _ in self._repeats(method, plan.repeats):
                result, wall = self._timed(lambda: engine.generate(checked))
                results.append(result)
                walls.append(wall)
                self._tick()
            stats = results[0].stats
            record = RunRecord(
                method=method,
                category=self.prompts[index].category,
                prompt_ids=[turn_id(self.prompts[index].id, turn)],
                new_tokens=stats.new_tokens,
                wall_seconds=statistics.median(walls),
                steps=stats.steps,
                proposed_tokens=stats.proposed_tokens,
                accepted_tokens=stats.accepted_tokens,
                accepted_at=list(stats.accepted_at),
                proposed_at=list(stats.proposed_at),
                prefill_seconds=statistics.median(r.stats.prefill_seconds for r in results),
                finish_reason=results[0].finish_reason,
                token_ids=list(results[0].token_ids),
            )
            if method == "vanilla":
                self._remember_vanilla(record, contexts, [record.token_ids])
            else:
                self._compare(record, contexts, [r.token_ids for r in results])
            self.records.append(record)
            return [record.token_ids]

        for _ in range(plan.warmup):
            for index in range(len(self.prompts)):
                self._converse([index], untimed)
        self._forget(method)
        for index in range(len(self.prompts)):
            self._converse([index], timed)

    def _compare(self, record: RunRecord, contexts: list[list[int]], outputs: list[list[int]]) -> None:
        """Greedy mode (vanilla alone excepted, the reference itself): does every output (every repeat, every row of a batch) equal vanilla's? `contexts` are the
        record's prompt ids per prompt: a later turn whose context differs from vanilla's is not compared."""
        if record.method == "vanilla" and record.batch_size == 1:
            return
        if not self.plan.sampling.greedy or not set(record.prompt_ids) <= set(self.vanilla_tokens):
            return
        differing = [pid for pid, ids in zip(record.prompt_ids, contexts) if ids != self.vanilla_prompts[pid]]
        if differing:
            self.not_compared += [
                {"method": record.method, "batch_size": record.batch_size, "prompt": pid} for pid in differing
            ]
            return
        references = [self.vanilla_tokens[pid] for pid in record.prompt_ids]
        if len(record.prompt_ids) == 1:
            references = references * len(outputs)
        record.equals_vanilla = all(out == ref for out, ref in zip(outputs, references))
        prompts = record.prompt_ids * len(outputs) if len(record.prompt_ids) == 1 else record.prompt_ids
        for pid, out, ref in zip(prompts, outputs, references):
            if out != ref:  # the first differing row (a repeat, or a prompt of the batch) and its first token
                record.first_mismatch, record.mismatch_prompt = first_mismatch(out, ref), pid
                record.mismatch_ids = list(out)  # what the referee rules on
                break

    def _make_peers(self) -> HFPeers:
        draft = self.plan.options.get("draft") or parse_options(get_drafter("draft"), None)
        pld = self.plan.options.get("pld") or parse_options(get_drafter("pld"), None)
        return HFPeers(self.engine, draft_k=draft.k, pld_tokens=pld.num_draft_tokens, pld_max_ngram=pld.max_ngram)

    def _run_peer(self, outcome: Outcome, peers: HFPeers) -> None:
        peer, size, plan = outcome.method, outcome.batch_size, self.plan
        outcome.options = peers.settings(peer)
        batches = self._batches(size)
        for _ in range(plan.warmup):  # eager Hugging Face code compiles nothing per shape: the first batch will do
            rows = [self.prompt_tokens[i] for i in batches[0]]
            peers.generate(peer, rows, self._sampling(batches[0][0]), plan.max_new_tokens)
            self._tick()

        def timed(turn: int, asked: list[int], contexts: list[list[int]]) -> list[list[int]]:
            runs, walls = [], []
            for _ in range(plan.repeats):
                (outputs, forwards), wall = self._timed(
                    lambda: peers.generate(peer, contexts, self._sampling(asked[0]), plan.max_new_tokens)
                )
                runs.append(outputs)
                walls.append(wall)
                self._tick()
            first = runs[0]
            record = RunRecord(
                method=peer,
                category=self.prompts[asked[0]].category,
                prompt_ids=[turn_id(self.prompts[i].id, turn) for i in asked],
                new_tokens=sum(len(out) for out in first),
                wall_seconds=statistics.median(walls),
                batch_size=size,
                steps=forwards if size == 1 else None,
                finish_reason="stop" if all(len(out) < plan.max_new_tokens for out in first) else "length",
                token_ids=first[0] if size == 1 else None,
            )
            self._compare(record, contexts, [out[0] for out in runs] if len(asked) == 1 else first)
            self.records.append(record)
            return first

        for group in batches:
            self._converse(group, timed)

    # --- results --------------------------------------------------------------------------------------------
    def _lossless_mismatches(self) -> list[RunRecord]:
        lossless = {o.method for o in self.outcomes if o.kind == "paradec" and not o.lossy}
        return [r for r in self.records if r.method in lossless and r.equals_vanilla is False]

    def mismatches(self) -> list[RunRecord]:
        """Records of lossless paradec methods whose greedy output differs from vanilla's, near-ties excepted."""
        return [r for r in self._lossless_mismatches() if not (r.ruling and r.ruling["near_tie"])]

    def near_ties(self) -> list[RunRecord]:
        """Records whose greedy output differs from vanilla's first at a near-tie the referee put down to rounding."""
        return [r for r in self._lossless_mismatches() if r.ruling and r.ruling["near_tie"]]

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]
