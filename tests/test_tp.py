"""Tensor parallelism (`paradec.runners.native.tp`) on the CPU: two gloo ranks, each holding half of every layer's
heads and MLP and half of the vocabulary's embedding and LM head rows, run the same decode loop and emit what one
process emits, for every method, heads-based ones (eagle, medusa: they read the gathered embedding and LM head)
included; the vocabulary-parallel lookup equals the whole embedding bitwise; the gathered logits equal the whole
model's to fp32 rounding; a vocabulary that two ranks do not split is padded and the padding never shows; a rank
that never shows up is a clear error within the timeout."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

import paradec
from conftest import make_config, save_model
from paradec.heads import EagleConfig, EagleHead, MedusaConfig, MedusaHeads, save_heads
from paradec.runners.native import tp

PROMPTS = ["def fibonacci(n):\n", "The quick brown fox jumps over the lazy dog. The quick brown fox"]
HOST_METHODS = (("vanilla", None), ("pld", None), ("lookahead", None), ("suffix", None))
HEAD_METHODS = (("eagle", None), ("medusa", None))
METHODS = (*HOST_METHODS, ("draft", {"k": 3}), *HEAD_METHODS)


def _generate(engine, methods) -> dict:
    return {
        method: [engine.generate(p, method=method, options=options, max_new_tokens=24).token_ids for p in PROMPTS]
        for method, options in methods
    }


def _logits(engine) -> list:
    runner = engine.target
    runner.reset()
    out = runner.forward(torch.tensor(engine.encode(PROMPTS[1])), hidden=True)
    runner.reset()
    return [out.logits, out.hidden]


def _probe(hidden_size: int) -> torch.Tensor:
    """The same hidden states on every rank and in the parent: what the LM head alone makes of them."""
    return torch.randn(5, hidden_size, generator=torch.Generator().manual_seed(11)) * 3


def _heads(root, hidden: int, vocab: int):
    """Random-weight EAGLE and Medusa heads for a target (lossless whatever they say)."""
    torch.manual_seed(5)
    eagle, medusa = EagleHead(EagleConfig.for_target(hidden, vocab)), MedusaHeads(MedusaConfig(hidden, vocab, 3))
    for module in (eagle, medusa):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
    save_heads(eagle.eval(), root / "eagle")
    save_heads(medusa.eval(), root / "medusa")
    return root


def _rank(rank: int, world: int, init: str, target: str, draft, heads: str, out: str, methods) -> None:
    torch.set_num_threads(1)
    group = tp.init(rank, world, init, timeout_s=120)
    try:
        engine = paradec.load(target, draft, heads=heads, runner="native", device="cpu", tensor_parallel=True)
        model = engine.target.model
        assert model.layers[0].attention.tp == group and model.tp == group and model.embed.tp == group
        result = {
            "outputs": _generate(engine, methods),
            "logits": _logits(engine),
            "head_logits": model.logits(_probe(model.args.hidden_size)),
            "lookup": model.embed(torch.arange(model.args.vocab_size)),
            "embed_weight": engine.target.embed_weight(),
            "lm_head_weight": engine.target.lm_head_weight(),
            "rows": (model.embed.weight.shape[0], model.output_weight.shape[0]),
            "tied": model.lm_head is None,
            "cache_heads": engine.target.cache.data.shape[2],
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _check_ranks(tmp_path, target, draft, methods) -> tuple[list[dict], paradec.Engine]:
    """Run `methods` on 2 ranks and in one process; check what must hold whatever the model; return both."""
    heads = _heads(tmp_path / "heads", 64, paradec.load(target, runner="native", device="cpu").target.vocab_size)
    args = (2, f"file://{tmp_path}/init", target, draft, str(heads), str(tmp_path), methods)
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    whole = paradec.load(target, draft, heads=heads, runner="native", device="cpu")
    model = whole.target.model
    vocab = model.args.vocab_size
    expected, (logits, hidden) = _generate(whole, methods), _logits(whole)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, result in enumerate(got):
        assert result["outputs"] == expected, rank
        assert result["logits"][0].shape == logits.shape == (len(whole.encode(PROMPTS[1])), vocab)
        torch.testing.assert_close(result["logits"][0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result["logits"][1], hidden, rtol=1e-4, atol=1e-4)
        # the head alone, on the same hidden states: the gathered columns in vocabulary order, to fp32 rounding
        probe = model.logits(_probe(model.args.hidden_size))
        assert result["head_logits"].shape == probe.shape == (5, vocab)
        torch.testing.assert_close(result["head_logits"], probe, rtol=1e-5, atol=1e-5)
        # the vocabulary-parallel lookup of every id is the whole embedding, bit for bit
        assert result["lookup"].dtype == torch.float32
        assert torch.equal(result["lookup"].view(torch.int32), model.embed.weight.view(torch.int32))
        # what heads read: the whole matrices, gathered
        assert torch.equal(result["embed_weight"], whole.target.embed_weight())
        assert torch.equal(result["lm_head_weight"], whole.target.lm_head_weight())
        assert result["cache_heads"] == whole.target.cache.data.shape[2] // 2  # the KV cache is sharded by heads
    return got, whole


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_emit_what_one_process_emits(exact_dirs, tmp_path, arch):
    target, draft = (str(p) for p in exact_dirs[arch])
    got, whole = _check_ranks(tmp_path, target, draft, METHODS)
    vocab = whole.target.vocab_size
    assert vocab % 2 == 0
    for result in got:  # each rank holds half of the embedding's rows and half of the LM head's
        assert result["rows"] == (vocab // 2, vocab // 2) and not result["tied"]
    assert not torch.equal(whole.target.model.embed.weight, whole.target.model.lm_head.weight)


BATCH_METHODS = (("vanilla", None), ("pld", None), ("suffix", None), ("draft", {"k": 3}))


def _batch_rank(rank: int, world: int, init: str, target: str, draft: str, out: str) -> None:
    """Batched decoding on one rank, the speculation policy deciding (`auto`). Rank 1's policy is made to refuse
    speculation whatever it measures: only rank 0's choice, agreed on every step, keeps the ranks in step."""
    from paradec.batch import SpeculationPolicy

    torch.set_num_threads(1)
    tp.init(rank, world, init, timeout_s=120)
    try:
        if rank == 1:
            SpeculationPolicy.speculate = lambda self, *args, **kwargs: False
        engine = paradec.load(target, draft, runner="native", device="cpu", tensor_parallel=True)
        outputs = {}
        for method, options in BATCH_METHODS:
            batch = engine.generate_batch(PROMPTS * 2, method=method, options=options, max_new_tokens=24, max_batch=3)
            outputs[method] = [r.token_ids for r in batch]
        torch.save(outputs, f"{out}/batch{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_decode_a_batch_as_one_process_with_the_policy_agreed(exact_dirs, tmp_path):
    """Continuous batching on a sharded target: every rank runs the batch decoder (SPMD); the policy's choice,
    which each rank would take from its own timings, is rank 0's everywhere (`TensorParallel.agree`)."""
    target, draft = (str(p) for p in exact_dirs["qwen2"])
    mp.spawn(_batch_rank, args=(2, f"file://{tmp_path}/init", target, draft, str(tmp_path)), nprocs=2, join=True)
    whole = paradec.load(target, draft, runner="native", device="cpu")
    expected = {
        method: [whole.generate(p, method=method, options=options, max_new_tokens=24).token_ids for p in PROMPTS * 2]
        for method, options in BATCH_METHODS
    }
    for rank in range(2):
        assert torch.load(tmp_path / f"batch{rank}.pt") == expected, rank


@pytest.fixture(scope="module")
def tied_odd_dir(tmp_path_factory, tokenizer_dir, vocab_size):
    """A tied Llama whose vocabulary (the tokenizer's + 1 row) two ranks do not split: 193 rows each, one padded."""
    config = make_config("llama", vocab_size + 1, seed_range=0.5)
    config.tie_word_embeddings = True
    return save_model(config, tmp_path_factory.mktemp("tied-odd") / "llama", tokenizer_dir, seed=720)


def test_a_tied_odd_vocabulary_is_padded_and_the_padding_never_shows(tied_odd_dir, tmp_path):
    got, whole = _check_ranks(tmp_path, str(tied_odd_dir), None, (*HOST_METHODS[:2], *HEAD_METHODS))
    vocab = whole.target.vocab_size
    assert vocab % 2 == 1 and whole.target.model.lm_head is None
    for result in got:
        assert result["rows"] == ((vocab + 1) // 2, (vocab + 1) // 2) and result["tied"]
    assert result["head_logits"].shape[-1] == vocab  # the pad column (logit 0) is dropped, it cannot win


@pytest.mark.parametrize("model", ["llama", "tied-odd"])
def test_each_rank_holds_its_rows_of_the_vocabulary(exact_dirs, tied_odd_dir, model):
    from safetensors.torch import load_file

    from paradec.runners.native.loading import read_config

    path = exact_dirs["llama"][0] if model == "llama" else tied_odd_dir
    config, state = read_config(path), load_file(str(path / "model.safetensors"))
    vocab, rows = config["vocab_size"], tp.vocab_rows(config["vocab_size"], 2)
    assert rows == -(-vocab // 2) and (vocab % 2 == 1) == (model == "tied-odd")
    shards = [tp.shard_state(config, state, tp.TensorParallel(r, 2)) for r in range(2)]
    names = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in state]
    assert names == (["model.embed_tokens.weight"] if model == "tied-odd" else [*names[:1], "lm_head.weight"])
    for name in names:
        assert [s[name].shape for s in shards] == [(rows, config["hidden_size"])] * 2
        joined = torch.cat([s[name] for s in shards])  # rank 0's rows, then rank 1's, then zero padding
        assert torch.equal(joined[:vocab], state[name]) and not joined[vocab:].any()
        assert joined.shape[0] - vocab == vocab % 2
    assert tp.shard_config(config, 2)["vocab_size"] == vocab  # the logits cover the whole vocabulary


def test_a_missing_rank_is_an_error_not_a_hang(tmp_path):
    started = time.monotonic()
    with pytest.raises(paradec.ParadecError, match="rank 0 of 2 could not join"):
        tp.init(0, 2, f"file://{tmp_path}/init", timeout_s=2)
    assert time.monotonic() - started < 30


def test_sizes_that_do_not_split(exact_dirs):
    from paradec.runners.native.loading import read_config

    config = read_config(exact_dirs["llama"][0])  # 4 heads, 2 KV heads
    with pytest.raises(
        paradec.ParadecError, match=r"tensor parallel size 4 must divide the model's key/value heads \(2\)"
    ):
        tp.shard_config(config, 4)
    assert tp.shard_config(config, 2)["num_key_value_heads"] == 1


def test_tensor_parallel_needs_an_initialised_group(exact_dirs):
    with pytest.raises(paradec.ParadecError, match=r"torch\.distributed initialised"):
        paradec.load(exact_dirs["llama"][0], runner="native", tensor_parallel=True)


def test_cli_spawns_the_ranks_and_prints_once(exact_dirs, capsys):
    import subprocess
    import sys

    from paradec.cli import main

    common = [sys.executable, "-m", "paradec", "generate", "--model", str(exact_dirs["qwen2"][0]), "--runner", "native"]
    common += ["--prompt", "def f(x):", "--max-new-tokens", "16", "--method", "pld"]
    one = subprocess.run(common, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*common, "--tensor-parallel", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    assert main(["generate", "--model", str(exact_dirs["qwen2"][0]), "--prompt", "x", "--tensor-parallel", "0"]) == 2
    assert "--tensor-parallel must be a positive number of ranks, got 0" in capsys.readouterr().err


def test_bench_runs_on_two_ranks_and_rank_0_writes(exact_dirs, tmp_path, capsys):
    import json
    import subprocess
    import sys

    from paradec.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": str(i), "category": "c", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    )
    common = ["bench", "--model", str(exact_dirs["qwen2"][0]), "--runner", "native", "--device", "cpu"]
    common += ["--prompts", str(prompts), "--methods", "pld", "--max-new-tokens", "12", "--warmup", "0"]
    common += ["--batch-sizes", "1,2", "--peers", "none", "--quiet"]  # (batched rows: the policy agreed per step)
    records = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        run = subprocess.run(
            [sys.executable, "-m", "paradec", *common, "--out", str(out), "--tensor-parallel", str(world)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stderr.count("paradec bench: results in") == 1  # rank 0's line only
        data = json.loads((out / "results.json").read_text())
        assert data["complete"] and data["exactness"]["ok"] and f"--tensor-parallel {world}" in data["meta"]["command"]
        records[world] = {(r["method"], r["batch_size"], *r["prompt_ids"]): r["token_ids"] for r in data["records"]}
    assert records[2] == records[1] and len([k for k in records[1] if k[1] == 1]) == 2 * len(PROMPTS)
    assert {k[1] for k in records[1]} == {1, 2}
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["out1", "out2", "prompts.jsonl"]  # nothing else where the ranks ran (rank 1's: a temp dir)
    # (--concurrency with --tensor-parallel drives a server on N ranks: test_the_load_bench_starts_...)
    assert main([*common[:-3], "--quiet", "--peers", "hf", "--tensor-parallel", "2"]) == 2
    assert "pass --peers none" in capsys.readouterr().err


def _post(url: str, body: dict, *, stream: bool = False):
    import json
    import urllib.request

    request = urllib.request.Request(
        url + "/v1/completions", json.dumps({**body, "stream": stream}).encode(), {"Content-Type": "application/json"}
    )
    response = urllib.request.urlopen(request, timeout=120)
    return response if stream else json.loads(response.read())


def test_the_server_on_two_ranks_answers_as_one_process_and_survives_a_disconnect(exact_dirs, tmp_path):
    """`paradec serve --tensor-parallel 2`: rank 0 serves HTTP and broadcasts each request, both ranks decode it.
    Greedy answers equal one process's; n = 2 works; a streamed request whose client leaves after one event still
    finishes on both ranks, so the next request finds them in step; SIGTERM to the spawning process drains rank 0,
    which stops rank 1: everything exits."""
    from paradec.bench.load import Server

    model = str(exact_dirs["qwen2"][0])
    engine = paradec.load(model, device="cpu", runner="native")
    expected = [engine.generate(p, method="pld", max_new_tokens=16).text for p in PROMPTS]
    args = ["--model", model, "--device", "cpu", "--runner", "native", "--method", "pld", "--tensor-parallel", "2"]
    server = Server(args, tmp_path / "server.log")
    try:
        import json
        import urllib.request

        with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as response:
            name = json.loads(response.read())["data"][0]["id"]
        ask = {"model": name, "max_tokens": 16, "temperature": 0}
        assert [_post(server.url, {**ask, "prompt": p})["choices"][0]["text"] for p in PROMPTS] == expected
        stream = _post(server.url, {**ask, "prompt": PROMPTS[0], "max_tokens": 200}, stream=True)
        stream.readline()
        stream.close()  # the client leaves; both ranks still decode the request to its end
        two = _post(server.url, {**ask, "prompt": PROMPTS[1], "n": 2})
        assert [c["text"] for c in two["choices"]] == [expected[1]] * 2
        assert _post(server.url, {**ask, "prompt": PROMPTS[0]})["choices"][0]["text"] == expected[0]
        with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
            metrics = response.read().decode()
        assert 'paradec_generations_total{method="pld",outcome="disconnect"} 1.0' in metrics  # it was cut short
    finally:
        server.stop()
    assert server.proc.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_the_batched_server_on_two_ranks_answers_as_one_process_and_cancels_on_both(exact_dirs, tmp_path):
    """`paradec serve --tensor-parallel 2 --max-batch 3`: continuous batching on both ranks, rank 0 broadcasting
    each step's joins and cancellations. Concurrent greedy answers (pld and suffix, n = 2 among them) equal one
    process's; a streamed request whose client leaves is cancelled on both ranks at one step boundary (its slot
    freed), and the requests after it still find the ranks in step; SIGTERM ends both."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from paradec.bench.load import Server

    model = str(exact_dirs["qwen2"][0])
    engine = paradec.load(model, device="cpu", runner="native")
    prompts = [*PROMPTS, "import os\n", "x = [1, 2, 3]\nfor"]
    expected = {m: [engine.generate(p, method=m, max_new_tokens=16).text for p in prompts] for m in ("pld", "suffix")}
    args = ["--model", model, "--device", "cpu", "--runner", "native", "--method", "pld", "--tensor-parallel", "2"]
    server = Server([*args, "--max-batch", "3"], tmp_path / "server.log")
    try:
        with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as response:
            name = json.loads(response.read())["data"][0]["id"]
        ask = {"model": name, "max_tokens": 16, "temperature": 0}
        jobs = [("pld", p) for p in prompts] + [("suffix", p) for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda job: _post(server.url, {**ask, "prompt": job[1], "method": job[0]}), jobs))
        assert [a["choices"][0]["text"] for a in answers] == expected["pld"] + expected["suffix"]
        stream = _post(server.url, {**ask, "prompt": PROMPTS[0], "max_tokens": 200}, stream=True)
        stream.readline()
        stream.close()  # the client leaves: cancelled on both ranks
        two = _post(server.url, {**ask, "prompt": PROMPTS[1], "n": 2})
        assert [c["text"] for c in two["choices"]] == [expected["pld"][1]] * 2
        with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
            metrics = response.read().decode()
        assert 'paradec_generations_total{method="pld",outcome="disconnect"} 1.0' in metrics
        assert "paradec_batch_size_count" in metrics  # the batched scheduler served them
    finally:
        server.stop()
    assert server.proc.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_the_load_bench_starts_a_server_on_two_ranks(exact_dirs, tmp_path, capsys):
    """`bench --concurrency N --tensor-parallel 2`: the bench process drives a server it starts with
    `--tensor-parallel 2 --max-batch N` (batching on both ranks), and every answer equals the one-client answer."""
    import json

    from paradec.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    args = ["bench", "--model", str(exact_dirs["qwen2"][0]), "--runner", "native", "--device", "cpu"]
    args += ["--prompts", str(prompts), "--methods", "pld", "--max-new-tokens", "12", "--concurrency", "1,2"]
    assert main([*args, "--tensor-parallel", "2", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    data = json.loads((out / "load.json").read_text())
    assert all(r["errors"] == 0 and r["equal"] == r["compared"] == r["requests"] for r in data["rounds"])
    assert "batch 2, tensor parallel 2)" in data["meta"]["server"]
    assert main([*args, "--tensor-parallel", "2", "--url", "http://127.0.0.1:9", "--out", str(out)]) == 2
    assert "--tensor-parallel with --url" in capsys.readouterr().err
