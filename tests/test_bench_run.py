"""`paradec bench` end to end on tiny random models: output files, exactness check, skips, crashes, bad input."""

from __future__ import annotations

import json

import pytest

import paradec
from paradec.bench import report
from paradec.bench.cli import run_bench
from paradec.bench.harness import Bench, BenchPlan, parse_method_options
from paradec.bench.prompts import BenchPrompt
from paradec.cli import main
from paradec.config import SamplingParams
from paradec.errors import ParadecError

PROMPTS = [
    {"id": "fib", "category": "code", "prompt": "def fibonacci(n):\n"},
    {"id": "stack", "category": "code", "prompt": "class Stack:\n    def __init__(self):\n"},
    {"question_id": 3, "category": "prose", "turns": ["The quick brown fox", "ignored"]},
]
BENCH_PROMPTS = [BenchPrompt("fib", "code", "def fibonacci(n):\n"), BenchPrompt("fox", "prose", "The quick brown")]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def engine(model_dirs):
    return paradec.load(model_dirs["llama"], model_dirs["llama-draft"], device="cpu", runner="hf")


def meta(engine, bench_plan: BenchPlan) -> dict:
    return report.metadata(engine, bench_plan, command="test", argv="test", suite=None, prompts_source="test")


def plan(methods=("vanilla", "pld", "draft"), *, explicit=True, **kw) -> BenchPlan:
    return BenchPlan(
        methods=methods,
        explicit=explicit,
        options=parse_method_options([], methods),
        sampling=kw.pop("sampling", SamplingParams()),
        max_new_tokens=kw.pop("max_new_tokens", 8),
        warmup=kw.pop("warmup", 0),
        **kw,
    )


def test_smoke_run_writes_every_output(model_dirs, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "bench", "--model", str(model_dirs["llama"]), "--draft", str(model_dirs["llama-draft"]), "--runner", "hf",
        "--device", "cpu", "--prompts", str(prompts_file), "--methods", "pld,draft", "--opt", "draft.k=3",
        "--peers", "hf-vanilla,hf-assisted,hf-pld", "--batch-sizes", "1,2", "--max-new-tokens", "12", "--out", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "speedup.png", "acceptance.png"}
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["exactness"] == {
        "checked": True, "ok": True, "mismatches": [], "near_ties": [], "not_compared": []
    }  # fmt: skip
    assert data["meta"]["chat"] == "auto" and data["meta"]["turns"] == "first" and data["meta"]["turns_measured"] == 3
    assert data["meta"]["chat_template"] is False and data["meta"]["templated_prompts"] == 0
    assert (
        data["meta"]["device"] == "cpu"
        and data["meta"]["transformers"]
        and "--opt draft.k=3" in data["meta"]["command"]
    )
    overall = data["summary"]["all prompts"]
    assert list(overall) == ["vanilla", "pld", "draft", "hf-vanilla", "hf-vanilla@bs2", "hf-assisted", "hf-pld"]
    assert (
        set(data["summary"]) == {"all prompts", "code", "prose"} and data["summary"]["prose"]["draft"]["prompts"] == 1
    )
    assert overall["vanilla"]["speedup"] == pytest.approx(1.0) and overall["vanilla"]["tau"] == 1.0
    assert overall["draft"]["matches"] == overall["draft"]["compared"] == 3
    assert len(overall["draft"]["acceptance_by_position"]) == 3  # k=3 positions, accepted or not
    assert overall["hf-vanilla"]["tau"] == 1.0  # counted forwards: one per token
    assert overall["hf-vanilla@bs2"]["tau"] is None and overall["hf-vanilla@bs2"]["batch_size"] == 2
    rows = {(r["method"], r["batch_size"]): r for r in data["rows"]}
    assert rows[("hf-assisted", 1)]["options"]["num_assistant_tokens"] == 3  # configured like our draft
    records = {(r["method"], r["prompt_ids"][0]): r for r in data["records"] if r["batch_size"] == 1}
    for pid in ("fib", "stack", "3"):
        # assisted generation with a constant k = 3 takes the steps our `draft` takes
        assert records[("hf-assisted", pid)]["steps"] == records[("draft", pid)]["steps"]
        assert records[("draft", pid)]["token_ids"] == records[("vanilla", pid)]["token_ids"]
    md = (out / "results.md").read_text()
    assert "## code (2 prompts)" in md and "| draft | 1 |" in md and "every lossless paradec method" in md
    assert "| vanilla | 1 |" in captured.out  # the tables are printed too


