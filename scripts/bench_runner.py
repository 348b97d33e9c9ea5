"""Benchmark of the native runner against Hugging Face `generate` on one GPU (not a test).

In one process, on one card, with random-weight models of real shapes (built on the GPU, bf16, batch 1):

- copy bandwidth (device-to-device, bytes read + written), which sets the roofline: weight bytes / bandwidth;
- vanilla greedy decoding, prompt 256, 128 new tokens: HF eager `generate`, HF `generate` with a static cache
  (which auto-compiles its decode step, mode reduce-overhead) and paradec's native runner (one host sync per
  token, like the decode loop);
- the cost of scoring a 1-, 4-, 8-, 16-input chain and a 64-node tree (65 inputs) relative to a 1-input step.

`--check` first runs correctness checks on CUDA (native vs transformers in fp32 and bf16, CUDA graphs vs eager,
tree vs paths, compaction vs a fresh cache, greedy tokens vs `generate`, no host sync inside the runner).
Writes runner-<card>-<date>.json and .md into --out.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 scripts/bench_runner.py --check --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from paradec import kernels
from paradec.kernels import matmul
from paradec.runners.base import prefill
from paradec.runners.native import NativeRunner
from paradec.runners.native.loading import transformer_from_state_dict
from paradec.tree import build_tree

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_parameters=LLAMA3_ROPE,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_parameters={**LLAMA3_ROPE, "factor": 32.0},
    ),
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # the real-model issue's two targets, as Llama shapes (Qwen2's q/k/v biases left out: 0.1% of its bytes)
    "q15": dict(  # Qwen2.5-Coder-1.5B-Instruct
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "smol": dict(  # SmolLM2-135M-Instruct
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
}
SHAPES["tiny"] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    tie_word_embeddings=True,
)  # a CPU dry run of this script
NATIVE_VARIANTS = {  # name -> (torch.compile the elementwise work, static buckets + CUDA graphs, SDPA backends)
    "graphs+compile": (True, True, None),
    "graphs+exact": (False, True, "exact"),  # the batch-invariant kernels (paradec.kernels), elementwise work eager
    "graphs+compile+exact": (True, True, "exact"),  # ... and the elementwise work compiled around them
    "graphs+exact-unfused": (False, True, "exact"),  # graphs+exact without the fused pointwise kernels
    "graphs+compile+exact-wide": (True, True, "exact"),  # ... with 128-row programs above M = 64 (matmul.WIDE_ROWS)
    "graphs+compile+efficient": (True, True, (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)),
    "graphs": (False, True, None),
    "eager": (False, False, None),
}
TREE_64 = tuple([-1] * 4 + [i // 4 for i in range(16)] + [4 + i // 3 for i in range(44)])  # 4, 16, 44 per level


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """Device time of a region: CUDA events on a GPU, the host clock otherwise."""

    def __enter__(self) -> Timer:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    @property
    def ms(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return 1e3 * (self.t1 - self.t0)


def llama_config(shape: str, max_positions: int = 131072):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )


def hf_model(config, dtype: torch.dtype, device: torch.device, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval().requires_grad_(False)


def native_from_hf(
    model, *, compile: bool, static_shapes: bool = True, sdpa_backends=None, max_cache_len: int = 4096
) -> NativeRunner:
    config = json.loads(model.config.to_json_string())
    exact = sdpa_backends == "exact"
    weights = transformer_from_state_dict(
        config,
        model.state_dict(),
        device=model.device,
        dtype=model.dtype,
        compile=compile,
        sdpa_backends=None if exact else sdpa_backends,
        exact=exact,
    )
    return NativeRunner(weights, max_cache_len=max_cache_len, static_shapes=static_shapes)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written (median of 20)."""
    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        with Timer() as timer:
            dst.copy_(src)
        times.append(timer.ms / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[5:]) / 1e9


# --------------------------------------------------------------------------------------------------------------
# correctness on CUDA


