"""Forgetting at matched learning, and learning at matched forgetting, as numbers.

The paper reads "LoRA learns less and forgets less" off a Pareto plot. Here each run's
checkpoints, in token order and starting at the base model (tokens 0), form a trajectory in
the (learning, forgetting) plane. For two methods A and B:

    forgetting at matched learning: on the overlap [lo, hi] of the learning values both
        trajectories reach, at `n_levels` evenly spaced levels (hi - lo) * i / n away from
        the end where the paths start (i = 1..n), each run's forgetting is read off the trajectory by linear interpolation
        where its learning first reaches the level; the difference A - B is averaged over the
        levels. Runs are paired by seed (every A run with every B run when no seed is shared);
        the table gives the mean over the pairs and a 95% t interval (none with one pair).
    learning at matched forgetting: the same with the two axes swapped.

Units are the columns' own: with a cross-entropy column lower is better, with a score higher.

    df = collect(Path("runs"));  table = matched_table(df, "ce/target_heldout", "drift_kl")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learnforget.errors import ConfigError

N_LEVELS = 8


def level_at(xs: Sequence[float], ys: Sequence[float], level: float) -> float:
    """y where the piecewise-linear path (xs[i], ys[i]), in order, first reaches x = level;
    NaN when it never does."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"xs and ys must be 1-D of one length, got {x.shape} and {y.shape}")
    for i in range(x.size):
        if x[i] == level:
            return float(y[i])
        if i and (x[i - 1] - level) * (x[i] - level) < 0:
            t = (level - x[i - 1]) / (x[i] - x[i - 1])
            return float(y[i - 1] + t * (y[i] - y[i - 1]))
    return float("nan")


