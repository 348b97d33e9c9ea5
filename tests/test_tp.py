"""Tensor parallelism (`paradec.runners.native.tp`) on the CPU: two gloo ranks, each holding half of every layer's
heads and MLP, run the same decode loop and emit what one process emits, for every method; the sliced forward's
logits equal the whole model's to fp32 rounding; a rank that never shows up is a clear error within the timeout."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.multiprocessing as mp

import paradec
from paradec.runners.native import tp

PROMPTS = ["def fibonacci(n):\n", "The quick brown fox jumps over the lazy dog. The quick brown fox"]
METHODS = (("vanilla", None), ("pld", None), ("draft", {"k": 3}), ("lookahead", None), ("suffix", None))


def _generate(engine) -> dict:
    return {
        method: [engine.generate(p, method=method, options=options, max_new_tokens=24).token_ids for p in PROMPTS]
        for method, options in METHODS
    }


def _logits(engine) -> list:
    runner = engine.target
    runner.reset()
    out = runner.forward(torch.tensor(engine.encode(PROMPTS[1])), hidden=True)
    runner.reset()
    return [out.logits.tolist(), out.hidden.tolist()]


def _rank(rank: int, world: int, init: str, target: str, draft: str, out: str) -> None:
    torch.set_num_threads(1)
    group = tp.init(rank, world, init, timeout_s=120)
    try:
        engine = paradec.load(target, draft, runner="native", device="cpu", tensor_parallel=True)
        assert engine.target.model.layers[0].attention.tp == group
        result = {
            "outputs": _generate(engine),
            "logits": _logits(engine),
            "cache_heads": engine.target.cache.data.shape[2],
        }
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_emit_what_one_process_emits(exact_dirs, tmp_path, arch):
    target, draft = (str(p) for p in exact_dirs[arch])
    mp.spawn(_rank, args=(2, f"file://{tmp_path}/init", target, draft, str(tmp_path)), nprocs=2, join=True)
    whole = paradec.load(target, draft, runner="native", device="cpu")
    expected, (logits, hidden) = _generate(whole), _logits(whole)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["outputs"] == expected, rank
        torch.testing.assert_close(torch.tensor(got["logits"][0]), torch.tensor(logits), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(got["logits"][1]), torch.tensor(hidden), rtol=1e-4, atol=1e-4)
        assert got["cache_heads"] == whole.target.cache.data.shape[2] // 2  # the KV cache is sharded by heads


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
