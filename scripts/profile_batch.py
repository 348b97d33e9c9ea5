"""Where a batched decode step's time goes (not a test): B chat prompts decoded together by `Engine.batch_decoder`,
one warm-up pass to its end (compiles, captures the graphs), then a second pass whose first `--steps` decode steps
(after the prompts' prefill) run under torch.profiler. Reports the step's wall ms (also unprofiled), the device time
by kernel (the top `--top`), the share of the step the device was busy, the host's ops and runtime calls by their
own CPU time (what the device's idle gaps are made of) and, from the same steps run again under cProfile, the Python
functions by their own time, and the host's wall time per phase of a step (propose, forward, verify, commit,
advance, land; no synchronisation added, so the phase that waits for the device shows its share), for each `--exact`
setting asked. `--speculate always` profiles speculative steps only (the policy would mostly turn them off on chat);
`--out DIR` writes profile-batch.json.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 scripts/profile_batch.py --model qwen2.5-coder-1.5b-instruct \
        --batch 32 --exact both --out $OUT/profile-batch
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import paradec
from paradec.bench.prompts import get_suite, load_prompts


def prompts_of(engine, count: int) -> list[list[int]]:
    """The first `count` chat-suite prompts (cycled), rendered by the model's chat template (as plain text for a
    model without one: the committed default)."""
    records = load_prompts(get_suite("chat").prompts_path())
    texts = [records[i % len(records)].turns[0] for i in range(count)]
    if engine.tokenizer.chat_template is None:
        return [engine.encode(text) for text in texts]
    return [engine.encode_chat([{"role": "user", "content": text}]) for text in texts]


class Phases:
    """Host wall time per phase of a decode step (no synchronisation added: a phase that waits for the device, the
    verdicts' host copy, shows the device's share there). Wraps the decoder's phases on the instance."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.wrapped: list[tuple[object, str, object]] = []  # (owner, name, what it had before)

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        inner = getattr(owner, name)
        label = label or name
        self.wrapped.append((owner, name, inner))

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, name, timed)

    def attach(self, decoder) -> None:
        import paradec.batch as batch_module

        for name in ("_verify", "_advance", "_land", "_launch_plain"):
            self.wrap(decoder, name)
        self.wrap(decoder.runner, "forward", "runner.forward")
        self.wrap(decoder.runner, "commit", "runner.commit")  # (the runner outlives the decoder: detach)
        self.wrap(batch_module, "_propose")

    def detach(self) -> None:
        for owner, name, before in reversed(self.wrapped):
            setattr(owner, name, before)
        for owner, name, _ in self.wrapped:  # an instance's own attribute would shadow its class's method for good
            if not isinstance(owner, type(time)) and name in vars(owner):
                delattr(owner, name)
        self.wrapped.clear()

    def rows(self, steps: int) -> list[dict]:
        return [
            {"phase": k, "calls": self.calls[k], "ms_per_step": 1e3 * v / max(steps, 1)}
            for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        ]


def run(
    engine,
    prompts: list[list[int]],
    method: str,
    new_tokens: int,
    steps: int | None = None,
    profiler=None,
    speculate: str = "auto",
    phases: Phases | None = None,
):
    """Decode the prompts as one batch; with `steps`, stop after that many decode steps, timed (and profiled under
    `profiler`, a context manager; phases timed by `phases`) once every prompt is prefilled. Returns (steps,
    seconds, the decoder's step counts over the timed steps, the mean inputs of a timed step)."""
    decoder = engine.batch_decoder(len(prompts), speculate=speculate)
    items = [decoder.submit(engine.request(p, method=method, max_new_tokens=new_tokens)) for p in prompts]
    while steps is not None and not all(item.prefilled or item.done for item in items):
        decoder.step()  # the prompts' prefill: not a decode step
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if phases is not None:
        phases.attach(decoder)
    steps_before, inputs_before = decoder.counts.steps, sum(decoder.step_inputs)
    done, started = 0, time.perf_counter()
    with profiler if profiler is not None else contextlib.nullcontext():
        while not all(item.done for item in items) and (steps is None or done < steps):
            decoder.step()
            done += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if phases is not None:
        phases.detach()
    landed = decoder.counts.steps - steps_before
    counts = dict(vars(decoder.counts))
    mean_inputs = (sum(decoder.step_inputs) - inputs_before) / max(landed, 1)
    for item in items:
        if not item.done:
            decoder.cancel(item)
    for _ in decoder.run(items):
        pass
    return done, seconds, counts, mean_inputs


