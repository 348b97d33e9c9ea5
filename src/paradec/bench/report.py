"""Benchmark outputs: `results.json` (everything, machine-readable), `results.md` (a table per category) and
two PNG plots (speedup by method and category; acceptance by draft position), drawn with matplotlib's Agg canvas.

A summary row counts measured turns (one per prompt with `--turns first`); the metadata records the rendering
(`chat`, whether the model has a chat template), the turns mode and the number of turns measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
from pathlib import Path

import torch

from paradec.bench.harness import DRIFT_WARN, Bench, BenchPlan
from paradec.bench.metrics import RunRecord, Summary, summarize, vanilla_key
from paradec.bench.prompts import categories
from paradec.bench.referee import TIE_ULPS

SCHEMA = "paradec-bench/1"
OVERALL = "all prompts"


def label(method: str, batch_size: int) -> str:
    return method if batch_size == 1 else f"{method}@bs{batch_size}"


def card_name(device_name: str) -> str:
    """A short card name ("H100", "H200") when the device name holds one, else the device name."""
    for card in ("H200", "H100", "A100", "L40S", "A10G", "L4"):
        if card in device_name:
            return card
    return device_name


def environment(device: torch.device) -> dict:
    import transformers

    import paradec

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{device.type} ({platform.machine()}, {threads} thread{'s' if threads != 1 else ''})"
    return {
        "device": str(device),
        "device_name": name,
        "card": card_name(name),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "paradec": paradec.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def weight_bytes(model_dir: str | Path, dtype: torch.dtype) -> int | None:
    """Bytes of the checkpoint's tensors at `dtype` (read from the safetensors headers; None without them)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    numel = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                numel += math.prod(f.get_slice(key).get_shape())
    return numel * torch.empty(0, dtype=dtype).element_size()


def copy_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), the median of `repeats` copies."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size_bytes / statistics.median(times)


def roofline(engine) -> dict | None:
    """The memory-bound limit of batch-1 decoding on CUDA: target weight bytes / measured copy bandwidth."""
    device = engine.target.device
    weights = weight_bytes(engine.config.model, engine.target.dtype)
    if device.type != "cuda" or not weights:
        return None
    bandwidth = copy_bandwidth(device)
    return {
        "weight_bytes": weights,
        "copy_bandwidth_bytes_per_second": bandwidth,
        "tokens_per_second": bandwidth / weights,
    }


def metadata(engine, plan: BenchPlan, *, command: str, argv: str, suite: str | None, prompts_source: str) -> dict:
    """What results.json says about the run: machine, versions, command, models and settings."""
    return {
        **environment(engine.target.device),
        "command": command,
        "argv": argv,
        "suite": suite,
        "model": engine.config.model,
        "draft": engine.config.draft,
        "heads": engine.config.heads,
        "dtype": engine.config.dtype,
        "runner": engine.config.runner,
        "exact": engine.config.exact,
        "roofline": roofline(engine),
        "prompts_source": prompts_source,
        "mode": "greedy" if plan.sampling.greedy else "sample",
        "sampling": None if plan.sampling.greedy else dataclasses.asdict(plan.sampling),
        "max_new_tokens": plan.max_new_tokens,
        "warmup": plan.warmup,
        "repeats": plan.repeats,
        "batch_sizes": list(plan.batch_sizes),
        "samples": plan.samples,
        "chat": plan.chat,
        "chat_template": engine.has_chat_template(),
        "turns": plan.turns,
        "methods": list(plan.methods),
        "peers": list(plan.peers),
    }


