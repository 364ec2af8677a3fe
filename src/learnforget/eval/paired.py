"""Per-item results and paired statistics: a checkpoint against the base model on the same items.

Per-item results (`item_records`) are lm-eval's own per-sample log (`log_samples=True`)
reduced to what the statistics need, stored columnar in each result JSON under
`tasks.<name>.items`:

    doc_id    lm-eval's document index (into the task's evaluated split)
    correct   the item's primary metric (acc or acc_norm; exact_match for GSM8K), 0 or 1
    gold      index of the correct choice (multiple choice only)
    lls       log-likelihood of each choice's continuation (multiple choice only)
    lens      characters of each choice: lm-eval's acc_norm divides by these (tasks whose
              primary metric is acc_norm only; absent where the task does not normalise)

Per item, the continuous measures are `ll_gold` = the (length-normalised where the task
normalises: ll / characters, as lm-eval's acc_norm) log-likelihood of the correct choice and
`margin` = ll_gold minus the best wrong choice's (positive: the item is right). They move
before accuracy does: a checkpoint can lose confidence on every item without any item flipping.

`paired_change(base, ckpt)` on the items both share: the accuracy change with a paired
bootstrap percentile interval (items resampled, the same resample for base and checkpoint),
the items flipped right->wrong and wrong->right with McNemar's exact two-sided test (binomial
on the discordant pairs), and the mean change of ll_gold and of margin with intervals.
Minimum detectable change (MDE), stated at a named power: the smallest true change whose 95%
paired interval excludes 0 with that probability. 50% power is the point where the interval
JUST excludes 0 (the change equals the interval's half-width); 80% is the usual planning
figure. Paired, from the per-item differences d = checkpoint - base (`paired_mde`):

    margin, ll_gold   (z + z_power) * sd(d) / sqrt(n)                               (`mde_shift`)
    accuracy          items flip both ways at a background rate ("churn", c: right->wrong at
                      c/2 + δ, wrong->right at c/2), so var(d) = c + δ - δ² (= p_rw + p_wr -
                      (p_rw - p_wr)²) and the MDE solves δ = k * sqrt((c + δ - δ²) / n),
                      k = z + z_power:  δ = (k² + sqrt(k⁴ + 4 (n + k²) k² c)) / (2 (n + k²))
                                                                                    (`mde_flips`)

z = 1.96, z_power = 0 at 50% and 0.84 at 80% (the other tail, Φ(-δ/SE - z), is ignored: it is
below 1e-5 at these sizes). Post hoc (`paired_mde`), c is the observed symmetric part of the
flips, 2 * min(right->wrong, wrong->right) / n, and sd(d) the observed sd of the differences;
then |observed change| > the 50% MDE exactly when the normal-approximation interval excludes 0.
Before a checkpoint exists, c (or sd(d)) is an assumption: measure it on a comparable pair (a
seed-noise pair, or a control run: `learnforget controls forgetting` prints each checkpoint's
churn), or take the conservative bound `unpaired_mde`: a checkpoint as unrelated to the base as
a fresh draw of items (c = 2p(1 - p), sd(d) = sqrt(2) * s), z * sqrt(2) * s / sqrt(n) at 50%
power, which is what this harness printed as "the minimum detectable change" until 2026-12-07.
Real checkpoints flip far fewer items than that bound assumes: on the forgetting control
(docs/controls.md, 500 items per task, t = 0.5..8) the paired 50% MDE is 1.3-5x smaller for
accuracy and 2-38x smaller for margins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learnforget.errors import ConfigError

Z95 = 1.959963984540054  # two-sided 95% normal quantile
Z80 = 0.8416212335729143  # one-sided 80% normal quantile: 80% power
POWERS = (0.5, 0.8)  # the powers the harness states MDEs at
N_BOOT = 2000


# ------------------------------------------------------------------ per-item records

def _choice_chars(continuation: str) -> int:
    """Characters of the choice behind an lm-eval continuation (target_delimiter " " + choice)."""
    return len(continuation) - 1 if continuation.startswith(" ") else len(continuation)


def item_records(samples: Sequence[Mapping[str, Any]], metric: str,
                 normalised: bool) -> dict[str, list]:
    """lm-eval's per-sample log of one task -> columnar per-item records (module doc).
    `metric`: the primary metric's lm-eval name without the filter ("acc_norm", "acc",
    "exact_match"); `normalised`: whether the task's primary metric divides by length."""
    out: dict[str, list] = {"doc_id": [], "correct": []}
    rows = sorted(samples, key=lambda s: int(s["doc_id"]))
    mc = bool(rows) and all(_is_mc(s) for s in rows)
    if mc:
        out.update(gold=[], lls=[])
        if normalised:
            out["lens"] = []
    for s in rows:
        if metric not in s:
            raise ConfigError(f"per-item log has no metric {metric!r} (has {sorted(s)})")
        out["doc_id"].append(int(s["doc_id"]))
        out["correct"].append(float(s[metric]))
        if mc:
            out["gold"].append(_gold(s))
            out["lls"].append([float(r[0]) for r in s["filtered_resps"]])
            if normalised:
                out["lens"].append([_choice_chars(str(a[1])) for a in s["arguments"]])
    return out


