"""Where a batched decode step's time goes (not a test): B chat prompts decoded together by `Engine.batch_decoder`,
one warm-up pass to its end (compiles, captures the graphs), then a second pass whose first `--steps` decode steps
(after the prompts' prefill) run under torch.profiler. Reports the step's wall ms (also unprofiled), the device time
by kernel (the top `--top`), the share of the step the device was busy, the host's ops and runtime calls by their
own CPU time (what the device's idle gaps are made of) and, from the same steps run again under cProfile, the Python
functions by their own time, for each `--exact` setting asked; `--out DIR` writes profile-batch.json.

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
    """The first `count` chat-suite prompts (cycled), rendered by the model's chat template."""
    records = load_prompts(get_suite("chat").prompts_path())
    return [engine.encode_chat([{"role": "user", "content": records[i % len(records)].turns[0]}]) for i in range(count)]


def run(engine, prompts: list[list[int]], method: str, new_tokens: int, steps: int | None = None, profiler=None):
    """Decode the prompts as one batch; with `steps`, stop after that many decode steps, timed (and profiled under
    `profiler`, a context manager) once every prompt is prefilled. Returns (steps, seconds)."""
    decoder = engine.batch_decoder(len(prompts))
    items = [decoder.submit(engine.request(p, method=method, max_new_tokens=new_tokens)) for p in prompts]
    while steps is not None and not all(item.prefilled or item.done for item in items):
        decoder.step()  # the prompts' prefill: not a decode step
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    with profiler if profiler is not None else contextlib.nullcontext():
        while not all(item.done for item in items) and (steps is None or done < steps):
            decoder.step()
            done += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    for item in items:
        if not item.done:
            decoder.cancel(item)
    for _ in decoder.run(items):
        pass
    return done, seconds


def measure(model: str, exact: bool, batch: int, method: str, new_tokens: int, steps: int, top: int, device: str):
    engine = paradec.load(model, device=device, exact=exact)
    prompts = prompts_of(engine, batch)
    run(engine, prompts, method, new_tokens)  # warm-up: every bucket the pass meets is compiled and captured
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    done, seconds = run(engine, prompts, method, new_tokens, steps, profiler=prof)
    # the same steps again under cProfile: which Python functions the host's time is spent in (without the
    # torch profiler's own cost; cProfile's is paid here instead, so read its shares, not its absolute times)
    python = cProfile.Profile()
    run(engine, prompts, method, new_tokens, steps, profiler=python)
    plain_steps, plain_seconds = run(engine, prompts, method, new_tokens, steps)  # no profiler at all
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
        "step_ms_unprofiled": 1e3 * plain_seconds / max(plain_steps, 1),
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.exact]
    results = []
    for exact in settings:
        entry = measure(args.model, exact, args.batch, args.method, args.new_tokens, args.steps, args.top, args.device)
        results.append(entry)
        busy = entry["device_busy_share"]
        print(f"exact={exact} batch {args.batch}: {entry['step_ms']:.2f} ms/step over {entry['steps']} steps"
              f" ({entry['step_ms_unprofiled']:.2f} unprofiled)"
              + ("" if busy is None else f", device busy {100 * busy:.0f}%"), flush=True)  # fmt: skip
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
