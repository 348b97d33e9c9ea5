"""Where a speculative step's time goes, on one GPU, with random weights of the zoo bench target's shape, or a real
target with `--model` (not a test).

Random weights decide nothing here: every step of a method does the same work whatever is accepted (a full-size
tree is drafted and scored each step), so the cost of a step does not depend on what the weights say. What this
measures, per method configuration, in one process on one card:

- `step ms`: wall time of one decode step (a 128-token generation's time / its steps), host included;
- `draft ms`: GPU time of the drafter's CUDA graph alone (EAGLE: adding the new entries and growing the tree;
  `draft`: the whole chain of k tokens, one graph with `one_graph=true`, k launch sequences with `one_graph=false`,
  host launch gaps included), and `draft ms/token` for a chain;
- `score ms`: GPU time of the target's forward over the step's inputs alone (1 for vanilla, 1 + nodes for trees);
- `kernels`: CUDA kernels one eager drafter step launches (torch.profiler), the count the graph replays.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 scripts/profile_step.py --out $OUT \
        --config vanilla --config eagle --config eagle:compile=true \
        --config draft:k=5 --config draft:k=5,one_graph=false
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from paradec.config import EngineConfig, SamplingParams
from paradec.drafters.base import DecodeState
from paradec.engine import Engine
from paradec.heads import EagleConfig, EagleHead, save_heads
from paradec.runners import load_runner
from paradec.zoo.model import llama_config
from paradec.zoo.presets import BENCH


def bench_shaped_model(root: Path, seed: int) -> Path:
    """A random-weight Llama checkpoint of the bench target's shape (its exact config), saved in bf16; beside it
    `draft`, one of the bench draft's shape."""
    from transformers import LlamaForCausalLM

    shape = BENCH.target
    for name, model_shape in (("target", shape), ("draft", BENCH.draft)):
        config = llama_config(model_shape, BENCH.vocab_size, BENCH.context, BENCH.rope_theta, "bfloat16")
        torch.manual_seed(seed)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(root / name))
    head = EagleHead(EagleConfig.for_target(shape.hidden_size, BENCH.vocab_size))
    save_heads(head, root / "target" / "heads" / "eagle")
    return root / "target"


def gpu_ms(fn, reps: int) -> float:
    """Median GPU time of fn() in ms, each rep between two CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def parse_config(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:  # a bare string, e.g. compile_mode=max-autotune-no-cudagraphs
            options[key] = value
    return method, options


@torch.inference_mode()
def profile(
    engine: Engine, method: str, options: dict, prompt: list[int], new: int, repeats: int, trace: Path | None = None
) -> dict:
    engine.set_default_options(method, options)  # engine settings (eagle's compile) included
    parsed = engine.method(method).defaults
    gen_times, steps = [], 0
    for i in range(2 + repeats):  # two warm-ups: compilation, then graph capture of every shape used
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = engine.generate(prompt, method=method, max_new_tokens=new)
        torch.cuda.synchronize()
        if i >= 2:
            gen_times.append(time.perf_counter() - started - result.stats.prefill_seconds)
            steps = result.stats.steps
    row = {
        "config": method + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else ""),
        "step_ms": 1000 * statistics.median(gen_times) / steps,
        "steps": steps,
        "tau": result.stats.new_tokens / steps,
    }
    target = engine.target
    n_inputs = 1
    row["draft_ms"] = 0.0
    if method == "eagle":
        drafter = engine.method(method).open(parsed)
        ws = engine.method(method).workspace  # the generations' workspace, its graphs captured
        n, (graph, _) = next(iter(ws.graphs.items()))
        row["draft_ms"] = gpu_ms(graph.replay, 200)
        row["nodes"], n_inputs = n, n + 1
        args = (drafter.head, drafter.embed, drafter.lm_head, *ws.state(), ws.capacity, parsed.topk, parsed.depth, n)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            drafter.step(*args, True)  # what the graph replays, launched eagerly
            torch.cuda.synchronize()
        row["kernels"] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        if trace is not None:  # the kernels by total time, and a timeline of whole generation steps
            kernels = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:25]
            for e in kernels:
                print(f"{e.self_device_time_total:9.1f} us {e.count:4d} x  {e.key[:90]}")
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as timeline:
                engine.generate(prompt, method=method, max_new_tokens=24)
            timeline.export_chrome_trace(str(trace))
    if method == "draft":
        row["draft_ms"], row["k"] = chain_ms(engine.method(method).open(parsed), prompt, parsed.k, target.vocab_size)
        row["draft_ms_per_token"] = row["draft_ms"] / row["k"]
        n_inputs = row["k"] + 1  # the target scores the pending token and the k drafts
    row["score_ms"] = score_ms(target, prompt[0], n_inputs)
    return row


def chain_ms(drafter, prompt: list[int], k: int, vocab_size: int) -> float:
    """GPU time of one draft chain of k tokens after the prompt (greedy; fed the pending token), between two CUDA
    events: with `one_graph` one graph replay, else k forwards launched from the host (their launch gaps count)."""
    runner = drafter.runner
    state = DecodeState(list(prompt), len(prompt), SamplingParams(), None, runner.device, vocab_size)
    drafter.begin(state)
    length = runner.length

    def draft() -> None:
        drafter.chain.propose(state, k)
        runner.rollback(length)

    return gpu_ms(draft, 200)


def score_ms(target, token: int, n: int) -> float:
    """GPU time of the target's forward over n inputs (a chain costs what a tree of as many inputs costs)."""
    tokens = torch.tensor([token] * n, device=target.device)
    length = target.length

    def score() -> None:
        target.forward(tokens, None, logits="all")
        target.rollback(length)

    return gpu_ms(score, 200)


