"""`paradec generate | zoo | bench | serve | train`.

`generate` continues a raw prompt (`--prompt`, `--prompt-file`) or answers a conversation (`--chat TEXT` with an
optional `--system TEXT`, or `--messages FILE.json`) rendered by the model's chat template (`Engine.encode_chat`).

User mistakes (`ParadecError`, bad arguments) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import sys
from pathlib import Path

from paradec.errors import ParadecError


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads an engine."""
    from paradec.zoo import DEFAULT_MODEL

    parser.add_argument(
        "--model", help=f"a zoo name (`paradec zoo list`), checkpoint directory or hub id (default: {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--draft",
        help="draft model: a zoo name, directory or hub id (default: the zoo model's registered draft, if any)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16 or float16")
    parser.add_argument("--runner", default="auto", choices=["auto", "native", "hf"], help="model runner")
    parser.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the target on the native runner's batch-invariant kernels (paradec.kernels): every method's output "
        "bitwise the vanilla output in bf16 too (default: off)",
    )
    parser.add_argument(
        "--heads",
        help="trained heads directory for medusa/eagle (default: <model>/heads if present, else a zoo model's "
        "packaged heads)",
    )


def add_method_args(parser: argparse.ArgumentParser) -> None:
    from paradec.drafters import methods

    parser.add_argument("--method", default="vanilla", help=f"decoding method: {', '.join(methods())}")
    parser.add_argument(
        "--opt",
        action="append",
        type=_kv,
        default=[],
        metavar="NAME=VALUE",
        help="method option, repeatable (e.g. --opt k=6 for draft, --opt max_ngram=4 for pld); see `paradec methods` "
        "for each option's default and range",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace):
    from paradec.config import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed
    )


def load_engine(args: argparse.Namespace):
    import paradec

    return paradec.load(
        args.model,
        args.draft,
        heads=getattr(args, "heads", None),
        device=args.device,
        dtype=args.dtype,
        runner=args.runner,
        exact=getattr(args, "exact", False),
        tensor_parallel=getattr(args, "tensor_parallel", 1) > 1,
    )


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParadecError(f"cannot read prompt file {args.prompt_file!r}: {exc}") from exc


def _read_messages(args: argparse.Namespace) -> list[dict] | None:
    """The conversation of `--chat` (after `--system`) or of the `--messages` file, checked; None for a raw prompt."""
    from paradec.chat import check_messages

    if args.system is not None and args.chat is None:
        raise ParadecError("--system goes with --chat TEXT (with --messages, put the system message in the file)")
    if args.chat is not None:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        return [*system, {"role": "user", "content": args.chat}]
    if args.messages is None:
        return None
    try:
        raw = Path(args.messages).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParadecError(f"cannot read messages file {args.messages!r}: {exc}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ParadecError(f"messages file {args.messages!r} is not valid JSON: {exc}") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise ParadecError(
            f"messages file {args.messages!r} must hold a JSON list of messages or an object with a 'messages' "
            f"list, got {type(data).__name__}"
        )
    try:
        check_messages(messages)
    except ParadecError as exc:
        raise ParadecError(f"messages file {args.messages!r}: {exc}") from None
    return messages


def cmd_generate(args: argparse.Namespace) -> int:
    if args.tensor_parallel != 1:
        from paradec.runners.native import tp

        return tp.run_ranks(args.tensor_parallel, _generate, args)  # each rank runs _generate
    return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    messages = _read_messages(args)
    text = _read_prompt(args) if messages is None else None
    sampling = sampling_from_args(args)
    engine = load_engine(args)
    # --opt: this engine's options for the method, its settings (e.g. eagle's compile) included
    engine.set_default_options(args.method, dict(args.opt))
    request = engine.request(
        text,
        messages=messages,
        method=args.method,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or None,
    )
    stream = engine.stream(request)
    if args.json:
        result = stream.run()
        record = {
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "method": args.method,
            "model": engine.config.model,
            "stats": result.stats.to_dict(),
        }
        print(json.dumps(record))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stream.result.stats.summary(), file=sys.stderr)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from paradec.drafters import get_drafter, methods
    from paradec.drafters.options import MAX_STEP_INPUTS, STATIC_LIMITS, describe

    for name in methods():
        cls = get_drafter(name)
        lossy = " (LOSSY)" if cls.lossy else ""
        alone = "" if cls.batchable else " [decodes alone, not in a batch]"
        print(f"{name}{lossy}: {', '.join(describe(cls.options_class)) or 'no options'}{alone}")
    print(
        f"\n{STATIC_LIMITS['proposal']} = the runner's largest step ({MAX_STEP_INPUTS} inputs) less the pending token. "
        "An engine setting is set per engine (--opt of paradec serve / generate), not per request. Every method "
        "without a mark also runs inside a batch (Engine.generate_batch, paradec serve --max-batch)."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paradec", description="Lossless parallel decoding for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt or answer a chat, streamed to stdout")
    add_model_args(gen)
    gen.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="shard the target's heads, MLP and vocabulary over N ranks (torch.distributed: NCCL on GPUs, gloo on "
        "CPUs); spawns them, or joins the group under torchrun; every rank decodes, rank 0 prints (default 1)",
    )
    add_method_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw prompt text (no chat template)")
    prompt.add_argument("--prompt-file", help="file holding the raw prompt text")
    prompt.add_argument(
        "--chat", metavar="TEXT", help="one user message, rendered by the model's chat template (assistant turn opened)"
    )
    prompt.add_argument(
        "--messages",
        metavar="FILE",
        help='JSON file of a conversation for the chat template: a list of {"role", "content"} messages, '
        'or an object with a "messages" list',
    )
    gen.add_argument("--system", metavar="TEXT", help="system message before the --chat message")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_args(gen)
    gen.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats)")
    gen.set_defaults(func=cmd_generate)

    meth = sub.add_parser("methods", help="list decoding methods and their options")
    meth.set_defaults(func=cmd_methods)

    for module in _subcommand_modules():
        importlib.import_module(module).add_parser(sub)
    return parser


def _subcommand_modules() -> list[str]:
    """`paradec.<package>.cli` of every sub-package that has one (zoo, bench, serve, train): each defines
    `add_parser(subparsers)`, registering a sub-command whose `func(args) -> int` runs it."""
    import paradec

    found = []
    for package in sorted(pkgutil.iter_modules(paradec.__path__), key=lambda m: m.name):
        if package.ispkg and importlib.util.find_spec(f"paradec.{package.name}.cli") is not None:
            found.append(f"paradec.{package.name}.cli")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ParadecError as exc:
        print(f"paradec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
