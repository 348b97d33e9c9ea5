"""The host cost of a batched decode step (not a test): B prompts decoded together by `Engine.batch_decoder` on the
CPU with the committed code model (`code-8m`, fp32), one warm-up pass, then measured passes. Per decode step it
times the whole `BatchDecoder.step` and the device work inside it (the target's forward, the verifier's argmax:
on a GPU both are queued kernels); the rest (proposing, building the step,
verifying, committing, emitting, updating the drafters) is the host work that sits between a step's one sync and
the next forward on a GPU. Reports, per method, host ms per step and per sequence per step; `--profile` adds
cProfile's top functions of the measured pass (by own time); `--ops` counts the tensor ops a step dispatches
outside the target's forward, by name: on a GPU each is a kernel launch or a small copy on the host's critical
path (the forward itself is one CUDA-graph replay there), which a CPU's timings do not show.

    .venv/bin/python scripts/profile_batch_host.py --batch 32 --new-tokens 64 --method vanilla --method pld
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import paradec
from paradec.zoo import code_model_dir, dev_prompts_path

FALLBACK_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def read_lines(path):\n    with open(path) as f:\n        return",
]


def prompts(count: int) -> list[str]:
    """`count` code prompts: the code dev set's (cycled), else a few fixed ones."""
    path = dev_prompts_path()
    lines = path.read_text().splitlines() if path.exists() else []
    texts = [json.loads(line)["prompt"] for line in lines if line.strip()] or FALLBACK_PROMPTS
    return [texts[i % len(texts)] for i in range(count)]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while `counting` (the target's forward switches it off)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            name = str(func.overloadpacket.__name__)
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class Timed:
    """Wraps `obj.name`, summing the seconds spent in it; a `profiler` is paused inside it."""

    def __init__(self, obj, name: str, profiler: cProfile.Profile | None = None, ops: OpCounter | None = None) -> None:
        self.seconds = 0.0
        self.profiling = False
        self._obj, self._name, self._saved = obj, name, obj.__dict__.get(name)
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if self.profiling:
                profiler.disable()
            if ops is not None:
                ops.counting = False
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                if ops is not None:
                    ops.counting = True
                if self.profiling:
                    profiler.enable()

        setattr(obj, name, timed)

    def restore(self) -> None:
        if self._saved is None:
            delattr(self._obj, self._name)
        else:
            setattr(self._obj, self._name, self._saved)


def run(
    engine,
    texts: list[str],
    method: str,
    new_tokens: int,
    profiler: cProfile.Profile | None = None,
    speculate="always",
    ops: OpCounter | None = None,
) -> dict:
    """One pass: every prompt decoded as one batch. Per decode step: wall and device-work seconds, sequences. The
    device work is the target's forward and the verifier's argmax over the logits (on the CPU it computes there;
    on a GPU it is one queued kernel)."""
    decoder = engine.batch_decoder(len(texts), speculate=speculate)
    forward = Timed(decoder.runner, "forward", profiler, ops)
    picks = Timed(torch.Tensor, "argmax", profiler)
    items = [decoder.submit(engine.request(t, method=method, max_new_tokens=new_tokens)) for t in texts]
    steps = []  # (wall, forward, sequences) of each decode step
    ops_steps = [0]  # decode steps of the whole batch counted by `ops`
    while not all(item.done for item in items):
        decoding = sum(1 for it in decoder.running if it.prefilled)
        before, started = forward.seconds + picks.seconds, time.perf_counter()
        forward.profiling = picks.profiling = profiler is not None and bool(decoding)
        if forward.profiling:
            profiler.enable()
        if ops is not None and decoding == len(texts):
            with ops:
                decoder.step()
            ops_steps[0] += 1
        else:
            decoder.step()
        if forward.profiling:
            profiler.disable()
        if decoding:
            steps.append((time.perf_counter() - started, forward.seconds + picks.seconds - before, decoding))
    forward.restore()
    picks.restore()
    results = [it.result for it in items]
    return {"steps": steps, "tokens": [r.token_ids for r in results], "ops_steps": ops_steps[0]}


def summary(steps: list[tuple[float, float, int]], batch: int) -> dict:
    """Medians over the steps of the full batch; per sequence: all steps' host time over all sequence-steps."""
    full = [(w, f) for w, f, seqs in steps if seqs == batch] or [(w, f) for w, f, _ in steps]
    return {
        "steps": len(steps),
        "full_steps": len(full),
        "step_ms": 1e3 * statistics.median(w for w, _ in full),
        "forward_ms": 1e3 * statistics.median(f for _, f in full),
        "host_ms": 1e3 * statistics.median(w - f for w, f in full),
        "host_ms_per_seq": 1e3 * sum(w - f for w, f, _ in steps) / sum(seqs for _, _, seqs in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--method", action="append", help="repeatable (default: vanilla and pld)")
    parser.add_argument("--repeats", type=int, default=3, help="measured passes per method (their steps pooled)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile's top functions of the measured passes' decode steps, the forward left out",
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--ops", action="store_true", help="count the tensor ops a full-batch step dispatches outside the forward"
    )
    parser.add_argument("--speculate", choices=["always", "auto", "never"], default="always")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = paradec.load(code_model_dir(), runner="native", dtype="float32", device="cpu")
    texts = prompts(args.batch)
    for method in args.method or ["vanilla", "pld"]:
        run(engine, texts, method, args.new_tokens, speculate=args.speculate)  # warm-up
        profiler = cProfile.Profile() if args.profile else None
        steps = []
        for _ in range(args.repeats):
            steps += run(engine, texts, method, args.new_tokens, profiler, args.speculate)["steps"]
        s = summary(steps, args.batch)
        print(
            f"{method} B={args.batch}: {s['steps']} decode steps ({s['full_steps']} of all {args.batch}): median "
            f"step {s['step_ms']:.2f} ms, forward+argmax {s['forward_ms']:.2f} ms, host {s['host_ms']:.2f} ms/step; "
            f"host {s['host_ms_per_seq']:.4f} ms/seq/step over all steps",
            flush=True,
        )
        if profiler is not None:
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(args.top)
        if args.ops:
            ops = OpCounter()
            counted = run(engine, texts, method, args.new_tokens, speculate=args.speculate, ops=ops)["ops_steps"]
            total = sum(ops.counts.values()) / max(counted, 1)
            print(
                f"{method} B={args.batch}: {total:.1f} tensor ops per full-batch step outside the forward "
                f"({total / args.batch:.2f} per sequence), over {counted} steps; the most frequent:"
            )
            for name, count in sorted(ops.counts.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {name:32s} {count / max(counted, 1):8.1f} per step")


if __name__ == "__main__":
    main()
