"""Replay a token-only drafter (pld, suffix, ...) over a bench run's recorded greedy outputs: the τ it would reach on
those outputs, exactly, without the target model.

Under greedy decoding a step accepts the longest path of the proposal that spells the target's own continuation and
then emits the target's next token; the target's continuation is vanilla's output, which `paradec bench` records
(`results.json`, vanilla's `token_ids`). A drafter that reads only tokens (not hidden states or logits) therefore
replays exactly: the same proposals, the same accepted lengths, the same steps, on any machine, in seconds. (Where
the bench's own row of the method differs from vanilla's after a near-tie, the replay follows vanilla's text.) The
prompts are rendered as the bench rendered them (its suite file and the model's tokenizer and chat template: give
the model's directory; with `--turns all`, a later turn after vanilla's own earlier answers, as the bench asked it).
The prompts are replayed in the run's order, so a method's engine-lifetime state (suffix's trie of earlier outputs)
grows as in the bench's timed pass.

    python scripts/replay_drafter.py bench/results/m5-h200-2026-12-02/q15-agentic \
        --model ~/.cache/paradec/models/qwen2.5-coder-1.5b-instruct --method pld --method suffix \
        --method suffix:min_match=2,match_factor=2

With `--samples n` (one request of n samples per prompt: the records keep each sample's tokens) the samples are
replayed together, step by step as a batch decodes them, so `multisample` drafts from its siblings; the recorded
samples being draws of the target, a sampled run replays in distribution (`replay_samples`).

Prints, per category and overall: τ (tokens per target step, per sample), draft tokens scored per step, and the share
of those accepted. Speed is not replayed: a step's cost depends on the card (see the bench's ms per step).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

from paradec.bench.prompts import DATA_DIR, BenchPrompt, Rendering, load_prompts
from paradec.chat import chat_text
from paradec.config import SamplingParams
from paradec.drafters import get_drafter
from paradec.drafters.base import DecodeState, parse_options
from paradec.tree import build_tree, chain_parents
from paradec.types import Verdict

MAX_PROPOSAL = 127  # the native runner's largest step bucket (128 inputs) less the pending token


def accept(tokens: list[int], parents: tuple[int, ...] | None, truth: list[int]) -> list[int]:
    """The proposal nodes greedy verification accepts: the deepest path whose tokens equal `truth`'s prefix."""
    if parents is None:
        parents = chain_parents(len(tokens))
    children: dict[int, list[int]] = defaultdict(list)
    for index, parent in enumerate(parents):
        children[parent].append(index)
    path, node = [], -1
    for want in truth:
        node = next((child for child in children[node] if tokens[child] == want), None)
        if node is None:
            break
        path.append(node)
    return path


def replay(method, options, prompt_ids: list[int], output: list[int], max_new_tokens: int) -> tuple[int, int, int]:
    """(target steps, draft tokens scored, draft tokens accepted) of one generation of `output` after `prompt_ids`
    under the limit of `max_new_tokens` (a step drafts at most what the limit leaves after its pending token, as
    the decode loop does). The first step is the prefill's, which drafts from the prompt alone, as in the loop."""
    drafter = method.open(options)
    state = _state(list(prompt_ids), len(prompt_ids))  # the prompt's last token: the first step's pending input
    drafter.begin(state)
    steps = proposed = accepted = emitted = 0
    while emitted < len(output):
        draft, parents = _draft(drafter, state, min(MAX_PROPOSAL, max_new_tokens - emitted - 1))
        path, new = _take(draft, parents, output[emitted:])
        state.tokens.extend(new)
        emitted += len(new)
        steps, proposed, accepted = steps + 1, proposed + len(draft), accepted + len(path)
        drafter.update(state, _verdict(draft, parents, path, new))
    drafter.close()
    return steps, proposed, accepted


def replay_samples(
    method, options, prompt_ids: list[int], outputs: list[list[int]], max_new_tokens: int
) -> tuple[int, int, int]:
    """`replay` for the n samples of one request decoded together (`--samples`), in lockstep as a batch steps
    them: every sample proposes from what all of them emitted by the end of the last step (a drafter that reads its
    siblings, `multisample`, sees their tokens through `Siblings`), then each takes its verdict against its own
    recorded output. Sampled outputs make this a replay in distribution: a point-mass draft token is accepted
    exactly when it equals the target's sample there, which the recorded sample is a draw of. Totals over the
    samples (steps per sample, as the bench counts them)."""
    from paradec.batch import Siblings, TokenView

    n, shared = len(outputs), {}
    tokens = [list(prompt_ids) for _ in range(n)]
    views = [TokenView(tokens[i], len(prompt_ids), i) for i in range(n)]

    def lent(i: int) -> SimpleNamespace:
        others = [views[j] for j in range(n) if j != i]
        return SimpleNamespace(target=method.resources.target, siblings=lambda: Siblings(i, lambda: others, shared))

    drafters, states = [], []
    for i in range(n):
        state = _state(tokens[i], len(prompt_ids))
        drafter = method.open_for(lent(i), options)
        drafter.begin(state)
        drafters.append(drafter)
        states.append(state)
    emitted = [0] * n
    steps = proposed = accepted = 0
    while any(e < len(out) for e, out in zip(emitted, outputs, strict=True)):
        live = [i for i in range(n) if emitted[i] < len(outputs[i])]
        drafts = {i: _draft(drafters[i], states[i], min(MAX_PROPOSAL, max_new_tokens - emitted[i] - 1)) for i in live}
        for i in live:
            draft, parents = drafts[i]
            path, new = _take(draft, parents, outputs[i][emitted[i] :])
            states[i].tokens.extend(new)
            emitted[i] += len(new)
            steps, proposed, accepted = steps + 1, proposed + len(draft), accepted + len(path)
            drafters[i].update(states[i], _verdict(draft, parents, path, new))
    for drafter in drafters:
        drafter.close()
    return steps, proposed, accepted


