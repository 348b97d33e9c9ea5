"""The native runner's exact mode (`paradec.kernels`): every row of a forward is bitwise independent of the rest.

On CPU the exact ops run one row at a time, so these tests pin down the runner's side of the guarantee in bf16:
every path of a forward (static buckets and eager, chains and trees, the LM head, hidden states, cache buckets,
prefill chunks, batches) goes through the exact ops, and every method's greedy output is then vanilla's, bit for bit.
The Triton kernel itself runs here under Triton's interpreter where Triton is installed; on the GPU machine
`test_exact_cuda.py` checks the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import paradec
from paradec.kernels import matmul
from paradec.runners.native import NativeRunner
from paradec.step import Step
from paradec.tree import build_tree
from test_batch_runner import seq

SIZES = (1, 2, 7, 16, 49, 64)


def one_at_a_time(runner, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and hidden states of each token scored in a forward of its own, after the prompt."""
    runner.reset()
    runner.forward(torch.tensor(prompt), logits="none")
    runner.commit(len(prompt))
    logits, hidden = [], []
    for t in tokens:
        out = runner.forward(torch.tensor([t]), hidden=True)
        logits.append(out.logits[0])
        hidden.append(out.hidden[0])
        runner.commit(1)
    return torch.stack(logits), torch.stack(hidden)


def scored_together(runner, prompt: list[int], tokens: list[int], parents=None):
    runner.reset()
    runner.forward(torch.tensor(prompt), logits="none")
    runner.commit(len(prompt))
    tree = None if parents is None else build_tree(parents[1:])
    out = runner.forward(torch.tensor(tokens), tree, hidden=True)
    runner.rollback(len(prompt))
    return out.logits, out.hidden


def tree_around(path: list[int], extra: int, vocab: int, seed: int):
    """A tree whose first-child chain is `path` (input 0 = its root), with `extra` distractor nodes hung off it."""
    g = torch.Generator().manual_seed(seed)
    tokens, parents, index = [path[0]], [-1], [0]  # index[i]: input index of path[i]
    for i in range(1, len(path)):
        for _ in range(extra if i % 3 == 1 else 0):
            tokens.append(int(torch.randint(vocab, (1,), generator=g)))
            parents.append(index[i - 1] - 1)  # node parents: input index - 1 (-1 = the root)
        tokens.append(path[i])
        parents.append(index[i - 1] - 1)
        index.append(len(tokens) - 1)
    return tokens, parents, index


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("static", [True, False])
def test_rows_do_not_depend_on_the_forward(exact_dirs, arch, static):
    """Chains of 1..64 inputs, trees around them and cache buckets from 128 to 256 columns: each row bitwise the
    token's own forward (bf16, static buckets and eager)."""
    runner = NativeRunner.from_pretrained(exact_dirs[arch][0], dtype="bfloat16", exact=True, static_shapes=static)
    g = torch.Generator().manual_seed(1)
    vocab = runner.vocab_size
    for prompt_len in (5, 120):  # 120: the single forwards attend over 128 columns, the long chains over 256
        prompt = torch.randint(vocab, (prompt_len,), generator=g).tolist()
        tokens = torch.randint(vocab, (max(SIZES),), generator=g).tolist()
        ref_logits, ref_hidden = one_at_a_time(runner, prompt, tokens)
        for n in SIZES:
            logits, hidden = scored_together(runner, prompt, tokens[:n])
            assert torch.equal(logits, ref_logits[:n]), (prompt_len, n)
            assert torch.equal(hidden, ref_hidden[:n]), (prompt_len, n)
        tree_tokens, parents, index = tree_around(tokens[:20], 2, vocab, seed=prompt_len)
        logits, hidden = scored_together(runner, prompt, tree_tokens, parents)
        assert torch.equal(logits[index], ref_logits[:20])
        assert torch.equal(hidden[index], ref_hidden[:20])


class _Forbidden:
    """torch.nn.functional, less the products an exact forward must not call."""

    def __getattr__(self, name):
        if name in ("linear", "scaled_dot_product_attention"):
            raise AssertionError(f"an exact forward called F.{name}")
        return getattr(torch.nn.functional, name)


@pytest.mark.parametrize("static", [True, False])
def test_exact_forwards_call_only_the_exact_ops(exact_dirs, monkeypatch, static):
    """On CPU the default products happen to be row-invariant for these tiny shapes, so the row tests alone would
    pass without the exact ops: here the default ones raise, on every path (buckets, eager, trees, batches)."""
    from paradec.runners.native import model as native_model
    from paradec.runners.native.batch import BatchedNativeRunner

    runner = NativeRunner.from_pretrained(exact_dirs["qwen2"][0], dtype="bfloat16", exact=True, static_shapes=static)
    batched = BatchedNativeRunner.sharing(runner, slots=2)
    monkeypatch.setattr(native_model, "F", _Forbidden())
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda *_: pytest.fail("an exact forward called nn.Linear"))
    tokens = list(range(3, 30))
    one_at_a_time(runner, tokens[:5], tokens[5:9])
    scored_together(runner, tokens[:5], tokens[5:25])
    tree_tokens, parents, _ = tree_around(tokens[5:20], 2, runner.vocab_size, seed=0)
    scored_together(runner, tokens[:5], tree_tokens, parents)
    a, b = batched.allocate(), batched.allocate()
    batched_rows(batched, [(a, tokens[:5], None), (b, tree_tokens, parents)])