class Corrupting:
    """The real engine, but one method's output gets one token changed (or the method crashes)."""

    def __init__(self, engine, method: str, *, crash: bool = False) -> None:
        self._engine, self._method, self._crash = engine, method, crash

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, request):
        result = self._engine.generate(request)
        if request.method == self._method and len(result.token_ids) > 1:
            if self._crash:
                raise RuntimeError("drafter blew up")
            result.token_ids[1] = (result.token_ids[1] + 1) % self._engine.target.vocab_size
        return result


class CorruptingBatch(Corrupting):
    """The second row of every batch of one method gets its third token changed (its runs alone are left as they are)."""

    def generate(self, request):
        return self._engine.generate(request)

    def generate_batch(self, requests, **kw):
        results = self._engine.generate_batch(requests, **kw)
        if requests[0].method == self._method and len(results) > 1 and len(results[1].token_ids) > 2:
            results[1].token_ids[2] = (results[1].token_ids[2] + 1) % self._engine.target.vocab_size
        return results


def test_a_batched_row_differing_from_vanilla_names_its_prompt(model_dirs, tmp_path, capsys):
    engine = paradec.load(model_dirs["llama"], device="cpu", runner="native")
    bench_plan = plan(("vanilla", "pld"), batch_sizes=(1, 2))
    code = run_bench(
        CorruptingBatch(engine, "pld"), BENCH_PROMPTS, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True
    )
    assert code == 1
    assert "EXACTNESS FAILURE: pld@bs2 differs from vanilla on prompt 'fox' from new token 2" in capsys.readouterr().err
    data = json.loads((tmp_path / "results.json").read_text())
    (mismatch,) = data["exactness"]["mismatches"]
    assert {k: mismatch[k] for k in ("method", "prompt", "first_mismatch")} == {
        "method": "pld@bs2", "prompt": "fox", "first_mismatch": 2
    }  # fmt: skip
    assert "float64 logits" in mismatch["ruling"]  # the referee ruled on the batch's row: not a near-tie


def test_a_batched_row_at_a_near_tie_is_reported_and_does_not_fail_the_run(model_dirs, tmp_path, monkeypatch):
    """A batch's rows round like any forward of their shape: the referee rules on the differing row as on a row
    decoded alone (bf16 batches differ from vanilla alone at near-ties unless exact)."""
    from paradec.bench import referee

    monkeypatch.setattr(referee, "TIE_ULPS", 1e12)
    engine = paradec.load(model_dirs["llama"], device="cpu", runner="native")
    bench_plan = plan(("vanilla", "pld"), batch_sizes=(1, 2))
    code = run_bench(
        CorruptingBatch(engine, "pld"), BENCH_PROMPTS, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and data["exactness"]["ok"] and data["exactness"]["mismatches"] == []
    assert [(m["method"], m["prompt"], m["first_mismatch"]) for m in data["exactness"]["near_ties"]] == [
        ("pld@bs2", "fox", 2)
    ]


def test_an_output_differing_from_vanilla_fails_the_run(engine, tmp_path, capsys):
    code = run_bench(Corrupting(engine, "pld"), BENCH_PROMPTS, plan(), meta(engine, plan()), tmp_path, quiet=True)
    assert code == 1
    assert "EXACTNESS FAILURE: pld differs from vanilla on prompt 'fib' from new token 1" in capsys.readouterr().err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["exactness"]["ok"] is False
    assert {(m["method"], m["first_mismatch"]) for m in data["exactness"]["mismatches"]} == {("pld", 1)}
    assert data["summary"]["all prompts"]["pld"]["matches"] == 0
    assert data["summary"]["all prompts"]["draft"]["matches"] == 2
    assert "EXACTNESS FAILURE" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "speedup.png").exists()


