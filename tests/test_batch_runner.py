"""The batched native runner: one ragged forward over many cache slots computes, row for row, what a NativeRunner
scoring each sequence alone computes; slots never see each other; per-sequence commits leave each slot's cache as
a fresh prefill of the accepted tokens would; and one slot's view is a single-sequence Runner.

Tiny random-weight checkpoints (conftest's `make_config`, 3 layers so that two decoder layers' outputs can be
asked for) of Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k norm, head_dim != hidden / heads), fp32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_config, save_model
from paradec.errors import ParadecError
from paradec.runners.base import Runner, prefill
from paradec.runners.native import BatchedNativeRunner, NativeRunner
from paradec.runners.native import batch as batch_module
from paradec.step import SeqInputs, Step
from paradec.tree import build_tree, chain_parents, device_tree
from paradec.types import Proposal

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(autouse=True, params=["unpadded", "static"])
def shapes(request, monkeypatch):
    """Every test twice: steps unpadded (the CPU default), and padded to `StaticRagged`'s buckets over static
    buffers (the CUDA default, where they are captured as graphs; run eagerly here), unless a test says which."""
    if request.param == "static":
        init = BatchedNativeRunner.__init__

        def static_init(self, model, *, static_shapes=None, **kw):
            init(self, model, static_shapes=True if static_shapes is None else static_shapes, **kw)

        monkeypatch.setattr(BatchedNativeRunner, "__init__", static_init)
    return request.param


ATOL = RTOL = 1e-5  # fp32: the batched and single forwards differ only in reduction shapes
ULPS = 2e-6  # ... relative to a tensor's largest entry (see `close`)

TREE = (-1, -1, 0, 0, 1)  # 5 nodes (6 inputs with the root): branching at the root and below node 0
# input index parents: 1 <- 0, 2 <- 0, 3 <- 1, 4 <- 1, 5 <- 2; root paths [0,1,3], [0,1,4], [0,2,5]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir, vocab_size):
    """arch -> a checkpoint directory."""
    root = tmp_path_factory.mktemp("batch-models")
    return {
        arch: save_model(make_config(arch, vocab_size, layers=3), root / arch, tokenizer_dir, seed=400 + seed)
        for seed, arch in enumerate(ARCHS)
    }


@pytest.fixture(scope="module")
def models(checkpoints):
    """arch -> the loaded native Transformer (weights shared by every runner of a test)."""
    return {arch: NativeRunner.from_pretrained(path).model for arch, path in checkpoints.items()}


def tokens(seed: int, n: int, vocab: int = 300) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def seq(slot: int, ids: torch.Tensor, parents: tuple[int, ...] | None = None) -> SeqInputs:
    """A sequence of a step: `ids` as a chain (parents None) or as the tree of `parents` (ids[0] the root)."""
    tree = build_tree(chain_parents(len(ids) - 1) if parents is None else parents)
    return SeqInputs(slot, ids, tree, Proposal.empty("cpu"))


def native(model, prefix: torch.Tensor) -> NativeRunner:
    runner = NativeRunner(model)
    prefill(runner, prefix)
    return runner


def batched_with(model, prefixes: list[torch.Tensor], slots: int = 4) -> tuple[BatchedNativeRunner, list[int]]:
    """A batched runner whose first len(prefixes) slots are prefilled through their views."""
    runner = BatchedNativeRunner(model, slots=slots)
    ids = [runner.allocate() for _ in prefixes]
    for slot, prefix in zip(ids, prefixes):
        prefill(runner.view(slot), prefix)
    return runner, ids


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32-tight: 1e-5, or a few ulps of the tensor's largest entry for the un-normalised residual stream and cache
    (entries up to ~30, where one ulp is ~2e-6)."""
    torch.testing.assert_close(got, ref, atol=max(ATOL, ULPS * float(ref.abs().max())), rtol=RTOL)


PREFIXES = (5, 9, 13)
STEP = (None, (-1, 0, 1), TREE)  # a chain of 1 input, a chain of 4, a tree of 6


