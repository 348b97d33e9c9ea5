"""What suffix's tries cost on the host, and that they draft what the plain tries drafted (not a test): over the
greedy outputs a bench run recorded (vanilla's `token_ids` in each `results.json` given), the request's trie
(`SuffixTrie`) fed one token at a time and the engine's (`GlobalSuffixTrie`) fed one output at a time, against the
plain tries paradec used until 2026-12-04 (every substring a node, below), which are kept here for that purpose.
Checks that every match and every best-first draft tree is the same, then prints the time per token and per
output, and the nodes each holds.

    PYTHONPATH=src python3 scripts/bench_suffix_tries.py bench/results/suffix-h200-2026-12-02/q15-agentic \
        bench/results/m15-h200-2026-12-04/q15-batch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from paradec.drafters.suffix import GlobalSuffixTrie, Nodes, SuffixTrie, best_tree

DEPTH, MATCH, NODES, SCORE = 32, 12, 32, 0.05  # suffix's defaults (max_depth, max_match, max_nodes, min_score)


class PlainRequestTrie:
    """Every substring of up to `depth` tokens a node; each token moves every suffix ending at it one level down."""

    def __init__(self, depth: int) -> None:
        self.depth, self.nodes, self.active = depth, Nodes(), []

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            moved = []
            for node in [0, *self.active][: self.depth]:
                child = self.nodes.child(node, token)
                self.nodes.counts[child] += 1
                moved.append(child)
            self.active = moved

    def match(self, longest: int) -> tuple[int | None, int]:
        for length in range(min(len(self.active), longest), 0, -1):
            if self.nodes.children[self.active[length - 1]]:
                return self.active[length - 1], length
        return None, 0


class PlainEngineTrie:
    """Every substring of up to `depth` tokens of every output added a node (no bounds: nothing taken out)."""

    def __init__(self, depth: int) -> None:
        self.depth, self.nodes = depth, Nodes()

    def add(self, tokens: list[int]) -> None:
        for start in range(len(tokens)):
            node = 0
            for token in tokens[start : start + self.depth]:
                node = self.nodes.child(node, token)
                self.nodes.counts[node] += 1

    def match(self, tokens: list[int], longest: int) -> tuple[int | None, int]:
        for length in range(min(longest, len(tokens), self.depth - 1), 0, -1):
            node: int | None = 0
            for token in tokens[len(tokens) - length :]:
                node = self.nodes.children[node].get(token)
                if node is None:
                    break
            if node is not None and self.nodes.children[node]:
                return node, length
        return None, 0


def outputs(folders: list[Path]) -> list[list[int]]:
    found = []
    for folder in folders:
        records = json.loads((folder / "results.json").read_text())["records"]
        found += [r["token_ids"] for r in records if r["method"] == "vanilla" and r.get("token_ids")]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="`paradec bench` output folders (their results.json)")
    seqs = outputs(parser.parse_args().results)
    tokens = sum(map(len, seqs))
    plain_s = new_s = 0.0
    drafts = 0
    for seq in seqs:  # the request's trie, one token a step, a draft after each
        plain, new = PlainRequestTrie(DEPTH), SuffixTrie(DEPTH)
        for token in seq:
            t0 = time.perf_counter()
            plain.extend([token])
            t1 = time.perf_counter()
            new.extend([token])
            plain_s, new_s = plain_s + t1 - t0, new_s + time.perf_counter() - t1
            (a, length), (b, same) = plain.match(MATCH), new.match(MATCH)
            assert length == same, "the tries match different suffixes"
            if a is not None:
                assert best_tree(plain.nodes, a, NODES, SCORE) == best_tree(new, b, NODES, SCORE), "other drafts"
                drafts += 1
    print(f"request trie: {len(seqs)} outputs, {tokens} tokens, {drafts} drafts equal; {1e6 * plain_s / tokens:.1f} "
          f"-> {1e6 * new_s / tokens:.1f} µs a token")  # fmt: skip
    plain_e, new_e = PlainEngineTrie(DEPTH), GlobalSuffixTrie(DEPTH, len(seqs) + 1, tokens + 1, 10**9)
    plain_s = new_s = 0.0
    drafts = 0
    for seq in seqs:  # the engine's trie, one output at a time, drafts for that output from the earlier ones
        for end in range(1, len(seq), 7):
            (a, length), (b, same) = plain_e.match(seq[:end], MATCH), new_e.match(seq[:end], MATCH)
            assert length == same, "the tries match different suffixes"
            if a is not None:
                assert best_tree(plain_e.nodes, a, NODES, SCORE) == best_tree(new_e, b, NODES, SCORE), "other drafts"
                drafts += 1
        t0 = time.perf_counter()
        plain_e.add(seq)
        t1 = time.perf_counter()
        new_e.add(seq)
        plain_s, new_s = plain_s + t1 - t0, new_s + time.perf_counter() - t1
    print(f"engine trie: {drafts} drafts equal; {1e3 * plain_s / len(seqs):.2f} -> {1e3 * new_s / len(seqs):.2f} ms "
          f"an output; {len(plain_e.nodes.counts) - 1} -> {new_e.nodes} nodes")  # fmt: skip


if __name__ == "__main__":
    main()
