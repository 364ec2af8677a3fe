"""Power of the paired benchmark comparison, checked by simulation on real per-item results.

The harness states a paired minimum detectable change (MDE) at a named power
(`learnforget.eval.paired`: `mde_flips` for accuracy from the flip churn, `mde_shift` for
margins from the sd of per-item differences). This module checks that statement: it injects a
change of known size, chosen so that the formula states a given power (5% at 0, 20%, 50%, 80%,
95%), into the REAL per-item results of the base, runs the harness's own paired test
(`paired_change`: 95% paired bootstrap interval over items) `n_sims` times, and counts how
often the interval excludes 0. Each simulation is one fresh test set: n items drawn with
replacement from the population of scored items (the population the interval speaks about).

Models (`MODELS`):

    paired        the realistic case. The background is taken from a REAL scored checkpoint of
                  the control series (`reference`): its flip churn c (2 * min(right->wrong,
                  wrong->right) / n) and its per-item margin changes, centred (mean 0, each
                  item keeps its own change). Accuracy: in the population, exactly
                  round(N * (c/2 + |δ|)) of the base's right items turn wrong and
                  round(N * c/2) of its wrong items turn right (fresh random items each
                  simulation): a known change δ = (wrong->right - right->wrong) / N with the
                  reference's churn. Margin: every item's margin moves by its own centred real
                  change plus δ. Stated power: `power_at` with the paired standard error
                  (`flips_se` at the realised counts; sd of the centred changes / sqrt(n)).
    independent   the unpaired bound's own assumption (`unpaired_mde`): each item's
                  checkpoint value is an independent draw from the base's items, then the
                  change is added (margin +δ; accuracy: right items turn wrong with probability
                  |δ|/acc). Stated power from SE = sqrt(2) * s / sqrt(n).

A false-positive rate comes from power target 0 (δ = 0): 5% stated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learnforget.errors import ConfigError
from learnforget.eval.paired import (
    Z95,
    flips_se,
    item_scores,
    mde_flips,
    mde_shift,
    paired_change,
    power_at,
    unpaired_mde,
)

MODELS = ("paired", "independent")
MEASURES = ("acc", "margin")
TARGETS = (0.0, 0.2, 0.5, 0.8, 0.95)  # stated powers of the injected sizes (0: no change)


def records(correct: np.ndarray, margin: np.ndarray) -> dict[str, list]:
    """Per-item records paired_change reads, built from per-item correctness and margins:
    two choices, the gold one at log-likelihood `margin` and the other at 0 (so the record's
    margin is exactly `margin`; ll_gold equals it too)."""
    n = len(correct)
    return {"doc_id": list(range(n)), "correct": [float(c) for c in correct],
            "gold": [0] * n, "lls": [[float(m), 0.0] for m in margin]}


def population(base_items: Mapping[str, Sequence],
               reference_items: Mapping[str, Sequence] | None = None) -> dict[str, Any]:
    """The base's per-item (correct, margin) arrays and, given a scored reference checkpoint
    of the same items, the `paired` model's background: its churn and its centred per-item
    margin changes (only the items both share)."""
    b = item_scores(base_items)
    if "margin" not in b:
        raise ConfigError("power simulation needs multiple-choice per-item results (lls, gold)")
    out: dict[str, Any] = {"correct": b["correct"], "margin": b["margin"], "churn": None,
                           "noise": None}
    if reference_items is None:
        return out
    c = item_scores(reference_items)
    common, ib, ic = np.intersect1d(b["doc_id"], c["doc_id"], return_indices=True)
    if common.size == 0 or "margin" not in c:
        raise ConfigError("power: the reference checkpoint and the base share no "
                          "multiple-choice items (expected one task scored on the same subset)")
    bc, cc = b["correct"][ib] > 0.5, c["correct"][ic] > 0.5
    d = c["margin"][ic] - b["margin"][ib]
    out.update(correct=b["correct"][ib], margin=b["margin"][ib], noise=d - d.mean(),
               churn=2.0 * min(int(np.sum(bc & ~cc)), int(np.sum(~bc & cc))) / common.size)
    return out


def injected_size(pop: Mapping[str, Any], measure: str, model: str, target: float
                  ) -> tuple[float, float, dict[str, int]]:
    """(δ, stated power, flip counts) for an injected forgetting change whose stated power is
    `target` (0: no change). Accuracy under `paired` is rounded to whole flips of the N items
    and its stated power recomputed at the realised counts; NaN where the flips do not fit
    the base's right (wrong) items."""
    if measure not in MEASURES:
        raise ConfigError(f"measure {measure!r} is not one of {MEASURES}")
    if model not in MODELS:
        raise ConfigError(f"model {model!r} is not one of {MODELS}")
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"power target must be in [0, 1), got {target!r}")
    correct, n = pop["correct"], len(pop["correct"])
    if model == "independent":
        u = unpaired_mde(records(correct, pop["margin"]))
        se = u[measure] / Z95
        delta = 0.0 if target == 0 else -_k(target) * se
        return delta, power_at(delta, se), {}
    if pop["churn"] is None:
        raise ConfigError("model='paired' needs a reference checkpoint (its churn and margin "
                          "changes): pass reference_items")
    if measure == "margin":
        sd = float(np.std(pop["noise"], ddof=1))
        delta = 0.0 if target == 0 else -mde_shift(n, sd, target)
        return delta, power_at(delta, sd / math.sqrt(n)), {}
    want = 0.0 if target == 0 else mde_flips(n, pop["churn"], target)
    wr = round(n * pop["churn"] / 2)
    rw = wr + round(n * want)
    right = int(np.sum(correct > 0.5))
    if rw > right or wr > n - right:  # the size needs more flips than the items allow
        return math.nan, math.nan, {"right_to_wrong": rw, "wrong_to_right": wr}
    delta = (wr - rw) / n
    return delta, power_at(delta, flips_se(n, 2.0 * wr / n, delta)), {"right_to_wrong": rw,
                                                                         "wrong_to_right": wr}


