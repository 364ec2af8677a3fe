"""The regime study's figures (learnforget.analysis.regime): learning and forgetting against
tokens, and the Pareto plane (code CE against each forgetting measure), every point with its
95% interval: the percentile bootstrap over the evaluation's units of the change from the base,
paired unit by unit.

    plot_regime(load_runs(root), out, FORGETTING)  # regime_vs_tokens.{png,svg}, regime_pareto.{png,svg}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from learnforget.analysis.figures import _save, plt

N_BOOT = 1000
LABELS = {"code_ce": ("held-out target CE change (learning: lower)", 1.0)}


def _change(point: tuple, base: tuple, sign: float, idx: np.ndarray) -> tuple[float, float, float]:
    """sign x (point - base), weighted over units, with a paired bootstrap interval."""
    v, w = sign * (point[0] - base[0]), point[1]
    boots = (v[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float((v * w).sum() / w.sum()), float(lo), float(hi)


def _series(run: dict[str, Any], measure: str, sign: float, rng) -> np.ndarray:
    """(tokens, value, lo, hi) rows from the base (all 0) through the budgets."""
    base = run["base"][measure]
    idx = rng.integers(0, base[0].size, (N_BOOT, base[0].size))
    rows = [(0, 0.0, 0.0, 0.0)]
    for t in sorted(run["units"]):
        if measure in run["units"][t]:
            rows.append((t, *_change(run["units"][t][measure], base, sign, idx)))
    return np.asarray(rows, float)


def _measures(runs: list[dict[str, Any]], forgetting: dict[str, tuple[str, float]]
              ) -> list[tuple[str, str, float]]:
    got = [("code_ce", *LABELS["code_ce"])]
    got += [(m, f"{label} (forgetting: higher)", s) for m, (label, s) in forgetting.items()
            if all(m in r["base"] for r in runs)]
    return got


def _marker(seed: Any) -> str:
    try:
        return "osD^v"[int(seed) % 5]
    except (TypeError, ValueError):
        return "x"


def plot_regime(runs: list[dict[str, Any]], out: Path,
                forgetting: dict[str, tuple[str, float]]) -> list[Path]:
    """Both figures; one colour per method, one marker per seed. `forgetting`: measure ->
    (label, sign) as learnforget.analysis.regime.FORGETTING."""
    if not runs:
        return []
    rng = np.random.default_rng(0)
    measures = _measures(runs, forgetting)
    methods = sorted({r["summary"] for r in runs})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    paths: list[Path] = []

    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.6), squeeze=False)
    series: dict[tuple[str, Any, str], np.ndarray] = {}
    for ax, (m, label, sign) in zip(axes[0], measures, strict=True):
        for r in runs:
            s = _series(r, m, sign, rng)
            series[(r["summary"], r["seed"], m)] = s
            mk = _marker(r["seed"])
            ax.errorbar(s[:, 0], s[:, 1], yerr=[s[:, 1] - s[:, 2], s[:, 3] - s[:, 1]],
                        color=colours[r["summary"]], marker=mk, ms=4, capsize=2, lw=1,
                        label=f"{r['summary']} s{r['seed']}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("symlog", linthresh=min(t for r in runs for t in r["units"]))
        ax.set_xlabel("tokens")
        ax.set_title(label, fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Learning and forgetting vs tokens (change from the base, 95% paired bootstrap)",
                 fontsize=9, y=1.04)
    paths += _save(fig, out, "regime_vs_tokens")

    forget = measures[1:]
    if forget:
        fig, axes = plt.subplots(1, len(forget), figsize=(4.2 * len(forget), 3.8), squeeze=False)
        for ax, (m, label, _) in zip(axes[0], forget, strict=True):
            for r in runs:
                x, y = series[(r["summary"], r["seed"], "code_ce")], series[(r["summary"], r["seed"], m)]
                mk = _marker(r["seed"])
                ax.errorbar(x[:, 1], y[:, 1], xerr=[x[:, 1] - x[:, 2], x[:, 3] - x[:, 1]],
                            yerr=[y[:, 1] - y[:, 2], y[:, 3] - y[:, 1]],
                            color=colours[r["summary"]], marker=mk, ms=4, capsize=2, lw=1,
                            label=f"{r['summary']} s{r['seed']}")
            ax.axhline(0, color="k", lw=0.6)
            ax.axvline(0, color="k", lw=0.6)
            ax.set_xlabel("target CE change from base (more learning: left)")
            ax.set_ylabel(label, fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Pareto: forgetting against learning, every budget (95% paired bootstrap)",
                     fontsize=9, y=1.04)
        paths += _save(fig, out, "regime_pareto")
    return paths
