"""Trained heads: Medusa tree construction and buffers, the on-disk format, and the EAGLE head's attention patterns
(cached decoding and unrolled training) against a brute-force chain that recomputes everything from scratch."""

from __future__ import annotations

import json

import pytest
import torch

from paradec.errors import ParadecError
from paradec.heads import (
    EagleConfig,
    EagleHead,
    MedusaConfig,
    MedusaHeads,
    heads_path,
    load_heads,
    save_heads,
)
from paradec.heads.medusa import best_tree, tree_layout
from paradec.train.eagle import unroll_mask, unrolled
from paradec.tree import build_tree

H, V = 32, 50


def random_eagle(seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig(hidden_size=H, vocab_size=V, num_heads=2, head_dim=16, intermediate_size=48))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


def test_best_tree_takes_the_most_likely_paths_parents_first():
    accuracy = [[0.5, 0.3], [0.4, 0.1]]
    # path probabilities: (0,) .5  (1,) .3  (0,0) .2  (1,0) .12  (0,1) .05  (1,1) .03
    tree, expected = best_tree(accuracy, 4)
    assert tree == ((0,), (1,), (0, 0), (1, 0))
    assert expected == pytest.approx(0.5 + 0.3 + 0.2 + 0.12)
    assert best_tree(accuracy, 100)[0] == ((0,), (1,), (0, 0), (1, 0), (0, 1), (1, 1))
    with pytest.raises(ParadecError, match="at least 1 node"):
        best_tree(accuracy, 0)


def test_tree_layout_and_buffers_hand_worked():
    paths = ((0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0))
    layout = tree_layout(paths, max_depth=2, max_nodes=5)
    assert layout.parents == (-1, -1, 0, 1, 0)
    assert layout.ranks == 2
    assert layout.flat_index == (0, 1, 2, 2, 3)  # head * ranks + rank
    top = torch.tensor([[10, 11], [20, 21]])  # [heads, ranks] candidate tokens
    assert top.view(-1)[list(layout.flat_index)].tolist() == [10, 11, 20, 20, 21]
    tree = build_tree(layout.parents)
    # inputs: 0 = pending, 1..5 = nodes (0,) (1,) (0,0) (1,0) (0,1)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2]
    expected_mask = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1, 0],
            [1, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.mask, expected_mask)
    assert set(tree.paths) == {(0, 1, 3), (0, 1, 5), (0, 2, 4)}  # retrieve indices of each root-to-leaf path
    assert tree_layout(paths, max_depth=1, max_nodes=64).parents == (-1, -1)


def test_medusa_config_rejects_bad_trees():
    with pytest.raises(ParadecError, match="bad Medusa tree path"):
        MedusaConfig(H, V, num_heads=2, tree=((0,), (1, 0)))  # parent (1,) missing
    with pytest.raises(ParadecError, match="bad Medusa tree path"):
        MedusaConfig(H, V, num_heads=1, tree=((0,), (0, 0)))  # deeper than the heads
    with pytest.raises(ParadecError, match="num_heads"):
        MedusaConfig(H, V, num_heads=0)
    assert len(MedusaConfig(H, V, num_heads=3).tree) == 64  # the default tree from the accuracy prior


def test_medusa_heads_start_as_the_lm_head():
    heads = MedusaHeads(MedusaConfig(H, V, num_heads=3))
    hidden, lm_head = torch.randn(5, H), torch.randn(V, H)
    logits = heads.logits(hidden, lm_head)  # [K, 5, V]
    assert logits.shape == (3, 5, V)
    torch.testing.assert_close(logits[2], hidden @ lm_head.t())


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_save_load_round_trip_and_errors(tmp_path, kind):
    module = random_eagle() if kind == "eagle" else MedusaHeads(MedusaConfig(H, V, num_heads=2, tree=((0,), (0, 1))))
    save_heads(module, tmp_path / "heads" / kind, dtype=torch.float32)
    config = json.loads((tmp_path / "heads" / kind / "config.json").read_text())
    assert config["kind"] == kind
    for where in (tmp_path / "heads", tmp_path / "heads" / kind):  # the heads root or the kind's own directory
        loaded = load_heads(kind, where, hidden_size=H, vocab_size=V, device=torch.device("cpu"), dtype=torch.float32)
        assert loaded.config == module.config
        for a, b in zip(module.state_dict().values(), loaded.state_dict().values()):
            torch.testing.assert_close(a, b)
        assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ParadecError, match="hidden size 32 and vocabulary 50, but the target has 64 and 50"):
        load_heads(
            kind, tmp_path / "heads", hidden_size=64, vocab_size=V, device=torch.device("cpu"), dtype=torch.float32
        )
    other = "eagle" if kind == "medusa" else "medusa"
    with pytest.raises(ParadecError, match=f"has no {other} heads"):
        heads_path(other, tmp_path / "heads")
    with pytest.raises(ParadecError, match="unknown head kind 'hydra'"):
        heads_path("hydra", tmp_path / "heads")


