"""`paradec train medusa|eagle|draft`: train a drafter for a target model.

    paradec train eagle --model DIR                      # -> DIR/heads/eagle/, picked up by paradec.load(DIR)
    paradec train medusa --model DIR --out HEADS         # -> HEADS/medusa/, use with --heads HEADS
    paradec train draft --model DIR --draft SMALL --out OUT   # -> OUT/draft/, use with --draft OUT/draft
    paradec train eagle --model CHAT_MODEL               # self-chat: the target writes its requests and answers them
    paradec train eagle --model CHAT_MODEL --data chat   # the packaged chat prompts, answered by the target
    paradec train eagle --model DIR --data chats.jsonl --keep-responses   # teacher-forced on the given answers
    paradec train eagle --model CODE_MODEL --data python-source           # windows of this machine's Python files

Chat windows end where the target's answer starts. Without --model, the default model (`paradec.zoo.DEFAULT_MODEL`,
fetched on first use) is the target. Without --draft, `train draft` distils the draft registered for a zoo target
(`--model code-8m`: `code-8m-draft`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from paradec.train.data import CHAT_MODES
from paradec.train.selfchat import SelfChatSettings


def _add_common(parser: argparse.ArgumentParser) -> None:
    from paradec.zoo import DEFAULT_MODEL

    parser.add_argument(
        "--model", help=f"target: a zoo name, checkpoint directory or hub id (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--out", type=Path, help="output root; writes OUT/<kind>/ (default: <model>/heads)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="target dtype: auto (bf16 on GPU), float32, bfloat16, float16")
    data = parser.add_argument_group("data (made by the target itself)")
    data.add_argument(
        "--data",
        help="prompt source: 'self-chat' (the target writes its own user requests, then answers them; the default "
        "for a target with a chat template), 'chat' (the packaged chat prompt set), 'python-source' (the Python "
        "source files on this machine; the default otherwise), or a file: .jsonl of 'messages' (OpenAI), "
        "'conversations' (ShareGPT), 'prompt' or 'text' records, or any text file (a file named like a source: "
        "./chat)",
    )
    data.add_argument(
        "--keep-responses",
        action="store_true",
        help="keep the assistant turns of a .jsonl data file: the windows hold them (teacher forcing on your data) "
        "instead of the target's own answers (default: the target rewrites every assistant turn)",
    )
    data.add_argument(
        "--chat",
        choices=CHAT_MODES,
        default="auto",
        help="render chat records (and 'prompt' records) with the target's chat template up to the opened "
        "assistant turn, so the target continues with its own answer: auto (default) = chats always, prompts when "
        "the target has a template; on = both (needs a template); off = text windows only",
    )
    data.add_argument(
        "--self-distill",
        type=int,
        default=2048,
        metavar="N",
        help="training windows the target continues (default 2048)",
    )
    data.add_argument("--prompt-len", type=int, default=128, help="text tokens per window (default 128)")
    data.add_argument(
        "--new-tokens",
        type=int,
        default=192,
        help="tokens the target adds to each window; 0 = train on the text windows (default 192)",
    )
    data.add_argument(
        "--temperature",
        type=float,
        help="temperature of the sampled answers (default 1); 0 = every answer greedy; given alone, every answer "
        "is sampled",
    )
    data.add_argument(
        "--sampled-share",
        type=float,
        metavar="SHARE",
        help="share of the windows the target answers by sampling, the rest greedily (default: 0.25 with self-chat, "
        "else 0)",
    )
    data.add_argument("--gen-batch-size", type=int, default=256, help="windows per generate batch (default 256)")
    data.add_argument("--val-sequences", type=int, default=64, help="held-out windows for accuracies (default 64)")
    data.add_argument(
        "--val-prompts",
        type=int,
        default=16,
        help="held-out prompts decoded with the engine for the validation acceptance (default 16)",
    )
    defaults = SelfChatSettings()
    chat = parser.add_argument_group("self-chat (--data self-chat: the requests the target writes)")
    chat.add_argument(
        "--self-chat-requests",
        type=int,
        default=defaults.requests,
        metavar="N",
        help=f"requests the target writes, before the filters (default {defaults.requests})",
    )
    for flag, name, metavar in (("--request-temperature", "temperature", "T"), ("--request-top-p", "top_p", "P")):
        low, high = getattr(defaults, name)
        chat.add_argument(
            flag,
            type=float,
            nargs="+",
            default=(low, high),
            metavar=metavar,
            help=f"sampling {name.replace('_', '-')} of the requests: a value, or a range LOW HIGH each batch draws "
            f"from (default {low} {high})",
        )
    chat.add_argument(
        "--request-max-tokens",
        type=int,
        default=defaults.max_tokens,
        help=f"a request that has not ended within this many tokens is dropped (default {defaults.max_tokens})",
    )
    chat.add_argument(
        "--request-min-tokens",
        type=int,
        default=defaults.min_tokens,
        help=f"a request of fewer tokens is dropped (default {defaults.min_tokens})",
    )
    chat.add_argument(
        "--near-duplicate",
        type=float,
        default=defaults.near_duplicate,
        metavar="SHARE",
        help="drop a request that shares more than this share of its 8-word shingles with a kept one "
        f"(default {defaults.near_duplicate})",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--steps", type=int, help="optimizer steps (default: medusa 1000, eagle 3000, draft 1000, pard 1500)"
    )
    opt.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    opt.add_argument(
        "--lr", type=float, help="peak learning rate (default: medusa and eagle 3e-3, draft 3e-4, pard 5e-5)"
    )
    opt.add_argument("--warmup", type=int, default=100, help="warm-up steps (default 100)")
    opt.add_argument(
        "--seed", type=int, default=0, help="seeds the data (requests, windows, sampled answers) and the training"
    )
    parser.add_argument(
        "--fresh-data",
        action="store_true",
        help="generate the data anew, not reusing the windows an earlier run made with the same target, data "
        "settings and seed (cached under OUT/data-cache/)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_draft_vocab(parser: argparse.ArgumentParser) -> None:
    from paradec.train.eagle import DRAFT_VOCAB

    group = parser.add_argument_group("draft vocabulary (EAGLE-3)")
    group.add_argument(
        "--draft-vocab",
        type=int,
        metavar="N",
        help="the head scores only the N most frequent tokens of the target's answers (its own LM head, mapped to "
        "target ids; verification stays over the full vocabulary); 0 = the whole vocabulary (default: whole up to "
        f"{DRAFT_VOCAB} tokens, else {DRAFT_VOCAB})",
    )


def _feature_layers(value: str) -> str | tuple[int, ...] | None:
    """--feature-layers: auto, none or comma-separated layer indices."""
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        layers = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or layer indices like 1,8,14, got {value!r}") from None
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {value!r}")
    return layers


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `train` with its `medusa`, `eagle` and `draft` sub-commands (each sets `func(args) -> int`)."""
    train = subparsers.add_parser(
        "train",
        help="train Medusa heads, an EAGLE head or a distilled draft for a target",
        description="Train a drafter on data the target makes itself: by default, for a target with a chat template, "
        "self-chat (the target writes its own user requests, filtered for length, control tokens, duplicates and "
        "overlap with the bench dev suites, then answers them); else windows of this machine's Python source. "
        "--data chat, a .jsonl of chats or a text file are the other sources.",
    )
    kinds = train.add_subparsers(dest="kind", required=True)

    medusa = kinds.add_parser("medusa", help="Medusa heads + a static token tree")
    _add_common(medusa)
    medusa.add_argument("--num-heads", dest="medusa_heads", type=int, default=4, help="number of heads (default 4)")
    medusa.add_argument("--tree-nodes", type=int, default=64, help="nodes of the static tree (default 64)")
    medusa.set_defaults(func=cmd_train)

    eagle = kinds.add_parser("eagle", help="EAGLE-style feature head (dynamic token tree)")
    _add_common(eagle)
    eagle.add_argument("--passes", type=int, default=3, help="draft levels unrolled per training step (default 3)")
    eagle.add_argument("--reg-weight", type=float, default=1.0, help="hidden-state regression weight (default 1)")
    eagle.add_argument("--intermediate-size", type=int, help="MLP width (default ~2.75x the hidden size)")
    _add_draft_vocab(eagle)
    eagle.add_argument(
        "--feature-layers",
        type=_feature_layers,
        default="auto",
        metavar="auto|none|I,J,K",
        help="target layers whose outputs the head fuses (EAGLE-3): auto = low, middle and high (outputs of layers "
        "1, L/2-1 and L-4 of L), none = the last hidden state (EAGLE-1/2), or indices (default auto)",
    )
    eagle.set_defaults(func=cmd_train)

    draft = kinds.add_parser("draft", help="distil a small draft model towards the target")
    _add_common(draft)
    draft.add_argument(
        "--draft", help="the draft model to distil (default: the draft registered for a zoo target, e.g. code-8m-draft)"
    )
    draft.set_defaults(func=cmd_train)

    pard = kinds.add_parser("pard", help="adapt a small draft model to propose k tokens in one forward (PARD)")
    _add_common(pard)
    pard.add_argument(
        "--draft", help="the draft model to adapt (default: the draft registered for a zoo target, e.g. code-8m-draft)"
    )
    pard.add_argument(
        "--k",
        dest="pard_k",
        type=int,
        default=8,
        help="tokens predicted per forward: the last real one and k - 1 masks (default 8)",
    )
    pard.add_argument(
        "--splits",
        dest="pard_splits",
        type=int,
        default=16,
        help="splits trained per window in one forward: each the window cut there and followed by k - 1 masks "
        "(PARD's parallel layout; 1: one split per window in a row of its own, the former recipe; default 16)",
    )
    pard.set_defaults(func=cmd_train)


