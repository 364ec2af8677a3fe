"""The paper's figures from the collected table and the stored spectra (matplotlib, Agg).

Every function writes <stem>.png and <stem>.svg into `out_dir` and returns both paths.

    plot_learning_forgetting   learning vs forgetting per method, Pareto front   (fig. 1, 4)
    plot_vs_tokens             learning and forgetting against training tokens
    plot_rank_heatmap          rank for 90% of the variance, layer x module     (fig. 6, S7)
    plot_spectra_curves        singular values of ΔW per checkpoint, one layer
    plot_rank_vs_tokens        rank for 90% of ΔW against training tokens
    plot_random_matrices       Gaussian A, A + cB, cB                           (fig. S8)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import LogFormatter, NullFormatter  # noqa: E402

from learnforget.analysis.collect import lower_is_better, pareto_front  # noqa: E402
from learnforget.errors import ConfigError  # noqa: E402
from learnforget.methods.registry import family  # noqa: E402

LABELS = {
    "target_score": "Learning: target-domain score\n(accuracy, fraction)",
    "target_score_chance_corrected": "Learning: target score,\nchance-corrected (fraction)",
    "target_ce": "Learning: target-domain cross-entropy\n(nats/token, lower = better)",
    "delta/target_score": "Learning: target score gain over base\n(fraction)",
    "forgetting_score": "Forgetting: general-task score (mean\naccuracy, fraction; higher = less forgetting)",
    "forgetting_score_chance_corrected": "Forgetting: general-task score, chance-\ncorrected "
                                         "(higher = less forgetting)",
    "forgetting_ce": "Forgetting: general-text cross-entropy\n(nats/token; lower = less forgetting)",
    "delta/forgetting_score": "Forgetting: change of general-task score\nvs base (fraction)",
    "delta/forgetting_ce": "Forgetting: rise of general-text cross-\nentropy vs base (nats/token)",
    "paired_forgetting_acc_delta": "Forgetting: paired accuracy change vs base\n(same items; "
                                   "fraction; higher = less forgetting)",
    "paired_forgetting_margin_delta": "Forgetting: paired change of the correct choice's\n"
                                      "margin (nats; higher = less forgetting)",
    "paired_forgetting_ll_gold_delta": "Forgetting: paired change of the correct choice's\n"
                                       "log-likelihood (nats; higher = less forgetting)",
    "drift_kl": "Forgetting: drift from the base model,\nKL(base || ckpt) (nats/token; lower = less)",
}
METHOD_ORDER = ("full", "lora", "qlora", "dora", "vera", "loha", "ia3", "topk", "bitfit", "adapter",
                "prefix", "prompt")
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_key(module_type: str) -> tuple:
    """Llama's modules in the paper's order (attention, then MLP); others after, by name."""
    return (MODULE_ORDER.index(module_type) if module_type in MODULE_ORDER
            else len(MODULE_ORDER), module_type)


def label_for(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def learning_column(df: pd.DataFrame, x: str | None = None) -> str:
    """`x` if given; else target_score, or target_ce (the run's own held-out loss, lower =
    more learning) when target_score is missing or the same in every row (a benchmark the
    model never passes, such as HumanEval at 0 for a small model, orders nothing)."""
    if x:
        return x
    present = [c for c in ("target_score", "target_ce")
               if c in df.columns and df[c].notna().any()]
    for c in present:
        if df[c].nunique(dropna=True) > 1:
            return c
    if present:
        return present[0]
    raise ConfigError("no learning measure in the table (neither target_score nor target_ce "
                      "has a value): evaluate the runs with a suite that has target tasks or "
                      "the run's held-out cross-entropy")


def forgetting_column(df: pd.DataFrame, y: str | None = None) -> str:
    """`y` if given; else forgetting_score when any row has it, else forgetting_ce."""
    if y:
        return y
    for c in ("forgetting_score", "forgetting_ce"):
        if c in df.columns and df[c].notna().any():
            return c
    raise ConfigError("no forgetting measure in the table (neither forgetting_score nor "
                      "forgetting_ce has a value): evaluate the runs with a suite that has "
                      "forgetting tasks or a general-text cross-entropy set")


def _group_label(row: pd.Series) -> str:
    method = str(row["method"])
    rank = row.get("rank")
    label = f"{method} r{int(rank)}" if family(method).lora_adapter and pd.notna(rank) \
        else method
    reg = row.get("regulariser")  # an arm of sweeps/regularisers.yaml (collect._add_arms)
    return f"{label} + {reg}" if isinstance(reg, str) and reg else label


def _group_key(label: str) -> tuple:
    method, _, rank = label.partition(" r")
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (order, method, int(rank) if rank.isdigit() else 0)


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(sorted(set(labels), key=_group_key))}


def _pick_suite(df: pd.DataFrame, suite: str | None) -> pd.DataFrame:
    if "suite" not in df.columns or df["suite"].nunique() <= 1:
        return df
    if suite is None:
        suite = df["suite"].value_counts().idxmax()
    return df[df["suite"] == suite]


def _facets(df: pd.DataFrame, by: str = "data") -> list[tuple[str, pd.DataFrame]]:
    if by not in df.columns or df[by].isna().all():
        return [("all runs", df)]
    return [(str(k), g) for k, g in df.groupby(by, sort=True, dropna=False)]


def _title(df: pd.DataFrame, what: str) -> str:
    models = sorted(df["model"].dropna().astype(str).unique()) if "model" in df else []
    suites = sorted(df["suite"].dropna().astype(str).unique()) if "suite" in df else []
    bits = [what]
    if models:
        bits.append(", ".join(models))
    if suites:
        bits.append(f"eval={', '.join(suites)}")
    return " | ".join(bits)


# ============================================================================ learning/forgetting

def plot_learning_forgetting(df: pd.DataFrame, out_dir: Path, *, x: str | None = None,
                             y: str | None = None, suite: str | None = None,
                             stem: str = "learning_vs_forgetting") -> list[Path]:
    """Learning (x) against forgetting (y), one panel per data set, one colour per method
    (and rank); each run is a line from the base model through its checkpoints in token order
    (markers grow with tokens). The Pareto front over all points of a panel is ringed and
    joined by a dashed black line."""
    df = _pick_suite(df, suite)
    x = learning_column(df, x)
    y = forgetting_column(df, y)
    data = df[df[x].notna() & df[y].notna()]
    if data.empty:
        raise ConfigError(f"no row has both {x} and {y}: nothing to plot")
    facets = _facets(data)
    groups = data.apply(_group_label, axis=1)
    colors = _colors(list(groups))
    fig, axes = plt.subplots(1, len(facets), figsize=(6.2 * len(facets), 5.0), squeeze=False)
    x_high = not lower_is_better(x)
    y_better = "lower" if lower_is_better(y) else "higher"
    for ax, (name, g) in zip(axes[0], facets, strict=True):
        gl = g.apply(_group_label, axis=1)
        for _run, r in g.groupby("run", sort=True):
            r = r.sort_values(["tokens", "step"], kind="stable")
            label = gl.loc[r.index[0]]
            sizes = 18 + 50 * np.linspace(0, 1, len(r)) if len(r) > 1 else [30]
            ax.plot(r[x], r[y], "-", color=colors[label], alpha=0.75, lw=1.4, zorder=2)
            ax.scatter(r[x], r[y], s=sizes, color=colors[label], zorder=3,
                       edgecolor="white", linewidth=0.5)
        base = g[g["checkpoint"] == "base"]
        if len(base):
            ax.scatter(base[x], base[y], marker="*", s=220, color="black", zorder=5,
                       label="base model (0 tokens)")
        pts = g.drop_duplicates(subset=["run", "checkpoint"])
        xs = pts[x].to_numpy(float) if x_high else -pts[x].to_numpy(float)
        mask = pareto_front(xs, pts[y].to_numpy(float), y_better=y_better)
        front = pts[mask].sort_values(x)
        ax.plot(front[x], front[y], "--", color="black", lw=1.0, zorder=4,
                label="Pareto front")
        ax.scatter(front[x], front[y], s=120, facecolors="none", edgecolors="black",
                   linewidths=1.3, zorder=4)
        for lab in sorted(set(gl), key=_group_key):
            ax.plot([], [], "-o", color=colors[lab], label=lab)
        ax.set_xlabel(label_for(x))
        ax.set_ylabel(label_for(y))
        ax.set_title(f"data = {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", title="method (markers grow with tokens)",
                  title_fontsize=8)
    fig.suptitle(_title(data, "Learning vs forgetting"), fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, stem)


def plot_vs_tokens(df: pd.DataFrame, out_dir: Path, *, x: str | None = None,
                   y: str | None = None, suite: str | None = None,
                   stem: str = "learning_forgetting_vs_tokens") -> list[Path]:
    """Two rows of panels (learning, forgetting) against training tokens, one column per
    data set; the base model is the point at 0 tokens."""
    df = _pick_suite(df, suite)
    x = learning_column(df, x)
    y = forgetting_column(df, y)
    facets = _facets(df)
    colors = _colors(list(df.apply(_group_label, axis=1)))
    fig, axes = plt.subplots(2, len(facets), figsize=(6.0 * len(facets), 8.0), squeeze=False)
    for col, (name, g) in enumerate(facets):
        gl = g.apply(_group_label, axis=1)
        positive = g.loc[g["tokens"] > 0, "tokens"]
        for row, metric in enumerate((x, y)):
            ax = axes[row][col]
            for _run, r in g.groupby("run", sort=True):
                r = r[r[metric].notna()].sort_values(["tokens", "step"], kind="stable")
                if r.empty:
                    continue
                lab = gl.loc[r.index[0]]
                ax.plot(r["tokens"], r[metric], "-o", ms=4, color=colors[lab], alpha=0.8)
            for lab in sorted(set(gl), key=_group_key):
                ax.plot([], [], "-o", color=colors[lab], label=lab)
            if len(positive) and positive.max() / positive.min() > 20:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
            ax.set_xlabel("training tokens seen (symlog scale; 0 = base model)"
                          if ax.get_xscale() == "symlog" else "training tokens seen")
            ax.set_ylabel(label_for(metric))
            ax.set_title(f"data = {name}: {'learning' if row == 0 else 'forgetting'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="method", title_fontsize=8)
    fig.suptitle(_title(df, "Learning and forgetting vs training tokens"), fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, stem)


# ============================================================================ spectra

def _grid(rows: list[dict[str, Any]], matrix: str, key: str) -> tuple[np.ndarray, list, list]:
    sel = [r for r in rows if r["matrix"] == matrix and r.get("layer") is not None]
    layers = sorted({r["layer"] for r in sel})
    types = sorted({r["module_type"] for r in sel}, key=_module_key)
    grid = np.full((len(layers), len(types)), np.nan)
    for r in sel:
        grid[layers.index(r["layer"]), types.index(r["module_type"])] = r[key]
    return grid, layers, types


def _noise_labels(record: dict[str, Any], matrix: str, types: list) -> list[str]:
    """Module names with the rank for the threshold of a Gaussian matrix of their shape
    (learnforget.analysis.noise_baseline): a ΔW rank near it is as spread as noise."""
    from learnforget.analysis.noise_baseline import gaussian_rank_for_variance

    thr = float(record.get("threshold") or 0.9)
    out = []
    for t in types:
        shape = next((r["shape"] for r in record["rows"]
                      if r["matrix"] == matrix and r["module_type"] == t), None)
        out.append(f"{t}\n(Gaussian {gaussian_rank_for_variance(shape, thr)})"
                   if shape else str(t))
    return out


def plot_rank_heatmap(record: dict[str, Any], out_dir: Path, *, stem: str | None = None,
                      key: str = "rank_for_variance") -> list[Path]:
    """Rank needed for the variance threshold (default 90%) per layer x module type, one panel
    per matrix present (W_base, W_ft, ΔW), from one spectra/<checkpoint>.json record."""
    names = {"base": "W_base", "ft": "W_ft", "delta": "ΔW = W_ft - W_base"}
    present = [m for m in ("base", "ft", "delta") if any(r["matrix"] == m for r in record["rows"])]
    if not present:
        raise ConfigError(f"spectra record of {record.get('run')} has no rows")
    n_layers = len({r["layer"] for r in record["rows"] if r.get("layer") is not None})
    fig, axes = plt.subplots(1, len(present), squeeze=False,
                             figsize=(4.6 * len(present) + 1, max(5.2, 0.2 * n_layers + 2)))
    thr = record.get("threshold", 0.9)
    for ax, m in zip(axes[0], present, strict=True):
        grid, layers, types = _grid(record["rows"], m, key)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower",
                       interpolation="nearest")
        ax.set_xticks(range(len(types)), _noise_labels(record, m, types), rotation=45,
                      ha="right")
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [layers[i] for i in range(0, len(layers), step)])
        ax.set_xlabel("module")
        ax.set_ylabel("layer index")
        base_note = f" (base: {record.get('base')})" if m != "ft" else ""
        ax.set_title(f"{names[m]}{base_note}", fontsize=9)
        if grid.size <= 400:
            lo, hi = np.nanmin(grid), np.nanmax(grid)
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    dark = (v - lo) < 0.5 * (hi - lo) if hi > lo else True
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(f"rank for {thr:.0%} of variance (singular values)"
                     if key == "rank_for_variance" else key.replace("_", " "))
    tokens = record.get("tokens")
    fig.suptitle(f"{record.get('run')} @ {record.get('checkpoint')}"
                 + (f" ({tokens:,} tokens)" if isinstance(tokens, int) else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, stem or f"rank_heatmap-{record.get('run')}-{record.get('checkpoint')}")


def plot_spectra_curves(checkpoints: Sequence[tuple[dict[str, Any], dict[str, np.ndarray]]],
                        out_dir: Path, *, layer: int | None = None, stem: str | None = None
                        ) -> list[Path]:
    """Singular values of ΔW at one layer (default: the middle one), one panel per module type,
    one curve per checkpoint (colour = tokens); W_base and W_ft of the last checkpoint in
    grey/black when stored. `checkpoints`: (record, arrays) pairs from load_spectra."""
    if not checkpoints:
        raise ConfigError("plot_spectra_curves needs at least one checkpoint's spectra")
    checkpoints = sorted(checkpoints, key=lambda ca: ca[0].get("tokens") or 0)
    last_rec, last_arr = checkpoints[-1]
    rows = [r for r in last_rec["rows"] if r["matrix"] == "delta" and r.get("layer") is not None]
    if not rows:
        raise ConfigError(f"spectra of {last_rec.get('run')} have no per-layer ΔW rows")
    layers = sorted({r["layer"] for r in rows})
    layer = layers[len(layers) // 2] if layer is None else layer
    at = sorted((r for r in rows if r["layer"] == layer), key=lambda r: _module_key(r["module_type"]))
    ncols = min(4, len(at))
    nrows = -(-len(at) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    n = len(checkpoints)
    for ax, r in zip(axes.flat, at, strict=False):
        for i, (rec, arr) in enumerate(checkpoints):
            s = arr.get(f"delta:{r['module']}")
            if s is None:
                continue
            s = s[s > 0]  # exact zeros have no place on a log axis
            ax.semilogy(np.arange(1, s.size + 1), s, color=cmap(i / max(1, n - 1)), lw=1.3,
                        label=f"ΔW {rec.get('checkpoint')} ({rec.get('tokens')} tok)")
        for m, style in (("base", dict(color="0.6", ls="--")), ("ft", dict(color="black", ls=":"))):
            s = last_arr.get(f"{m}:{r['module']}")
            if s is not None:
                s = s[s > 0]
                ax.semilogy(np.arange(1, s.size + 1), s, lw=1.2, label=f"W_{m}", **style)
        # plain-text tick labels: mathtext ones cost ~1 s per figure to lay out
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=True))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"layer {layer} {r['module_type']} {r['shape'][0]}x{r['shape'][1]}",
                     fontsize=9)
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value (log scale)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(at):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Spectra of ΔW: {last_rec.get('run')} ({last_rec.get('method')}, base: "
                 f"{last_rec.get('base')})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, stem or f"spectra_curves-{last_rec.get('run')}")


def plot_rank_vs_tokens(spectra: pd.DataFrame, out_dir: Path, *,
                        stem: str = "rank_vs_tokens") -> list[Path]:
    """Rank for the variance threshold of ΔW, averaged over layers, against training tokens:
    one panel per run, one line per module type (from collect_spectra's table)."""
    d = spectra[spectra["matrix"] == "delta"] if len(spectra) else spectra
    if d.empty:
        raise ConfigError("no ΔW spectra to plot")
    runs = sorted(d["run"].unique())
    ncols = min(3, len(runs))
    nrows = -(-len(runs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, run in zip(axes.flat, runs, strict=False):
        g = d[d["run"] == run]
        mean = g.groupby(["module_type", "tokens"], sort=True)["rank_for_variance"].mean()
        for mt in sorted(mean.index.get_level_values(0).unique(), key=_module_key):
            series = mean.loc[mt]
            ax.plot(series.index.to_numpy(), series.to_numpy(), "-o", ms=4, label=mt)
        ax.set_title(f"{run[:48]}", fontsize=8)
        ax.set_xlabel("training tokens seen")
        thr = g["threshold"].dropna()
        ax.set_ylabel(f"ΔW rank for {thr.iloc[0] if len(thr) else 0.9:.0%} variance\n"
                      "(mean over layers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="module", title_fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.suptitle("Rank of the weight update vs training tokens", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, stem)


# ============================================================================ fig. S8

def plot_random_matrices(result: dict[str, Any], out_dir: Path, *,
                         stem: str = "random_matrices") -> list[Path]:
    """Fig. S8: (left) singular values of Gaussian A, A + cB and cB; (right) mean absolute
    difference between the spectra of A + cB and A as c grows."""
    n, c = result["n"], result["c"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    idx = np.arange(1, n + 1)
    a.plot(idx, result["s_A"], label="A", lw=1.6)
    a.plot(idx, result["s_A_plus_cB"], "--", label=f"A + {c:g}·B", lw=1.6)
    a.plot(idx, result["s_cB"], label=f"{c:g}·B", lw=1.6)
    a.set_xlabel("singular value index")
    a.set_ylabel("singular value")
    a.set_title(f"Spectra of {n}x{n} i.i.d. N(0,1) matrices (seed {result['seed']})", fontsize=10)
    a.grid(alpha=0.3)
    a.legend()
    b.loglog(result["cs"], result["mean_abs_diff"], "-o", ms=4)
    b.axvline(c, color="0.5", ls=":", label=f"c = {c:g}")
    b.set_xlabel("c (scale of the added matrix B)")
    b.set_ylabel("mean |s(A + cB) - s(A)| (singular-value units)")
    b.set_title("How far adding cB moves the spectrum of A", fontsize=10)
    b.grid(alpha=0.3, which="both")
    b.legend()
    fig.suptitle("Random-matrix comparison (paper fig. S8)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, stem)