def chain_outputs(head: EagleHead, embed, tokens: list[int], features: torch.Tensor, committed: int, levels: int):
    """Brute force: entries 0..committed-1 read (x_{t+1}, f_t); draft level l reads (x_{committed+l}, the previous
    entry's output). Every entry's output is recomputed by a full causal pass over all entries so far."""
    inputs = [head.inputs(embed[tokens[t + 1]], features[t]) for t in range(committed)]
    outs = []
    for level in range(levels + 1):
        x = torch.stack(inputs)[None]
        n = x.shape[1]
        out, _, _ = head(x, torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril())
        outs.append(out[0, -1])
        if level < levels:
            inputs.append(head.inputs(embed[tokens[committed + level + 1]], out[0, -1]))
    return outs  # outs[l]: output of the last entry after l draft levels


@torch.no_grad()
def test_project_attend_in_chunks_equals_full_causal_pass():
    """Decoding adds entries a few at a time to a preallocated cache; the outputs equal one causal pass."""
    head, embed = random_eagle(), torch.randn(V, H)
    tokens = torch.randint(V, (13,))
    features = torch.randn(12, H)
    x = head.inputs(embed[tokens[1:]], features)[None]  # (1, 12, H)
    full, _, _ = head(x, torch.arange(12), torch.ones(12, 12, dtype=torch.bool).tril())
    keys = torch.zeros(1, 2, 16, 16)
    values = torch.zeros_like(keys)
    outs = []
    for start, end in ((0, 5), (5, 6), (6, 12)):
        q, keys[:, :, start:end], values[:, :, start:end] = head.project(x[:, start:end], torch.arange(start, end))
        mask = torch.arange(16)[None, :] <= torch.arange(start, end)[:, None]  # attends over the whole buffer
        outs.append(head.attend(x[:, start:end], q, keys, values, mask))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unrolled_training_passes_equal_the_decode_time_chain():
    """Pass s at entry j must compute exactly what draft level s computes when the committed prefix ends at entry
    j - s: the mask of `unroll_mask` reproduces decode-time attention."""
    head, embed = random_eagle(1), torch.randn(V, H)
    tokens = torch.randint(V, (11,)).tolist()
    features = torch.randn(10, H)
    passes = 3
    outs = unrolled(head, embed[tokens[1:]][None], features[None], passes)  # each (1, 10, H)
    for step in range(passes):
        for j in range(step, 10):
            chain = chain_outputs(head, embed, tokens, features, committed=j - step + 1, levels=step)
            torch.testing.assert_close(outs[step][0, j], chain[step], rtol=1e-4, atol=1e-4)


def test_unroll_mask_hand_worked():
    # pass 1 over 3 entries: query j sees pass-0 keys i <= j - 1 and pass-1 key j
    expected = torch.tensor([[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(unroll_mask(3, 1), expected)
    assert torch.equal(unroll_mask(3, 0), torch.ones(3, 3, dtype=torch.bool).tril())


def test_eagle_config_for_target_and_validation():
    config = EagleConfig.for_target(256, 8192)
    assert (config.num_heads, config.head_dim, config.intermediate_size) == (4, 64, 704)
    assert EagleConfig.for_target(48, 100).num_heads == 1
    with pytest.raises(ParadecError, match="head_dim must be even"):
        EagleConfig(hidden_size=8, vocab_size=10, num_heads=1, head_dim=7, intermediate_size=8)
    with pytest.raises(ParadecError, match="num_heads must be an integer >= 1, got 0"):
        EagleConfig(hidden_size=8, vocab_size=10, num_heads=0, head_dim=8, intermediate_size=8)


def test_eagle_rope_angles_stay_float32_in_half_precision():
    head = random_eagle().to(torch.bfloat16)
    cos, _ = head.rope(torch.tensor([3000]), torch.float32)
    frequency = 10000.0 ** (-2 / 16)  # the second rotary frequency, not exact in bfloat16 (error ~0.6 rad at 3000)
    assert abs(float(cos[0, 1]) - torch.cos(torch.tensor(3000 * frequency, dtype=torch.float64)).item()) < 1e-3