def overlap(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """[lo, hi] of the values both paths reach (None when they do not overlap)."""
    lo = max(float(np.nanmin(a)), float(np.nanmin(b)))
    hi = min(float(np.nanmax(a)), float(np.nanmax(b)))
    return (lo, hi) if hi > lo else None


def matched_difference(a: tuple[Sequence[float], Sequence[float]],
                       b: tuple[Sequence[float], Sequence[float]],
                       n_levels: int = N_LEVELS) -> dict[str, Any] | None:
    """Mean over levels of y_A - y_B at matched x, for two trajectories (xs, ys) in order.

    The levels step from the end of the overlap [lo, hi] of the x ranges nearer to the paths'
    start towards the other: (hi - lo) * i / n_levels away from it, i = 1..n_levels (the
    start itself is left out: both paths are equal there when they begin at the base model).
    None when the ranges do not overlap."""
    if n_levels < 1:
        raise ConfigError(f"n_levels must be a positive integer, got {n_levels!r}")
    ov = overlap(a[0], b[0])
    if ov is None:
        return None
    lo, hi = ov
    steps = (hi - lo) * np.arange(1, n_levels + 1) / n_levels
    start = (float(a[0][0]) + float(b[0][0])) / 2  # where the paths begin (the base model)
    levels = hi - steps if abs(start - hi) < abs(start - lo) else lo + steps
    # the last level is the overlap's far end, which one path ends on exactly: rounding in
    # hi - (hi - lo) could put it an ulp beyond that path's end, where it has no value
    levels = np.clip(levels, lo, hi)
    ya = np.array([level_at(a[0], a[1], v) for v in levels])
    yb = np.array([level_at(b[0], b[1], v) for v in levels])
    return {"lo": lo, "hi": hi, "levels": levels, "y_a": ya, "y_b": yb,
            "diff": float(np.mean(ya - yb))}


def trajectories(df: pd.DataFrame, x: str, y: str, group: str = "method_summary"
                 ) -> dict[str, dict[Any, tuple[np.ndarray, np.ndarray]]]:
    """{method: {seed: (x path, y path)}}: each run's checkpoints in token order, the base
    model's row (checkpoint "base", tokens 0) first."""
    for c in (x, y, group):
        if c not in df.columns:
            raise ConfigError(f"column {c!r} is not in the runs table (columns: "
                              f"{', '.join(map(str, df.columns))})")
    out: dict[str, dict[Any, tuple[np.ndarray, np.ndarray]]] = {}
    base = df[df["checkpoint"] == "base"]
    for (method, run), g in df[df["checkpoint"] != "base"].groupby([group, "run"], sort=True):
        own_base = base[base["run"] == run]
        g = pd.concat([own_base.head(1), g.sort_values(["tokens", "step"])])
        g = g[g[x].notna() & g[y].notna()]
        if len(g) < 2:
            continue
        seed = g["seed"].iloc[-1] if "seed" in g.columns else run
        seed = run if seed is None or (isinstance(seed, float) and math.isnan(seed)) else seed
        out.setdefault(str(method), {})[seed] = (g[x].to_numpy(float), g[y].to_numpy(float))
    return out


def _interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t interval; low = high = mean with one value."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if v.size < 2:
        return mean, mean, mean
    from scipy import stats

    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def _pairs(sa: dict, sb: dict) -> list[tuple[Any, Any]]:
    shared = sorted(set(sa) & set(sb), key=str)
    if shared:
        return [(s, s) for s in shared]
    return [(i, j) for i in sorted(sa, key=str) for j in sorted(sb, key=str)]


def matched_table(df: pd.DataFrame, learning: str, forgetting: str, *,
                  n_levels: int = N_LEVELS, group: str = "method_summary") -> pd.DataFrame:
    """One row per pair of methods and direction ("forgetting at matched learning",
    "learning at matched forgetting"): mean difference A - B over seed pairs, 95% interval,
    the number of pairs and the matched range (mean over pairs)."""
    trajs = trajectories(df, learning, forgetting, group)
    rows: list[dict[str, Any]] = []
    for ma, mb in combinations(sorted(trajs), 2):
        for what, swap in (("forgetting at matched learning", False),
                           ("learning at matched forgetting", True)):
            diffs, los, his = [], [], []
            for sa, sb in _pairs(trajs[ma], trajs[mb]):
                xa, ya = trajs[ma][sa]
                xb, yb = trajs[mb][sb]
                a, b = ((ya, xa), (yb, xb)) if swap else ((xa, ya), (xb, yb))
                res = matched_difference(a, b, n_levels)
                if res is None:
                    continue
                diffs.append(res["diff"])
                los.append(res["lo"])
                his.append(res["hi"])
            row = {"quantity": what, "method_a": ma, "method_b": mb,
                   "matched_on": forgetting if swap else learning,
                   "measured": learning if swap else forgetting, "pairs": len(diffs)}
            if diffs:
                mean, low, high = _interval(diffs)
                row.update(diff_a_minus_b=mean, ci95_low=low, ci95_high=high,
                           range_lo=float(np.mean(los)), range_hi=float(np.mean(his)))
            rows.append(row)
    return pd.DataFrame(rows)


def format_table(t: pd.DataFrame) -> str:
    """Markdown: one line per pair and direction."""
    head = ("| quantity | A | B | matched on (range) | measured | A - B (95% CI) | pairs |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for _, r in t.iterrows():
        if r["pairs"]:
            ci = ("" if r["pairs"] < 2 else
                  f" [{r['ci95_low']:.4f}, {r['ci95_high']:.4f}]")
            val = f"{r['diff_a_minus_b']:+.4f}{ci}"
            rng = f"{r['matched_on']} ({r['range_lo']:.4f}..{r['range_hi']:.4f})"
        else:
            val, rng = "no overlap", str(r["matched_on"])
        lines.append(f"| {r['quantity']} | {r['method_a']} | {r['method_b']} | {rng} | "
                     f"{r['measured']} | {val} | {r['pairs']} |")
    return "\n".join(lines)


def plot_matched(t: pd.DataFrame, out_dir: Path, stem: str = "matched_learning") -> list[Path]:
    """Horizontal bars: A - B per pair, one panel per direction, 95% intervals as whiskers."""
    from learnforget.analysis.figures import _save, plt

    t = t[t["pairs"] > 0]
    if not len(t):
        raise ConfigError("no pair of methods has overlapping trajectories to match")
    quantities = list(dict.fromkeys(t["quantity"]))
    fig, axes = plt.subplots(1, len(quantities), figsize=(6 * len(quantities), 0.6 * len(t) + 2),
                             squeeze=False)
    for ax, q in zip(axes[0], quantities, strict=True):
        part = t[t["quantity"] == q].reset_index(drop=True)
        ys = np.arange(len(part))
        mean = part["diff_a_minus_b"].to_numpy(float)
        err = np.vstack([mean - part["ci95_low"].to_numpy(float),
                         part["ci95_high"].to_numpy(float) - mean])
        ax.barh(ys, mean, xerr=err, color="tab:blue", alpha=0.7, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(ys, [f"{a} - {b}" for a, b in zip(part["method_a"], part["method_b"],
                                                       strict=True)])
        ax.set_xlabel(f"{part['measured'].iloc[0]}: A - B at matched "
                      f"{part['matched_on'].iloc[0]}")
        ax.set_title(q)
    return _save(fig, out_dir, stem)


def write_matched(df: pd.DataFrame, out_dir: Path, learning: str, forgetting: str, *,
                  n_levels: int = N_LEVELS, stem: str = "matched_learning",
                  group: str = "method_summary") -> tuple[pd.DataFrame, list[Path]]:
    """The table as <stem>.csv and <stem>.md, and the figure; returns (table, paths)."""
    from learnforget.analysis.collect import save_table
    from learnforget.files import atomic_open

    t = matched_table(df, learning, forgetting, n_levels=n_levels, group=group)
    paths = save_table(t, out_dir, stem=stem)[:1]
    md = Path(out_dir) / f"{stem}.md"
    with atomic_open(md, "w") as f:
        f.write(f"# Matched learning: {forgetting} vs {learning}, {n_levels} levels, "
                "mean over seed pairs with a 95% t interval\n\n" + format_table(t) + "\n")
    paths.append(md)
    if len(t) and (t["pairs"] > 0).any():
        paths += plot_matched(t, out_dir, stem)
    return t, paths