def summaries(bench: Bench) -> dict[str, dict[str, Summary]]:
    """{OVERALL or category: {row label: Summary}} over the rows that ran, in run order."""
    vanilla: dict[int, dict] = {}  # batch size -> vanilla_key -> our vanilla's record at that size
    for r in bench.records:
        if r.method == "vanilla":
            vanilla.setdefault(r.batch_size, {})[vanilla_key(r)] = r
    by_row: dict[str, list[RunRecord]] = {}
    for r in bench.records:
        by_row.setdefault(label(r.method, r.batch_size), []).append(r)
    groups = {OVERALL: None, **{c: c for c in categories(bench.prompts)}}
    out: dict[str, dict[str, Summary]] = {}
    for group, category in groups.items():
        rows = {}
        for name, records in by_row.items():
            chosen = [r for r in records if category is None or r.category == category]
            if chosen:
                size = chosen[0].batch_size
                baseline = {**vanilla.get(1, {}), **(vanilla.get(size, {}) if size > 1 else {})}
                rows[name] = summarize(chosen, baseline)
        out[group] = rows
    return out


def results(bench: Bench, meta: dict, *, complete: bool) -> dict:
    greedy = bench.plan.sampling.greedy
    mismatches = bench.mismatches()
    return {
        "schema": SCHEMA,
        "complete": complete,
        "meta": {
            **meta,
            "templated_prompts": sum(bench.rendering.templated(p) for p in bench.prompts),
            "turns_measured": sum(bench.turn_counts),
        },
        "rows": [dataclasses.asdict(o) for o in bench.outcomes],
        "summary": {
            group: {name: dataclasses.asdict(s) for name, s in rows.items()} for group, rows in summaries(bench).items()
        },
        "exactness": {
            "checked": greedy,
            "ok": not mismatches if greedy else None,
            "mismatches": [_mismatch(r) for r in mismatches],
            "near_ties": [_mismatch(r) for r in bench.near_ties()],
            "not_compared": list(bench.not_compared) if greedy else [],
        },
        "prompts": [
            {
                "id": p.id,
                "category": p.category,
                "chat": bench.rendering.templated(p),
                "tokens": len(ids),  # the first turn's
                "turns": turns,
            }
            for p, ids, turns in zip(bench.prompts, bench.prompt_tokens, bench.turn_counts)
        ],
        "records": [dataclasses.asdict(r) for r in bench.records],
        # vanilla re-timed after the other batch-1 methods (None: not run): ratio = again / first, per token
        "drift": bench.drift,
        "batched_drift": {str(size): entry for size, entry in bench.batched_drift.items()},
    }


def _mismatch(record) -> dict:
    out = {
        "method": label(record.method, record.batch_size),
        "prompt": record.mismatch_prompt or record.prompt_ids[0],
        "first_mismatch": record.first_mismatch,
    }
    return out if record.ruling is None else {**out, "ruling": record.ruling["text"]}


def _mismatch_line(m: dict) -> str:
    line = f"- {m['method']} on prompt {m['prompt']!r}, first differing token {m['first_mismatch']}"
    return line + (f": {m['ruling']}" if "ruling" in m else "")


def _not_compared_lines(entries: list[dict]) -> list[str]:
    by_row: dict[str, list[str]] = {}
    for entry in entries:
        by_row.setdefault(label(entry["method"], entry["batch_size"]), []).append(entry["prompt"])
    lines = [
        "",
        "Later turns not compared: a row's turn k is compared with vanilla's only when the row answered turns "
        "1..k-1 as vanilla did (its context is then vanilla's); after a different answer the two hold different "
        "conversations. Not compared:",
    ]
    return lines + [f"- {name}: {', '.join(repr(p) for p in prompts)}" for name, prompts in by_row.items()]


def _rendering_text(meta: dict, prompts: int) -> str:
    templated = meta["templated_prompts"]
    if templated == prompts:
        how = "chat template"
    elif templated == 0:
        how = "raw text" + (
            "" if meta["chat_template"] or meta["chat"] == "off" else ", as the model has no chat template"
        )
    else:
        how = f"chat template for {templated} of {prompts} prompts, raw text for the rest"
    return f"- rendering: {how} (--chat {meta['chat']}); turns: {meta['turns']}, {meta['turns_measured']} measured"


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _acceptance(values: list[float], shown: int = 6) -> str:
    if not values:
        return "–"
    text = " ".join(f"{v:.2f}" for v in values[:shown])
    return text + (" …" if len(values) > shown else "")


