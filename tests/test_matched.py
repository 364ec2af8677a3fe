"""Forgetting at matched learning: interpolation along hand-made trajectories, known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from learnforget.analysis.matched import level_at, matched_difference, matched_table, write_matched
from learnforget.errors import ConfigError


def test_level_at_interpolates_first_crossing():
    # path 0 -> 2 -> 1 -> 3: x = 1.5 is first reached on the first segment (y 0 -> 4)
    xs, ys = [0, 2, 1, 3], [0, 4, 10, 20]
    assert level_at(xs, ys, 1.5) == pytest.approx(3.0)
    assert level_at(xs, ys, 2.0) == 4.0          # exactly a checkpoint
    assert level_at(xs, ys, 2.5) == pytest.approx(17.5)   # on 1 -> 3: t = 0.75, y 10 -> 20
    assert math.isnan(level_at(xs, ys, 3.5))     # never reached
    # decreasing learning (a cross-entropy): 3.0 -> 2.0 -> 1.5
    assert level_at([3.0, 2.0, 1.5], [0.0, 1.0, 3.0], 1.75) == pytest.approx(2.0)


def test_matched_difference_known_answer():
    # A: forgetting = learning; B: forgetting = learning / 4, B learns twice as far.
    a = ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    b = ([0.0, 2.0, 4.0], [0.0, 0.5, 1.0])
    res = matched_difference(a, b, n_levels=4)
    # overlap [0, 2]; levels 0.5, 1, 1.5, 2; A - B = 0.75 * level -> mean 0.75 * 1.25
    assert (res["lo"], res["hi"]) == (0.0, 2.0)
    np.testing.assert_allclose(res["levels"], [0.5, 1.0, 1.5, 2.0])
    assert res["diff"] == pytest.approx(0.9375)
    assert matched_difference(([0, 1], [0, 1]), ([2, 3], [0, 1])) is None
    with pytest.raises(ConfigError, match="n_levels"):
        matched_difference(a, b, n_levels=0)


def _table() -> pd.DataFrame:
    """Two methods x two seeds; cross-entropy learning (lower = more learning)."""
    rows = []
    for seed, slope_full, slope_lora in ((0, 1.0, 0.5), (1, 2.0, 0.5)):
        for method, slope, reach in (("full", slope_full, 1.0), ("lora", slope_lora, 0.5)):
            run = f"{method}-s{seed}"
            rows.append({"run": run, "method_summary": method, "seed": seed,
                         "checkpoint": "base", "tokens": 0, "step": 0,
                         "ce": 3.0, "kl": 0.0})
            for i, t in enumerate((1000, 2000), start=1):
                drop = reach * i / 2          # CE falls by `reach` over the run
                rows.append({"run": run, "method_summary": method, "seed": seed,
                             "checkpoint": f"t{t}", "tokens": t, "step": i,
                             "ce": 3.0 - drop, "kl": slope * drop})
    return pd.DataFrame(rows)


def test_matched_table_pairs_seeds_and_gives_interval(tmp_path):
    t = matched_table(_table(), "ce", "kl", n_levels=5)
    f = t[t["quantity"] == "forgetting at matched learning"].iloc[0]
    # CE overlap [2.5, 3.0]; KL = slope * drop: full - lora = (slope_full - 0.5) * mean drop,
    # mean drop over levels 0.1..0.5 = 0.3 -> seed 0: 0.15, seed 1: 0.45
    assert (f["method_a"], f["method_b"], f["pairs"]) == ("full", "lora", 2)
    assert (f["range_lo"], f["range_hi"]) == pytest.approx((2.5, 3.0))
    assert f["diff_a_minus_b"] == pytest.approx(0.30)
    half = 12.706204736174698 * np.std([0.15, 0.45], ddof=1) / math.sqrt(2)
    assert (f["ci95_low"], f["ci95_high"]) == pytest.approx((0.30 - half, 0.30 + half))
    # learning at matched forgetting: KL overlap per seed [0, 0.25] (s0) and [0, 0.25] (s1);
    # at KL level k: CE = 3 - k / slope -> full - lora = k (1/0.5 - 1/slope_full)
    le = t[t["quantity"] == "learning at matched forgetting"].iloc[0]
    levels = 0.25 * np.arange(1, 6) / 5
    expect = np.mean([np.mean(levels * (2 - 1 / s)) for s in (1.0, 2.0)])
    assert le["diff_a_minus_b"] == pytest.approx(expect)
    table, paths = write_matched(_table(), tmp_path, "ce", "kl", n_levels=5)
    assert [p.name for p in paths] == ["matched_learning.csv", "matched_learning.md",
                                       "matched_learning.png", "matched_learning.svg"]
    assert "+0.3000" in (tmp_path / "matched_learning.md").read_text()
    assert pd.read_csv(tmp_path / "matched_learning.csv")["diff_a_minus_b"].iloc[0] == \
        pytest.approx(0.30)


def test_matched_table_names_missing_column():
    with pytest.raises(ConfigError, match="'nope' is not in the runs table"):
        matched_table(_table(), "nope", "kl")


def test_the_last_level_is_the_end_of_the_shorter_path_despite_rounding():
    """Two runs of base -> one checkpoint (a second seed at the last budget only): the levels
    end on the shorter path's last point. 0.6754681847334906 - (0.6754681847334906 - 0.009952)
    is 4e-17 below 0.009952 in floating point, beyond that path's end: the difference must
    still be a number, by hand: y_a - y_b at x = 0.6755 - (0.6755 - 0.009952) i / 8."""
    base, end_a, end_b = 0.6754681847334906, 0.006643, 0.009952
    a = ([base, end_a], [0.0, 1.0])
    b = ([base, end_b], [0.0, 2.0])
    got = matched_difference(a, b)
    assert got is not None and np.isfinite(got["diff"])
    levels = base - (base - end_b) * np.arange(1, 9) / 8
    by_hand = [(base - v) / (base - end_a) * 1.0 - (base - v) / (base - end_b) * 2.0
               for v in levels]
    assert got["diff"] == pytest.approx(np.mean(by_hand), abs=1e-12)