def batched_rows(batched, seqs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, hidden) of each (slot, tokens, parents) sequence, all scored in one forward (then rolled back)."""
    step = Step(
        [seq(slot, torch.tensor(ids), None if parents is None else tuple(parents[1:])) for slot, ids, parents in seqs]
    )
    out = batched.forward(step, hidden=True)
    batched.cancel()
    return [(out.logits[step.rows(i)], out.hidden[step.rows(i)]) for i in range(len(seqs))]


def test_rows_do_not_depend_on_the_other_sequences(exact_dirs):
    """A sequence's rows in a batched forward, beside others of other lengths and shapes, are its rows alone."""
    from paradec.runners.native.batch import BatchedNativeRunner

    runner = NativeRunner.from_pretrained(exact_dirs["llama"][0], dtype="bfloat16", exact=True)
    batched = BatchedNativeRunner.sharing(runner, slots=3)
    g = torch.Generator().manual_seed(3)
    chain = torch.randint(runner.vocab_size, (30,), generator=g).tolist()
    tree_tokens, parents, _ = tree_around(chain[:12], 2, runner.vocab_size, seed=1)
    other = torch.randint(runner.vocab_size, (9,), generator=g).tolist()
    slots = [batched.allocate() for _ in range(3)]
    alone = [
        batched_rows(batched, [(slots[0], chain, None)])[0],
        batched_rows(batched, [(slots[1], tree_tokens, parents)])[0],
    ]
    together = batched_rows(
        batched, [(slots[2], other, None), (slots[1], tree_tokens, parents), (slots[0], chain, None)]
    )
    for (logits, hidden), (logits_alone, hidden_alone) in zip(together[:0:-1], alone, strict=True):
        assert torch.equal(logits, logits_alone) and torch.equal(hidden, hidden_alone)


def test_fp32_exact_path_matches_the_default_path(exact_dirs):
    """The exact ops compute what the default ops compute (float32, to rounding)."""
    target = exact_dirs["qwen2"][0]
    tokens = torch.arange(3, 40)
    a = NativeRunner.from_pretrained(target, exact=True).forward(tokens, hidden=True)
    b = NativeRunner.from_pretrained(target, exact=False).forward(tokens, hidden=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=2e-4)


PROMPTS = [
    "def fibonacci(n):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n    def pop",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
]
METHODS = (
    ("pld", None),
    ("draft", {"k": 4}),
    ("lookahead", None),
    ("jacobi", None),
    ("suffix", None),
)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_method_equals_vanilla_bitwise_in_bf16(exact_dirs, arch):
    target, draft = exact_dirs[arch]
    engine = paradec.load(target, draft, runner="native", device="cpu", dtype="bfloat16", exact=True)
    assert engine.config.exact and engine.target.model.exact and not engine.draft_runner().model.exact
    for prompt in PROMPTS:
        reference = engine.generate(prompt, method="vanilla", max_new_tokens=40).token_ids
        for method, options in METHODS:
            result = engine.generate(prompt, method=method, options=options, max_new_tokens=40)
            assert result.token_ids == reference, (method, prompt)
    batch = engine.generate_batch(PROMPTS, method="pld", max_new_tokens=40)
    for prompt, result in zip(PROMPTS, batch, strict=True):
        assert result.token_ids == engine.generate(prompt, method="vanilla", max_new_tokens=40).token_ids


def test_exact_needs_the_native_runner(exact_dirs):
    with pytest.raises(paradec.ParadecError, match="exact=True needs the native runner"):
        paradec.load(exact_dirs["llama"][0], runner="hf", exact=True)


def test_cli_exact(exact_dirs, capsys):
    from paradec.cli import main

    common = ["generate", "--model", str(exact_dirs["llama"][0]), "--prompt", "def f(x):", "--max-new-tokens", "8"]
    assert main([*common, "--runner", "hf", "--exact"]) == 2
    assert "exact=True needs the native runner" in capsys.readouterr().err
    assert main([*common, "--runner", "native", "--dtype", "bfloat16", "--exact", "--method", "pld"]) == 0


