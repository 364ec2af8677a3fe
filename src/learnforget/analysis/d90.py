"""d90: the smallest intrinsic dimension d whose SAID/DID run reaches 90% of full finetuning's
score on the same task (Li et al. 2018; Aghajanyan et al. 2020), per projection seed, beside the
smallest LoRA parameter count that reaches the same score.

Design (sweeps/said_d90.yaml): SAID at d on a log grid x several projection seeds, full
finetuning as the reference, LoRA at a few ranks, one checkpoint each. Then:

1. threshold: higher-is-better scores (accuracy): 0.9 x the full-finetuning score, as the
   papers; lower-is-better scores (cross-entropy): the base score minus 0.9 x full
   finetuning's gain, base - 0.9 (base - full) (a loss has no natural zero; stated in the
   table's `threshold_rule`);
2. per seed, the grid bracket [d_lo, d_hi]: d_lo the largest grid d below the threshold, d_hi
   the smallest d at or above it (scores are not assumed monotone in d: d_hi is the first
   passing d and d_lo the largest failing one below it); d90 estimate: log-linear
   interpolation of the score between them;
3. bisection: the next d to run is the geometric midpoint sqrt(d_lo d_hi) (rounded), a
   follow-up `learnforget sweep said_d90 method.d=...` per seed, until d_hi / d_lo is small
   enough (`bisect_ratio`, default 1.25);
4. LoRA's matched count: the fewest trainable parameters among LoRA runs at or above the
   threshold.

The functions take a plain table (one row per run at its scored checkpoint): method, d,
projection_seed, trainable_params and the score column; `intrinsic_settings` adds d and
projection_seed to a `learnforget.analysis.collect` table from each run's run.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from learnforget.errors import ConfigError

FRACTION = 0.9


def threshold(full: float, base: float | None = None, *, higher_is_better: bool = True,
              fraction: float = FRACTION) -> float:
    """The score a run must reach: fraction x full (higher is better), or
    base - fraction (base - full) (lower is better: a fraction of the gain)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"d90 fraction must be in (0, 1], got {fraction!r}")
    if higher_is_better:
        return fraction * full
    if base is None:
        raise ConfigError("d90 on a lower-is-better score needs the base model's score (the "
                          "threshold is base - 0.9 x (base - full))")
    return base - fraction * (base - full)


def _passes(score: float, thr: float, higher_is_better: bool) -> bool:
    return score >= thr if higher_is_better else score <= thr


def bracket(points: dict[int, float], thr: float, higher_is_better: bool = True
            ) -> tuple[int | None, int | None]:
    """(d_lo, d_hi): d_hi the smallest d that passes, d_lo the largest failing d below it
    (None where there is none: every d passes, or none does)."""
    ds = sorted(points)
    d_hi = next((d for d in ds if _passes(points[d], thr, higher_is_better)), None)
    below = [d for d in ds if (d_hi is None or d < d_hi)
             and not _passes(points[d], thr, higher_is_better)]
    return (below[-1] if below else None), d_hi


def interpolate(d_lo: int, s_lo: float, d_hi: int, s_hi: float, thr: float) -> float:
    """The d where the score, linear in log d between the two points, meets the threshold."""
    if s_hi == s_lo:
        return float(d_hi)
    t = (thr - s_lo) / (s_hi - s_lo)
    t = min(max(t, 0.0), 1.0)
    return math.exp(math.log(d_lo) + t * (math.log(d_hi) - math.log(d_lo)))


def next_d(d_lo: int, d_hi: int) -> int | None:
    """The bisection's next d: the geometric midpoint, None when no integer lies between."""
    mid = round(math.sqrt(d_lo * d_hi))
    return mid if d_lo < mid < d_hi else None


def _flag(method: Any, flag: str) -> bool:
    """The registered method's flag (learnforget.methods.base.Method): reference (full
    finetuning), lora_adapter, intrinsic (SAID/DID)."""
    from learnforget.methods.registry import family

    return isinstance(method, str) and bool(getattr(family(method), flag, False))