def run_checks(device: torch.device) -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        pad_token_id=0,
    )
    configs = {
        "llama": LlamaConfig(
            **common, rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 256}, tie_word_embeddings=True
        ),
        "mistral": MistralConfig(**{**common, "num_key_value_heads": 1}, sliding_window=None),
        "qwen2": Qwen2Config(**{**common, "num_key_value_heads": 8}),
        "qwen3": Qwen3Config(**common, head_dim=48, attention_bias=True),
    }
    out = {}
    gen = torch.Generator().manual_seed(0)
    for arch, config in configs.items():
        row = {}
        ids = torch.randint(1, 512, (300,), generator=gen).to(device)
        ref32 = hf_model(config, torch.float32, device, attn="eager")
        with torch.no_grad():
            logits32 = ref32(ids[None]).logits[0]
        # fp32: graphs + compiled kernels against transformers
        runner = native_from_hf(ref32, compile=True)
        got = [prefill(runner, ids[:200], logits="all").logits]
        for i in range(200, 240):
            got.append(prefill(runner, ids[i : i + 1], logits="all").logits)
        got.append(prefill(runner, ids[240:300], logits="all").logits)
        row["fp32_graphs_compiled_vs_hf"] = rel_err(torch.cat(got), logits32)
        # greedy tokens vs generate (fp32), through graphs
        with torch.no_grad():
            ref_tokens = ref32.generate(ids[None, :50], do_sample=False, max_new_tokens=40, min_new_tokens=40)[0, 50:]
        runner.reset()
        out_step = prefill(runner, ids[:50], logits="last")
        tokens = []
        for _ in range(40):
            token = out_step.logits[-1].argmax()
            tokens.append(int(token))
            out_step = prefill(runner, token.view(1), logits="last")
        row["fp32_greedy_equal"] = tokens == ref_tokens.tolist()
        # tree scoring == scoring each path, and compaction == fresh cache (fp32, graphs)
        tree = build_tree(TREE_64, device)
        nodes = torch.randint(1, 512, (65,), generator=gen).to(device)
        runner.reset()
        prefill(runner, ids[:100])
        tree_logits = runner.forward(nodes, tree).logits
        runner.commit(0)
        worst = 0.0
        for path in tree.paths[::5]:
            runner.rollback(100)
            chain = runner.forward(nodes[list(path)]).logits
            runner.commit(0)
            worst = max(worst, rel_err(tree_logits[list(path)], chain))
        row["fp32_tree_vs_paths"] = worst
        path = list(tree.paths[17])
        runner.rollback(100)
        runner.forward(nodes, tree)
        runner.commit(path)
        fresh = native_from_hf(ref32, compile=True)
        prefill(fresh, torch.cat([ids[:100], nodes[path]]))
        n = 100 + len(path)
        row["fp32_compaction_vs_fresh"] = rel_err(runner.cache.data[..., :n, :], fresh.cache.data[..., :n, :])
        # no host synchronisation inside the runner (graphs already captured above)
        sync()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            runner.rollback(100)
            runner.forward(nodes, tree)
            runner.commit(path)
            runner.forward(nodes[:1])
            runner.commit(1)
            row["no_sync_in_runner"] = True
        except RuntimeError as error:
            row["no_sync_in_runner"] = f"sync: {error}"
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        del runner, fresh
        # bf16: native (graphs + compiled) and HF bf16, both against HF fp32
        ref16 = hf_model(config, torch.bfloat16, device)
        ref16.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref32.state_dict().items()})
        with torch.no_grad():
            hf16 = ref16(ids[None]).logits[0].float()
        native16 = native_from_hf(ref16, compile=True)
        eager16 = native_from_hf(ref16, compile=False, static_shapes=False)
        rows = {}
        for name, runner16 in (("graphs", native16), ("eager", eager16)):
            rows[name] = [prefill(runner16, ids[:200], logits="all").logits]
            rows[name] += [prefill(runner16, ids[i : i + 1], logits="all").logits for i in range(200, 216)]
        graph_rows, eager_rows = rows["graphs"], rows["eager"]
        row["bf16_hf_vs_fp32"] = rel_err(hf16[:216], logits32[:216])
        row["bf16_native_graphs_vs_fp32"] = rel_err(torch.cat(graph_rows), logits32[:216])
        row["bf16_native_eager_vs_fp32"] = rel_err(torch.cat(eager_rows), logits32[:216])
        row["bf16_graphs_vs_eager"] = rel_err(torch.cat(graph_rows), torch.cat(eager_rows))
        out[arch] = row
        log("check", arch, json.dumps(row))
        del ref32, ref16, native16, eager16
    return out


# --------------------------------------------------------------------------------------------------------------
# timing


def native_decode(runner: NativeRunner, prompt: torch.Tensor, new_tokens: int, *, host_sync: bool = True) -> dict:
    """Greedy decode: prefill, then one forward + argmax per token (a host read of the token each step if sync)."""
    runner.reset()
    sync()
    t0 = time.perf_counter()
    out = prefill(runner, prompt, logits="last")
    token = out.logits[-1].argmax()
    int(token)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = runner.forward(token.view(1), logits="last")
        runner.commit(1)
        token = out.logits[-1].argmax()
        if host_sync:
            int(token)
    sync()
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0}


