"""Power of the paired benchmark comparison, checked by simulation on real per-item results.

`learnforget.eval.paired.mde` states a minimum detectable change: z·√2·s/√n (z = 1.96, s the
base's per-item standard deviation, n items). That is the HALF-WIDTH of the 95% interval of a
difference of two means whose item errors are independent, i.e. SE = √2·s/√n and mde = z·SE.
A true change of exactly mde is therefore detected (interval excludes 0) with power of about
50%, not 80%; the power the formula states for a true change δ is

    power(δ) = Φ(|δ|/SE - z) + Φ(-|δ|/SE - z)        (`stated_power`)

so 80% power needs δ = (z + 0.84)·SE ≈ 1.43·mde.

`detection_rate` injects a change of known size into the REAL per-item results of the base
(the `tasks.<name>.items` lm-eval wrote) and runs the harness's own paired test
(`paired_change`, bootstrap interval over items) `n_sims` times per size, counting how often
the 95% interval excludes 0. Each simulation first draws a fresh test set of n items with
replacement from the base's items (the population the interval speaks about), then builds a
"checkpoint" from it one of three ways:

    independent   the formula's own assumption: each item's checkpoint value is an independent
                  draw from the base's items (same spread, no pairing), then the change is
                  added (margin: +δ; accuracy: right items turn wrong with probability
                  |δ|/acc). The detection rate should match stated_power.
    flip          the brief's "flip a random fraction of correct items to wrong": each right
                  item turns wrong (its margin negative) with probability |δ|/acc, nothing else
                  moves (margin: every margin shifts by δ). Items stay paired with themselves.
    churn         a realistic checkpoint: every item's margin moves by δ plus noise drawn from
                  a measured checkpoint's per-item margin changes minus their mean
                  (`margin_noise`), correctness follows the margin's sign; for accuracy, the
                  noise, then the flips of `flip`. multiple=0 gives the false-positive rate.

Sizes are given in units of the stated mde of the measure (acc or margin), so the table reads
"at δ = 1·mde the formula states 50% power; the harness detected it in x% of simulations".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learnforget.errors import ConfigError
from learnforget.eval.paired import Z95, item_scores, mde, paired_change

MODELS = ("independent", "flip", "churn")
MEASURES = ("acc", "margin")


def stated_power(delta: float, mde_value: float, z: float = Z95) -> float:
    """The power the mde formula implies for a true change `delta` (module doc)."""
    from scipy.stats import norm

    if mde_value <= 0:
        raise ConfigError(f"mde must be > 0, got {mde_value!r}")
    se = mde_value / z
    d = abs(delta) / se
    return float(norm.cdf(d - z) + norm.cdf(-d - z))


def records(correct: np.ndarray, margin: np.ndarray) -> dict[str, list]:
    """Per-item records paired_change reads, built from per-item correctness and margins:
    two choices, the gold one at log-likelihood `margin` and the other at 0 (so the record's
    margin is exactly `margin`; ll_gold equals it too)."""
    n = len(correct)
    return {"doc_id": list(range(n)), "correct": [float(c) for c in correct],
            "gold": [0] * n, "lls": [[float(m), 0.0] for m in margin]}


def margin_noise(base_items: Mapping[str, Sequence], ckpt_items: Mapping[str, Sequence]
                 ) -> np.ndarray:
    """A measured checkpoint's per-item margin change against the base, centred (mean 0):
    the `churn` model's noise."""
    b, c = item_scores(base_items), item_scores(ckpt_items)
    common, ib, ic = np.intersect1d(b["doc_id"], c["doc_id"], return_indices=True)
    if common.size == 0 or "margin" not in b:
        raise ConfigError("margin_noise: the checkpoint and the base share no multiple-choice "
                          "items (expected per-item results of one task on the same subset)")
    d = c["margin"][ic] - b["margin"][ib]
    return d - d.mean()


