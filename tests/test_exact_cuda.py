"""Exact mode on CUDA (`paradec.kernels`): the compiled Triton product and the runner's captured graphs keep every
row of a bf16 forward bitwise independent of the rest of the forward, and every method's greedy output is vanilla's.
Skipped where there is no GPU (`test_exact.py` covers the runner's side on CPU)."""

from __future__ import annotations

import pytest
import torch

import paradec
from conftest import make_config, save_model
from paradec.kernels import matmul
from paradec.runners.native import NativeRunner
from test_eagle import random_heads_dir
from test_exact import METHODS, PROMPTS, SIZES, one_at_a_time, scored_together, tree_around

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory, tokenizer_dir):
    """Llama and Qwen2 shapes wide enough for split-K and several row blocks: hidden 512, 4 layers, vocabulary 32k, 1024 positions."""
    root = tmp_path_factory.mktemp("exact-wide")
    dirs = {}
    for i, arch in enumerate(("llama", "qwen2")):
        config = make_config(arch, 32000, layers=4, hidden=512)
        config.max_position_embeddings = 1024  # prompts of 300 + 64 tokens reach the 512-column cache bucket
        dirs[arch] = save_model(config, root / arch, tokenizer_dir, seed=800 + i)
    return dirs


def differing_rows(runner, prompt_len: int, seed: int) -> dict[str, int]:
    """Rows that differ from each token's own forward, by forward ("chain 7", "tree"): only the nonzero ones, so a
    failure says which forward broke."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(runner.vocab_size, (prompt_len,), generator=g).tolist()
    tokens = torch.randint(runner.vocab_size, (max(SIZES),), generator=g).tolist()
    ref_logits, ref_hidden = one_at_a_time(runner, prompt, tokens)
    bad = {}
    for n in SIZES:
        logits, hidden = scored_together(runner, prompt, tokens[:n])
        bad[f"chain {n}"] = int(((logits != ref_logits[:n]).any(-1) | (hidden != ref_hidden[:n]).any(-1)).sum())
    tree_tokens, parents, index = tree_around(tokens[:24], 3, runner.vocab_size, seed=seed)
    logits, hidden = scored_together(runner, prompt, tree_tokens, parents)
    bad["tree"] = int(((logits[index] != ref_logits[:24]).any(-1) | (hidden[index] != ref_hidden[:24]).any(-1)).sum())
    return {name: count for name, count in bad.items() if count}


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_are_bitwise_whatever_the_forward(wide_dirs, arch, compile):
    """Chains of 1..64, a tree around a 24-token path, caches of 128 to 512 columns, CUDA graphs, the elementwise
    work eager (the default) or compiled around the exact ops: 0 rows differ; the default kernels (cuBLAS,
    PyTorch's attention choice) differ somewhere, which is what makes this a test."""
    exact = NativeRunner.from_pretrained(wide_dirs[arch], device="cuda", dtype="bfloat16", exact=True, compile=compile)
    default = NativeRunner.from_pretrained(wide_dirs[arch], device="cuda", dtype="bfloat16", exact=False)
    assert any(differing_rows(default, n, seed=n) for n in (5, 120, 300))
    bad = {prompt_len: differing_rows(exact, prompt_len, seed=prompt_len) for prompt_len in (5, 120, 300)}
    assert bad == {5: {}, 120: {}, 300: {}}  # else: which prompt, which forward, how many rows


@pytest.mark.parametrize("wide", [0, 128])  # matmul.WIDE_ROWS: 128-row programs above M = 64 (off by default)
@pytest.mark.parametrize(("n", "k"), [(2048, 1536), (1536, 8960), (960, 576), (32000, 512), (100, 70)])
def test_compiled_matmul_rows_are_batch_invariant(n, k, wide, monkeypatch):
    """Rows of 2 .. 130-row products equal the 1-row products bitwise; with `wide`, the products above 64 rows run
    128-row programs, which keeps exactness only if a row's bits do not depend on the row tile."""
    monkeypatch.setattr(matmul, "WIDE_ROWS", wide)
    g = torch.Generator(device="cuda").manual_seed(n)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16)
    x = torch.randn(130, k, device="cuda", generator=g, dtype=torch.bfloat16)
    alone = torch.cat([matmul.linear(x[i : i + 1], w, b) for i in range(130)])
    for m in (2, 7, 16, 49, 64, 65, 128, 130):
        assert torch.equal(matmul.linear(x[:m], w, b), alone[:m]), m
    torch.testing.assert_close(alone.float(), (x.float() @ w.float().T + b.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_method_equals_vanilla_bitwise_on_cuda(exact_dirs, tmp_path, arch):
    target, draft = exact_dirs[arch]
    heads = random_heads_dir(tmp_path, 64, paradec.load(target, runner="native", device="cpu").target.vocab_size, 3)
    engine = paradec.load(target, draft, heads=heads, runner="native", device="cuda", dtype="bfloat16", exact=True)
    for prompt in PROMPTS:
        reference = engine.generate(prompt, method="vanilla", max_new_tokens=48).token_ids
        for method, options in (*METHODS, ("eagle", None)):
            result = engine.generate(prompt, method=method, options=options, max_new_tokens=48)
            assert result.token_ids == reference, (method, prompt)
    for method in ("vanilla", "draft"):
        batch = engine.generate_batch(PROMPTS, method=method, options={"k": 3} if method == "draft" else None,
                                      max_new_tokens=48)  # fmt: skip
        for prompt, result in zip(PROMPTS, batch, strict=True):
            assert result.token_ids == engine.generate(prompt, method="vanilla", max_new_tokens=48).token_ids
    assert engine._batched.graphs_captured > 0  # the batched steps ran as CUDA graphs (`StaticRagged`)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompts_prefilled_together_decode_bitwise_as_alone_in_bf16(exact_dirs, arch):
    """Exact mode: the joining sequences' prompt chunks share unbucketed forwards (`BatchDecoder._prefill`: here
    chunks of 32 within 96 padded inputs, so prompts of 3-150 tokens are fed over several steps and forwards), and
    every sequence still emits, bitwise, what it emits alone, greedy, plain and speculating."""
    from paradec.batch import BatchDecoder

    target, _ = exact_dirs[arch]
    engine = paradec.load(target, runner="native", device="cuda", dtype="bfloat16", exact=True)
    vocab = engine.target.vocab_size
    prompts = [[(7 + 13 * i + 101 * j) % vocab for i in range(n)] for j, n in enumerate((3, 150, 40, 17, 64, 9))]
    runner = engine.batch_decoder(len(prompts)).runner
    for method in ("vanilla", "pld"):
        decoder = BatchDecoder(
            engine, runner, max_running=len(prompts), prefill_chunk=32, prefill_tokens=96, speculate="always"
        )
        items = [decoder.submit(engine.request(p, method=method, max_new_tokens=40)) for p in prompts]
        for _ in decoder.run(items):
            pass
        for prompt, item in zip(prompts, items, strict=True):
            alone = engine.generate(prompt, method=method, max_new_tokens=40)
            assert item.result.token_ids == alone.token_ids, (method, len(prompt))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_graphs_equal_each_sequence_alone_in_fp32(exact_dirs, arch):
    """The batched runner's captured bucketed steps (the CUDA default) emit what each sequence emits alone."""
    target, draft = exact_dirs[arch]
    engine = paradec.load(target, draft, runner="native", device="cuda", dtype="float32")
    for method in ("vanilla", "pld", "draft", "lookahead"):
        batch = engine.generate_batch(PROMPTS, method=method, max_new_tokens=40)
        for prompt, result in zip(PROMPTS, batch, strict=True):
            assert result.token_ids == engine.generate(prompt, method=method, max_new_tokens=40).token_ids, method
    assert engine._batched.graphs_captured > 0 and engine._batched_draft.graphs_captured > 0
    # past its cap of graphs a bank runs new buckets uncaptured: the same outputs
    bank = engine._batched._static.bank
    bank.graphs.clear()
    bank.max_graphs = 0
    again = engine.generate_batch(PROMPTS, method="pld", max_new_tokens=60)
    assert [r.token_ids for r in again] == [
        engine.generate(p, method="pld", max_new_tokens=60).token_ids for p in PROMPTS
    ]
    assert bank.uncaptured > 0 and not bank.graphs


def test_fused_pointwise_kernels_are_row_invariant_and_near_the_eager_ops_in_bf16():
    """Exact mode's fused kernels: a row's bits do not depend on the rows beside it (what exactness needs), and
    they stay within a bf16 ulp of the eager ops. Not bitwise equal to eager: on the H200 (2026-12-02) the fused rope
    differed from `apply_rope` by one ulp (Triton folds the bf16 round trips between its products and the sum), so
    graphs+exact and graphs+exact-unfused are each exact, not equal to each other."""
    import torch.nn.functional as F

    from paradec.kernels import norm, pointwise
    from paradec.layers import apply_rope

    g = torch.Generator(device="cuda").manual_seed(4)
    qkv = torch.randn(33, 20 * 128, device="cuda", generator=g, dtype=torch.bfloat16)
    qk = qkv[:, : 16 * 128].view(33, 16, 128)
    angles = torch.randn(33, 1, 64, device="cuda", generator=g) * 30
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    rotated = pointwise.rope(qk, cos, sin)
    torch.testing.assert_close(rotated, apply_rope(qk, cos, sin), rtol=8e-3, atol=8e-3)
    assert torch.equal(pointwise.rope(qk[5:6], cos[5:6], sin[5:6]), rotated[5:6])
    x, r = (torch.randn(33, 1536, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(1536, device="cuda", generator=g, dtype=torch.bfloat16)
    out, total = norm.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(total, r + x) and torch.equal(out, norm.rms_norm(r + x, w, 1e-6))
    alone, _ = norm.rms_norm(x[7:8], w, 1e-6, residual=r[7:8])
    assert torch.equal(alone, out[7:8])
    gate_up = torch.randn(33, 2 * 8960, device="cuda", generator=g, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    product = pointwise.silu_mul(gate_up)
    torch.testing.assert_close(product, F.silu(gate) * up, rtol=8e-3, atol=1e-2)
    assert torch.equal(pointwise.silu_mul(gate_up[2:3]), product[2:3])
