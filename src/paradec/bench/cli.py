"""`paradec bench`: every method (and the Hugging Face peers) on a prompt set, with tables and plots.

    paradec bench --suite smoke                                   # CPU, the default model, minutes
    paradec bench --suite code --out $OUT                         # GPU, the zoo's bench pair (built if missing)
    paradec bench --suite chat --turns all --out $OUT             # chat dev prompts, every turn, the instruct model
    paradec bench --model M --draft D --prompts spec_bench.jsonl --methods draft,pld --opt draft.k=6 --peers hf

Chat records are rendered with the model's chat template (`--chat`, default auto); `--turns all` asks every turn
after the method's own earlier answers (see `paradec.bench.prompts`).

Exit codes: 0 done; 1 a lossless method's greedy output differed from vanilla's, or a method crashed (results are
written first); 2 bad arguments (`ParadecError`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from paradec.errors import ParadecError

DEFAULT_OUT = "paradec-bench"
_SAMPLING_FLAGS = {
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "seed": "--seed",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `paradec bench` (sets `func(args) -> int`)."""
    from paradec.bench.prompts import CHAT_MODES, SUITES, TURN_MODES
    from paradec.cli import add_model_args

    bench = subparsers.add_parser(
        "bench",
        help="benchmark methods and Hugging Face peers side by side (tokens/s, speedup, τ, exactness)",
        description="Spec-Bench-style benchmark: batch 1, warm-up, synchronised wall time, speedup over our own "
        "vanilla in the same run, τ and acceptance by position, greedy exactness against vanilla.",
    )
    add_model_args(bench)
    suites = "; ".join(f"{s.name}: {s.description}" for s in SUITES.values())
    bench.add_argument("--suite", choices=list(SUITES), help=f"a ready recipe ({suites})")
    bench.add_argument(
        "--prompts", type=Path, help="JSONL prompts (`prompt`, `turns` or `messages`, optional `id`, `category`)"
    )
    bench.add_argument("--per-category", type=int, help="use the first N prompts of each category")
    bench.add_argument(
        "--chat",
        choices=CHAT_MODES,
        default="auto",
        help="auto: chat records in the model's chat template when it has one, else raw text; on: every record in "
        "the template (an error without one); off: raw text, the first user turn (default auto)",
    )
    bench.add_argument(
        "--turns",
        choices=TURN_MODES,
        default="first",
        help="first: the first user turn; all: every turn, each after the method's own earlier answers, timed "
        "apart (needs a chat template) (default first)",
    )
    bench.add_argument("--methods", help="comma list of methods (default: every registered method)")
    bench.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="method option, repeatable (e.g. --opt draft.k=6 --opt pld.max_ngram=4); see `paradec methods`",
    )
    bench.add_argument(
        "--peers", help="hf (all), none, or a comma list of hf-vanilla, hf-assisted, hf-assisted-dyn, hf-pld"
    )
    bench.add_argument("--mode", choices=["greedy", "sample"], default="greedy")
    bench.add_argument("--temperature", type=float, help="sample mode (default 1.0)")
    bench.add_argument("--top-k", type=int, help="sample mode (default 0: off)")
    bench.add_argument("--top-p", type=float, help="sample mode (default 1.0: off)")
    bench.add_argument("--min-p", type=float, help="sample mode (default 0: off)")
    bench.add_argument("--seed", type=int, help="sample mode: prompt i uses seed + i (default 0)")
    bench.add_argument(
        "--batch-sizes",
        default="1",
        help="comma list, e.g. 1,4,8: at a size above 1 each method decodes all its prompts, at most that many at "
        "once (continuous batching, native runner; a method that cannot batch is skipped) and hf-vanilla runs padded "
        "batches; speedups are against our vanilla at the same size (default 1)",
    )
    bench.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="n samples of each prompt (OpenAI's n, 2..16), decoded together as one request; speedups against "
        "vanilla's n samples (the `multisample` method's workload: use with --mode sample) (default 1)",
    )
    bench.add_argument(
        "--concurrency",
        help="comma list of client counts, e.g. 1,16,32: instead of the method table, drive the server with that "
        "many concurrent streaming clients per round and report aggregate tok/s, p50/p95 latency and time to first "
        "token, and whether every greedy answer equals the one-client answer (`paradec.bench.load`)",
    )
    bench.add_argument(
        "--url", help="with --concurrency: a running paradec server (default: start one with this model's options)"
    )
    bench.add_argument(
        "--server-batch",
        type=int,
        help="with --concurrency and no --url: the started server's --max-batch (default: the largest client count; "
        "1 measures the one-at-a-time server)",
    )
    bench.add_argument("--max-new-tokens", type=int, help="per generation (default: the suite's, else 128)")
    bench.add_argument(
        "--warmup", type=int, default=1, help="untimed passes over all prompts per method first (default 1)"
    )
    bench.add_argument("--repeats", type=int, default=1, help="timed repeats per prompt, median kept (default 1)")
    bench.add_argument(
        "--drift-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time vanilla again after the other batch-1 methods and report how far the card's speed moved "
        "(default on; it needs vanilla and one more method)",
    )
    bench.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default ./{DEFAULT_OUT})"
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    bench.add_argument(
        "--tensor-parallel",
        type=int,
        metavar="N",
        help="shard the target over N ranks as `paradec generate --tensor-parallel` does (spawned, or joined under "
        "torchrun): every rank runs the same bench, rank 0 prints and writes the results; no --peers; with "
        "--concurrency the started server runs the ranks (`paradec serve "
        "--tensor-parallel N --max-batch B`) (default: 1, one process)",
    )
    bench.set_defaults(func=cmd_bench)


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ParadecError(f"{name} must be >= {minimum}, got {value}")