def test_exact_runs_uncompiled_on_the_cpu(exact_dirs):
    """Inductor's CPU code is not row-invariant, so an exact model there cannot be compiled; by default it is not
    compiled anywhere (compiled exact forwards on CUDA: `test_exact_cuda.py`)."""
    with pytest.raises(paradec.ParadecError, match="compile=True and exact=True needs CUDA"):
        NativeRunner.from_pretrained(exact_dirs["llama"][0], exact=True, compile=True)
    assert not NativeRunner.from_pretrained(exact_dirs["llama"][0], exact=True).model.is_compiled


def test_triton_rms_norm_rows_are_invariant(interpreted):
    from paradec.kernels import norm
    from paradec.layers import RMSNorm

    layer = RMSNorm(48, 1e-6)  # 48: a row padded to a block of 64
    layer.weight.data = torch.randn(48, generator=torch.Generator().manual_seed(0))
    x = torch.randn(9, 48, generator=torch.Generator().manual_seed(1))
    full = norm.rms_norm(x, layer.weight, 1e-6)
    torch.testing.assert_close(full, layer(x).detach(), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(norm.rms_norm(x[i : i + 1], layer.weight, 1e-6), full[i : i + 1]) for i in range(9))


def test_triton_add_rms_norm_is_the_add_then_the_norm(interpreted):
    """The fused residual add + norm under the interpreter: the add's bits are the eager add's, the norm's are the
    plain kernel's on that sum, and rows do not depend on the row count. (fp32: the interpreter truncates to bf16
    where the GPU rounds to nearest; `test_exact_cuda.py` checks bf16.)"""
    from paradec.kernels import norm

    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, generator=g)
    x, r = torch.randn(9, 48, generator=g), torch.randn(9, 48, generator=g)
    out, total = norm.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(total, r + x)
    assert torch.equal(out, norm.rms_norm(r + x, w, 1e-6))
    assert all(
        torch.equal(norm.rms_norm(x[i : i + 1], w, 1e-6, residual=r[i : i + 1])[0], out[i : i + 1]) for i in range(9)
    )