def _exact_cell(summary: Summary, row: dict | None, greedy: bool) -> str:
    if summary.method == "vanilla":
        return "reference" if greedy else "–"
    if summary.compared is None:
        return "–"
    cell = f"{summary.matches}/{summary.compared}"
    if row is not None and row["kind"] == "peer":
        return cell + " (HF)"
    if summary.matches != summary.compared:
        if row is not None and row["lossy"]:
            return cell + " (lossy)"
        if summary.matches + summary.near_ties == summary.compared:
            return cell + f" ({summary.near_ties} near-tie{'s' if summary.near_ties > 1 else ''})"
        return cell + " **MISMATCH**"
    return cell


def _sampling_text(sampling: dict, samples: int = 1) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sampling.items() if k != "seed")
    if samples > 1:
        return f"{text}; sample j of prompt i sampled with seed {sampling['seed']} + {samples}·i + j"
    return f"{text}; prompt i sampled with seed {sampling['seed']} + i"


def _table(rows: dict[str, Summary], outcomes: dict[str, dict], greedy: bool) -> list[str]:
    lines = [
        "| method | batch | tokens/s | speedup | speedup (mean per prompt) | τ | acceptance by position | = vanilla |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s.batch_size} | {s.tokens_per_second:.1f} | {_num(s.speedup, '.2f', '×')} | "
            f"{_num(s.speedup_mean, '.2f', '×')} | {_num(s.tau, '.2f')} | {_acceptance(s.acceptance_by_position)} | "
            f"{_exact_cell(s, outcomes.get(name), greedy)} |"
        )
    return lines