def _bounds(values) -> tuple[float, ...]:
    """A value or a range LOW HIGH, as a range (more values are refused by SelfChatSettings)."""
    values = tuple(values)
    return values * 2 if len(values) == 1 else values


def cmd_train(args: argparse.Namespace) -> int:
    from paradec.train.loop import TrainSettings
    from paradec.train.pipeline import DEFAULT_LR, DEFAULT_STEPS, DataSettings, HeadSettings, run

    self_chat = SelfChatSettings(
        requests=args.self_chat_requests,
        temperature=_bounds(args.request_temperature),
        top_p=_bounds(args.request_top_p),
        max_tokens=args.request_max_tokens,
        min_tokens=args.request_min_tokens,
        near_duplicate=args.near_duplicate,
    )
    data = DataSettings(
        data=args.data,
        chat=args.chat,
        keep_responses=args.keep_responses,
        sequences=args.self_distill,
        val_sequences=args.val_sequences,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
        sampled_share=args.sampled_share,
        self_chat=self_chat,
        batch_size=args.gen_batch_size,
        reuse=not args.fresh_data,
    )
    train = TrainSettings(
        steps=args.steps if args.steps is not None else DEFAULT_STEPS[args.kind],
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.kind],
        warmup=args.warmup,
        seed=args.seed,
    )
    heads = HeadSettings(
        medusa_heads=getattr(args, "medusa_heads", 4),
        tree_nodes=getattr(args, "tree_nodes", 64),
        passes=getattr(args, "passes", 3),
        reg_weight=getattr(args, "reg_weight", 1.0),
        intermediate_size=getattr(args, "intermediate_size", None),
        draft_vocab=getattr(args, "draft_vocab", None),
        feature_layers=getattr(args, "feature_layers", "auto"),
        pard_k=getattr(args, "pard_k", 8),
        pard_splits=getattr(args, "pard_splits", 16),
    )
    out = run(
        args.kind,
        model=args.model,
        draft=getattr(args, "draft", None),
        out=args.out,
        data=data,
        train=train,
        heads=heads,
        device=args.device,
        dtype=args.dtype,
        val_prompts=args.val_prompts,
        progress=not args.quiet,
        command=f"paradec {shlex.join(sys.argv[1:])}",
    )
    print(out)
    return 0