def test_a_crashing_method_is_recorded_and_the_rest_runs(engine, tmp_path, capsys):
    crashing = Corrupting(engine, "pld", crash=True)
    code = run_bench(crashing, BENCH_PROMPTS, plan(), meta(engine, plan()), tmp_path, quiet=True)
    assert code == 1 and "pld failed: RuntimeError: drafter blew up" in capsys.readouterr().err
    data = json.loads((tmp_path / "results.json").read_text())
    status = {r["method"]: r["status"] for r in data["rows"]}
    assert status == {"vanilla": "ok", "pld": "failed", "draft": "ok"}
    assert "pld" not in data["summary"]["all prompts"] and "draft" in data["summary"]["all prompts"]


def test_methods_that_cannot_run_are_skipped_unless_named(model_dirs):
    no_draft = paradec.load(model_dirs["llama"], device="cpu", runner="hf")
    bench = Bench(no_draft, BENCH_PROMPTS[:1], plan(("vanilla", "draft"), explicit=False), progress=False)
    bench.run()
    skipped = {o.method: o.reason for o in bench.outcomes if o.status == "skipped"}
    assert list(skipped) == ["draft"] and "needs a draft model" in skipped["draft"]
    assert [r.method for r in bench.records] == ["vanilla"]
    with pytest.raises(ParadecError, match="needs a draft model"):
        Bench(no_draft, BENCH_PROMPTS[:1], plan(("vanilla", "draft")), progress=False).run()