def measure(
    model: str,
    exact: bool,
    batch: int,
    method: str,
    new_tokens: int,
    steps: int,
    top: int,
    device: str,
    speculate: str = "auto",
):
    engine = paradec.load(model, device=device, exact=exact)
    prompts = prompts_of(engine, batch)
    # warm-up: every bucket the pass meets is compiled and captured
    run(engine, prompts, method, new_tokens, speculate=speculate)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    done, seconds, _, _ = run(engine, prompts, method, new_tokens, steps, profiler=prof, speculate=speculate)
    # the same steps again under cProfile: which Python functions the host's time is spent in (without the
    # torch profiler's own cost; cProfile's is paid here instead, so read its shares, not its absolute times)
    python = cProfile.Profile()
    run(engine, prompts, method, new_tokens, steps, profiler=python, speculate=speculate)
    # no profiler at all; then the host's phases timed (perf_counter around each: cheap, no sync added)
    plain_steps, plain_seconds, counts, mean_inputs = run(
        engine, prompts, method, new_tokens, steps, speculate=speculate
    )
    phases = Phases()
    phased_steps, phased_seconds, _, _ = run(
        engine, prompts, method, new_tokens, steps, speculate=speculate, phases=phases
    )
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(top)
    events = prof.key_averages()
    key = "device_time_total" if cuda else "cpu_time_total"
    # on a GPU the kernels themselves (the ops that launch them would count their time again); on the CPU the ops
    rows = [e for e in events if e.device_type.name == "CUDA"] if cuda else list(events)
    kernels = sorted(rows, key=lambda e: getattr(e, key, 0.0), reverse=True)
    device_us = sum(getattr(e, key, 0.0) for e in rows) if cuda else 0
    # the host's side: ops and runtime calls by their own CPU time (on a GPU: launches, copies, the one sync, and
    # the Python between them, which the kernels' gaps are made of)
    host = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "exact": exact,
        "batch": batch,
        "method": method,
        "steps": done,
        "step_ms": 1e3 * seconds / max(done, 1),
        "speculate": speculate,
        "step_ms_unprofiled": 1e3 * plain_seconds / max(plain_steps, 1),
        "counts_unprofiled": counts,
        "mean_inputs_unprofiled": mean_inputs,
        "step_ms_phased": 1e3 * phased_seconds / max(phased_steps, 1),
        "phases": phases.rows(phased_steps),
        "device_busy_share": (device_us / 1e6) / seconds if cuda and seconds else None,
        "top": [
            {"name": e.key[:120], "calls": e.count, "ms_per_step": getattr(e, key, 0.0) / 1e3 / max(done, 1)}
            for e in kernels[:top]
        ],
        "python_top": text.getvalue(),
        "host_top": [
            {"name": e.key[:120], "calls": e.count, "self_ms_per_step": e.self_cpu_time_total / 1e3 / max(done, 1)}
            for e in host[:top]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--exact", choices=["on", "off", "both"], default="both")
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="profiled steps of the second pass")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--speculate", choices=["auto", "always", "never"], default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.exact]
    results = []
    for exact in settings:
        entry = measure(
            args.model, exact, args.batch, args.method, args.new_tokens, args.steps, args.top, args.device,
            args.speculate,
        )  # fmt: skip
        results.append(entry)
        busy = entry["device_busy_share"]
        print(f"exact={exact} batch {args.batch}: {entry['step_ms']:.2f} ms/step over {entry['steps']} steps"
              f" ({entry['step_ms_unprofiled']:.2f} unprofiled)"
              + ("" if busy is None else f", device busy {100 * busy:.0f}%"), flush=True)  # fmt: skip
        print(f"  unprofiled: {entry['counts_unprofiled']}, {entry['mean_inputs_unprofiled']:.1f} inputs a step",
              flush=True)  # fmt: skip
        print(f"  host phases ({entry['step_ms_phased']:.2f} ms/step with their timers):", flush=True)
        for row in entry["phases"]:
            print(f"  {row['ms_per_step']:8.3f} ms/step  x{row['calls']:<6} {row['phase']}", flush=True)
        for row in entry["top"]:
            print(f"  {row['ms_per_step']:8.3f} ms/step  x{row['calls']:<6} {row['name']}", flush=True)
        print("  host, by own CPU time:", flush=True)
        for row in entry["host_top"]:
            print(f"  {row['self_ms_per_step']:8.3f} ms/step  x{row['calls']:<6} {row['name']}", flush=True)
        print("  host, Python functions by own time (cProfile, the same steps again):", flush=True)
        print(entry["python_top"], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile-batch.json").write_text(json.dumps({"model": args.model, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
