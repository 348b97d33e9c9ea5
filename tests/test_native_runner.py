"""The native runner computes what `transformers` computes, through every cache operation.

Tiny random-weight checkpoints of the four supported architectures, each exercising its own feature: Llama with
Llama-3 rope scaling, GQA and tied embeddings; Mistral with one KV head (MQA); Qwen2 with q/k/v bias and full
multi-head attention; Qwen3 with q/k norm, attention bias and a head_dim that is not hidden/heads. Every runner
test runs twice: with exact shapes (eager) and with the padded static buckets that CUDA graphs replay on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from paradec.errors import ParadecError
from paradec.runners.base import Runner, prefill
from paradec.runners.native import NativeRunner, supports, unsupported_reason
from paradec.tree import build_tree, device_tree

VOCAB = 101
TOL = 1e-4  # relative error, fp32


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=0,
    )
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        config = LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
    elif arch == "mistral":
        config = MistralConfig(**{**common, "num_key_value_heads": 1}, sliding_window=None)
    elif arch == "qwen2":
        config = Qwen2Config(**{**common, "num_key_value_heads": 4})
    else:
        config = Qwen3Config(**common, head_dim=24, attention_bias=True)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (transformers model, checkpoint dir)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, arch in enumerate(ARCHS):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        out[arch] = (model, path)
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def sequence(seed: int, n: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_and_hidden_match_transformers(checkpoints, arch, static):
    model, path = checkpoints[arch]
    runner = NativeRunner.from_pretrained(path, static_shapes=static)
    assert isinstance(runner, Runner)
    ids = sequence(1, 23)
    out = runner.forward(ids, hidden=True)
    runner.commit(len(ids))
    assert out.logits.dtype == torch.float32 and out.logits.shape == (23, VOCAB)
    assert rel_err(out.logits, hf_logits(model, ids)) < TOL
    with torch.no_grad():
        ref_hidden = model.model(ids[None]).last_hidden_state[0]
    assert out.hidden.shape == (23, runner.hidden_size)
    assert rel_err(out.hidden, ref_hidden) < TOL
    assert runner.length == 23


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_after_rejections_and_rollbacks_matches_transformers(checkpoints, arch, static):
    model, path = checkpoints[arch]
    runner = NativeRunner.from_pretrained(path, static_shapes=static)
    ids = sequence(2, 40)
    junk = sequence(3, 8)
    ref = hf_logits(model, ids)
    got = {}  # position -> logits row

    def score(start: int, tokens: torch.Tensor, keep: int, *, positions=None) -> None:
        assert runner.length == start
        out = runner.forward(tokens)
        for j in range(len(tokens)) if positions is None else positions:
            got[start + j] = out.logits[j]
        runner.commit(keep)

    score(0, ids[:10], 10)
    score(10, torch.cat([ids[10:12], junk[:3]]), 2, positions=[0, 1])  # 3 rejected drafts
    score(12, ids[12:13], 1)
    score(13, torch.cat([ids[13:14], junk[3:8]]), 1, positions=[0])  # a rejected chain of 5
    runner.rollback(8)  # back into the committed prefix
    score(8, ids[8:20], 12)
    score(20, ids[20:21], 0)  # scored, nothing kept
    score(20, ids[20:33], 13)
    runner.reset()
    score(0, ids[:36], 36)
    for position, logits in got.items():
        assert rel_err(logits, ref[position]) < TOL, position


TREE = (-1, -1, 0, 0, 1, 2, 2, 4, 5)  # 9 nodes: 2 roots' children, branching, depth 4


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tree_scoring_equals_scoring_each_path(checkpoints, arch, static):
    _, path = checkpoints[arch]
    runner = NativeRunner.from_pretrained(path, static_shapes=static)
    prefix = sequence(4, 15)
    tree = build_tree(TREE)
    nodes = sequence(5, len(TREE) + 1)  # input 0 is the pending token, input i + 1 is node i
    prefill(runner, prefix)
    out = runner.forward(nodes, tree)
    runner.commit(0)
    for leaf_path in tree.paths:
        runner.rollback(15)
        chain = runner.forward(nodes[list(leaf_path)])
        runner.commit(0)
        assert rel_err(out.logits[list(leaf_path)], chain.logits) < TOL, leaf_path


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cache_after_compaction_equals_cache_built_from_scratch(checkpoints, arch, static):
    model, path = checkpoints[arch]
    runner = NativeRunner.from_pretrained(path, static_shapes=static)
    fresh = NativeRunner.from_pretrained(path, static_shapes=static)
    prefix = sequence(6, 12)
    tree = build_tree(TREE)
    nodes = sequence(7, len(TREE) + 1)
    prefill(runner, prefix)
    runner.forward(nodes, tree)
    accepted = [0, 2, 5, 8]  # root -> node 1 -> node 4 -> node 7: provisional slots 0, 2, 5, 8
    runner.commit(accepted)
    kept = torch.cat([prefix, nodes[accepted]])
    prefill(fresh, kept)
    assert runner.length == fresh.length == 16
    committed = runner.cache.data[..., :16, :]  # (L, 2, nkv, 16, hs)
    assert rel_err(committed, fresh.cache.data[..., :16, :]) < 1e-5  # a misplaced slot would be O(1)
    # and decoding goes on from the compacted cache exactly as from the sequence itself
    follow = sequence(8, 3)
    out = runner.forward(follow)
    runner.commit(3)
    ref = hf_logits(model, torch.cat([kept, follow]))
    assert rel_err(out.logits, ref[16:]) < TOL


def on_device(parents: tuple[int, ...]):
    """The tree a drafter would build on the device (its parents unknown on the host)."""
    return device_tree(torch.tensor(parents), len(parents))


def test_static_buckets_ignore_stale_buffers(checkpoints):
    """Mixed tree and chain shapes through the padded buffers agree with the exact-shape path."""
    _, path = checkpoints["qwen2"]
    static = NativeRunner.from_pretrained(path, static_shapes=True)
    eager = NativeRunner.from_pretrained(path, static_shapes=False)
    steps = [
        (sequence(9, 20), None, 20),
        (sequence(10, 10), build_tree(TREE), [0, 1, 4]),
        (sequence(11, 3), None, 1),
        (sequence(12, 5), build_tree((-1, -1, 1, 1)), [0, 2, 3]),
        (sequence(13, 10), build_tree(TREE), [0, 1, 3, 6]),  # same shape as loaded before: buffers reused
        (sequence(14, 1), None, 1),
        (sequence(15, 6), build_tree((-1, 0, 0, 2, 2)), [0, 1, 3, 5]),
        (sequence(16, 10), on_device(TREE), [0, 2, 5]),  # a device tree: rows always reloaded
        (sequence(17, 10), build_tree(TREE), [0, 1, 4]),  # ... and after it the host tree of the same shape
        (sequence(18, 5), on_device((-1, 0, 1, 1)), [0, 1, 2, 4]),
    ]
    for tokens, tree, keep in steps:
        a, b = static.forward(tokens, tree, hidden=True), eager.forward(tokens, tree, hidden=True)
        static.commit(keep)
        eager.commit(keep)
        assert rel_err(a.logits, b.logits) < TOL
        assert rel_err(a.hidden, b.hidden) < TOL
    assert static.length == eager.length == 46
    assert rel_err(static.cache.data[..., :46, :], eager.cache.data[..., :46, :]) < 1e-5


def test_logits_modes(checkpoints):
    _, path = checkpoints["llama"]
    for static in (False, True):
        runner = NativeRunner.from_pretrained(path, static_shapes=static)
        ids = sequence(16, 6)
        full = runner.forward(ids, logits="all")
        runner.commit(0)
        last = runner.forward(ids, logits="last")
        runner.commit(0)
        none = runner.forward(ids, logits="none", hidden=True)
        runner.commit(6)
        assert last.logits.shape == (1, VOCAB) and rel_err(last.logits, full.logits[-1:]) < TOL
        assert none.logits is None and none.hidden.shape == (6, 64)
        assert full.hidden is None


def test_long_chain_prefill_runs_in_chunks(checkpoints):
    model, path = checkpoints["mistral"]
    runner = NativeRunner.from_pretrained(path, static_shapes=True)
    ids = sequence(17, 1300)  # longer than the chunk (1024) and than every static bucket
    out = runner.forward(ids, logits="all")
    runner.commit(1300)
    ref = hf_logits(model, ids)
    assert rel_err(out.logits, ref) < TOL
    step = runner.forward(sequence(18, 1))
    runner.commit(1)
    assert runner.length == 1301 and step.logits.shape == (1, VOCAB)


@pytest.mark.parametrize("logits", ["all", "last", "none"])
def test_a_prompt_longer_than_every_bucket_runs_on_the_static_buckets(checkpoints, logits, monkeypatch):
    """A 300-token chain goes through the static forward in bucket-sized pieces (never the eager path), returns
    what one forward would, and leaves a cache that a partial commit and later steps use like any other."""
    model, path = checkpoints["llama"]
    runner = NativeRunner.from_pretrained(path, static_shapes=True)
    monkeypatch.setattr(runner, "_eager_forward", lambda *a, **k: pytest.fail("the eager path ran"))
    prefix, ids = sequence(20, 5), sequence(21, 300)
    runner.forward(prefix)
    runner.commit(5)
    out = runner.forward(ids, logits=logits, hidden=True)
    assert runner.length == 5  # provisional until the commit
    context = torch.cat([prefix, ids])
    ref = hf_logits(model, context)[5:]
    with torch.no_grad():
        ref_hidden = model.model(context[None]).last_hidden_state[0, 5:]
    assert out.hidden.shape == (300, runner.hidden_size) and rel_err(out.hidden, ref_hidden) < TOL
    if logits == "none":
        assert out.logits is None
    else:
        expected = ref if logits == "all" else ref[-1:]
        assert out.logits.shape == expected.shape and rel_err(out.logits, expected) < TOL
    runner.commit(260)  # keep a prefix of the chain, then go on from there
    step = runner.forward(sequence(22, 3))
    runner.commit(3)
    after = torch.cat([context[:265], sequence(22, 3)])
    assert runner.length == 268 and rel_err(step.logits, hf_logits(model, after)[-3:]) < TOL


def test_sharded_checkpoint_loads_the_same_model(checkpoints, tmp_path):
    model, path = checkpoints["qwen3"]
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = sequence(19, 9)
    sharded = NativeRunner.from_pretrained(tmp_path).forward(ids).logits
    single = NativeRunner.from_pretrained(path).forward(ids).logits
    assert torch.equal(sharded, single)


def test_view_runs_a_subset_of_layers_on_shared_weights(checkpoints):
    import copy

    model, path = checkpoints["llama"]
    runner = NativeRunner.from_pretrained(path)
    view = runner.view([0, 2])
    assert view.model is runner.model and view.cache is not runner.cache
    truncated = copy.deepcopy(model)
    truncated.model.layers = torch.nn.ModuleList([truncated.model.layers[0], truncated.model.layers[2]])
    truncated.config.num_hidden_layers = 2
    ids = sequence(20, 14)
    with torch.no_grad():
        ref = truncated(ids[None], use_cache=False).logits[0]
    first = view.forward(ids[:10])
    view.commit(10)
    second = view.forward(ids[10:])
    view.commit(4)
    assert rel_err(torch.cat([first.logits, second.logits]), ref) < TOL
    full = runner.forward(ids)  # the full runner is untouched by its view
    assert rel_err(full.logits, hf_logits(model, ids)) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_equals_transformers_generate(checkpoints, arch):
    model, path = checkpoints[arch]
    runner = NativeRunner.from_pretrained(path, static_shapes=True)
    prompt = sequence(21, 7)
    with torch.no_grad():
        ref = model.generate(
            prompt[None],
            attention_mask=torch.ones(1, 7, dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            pad_token_id=0,
        )[0, 7:].tolist()
    out = prefill(runner, prompt, logits="last")
    tokens = []
    for _ in range(24):
        token = out.logits[-1].argmax()
        tokens.append(int(token))
        out = prefill(runner, token.view(1), logits="last")
    assert tokens == ref


def test_bfloat16_runner_tracks_float32_reference(checkpoints):
    model, path = checkpoints["qwen3"]
    runner = NativeRunner.from_pretrained(path, dtype="bfloat16")
    assert runner.dtype == torch.bfloat16
    ids = sequence(22, 16)
    out = runner.forward(ids)
    assert out.logits.dtype == torch.float32
    assert rel_err(out.logits, hf_logits(model, ids)) < 3e-2


def test_supports_and_reasons(checkpoints):
    def config_dict(arch: str, **overrides) -> dict:
        return json.loads(tiny_config(arch, **overrides).to_json_string())

    for arch in ARCHS:
        assert supports(config_dict(arch)), arch
    windowed = config_dict("mistral", sliding_window=512)
    assert not supports(windowed)
    assert "sliding_window 512" in unsupported_reason(windowed)
    assert unsupported_reason(windowed, max_cache_len=512) is None
    qwen_window = config_dict("qwen2", use_sliding_window=True, sliding_window=256, max_window_layers=1)
    qwen_window["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention"]
    assert "sliding_window 256" in unsupported_reason(qwen_window)
    yarn = config_dict("llama")
    yarn["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    assert "'yarn'" in unsupported_reason(yarn)
    other = config_dict("llama")
    other["architectures"] = ["GPT2LMHeadModel"]
    assert "'GPT2LMHeadModel'" in unsupported_reason(other)
    gelu = config_dict("llama", hidden_act="gelu")
    assert "'gelu'" in unsupported_reason(gelu)


def test_clear_errors(checkpoints, tmp_path):
    _, path = checkpoints["mistral"]
    with pytest.raises(ParadecError, match=r"no config\.json"):
        NativeRunner.from_pretrained(tmp_path)
    with pytest.raises(ParadecError, match="'float8'"):
        NativeRunner.from_pretrained(path, dtype="float8")
    with pytest.raises(ParadecError, match="max_cache_len 4096"):
        NativeRunner.from_pretrained(path, max_cache_len=4096)
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    config = json.loads((path / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    (windowed / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ParadecError, match="sliding_window 64"):
        NativeRunner.from_pretrained(windowed)
    assert NativeRunner.from_pretrained(windowed, max_cache_len=64).max_length == 64

    runner = NativeRunner.from_pretrained(path, max_cache_len=32)
    with pytest.raises(ParadecError, match="exceeds the native runner's max_length 32"):
        runner.forward(sequence(23, 33))
    runner.forward(sequence(24, 4), build_tree((-1, -1, 0)))
    with pytest.raises(RuntimeError, match="before commit"):
        runner.forward(sequence(25, 1))
    with pytest.raises(ValueError, match="not a root path"):
        runner.commit([0, 1, 2])  # nodes 0 and 1 are siblings
    runner.commit([0, 2])  # a failed commit leaves the forward pending
    runner.forward(sequence(26, 4))
    with pytest.raises(ValueError, match="not a root path"):
        runner.commit([0, 2])  # a chain keeps a prefix
    runner.commit(2)
    runner.forward(sequence(27, 4), on_device((-1, -1, 0)))
    for bad in ([1], [0, 2, 1], [0, 0], [0, 4]):  # a device tree's path must start at the root and descend
        with pytest.raises(ValueError, match="not a root path"):
            runner.commit(bad)
    runner.commit([0, 3])
    assert runner.length == 6
    with pytest.raises(ValueError, match="rollback to 7"):
        runner.rollback(7)
    with pytest.raises(ParadecError, match=r"layers \[3\]"):
        runner.view([3])


TAPS = (1, 0, 1)  # decoder layers of the 3-layer models whose outputs a fused EAGLE-3 head reads: any order, repeats


def hf_layer_states(model, ids: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """`transformers`' outputs of `layers` (hidden_states[i + 1]) concatenated: [n, len(layers) * H]."""
    with torch.no_grad():
        states = model(ids[None], output_hidden_states=True).hidden_states
    return torch.cat([states[i + 1][0] for i in layers], -1)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_hidden_states_match_transformers_for_chains_and_trees(checkpoints, arch, static, monkeypatch):
    """`forward(hidden=layers)` returns those layers' outputs, equal to `transformers`' and to the hf runner's: for a
    prompt longer than every bucket and than the eager chunk (chunked both ways), then for host and device trees,
    each layer set over its own static buffers; `hidden=True` still returns the last hidden state after that."""
    from paradec.runners import HFRunner
    from paradec.runners.native import runner as runner_module

    model, path = checkpoints[arch]
    monkeypatch.setattr(runner_module, "PREFILL_CHUNK", 64)
    runner, hf = NativeRunner.from_pretrained(path, static_shapes=static), HFRunner(model)
    prompt = sequence(30, 150)
    out, ref = runner.forward(prompt, hidden=TAPS), hf.forward(prompt, hidden=TAPS)
    runner.commit(150)
    hf.commit(150)
    assert out.hidden.shape == ref.hidden.shape == (150, 3 * 64)
    assert rel_err(out.hidden, hf_layer_states(model, prompt, TAPS)) < TOL and rel_err(ref.hidden, out.hidden) < TOL
    tokens = sequence(31, 10)
    for tree, layers in ((build_tree(TREE), TAPS), (on_device(TREE), TAPS), (build_tree(TREE), (0,))):
        a, b = runner.forward(tokens, tree, hidden=layers), hf.forward(tokens, build_tree(TREE), hidden=layers)
        assert a.hidden.shape == (10, len(layers) * 64)
        assert rel_err(a.hidden, b.hidden) < TOL and rel_err(a.logits, b.logits) < TOL
        runner.commit([0, 1, 4])
        hf.commit([0, 1, 4])
    last, last_ref = runner.forward(tokens[:4], hidden=True), hf.forward(tokens[:4], hidden=True)
    assert last.hidden.shape == (4, 64) and rel_err(last.hidden, last_ref.hidden) < TOL
    runner.commit(4)
    for bad in ((2,), (), (0, -1)):  # the last layer's output before the norm is not lent
        with pytest.raises(ParadecError, match=r"lends the outputs of layers \[0, 2\) of its 3"):
            runner.forward(tokens[:1], hidden=bad)