def batch_sizes(text: str, flag: str = "--batch-sizes") -> tuple[int, ...]:
    """A comma list of sizes >= 1 (--batch-sizes, --concurrency)."""
    what = "batch size" if flag == "--batch-sizes" else "client count"
    sizes = []
    for part in text.split(","):
        try:
            size = int(part)
        except ValueError:
            raise ParadecError(f"{flag}: {part.strip()!r} is not an integer") from None
        if size < 1:
            raise ParadecError(f"{flag}: {what} must be >= 1, got {size}")
        sizes.append(size)
    return tuple(dict.fromkeys(sizes))


def check_samples(args: argparse.Namespace, sizes: tuple[int, ...]) -> int:
    """--samples N: 1..16 (`paradec.request.MAX_N`), with one batch size, the first turns and no --concurrency."""
    from paradec.request import MAX_N

    n = args.samples
    if not 1 <= n <= MAX_N:
        raise ParadecError(f"--samples must be in [1, {MAX_N}], got {n}")
    if n > 1:
        if sizes != (1,):
            raise ParadecError(f"--samples {n} decodes each prompt's samples as one batch: drop --batch-sizes")
        if args.turns != "first":
            raise ParadecError(f"--samples {n} measures first turns only (n answers have no one next turn)")
        if args.concurrency is not None:
            raise ParadecError(f"--samples {n} runs the method table, not --concurrency")
    return n


def sampling_from(args: argparse.Namespace):
    from paradec.config import SamplingParams

    given = [flag for name, flag in _SAMPLING_FLAGS.items() if getattr(args, name) is not None]
    if args.mode == "greedy":
        if given:
            raise ParadecError(f"{', '.join(given)} applies to --mode sample (this run is greedy)")
        return SamplingParams()
    if args.temperature == 0:
        raise ParadecError("--temperature 0 is greedy decoding: use --mode greedy")
    return SamplingParams(
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        min_p=args.min_p or 0.0,
        seed=args.seed or 0,
    )


def command_line(args: argparse.Namespace) -> str:
    """An equivalent `paradec bench ...` command built from the parsed arguments."""
    parts = ["paradec", "bench"]
    for key, value in vars(args).items():
        if key in ("command", "func") or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _models(args: argparse.Namespace, suite) -> tuple[str | None, str | None]:
    """(model, draft) to load: the user's, else the suite's (None, None = `paradec.load()`'s default model)."""
    if args.model is not None or suite is None or suite.models == "default":
        return args.model, args.draft
    if suite.models != "bench":
        return suite.models, args.draft
    from paradec import zoo
    from paradec.loading import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda":
        raise ParadecError(
            f"--suite {suite.name} measures the zoo's bench pair, built on a GPU, but the device is {device}: "
            "pass --model (and --draft) to benchmark another model, or use --suite smoke"
        )
    target, draft = zoo.ensure_bench_pair(device=str(device))
    return str(target), args.draft if args.draft is not None else str(draft)