def _gold(sample: Mapping[str, Any]) -> int:
    """The correct choice's index: lm-eval's target; for tasks whose choices are contexts
    (winogrande: the target is the shared continuation) the doc's 1-based `answer`."""
    try:
        return int(sample["target"])
    except (TypeError, ValueError):
        doc = sample.get("doc") or {}
        if "answer" in doc:
            return int(doc["answer"]) - 1
        raise ConfigError(f"per-item log: cannot tell the gold choice of document "
                          f"{sample.get('doc_id')} (target {sample.get('target')!r})") from None


def _is_mc(sample: Mapping[str, Any]) -> bool:
    resps = sample.get("filtered_resps") or []
    return bool(resps) and all(isinstance(r, (list, tuple)) and len(r) == 2
                               and isinstance(r[1], bool) for r in resps)


def item_scores(items: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """Per-item arrays: doc_id, correct, and for multiple choice ll_gold and margin."""
    out = {"doc_id": np.asarray(items["doc_id"], dtype=np.int64),
           "correct": np.asarray(items["correct"], dtype=np.float64)}
    if "lls" not in items:
        return out
    gold_ll, margin = [], []
    lens = items.get("lens")
    for i, (lls, gold) in enumerate(zip(items["lls"], items["gold"], strict=True)):
        v = np.asarray(lls, dtype=np.float64)
        if lens is not None:
            v = v / np.asarray(lens[i], dtype=np.float64)
        wrong = np.delete(v, gold)
        gold_ll.append(v[gold])
        margin.append(v[gold] - wrong.max() if wrong.size else math.nan)
    out["ll_gold"] = np.asarray(gold_ll)
    out["margin"] = np.asarray(margin)
    return out


# ------------------------------------------------------------------ statistics

def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """McNemar's exact two-sided p: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2),
    capped at 1; 1.0 without discordant pairs."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    from scipy.stats import binom

    return float(min(1.0, 2.0 * binom.cdf(min(right_to_wrong, wrong_to_right), n, 0.5)))


def _aligned(base: Mapping[str, Sequence], ckpt: Mapping[str, Sequence]):
    b, c = item_scores(base), item_scores(ckpt)
    common, ib, ic = np.intersect1d(b["doc_id"], c["doc_id"], return_indices=True)
    if common.size == 0:
        raise ConfigError("paired comparison: the checkpoint and the base share no items "
                          "(score both on the same fixed subset)")
    return ({k: v[ib] for k, v in b.items()}, {k: v[ic] for k, v in c.items()}, common.size)


def bootstrap_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) item indices drawn with replacement (one paired resample per row)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(diff: np.ndarray, idx: np.ndarray, ci: float) -> tuple[float, float, np.ndarray]:
    boots = diff[idx].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(lo), float(hi), boots


def paired_change(base: Mapping[str, Sequence], ckpt: Mapping[str, Sequence], *,
                  n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95,
                  keep_boots: bool = False) -> dict[str, Any]:
    """The checkpoint's change against the base on the items both were scored on (module doc).
    Keys: n, acc_base, acc, acc_delta, acc_delta_lo/hi, right_to_wrong, wrong_to_right,
    mcnemar_p; multiple choice also ll_gold_delta, margin_delta (each with _lo/_hi).
    keep_boots: also the bootstrap means per measure under "_boots" (for pooling tasks)."""
    b, c, n = _aligned(base, ckpt)
    idx = bootstrap_indices(n, n_boot, seed)
    out: dict[str, Any] = {"n": int(n), "acc_base": float(b["correct"].mean()),
                           "acc": float(c["correct"].mean())}
    boots: dict[str, np.ndarray] = {}
    measures = [("acc", "correct")] + [(m, m) for m in ("ll_gold", "margin") if m in b and m in c]
    for name, key in measures:
        diff = c[key] - b[key]
        lo, hi, boots[name] = _interval(diff, idx, ci)
        out[f"{name}_delta"] = float(diff.mean())
        out[f"{name}_delta_lo"], out[f"{name}_delta_hi"] = lo, hi
    b_right, c_right = b["correct"] > 0.5, c["correct"] > 0.5
    out["right_to_wrong"] = int(np.sum(b_right & ~c_right))
    out["wrong_to_right"] = int(np.sum(~b_right & c_right))
    out["mcnemar_p"] = mcnemar_exact(out["right_to_wrong"], out["wrong_to_right"])
    if keep_boots:
        out["_boots"] = boots
    return out


def pooled_change(changes: Sequence[Mapping[str, Any]], ci: float = 0.95) -> dict[str, Any]:
    """The mean over tasks of each measure's change, with an interval from the mean of the
    tasks' bootstrap means (tasks resampled independently; paired_change(keep_boots=True))."""
    out: dict[str, Any] = {"tasks": len(changes)}
    if not changes:
        return out
    alpha = (1.0 - ci) / 2.0
    for name in ("acc", "ll_gold", "margin"):
        if not all(name in ch["_boots"] for ch in changes):
            continue
        boots = np.mean([ch["_boots"][name] for ch in changes], axis=0)
        out[f"{name}_delta"] = float(np.mean([ch[f"{name}_delta"] for ch in changes]))
        lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
        out[f"{name}_delta_lo"], out[f"{name}_delta_hi"] = float(lo), float(hi)
    out["right_to_wrong"] = int(sum(ch["right_to_wrong"] for ch in changes))
    out["wrong_to_right"] = int(sum(ch["wrong_to_right"] for ch in changes))
    return out


def unpaired_mde(items: Mapping[str, Sequence], z: float = Z95) -> dict[str, float]:
    """The conservative MDE before any checkpoint exists (module doc): per measure
    z * sqrt(2) * s / sqrt(n), s the base's per-item standard deviation (ddof 1): 50% power
    if the checkpoint's item errors were independent of the base's."""
    s = item_scores(items)
    n = int(s["correct"].size)
    out: dict[str, float] = {"n": float(n)}
    if n < 2:
        return out
    for name, key in (("acc", "correct"), ("ll_gold", "ll_gold"), ("margin", "margin")):
        if key in s:
            out[name] = float(z * math.sqrt(2.0) * np.std(s[key], ddof=1) / math.sqrt(n))
    return out


def _k(power: float, z: float) -> float:
    if not 0.0 < power < 1.0:
        raise ConfigError(f"power must be in (0, 1), got {power!r}")
    from scipy.stats import norm

    return z + float(norm.ppf(power))


def mde_flips(n: int, churn: float, power: float = 0.8, z: float = Z95) -> float:
    """Paired MDE of an accuracy change over n items at `power`, items flipping both ways at
    the background rate `churn` (module doc)."""
    if n < 1 or not 0.0 <= churn <= 1.0:
        raise ConfigError(f"mde_flips: expected n >= 1 and churn in [0, 1], got n={n!r}, "
                          f"churn={churn!r}")
    k2 = _k(power, z) ** 2
    return float((k2 + math.sqrt(k2 * k2 + 4.0 * (n + k2) * k2 * churn)) / (2.0 * (n + k2)))


def mde_shift(n: int, sd_diff: float, power: float = 0.8, z: float = Z95) -> float:
    """Paired MDE of a mean change over n items whose per-item differences have sd `sd_diff`."""
    if n < 1 or sd_diff < 0:
        raise ConfigError(f"mde_shift: expected n >= 1 and sd_diff >= 0, got n={n!r}, "
                          f"sd_diff={sd_diff!r}")
    return float(_k(power, z) * sd_diff / math.sqrt(n))


def power_at(delta: float, se: float, z: float = Z95) -> float:
    """Probability that the 95% interval of a normal estimate with standard error `se`
    excludes 0 when the true change is `delta`: Φ(|δ|/se - z) + Φ(-|δ|/se - z)."""
    from scipy.stats import norm

    if se <= 0:
        return 1.0 if delta else float(2 * norm.cdf(-z))
    d = abs(delta) / se
    return float(norm.cdf(d - z) + norm.cdf(-d - z))


def flips_se(n: int, churn: float, delta: float) -> float:
    """Standard error of a paired accuracy change `delta` at background churn (module doc)."""
    return math.sqrt(max(churn + abs(delta) - delta * delta, 0.0) / n)


def paired_mde(base: Mapping[str, Sequence], ckpt: Mapping[str, Sequence],
               powers: Sequence[float] = POWERS) -> dict[str, float]:
    """Post-hoc paired MDE of a checkpoint against the base (module doc): n, churn (the
    symmetric part of the flips), sd_<measure> of the per-item differences and
    <measure>_<power%> (acc_50, acc_80, margin_80, ...) for acc, ll_gold and margin."""
    b, c, n = _aligned(base, ckpt)
    rw = int(np.sum((b["correct"] > 0.5) & (c["correct"] <= 0.5)))
    wr = int(np.sum((b["correct"] <= 0.5) & (c["correct"] > 0.5)))
    out: dict[str, float] = {"n": float(n), "churn": 2.0 * min(rw, wr) / n}
    for p in powers:
        out[f"acc_{round(100 * p)}"] = mde_flips(n, out["churn"], p)
    for m in ("ll_gold", "margin"):
        if m in b and m in c and n > 1:
            out[f"sd_{m}"] = float(np.std(c[m] - b[m], ddof=1))
            for p in powers:
                out[f"{m}_{round(100 * p)}"] = mde_shift(n, out[f"sd_{m}"], p)
    return out


def subset_indices(n_docs: int, size: int | None, seed: int) -> list[int] | None:
    """A fixed seeded subset of `size` document indices out of `n_docs`, sorted (lm-eval's
    `samples=`); None (every document) when size is None or >= n_docs."""
    if size is None or int(size) >= n_docs:
        return None
    if int(size) < 1:
        raise ConfigError(f"subset size must be >= 1, got {size}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_docs, size=int(size), replace=False))