def hf_generate(model, prompt: torch.Tensor, new_tokens: int, *, static: bool) -> float:
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), **kwargs)
    sync()
    assert out.shape[1] == prompt.shape[0] + new_tokens
    return time.perf_counter() - t0


def scoring_costs(runner: NativeRunner, prompt: torch.Tensor, reps: int = 30) -> dict:
    """Median GPU time (CUDA events) of one forward of n inputs after the prompt, all logits."""
    runner.reset()
    prefill(runner, prompt)
    length = runner.length
    cases = {f"chain{n}": (n, None) for n in (1, 4, 8, 9, 16)}
    cases["tree64"] = (65, build_tree(TREE_64, runner.device))
    result = {}
    for name, (n, tree) in cases.items():
        tokens = prompt[torch.arange(n, device=prompt.device) % prompt.shape[0]]
        times = []
        for rep in range(reps + 3):
            with Timer() as timer:
                runner.forward(tokens, tree)
            runner.commit(0)
            if rep >= 3:
                times.append(timer.ms)
        result[name] = statistics.median(times)
    runner.rollback(length)
    return {"ms": result, "ratio": {k: v / result["chain1"] for k, v in result.items()}}


def profile_step(runner: NativeRunner, prompt: torch.Tensor) -> dict:
    """Kernels of one decode step (graph replay), from the profiler: count, GPU busy time, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    runner.reset()
    prefill(runner, prompt)
    token = prompt[:1]
    for _ in range(3):
        runner.forward(token)
        runner.commit(1)
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            runner.forward(token)
            runner.commit(1)
        sync()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    busy_us = sum(e.self_device_time_total for e in events) / 5
    kernels = sum(e.count for e in events) / 5
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:8]
    return {
        "kernels_per_step": kernels,
        "gpu_busy_us_per_step": busy_us,
        "top": [(e.key[:80], round(e.self_device_time_total / 5, 1), e.count // 5) for e in top],
        "table": table,
    }


def bench_shape(shape: str, opts, results: dict, out_dir: Path, bandwidth: float) -> None:
    config = llama_config(shape)
    model = hf_model(config, opts.dtype, opts.device)
    n_params = sum(p.numel() for p in model.parameters())
    width = opts.dtype.itemsize
    weight_bytes = n_params * width
    read_bytes = weight_bytes - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size * width)
    row = results["shapes"].setdefault(shape, {})
    row.update(
        params=n_params,
        weight_gb=weight_bytes / 1e9,
        roofline_tok_s=bandwidth * 1e9 / weight_bytes,
        roofline_ms=1e3 * weight_bytes / (bandwidth * 1e9),
        read_roofline_tok_s=bandwidth * 1e9 / read_bytes,
    )
    prompt = torch.randint(1, config.vocab_size, (opts.prompt,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(opts.device)
    for variant in opts.native:
        compile, static, backends = NATIVE_VARIANTS[variant]
        kernels.fused = variant != "graphs+exact-unfused"  # read when the graphs are captured
        matmul.WIDE_ROWS = 128 if variant.endswith("-wide") else 0
        t0 = time.perf_counter()
        runner = native_from_hf(model, compile=compile, static_shapes=static, sdpa_backends=backends)
        native_decode(runner, prompt, opts.new_tokens)  # warm-up: compiles, captures the graphs it meets
        warmup = time.perf_counter() - t0
        runs = [native_decode(runner, prompt, opts.new_tokens) for _ in range(opts.repeats)]
        decode_s = statistics.median(r["decode_s"] for r in runs)
        total_s = statistics.median(r["total_s"] for r in runs)
        entry = {
            "warmup_s": warmup,
            "tok_s": opts.new_tokens / total_s,
            "decode_tok_s": (opts.new_tokens - 1) / decode_s,
            "prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in runs),
        }
        entry["decode_pct_roofline"] = 100 * entry["decode_tok_s"] / row["roofline_tok_s"]
        if static:
            nosync = native_decode(runner, prompt, opts.new_tokens, host_sync=False)
            entry["decode_tok_s_nosync"] = (opts.new_tokens - 1) / nosync["decode_s"]
            entry["scoring"] = scoring_costs(runner, prompt)
            entry["graphs"] = runner.graphs_captured
            if opts.profile:
                try:
                    entry["profile"] = profile_step(runner, prompt)
                except Exception as error:  # the profiler is a diagnostic: never lose the timings to it
                    entry["profile"] = f"failed: {error!r}"
        row.setdefault("native", {})[variant] = entry
        log(shape, variant, json.dumps({k: v for k, v in entry.items() if k != "profile"}))
        if isinstance(entry.get("profile"), dict):
            log(shape, variant, "profile", json.dumps({k: v for k, v in entry["profile"].items() if k != "table"}))
        write_results(results, out_dir)
        del runner
    for variant in opts.hf:
        static = variant == "static+compile"
        t0 = time.perf_counter()
        hf_generate(model, prompt, opts.new_tokens if static else 8, static=static)  # warm-up (compiles if static)
        warmup = time.perf_counter() - t0
        times = [hf_generate(model, prompt, opts.new_tokens, static=static) for _ in range(opts.hf_repeats)]
        entry = {"warmup_s": warmup, "tok_s": opts.new_tokens / statistics.median(times)}
        entry["pct_roofline"] = 100 * entry["tok_s"] / row["roofline_tok_s"]
        row.setdefault("hf", {})[variant] = entry
        log(shape, "hf", variant, json.dumps(entry))
        write_results(results, out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds per call of `fn`, replayed from one CUDA graph of `reps` calls (launch gaps as in our graphs)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(10):
        with Timer() as timer:
            graph.replay()
        times.append(timer.ms)
    return 1e3 * statistics.median(times) / reps


def attend(q, k, v, bias, backend: SDPBackend | None) -> torch.Tensor:
    if backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def micro_benchmarks(device: torch.device) -> dict:
    """Where the non-GEMM and small-GEMM time goes: attention backends and GEMV call forms, in isolation."""
    out = {"attention_us": {}, "gemv": {}}
    dtype = torch.bfloat16
    backends = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    for name, nkv, group, hs in (("8b", 8, 4, 128), ("1b", 8, 4, 64), ("100m", 4, 3, 64)):
        for T, kv in ((1, 512), (9, 512), (65, 512), (1, 4096)):
            q = torch.randn(1, nkv, group * T, hs, device=device, dtype=dtype)
            k, v = (torch.randn(1, nkv, kv, hs, device=device, dtype=dtype) for _ in range(2))
            bias = torch.zeros(1, 1, group * T, kv, device=device, dtype=dtype)
            bias[..., kv - T + 1 :] = float("-inf")
            row = {}
            for label, backend in backends.items():
                try:
                    row[label] = round(graph_us(partial(attend, q, k, v, bias, backend)), 2)
                except RuntimeError as error:
                    row[label] = f"n/a: {str(error)[:60]}"
            out["attention_us"][f"{name} T={T} kv={kv}"] = row
            log("attention", name, T, kv, row)
    shapes = {
        "8b": ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)),
        "100m": ((1280, 768), (768, 768), (4096, 768), (768, 2048)),
    }
    reduce_gemv = torch.compile(lambda w, x: (w * x).sum(-1), dynamic=True)
    for name, mats in shapes.items():
        for n, k in mats:
            w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
            wt = w.t().contiguous()
            x1, x8 = torch.randn(1, k, device=device, dtype=dtype), torch.randn(8, k, device=device, dtype=dtype)
            linear = torch.nn.functional.linear
            forms = {
                "linear M=1": partial(linear, x1, w),
                "x @ W^T stored (K,N) M=1": partial(torch.matmul, x1, wt),
                "mv M=1": partial(torch.mv, w, x1[0]),
                "compiled (w*x).sum M=1": partial(reduce_gemv, w, x1),
                "linear M=8": partial(linear, x8, w),
            }
            row = {}
            for label, fn in forms.items():
                try:
                    us = graph_us(fn)
                    row[label] = (round(us, 2), round(n * k * 2 / us / 1e3))  # (us, GB/s of weight reads)
                except Exception as error:  # a diagnostic: record and go on
                    row[label] = f"n/a: {str(error)[:60]}"
            out["gemv"][f"{name} {n}x{k}"] = row
            log("gemv", name, n, k, row)
    return out


def write_results(results: dict, out_dir: Path) -> None:
    stem = f"runner-{results['card_slug']}-{results['date']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        f"# Native runner benchmark: {results['card']}, {results['date']}",
        "",
        f"Command: `{results['command']}`  ",
        f"torch {results['torch']}, transformers {results['transformers']}; batch 1, {results['dtype']}, random weights, "
        f"prompt {results['prompt']}, {results['new_tokens']} new tokens, greedy.  ",
        f"Copy bandwidth (read + write): {results.get('copy_gb_s', 0):.0f} GB/s. Roofline = that / weight bytes "
        "(all parameters, as the issue counts them).",
        "",
        "| shape | params | roofline tok/s | HF eager | HF static+compile | native | native decode-only (best variant) "
        "| % roofline (decode) | chain 4 / 8 / 16 | tree 64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, row in results["shapes"].items():
        native = row.get("native", {})
        best_name = max(native, key=lambda v: native[v]["decode_tok_s"], default=None)
        best = native.get(best_name, {})
        hf = row.get("hf", {})
        ratio = best.get("scoring", {}).get("ratio", {})

        def fmt(value, spec=".0f"):
            return "-" if value is None else format(value, spec)

        lines.append(
            f"| {shape} | {row['params'] / 1e9:.2f} B | {row['roofline_tok_s']:.0f} ({row['roofline_ms']:.2f} ms) "
            f"| {fmt(hf.get('eager', {}).get('tok_s'))} | {fmt(hf.get('static+compile', {}).get('tok_s'))} "
            f"| {fmt(best.get('tok_s'))} | {fmt(best.get('decode_tok_s'))} ({best_name}) "
            f"| {fmt(best.get('decode_pct_roofline'), '.1f')} "
            f"| {fmt(ratio.get('chain4'), '.2f')} / {fmt(ratio.get('chain8'), '.2f')} / {fmt(ratio.get('chain16'), '.2f')} "
            f"| {fmt(ratio.get('tree64'), '.2f')} |"
        )
    lines += ["", "Native variants (decode tok/s, one host sync per token / none; warm-up seconds):", ""]
    for shape, row in results["shapes"].items():
        for variant, entry in row.get("native", {}).items():
            lines.append(
                f"- {shape} {variant}: {entry['decode_tok_s']:.0f} / {entry.get('decode_tok_s_nosync', 0):.0f} tok/s, "
                f"prefill {entry['prefill_ms']:.1f} ms, warm-up {entry['warmup_s']:.1f} s"
                + (
                    f", scoring ms {json.dumps({k: round(v, 3) for k, v in entry['scoring']['ms'].items()})}"
                    if "scoring" in entry
                    else ""
                )
            )
    if results.get("checks"):
        lines += [
            "",
            "CUDA correctness checks (relative errors):",
            "",
            "```",
            json.dumps(results["checks"], indent=1),
            "```",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--shapes", default="100m,1b,8b")
    parser.add_argument(
        "--native", default="graphs+compile", help="comma list of graphs+compile, graphs+exact, graphs, eager"
    )
    parser.add_argument("--hf", default="eager,static+compile", help="comma list of eager, static+compile ('' = none)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-repeats", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="run the CUDA correctness checks first")
    parser.add_argument("--profile", action="store_true", help="profile one decode step per shape")
    parser.add_argument("--micro", action="store_true", help="attention and GEMV micro-benchmarks")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run with --shapes tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    opts = parser.parse_args()
    opts.device = torch.device(opts.device)
    opts.dtype = getattr(torch, opts.dtype)
    if opts.device.type == "cuda":
        opts.device = torch.device("cuda", torch.cuda.current_device())
    torch._dynamo.config.recompile_limit = 64  # the checks compile for 2 dtypes x 3 block structures x 2 shapes
    opts.native = [v for v in opts.native.split(",") if v]
    opts.hf = [v for v in opts.hf.split(",") if v]
    opts.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if opts.device.type == "cuda" else "cpu"
    results = {
        "card": card,
        "card_slug": next((s for s in ("h200", "h100", "a100", "cpu") if s in card.lower()), "gpu"),
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONUNBUFFERED=1 PYTHONPATH=src python3 " + " ".join(sys.argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(opts.dtype).removeprefix("torch."),
        "prompt": opts.prompt,
        "new_tokens": opts.new_tokens,
        "shapes": {},
    }
    log(card, torch.__version__, transformers.__version__)
    if opts.check:
        results["checks"] = run_checks(opts.device)
        write_results(results, opts.out)
    results["copy_gb_s"] = copy_bandwidth(opts.device)
    log(f"copy bandwidth {results['copy_gb_s']:.0f} GB/s")
    if opts.micro:
        results["micro"] = micro_benchmarks(opts.device)
        write_results(results, opts.out)
    for shape in opts.shapes.split(","):
        bench_shape(shape, opts, results, opts.out, results["copy_gb_s"])
    write_results(results, opts.out)
    print(markdown(results))


if __name__ == "__main__":
    main()