def topk_variants(rows: int = 8, width: int = BENCH.vocab_size, k: int = 8) -> dict[str, float]:
    """us per call (replayed from a CUDA graph) of ways to take the top k of a few vocabulary-wide rows."""
    from paradec.drafters.eagle import wide_topk

    def max_chunks(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = x.unflatten(-1, (-1, chunk))  # [R, C, chunk]
        best = parts.amax(-1).topk(k, -1).indices  # [R, k] the chunks holding the top k
        candidates = parts.gather(1, best[..., None].expand(-1, -1, chunk)).flatten(-2)  # [R, k * chunk]
        values, top = candidates.topk(k, -1)
        index = (best[..., None] * chunk + torch.arange(chunk, device=x.device)).flatten(-2)
        return values, index.gather(-1, top)

    x = torch.randn(rows, width, device="cuda")
    variants = {
        "topk": lambda: x.topk(k, -1),
        "chunks256": lambda: wide_topk(x, k, 256),
        "chunks128": lambda: wide_topk(x, k, 128),
        "chunks64": lambda: wide_topk(x, k, 64),
        "max_chunks32": lambda: max_chunks(x, 32),
        "max_chunks64": lambda: max_chunks(x, 64),
        "max_chunks128": lambda: max_chunks(x, 128),
        "sort": lambda: x.sort(-1, descending=True),
    }
    out = {}
    for name, fn in variants.items():
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        out[name] = round(1000 * gpu_ms(lambda g=graph: [g.replay() for _ in range(50)], 5) / 50, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", required=True, help="method[:key=value,...], repeatable")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trace", help="config whose kernels are tabled and whose steps are traced into --out")
    parser.add_argument(
        "--model", help="a real target (zoo name or directory; its trained heads) instead of the random bench shape"
    )
    parser.add_argument("--draft", help="with --model: the draft model (default: the zoo's registered draft)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from paradec import zoo
            from paradec.loading import resolve_model_dir

            model_dir = resolve_model_dir(args.model, "model")
            draft_name = args.draft or zoo.registered_draft(zoo.zoo_name(model_dir))
            draft_dir = resolve_model_dir(draft_name, "draft") if draft_name else None
        else:
            model_dir = bench_shaped_model(Path(tmp), seed=0)
            draft_dir = model_dir.parent / "draft"
        target = load_runner(model_dir, "native", torch.device("cuda"), torch.bfloat16)
        draft = load_runner(draft_dir, "native", torch.device("cuda"), torch.bfloat16) if draft_dir else None
        config = EngineConfig(model=str(model_dir), draft=None, heads=str(model_dir / "heads"), device="cuda",
                              dtype="bfloat16", runner="NativeRunner")  # fmt: skip
        engine = Engine(target, None, config, draft=draft, heads_dir=model_dir / "heads", eos_token_ids=set())
        vocab = target.vocab_size
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        rows = []
        for text in args.config:
            method, options = parse_config(text)
            started = time.perf_counter()
            trace = args.out / f"trace-{method}.json" if args.out and text == args.trace else None
            row = profile(engine, method, options, prompt.tolist(), args.new, args.repeats, trace)
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        with torch.inference_mode():
            sizes = {n: round(score_ms(target, 1, n), 3) for n in (1, 8, 16, 24, 32, 33, 48, 49, 64, 65)}
        print("score ms by inputs:", json.dumps(sizes))
        print("topk us:", json.dumps(topk_variants(width=vocab)))
    vanilla = next((r["step_ms"] for r in rows if r["config"] == "vanilla"), None)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| config | step ms | x vanilla | draft ms | ms/draft token | score ms | host+verify ms | kernels | tau |")
    for r in rows:
        host = r["step_ms"] - r["draft_ms"] - r["score_ms"]
        rel = r["step_ms"] / vanilla if vanilla else float("nan")
        per_token = f"{r['draft_ms_per_token']:.3f}" if "draft_ms_per_token" in r else ""
        print(f"| {r['config']} | {r['step_ms']:.3f} | {rel:.2f} | {r['draft_ms']:.3f} | {per_token} | "
              f"{r['score_ms']:.3f} | {host:.3f} | {r.get('kernels', '')} | {r['tau']:.2f} |")  # fmt: skip
    if args.out:
        (args.out / "profile_step.json").write_text(json.dumps({"rows": rows, "score_ms": sizes}, indent=1))


if __name__ == "__main__":
    main()
