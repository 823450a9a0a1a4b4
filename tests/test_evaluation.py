"""Measurement helpers of the selection harness: confusion matrices, hubness, per-user seeds."""

from __future__ import annotations

import math

import pytest

from xpert_fl.baselines.core import selection_seed
from xpert_fl.evaluation import confusion, hubness, wilson


def test_hubness_on_a_hand_made_case():
    # 8 users over 4 pLLMs: one hub takes 5, two take 1 and 2, one attracts nobody
    chosen = ["a", "a", "a", "a", "a", "b", "c", "c"]
    h = hubness(chosen, ["a", "b", "c", "d"])
    assert h["attracted"] == {"a": 5, "b": 1, "c": 2, "d": 0}
    assert h["max_share"] == pytest.approx(5 / 8)
    # counts 5,1,2,0: mean 2, central moments m2 = (9+1+0+4)/4 = 3.5, m3 = (27-1+0-8)/4 = 4.5
    assert h["skewness"] == pytest.approx(4.5 / 3.5**1.5)
    even = hubness(["a", "b", "c", "d"], ["a", "b", "c", "d"])
    assert even["skewness"] == 0.0 and even["max_share"] == 0.25


def test_confusion_counts_every_pair_and_keeps_outside_choices():
    m = confusion(["x", "x", "y"], ["x", "base", "x"], ["x", "y"])
    assert m == {"x": {"x": 1, "y": 0, "base": 1}, "y": {"x": 1, "y": 0, "base": 0}}
    with pytest.raises(ValueError, match="one choice per user"):
        confusion(["x"], [], ["x"])


def test_selection_seed_differs_per_user_and_repeats_for_a_run_seed():
    seeds = [selection_seed(0, 0, f"poetic#{u}") for u in range(16)]
    assert len(set(seeds)) == 16
    assert seeds == [selection_seed(0, 0, f"poetic#{u}") for u in range(16)]
    assert selection_seed(1, 0, "poetic#0") != seeds[0]


def test_wilson_interval_contains_the_proportion():
    lo, hi = wilson(13, 16)
    assert lo < 13 / 16 < hi and 0.5 < lo and hi < 1
    assert wilson(0, 0) == (0.0, 1.0) and not math.isnan(wilson(16, 16)[1])