def ragged_step(slots: list[int], inputs: list[torch.Tensor], order=(2, 0, 1)) -> Step:
    """Sequences in `order` (not slot order), so rows and slots are not trivially aligned."""
    return Step([seq(slots[b], inputs[b], STEP[b]) for b in order])


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_step_matches_each_sequence_alone(models, arch):
    model = models[arch]
    prefixes = [tokens(10 + i, n) for i, n in enumerate(PREFIXES)]
    inputs = [tokens(20, 1), tokens(21, 4), tokens(22, 6)]
    runner, slots = batched_with(model, prefixes)
    step = ragged_step(slots, inputs)
    assert step.sizes == (6, 1, 4)
    out = runner.forward(step, hidden=True)
    runner.commit([0, 0, 0])
    layers = runner.forward(step, logits="none", hidden=(1, 0))
    runner.commit([0, 0, 0])
    assert [runner.length(s) for s in slots] == list(PREFIXES)
    assert out.logits.shape == (11, runner.vocab_size) and out.logits.dtype == torch.float32
    assert out.hidden.shape == (11, runner.hidden_size)
    assert layers.logits is None and layers.hidden.shape == (11, 2 * runner.hidden_size)
    for b, original in enumerate((2, 0, 1)):
        alone = native(model, prefixes[original])
        tree = None if STEP[original] is None else build_tree(STEP[original])
        ref = alone.forward(inputs[original], tree, hidden=True)
        alone.commit(0)
        ref_layers = alone.forward(inputs[original], tree, logits="none", hidden=(1, 0))
        alone.commit(0)
        rows = step.rows(b)
        close(out.logits[rows], ref.logits)
        close(out.hidden[rows], ref.hidden)
        close(layers.hidden[rows], ref_layers.hidden)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_cross_talk_between_slots(models, arch):
    model = models[arch]
    prefixes = [tokens(30 + i, n) for i, n in enumerate(PREFIXES)]
    inputs = [tokens(40, 1), tokens(41, 4), tokens(42, 6)]
    base, slots = batched_with(model, prefixes)
    a = base.forward(ragged_step(slots, inputs), hidden=True)

    # every token of sequence 1 changed, its committed prefix included (same lengths, so the same shapes)
    changed_prefixes = [prefixes[0], (prefixes[1] + 7) % 300 + 1, prefixes[2]]
    changed_inputs = [inputs[0], (inputs[1] + 11) % 300 + 1, inputs[2]]
    other, _ = batched_with(model, changed_prefixes)
    step = ragged_step(slots, changed_inputs)
    b = other.forward(step, hidden=True)
    # only its committed prefix changed: sequence 1's rows must change (it reads its own slot), the others' not
    only_cache, _ = batched_with(model, changed_prefixes)
    c = only_cache.forward(ragged_step(slots, inputs), hidden=True)
    for row_block, original in enumerate((2, 0, 1)):
        rows = step.rows(row_block)
        if original == 1:
            assert not torch.allclose(a.logits[rows], b.logits[rows], atol=1e-3)
            assert not torch.allclose(a.logits[rows], c.logits[rows], atol=1e-3)
        else:
            assert torch.equal(a.logits[rows], b.logits[rows]) and torch.equal(a.hidden[rows], b.hidden[rows])
            assert torch.equal(a.logits[rows], c.logits[rows])
    # a dirty slot outside the step (allocated, prefilled with something else) is never read either
    base.commit([0, 0, 0])
    extra = base.allocate()
    prefill(base.view(extra), tokens(43, 30))
    again = base.forward(ragged_step(slots, inputs), hidden=True)
    assert torch.equal(again.logits, a.logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_commit_per_sequence_paths_equal_a_fresh_prefill(models, arch):
    model = models[arch]
    prefixes = [tokens(50 + i, n) for i, n in enumerate((5, 9, 13, 7))]
    inputs = [tokens(60, 6), tokens(61, 4), tokens(62, 6), tokens(63, 6)]
    runner, slots = batched_with(model, prefixes)
    shapes = (TREE, None, TREE, TREE)
    keeps = ([0, 2, 5], 3, [0], [0, 1, 4])  # compaction (2->1, 5->2); a chain prefix; the root only; 4->2
    step = Step([seq(slots[b], inputs[b], shapes[b]) for b in (3, 1, 0, 2)])
    runner.forward(step)
    runner.commit([keeps[b] for b in (3, 1, 0, 2)])
    accepted = [
        torch.cat([prefixes[b], inputs[b][keep if isinstance(keep, list) else list(range(keep))]])
        for b, keep in enumerate(keeps)
    ]
    assert [runner.length(s) for s in slots] == [len(x) for x in accepted] == [8, 12, 14, 10]
    follow = [tokens(70 + b, 3) for b in range(4)]
    out = runner.forward(Step([seq(slots[b], follow[b]) for b in range(4)]))
    runner.commit([3, 3, 3, 3])
    for b in range(4):
        fresh = native(model, accepted[b])
        n = len(accepted[b])
        # the committed cache itself equals one built from scratch (a misplaced column would be O(1) off)
        close(runner.cache.data[:, :, slots[b], :, :n], fresh.cache.data[..., :n, :])
        close(out.logits[b * 3 : b * 3 + 3], fresh.forward(follow[b]).logits)
        fresh.commit(3)


def test_rollback_touches_one_slot_and_released_slots_are_reused_clean(models):
    model = models["qwen2"]
    prefixes = [tokens(80 + i, n) for i, n in enumerate(PREFIXES)]
    inputs = [tokens(90, 1), tokens(91, 4), tokens(92, 6)]
    runner, slots = batched_with(model, prefixes)
    runner.rollback(slots[1], 4)
    assert [runner.length(s) for s in slots] == [5, 4, 13]
    step = ragged_step(slots, inputs)
    out = runner.forward(step)
    runner.commit([0, 0, 0])
    for b, original in enumerate((2, 0, 1)):
        kept = prefixes[original][:4] if original == 1 else prefixes[original]
        tree = None if STEP[original] is None else build_tree(STEP[original])
        close(out.logits[step.rows(b)], native(model, kept).forward(inputs[original], tree).logits)

    # release slot 1 (its 4 entries and 13 provisional columns of junk stay behind), allocate: the same slot
    assert runner.free == 1
    runner.release(slots[1])
    assert runner.free == 2 and runner.length(slots[1]) == 0
    reused = runner.allocate()
    assert reused == slots[1] and runner.length(reused) == 0
    newcomer = tokens(93, 2)  # shorter than what the slot held before
    prefill(runner.view(reused), newcomer)
    after = runner.forward(step)
    runner.commit([0, 0, 0])
    # bitwise what a runner that never saw the old sequence computes on the same layout
    clean, clean_slots = batched_with(model, [prefixes[0], newcomer, prefixes[2]])
    assert clean_slots == slots
    assert torch.equal(after.logits, clean.forward(step).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_view_behaves_like_native_runner(models, arch, monkeypatch):
    model = models[arch]
    monkeypatch.setattr(batch_module, "PREFILL_CHUNK", 8)  # so a 20-token prompt runs in 3 chunks
    batched = BatchedNativeRunner(model, slots=3)
    batched.allocate()
    view = batched.view(batched.allocate())  # slot 1: not the first
    ref = NativeRunner(model)
    assert isinstance(view, Runner)
    assert (view.vocab_size, view.hidden_size, view.num_layers, view.max_length) == (
        ref.vocab_size,
        ref.hidden_size,
        ref.num_layers,
        ref.max_length,
    )
    assert torch.equal(view.embed_weight(), ref.embed_weight())
    assert torch.equal(view.lm_head_weight(), ref.lm_head_weight())
    tree = build_tree(TREE)
    script = [  # (tokens, tree, logits, hidden, keep or ("rollback", length))
        (tokens(100, 20), None, "all", True, 20),  # a chunked prompt
        (tokens(101, 4), None, "last", False, 2),
        (tokens(102, 6), tree, "all", (0, 1), [0, 2, 5]),
        (tokens(103, 3), None, "none", True, 3),
        ("rollback", 15),
        (tokens(104, 6), tree, "all", True, [0, 1, 3]),
        (tokens(105, 12), None, "last", (1,), 5),  # chunked again, a partial commit
        ("reset",),
        (tokens(106, 9), None, "all", False, 9),
    ]
    for entry in script:
        if entry[0] == "rollback":
            view.rollback(entry[1])
            ref.rollback(entry[1])
        elif entry[0] == "reset":
            view.reset()
            ref.reset()
        else:
            ids, shape, logits, hidden, keep = entry
            got, want = (
                view.forward(ids, shape, logits=logits, hidden=hidden),
                ref.forward(ids, shape, logits=logits, hidden=hidden),
            )
            view.commit(keep)
            ref.commit(keep)
            if logits == "none":
                assert got.logits is None
            else:
                close(got.logits, want.logits)
            if hidden is False:
                assert got.hidden is None
            else:
                close(got.hidden, want.hidden)
        assert view.length == ref.length
    assert batched.length(0) == 0  # the other slot never moved
    # a one-sequence Step of a long chain runs in chunks through `forward` too
    ids = tokens(107, 20)
    got = batched.forward(Step([seq(0, ids)]), hidden=(0,))
    batched.commit([17])
    alone = NativeRunner(model)
    want = alone.forward(ids, hidden=(0,))
    alone.commit(17)
    close(got.logits, want.logits)
    close(got.hidden, want.hidden)
    assert batched.length(0) == 17 and view.length == ref.length


def test_a_tree_built_on_the_device_scores_and_commits_like_a_host_tree(models):
    model = models["llama"]
    prefixes = [tokens(120, 6), tokens(121, 3)]
    inputs = [tokens(122, 6), tokens(123, 2)]
    host, slots = batched_with(model, prefixes)
    device, _ = batched_with(model, prefixes)
    layout = device_tree(torch.tensor(TREE), len(TREE))
    on_device = SeqInputs(slots[0], inputs[0], layout, Proposal(inputs[0][1:], layout=layout))
    a = host.forward(Step([seq(slots[0], inputs[0], TREE), seq(slots[1], inputs[1])]))
    b = device.forward(Step([on_device, seq(slots[1], inputs[1])]))
    assert torch.equal(a.logits, b.logits)
    with pytest.raises(ValueError, match="not a root path"):
        device.commit([[0, 2, 1], 2])  # a device tree's path must start at the root and descend
    host.commit([[0, 2, 5], 2])
    device.commit([[0, 2, 5], 2])
    follow = Step([seq(slots[0], tokens(124, 2)), seq(slots[1], tokens(125, 1))])
    assert torch.equal(host.forward(follow).logits, device.forward(follow).logits)


def test_loading_and_sharing(checkpoints, models):
    path = checkpoints["qwen3"]
    loaded = BatchedNativeRunner.from_pretrained(path, slots=2, max_cache_len=64)
    native_runner = NativeRunner.from_pretrained(path, max_cache_len=96)
    shared = BatchedNativeRunner.sharing(native_runner, slots=3)
    assert shared.model is native_runner.model and shared.cache.data.data_ptr() != native_runner.cache.data.data_ptr()
    assert (shared.slots, shared.max_length, shared.free, loaded.max_length) == (3, 96, 3, 64)
    assert (loaded.device, loaded.dtype, loaded.args) == (torch.device("cpu"), torch.float32, native_runner.args)
    assert torch.equal(loaded.embed_weight(), shared.embed_weight())
    assert torch.equal(loaded.lm_head_weight(), shared.lm_head_weight())
    ids = tokens(110, 7)
    outs = []
    for runner in (loaded, shared):
        slot = runner.allocate()
        outs.append(runner.forward(Step([seq(slot, ids)])).logits)
        runner.commit([7])
    assert torch.equal(outs[0], outs[1])
    close(outs[0], native_runner.forward(ids).logits)
    with pytest.raises(ParadecError, match=r"runs layers \[0, 2\] only"):
        BatchedNativeRunner.sharing(native_runner.view([0, 2]), slots=2)


def test_clear_errors(models):
    model = models["llama"]
    with pytest.raises(ParadecError, match="slots must be a positive int, got 0"):
        BatchedNativeRunner(model, slots=0)
    runner = BatchedNativeRunner(model, slots=2, max_cache_len=32)
    assert runner.max_length == 32 and runner.slots == 2 and runner.free == 2
    a, b = runner.allocate(), runner.allocate()
    with pytest.raises(ParadecError, match="all 2 cache slots"):
        runner.allocate()
    runner.release(b)
    with pytest.raises(ParadecError, match="release of cache slot 1, which is free"):
        runner.release(b)
    for bad in (2, -1):
        with pytest.raises(ParadecError, match=rf"cache slot {bad} outside \[0, 2\)"):
            runner.release(bad)
    with pytest.raises(ParadecError, match="names cache slot 1, which is free"):
        runner.forward(Step([seq(a, tokens(1, 2)), seq(b, tokens(2, 2))]))
    with pytest.raises(ParadecError, match=r"sequence 0 \(slot 0\) of 0 committed \+ 33 new = 33 tokens exceeds .* 32"):
        runner.forward(Step([seq(a, tokens(3, 33))]))
    with pytest.raises(ParadecError, match=r"layers \[2\]"):
        runner.forward(Step([seq(a, tokens(3, 3))]), hidden=(2,))
    with pytest.raises(ValueError, match="'last'"):
        runner.forward(Step([seq(a, tokens(3, 3))]), logits="last")
    with pytest.raises(RuntimeError, match="without a forward"):
        runner.commit([0])
    b = runner.allocate()
    runner.forward(Step([seq(a, tokens(4, 3)), seq(b, tokens(5, 6), TREE)]))
    with pytest.raises(RuntimeError, match="before commit"):
        runner.forward(Step([seq(a, tokens(6, 1))]))
    with pytest.raises(RuntimeError, match=r"rollback of cache slot 1 while the last forward over slots \[0, 1\]"):
        runner.rollback(b, 0)
    with pytest.raises(ValueError, match="commit got 1 keeps for the 2 sequences"):
        runner.commit([0])
    with pytest.raises(ValueError, match=r"keep \[0, 1, 2\] of sequence 1 \(slot 1\) is not a root path"):
        runner.commit([3, [0, 1, 2]])  # inputs 1 and 2 are siblings
    with pytest.raises(ValueError, match=r"keep 4 of sequence 0 \(slot 0\) outside \[0, 3\]"):
        runner.commit([4, [0]])
    runner.commit([3, [0, 2, 5]])  # failed commits left the forward pending; nothing was applied
    assert (runner.length(a), runner.length(b)) == (3, 3)
    with pytest.raises(ValueError, match=r"rollback of slot 0 to 4 outside its committed length \[0, 3\]"):
        runner.rollback(a, 4)
    runner.release(b)
    with pytest.raises(ParadecError, match="view of cache slot 1, which is free"):
        runner.view(b)
    view = runner.view(a)
    with pytest.raises(ParadecError, match="exceeds the batched native runner's max_length 32"):
        view.forward(tokens(7, 30))
    view.forward(tokens(8, 2))
    view.rollback(1)  # a forward of this slot alone is cancelled by its rollback, as NativeRunner's is
    with pytest.raises(RuntimeError, match="without a forward"):
        view.commit(2)
    assert view.length == 1


def test_the_compiled_ragged_block_traces_whole_and_agrees(models, shapes):
    """On CUDA a compiled model runs each ragged block through `compiled` (torch.compile(dynamic=True,
    fullgraph=True)): its tracing must not break the graph over steps of 1 or 3 sequences, 1 or 4 inputs each, slots
    in order or not, unpadded and bucketed; those are more specialisations than Dynamo's default limit of 8
    graphs, a hard error with fullgraph (as on the H200); and it gives the eager block's outputs (here through
    Dynamo's `eager` backend: the same trace, run as traced; the next tests check the graph AOT autograd makes)."""
    from paradec.runners.native.model import compiled, ragged_block

    if shapes == "static":
        pytest.skip("runs both layouts itself")
    model = models["qwen2"]
    prefixes = [tokens(160 + i, 3 + i) for i in range(4)]

    def run() -> list[torch.Tensor]:
        outs = []
        for static in (False, True):
            runner = BatchedNativeRunner(model, slots=5, static_shapes=static)
            slots = [runner.allocate() for _ in prefixes]
            for slot, prefix in zip(slots, prefixes):
                prefill(runner.view(slot), prefix)
            for b in (1, 3):
                for n in (1, 4):
                    # one sequence's slot order is its slot alone: a second order adds a slot placement, not a layout
                    for order in (slots, slots[::-1][1:] + slots[:1])[: 1 if b == 1 else 2]:
                        step = Step([seq(order[i], tokens(170 + i, n)) for i in range(b)])
                        outs.append(runner.forward(step).logits)
                        runner.commit([0] * b)
        return outs

    expected = run()
    torch._dynamo.reset()
    model._ragged_block = compiled(ragged_block, backend="eager")
    assert torch._dynamo.config.recompile_limit >= 64  # `compiled` raises Dynamo's default of 8
    try:
        got = run()
    finally:
        model._ragged_block = ragged_block
    for g, e in zip(got, expected, strict=True):
        close(g, e)


def test_the_compiled_ragged_block_meets_new_sizes_without_recompiling(models, shapes):
    """Steps whose sizes differ from the first one's (sequences, inputs per sequence, cache slots and columns, the
    step buffers' offsets) reuse its graph. Dynamo's duck sizing would equate sizes that happen to be equal when the
    graph is traced (a buffer's storage offset and a cache dimension, two counts of 3) and guard on it, so a later
    step without the coincidence recompiled: on CUDA an inductor compile of seconds inside a timed pass (what the
    12 s over 18 new buckets of a batch-8 row in bench/results/m12-h200-2026-12-03 look like; not re-measured).
    `compiled` turns duck sizing off; with it on, this test counts 2-3 graphs."""
    from paradec.runners.native.model import compiled, ragged_block

    graphs = []

    def count(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    model = models["qwen2"]
    runner = BatchedNativeRunner(model, slots=6, static_shapes=shapes == "static")
    slots = [runner.allocate() for _ in range(5)]
    for i, slot in enumerate(slots):
        prefill(runner.view(slot), tokens(180 + i, 2 + 3 * i))
    torch._dynamo.reset()
    model._ragged_block = compiled(ragged_block, backend=count)
    try:
        # more than one sequence of more than one input each, slots never 0..B-1 (gathered): one kind of step
        for step_no, (b, n) in enumerate(((3, 3), (2, 5), (4, 2), (5, 3), (2, 7), (3, 4))):
            order = [slots[i] for i in ((4, 2, 0, 3, 1) if step_no % 2 else (1, 3, 0, 4, 2))[:b]]
            runner.forward(Step([seq(order[i], tokens(190 + 7 * step_no + i, n)) for i in range(b)]))
            runner.commit([0] * b)
    finally:
        model._ragged_block = ragged_block
        torch._dynamo.reset()
    assert len(graphs) == 1


def test_the_compiled_ragged_block_writes_the_cache_in_place(models, shapes):
    """The compiled block writes keys/values into the layer's cache tensor itself (an `index_put` whose target is the
    graph's input), never through a view of it: through a permuted view, functionalisation wrote the whole updated
    layer cache back, two copies of every slot's cache per layer and step (19 of 32 ms of a batch-32 step of the
    1.5B on an H200). Checked on the forward graph AOT autograd hands the compiler."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from paradec.runners.native.model import compiled, ragged_block

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model = models["llama"]
    # both layouts: the flat inputs as they are, and padded to static buckets (a scratch slot for the padding)
    runner = BatchedNativeRunner(model, slots=3, static_shapes=shapes == "static")
    slots = [runner.allocate() for _ in range(2)]
    for slot in slots:
        prefill(runner.view(slot), tokens(180 + slot, 4))
    torch._dynamo.reset()
    model._ragged_block = compiled(ragged_block, backend=aot_autograd(fw_compiler=keep))
    try:
        runner.forward(Step([seq(slot, tokens(190 + slot, 2)) for slot in slots]))
        runner.commit([0, 0])
    finally:
        model._ragged_block = ragged_block
        torch._dynamo.reset()
    writes = [n for gm in graphs for n in gm.graph.nodes if "index_put" in str(n.target)]
    assert writes, "the block wrote no keys/values"
    for node in writes:
        target = node.args[0]
        assert target.op == "placeholder", f"the cache is written through {target.target}, a view of it"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bucketed_steps_pad_without_touching_other_slots(models, arch, shapes):
    """Three consecutive slots pad to four sequences (the dummy reads slot 3, another sequence's) and 3 inputs to
    8 (padding writes go to the scratch slot): the rows are each sequence's alone, slot 3 and the free slots keep
    their bits, and a later step over non-consecutive slots (keys/values gathered) agrees too."""
    if shapes != "static":
        pytest.skip("the bucketed path's own test")
    model = models[arch]
    prefixes = [tokens(130 + i, n) for i, n in enumerate((4, 7, 5, 9))]
    runner, slots = batched_with(model, prefixes, slots=6)
    assert runner._static is not None and runner.cache.slots == 7  # six slots and the scratch slot
    before = runner.cache.data[:, :, 3:6].clone()
    inputs = [tokens(140 + b, 1) for b in range(3)]
    out = runner.forward(Step([seq(slots[b], inputs[b]) for b in range(3)]), hidden=True)
    assert torch.equal(runner.cache.data[:, :, 3:6], before)
    for b in range(3):
        alone = native(model, prefixes[b])
        ref = alone.forward(inputs[b], hidden=True)
        close(out.logits[b : b + 1], ref.logits)
        close(out.hidden[b : b + 1], ref.hidden)
    runner.commit([1, 1, 1])
    follow = [tokens(150, 4), tokens(151, 6)]
    step = Step([seq(slots[3], follow[0]), seq(slots[0], follow[1], TREE)])  # slots 3, 0: gathered
    got = runner.forward(step)
    runner.commit([4, [0, 2, 5]])
    close(got.logits[:4], native(model, prefixes[3]).forward(follow[0]).logits)
    close(
        got.logits[4:], native(model, torch.cat([prefixes[0], inputs[0]])).forward(follow[1], build_tree(TREE)).logits
    )
    assert [runner.length(s) for s in slots] == [8, 8, 6, 13]


def test_step_split_gives_each_sequence_its_rows():
    """`Step.split`: sequence b's rows of a forward's output are `rows(b)`'s, the same views, for steps of one and
    of many sequences (an empty proposal, a chain, a tree)."""
    pending = torch.tensor([7])
    proposals = [Proposal.empty("cpu"), Proposal(tokens=torch.tensor([1, 2])), Proposal(torch.tensor([3, 4]), (-1, -1))]
    step = Step([SeqInputs.of(slot, pending, p, "cpu") for slot, p in enumerate(proposals)])
    out = torch.arange(step.size * 2).view(step.size, 2)
    split = step.split(out)
    assert step.sizes == (1, 3, 3) and len(split) == len(step)
    for b, rows in enumerate(split):
        assert torch.equal(rows, out[step.rows(b)]) and rows.data_ptr() == out[step.rows(b)].data_ptr()
    (alone,) = Step.single(pending, proposals[1], "cpu").split(out[:3])
    assert alone is not None and torch.equal(alone, out[:3])


@pytest.mark.parametrize("shapes", ["static"], indirect=True)
def test_flat_bucket_is_a_function_of_the_batch_bucket_and_a_query_bucket(shapes):
    """A speculative batch's total inputs vary every step: the flat padding must not make one graph key per total.
    Every total of a batch bucket maps to one of the few query buckets times the padded sequences, holds the
    inputs, stays under twice the inputs on the bucket's rows, and never passes the largest bucketed step."""
    from paradec.runners.native.graphs import Q_BUCKETS, StaticRagged, batch_bucket, flat_bucket

    limit = StaticRagged.max_inputs
    for sequences in (1, 3, 8, 12, 32, 64):
        padded = batch_bucket(sequences, 256)
        buckets = set()
        for n in range(sequences, min(limit, sequences * 17) + 1):
            nq = flat_bucket(n, padded, limit)
            assert n <= nq <= limit and (nq == limit or nq < 2 * max(n, padded))
            buckets.add(nq)
        assert len(buckets) <= 6 and buckets <= {min(limit, padded * q) for q in Q_BUCKETS}


@pytest.mark.parametrize("shapes", ["static"], indirect=True)
def test_a_graph_bank_captures_a_key_when_it_is_met_again(shapes, monkeypatch):
    """`GraphBank(capture_after=2)`: a key's first use runs the step eagerly, its second captures it, later ones
    replay it; every use that replayed no graph is a miss (the decoder does not time those steps); past max_graphs
    new keys run eagerly. (The capture itself needs CUDA: stood in for by a graph that runs the step.)"""
    from paradec.runners.native.graphs import GraphBank

    class Recorded:
        def __init__(self, step):
            self.step, self.replays = step, 0

        def replay(self):
            self.replays += 1
            self.step()

    monkeypatch.setattr(GraphBank, "_capture", lambda self, step: (step(), Recorded(step))[1])
    bank = GraphBank(torch.device("cpu"), max_graphs=2, capture_after=2)
    runs = []
    for key in ["a", "a", "a", "b", "a", "b", "c", "c", "c"]:
        bank.replay((key,), lambda key=key: runs.append(key))
    assert runs == ["a", "a", "a", "a", "b", "a", "b", "b", "c", "c", "c"]  # a capture: a warm-up run, a replay
    assert set(bank.graphs) == {("a",), ("b",)} and bank.graphs[("a",)].replays == 3  # its capture replays too
    assert bank.misses == 2 + 2 + 3 and bank.uncaptured == 3  # a: eager, capture; b: the same; c: past max_graphs
    once = GraphBank(torch.device("cpu"))  # the default: captured on first use
    once.replay(("x",), lambda: runs.append("x"))
    assert ("x",) in once.graphs and once.misses == 1


class _LayoutCopies(TorchDispatchMode):
    """Counts the copies into the tensors of `storages` (data pointers of their storages)."""

    def __init__(self, storages: set[int]) -> None:
        super().__init__()
        self.storages, self.copies = storages, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default and args[0].untyped_storage().data_ptr() in self.storages:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_chains_copy_no_layout_into_the_bucketed_rows(models, shapes):
    """A chain's row of the static layout buffers already holds the chain layout: a step of chains copies no depth or
    mask into them (two copies per sequence and step were most of a batch-32 step's 67 host copies on the H200);
    a tree's row is loaded, and a chain that later takes that row gets the chain layout back (its rows equal a
    single-sequence runner's)."""
    if shapes != "static":
        pytest.skip("the bucketed path's own test")
    model = models["llama"]
    prefixes = [tokens(160 + i, n) for i, n in enumerate((4, 6, 5))]
    runner, slots = batched_with(model, prefixes)
    static = runner._static
    layout = {static.depth.untyped_storage().data_ptr(), static.masks.untyped_storage().data_ptr()}

    def forward(step: Step):
        with _LayoutCopies(layout) as counted:
            out = runner.forward(step)
        return out, counted.copies

    first = [tokens(170 + b, n) for b, n in enumerate((1, 3, 2))]
    _, copies = forward(Step([seq(slots[b], first[b]) for b in range(3)]))
    assert copies == 0
    runner.commit([1, 3, 2])
    tree_ids, chain_ids = tokens(180, 6), tokens(181, 2)
    _, copies = forward(Step([seq(slots[0], tree_ids, TREE), seq(slots[1], chain_ids)]))
    assert copies == 2  # the tree's depth and mask into row 0
    runner.commit([[0, 1, 3], 2])
    last = tokens(182, 3)
    got, copies = forward(Step([seq(slots[0], last), seq(slots[2], tokens(183, 1))]))
    assert copies == 2  # row 0 back to the chain layout
    committed = torch.cat([prefixes[0], first[0], tree_ids[[0, 1, 3]]])
    close(got.logits[:3], native(model, committed).forward(last).logits)


def test_a_step_says_how_often_its_new_graph_was_asked_for(models, shapes):
    """`new_graph_demand`: the key a step would replay is `StaticRagged.key`'s, the one the forward then uses; until
    the bank holds it, each ask counts (the forward itself does not). Without a bank (no graphs: the CPU default)
    no step meets one."""
    from paradec.runners.native.graphs import GraphBank

    if shapes != "static":
        pytest.skip("the bucketed path's own test")
    model = models["llama"]
    prefixes = [tokens(190 + i, n) for i, n in enumerate((4, 6))]
    runner, slots = batched_with(model, prefixes)
    step = Step([seq(slots[0], tokens(195, 3)), seq(slots[1], tokens(196, 6), TREE)])
    assert runner.new_graph_demand(step) == 0  # no bank
    static = runner._static
    static.bank = GraphBank(torch.device("cpu"), capture_after=10**9)  # eager, the keys it met kept
    assert [runner.new_graph_demand(step), runner.new_graph_demand(step)] == [1, 2]
    runner.forward(step)
    (key,) = static.bank._uses
    assert key == static.key(list(step.slots), list(step.sizes), [4, 6] + [0] * (runner.slots - 2), ())
    runner.cancel()
    assert runner.new_graph_demand(step) == 3
    static.bank.graphs[key] = object()  # as if captured
    assert runner.new_graph_demand(step) == 0
    assert runner.new_graph_demand(Step([seq(slots[0], tokens(197, 9)), seq(slots[1], tokens(198, 1))])) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prefill_of_many_chains_equals_each_prefilled_alone(models, arch, shapes):
    """`prefill` feeds chains of several slots (some with a committed prefix already) in one unbucketed forward and
    commits them: each slot's cache and its next step's logits are those of the chain prefilled alone; the hidden
    states come back per chain; no CUDA graph bucket is met (a prompt chunk would capture one of its own)."""
    model = models[arch]
    prefixes = [tokens(80, 4), tokens(81, 1), tokens(82, 7)]
    chains = [tokens(90, 9), tokens(91, 3), tokens(92, 16)]
    runner, slots = batched_with(model, prefixes)
    before = runner._static.bank.misses if runner._static is not None and runner._static.bank is not None else 0
    hidden = runner.prefill([(slots[b], chains[b].tolist()) for b in (2, 0, 1)], hidden=(1,))
    assert [h.shape[0] for h in hidden] == [16, 9, 3]  # in the order asked
    assert [runner.length(s) for s in slots] == [13, 4, 23]
    assert runner.graph_misses == before and runner.graphs_captured == 0
    follow = [tokens(95 + b, 2) for b in range(3)]
    out = runner.forward(Step([seq(slots[b], follow[b]) for b in range(3)]), hidden=(1,))
    runner.commit([2, 2, 2])
    for b, order in zip(range(3), (1, 2, 0)):
        fresh = native(model, prefixes[b])
        ref = fresh.forward(chains[b], hidden=(1,))
        fresh.commit(len(chains[b]))
        close(hidden[order], ref.hidden)
        n = len(prefixes[b]) + len(chains[b])
        close(runner.cache.data[:, :, slots[b], :, :n], fresh.cache.data[..., :n, :])
        ref = fresh.forward(follow[b], hidden=(1,))
        close(out.logits[2 * b : 2 * b + 2], ref.logits)
        close(out.hidden[2 * b : 2 * b + 2], ref.hidden)
    assert runner.prefill([(slots[0], [5, 6])]) is None  # no hidden states asked for
    assert runner.length(slots[0]) == 17


def test_prefill_errors(models):
    runner = BatchedNativeRunner(models["llama"], slots=3, max_cache_len=32)
    a, b = runner.allocate(), runner.allocate()
    with pytest.raises(ValueError, match="at least one"):
        runner.prefill([])
    with pytest.raises(ValueError, match=r"chain 1 \(slot 1\) of the prefill has no tokens"):
        runner.prefill([(a, [1, 2]), (b, [])])
    with pytest.raises(ValueError, match=r"feeds each cache slot once, got slots \[0, 0\]"):
        runner.prefill([(a, [1, 2]), (a, [3])])
    with pytest.raises(ParadecError, match="names cache slot 2, which is free"):
        runner.prefill([(a, [1, 2]), (2, [3])])
    with pytest.raises(ParadecError, match=r"sequence 1 \(slot 1\) of 0 committed \+ 33 new = 33 tokens exceeds"):
        runner.prefill([(a, [1, 2]), (b, [3] * 33)])
    assert (runner.length(a), runner.length(b)) == (0, 0)  # a refused prefill feeds nothing
    runner.forward(Step([seq(a, tokens(4, 3))]))
    with pytest.raises(RuntimeError, match="before commit"):
        runner.prefill([(b, [1, 2])])