def inject(correct: np.ndarray, margin: np.ndarray, measure: str, delta: float, model: str,
           rng: np.random.Generator, noise: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One simulated (base, checkpoint) pair of per-item (correct, margin) arrays with a change
    `delta` in `measure` (module doc): returns base_correct, base_margin, ckpt_correct,
    ckpt_margin. Accuracy changes are forgetting: right items turn wrong."""
    if measure not in MEASURES:
        raise ConfigError(f"measure {measure!r} is not one of {MEASURES}")
    if model not in MODELS:
        raise ConfigError(f"model {model!r} is not one of {MODELS}")
    if model == "churn" and (noise is None or len(noise) == 0):
        raise ConfigError("model='churn' needs the per-item noise of a measured checkpoint")
    n = len(correct)
    pick = rng.integers(0, n, size=n)
    bc, bm = correct[pick].astype(np.float64), margin[pick].astype(np.float64)
    if model == "independent":
        other = rng.integers(0, n, size=n)
        c, m = correct[other].astype(np.float64), margin[other].astype(np.float64)
    else:
        c, m = bc.copy(), bm.copy()
    if model == "churn":
        m = m + rng.choice(noise, size=n, replace=True)
        c = (m > 0).astype(np.float64)
    if measure == "margin":
        m = m + delta
        if model == "churn":
            c = (m > 0).astype(np.float64)
        return bc, bm, c, m
    right = c > 0.5
    p = min(1.0, abs(delta) / max(float(correct.mean()), 1e-12))
    flip = right & (rng.random(n) < p)
    c[flip] = 0.0
    m[flip] = -np.abs(m[flip]) - 1e-6
    return bc, bm, c, m


def detection_rate(base_items: Mapping[str, Sequence], measure: str, multiple: float,
                   model: str, *, n_sims: int = 200, seed: int = 0,
                   noise: np.ndarray | None = None, n_boot: int = 2000) -> dict[str, Any]:
    """Inject a change of `multiple` × the stated mde of `measure` (negative: forgetting) into
    the base's real per-item results `n_sims` times; the share of simulations whose paired 95%
    interval (paired_change) excludes 0, beside the power the formula states."""
    s = item_scores(base_items)
    if "margin" not in s:
        raise ConfigError("detection_rate needs multiple-choice per-item results (lls, gold)")
    stated = mde(base_items)
    if measure not in stated:
        raise ConfigError(f"no stated mde for {measure!r} (n={int(stated['n'])} items)")
    delta = -abs(multiple) * stated[measure]
    rng = np.random.default_rng(seed)
    hits, realised = 0, []
    for i in range(n_sims):
        bc, bm, c, m = inject(s["correct"], s["margin"], measure, delta, model, rng, noise)
        ch = paired_change(records(bc, bm), records(c, m), n_boot=n_boot, seed=seed + 1 + i)
        lo, hi = ch[f"{measure}_delta_lo"], ch[f"{measure}_delta_hi"]
        hits += int(lo > 0 or hi < 0)
        realised.append(ch[f"{measure}_delta"])
    rate = hits / n_sims
    half = Z95 * math.sqrt(max(rate * (1 - rate), 1e-12) / n_sims)
    return {"measure": measure, "model": model, "multiple": float(multiple),
            "delta": float(delta), "mde": float(stated[measure]), "n": int(stated["n"]),
            "n_sims": n_sims, "detected": rate, "detected_lo": max(0.0, rate - half),
            "detected_hi": min(1.0, rate + half), "realised_delta": float(np.mean(realised)),
            "stated_power": stated_power(delta, stated[measure])}


def power_table(base_items: Mapping[str, Sequence], multiples=(0.0, 0.5, 1.0, 1.43, 2.0),
                models=("independent", "flip"), measures=MEASURES, *, n_sims: int = 200,
                seed: int = 0, noise: np.ndarray | None = None) -> list[dict[str, Any]]:
    """detection_rate over sizes × models × measures (one task's base items)."""
    return [detection_rate(base_items, ms, k, md, n_sims=n_sims, seed=seed, noise=noise)
            for md in models for ms in measures for k in multiples]