def test_sample_mode_skips_the_exactness_check(engine, tmp_path):
    sampling = SamplingParams(temperature=0.8, seed=5)
    bench_plan = plan(("vanilla", "draft"), sampling=sampling, peers=("hf-vanilla",))
    assert run_bench(engine, BENCH_PROMPTS, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["exactness"]["checked"] is False and all(r["equals_vanilla"] is None for r in data["records"])
    assert data["summary"]["all prompts"]["draft"]["tau"] >= 1.0
    # prompt i is sampled with seed 5 + i, the same for every method: vanilla reproduces itself
    again = engine.generate(engine.encode(BENCH_PROMPTS[1].text), sampling=SamplingParams(temperature=0.8, seed=6),
                            max_new_tokens=8)  # fmt: skip
    assert again.token_ids == next(r["token_ids"] for r in data["records"] if r["prompt_ids"] == ["fox"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "pld,nosuch"], "unknown method 'nosuch'"),
        (["--opt", "draft.nope=1"], "unknown option 'nope' for method 'draft'"),
        (["--opt", "k=5"], "--opt k=5: expected METHOD.NAME=VALUE"),
        (["--methods", "pld", "--opt", "draft.k=2"], "method 'draft' is not benchmarked"),
        (["--batch-sizes", "1,0"], "--batch-sizes: batch size must be >= 1, got 0"),
        (["--batch-sizes", "1,x", "--peers", "hf"], "--batch-sizes: 'x' is not an integer"),
        (["--peers", "vllm"], "unknown peer 'vllm'"),
        (["--temperature", "0.5"], "--temperature applies to --mode sample"),
        (["--mode", "sample", "--temperature", "0"], "--temperature 0 is greedy decoding"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--suite", "code", "--device", "cpu"], "--suite code measures the zoo's bench pair"),
    ],
)
def test_bad_arguments_exit_2(args, message, capsys):
    assert main(["bench", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paradec: error: ") and message in err


def test_malformed_prompts_file_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["bench", "--device", "cpu", "--prompts", str(path)]) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err


class Recording:
    """An engine wrapper that records (prompt, max_new_tokens) of every generation."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, request):
        self.calls.append((request.prompt_ids, request.max_new_tokens))
        return self.engine.generate(request)


def test_warm_up_covers_every_prompt_before_timing(engine):
    recording = Recording(engine)
    bench = Bench(recording, BENCH_PROMPTS, plan(("vanilla",), warmup=1, repeats=2), progress=False)
    bench.run()
    full = [prompt for prompt, n in recording.calls if n == 8]
    # every prompt once untimed, then each prompt's timed repeats: the timed runs meet no new shapes
    assert full[:2] == [tuple(p) for p in bench.prompt_tokens]
    assert full[2:] == [tuple(bench.prompt_tokens[0])] * 2 + [tuple(bench.prompt_tokens[1])] * 2


def test_a_corrupted_token_is_ruled_a_failure_not_a_near_tie(engine, tmp_path, capsys):
    """The referee scores the context in float64 (the engine runs float32): a token that is not the model's best
    is far outside float32 rounding, so the run still fails, and the ruling says why."""
    code = run_bench(Corrupting(engine, "draft"), BENCH_PROMPTS, plan(), meta(engine, plan()), tmp_path, quiet=True)
    err = capsys.readouterr().err
    assert code == 1 and "EXACTNESS FAILURE: draft differs" in err and "float64 logits: vanilla's token" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["exactness"]["near_ties"] == [] and len(data["exactness"]["mismatches"]) == 2
    record = next(r for r in data["records"] if r["method"] == "draft")
    ruling = record["ruling"]
    assert ruling["near_tie"] is False and ruling["reference_dtype"] == "float64"
    assert ruling["vanilla_logit"] == pytest.approx(ruling["top_logit"])  # vanilla's greedy token is the best
    assert ruling["method_token"] == (ruling["vanilla_token"] + 1) % engine.target.vocab_size
    assert ruling["top_logit"] - ruling["method_logit"] > ruling["tolerance"]


def test_a_near_tie_is_reported_and_does_not_fail_the_run(engine, tmp_path, capsys, monkeypatch):
    """With a tolerance wide enough to call any gap a tie, the same corruption becomes a reported near-tie."""
    from paradec.bench import referee

    monkeypatch.setattr(referee, "TIE_ULPS", 1e12)
    code = run_bench(Corrupting(engine, "draft"), BENCH_PROMPTS, plan(), meta(engine, plan()), tmp_path, quiet=True)
    err = capsys.readouterr().err
    assert code == 0 and "near-tie (rounding, not a failure): draft differs" in err and "EXACTNESS" not in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["exactness"]["ok"] is True and data["exactness"]["mismatches"] == []
    assert {(m["method"], m["first_mismatch"]) for m in data["exactness"]["near_ties"]} == {("draft", 1)}
    assert all(f"on prompt {m['prompt']!r} from" in err for m in data["exactness"]["near_ties"])  # as results.md
    assert data["summary"]["all prompts"]["draft"]["near_ties"] == 2
    md = (tmp_path / "results.md").read_text()
    assert "| 0/2 (2 near-ties) |" in md and "Near-ties:" in md and "MISMATCH" not in md


def test_a_referee_that_cannot_load_leaves_the_failure_standing(engine, tmp_path, capsys, monkeypatch):
    from paradec.bench import referee

    def broken(self):
        raise OSError("no such checkpoint")

    monkeypatch.setattr(referee.Referee, "_load", broken)
    code = run_bench(Corrupting(engine, "pld"), BENCH_PROMPTS, plan(), meta(engine, plan()), tmp_path, quiet=True)
    err = capsys.readouterr().err
    assert code == 1 and "referee could not run: OSError: no such checkpoint" in err and "EXACTNESS FAILURE" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["exactness"]["near_ties"] == [] and all(r["ruling"] is None for r in data["records"])


def test_batched_rows_on_the_native_runner(tmp_path, capsys):
    """--batch-sizes 1,2 on the native runner: each method also decodes in batches of 2, its outputs are compared
    with vanilla's alone, its speedup with vanilla's at batch size 2; a method that cannot batch is skipped there."""
    from paradec.zoo import code_draft_dir, code_model_dir

    engine = paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")
    prompts = [
        BenchPrompt("fib", "code", "def fibonacci(n):\n"),
        BenchPrompt("stack", "code", "class Stack:\n    def __init__(self):\n"),
        BenchPrompt("read", "code", "def read_lines(path):\n"),
    ]
    bench_plan = plan(("vanilla", "pld", "draft", "layerskip"), explicit=False, batch_sizes=(1, 2), max_new_tokens=16)
    assert run_bench(engine, prompts, bench_plan, meta(engine, bench_plan), tmp_path, quiet=True) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["batch_size"]): r for r in data["rows"]}
    assert rows[("layerskip", 1)]["status"] == "ok" and rows[("layerskip", 2)]["status"] == "skipped"
    assert "does not run in a batch" in rows[("layerskip", 2)]["reason"]
    batched = [r for r in data["records"] if r["batch_size"] == 2]
    # every prompt in one queue, at most 2 decoding at once: one record per method, the prompts in file order
    assert [r["prompt_ids"] for r in batched] == [["fib", "stack", "read"]] * 3
    assert all(r["equals_vanilla"] for r in batched if r["method"] != "vanilla")  # vanilla@bs2 too: vs alone
    assert all(r["equals_vanilla"] for r in batched if r["method"] == "vanilla")
    overall = data["summary"]["all prompts"]
    assert overall["vanilla@bs2"]["speedup"] == pytest.approx(1.0)  # against itself: vanilla at the same size
    assert overall["pld@bs2"]["tau"] > 1.0 and overall["pld@bs2"]["matches"] == overall["pld@bs2"]["compared"] == 1
    assert data["exactness"]["ok"]
    # each batched record says what its decode steps were: vanilla's all without proposals, overlapped but the first
    # (and one after a step that launched nothing: its one sequence ended at its length with the step in flight)
    steps = {r["method"]: r["batch_steps"] for r in batched}
    assert steps["vanilla"]["plain"] == steps["vanilla"]["steps"] > 8 and steps["vanilla"]["speculative"] == 0
    assert steps["vanilla"]["plain"] - 3 <= steps["vanilla"]["overlapped"] < steps["vanilla"]["plain"]
    assert steps["draft"]["speculative"] > 0 and steps["draft"]["plain"] == 0
    assert "## Batched steps" in (tmp_path / "results.md").read_text()


def test_a_batched_rows_steps_are_those_of_its_median_repeat(monkeypatch):
    """With repeats, a batched row's time is the median repeat's, and so are the decode steps it reports (the
    repeats' policy choices differ: the first one's new graph buckets were not what the row's time holds)."""
    import dataclasses

    from paradec.zoo import code_model_dir

    engine = paradec.load(code_model_dir(), runner="native", dtype="float32")
    prompts = [BenchPrompt("fib", "code", "def fibonacci(n):\n"), BenchPrompt("add", "code", "def add(a, b):\n")]
    bench = Bench(engine, prompts, plan(("vanilla",), batch_sizes=(2,), repeats=3), progress=False)
    walls, calls = iter([3.0, 1.0, 2.0]), iter(range(3))

    def timed(fn):
        out = fn()
        engine.last_batch_counts = dataclasses.replace(engine.last_batch_counts, steps=1000 + next(calls))
        return out, next(walls)

    monkeypatch.setattr(bench, "_timed", timed)
    bench.run()
    (record,) = [r for r in bench.records if r.batch_size == 2]
    assert record.wall_seconds == 2.0 and record.batch_steps["steps"] == 1002  # the third repeat: the median


def test_samples_rows_decode_each_prompt_as_one_request_of_n(tmp_path):
    """--samples 3 on the native runner: each prompt is one request of 3 samples decoded together, one record per
    prompt summing its samples; the speedup is against vanilla's 3 samples; in greedy mode every sample of every
    method equals vanilla's (its first sample), in sample mode sample j of prompt i is seeded seed + 3i + j."""
    from paradec.zoo import code_draft_dir, code_model_dir

    engine = paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")
    prompts = [BenchPrompt("fib", "code", "def fibonacci(n):\n"), BenchPrompt("read", "code", "def read_lines(p):\n")]
    greedy = plan(("vanilla", "multisample", "pld"), samples=3, max_new_tokens=12)
    assert run_bench(engine, prompts, greedy, meta(engine, greedy), tmp_path / "g", quiet=True) == 0
    data = json.loads((tmp_path / "g" / "results.json").read_text())
    assert {(r["method"], r["batch_size"]) for r in data["rows"]} == {("vanilla", 3), ("multisample", 3), ("pld", 3)}
    records = {(r["method"], r["prompt_ids"][0]): r for r in data["records"]}
    alone = engine.generate(engine.encode(prompts[0].text), max_new_tokens=12)
    assert records[("vanilla", "fib")]["new_tokens"] == 3 * len(alone.token_ids)
    assert all(r["equals_vanilla"] for r in data["records"]) and data["exactness"]["ok"]
    overall = data["summary"]["all prompts"]
    assert overall["vanilla@bs3"]["speedup"] == pytest.approx(1.0)
    assert overall["multisample@bs3"]["tau"] > 1.0
    assert "n = 3 samples of each prompt" in (tmp_path / "g" / "results.md").read_text()

    sampled = plan(("vanilla",), samples=3, max_new_tokens=8, sampling=SamplingParams(temperature=0.9, seed=11))
    assert run_bench(engine, prompts, sampled, meta(engine, sampled), tmp_path / "s", quiet=True) == 0
    data = json.loads((tmp_path / "s" / "results.json").read_text())
    read = next(r for r in data["records"] if r["prompt_ids"] == ["read"])
    again = engine.generate(engine.encode(prompts[1].text), sampling=SamplingParams(temperature=0.9, seed=14),
                            max_new_tokens=8, n=3)  # fmt: skip
    assert read["new_tokens"] == sum(r.stats.new_tokens for r in again)
    assert read["sample_token_ids"] == [r.token_ids for r in again]  # each sample's tokens, for an offline replay
    assert "sample j of prompt i sampled with seed 11 + 3·i + j" in (tmp_path / "s" / "results.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "17"], "--samples must be in [1, 16], got 17"),
        (["--samples", "4", "--batch-sizes", "1,2"], "--samples 4 decodes each prompt's samples as one batch"),
        (["--samples", "4", "--turns", "all"], "--samples 4 measures first turns only"),
    ],
)
def test_bad_samples_exit_2(args, message, capsys):
    assert main(["bench", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_samples_suite_takes_the_math_and_reasoning_prompts():
    from paradec.bench.prompts import get_suite, load_prompts

    suite = get_suite("samples")
    prompts = [p for p in load_prompts(suite.prompts_path()) if p.category in suite.categories]
    assert {p.category for p in prompts} == {"math", "reasoning"} and len(prompts) == 16


def test_the_timed_pass_does_not_replay_the_warm_up(model_dirs):
    """The suffix method keeps a trie of earlier outputs: after a warm-up over the same prompts it would hold the
    answers the timed pass is about to write. The bench makes the method forget them: the timed pass takes as many
    steps as on an engine that never warmed up (earlier timed prompts still count, as a server's would)."""

    def suffix_steps(warmup: int) -> list[int]:
        engine = paradec.load(model_dirs["llama"], device="cpu", runner="hf")
        bench = Bench(engine, BENCH_PROMPTS, plan(("vanilla", "suffix"), warmup=warmup, max_new_tokens=24),
                      progress=False)  # fmt: skip
        bench.run()
        return [r.steps for r in bench.records if r.method == "suffix"]

    cold = suffix_steps(0)
    assert suffix_steps(1) == cold
    engine = paradec.load(model_dirs["llama"], device="cpu", runner="hf")
    for prompt in BENCH_PROMPTS:  # what the bench's warm-up would leave behind, kept
        engine.generate(engine.encode(prompt.text), method="suffix", max_new_tokens=24)
    replayed = [engine.generate(engine.encode(p.text), method="suffix", max_new_tokens=24).stats.steps
                for p in BENCH_PROMPTS]  # fmt: skip
    assert sum(replayed) < sum(cold)  # the test would see a replay


def test_a_timed_repeat_does_not_replay_the_repeat_before_it(model_dirs, monkeypatch):
    """Each repeat of a timed generation writes the very answer the next repeat is timed on: the suffix method's
    trie of earlier outputs would replay it (m15 on the H200: suffix 4.25x vanilla at 3 repeats, 1.20x at one).
    The bench rewinds the method between repeats: every repeat takes the steps of the first, alone and batched."""
    engine = paradec.load(model_dirs["llama"], device="cpu", runner="hf")
    steps: list[list[int]] = []
    bench = Bench(engine, BENCH_PROMPTS, plan(("vanilla", "suffix"), repeats=3, max_new_tokens=24), progress=False)
    timed = bench._timed

    def spy(fn):
        out, wall = timed(fn)
        if isinstance(out, list):
            steps.append([r.stats.steps for r in out])
        elif out.stats.method == "suffix":
            steps.append([out.stats.steps])
        return out, wall

    monkeypatch.setattr(bench, "_timed", spy)
    bench.run()
    per_prompt = [steps[i : i + 3] for i in range(0, len(steps), 3)]
    assert len(per_prompt) == len(BENCH_PROMPTS)
    assert all(a == b == c for a, b, c in per_prompt), per_prompt
    trie = engine.method("suffix").global_trie(24)  # what the pass leaves: each answer once, as one repeat leaves it
    assert len(trie.sequences) <= len(BENCH_PROMPTS)


def test_vanilla_is_re_timed_after_the_other_methods_and_the_drift_reported(engine, monkeypatch):
    """The card's speed can move during a run (the H200 once ran vanilla 10% slower at the start than a method
    doing the same work later): vanilla is timed again at the end, and the report says how far it moved."""
    walls = iter([1.0, 1.0, 0.5, 0.5, 1.2, 1.2])  # vanilla's two prompts, pld's two, vanilla's two again
    bench = Bench(engine, BENCH_PROMPTS, plan(("vanilla", "pld")), progress=False)
    monkeypatch.setattr(bench, "_timed", lambda fn: (fn(), next(walls)))
    bench.run()
    assert next(walls, None) is None  # vanilla ran twice per prompt, pld once
    assert bench.drift["ratio"] == pytest.approx(1.2)
    data = report.results(bench, meta(engine, bench.plan), complete=True)
    assert data["drift"]["again_seconds"] == pytest.approx(2.4)
    assert "moved by 20% during the run" in report.markdown(data)
    # the ratios stay against vanilla's first pass
    assert data["summary"]["all prompts"]["pld"]["speedup"] == pytest.approx(2.0)


@pytest.mark.parametrize(("again", "reference"), [(1.0, 1.0), (3.0, 2.0)])
def test_batched_vanilla_is_re_timed_and_its_faster_pass_is_the_reference(again, reference, monkeypatch):
    """At batch size > 1 vanilla's row is timed again after the other methods of that size; a faster second pass
    replaces the first as the reference of the size's speedups (a slow first pass must not inflate them), a slower
    one does not; the report says which."""
    from paradec.zoo import code_draft_dir, code_model_dir

    engine = paradec.load(code_model_dir(), code_draft_dir(), runner="native", dtype="float32")
    walls = iter([2.0, 1.0, again])  # vanilla@bs2's pass, pld@bs2's, vanilla@bs2's again (one turn, no warm-up)
    bench = Bench(engine, BENCH_PROMPTS, plan(("vanilla", "pld"), batch_sizes=(2,)), progress=False)
    monkeypatch.setattr(bench, "_timed", lambda fn: (fn(), next(walls)))
    bench.run()
    assert next(walls, None) is None
    assert bench.batched_drift[2]["ratio"] == pytest.approx(again / 2.0)
    assert [r.method for r in bench.records] == ["vanilla", "pld"]  # the re-timing adds no record
    data = report.results(bench, meta(engine, bench.plan), complete=True)
    assert data["summary"]["all prompts"]["pld@bs2"]["speedup"] == pytest.approx(reference)
    text = report.markdown(data)
    assert f"vanilla@bs2 re-timed after the other methods of its size: {again / 2:.3f}×" in text
    assert ("faster (second) pass is the reference" in text) == (again < 2.0)
    assert data["exactness"]["ok"]


def test_no_drift_check_when_asked_or_with_vanilla_alone(engine):
    for methods, drift in ((("vanilla", "pld"), False), (("vanilla",), True)):
        bench = Bench(engine, BENCH_PROMPTS, plan(methods, drift=drift), progress=False)
        bench.run()
        assert bench.drift is None
        assert sum(r.method == "vanilla" for r in bench.records) == len(BENCH_PROMPTS)