def cmd_bench(args: argparse.Namespace) -> int:
    world = 1 if args.tensor_parallel is None else args.tensor_parallel
    if world == 1:
        return _bench(args)
    from paradec.bench.peers import parse_peers
    from paradec.bench.prompts import get_suite
    from paradec.runners.native import tp

    suite = get_suite(args.suite) if args.suite is not None else None
    if args.concurrency is not None:  # the server it starts runs the ranks (`paradec serve --tensor-parallel`)
        return _bench(args)
    if parse_peers(args.peers if args.peers is not None else suite.peers if suite else None):
        raise ParadecError("--tensor-parallel benchmarks paradec's methods only: pass --peers none")
    return tp.run_ranks(world, _bench, args)  # each rank runs _bench; rank 0 writes


def _bench(args: argparse.Namespace) -> int:
    import paradec
    from paradec.bench import report
    from paradec.bench.harness import BenchPlan, parse_method_options, resolve_methods
    from paradec.bench.peers import parse_peers
    from paradec.bench.prompts import get_suite, load_prompts, take_per_category

    suite = get_suite(args.suite) if args.suite is not None else None
    _positive("--per-category", args.per_category)
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--warmup", args.warmup, 0)
    _positive("--repeats", args.repeats)
    if args.out.exists() and not args.out.is_dir():
        raise ParadecError(f"--out {str(args.out)!r} exists and is not a directory")
    sampling = sampling_from(args)
    selected, explicit = resolve_methods(args.methods)
    options = parse_method_options(args.opt, selected)
    peers = parse_peers(args.peers if args.peers is not None else suite.peers if suite else None)
    sizes = batch_sizes(args.batch_sizes)
    samples = check_samples(args, sizes)
    if args.prompts is not None:
        source = str(args.prompts)
    elif suite is not None:
        source = str(suite.prompts_path())
    else:
        from paradec import zoo

        source = str(zoo.dev_prompts_path())
    per_category = args.per_category if args.per_category is not None else suite.per_category if suite else None
    prompts = load_prompts(source)
    if suite is not None and suite.categories is not None and args.prompts is None:
        prompts = [p for p in prompts if p.category in suite.categories]
    prompts = take_per_category(prompts, per_category)
    max_new_tokens = args.max_new_tokens or (suite.max_new_tokens if suite else 128)

    model, draft = _models(args, suite)
    if args.concurrency is not None:
        return _load_mode(args, prompts, selected if explicit else ("vanilla",), model, draft, max_new_tokens, source)
    sharded = (args.tensor_parallel or 1) > 1
    engine = paradec.load(
        model,
        draft,
        heads=args.heads,
        device=args.device,
        dtype=args.dtype,
        runner=args.runner,
        exact=args.exact,
        tensor_parallel=sharded,
    )
    plan = BenchPlan(
        methods=selected,
        explicit=explicit,
        options=options,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        peers=peers,
        batch_sizes=sizes,
        chat=args.chat,
        turns=args.turns,
        samples=samples,
        drift=args.drift_check,
    )
    meta = report.metadata(
        engine,
        plan,
        command=command_line(args),
        argv=shlex.join(sys.argv),
        suite=args.suite,
        prompts_source=source + _subset_text(suite if args.prompts is None else None, per_category),
    )
    if sharded and _rank() != 0:  # the same run as rank 0's, its results thrown away
        with tempfile.TemporaryDirectory(prefix="paradec-bench-rank-") as out:
            return run_bench(engine, prompts, plan, meta, Path(out), quiet=True)
    return run_bench(engine, prompts, plan, meta, args.out, quiet=args.quiet)


