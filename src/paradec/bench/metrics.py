"""Benchmark arithmetic: timed runs in, per-method summaries out.

A `RunRecord` is one timed generation (batch size 1), or one batch of generations (HF peers at batch size > 1).
`summarize` aggregates the records of one method over a set of prompts, against our own vanilla's records for
the same prompts:

- tokens/s   total new tokens / total wall seconds;
- speedup    vanilla seconds per token / method seconds per token, over the same prompts (ratio of sums). In
             greedy mode outputs equal vanilla's, so this is plain vanilla time / method time; counting per token
             keeps it fair in sample mode, where outputs (and their lengths) differ;
- speedup_mean  the mean of the same ratio per prompt (batch size 1 only);
- τ (tau)    total new tokens / total steps (target forwards), i.e. Spec-Bench's mean accepted tokens;
- acceptance by position i   share of steps whose accepted path reached draft position i (summed over prompts).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunRecord:
    method: str
    category: str
    prompt_ids: list[str]  # the prompts of this run (one unless batch_size > 1)
    new_tokens: int  # over all prompts of the run
    wall_seconds: float  # median over repeats, synchronised
    batch_size: int = 1
    steps: int | None = None  # target forwards after the prefill (None: not observable)
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [i] = steps that accepted draft position i
    proposed_at: list[int] = field(default_factory=list)  # [i] = steps that proposed a draft position i
    prefill_seconds: float | None = None
    finish_reason: str = ""
    token_ids: list[int] | None = None  # new tokens (batch size 1)
    sample_token_ids: list[list[int]] | None = None  # each sample's new tokens (`--samples`: one request of n)
    equals_vanilla: bool | None = None  # greedy mode only
    first_mismatch: int | None = None  # index of the first new token that differs from vanilla's
    mismatch_prompt: str | None = None  # the prompt of that token (the first differing one of a batch)
    mismatch_ids: list[int] | None = None  # the new tokens of that differing output (a repeat's, a batch row's)
    ruling: dict | None = None  # the referee's view of that token (`paradec.bench.referee.Ruling`, near_tie added)
    batch_steps: dict | None = None  # a batched run's decode steps by kind (`paradec.batch.StepCounts`), timed pass


@dataclass
class Summary:
    method: str
    batch_size: int
    prompts: int
    new_tokens: int
    wall_seconds: float
    tokens_per_second: float
    speedup: float | None  # ratio of sums (None when there is no vanilla to compare with)
    speedup_mean: float | None  # mean of per-prompt ratios (batch size 1 only)
    steps: int | None
    tau: float | None
    acceptance_by_position: list[float]
    acceptance_rate: float | None  # accepted / proposed draft tokens
    matches: int | None  # runs whose output equals vanilla's (greedy mode)
    compared: int | None
    near_ties: int = 0  # runs that differ first at a near-tie the referee put down to rounding


def seconds_per_token(records: list[RunRecord]) -> float:
    tokens = sum(r.new_tokens for r in records)
    return sum(r.wall_seconds for r in records) / tokens if tokens else 0.0


def tokens_per_second(records: list[RunRecord]) -> float:
    seconds = sum(r.wall_seconds for r in records)
    return sum(r.new_tokens for r in records) / seconds if seconds > 0 else 0.0


def _ratio(baseline: float, value: float) -> float | None:
    return baseline / value if baseline > 0 and value > 0 else None


def acceptance_by_position(records: list[RunRecord]) -> list[float]:
    """[i] = share of all steps that accepted draft position i, for every position ever proposed."""
    steps = sum(r.steps or 0 for r in records)
    if not steps:
        return []
    depth = max((max(len(r.accepted_at), len(r.proposed_at)) for r in records), default=0)
    totals = [sum(r.accepted_at[i] for r in records if i < len(r.accepted_at)) for i in range(depth)]
    return [t / steps for t in totals]


def vanilla_key(record: RunRecord) -> str | tuple[str, ...]:
    """What a record is compared with vanilla's under: its prompt id alone, or a batch's prompt ids together."""
    return record.prompt_ids[0] if record.batch_size == 1 else tuple(record.prompt_ids)


def _baseline(record: RunRecord, vanilla: dict) -> list[RunRecord] | None:
    """Our vanilla's records covering `record`: at its batch size (the same prompts batched the same way) when
    vanilla ran so, else alone, prompt by prompt (None: not every prompt has one)."""
    key = vanilla_key(record)
    if key in vanilla:
        return [vanilla[key]]
    if record.batch_size > 1 and all(pid in vanilla for pid in record.prompt_ids):
        return [vanilla[pid] for pid in record.prompt_ids]
    return None


def summarize(records: list[RunRecord], vanilla: dict | None) -> Summary:
    """Aggregate the records of one method (one batch size). `vanilla` maps `vanilla_key` -> our vanilla's record:
    prompt ids to its records alone, and batches (tuples of prompt ids) to its batched records; a batched row is
    compared with vanilla at its own batch size where that ran, else with vanilla alone."""
    if not records:
        raise ValueError("summarize() needs at least one record")
    speedup = speedup_mean = None
    if vanilla:
        baselines = [_baseline(r, vanilla) for r in records]
        if all(b is not None for b in baselines):
            covered = [v for b in baselines for v in b]
            speedup = _ratio(seconds_per_token(covered), seconds_per_token(records))
            if all(r.batch_size == 1 for r in records):
                ratios = [
                    _ratio(seconds_per_token([vanilla[r.prompt_ids[0]]]), seconds_per_token([r])) for r in records
                ]
                speedup_mean = None if None in ratios else sum(ratios) / len(ratios)
    observed = all(r.steps is not None for r in records)
    steps = sum(r.steps for r in records) if observed else None
    proposed = sum(r.proposed_tokens for r in records)
    compared = [r for r in records if r.equals_vanilla is not None]
    return Summary(
        method=records[0].method,
        batch_size=records[0].batch_size,
        prompts=sum(len(r.prompt_ids) for r in records),
        new_tokens=sum(r.new_tokens for r in records),
        wall_seconds=sum(r.wall_seconds for r in records),
        tokens_per_second=tokens_per_second(records),
        speedup=speedup,
        speedup_mean=speedup_mean,
        steps=steps,
        tau=sum(r.new_tokens for r in records) / steps if steps else None,
        acceptance_by_position=acceptance_by_position(records) if observed else [],
        acceptance_rate=sum(r.accepted_tokens for r in records) / proposed if observed and proposed else None,
        matches=sum(bool(r.equals_vanilla) for r in compared) if compared else None,
        compared=len(compared) if compared else None,
        near_ties=sum(bool(r.ruling and r.ruling["near_tie"]) for r in compared),
    )


def first_mismatch(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first position where the two token lists differ (None if they are equal)."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))
