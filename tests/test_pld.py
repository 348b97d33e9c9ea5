"""Prompt lookup: the incremental n-gram index."""

from __future__ import annotations

from paradec.drafters.pld import NgramIndex


def test_longest_ngram_most_recent_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    # suffix 3-gram (1, 2, 3) last occurred at 4..6, followed by 7, 5, 1, 2, 3
    assert index.lookup(tokens, 4) == [7, 5, 1, 2]


def test_falls_back_to_shorter_ngrams_and_none():
    index = NgramIndex(1, 3)
    assert index.lookup([4, 5, 6, 5], 3) == [6, 5, 6]  # only the 1-gram (5,) occurred before; period 2
    assert NgramIndex(2, 3).lookup([4, 5, 6, 7], 3) == []


def test_repetition_continues_with_its_period():
    index = NgramIndex(1, 2)
    tokens = [8, 1, 2, 1, 2]
    assert index.lookup(tokens, 5) == [1, 2, 1, 2, 1]


def test_incremental_index_equals_fresh_index():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    grown = NgramIndex(1, 3)
    for end in range(1, len(tokens) + 1):
        assert grown.lookup(tokens[:end], 6) == NgramIndex(1, 3).lookup(tokens[:end], 6)
