"""Paired statistics of a checkpoint against the base on the same items (learnforget.eval.paired),
on hand-made per-item results whose answers are worked out by hand (binomial sums, means),
or checked against an independent reference (scipy's bootstrap, the normal interval)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from learnforget.errors import ConfigError
from learnforget.eval.paired import (
    item_records,
    item_scores,
    mcnemar_exact,
    mde_flips,
    mde_shift,
    paired_change,
    paired_mde,
    pooled_change,
    power_at,
    subset_indices,
    unpaired_mde,
)
from learnforget.eval.summary import paired_columns, paired_lines


def mc_items(correct_choice: list[int], gold: list[int], *, doc_ids=None, lls=None) -> dict:
    """Two-choice items: the chosen choice gets ll -1, the other -2 (unless lls given)."""
    n = len(gold)
    if lls is None:
        lls = [[-1.0, -2.0] if c == 0 else [-2.0, -1.0] for c in correct_choice]
    return {"doc_id": list(doc_ids if doc_ids is not None else range(n)),
            "correct": [float(c == g) for c, g in zip(correct_choice, gold, strict=True)],
            "gold": list(gold), "lls": lls}


def test_mcnemar_exact_by_hand():
    # 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), worked out with binomial sums
    assert mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)  # 0.0625
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    assert mcnemar_exact(2, 1) == 1.0  # 2 * (1 + 3) / 8 = 1, capped
    assert mcnemar_exact(0, 0) == 1.0
    b, c = 3, 17
    assert mcnemar_exact(b, c) == pytest.approx(
        2 * sum(math.comb(b + c, k) for k in range(b + 1)) / 2 ** (b + c))


def test_flips_and_accuracy_change_on_hand_made_items():
    gold = [0] * 10
    base = mc_items([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], gold)  # right on items 0-4
    ckpt = mc_items([0, 0, 0, 1, 1, 1, 1, 1, 0, 1], gold)  # 3, 4 lost; 8 gained
    ch = paired_change(base, ckpt)
    assert ch["n"] == 10 and ch["acc_base"] == 0.5 and ch["acc"] == pytest.approx(0.4)
    assert ch["acc_delta"] == pytest.approx(-0.1)
    assert (ch["right_to_wrong"], ch["wrong_to_right"]) == (2, 1)
    assert ch["mcnemar_p"] == 1.0
    assert ch["acc_delta_lo"] <= -0.1 <= ch["acc_delta_hi"]
    # ll_gold: right items -1, wrong -2; margin: +1 / -1
    assert ch["ll_gold_delta"] == pytest.approx((-1 - 1 + 1) / 10)
    assert ch["margin_delta"] == pytest.approx(2 * (-1 - 1 + 1) / 10)


def test_length_normalised_gold_and_margin_by_hand():
    items = {"doc_id": [7, 3], "correct": [0.0, 1.0], "gold": [0, 2],
             "lls": [[-4.0, -6.0], [-3.0, -5.0, -4.0]], "lens": [[2, 4], [1, 5, 8]]}
    s = item_scores(items)
    # item 7: per char [-2, -1.5], gold 0 -> -2, margin -0.5
    # item 3: per char [-3, -1, -0.5], gold 2 -> -0.5, margin -0.5 - (-1) = +0.5
    assert s["ll_gold"].tolist() == [-2.0, -0.5]
    assert s["margin"].tolist() == [-0.5, 0.5]
    raw = item_scores({k: v for k, v in items.items() if k != "lens"})
    assert raw["ll_gold"].tolist() == [-4.0, -4.0] and raw["margin"].tolist() == [2.0, -1.0]


def test_a_uniform_shift_has_a_zero_width_interval():
    rng = np.random.default_rng(1)
    lls = rng.normal(-2, 1, size=(50, 4)).tolist()
    gold = rng.integers(0, 4, size=50).tolist()
    base = {"doc_id": list(range(50)), "correct": [0.0] * 50, "gold": gold, "lls": lls}
    ckpt = {**base, "lls": [[v - 0.3 for v in row] for row in lls]}
    ch = paired_change(base, ckpt)
    assert ch["ll_gold_delta"] == pytest.approx(-0.3)
    assert ch["ll_gold_delta_lo"] == pytest.approx(-0.3) and ch["ll_gold_delta_hi"] == \
        pytest.approx(-0.3)
    assert ch["margin_delta"] == pytest.approx(0.0, abs=1e-12)
    assert ch["acc_delta"] == 0 and ch["right_to_wrong"] == ch["wrong_to_right"] == 0


def test_bootstrap_interval_agrees_with_scipy_and_the_normal_interval():
    rng = np.random.default_rng(2)
    n = 400
    base_ll = rng.normal(-2.0, 1.0, n)
    shift = rng.normal(-0.1, 0.5, n)
    base = {"doc_id": list(range(n)), "correct": [1.0] * n, "gold": [0] * n,
            "lls": [[b, b - 5] for b in base_ll]}
    ckpt = {**base, "lls": [[b + d, b - 5] for b, d in zip(base_ll, shift, strict=True)]}
    ch = paired_change(base, ckpt, n_boot=4000, seed=3)
    ref = stats.bootstrap((shift,), np.mean, n_resamples=4000, method="percentile",
                          confidence_level=0.95, random_state=4).confidence_interval
    assert ch["ll_gold_delta_lo"] == pytest.approx(ref.low, abs=0.01)
    assert ch["ll_gold_delta_hi"] == pytest.approx(ref.high, abs=0.01)
    half = 1.959964 * shift.std(ddof=1) / math.sqrt(n)
    assert ch["ll_gold_delta_lo"] == pytest.approx(shift.mean() - half, abs=0.01)
    assert ch["ll_gold_delta_hi"] == pytest.approx(shift.mean() + half, abs=0.01)


def test_items_are_paired_by_document_id():
    base = mc_items([0, 1, 0], [0, 0, 0], doc_ids=[5, 9, 11])
    ckpt = mc_items([1, 1, 0, 0], [0, 0, 0, 0], doc_ids=[11, 9, 5, 20])  # 11 flipped
    ch = paired_change(base, ckpt)
    assert ch["n"] == 3 and (ch["right_to_wrong"], ch["wrong_to_right"]) == (1, 0)
    with pytest.raises(ConfigError, match="share no items"):
        paired_change(base, mc_items([0], [0], doc_ids=[1]))


def test_pooled_change_is_the_mean_over_tasks():
    a_base = mc_items([0] * 20, [0] * 20)
    a = {**a_base, "lls": [[-1.1, -2.0]] * 20}  # ll_gold -0.1 on every item
    b_base = mc_items([0] * 30, [0] * 30)
    b = {**b_base, "lls": [[-1.3, -2.0]] * 30}  # -0.3
    pooled = pooled_change([paired_change(a_base, a, keep_boots=True),
                            paired_change(b_base, b, keep_boots=True)])
    assert pooled["ll_gold_delta"] == pytest.approx(-0.2)
    assert pooled["ll_gold_delta_lo"] == pytest.approx(-0.2)
    assert pooled["ll_gold_delta_hi"] == pytest.approx(-0.2)
    assert pooled["tasks"] == 2 and pooled["acc_delta"] == 0


def test_unpaired_bound_by_hand():
    items = mc_items([0] * 50 + [1] * 50, [0] * 100)  # accuracy 0.5 on 100 items
    m = unpaired_mde(items)
    sd = math.sqrt(0.25 * 100 / 99)  # sample sd (ddof 1) of 50 ones and 50 zeros
    assert m["acc"] == pytest.approx(1.959964 * math.sqrt(2) * sd / 10, rel=1e-6)  # 0.1393
    assert m["acc"] == pytest.approx(0.13929, abs=1e-5)
    assert m["ll_gold"] == pytest.approx(m["acc"])  # ll_gold is -1 / -2: the same spread
    assert m["n"] == 100


def test_paired_mde_of_flips_by_hand():
    """n = 500, churn 0.04, 50% power: δ = (k² + sqrt(k⁴ + 4 (n + k²) k² c)) / (2 (n + k²)),
    k = 1.96: (3.8415 + sqrt(14.757 + 309.69)) / 1007.68 = 0.02169, and it solves
    δ = 1.96 * sqrt((0.04 + δ - δ²) / 500)."""
    d = mde_flips(500, 0.04, 0.5)
    assert d == pytest.approx(0.02169, abs=2e-5)
    assert d == pytest.approx(1.959964 * math.sqrt((0.04 + d - d * d) / 500), rel=1e-6)
    d80 = mde_flips(500, 0.04, 0.8)
    assert d80 == pytest.approx((1.959964 + 0.841621) * math.sqrt((0.04 + d80 - d80 ** 2) / 500),
                                rel=1e-6)
    # no churn: k² / (n + k²), i.e. 3.8415 / 503.84 = 0.00762 (about 4 one-way flips)
    assert mde_flips(500, 0.0, 0.5) == pytest.approx(3.841459 / 503.841459, rel=1e-6)
    assert mde_shift(400, 0.5, 0.8) == pytest.approx((1.959964 + 0.841621) * 0.5 / 20, rel=1e-6)
    assert mde_shift(400, 0.5, 0.5) == pytest.approx(1.959964 * 0.025, rel=1e-6)
    with pytest.raises(ConfigError, match="power must be in"):
        mde_flips(500, 0.04, 1.0)
    with pytest.raises(ConfigError, match="churn"):
        mde_flips(500, 1.5)


def test_paired_mde_power_matches_a_numpy_simulation():
    """The stated power is the rate at which a 95% normal interval of the paired mean change
    excludes 0 in fresh test sets (numpy only: multinomial flips, normal shifts)."""
    rng = np.random.default_rng(0)
    n, c, sims = 500, 0.06, 20000
    for power in (0.5, 0.8):
        d = mde_flips(n, c, power)
        counts = rng.multinomial(n, [c / 2 + d, c / 2, 1 - c - d], size=sims)
        mean = (counts[:, 1] - counts[:, 0]) / n
        var = ((counts[:, 0] + counts[:, 1]) / n - mean ** 2) * n / (n - 1)
        hit = np.abs(mean) > 1.959964 * np.sqrt(var / n)
        assert hit.mean() == pytest.approx(power, abs=0.015), (power, hit.mean())
        assert power_at(-d, math.sqrt((c + d - d * d) / n)) == pytest.approx(power, abs=1e-4)
    sd, sims = 0.3, 4000
    for power in (0.5, 0.8):
        d = mde_shift(n, sd, power)
        diff = rng.normal(-d, sd, size=(sims, n))
        se = diff.std(axis=1, ddof=1) / math.sqrt(n)
        assert (np.abs(diff.mean(axis=1)) > 1.959964 * se).mean() == pytest.approx(power,
                                                                                  abs=0.03)
    assert power_at(0.0, 0.01) == pytest.approx(0.05, abs=1e-6)


def test_post_hoc_paired_mde_from_observed_pairs():
    """50 items: 6 right->wrong, 2 wrong->right -> churn 2 * 2 / 50 = 0.08; the margin changes
    are -0.1 on 25 items and +0.1 on 25: sd(d) by numpy."""
    base = mc_items([0] * 30 + [1] * 20, [0] * 50)
    flipped = [1] * 6 + [0] * 24 + [0] * 2 + [1] * 18
    lls = [[-1.0 + (-0.1 if i % 2 else 0.1), -2.0] if ch == 0 else [-2.0, -1.0]
           for i, ch in enumerate(flipped)]
    ckpt = mc_items(flipped, [0] * 50, lls=lls)
    pm = paired_mde(base, ckpt)
    assert pm["churn"] == pytest.approx(0.08) and pm["n"] == 50
    assert pm["acc_50"] == pytest.approx(mde_flips(50, 0.08, 0.5))
    ch = paired_change(base, ckpt)
    from learnforget.eval.paired import item_scores

    dm = item_scores(ckpt)["margin"] - item_scores(base)["margin"]
    assert pm["sd_margin"] == pytest.approx(np.std(dm, ddof=1))
    assert pm["margin_80"] == pytest.approx(2.801585 * np.std(dm, ddof=1) / math.sqrt(50),
                                            rel=1e-6)
    assert ch["right_to_wrong"] == 6 and ch["wrong_to_right"] == 2


def test_subsets_are_fixed_and_seeded():
    a = subset_indices(10042, 150, seed=0)
    assert a == subset_indices(10042, 150, seed=0) and a == sorted(set(a)) and len(a) == 150
    assert 0 <= a[0] and a[-1] < 10042
    assert a != subset_indices(10042, 150, seed=1)
    assert subset_indices(100, 100, seed=0) is None and subset_indices(100, None, 0) is None
    with pytest.raises(ConfigError, match="subset size must be >= 1"):
        subset_indices(100, 0, seed=0)


def test_item_records_from_an_lm_eval_sample_log():
    """lm-eval's per-sample log layout (evaluator.py): arguments (context, continuation),
    filtered_resps (ll, is_greedy) per choice, target, the metrics."""
    log = [
        {"doc_id": 4, "target": 1, "filter": "none", "acc": 0.0, "acc_norm": 1.0,
         "arguments": [("Q:", " ab"), ("Q:", " abcd")],
         "filtered_resps": [(-2.0, False), (-3.0, False)], "doc": {}},
        {"doc_id": 1, "target": "2", "filter": "none", "acc": 1.0, "acc_norm": 1.0,
         "arguments": [("Q:", " x"), ("Q:", " y"), ("Q:", " zz")],
         "filtered_resps": [(-5.0, False), (-4.0, False), (-1.0, True)], "doc": {}},
    ]
    rec = item_records(log, "acc_norm", normalised=True)
    assert rec == {"doc_id": [1, 4], "correct": [1.0, 1.0], "gold": [2, 1],
                   "lls": [[-5.0, -4.0, -1.0], [-2.0, -3.0]], "lens": [[1, 1, 2], [2, 4]]}
    wino = [{"doc_id": 0, "target": "got the cases.", "filter": "none", "acc": 0.0,
             "arguments": [("Sarah", " got"), ("Maria", " got")],
             "filtered_resps": [(-3.0, False), (-4.0, False)], "doc": {"answer": "2"}}]
    assert item_records(wino, "acc", normalised=False)["gold"] == [1]
    with pytest.raises(ConfigError, match="no metric 'exact_match'"):
        item_records(log, "exact_match", normalised=False)


def test_paired_columns_and_printed_lines():
    gold = [0] * 10
    base = {"tasks": {"hs": {"role": "forgetting", "items": mc_items([0] * 10, gold)},
                      "code": {"role": "target", "items": mc_items([0] * 10, gold)}}}
    ckpt = {"tasks": {"hs": {"role": "forgetting", "items": mc_items([1] + [0] * 9, gold)},
                      "code": {"role": "target", "items": mc_items([0] * 10, gold)}}}
    row = paired_columns(ckpt, base)
    assert row["paired/hs/acc_delta"] == pytest.approx(-0.1)
    assert row["paired/hs/right_to_wrong"] == 1 and row["paired/hs/mcnemar_p"] == 1.0
    assert row["paired_forgetting_acc_delta"] == pytest.approx(-0.1)  # target tasks excluded
    assert row["paired_forgetting_tasks"] == 1
    assert row["mde_unpaired/hs/acc"] == 0.0  # the base is right on every item: no spread
    # one right->wrong, none back: churn 0; the paired MDE is k² / (n + k²) at n = 10
    assert row["paired/hs/churn"] == 0.0
    assert row["mde50/hs/acc"] == pytest.approx(3.841459 / 13.841459, rel=1e-6)
    assert row["mde/hs/acc"] == pytest.approx(2.801585 ** 2 / (10 + 2.801585 ** 2), rel=1e-5)
    rows = [{"checkpoint": "base", **paired_columns(base, base)},
            {"checkpoint": "step-1", **row}]
    text = "\n".join(paired_lines(rows))
    assert "hs: n=10, unpaired bound: acc 0.0000" in text
    assert "paired MDE 50%/80%: acc 0.2775/0.4397 (churn 0.000)" in text
    assert "step-1  d_acc -0.1000" in text and "right->wrong 1  wrong->right 0" in text


def test_demo_table_shows_paired_changes_with_intervals():
    import pandas as pd

    from learnforget.studies.demo import results_table

    base = {"checkpoint": "base", "method_summary": "base", "tokens": 0, "seed": 0,
            "forgetting_score": 0.5}
    rows = [base]
    for seed, (d, lo, hi, rw, wr) in enumerate([(-0.02, -0.05, 0.01, 3, 1),
                                                (-0.04, -0.06, -0.01, 4, 0)]):
        rows.append({"checkpoint": "c", "method_summary": "full", "tokens": 8192, "seed": seed,
                     "forgetting_score": 0.5 + d,
                     "paired_forgetting_acc_delta": d, "paired_forgetting_acc_delta_lo": lo,
                     "paired_forgetting_acc_delta_hi": hi,
                     "paired_forgetting_margin_delta": 10 * d,
                     "paired_forgetting_margin_delta_lo": 10 * lo,
                     "paired_forgetting_margin_delta_hi": 10 * hi,
                     "paired_forgetting_right_to_wrong": rw,
                     "paired_forgetting_wrong_to_right": wr})
    table, out = results_table(pd.DataFrame(rows))
    full = out[1]
    # the seeds' mean change, the envelope of their intervals; flips summed over seeds
    assert full["Δacc vs base [95% CI]"] == "-0.0300 [-0.0600, +0.0100]"
    assert full["Δmargin vs base [95% CI]"] == "-0.3000 [-0.6000, +0.1000]"
    assert full["flips r→w/w→r"] == "7/1"
    assert out[0]["Δacc vs base [95% CI]"] == "-" and "| benchmark acc |" in table