def _subset_text(suite, per_category: int | None) -> str:
    """How the prompts were taken from their file, for the report ("" when all of them)."""
    parts = []
    if suite is not None and suite.categories is not None:
        parts.append("categories " + ", ".join(suite.categories))
    if per_category is not None:
        parts.append(f"first {per_category} per category")
    return f" ({'; '.join(parts)})" if parts else ""


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _load_mode(args, prompts, methods, model, draft, max_new_tokens: int, source: str) -> int:
    """`--concurrency`: the server under load (`paradec.bench.load`); exit 1 on an error or an answer that differs
    from its one-client answer."""
    from paradec.bench import load

    concurrency = sorted(set(batch_sizes(args.concurrency, flag="--concurrency")))  # integers >= 1
    if args.mode != "greedy":
        raise ParadecError("--concurrency measures greedy decoding (its answers are compared): drop --mode sample")
    server = None
    url = args.url
    world = args.tensor_parallel or 1
    if url is not None and world > 1:
        raise ParadecError("--tensor-parallel with --url: the running server was started with its own ranks")
    if url is None:
        serve = [] if model is None else ["--model", str(model)]
        serve += [] if draft is None else ["--draft", str(draft)]
        serve += [] if args.heads is None else ["--heads", str(args.heads)]
        serve += ["--device", args.device, "--dtype", args.dtype, "--runner", args.runner]
        serve += ["--exact"] if args.exact else []
        requests = max(len(prompts), 2 * max(concurrency))
        batch = max(concurrency) if args.server_batch is None else args.server_batch
        _positive("--server-batch", batch)
        if world > 1:  # the server shards the target (and batches on every rank: `paradec.server.tp`)
            serve += ["--tensor-parallel", str(world)]
        serve += ["--max-batch", str(batch), "--max-queue", str(requests + 1), "--timeout", "3600"]
        args.out.mkdir(parents=True, exist_ok=True)
        server = load.Server(serve, args.out / "server.log")
        url = server.url
    try:
        rounds = load.load_bench(url, prompts, methods, concurrency, max_new_tokens, warmup=args.warmup)
    finally:
        if server is not None:
            server.stop()
    import torch

    meta = {
        "command": command_line(args),
        "url": url,
        "server": None if server is None else server.banner,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "prompts": f"{len(prompts)} prompts of {source}",
        "max_new_tokens": max_new_tokens,
    }
    load.write(args.out, rounds, meta)
    if not args.quiet:
        print(load.markdown(rounds, meta))
    print(f"paradec bench: results in {args.out}/ (load.json, load.md)", file=sys.stderr)
    bad = [r for r in rounds if r.errors or (r.compared is not None and r.equal != r.compared)]
    for r in bad:
        print(
            f"paradec bench: {r.method} x{r.clients}: {r.errors} errors, {r.equal}/{r.compared} answers equal to the "
            "one-client answer",
            file=sys.stderr,
        )
    return 1 if bad else 0


def run_bench(engine, prompts: list, plan, meta: dict, out: Path, *, quiet: bool = False) -> int:
    """Run `plan` with `engine`, write the outputs into `out` (also after every row, so an interrupted run leaves
    partial results) and return the exit code: 1 on a greedy mismatch of a lossless method (near-ties excepted, see
    `paradec.bench.referee`) or a crashed row."""
    from paradec.bench import report
    from paradec.bench.harness import Bench

    bench = Bench(
        engine, prompts, plan, progress=not quiet, checkpoint=lambda b: report.write(out, b, meta, complete=False)
    )
    bench.run()
    data = report.write(out, bench, meta, complete=True)
    if not quiet:
        print(report.markdown(data))
    print(f"paradec bench: results in {out}/ (results.json, results.md, speedup.png, acceptance.png)", file=sys.stderr)
    status = 0
    for record in bench.near_ties():
        print(
            f"paradec bench: near-tie (rounding, not a failure): {record.method} differs from vanilla on prompt "
            f"{record.mismatch_prompt or record.prompt_ids[0]!r} from new token {record.first_mismatch}: "
            f"{record.ruling['text']}",
            file=sys.stderr,
        )
    if bench.not_compared:
        print(
            f"paradec bench: {len(bench.not_compared)} later turn(s) not compared with vanilla's: an earlier answer "
            "differed, so the conversations differ (listed in results.md)",
            file=sys.stderr,
        )
    for record in bench.mismatches():
        ruling = f": {record.ruling['text']}" if record.ruling else ""
        print(
            f"paradec bench: EXACTNESS FAILURE: {report.label(record.method, record.batch_size)} differs from vanilla on "
            f"prompt {record.mismatch_prompt or record.prompt_ids[0]!r} from new token {record.first_mismatch}{ruling}",
            file=sys.stderr,
        )
        status = 1
    for outcome in bench.failed():
        print(f"paradec bench: {outcome.method} failed: {outcome.reason}", file=sys.stderr)
        status = 1
    return status