def test_triton_rope_and_silu_mul_are_the_eager_ops(interpreted):
    """One kernel each for rope (on strided rows, as the runner's q/k view of the qkv product) and silu * up:
    rope bitwise the eager ops, silu * up to float32 rounding (fp32, as above)."""
    import torch.nn.functional as F

    from paradec.kernels import pointwise
    from paradec.layers import apply_rope

    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 7 * 32, generator=g)
    qk = qkv[:, : 6 * 32].view(5, 6, 32)  # rows strided by the qkv width
    angles = torch.randn(5, 1, 16, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert torch.equal(pointwise.rope(qk, cos, sin), apply_rope(qk, cos, sin))
    gate_up = torch.randn(4, 2 * 40, generator=g)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(pointwise.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_exact_is_off_by_default(exact_dirs):
    assert paradec.load(exact_dirs["llama"][0], runner="native", device="cpu").config.exact is False


@pytest.fixture
def interpreted():
    """The Triton kernels under Triton's interpreter, on CPU tensors (conftest sets TRITON_INTERPRET without CUDA)."""
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (Triton installed, no CUDA)")


@pytest.mark.parametrize(
    ("n", "k", "split", "block_m"), [(96, 200, 1, 64), (130, 64, 2, 64), (64, 512, 4, 16), (40, 300, 3, 128)]
)
def test_triton_matmul_rows_are_batch_invariant(interpreted, n, k, split, block_m):
    """The kernel's rows under the interpreter: the same bits for M = 1 .. 70 (one row block or several: the grid,
    the masks and the split-K reduction follow M), and its sums are the product's. Each row keeps its place in its
    row block here: the interpreter's `tl.dot` is numpy's matmul, whose OpenBLAS kernels round a row by its place
    in the tile on some CPUs (Haswell's, 2026-12-03), where a GPU's MMA does not; `test_exact_cuda.py` checks rows
    moved between places (one row alone against the same row in a batch) on the GPU."""
    g = torch.Generator().manual_seed(n + k)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(70, k, generator=g)
    k_blocks = -(-k // 64)
    plan = matmul.Plan(block_n=32, block_k=64, split_k=split, k_blocks=-(-k_blocks // split), block_m=block_m)
    whole = matmul.linear(x, w, b, plan)
    for m in (1, 2, 7, 16, 49, 64, 65):
        assert torch.equal(matmul.linear(x[:m], w, b, plan), whole[:m]), m
    tail = x[block_m * (70 // block_m) :]  # the last row block alone: the same bits as in the whole
    if 0 < len(tail) < 70:
        assert torch.equal(matmul.linear(tail, w, b, plan), whole[70 - len(tail) :])
    torch.testing.assert_close(whole, x @ w.T + b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole, matmul.reference(x, w, b, plan), rtol=1e-4, atol=1e-4)


def test_plan_depends_on_the_weight_only():
    p = matmul.plan(2048, 1536, sms=132)
    assert p.split_k * -(-2048 // p.block_n) >= 132  # enough programs for the SMs at one row block
    assert p.split_k * p.k_blocks * p.block_k >= 1536  # the splits cover K
    assert matmul.plan(151936, 1536, sms=132).split_k == 1  # a wide output needs no split


def chain_bias(start: torch.Tensor, tokens: int, cols: int) -> torch.Tensor:
    """(B, 1, T, S) additive: token t of sequence b sees columns [0, start[b] + t]."""
    col = torch.arange(cols)
    seen = col[None, None, :] <= start[:, None, None] + torch.arange(tokens)[None, :, None]
    return torch.zeros(start.shape[0], 1, tokens, cols).masked_fill(~seen[:, None], float("-inf"))


@pytest.mark.parametrize("head_dim", [32, 48])
def test_triton_attention_rows_are_invariant(interpreted, head_dim):
    """The split-KV kernel under the interpreter: row r's bits do not depend on the token count, the other rows,
    the batch, or cache columns past what it sees (two buckets, 384 and 600 columns: three chunks against two);
    its values are SDPA's. GQA: 3 query heads per KV head, rows g * T + t; one KV head (the kernel runs each head
    as its own programs, so a second adds no case, only interpreter time). head_dim 48 runs padded to 64."""
    import torch.nn.functional as F

    from paradec.kernels import flash

    g = torch.Generator().manual_seed(head_dim)
    B, H, G, S, T = 2, 1, 3, 600, 13
    k, v = torch.randn(B, H, S, head_dim, generator=g), torch.randn(B, H, S, head_dim, generator=g)
    q = torch.randn(B, H, G, T, head_dim, generator=g)
    start = torch.tensor([300, 200])  # each sequence's committed length

    def run(tokens: int, cols: int, batch: int = B):
        bias = chain_bias(start[:batch], tokens, cols)
        qq = q[:batch, :, :, :tokens].reshape(batch, H, G * tokens, head_dim)
        out = flash.attention(qq, k[:batch, :, :cols], v[:batch, :, :cols], flash.visible_columns(bias))
        expected = F.scaled_dot_product_attention(
            qq, k[:batch, :, :cols], v[:batch, :, :cols], attn_mask=bias.repeat(1, 1, G, 1)
        )
        return out.view(batch, H, G, tokens, head_dim), expected.view(batch, H, G, tokens, head_dim)

    full, expected = run(T, S)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    for tokens, cols, batch in ((1, 384, 2), (7, 384, 2), (13, 384, 2), (5, 600, 2), (1, 600, 1)):
        out, _ = run(tokens, cols, batch)
        assert torch.equal(out, full[:batch, :, :, :tokens]), (tokens, cols, batch)


def test_triton_attention_packs_each_rows_visible_columns(interpreted):
    """A tree node's row, whose visible provisional columns (its ancestors) sit between other nodes' columns, has
    the bits of the same token decoded alone, which sees those keys contiguously: the kernel walks each row's
    visible columns packed from position 0. Its values are SDPA's with the mask."""
    import torch.nn.functional as F

    from paradec.kernels import flash

    g = torch.Generator().manual_seed(7)
    H, D, start = 2, 64, 100  # 100 committed columns: the provisional ones straddle the 128-column block boundary
    ancestors = [3, 11, 26, 40]  # provisional inputs on the node's root path (itself last)
    k, v = torch.randn(1, H, 256, D, generator=g), torch.randn(1, H, 256, D, generator=g)
    q = torch.randn(1, H, 1, D, generator=g)
    seen = torch.zeros(256, dtype=torch.bool)
    seen[:start] = True
    seen[[start + a for a in ancestors]] = True
    bias = torch.zeros(1, 1, 1, 256).masked_fill(~seen, float("-inf"))
    in_tree = flash.attention(q, k, v, flash.visible_columns(bias))
    # alone: the same keys at columns start, start + 1, ... and a cache padded differently (192 columns)
    order = list(range(start)) + [start + a for a in ancestors]
    k_alone, v_alone = torch.zeros(1, H, 192, D), torch.zeros(1, H, 192, D)
    k_alone[:, :, : len(order)], v_alone[:, :, : len(order)] = k[:, :, order], v[:, :, order]
    alone_bias = torch.zeros(1, 1, 1, 192)
    alone_bias[..., len(order) :] = float("-inf")
    alone = flash.attention(q, k_alone, v_alone, flash.visible_columns(alone_bias))
    assert torch.equal(in_tree, alone)
    torch.testing.assert_close(in_tree, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-5, atol=1e-5)
    columns = flash.visible_columns(bias)[0, 0, 0]
    assert columns[: len(order)].tolist() == order and (columns[len(order) :] == -1).all()