def d90_table(runs: pd.DataFrame, score: str, *, full_score: float,
              base_score: float | None = None, higher_is_better: bool = True,
              fraction: float = FRACTION, bisect_ratio: float = 1.25) -> pd.DataFrame:
    """One row per (method, projection seed) of the SAID/DID runs: grid bracket, d90 estimate,
    next d to run (bisection) or None when d_hi / d_lo <= bisect_ratio, and LoRA's matched
    parameter count (the same for every row)."""
    need = {"method", "d", "projection_seed", "trainable_params", score}
    missing = need - set(runs.columns)
    if missing:
        raise ConfigError(f"d90 table: columns {sorted(missing)} are missing (expected "
                          f"{sorted(need)})")
    thr = threshold(full_score, base_score, higher_is_better=higher_is_better, fraction=fraction)
    lora = runs[[_flag(m, "lora_adapter") for m in runs["method"]]]
    lora_ok = lora[[_passes(s, thr, higher_is_better) for s in lora[score]]]
    lora_count = int(lora_ok["trainable_params"].min()) if len(lora_ok) else None
    rows: list[dict[str, Any]] = []
    intrinsic = runs[[_flag(m, "intrinsic") for m in runs["method"]]]
    for (method, seed), group in intrinsic.groupby(["method", "projection_seed"], sort=True):
        points = {int(d): float(s) for d, s in zip(group["d"], group[score], strict=True)}
        d_lo, d_hi = bracket(points, thr, higher_is_better)
        est = nxt = None
        if d_lo is not None and d_hi is not None:
            est = interpolate(d_lo, points[d_lo], d_hi, points[d_hi], thr)
            nxt = next_d(d_lo, d_hi) if d_hi / d_lo > bisect_ratio else None
        trainable = group.set_index("d")["trainable_params"]
        rows.append({"method": method, "projection_seed": int(seed), "grid": sorted(points),
                     "d_lo": d_lo, "d_hi": d_hi, "d90_estimate": est, "next_d": nxt,
                     "trainable_at_d_hi": int(trainable[d_hi]) if d_hi is not None else None,
                     "threshold": thr, "threshold_rule": (
                         f"{fraction} x full" if higher_is_better
                         else f"base - {fraction} x (base - full)"),
                     "lora_matched_params": lora_count})
    return pd.DataFrame(rows)


def intrinsic_settings(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of a collect() table with columns d and projection_seed read from each run's
    run.json (method settings; None for other methods)."""
    out = table.copy()
    ds, seeds = [], []
    for run_dir in out["run_dir"]:
        info = json.loads((Path(run_dir) / "run.json").read_text()) if run_dir else {}
        ms = (info.get("run") or {}).get("method_settings") or {}
        ds.append(ms.get("d"))
        seeds.append(ms.get("projection_seed"))
    out["d"], out["projection_seed"] = ds, seeds
    return out


def d90_from_table(table: pd.DataFrame, score: str = "target_ce", *,
                   higher_is_better: bool | None = None, **kwargs: Any) -> pd.DataFrame:
    """d90_table of a collect() table with d and projection_seed (intrinsic_settings): each
    run's last checkpoint, full finetuning's score (the mean over its runs) and the base
    model's (checkpoint "base"). `higher_is_better` None: from the column's name."""
    from learnforget.analysis.collect import lower_is_better

    if higher_is_better is None:
        higher_is_better = not lower_is_better(score)
    trained = table[table["checkpoint"] != "base"].copy()
    trained["_step"] = trained["step"].fillna(0)
    last = trained.sort_values("_step").groupby("run", sort=False).tail(1)
    full = last[[_flag(m, "reference") for m in last["method"]]]
    if full.empty:
        raise ConfigError("d90: no full-finetuning run in the table (the reference)")
    base = table[table["checkpoint"] == "base"][score]
    return d90_table(last, score, full_score=float(full[score].mean()),
                     base_score=float(base.mean()) if len(base) else None,
                     higher_is_better=higher_is_better, **kwargs)


def d90_from_runs(root: Path, score: str = "target_ce", **kwargs: Any) -> pd.DataFrame:
    """The d90 table of every run under `root` (a said_d90 study's runs folder)."""
    from learnforget.analysis.collect import collect

    return d90_from_table(intrinsic_settings(collect(Path(root), verbose=False)), score, **kwargs)