def _batch_steps_lines(records: list[dict]) -> list[str]:
    """The batched rows' decode steps by kind (`paradec.batch.StepCounts`, timed passes summed), if any."""
    rows: dict[str, dict] = {}
    for r in records:
        counts = r.get("batch_steps")
        if counts:
            total = rows.setdefault(label(r["method"], r["batch_size"]), dict.fromkeys(counts, 0))
            for key, value in counts.items():
                total[key] += value
    if not rows:
        return []
    lines = [
        "## Batched steps",
        "",
        "Decode steps of the timed batched runs by kind (with repeats, the repeat whose time is the row's median): "
        "speculative (the policy let the drafters propose; capped: cut "
        "to a depth), without proposals (launched before the step in flight landed: overlapped), drained (a step in "
        "flight landed early because the next one had proposals), and those that met a new CUDA graph bucket (its "
        "first use runs eagerly, its second captures it; their seconds are inside the row's wall time); shadow "
        "drafts: drafts made while speculation was off and decided by the tokens the target then emitted (never "
        "scored: the policy's estimates); dropped: speculative steps run without their proposals because they would "
        "have met a new graph bucket too few steps had asked for yet; left out: sequences of speculative steps that went "
        "without their proposals, as the policy chose (sequence-steps).",
        "",
        "| row | steps | speculative | capped | without proposals | overlapped | drained | new bucket (s) | shadow drafts "
        "| dropped | left out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in rows.items():
        lines.append(
            f"| {name} | {c['steps']} | {c['speculative']} | {c['capped']} | {c['plain']} | {c['overlapped']} | "
            f"{c['drained']} | {c['captured']} ({c['capture_seconds']:.2f}) | {c.get('shadows', 0)} | "
            f"{c.get('dropped', 0)} | {c.get('left_out', 0)} |"
        )
    return [*lines, ""]


def markdown(data: dict) -> str:
    meta, greedy = data["meta"], data["exactness"]["checked"]
    outcomes = {label(o["method"], o["batch_size"]): o for o in data["rows"]}
    counts = {OVERALL: len(data["prompts"])}  # prompts per group (a summary row counts measured turns)
    for prompt in data["prompts"]:
        counts[prompt["category"]] = counts.get(prompt["category"], 0) + 1
    turns = {group: next(iter(rows.values()))["prompts"] for group, rows in data["summary"].items() if rows}
    lines = [f"# paradec bench: {meta['card']}, {meta['date'][:10]}", ""]
    if not data["complete"]:
        lines += ["**Incomplete: the run stopped before every method finished.**", ""]
    lines += [
        f"`{meta['command']}`",
        "",
        f"- model `{meta['model']}`, draft `{meta['draft']}`, heads `{meta['heads']}`",
        f"- device {meta['device_name']} ({meta['device']}), dtype {meta['dtype']}, runner {meta['runner']}; "
        f"torch {meta['torch']}, transformers {meta['transformers']}, paradec {meta['paradec']}",
        f"- prompts: {meta['prompts_source']}; {counts[OVERALL]} prompts; "
        f"max_new_tokens {meta['max_new_tokens']}; warm-up {meta['warmup']}; repeats {meta['repeats']} (median)",
        _rendering_text(meta, counts[OVERALL]),
        f"- mode: {meta['mode']}"
        + ("" if greedy else f" ({_sampling_text(meta['sampling'], meta.get('samples', 1))})"),
    ]
    if meta.get("samples", 1) > 1:
        n = meta["samples"]
        lines.append(
            f"- n = {n} samples of each prompt, decoded together (one request of n: the rows' @bs{n}); speedups "
            f"are against vanilla's {n} samples, tokens/s counts every sample's"
        )
    if meta.get("roofline"):
        r = meta["roofline"]
        lines.append(
            f"- memory-bound limit of batch-1 decoding: {r['tokens_per_second']:.0f} tokens/s (target weights "
            f"{r['weight_bytes'] / 1e6:.0f} MB / measured copy bandwidth {r['copy_bandwidth_bytes_per_second'] / 1e9:.0f} GB/s)"
        )
    drift = data.get("drift")
    if drift and drift.get("ratio"):
        ratio = drift["ratio"]
        lines.append(
            f"- vanilla re-timed after the other methods: {ratio:.3f}× its first seconds per token"
            + (
                f" (**the card's speed moved by {abs(ratio - 1):.0%} during the run: every ratio here carries that**)"
                if abs(ratio - 1) > DRIFT_WARN
                else f" (within {DRIFT_WARN:.0%}: the card's speed held)"
            )
        )
    for size, entry in sorted((data.get("batched_drift") or {}).items(), key=lambda kv: int(kv[0])):
        ratio = entry.get("ratio")
        if not ratio:
            continue
        lines.append(
            f"- vanilla@bs{size} re-timed after the other methods of its size: {ratio:.3f}× its first seconds per "
            "token"
            + ("; the faster (second) pass is the reference of this size's speedups" if ratio < 1 else "")
            + (f" (**moved by {abs(ratio - 1):.0%}**)" if abs(ratio - 1) > DRIFT_WARN else "")
        )
    lines.append("")
    if greedy:
        mismatches = data["exactness"]["mismatches"]
        near_ties = data["exactness"].get("near_ties", [])
        where = "on every prompt" if meta["turns_measured"] == counts[OVERALL] else "on every compared turn"
        if mismatches:
            lines.append("**EXACTNESS FAILURE: these outputs differ from vanilla's:**")
            lines += [_mismatch_line(m) for m in mismatches]
        elif near_ties:
            lines.append(
                f"Greedy exactness: every lossless paradec method emitted vanilla's tokens {where}, except at "
                "the near-ties below."
            )
        else:
            lines.append(f"Greedy exactness: every lossless paradec method emitted vanilla's tokens {where}.")
        if meta.get("exact"):
            lines.append(
                "The target ran the batch-invariant kernels (`exact`): bitwise equality is the test, no near-ties."
            )
        if near_ties:
            lines += [
                "",
                f"Near-ties: outputs that differ from vanilla's first where the model's two tokens tie within "
                f"{data['meta']['dtype']} rounding (the referee, `transformers` in higher "
                f"precision, puts both within {TIE_ULPS:g} epsilons of its best logit). Not failures; every token "
                f"after such a point follows from a different context.",
            ]
            lines += [_mismatch_line(m) for m in near_ties]
        if data["exactness"]["not_compared"]:
            lines += _not_compared_lines(data["exactness"]["not_compared"])
        lines.append("")
    for group, rows in data["summary"].items():
        if not rows or (group != OVERALL and len(data["summary"]) == 2):
            continue  # one category: its table is the overall one
        heading = f"{counts[group]} prompt{'s' if counts[group] != 1 else ''}"
        if turns[group] != counts[group]:
            heading += f", {turns[group]} turns"
        lines += [f"## {group} ({heading})", ""]
        lines += _table({name: Summary(**s) for name, s in rows.items()}, outcomes, greedy)
        lines.append("")
    lines += _batch_steps_lines(data.get("records", []))
    lines += ["## Rows", ""]
    for name, o in outcomes.items():
        settings = ", ".join(f"{k}={v}" for k, v in o["options"].items()) or "defaults"
        status = "" if o["status"] == "ok" else f" — **{o['status']}**: {o['reason']}"
        kind = "Hugging Face peer" if o["kind"] == "peer" else "paradec" + (", lossy" if o["lossy"] else "")
        lines.append(f"- `{name}` ({kind}): {settings}{status}")
    lines += [
        "",
        "## How to read this",
        "",
        "- tokens/s: new tokens / wall seconds, summed over the prompts; each generation timed between CUDA "
        "synchronisations after warm-up (prefill included, tokenization not).",
        "- speedup: our vanilla's seconds per token / the row's seconds per token on the same prompts (ratio of sums; "
        "the next column is the mean of per-prompt ratios). With greedy outputs equal to vanilla's this is the ratio "
        "of wall times.",
        "- τ: new tokens / target forwards (mean tokens per step; vanilla 1). For HF peers the forwards are counted "
        "with a hook on the target model. Acceptance by position i: share of steps that accepted draft position i.",
        "- = vanilla: outputs identical to our vanilla's token ids (greedy only). For HF peers this is informational: "
        "`transformers` runs its own kernels and cache and may round differently, so a differing token there is not "
        "a paradec error.",
        "- batch: rows at batch size > 1 (`@bsN`) decode their prompts N at a time (paradec's continuous batching, or "
        "`transformers` `generate` peers, left-padded); tokens/s is throughput over the batch, speedups are against "
        "our vanilla at the same batch size, and τ is per sequence.",
    ]
    if meta["turns"] == "all":
        lines.append(
            "- turns: each turn of a conversation is one timed generation, asked after the row's own answers to the "
            "earlier turns (ids `<prompt>/turn-<k>`); sums, speedups and τ are over turns."
        )
    return "\n".join(lines) + "\n"


def plot_speedup(data: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g for g, rows in data["summary"].items() if rows]
    groups = groups if len(groups) > 2 else groups[:1]  # one category: its bars are the overall ones
    names = [n for n in dict.fromkeys(n for g in groups for n in data["summary"][g]) if n != "vanilla"]
    peers = {label(o["method"], o["batch_size"]) for o in data["rows"] if o["kind"] == "peer"}
    fig = Figure(figsize=(max(6.0, 2.0 + len(groups) * (0.2 * len(names) + 0.4)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        values = [(data["summary"][g].get(name) or {}).get("speedup") or 0.0 for g in groups]
        x = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(x, values, width, label=name, hatch="//" if name in peers else None)  # peers hatched
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("speedup over paradec vanilla")
    ax.set_title(f"paradec bench: speedup by method and category ({data['meta']['card']})")
    if names:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_acceptance(data: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for name, s in data["summary"].get(OVERALL, {}).items():
        values = s["acceptance_by_position"]
        if values:
            ax.plot(range(1, len(values) + 1), values, marker="o", label=f"{name} (τ {s['tau']:.2f})")
            drawn = True
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("draft position")
    ax.set_ylabel("share of steps accepting it")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"paradec bench: acceptance by position ({data['meta']['card']})")
    if drawn:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(out: Path, bench: Bench, meta: dict, *, complete: bool) -> dict:
    """Write results.json and results.md (and, when complete, the plots) into `out`; returns the JSON data."""
    out.mkdir(parents=True, exist_ok=True)
    data = results(bench, meta, complete=complete)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(markdown(data))
    if complete:
        plot_speedup(data, out / "speedup.png")
        plot_acceptance(data, out / "acceptance.png")
    return data
