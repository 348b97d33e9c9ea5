"""Prometheus metrics of one server: a registry of its own (never the process-global one), served at /metrics.

Per generation (from the scheduler's `JobReport`, labelled by method): outcomes, prompt and generated tokens,
steps (target forwards), τ, draft tokens proposed and accepted in all and by draft position, latency from
submission to the last token, time to the first token, queue wait. A request of n > 1 choices is one generation
here: its choices' tokens, steps and draft counts summed (`worker.merge_stats`; τ is then their mean per step). Per
HTTP request: endpoint and the status it ended with (499 for a client that went away; a stream's error event's
status when it failed after its 200).
Live: queue depth and running generations. Per decode step of a batched server (`batching.StepReport`): the batch
size (sequences decoded together), the target inputs of the step's forward, and the tokens it emitted. Of a batched
server's decoder, read at each scrape (`watch_decoder`): its decode steps so far by kind (`paradec.batch.StepCounts`:
speculative, plain, overlapped, drained, and those that met a new CUDA graph bucket, with their seconds) and its
runner's CUDA graphs (captured, steps that replayed none, steps run eagerly past the bank's cap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from paradec.server.worker import JobReport

if TYPE_CHECKING:
    from paradec.server.batching import StepReport

CONTENT_TYPE = CONTENT_TYPE_LATEST

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_STEP_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TAU = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("method",)) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = _SECONDS) -> Histogram:
            return Histogram(name, doc, ("method",), buckets=buckets, registry=self.registry)

        self.requests = counter(
            "paradec_requests",
            "HTTP requests by endpoint and status, as they ended: 499 = the client went away before its answer; "
            "a stream that failed after its 200 counts under the status of the error event that ended it",
            ("endpoint", "status"),
        )
        self.generations = counter(
            "paradec_generations",
            "Generations by method and outcome (stop, length, disconnect, timeout, shutdown, invalid, error)",
            ("method", "outcome"),
        )
        self.prompt_tokens = counter("paradec_prompt_tokens", "Prompt tokens of started generations")
        self.generation_tokens = counter("paradec_generation_tokens", "Tokens generated")
        self.steps = counter("paradec_steps", "Decoding steps (one target forward each)")
        self.proposed = counter("paradec_draft_tokens_proposed", "Draft tokens scored by the target")
        self.accepted = counter("paradec_draft_tokens_accepted", "Draft tokens accepted")
        self.proposed_at = counter(
            "paradec_draft_position_proposed",
            "Steps that proposed draft position N (1 = first)",
            ("method", "position"),
        )
        self.accepted_at = counter(
            "paradec_draft_position_accepted",
            "Steps that accepted draft position N (1 = first)",
            ("method", "position"),
        )
        self.tau = histogram("paradec_tau", "Tokens per step of each finished generation", _TAU)
        self.latency = histogram("paradec_request_latency_seconds", "Submission to the last token")
        self.first_token = histogram("paradec_time_to_first_token_seconds", "Submission to the first token")
        self.queue_wait = histogram("paradec_queue_wait_seconds", "Submission to the start of the generation")
        self.batch_size = Histogram(
            "paradec_batch_size",
            "Sequences per decode step of the batched scheduler (one target forward for all of them)",
            buckets=_BATCH,
            registry=self.registry,
        )
        self.step_inputs = Histogram(
            "paradec_batch_step_inputs",
            "Target inputs per decode step of the batched scheduler: every sequence's pending token and draft tokens",
            buckets=_STEP_COUNTS,
            registry=self.registry,
        )
        self.step_tokens = Histogram(
            "paradec_batch_step_tokens",
            "Tokens emitted per decode step of the batched scheduler, all its sequences together "
            "(divided by paradec_batch_size: tokens per sequence per step)",
            buckets=_STEP_COUNTS,
            registry=self.registry,
        )
        Gauge("paradec_queue_depth", "Requests waiting for the engine", registry=self.registry).set_function(
            queue_depth
        )
        Gauge("paradec_running", "Generations running", registry=self.registry).set_function(running)

    STEP_KINDS = ("speculative", "capped", "plain", "overlapped", "drained", "captured")

    def watch_decoder(self, decoder) -> None:
        """Gauges read from a `BatchDecoder` at each scrape (see the module docstring); totals since the start, so a
        client takes differences (the load bench does, per round)."""
        steps = Gauge(
            "paradec_decode_steps_by_kind",
            "Decode steps of the batched decoder so far, by kind: speculative (proposals scored), capped (of those, "
            "cut to a depth), plain (no proposal), overlapped (of those, launched while the last was in flight), "
            "drained (a step in flight landed early for one with proposals), captured (met a new CUDA graph bucket: "
            "run eagerly the first time, captured the second)",
            ("kind",),
            registry=self.registry,
        )
        for kind in self.STEP_KINDS:
            steps.labels(kind).set_function(lambda kind=kind: getattr(decoder.counts, kind))
        choices = Gauge(
            "paradec_speculation_choices",
            "The speculation policy's choices so far: dropped (speculative steps run without their proposals: they "
            "would have met a new CUDA graph bucket too few steps had asked for), left_out (sequences of speculative "
            "steps that went without their proposals: their drafts did not pay), shadows (drafts made while "
            "speculation was off and decided by the tokens the target then emitted)",
            ("choice",),
            registry=self.registry,
        )
        for choice in ("dropped", "left_out", "shadows"):
            choices.labels(choice).set_function(lambda choice=choice: getattr(decoder.counts, choice))
        Gauge(
            "paradec_decode_new_bucket_seconds",
            "Seconds of the decode steps that met a new CUDA graph bucket (an eager first use or a capture)",
            registry=self.registry,
        ).set_function(lambda: decoder.counts.capture_seconds)
        graphs = Gauge(
            "paradec_batch_graphs",
            "CUDA graphs of the batched runner: captured (held), misses (steps that replayed none), uncaptured (of "
            "the misses, steps run eagerly because the bank was full)",
            ("state",),
            registry=self.registry,
        )
        runner = decoder.runner
        graphs.labels("captured").set_function(lambda: runner.graphs_captured)
        graphs.labels("misses").set_function(lambda: runner.graph_misses)
        graphs.labels("uncaptured").set_function(lambda: runner.graphs_uncaptured)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe(self, report: JobReport) -> None:
        method, stats = report.job.method, report.stats
        self.generations.labels(method, report.outcome).inc()
        if stats is None:
            return
        self.queue_wait.labels(method).observe(report.queue_seconds)
        self.prompt_tokens.labels(method).inc(stats.prompt_tokens)
        self.generation_tokens.labels(method).inc(report.new_tokens)
        self.steps.labels(method).inc(stats.steps)
        self.proposed.labels(method).inc(stats.proposed_tokens)
        self.accepted.labels(method).inc(stats.accepted_tokens)
        for i, count in enumerate(stats.proposed_at):
            self.proposed_at.labels(method, str(i + 1)).inc(count)
        for i, count in enumerate(stats.accepted_at):
            self.accepted_at.labels(method, str(i + 1)).inc(count)
        if stats.first_token_seconds:
            self.first_token.labels(method).observe(report.queue_seconds + stats.first_token_seconds)
        if report.outcome in ("stop", "length"):
            self.latency.labels(method).observe(report.total_seconds)
            if stats.steps:
                self.tau.labels(method).observe(report.new_tokens / stats.steps)

    def observe_step(self, step: StepReport) -> None:
        self.batch_size.observe(step.sequences)
        self.step_inputs.observe(step.inputs)
        self.step_tokens.observe(step.tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