def _k(power: float) -> float:
    from scipy.stats import norm

    return Z95 + float(norm.ppf(power))


def simulate(pop: Mapping[str, Any], measure: str, model: str, delta: float,
             flips: Mapping[str, int], rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One simulated test set (module doc): base_correct, base_margin, ckpt_correct,
    ckpt_margin over n items drawn with replacement from the population."""
    correct = pop["correct"].astype(np.float64)
    margin = pop["margin"].astype(np.float64)
    n = len(correct)
    if model == "independent":
        pick, other = rng.integers(0, n, size=n), rng.integers(0, n, size=n)
        c, m = correct[other].copy(), margin[other].copy()
        if measure == "margin":
            m = m + delta
        else:
            p = min(1.0, abs(delta) / max(float(correct.mean()), 1e-12))
            c[(c > 0.5) & (rng.random(n) < p)] = 0.0
        return correct[pick], margin[pick], c, m
    c, m = correct.copy(), margin.copy()
    if measure == "margin":
        m = m + pop["noise"] + delta
    else:
        right, wrong = np.flatnonzero(correct > 0.5), np.flatnonzero(correct <= 0.5)
        c[rng.choice(right, size=flips["right_to_wrong"], replace=False)] = 0.0
        c[rng.choice(wrong, size=flips["wrong_to_right"], replace=False)] = 1.0
    pick = rng.integers(0, n, size=n)
    return correct[pick], margin[pick], c[pick], m[pick]


def detection_rate(pop: Mapping[str, Any], measure: str, target: float, model: str = "paired",
                   *, n_sims: int = 200, seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Inject the forgetting change whose stated power is `target` `n_sims` times; the share
    of simulations whose paired 95% interval (paired_change) excludes 0, with its binomial
    95% interval, beside the stated power."""
    delta, stated, flips = injected_size(pop, measure, model, target)
    out = {"measure": measure, "model": model, "target": float(target), "delta": float(delta),
           "n": len(pop["correct"]), "churn": pop["churn"], "n_sims": n_sims,
           "stated_power": stated, **flips}
    if math.isnan(delta):
        return {**out, "detected": None, "note": "the flips do not fit the items"}
    rng = np.random.default_rng(seed)
    hits, realised = 0, []
    for i in range(n_sims):
        bc, bm, c, m = simulate(pop, measure, model, delta, flips, rng)
        ch = paired_change(records(bc, bm), records(c, m), n_boot=n_boot, seed=seed + 1 + i)
        hits += int(ch[f"{measure}_delta_lo"] > 0 or ch[f"{measure}_delta_hi"] < 0)
        realised.append(ch[f"{measure}_delta"])
    rate = hits / n_sims
    half = Z95 * math.sqrt(max(stated * (1 - stated), 1e-12) / n_sims)
    return {**out, "detected": rate, "expected_lo": max(0.0, stated - half),
            "expected_hi": min(1.0, stated + half), "realised_delta": float(np.mean(realised))}


def power_table(pop: Mapping[str, Any], targets: Sequence[float] = TARGETS,
                models: Sequence[str] = ("paired",), measures: Sequence[str] = MEASURES, *,
                n_sims: int = 200, seed: int = 0, n_boot: int = 2000) -> list[dict[str, Any]]:
    """detection_rate over stated powers x models x measures (one task's population)."""
    return [detection_rate(pop, ms, k, md, n_sims=n_sims, seed=seed, n_boot=n_boot)
            for md in models for ms in measures for k in targets]