def _state(tokens: list[int], prompt_len: int) -> DecodeState:
    return DecodeState(
        tokens=tokens,
        prompt_len=prompt_len,
        sampling=SamplingParams(),
        generator=None,
        device="cpu",
        vocab_size=1 << 20,
    )


def _draft(drafter, state: DecodeState, max_tokens: int) -> tuple[list[int], tuple[int, ...] | None]:
    """A host drafter's draft, or a drafter's proposal as host lists."""
    if hasattr(drafter, "draft"):
        return drafter.draft(state, max_tokens)
    proposal = drafter.propose(state, max_tokens)
    return proposal.tokens.tolist(), proposal.parents


def _take(draft: list[int], parents, truth: list[int]) -> tuple[list[int], list[int]]:
    """(accepted node indices, emitted tokens) of a greedy-style verdict against `truth`."""
    path = accept(draft, parents, truth)
    return path, [draft[i] for i in path] + truth[len(path) : len(path) + 1]


def _verdict(draft: list[int], parents, path: list[int], new: list[int]) -> Verdict:
    depth = len(draft) if parents is None else build_tree(parents).max_depth
    return Verdict(path=path, tokens=new, proposed=len(draft), depth=depth)


def parse_method(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a `paradec bench` output folder (its results.json)")
    parser.add_argument("--model", required=True, help="the target's directory (its tokenizer and chat template)")
    parser.add_argument("--method", action="append", required=True, help="NAME[:opt=value,...]; repeatable")
    parser.add_argument("--per-prompt", action="store_true", help="also print each prompt's τ")
    parser.add_argument(
        "--prompts", type=Path, help="the run's prompt file (default: the suite file its report names, found here)"
    )
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    results = json.loads((args.results / "results.json").read_text())
    meta = results["meta"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = meta.get("samples", 1) > 1  # `--samples n`: each record holds its n samples' tokens
    records = [
        r
        for r in results["records"]
        if r["method"] == "vanilla" and (r.get("sample_token_ids") if samples else r["batch_size"] == 1)
    ]
    if not records:
        print(f"{args.results}: no vanilla rows with recorded tokens to replay", file=sys.stderr)
        return 2
    by_id = {p.id: p for p in (load_prompts(args.prompts) if args.prompts else _suite_prompts(meta))}
    rendering = Rendering(chat=meta.get("chat", "auto"), turns="first", template=tokenizer.chat_template is not None)
    outputs = {r["prompt_ids"][0]: r["token_ids"] for r in records}  # (None for samples: first turns only)

    def encode(turn: str) -> list[int]:
        """Turn `id` or `id/turn-k`: its prompt ids as the bench built them, a later turn after vanilla's own
        answers to the earlier ones (`--turns all`)."""
        pid, _, k = turn.partition("/turn-")
        prompt, asked = by_id[pid], int(k or 1) - 1
        if rendering.templated(prompt):
            earlier = [pid] + [f"{pid}/turn-{j + 1}" for j in range(1, asked)]
            answers = [tokenizer.decode(outputs[t], skip_special_tokens=True).strip() for t in earlier[:asked]]
            text = chat_text(tokenizer, prompt.conversation(answers))
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(prompt.text)["input_ids"])

    encoded = [(r, encode(r["prompt_ids"][0])) for r in records]
    resources = SimpleNamespace(target=SimpleNamespace(max_length=1 << 30, vocab_size=1 << 20, max_step_inputs=128))
    truths = {id(r): r["sample_token_ids"] if samples else [r["token_ids"]] for r in records}
    total = sum(len(t) for r in records for t in truths[id(r)])
    print(f"{args.results}: {len(records)} prompts, {total} vanilla tokens")
    print("| method | category | τ | draft tokens / step | accepted share |")
    print("|---|---|---:|---:|---:|")
    for spec in args.method:
        name, values = parse_method(spec)
        cls = get_drafter(name)
        method = cls.method_class(resources, cls)
        options = parse_options(cls, values)
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for record, prompt_ids in encoded:
            outs, limit = truths[id(record)], meta["max_new_tokens"]
            if samples:
                steps, proposed, accepted = replay_samples(method, options, prompt_ids, outs, limit)
            else:
                steps, proposed, accepted = replay(method, options, prompt_ids, outs[0], limit)
            emitted = sum(len(o) for o in outs)
            for key in ("all", record["category"]):
                t = totals[key]
                t[0], t[1], t[2], t[3] = t[0] + emitted, t[1] + steps, t[2] + proposed, t[3] + accepted
            if args.per_prompt:
                print(
                    f"| {spec} | {record['prompt_ids'][0]} | {emitted / steps:.2f} | {proposed / steps:.1f} | "
                    f"{accepted / max(proposed, 1):.2f} |"
                )
        for key, (tokens, steps, proposed, accepted) in sorted(totals.items(), key=lambda kv: kv[0] != "all"):
            print(
                f"| {spec} | {key} | {tokens / steps:.2f} | {proposed / steps:.1f} | {accepted / max(proposed, 1):.2f} |"
            )
    return 0


def _suite_prompts(meta: dict) -> list[BenchPrompt]:
    """The run's prompt records: the file its report names (a path on the machine that ran it), found by its name
    among this package's suite files."""
    source = str(meta.get("prompts_source", "")).split(" ")[0]
    local = DATA_DIR / Path(source).name
    if not source or not local.exists():
        raise SystemExit(f"cannot find the run's prompt file ({source!r}) among {DATA_DIR}")
    return load_prompts(local)


if __name__ == "__main__":
    raise SystemExit(main())
