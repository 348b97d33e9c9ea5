"""The runner contract (`paradec.runners.base`, `paradec.runners.ledger`), one suite over every backend.

Backends, fp32 on the CPU, over conftest's tiny llama (2 layers, context 256):
- `hf`: `HFRunner` (transformers, DynamicCache);
- `native`: `NativeRunner` with exact shapes (eager);
- `native-static`: `NativeRunner` on its padded static buckets (what CUDA graphs replay on a GPU; no capture here);
- `batched-view`: slot 1 of a 3-slot `BatchedNativeRunner`, its neighbours (slots 0 and 2) holding other sequences,
  which every test checks, at teardown, still score as before: nothing a view does reaches another slot.

Each backend is compared with a fresh instance of itself (they differ from each other in op order), except in
`test_backends_agree_on_a_prefill`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from paradec.errors import ParadecError
from paradec.runners import HFRunner, load_hf_model
from paradec.runners.base import Runner, prefill
from paradec.runners.ledger import DEVICE_TREE, Commit, Ledger, Pending, input_parents
from paradec.runners.native import BatchedNativeRunner, NativeRunner
from paradec.tree import TreeBuffers, build_tree, device_tree

BACKENDS = ("hf", "native", "native-static", "batched-view")
TREE = (-1, -1, 0, 0, 1, 2, 2, 4, 5)  # 9 nodes, 10 inputs; input parents (-1, 0, 0, 1, 1, 2, 3, 3, 5, 6)
PATH = [0, 2, 5, 8]  # root -> node 1 -> node 4 -> node 7: inputs 2, 5, 8 move onto 1, 2, 3
NEIGHBOURS = {0: 7, 2: 19}  # the batched view's neighbour slots and their prefix lengths
ATOL = RTOL = 1e-5
LABEL = r"(?: of sequence 0 \(slot 1\))?"  # the batched view's keep errors name its sequence and slot
ULPS = 2e-6


def tokens(seed: int, n: int, vocab: int = 300) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32-tight: 1e-5, or a few ulps of the largest entry."""
    torch.testing.assert_close(got, ref, atol=max(ATOL, ULPS * float(ref.abs().max())), rtol=RTOL)


def make_tree(kind: str) -> TreeBuffers:
    return build_tree(TREE) if kind == "host" else device_tree(torch.tensor(TREE), len(TREE))


@dataclass
class Backend:
    """Makes fresh runners of one backend; at teardown checks that no batched view disturbed its neighbours."""

    name: str
    make_runner: Callable[[], Runner]
    probes: list[tuple[Runner, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (view, ids, logits)
    lengths: list[tuple[BatchedNativeRunner, dict[int, int]]] = field(default_factory=list)

    def make(self) -> Runner:
        runner = self.make_runner()
        if self.name == "batched-view":
            batched = runner.batched
            for slot, n in NEIGHBOURS.items():
                view = batched.view(slot)
                prefill(view, tokens(1000 + slot, n))
                probe = tokens(2000 + slot, 3)
                self.probes.append((view, probe, view.forward(probe).logits))
                view.commit(0)
            self.lengths.append((batched, dict(NEIGHBOURS)))
        assert_idle(runner)
        return runner

    def check_neighbours(self) -> None:
        for batched, lengths in self.lengths:
            batched.cancel()  # a test may end with the view's forward pending
            assert {slot: batched.length(slot) for slot in lengths} == lengths
        for view, probe, logits in self.probes:
            out = view.forward(probe)
            view.commit(0)
            assert torch.equal(out.logits, logits), f"slot {view.slot} changed"


def cache_length(runner: Runner) -> int:
    """The length the backend's cache itself holds (its ledger's length, unless something disagrees)."""
    if isinstance(runner, HFRunner):
        layers = [layer for layer in runner._cache.layers if getattr(layer, "keys", None) is not None]
        sizes = {int(layer.keys.shape[-2]) for layer in layers if layer.keys.numel()} or {0}
        assert len(sizes) == 1, sizes
        return sizes.pop()
    if isinstance(runner, NativeRunner):
        return runner.cache.length
    return runner.batched.cache.lengths[runner.slot]


def assert_idle(runner: Runner, length: int | None = None) -> None:
    """No forward pending (a commit now is refused) and the cache agrees with the runner's length."""
    if length is not None:
        assert runner.length == length
    assert cache_length(runner) == runner.length
    with pytest.raises(RuntimeError, match="without a forward"):
        runner.commit(0)


@pytest.fixture(scope="module")
def llama(model_dirs):
    """(transformers model, native Transformer) of the tiny llama, shared by every runner of the module."""
    path = model_dirs["llama"]
    return load_hf_model(path, torch.device("cpu"), torch.float32), NativeRunner.from_pretrained(path).model


def maker(name: str, llama) -> Callable[[], Runner]:
    hf_model, native_model = llama
    if name == "hf":
        return lambda: HFRunner(hf_model)
    if name in ("native", "native-static"):
        return lambda: NativeRunner(native_model, static_shapes=name == "native-static")

    def view() -> Runner:
        batched = BatchedNativeRunner(native_model, slots=3)
        slots = [batched.allocate() for _ in range(3)]
        assert slots == [0, 1, 2]
        return batched.view(1)

    return view


@pytest.fixture(params=BACKENDS)
def backend(request, llama):
    made = Backend(request.param, maker(request.param, llama))
    yield made
    made.check_neighbours()


def next_logits(runner: Runner, follow: torch.Tensor) -> torch.Tensor:
    """The logits of `follow` after the runner's committed sequence (committed too)."""
    out = runner.forward(follow)
    runner.commit(len(follow))
    return out.logits


def fresh_logits(backend: Backend, sequence: torch.Tensor, follow: torch.Tensor) -> torch.Tensor:
    """What a fresh runner of the backend, prefilled with `sequence`, scores for `follow`."""
    runner = backend.make()
    prefill(runner, sequence)
    return next_logits(runner, follow)


# --- all backends together --------------------------------------------------------------------------------------


def test_backends_agree_on_a_prefill(llama):
    ids = tokens(1, 17)
    outs = {}
    for name in BACKENDS:
        made = Backend(name, maker(name, llama))
        runner = made.make()
        assert isinstance(runner, Runner)
        outs[name] = prefill(runner, ids, logits="all").logits
        assert outs[name].shape == (17, runner.vocab_size) and outs[name].dtype == torch.float32
        made.check_neighbours()
    for name in BACKENDS[1:]:
        torch.testing.assert_close(outs[name], outs["hf"], atol=1e-4, rtol=0, msg=name)


# --- commits ----------------------------------------------------------------------------------------------------


def test_chain_commit_then_continue_equals_a_fresh_prefill(backend):
    runner = backend.make()
    prompt, chain, follow = tokens(10, 10), tokens(11, 5), tokens(12, 3)
    prefill(runner, prompt)
    assert_idle(runner, 10)
    out = runner.forward(chain)
    assert runner.length == 10  # provisional until the commit
    runner.commit(3)
    assert_idle(runner, 13)
    kept = torch.cat([prompt, chain[:3]])
    reference = backend.make()
    prefill(reference, prompt)
    ref_chain = reference.forward(chain)
    reference.commit(0)
    close(out.logits, ref_chain.logits)
    close(next_logits(runner, follow), fresh_logits(backend, kept, follow))
    assert_idle(runner, 16)


@pytest.mark.parametrize("kind", ["host", "device"])
def test_tree_commit_with_compaction_equals_a_fresh_prefill(backend, kind):
    runner = backend.make()
    prompt, nodes, follow = tokens(20, 12), tokens(21, len(TREE) + 1), tokens(22, 3)
    prefill(runner, prompt)
    out = runner.forward(nodes, make_tree(kind), hidden=True)
    assert out.logits.shape == (10, runner.vocab_size) and out.hidden.shape == (10, runner.hidden_size)
    runner.commit(PATH)
    assert_idle(runner, 16)
    # the tree scored the path as a chain would ...
    chain = backend.make()
    prefill(chain, prompt)
    ref = chain.forward(nodes[PATH], hidden=True)
    chain.commit(0)
    close(out.logits[PATH], ref.logits)
    close(out.hidden[PATH], ref.hidden)
    # ... and decoding goes on from the compacted cache as from the accepted sequence itself
    close(next_logits(runner, follow), fresh_logits(backend, torch.cat([prompt, nodes[PATH]]), follow))


@pytest.mark.parametrize("kind", ["host", "device"])
def test_commit_of_the_root_only(backend, kind):
    runner = backend.make()
    prompt, nodes, follow = tokens(30, 8), tokens(31, len(TREE) + 1), tokens(32, 2)
    prefill(runner, prompt)
    runner.forward(nodes, make_tree(kind))
    runner.commit([0])
    assert_idle(runner, 9)
    close(next_logits(runner, follow), fresh_logits(backend, torch.cat([prompt, nodes[:1]]), follow))


def test_an_int_keep_of_a_tree_is_the_prefix_path(backend):
    """An int keep of a host tree keeps inputs 0..k-1 when they are a root path (inputs 0, 1 here)."""
    runner = backend.make()
    prompt, nodes, follow = tokens(33, 6), tokens(34, len(TREE) + 1), tokens(35, 2)
    prefill(runner, prompt)
    runner.forward(nodes, build_tree(TREE))
    with pytest.raises(ValueError, match=rf"keep 3{LABEL} is not a root path of the last forward's 10 inputs"):
        runner.commit(3)  # inputs 1 and 2 are siblings
    runner.commit(2)
    assert_idle(runner, 8)
    close(next_logits(runner, follow), fresh_logits(backend, torch.cat([prompt, nodes[:2]]), follow))


def test_a_scored_forward_with_nothing_kept(backend):
    runner = backend.make()
    prompt, junk, follow = tokens(36, 9), tokens(37, 4), tokens(38, 2)
    prefill(runner, prompt)
    runner.forward(junk)
    runner.commit(0)
    assert_idle(runner, 9)
    runner.forward(junk, build_tree((-1, 0, 0)))
    runner.commit([])
    assert_idle(runner, 9)
    close(next_logits(runner, follow), fresh_logits(backend, prompt, follow))


# --- rollback and reset -----------------------------------------------------------------------------------------


def test_rollback_then_continue_equals_a_fresh_prefill(backend):
    runner = backend.make()
    prompt, chain, follow = tokens(40, 12), tokens(41, 4), tokens(42, 3)
    prefill(runner, prompt)
    runner.forward(chain)
    runner.commit(4)
    runner.rollback(16)  # to the current length: nothing changes
    assert_idle(runner, 16)
    runner.rollback(7)
    assert_idle(runner, 7)
    close(next_logits(runner, follow), fresh_logits(backend, prompt[:7], follow))
    runner.rollback(0)
    assert_idle(runner, 0)
    close(next_logits(runner, follow), next_logits(backend.make(), follow))  # as a fresh runner's first forward


def test_reset_equals_a_fresh_runner(backend):
    runner = backend.make()
    prefill(runner, tokens(50, 20))
    runner.reset()
    assert_idle(runner, 0)
    prompt, follow = tokens(51, 6), tokens(52, 3)
    prefill(runner, prompt)
    close(next_logits(runner, follow), fresh_logits(backend, prompt, follow))


def test_rollback_during_a_pending_forward_cancels_it(backend):
    runner = backend.make()
    prompt, nodes, follow = tokens(60, 11), tokens(61, len(TREE) + 1), tokens(62, 3)
    prefill(runner, prompt)
    runner.forward(nodes, build_tree(TREE))
    runner.rollback(5)  # cancels the forward: its provisional entries are dropped
    assert_idle(runner, 5)
    close(next_logits(runner, follow), fresh_logits(backend, prompt[:5], follow))
    runner.forward(nodes[:4])
    runner.rollback(runner.length)  # even a rollback that shortens nothing cancels it
    assert_idle(runner, 8)
    runner.forward(nodes)
    runner.reset()  # and so does a reset
    assert_idle(runner, 0)
    prefill(runner, prompt)
    close(next_logits(runner, follow), fresh_logits(backend, prompt, follow))


@pytest.mark.parametrize("length", [12, -1, True, 2.0, "3", None])
def test_rollback_out_of_range(backend, length):
    runner = backend.make()
    prompt, follow = tokens(70, 11), tokens(71, 2)
    prefill(runner, prompt)
    runner.forward(follow)
    with pytest.raises(ValueError, match=rf"rollback.* to {length!r} outside its committed length \[0, 11\]"):
        runner.rollback(length)
    runner.commit(2)  # a failed rollback cancels nothing
    assert_idle(runner, 13)


# --- errors -----------------------------------------------------------------------------------------------------


def test_forward_twice_raises(backend):
    runner = backend.make()
    prompt, chain, follow = tokens(80, 6), tokens(81, 4), tokens(82, 2)
    prefill(runner, prompt)
    runner.forward(chain)
    for tree in (None, build_tree((-1, 0))):
        with pytest.raises(RuntimeError, match=r"forward\(\) called again before commit\(\)"):
            runner.forward(tokens(83, 3), tree)
    runner.commit(4)  # the refused forward left the first one pending, untouched
    assert_idle(runner, 10)
    close(next_logits(runner, follow), fresh_logits(backend, torch.cat([prompt, chain]), follow))


def test_commit_without_a_forward_raises(backend):
    runner = backend.make()
    with pytest.raises(RuntimeError, match=r"commit\(\).* without a forward\(\)"):
        runner.commit(0)
    prefill(runner, tokens(90, 5))
    with pytest.raises(RuntimeError, match=r"commit\(\).* without a forward\(\)"):
        runner.commit(5)  # the forward was committed already
    with pytest.raises(RuntimeError, match=r"commit\(\).* without a forward\(\)"):
        runner.commit([0])
    assert_idle(runner, 5)


BAD_KEEPS = [  # (layout, keep, the keep as the message shows it, the rest of the message)
    ("host", [0, 1, 2], r"\[0, 1, 2\]", "is not a root path of the last forward's 10 inputs"),  # 1, 2: siblings
    ("host", [1], r"\[1\]", "is not a root path"),  # not from the root
    ("host", [0, 3], r"\[0, 3\]", "is not a root path"),  # input 3 hangs below input 1
    ("host", [0, 10], r"\[0, 10\]", "is not a root path of the last forward's 10 inputs"),
    ("host", [0, 2, 2], r"\[0, 2, 2\]", "is not a root path"),
    ("host", 11, "11", r"outside \[0, 10\] of the last forward's 10 inputs"),
    ("host", -1, "-1", r"outside \[0, 10\]"),
    ("host", "2", "'2'", r"must be an int \(a prefix of the last forward's 10 inputs\) or a list"),
    ("host", 2.0, r"2\.0", "must be an int"),
    ("host", True, "True", "must be an int"),
    ("host", None, "None", "must be an int"),
    ("host", [0, 1.0], r"\[0, 1\.0\]", "must be an int"),
    ("host", [0, False], r"\[0, False\]", "must be an int"),
    ("chain", [0, 2], r"\[0, 2\]", "is not a root path of the last forward's 10 inputs"),  # a chain keeps a prefix
    ("chain", [1, 2], r"\[1, 2\]", "is not a root path"),
    ("chain", 11, "11", r"outside \[0, 10\]"),
    ("device", [1], r"\[1\]", "is not a root path"),  # a device tree's path starts at the root ...
    ("device", [0, 2, 1], r"\[0, 2, 1\]", "is not a root path"),  # ... and ascends
    ("device", [0, 0], r"\[0, 0\]", "is not a root path"),
    ("device", [0, 10], r"\[0, 10\]", "is not a root path of the last forward's 10 inputs"),
    ("device", 11, "11", r"outside \[0, 10\]"),
]


@pytest.mark.parametrize(("layout", "keep", "shown", "message"), BAD_KEEPS, ids=[f"{b[0]}-{b[1]!r}" for b in BAD_KEEPS])
def test_bad_keeps_name_the_keep_and_leave_the_forward_pending(backend, layout, keep, shown, message):
    runner = backend.make()
    prompt, nodes, follow = tokens(100, 7), tokens(101, len(TREE) + 1), tokens(102, 2)
    prefill(runner, prompt)
    runner.forward(nodes, None if layout == "chain" else make_tree(layout))
    with pytest.raises(ValueError, match=rf"keep {shown}{LABEL} {message}"):
        runner.commit(keep)
    good = 3 if layout == "chain" else PATH
    runner.commit(good)  # the failed commit changed nothing
    kept = nodes[:3] if layout == "chain" else nodes[PATH]
    assert_idle(runner, 7 + len(kept))
    close(next_logits(runner, follow), fresh_logits(backend, torch.cat([prompt, kept]), follow))


def test_exceeding_max_length_raises(backend):
    runner = backend.make()
    limit = runner.max_length
    assert limit == 256
    prefill(runner, tokens(110, limit - 2))
    for tree in (None, build_tree((-1, 0))):
        with pytest.raises(
            ParadecError,
            match=rf"of {limit - 2} committed \+ 3 new = {limit + 1} tokens exceeds .*"
            rf"max_length {limit}",
        ):
            runner.forward(tokens(111, 3), tree)
    assert_idle(runner, limit - 2)  # nothing pending
    out = runner.forward(tokens(112, 2))  # up to the limit exactly
    runner.commit(2)
    assert out.logits.shape == (2, runner.vocab_size)
    assert_idle(runner, limit)
    with pytest.raises(ParadecError, match=rf"max_length {limit}"):
        runner.forward(tokens(113, 1))


# --- outputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chain", "host", "device"])
def test_logits_and_hidden_shapes(backend, kind):
    runner = backend.make()
    prefill(runner, tokens(120, 5))
    ids = tokens(121, len(TREE) + 1)
    n, vocab, width = len(ids), runner.vocab_size, runner.hidden_size
    tree = None if kind == "chain" else make_tree(kind)
    full = runner.forward(ids, tree, logits="all")
    runner.commit(0)
    assert full.logits.shape == (n, vocab) and full.logits.dtype == torch.float32 and full.hidden is None
    last = runner.forward(ids, tree, logits="last", hidden=True)
    runner.commit(0)
    assert last.logits.shape == (1, vocab)
    close(last.logits, full.logits[-1:])
    assert last.hidden.shape == (n, width)
    none = runner.forward(ids, tree, logits="none", hidden=(0,))
    runner.commit(0)
    assert none.logits is None and none.hidden.shape == (n, width)  # layer 0's output
    assert_idle(runner, 5)
    with pytest.raises(ValueError, match="logits must be 'all', 'last' or 'none', got 'first'"):
        runner.forward(ids, tree, logits="first")
    assert_idle(runner, 5)


# --- the ledger itself, and a batched forward over several slots ------------------------------------------------


def test_ledger_state_machine():
    ledger = Ledger(16, name="Toy", what="the toy runner", hint=" (a hint)")
    assert (ledger.length, ledger.pending) == (0, None)
    ledger.begin(5)
    assert ledger.pending == Pending(5, None)
    assert ledger.commit(5) == Commit(0, 5) and ledger.length == 5
    ledger.begin(10, input_parents(TREE))
    plan = ledger.check(PATH)  # checking changes nothing
    assert plan == Commit(5, 4, ((7, 6), (10, 7), (13, 8))) and plan.length == 9 and ledger.pending is not None
    ledger.settle(plan)
    assert (ledger.length, ledger.pending) == (9, None)
    with pytest.raises(RuntimeError, match="does not belong to the pending forward"):
        ledger.settle(plan)
    ledger.begin(3, DEVICE_TREE)
    assert ledger.commit([0, 2]) == Commit(9, 2, ((11, 10),))
    ledger.advance(4)  # a forward-and-commit of the runner's own (draft_chain)
    assert ledger.length == 15
    with pytest.raises(ParadecError, match=r"^sequence of 15 committed \+ 2 new = 17 tokens exceeds the toy runner's "):
        ledger.begin(2)
    with pytest.raises(ParadecError, match=r"max_length 16 \(a hint\)$"):
        ledger.advance(2)
    with pytest.raises(ValueError, match="at least one input, got 0"):
        ledger.begin(0)
    ledger.begin(1)
    with pytest.raises(RuntimeError, match=r"^Toy\.forward\(\) called again before commit\(\)"):
        ledger.begin(1)
    with pytest.raises(RuntimeError, match=r"^Toy\.draft_chain\(\) called before commit\(\)"):
        ledger.check_idle("draft_chain")
    assert ledger.rollback(3) == Pending(1, None)  # the cancelled forward
    assert (ledger.length, ledger.pending) == (3, None)
    ledger.begin(2)
    assert ledger.reset() == Pending(2, None) and ledger.length == 0
    assert ledger.cancel() is None
    ledger.begin(4, (-1, 0, 1))  # a host tree of 3 inputs and an auxiliary input after it (no parent)
    with pytest.raises(ValueError, match=r"keep \[0, 1, 2, 3\] is not a root path of the last forward's 4 inputs"):
        ledger.commit([0, 1, 2, 3])
    assert ledger.commit([0, 1, 2]) == Commit(0, 3)
    ledger.begin(2)
    assert ledger.commit(torch.tensor(2)).count == 2  # int-likes (numpy, 0-dim tensors) are ints; bools are not


def test_a_batched_forward_over_several_slots_is_one_unit(llama):
    """Rolling back or releasing one slot of a forward over several is refused (the commit settles them all, or
    `cancel()` drops them all); a forward of one slot alone is cancelled by its rollback or release, as a
    single-sequence runner's is; a view commits its own slot's forward only."""
    from paradec.step import SeqInputs, Step
    from paradec.types import Proposal

    def seq(slot: int, ids: torch.Tensor, tree: TreeBuffers | None = None) -> SeqInputs:
        return SeqInputs(slot, ids, tree or build_tree(tuple(range(-1, len(ids) - 2))), Proposal.empty("cpu"))

    _, model = llama
    runner = BatchedNativeRunner(model, slots=3)
    a, b, c = (runner.allocate() for _ in range(3))
    for slot, n in ((a, 5), (b, 8), (c, 3)):
        prefill(runner.view(slot), tokens(300 + slot, n))
    step = Step([seq(b, tokens(310, 10), build_tree(TREE)), seq(a, tokens(311, 3))])
    first = runner.forward(step)
    for call in (lambda: runner.rollback(a, 2), lambda: runner.release(b)):
        with pytest.raises(RuntimeError, match=r"of cache slot \d while the last forward over slots \[1, 0\]"):
            call()
    with pytest.raises(RuntimeError, match="commit\\(\\) of slot 2 without a forward\\(\\) of it to commit"):
        runner.view(c).commit(0)  # never another slot's forward
    runner.rollback(c, 1)  # a slot outside the forward is free to move
    runner.cancel()
    assert [runner.length(s) for s in (a, b, c)] == [5, 8, 1]
    with pytest.raises(RuntimeError, match="without a forward"):
        runner.commit([PATH, 3])
    again = runner.forward(step)  # the cancelled forward left nothing behind
    torch.testing.assert_close(again.logits, first.logits, atol=0, rtol=0)
    runner.commit([PATH, 3])
    assert [runner.length(s) for s in (a, b, c)] == [8, 12, 1]
    runner.forward(Step([seq(a, tokens(312, 4))]))
    runner.release(a)  # a forward of this slot alone: cancelled
    with pytest.raises(RuntimeError, match="without a forward"):
        runner.commit([4])
    assert runner.allocate() == a and runner.length(a) == 0
    assert [runner.cache.lengths[s] for s in (a, b, c)] == [0, 12, 1]
