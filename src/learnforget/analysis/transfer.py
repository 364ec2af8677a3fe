"""Scaling laws for transfer (Hernandez et al. 2021): the effective data transferred from a
source distribution to a target, from the run folders of sweeps/transfer.yaml alone.

Per run (``runs/<study>/<run>/``): N, the model's non-embedding parameters (from the run's
config.yaml: decoder layers and the final norm; embeddings and LM head excluded); D, the
characters of its training split (run.json's ``n_train_chars``: data.train_chars); its arm
(``source``: trained on another data set than the target; ``scratch``: the target from the
random init; ``finetuned``: the target from model.init_from); and its early-stopped loss, the
lowest held-out loss in train/metrics.jsonl (train.heldout_every; the step-0 value of a
finetuned run, the source model itself, counts too).

D_E, for a finetuned run at D_F: the data a from-scratch model of the same N needs for the same
loss, read off that N's from-scratch curve (:func:`invert_loss_curve`: the curve made monotone
by a running minimum over D, then log D interpolated linearly in the loss between the two
points that bracket it; a loss outside the curve's range gives no D_E). D_T = D_E - D_F.
:func:`fit_transfer` fits log D_T = log k + alpha log D_F + beta log N by least squares on the
low-data regime (D_F <= ``max_df``, by default a hundredth of the largest from-scratch D, and
D_T > 0); :func:`bootstrap_fit` resamples those points for 95% intervals. :func:`write_transfer`
writes the tables, the fit beside the paper's (text -> Python: k = 1.9e4, alpha = 0.18, beta =
0.38, D in characters) and the effective-data multiplier (D_F + D_T) / D_F against D_F per N.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from learnforget.analysis.cost import train_cost
from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, atomic_write_text
from learnforget.runfolder import RunFolder, find_runs

PAPER = {"k": 1.9e4, "alpha": 0.18, "beta": 0.38}  # text -> Python, D in characters
PAPER_NOTE = ("Hernandez et al. 2021, text -> Python: D_T = 1.9e4 (D_F)^0.18 N^0.38 "
              "(characters, non-embedding N)")
LOW_DATA_FRACTION = 0.01  # the fit's default cut: D_F <= this x the largest from-scratch D
#   (room for multipliers D_E / D_F up to 100 inside the from-scratch curve)
N_BOOT = 2000
ARMS = ("source", "scratch", "finetuned")


# ------------------------------------------------------------------------------- per run

def non_embedding_params(arch: dict[str, Any]) -> int:
    """A Llama's parameters outside the token embeddings and the LM head: per decoder layer the
    q/k/v/o projections (k and v at num_key_value_heads), gate/up/down, two RMSNorms (and the
    biases when attention_bias / mlp_bias), plus the final norm."""
    h, inter, layers = int(arch["hidden_size"]), int(arch["intermediate_size"]), \
        int(arch["num_hidden_layers"])
    heads = int(arch["num_attention_heads"])
    kv = int(arch.get("num_key_value_heads") or heads)
    head_dim = int(arch.get("head_dim") or h // heads)
    q, kv_out = heads * head_dim, kv * head_dim
    attn = h * q + 2 * h * kv_out + q * h
    if arch.get("attention_bias"):
        attn += q + 2 * kv_out + h
    mlp = 3 * h * inter + ((2 * inter + h) if arch.get("mlp_bias") else 0)
    return layers * (attn + mlp + 2 * h) + h


def best_heldout(metrics: Path) -> tuple[float, int | None, float | None]:
    """(lowest held-out loss, its step, the last held-out loss) in a metrics.jsonl; NaN when the
    run measured none."""
    best, best_step, last = math.inf, None, None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            hl = row.get("heldout_loss")
            if hl is None or not math.isfinite(float(hl)):
                continue
            last = float(hl)
            if last < best:
                best, best_step = last, row.get("step")
    return (best if best_step is not None else math.nan), best_step, last


def load_runs(root: Path, target: str | None = None) -> pd.DataFrame:
    """One row per finished run under `root`: run, model, N, data, arm, D (characters),
    best_loss (early-stopped), best_step, last_loss, steps, init_from. `target`: the target data
    set's name (default: the data set of the runs that start from model.init_from)."""
    rows = []
    for run_dir in find_runs(Path(root)):
        folder = RunFolder(run_dir)
        record = folder.read_record()
        if record is None or record.status != "finished" or not folder.config.is_file():
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(folder.config), resolve=False)
        model, data = cfg.get("model", {}), cfg.get("data", {})
        best, step, last = best_heldout(folder.metrics)
        cost = train_cost(run_dir)
        rows.append({"run": run_dir.name, "model": model.get("name"),
                     "N": non_embedding_params(model["arch"]), "data": data.get("name"),
                     "init_from": model.get("init_from"),
                     "lr": float((cfg.get("train") or {}).get("lr") or math.nan),
                     "seed": cfg.get("seed", 0),
                     "D": (record.train.data or {}).get("n_train_chars"),
                     "best_loss": best, "best_step": step, "last_loss": last,
                     "steps": record.train.steps_done, "cpu_s": cost["cpu_s"],
                     "wall_s": cost["wall_s"]})
    df = pd.DataFrame(rows, columns=["run", "model", "N", "data", "init_from", "lr", "seed", "D",
                                     "best_loss", "best_step", "last_loss", "steps", "cpu_s",
                                     "wall_s"])
    if df.empty:
        return df.assign(arm=pd.Series(dtype=str))
    if target is None:
        tuned = sorted(df[df["init_from"].notna()]["data"].unique())
        if len(tuned) > 1:
            raise ConfigError(f"transfer: runs under {root} finetune on several data sets "
                              f"{tuned}: analyse one target at a time (target=...)")
        target = tuned[0] if tuned else None
    df["arm"] = ["finetuned" if pd.notna(i) else "scratch" if d == target else "source"
                 for i, d in zip(df["init_from"], df["data"], strict=True)]
    df["source"] = [_source_of(row, df) for row in df.itertuples()]
    return df.sort_values(["N", "arm", "source", "D"], ignore_index=True)


def _source_of(row: Any, df: pd.DataFrame) -> str:
    """The source a run's model learned before the target: for a finetuned run the data set of
    its init_from run (RUN/LABEL; RUN itself when that run is not under the same root), for a
    source run its own data set, '' for a run from scratch."""
    if row.arm == "source":
        return str(row.data)
    if row.arm != "finetuned":
        return ""
    run = str(row.init_from).split("/", 1)[0]
    data = df.loc[(df["run"] == run) & (df["init_from"].isna()), "data"]
    return str(data.iloc[0]) if len(data) else run


def tune_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per model size, arm, source and D: the learning rate with the lowest early-stopped
    loss (the paper tunes each run's learning rate), its loss the mean over its seeds (seeds are
    averaged first, never picked from), with ``n_seeds``, ``runs`` (its runs, ';'-joined),
    ``n_lr`` (how many learning rates were tried) and ``lrs`` (which, highest first). One run
    per cell passes through with its own loss."""
    extra = {"n_seeds": pd.Series(dtype=int), "runs": pd.Series(dtype=str),
             "n_lr": pd.Series(dtype=int), "lrs": pd.Series(dtype=str)}
    if runs.empty:
        return runs.assign(**extra)
    picked = []
    for _, cell in runs.groupby(["N", "arm", "source", "D"], dropna=False, sort=False):
        per_lr = []
        for _, grp in cell.groupby("lr", dropna=False, sort=False):
            row = grp.iloc[0].copy()
            row["best_loss"] = float(grp["best_loss"].astype(float).mean())  # NaN-skipping
            row["n_seeds"], row["runs"] = int(grp["seed"].nunique()), ";".join(grp["run"])
            per_lr.append(row)
        finite = [r for r in per_lr if math.isfinite(r["best_loss"])]
        best = min(finite, key=lambda r: r["best_loss"]) if finite else per_lr[0]
        best["n_lr"] = int(cell["lr"].nunique())
        best["lrs"] = ",".join(f"{v:g}" for v in sorted(cell["lr"].dropna().unique(),
                                                         reverse=True))
        picked.append(best)
    out = pd.DataFrame(picked).reset_index(drop=True)
    return out.sort_values(["N", "arm", "source", "D"], ignore_index=True)


def lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The early-stopped loss of every scratch and finetuned run by (model, D) and (arm, source,
    lr), seeds averaged as :func:`tune_lr` averages them: the learning-rate check behind it."""
    body = runs[runs["arm"].isin(["scratch", "finetuned"])]
    if body.empty:
        return pd.DataFrame()
    return body.pivot_table(index=["model", "N", "D"], columns=["arm", "source", "lr"],
                            values="best_loss", aggfunc="mean").sort_index()


# ------------------------------------------------------------------------------- D_E, D_T

def invert_loss_curve(d: Any, loss: Any, target: float) -> float:
    """D_E: the data size at which the from-scratch curve (D, loss) reaches `target`. The curve
    is sorted by D and made monotone (running minimum of the loss: more data, early-stopped,
    is never worse); log D is then linear in the loss between the two points that bracket
    `target` (the smallest D when a flat stretch equals it). NaN outside the curve's range: a
    loss above its smallest-D loss (D_E below the ladder) or below its best (beyond it)."""
    d, loss = np.asarray(d, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(d) & np.isfinite(loss) & (d > 0)
    d, loss = d[keep], loss[keep]
    if not len(d) or not math.isfinite(target):
        return math.nan
    order = np.argsort(d)
    d, mono = d[order], np.minimum.accumulate(loss[order])
    if target > mono[0] or target < mono[-1]:
        return math.nan
    j = int(np.argmax(mono <= target))  # the first point at least as good as the target
    if j == 0 or mono[j] == target:
        return float(d[j])
    lo, hi = mono[j - 1], mono[j]  # lo > target >= hi
    frac = (lo - target) / (lo - hi)
    return float(math.exp(math.log(d[j - 1]) + frac * (math.log(d[j]) - math.log(d[j - 1]))))


def effective_data(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finetuned run: model, N, D_F, its loss, the from-scratch loss at the same D,
    D_E, D_T = D_E - D_F, the multiplier D_E / D_F = (D_F + D_T) / D_F, and where D_E lies
    (``in range``, ``beyond``: the finetuned loss is below the best from-scratch loss, D_E >
    the largest D; ``below``: worse than the smallest D from scratch)."""
    out = []
    for n, grp in runs.groupby("N"):
        scratch = grp[grp["arm"] == "scratch"].dropna(subset=["D", "best_loss"])
        d_max = float(scratch["D"].max()) if len(scratch) else math.nan
        for _, ft in grp[grp["arm"] == "finetuned"].iterrows():
            d_e = invert_loss_curve(scratch["D"], scratch["best_loss"], ft["best_loss"])
            same = scratch[scratch["D"] == ft["D"]]["best_loss"]
            where = "in range"
            if not math.isfinite(d_e) and len(scratch):
                where = "beyond" if ft["best_loss"] < scratch["best_loss"].min() else "below"
            lr_same = scratch[scratch["D"] == ft["D"]]["lr"]
            out.append({"model": ft["model"], "N": int(n), "source": ft.get("source", ""),
                        "D_F": float(ft["D"]),
                        "loss_finetuned": ft["best_loss"],
                        "loss_scratch": float(same.min()) if len(same) else math.nan,
                        "lr_finetuned": ft.get("lr", math.nan),
                        "n_seeds": ft.get("n_seeds", 1),
                        "lr_scratch": float(lr_same.loc[same.idxmin()]) if len(same)
                        else math.nan,
                        "D_E": d_e, "D_T": d_e - float(ft["D"]),
                        "multiplier": d_e / float(ft["D"]), "D_E_range": where,
                        "D_max_scratch": d_max, "run": ft["run"]})
    return pd.DataFrame(out, columns=["model", "N", "source", "D_F", "loss_finetuned",
                                      "loss_scratch", "lr_finetuned", "lr_scratch", "n_seeds",
                                      "D_E", "D_T", "multiplier", "D_E_range", "D_max_scratch",
                                      "run"])


# ------------------------------------------------------------------------------- the fit

def low_data(points: pd.DataFrame, max_df: float | None = None) -> pd.DataFrame:
    """The points the fit uses: D_T > 0 (finite) and D_F <= max_df (default: LOW_DATA_FRACTION
    x the largest from-scratch D of the study)."""
    if max_df is None:
        max_df = LOW_DATA_FRACTION * float(points["D_max_scratch"].max())
    ok = np.isfinite(points["D_T"]) & (points["D_T"] > 0) & (points["D_F"] <= max_df)
    return points[ok]


def _lstsq(d_f: np.ndarray, n: np.ndarray, d_t: np.ndarray) -> np.ndarray:
    x = np.column_stack([np.ones_like(d_f), np.log(d_f), np.log(n)])
    if np.linalg.matrix_rank(x) < 3:
        raise ConfigError("transfer fit: the points need at least two D_F and two N values "
                          "(log D_T = log k + alpha log D_F + beta log N)")
    coef, *_ = np.linalg.lstsq(x, np.log(d_t), rcond=None)
    return coef


def fit_transfer(d_f: Any, n: Any, d_t: Any) -> dict[str, float]:
    """k, alpha, beta of D_T = k D_F^alpha N^beta by least squares in logs; ConfigError when
    the points cannot determine them (fewer than 4, or one D_F or one N)."""
    d_f, n, d_t = (np.asarray(a, dtype=float) for a in (d_f, n, d_t))
    if len(d_f) < 4 or np.any(d_t <= 0) or np.any(d_f <= 0) or np.any(n <= 0):
        raise ConfigError(f"transfer fit: {len(d_f)} point(s) with positive D_F, N and D_T; "
                          "at least 4 are needed for k, alpha and beta")
    c = _lstsq(d_f, n, d_t)
    resid = np.log(d_t) - (c[0] + c[1] * np.log(d_f) + c[2] * np.log(n))
    return {"k": float(np.exp(c[0])), "alpha": float(c[1]), "beta": float(c[2]),
            "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))), "n_points": len(d_f)}


def bootstrap_fit(d_f: Any, n: Any, d_t: Any, n_boot: int = N_BOOT, seed: int = 0,
                  level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of k, alpha and beta over resamples of the points (with
    replacement); a resample that cannot determine all three (one D_F or one N) is drawn again,
    up to 10 x n_boot draws. {"k": (lo, hi), ..., "n_boot": resamples used}."""
    d_f, n, d_t = (np.asarray(a, dtype=float) for a in (d_f, n, d_t))
    rng = np.random.default_rng(seed)
    got: list[np.ndarray] = []
    for _ in range(10 * n_boot):
        if len(got) >= n_boot:
            break
        i = rng.integers(0, len(d_f), len(d_f))
        try:
            got.append(_lstsq(d_f[i], n[i], d_t[i]))
        except ConfigError:
            continue
    if not got:
        raise ConfigError("transfer fit: no bootstrap resample determines k, alpha and beta")
    c = np.array(got)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo_hi = {name: tuple(float(v) for v in np.percentile(col, q))
             for name, col in (("k", np.exp(c[:, 0])), ("alpha", c[:, 1]), ("beta", c[:, 2]))}
    return {**lo_hi, "n_boot": len(got)}


def multiplier_curve(d_f: Any, n: float, k: float, alpha: float, beta: float) -> np.ndarray:
    """(D_F + D_T) / D_F = 1 + k D_F^(alpha - 1) N^beta under a fit."""
    d_f = np.asarray(d_f, dtype=float)
    return 1.0 + k * d_f ** (alpha - 1.0) * float(n) ** beta


# ------------------------------------------------------------------------------- outputs

MARKERS = ("o", "s", "D", "v")
FIT_STYLES = ("-", "--", "-.", (0, (5, 1, 1, 1)))


def plot_multiplier(points: pd.DataFrame, fits: dict[str, dict[str, float] | None],
                    out: Path) -> list[Path]:
    """The effective-data multiplier against D_F per N (log-log; colour: N, marker: source):
    measured points (open markers: D_E beyond the from-scratch ladder, drawn at its largest D:
    a lower bound), this study's fit per source (solid, dashed, ...) and the paper's text ->
    Python fit (dotted) per N. Points with no D_E (worse than the smallest from-scratch D) are
    left out; a multiplier below 1 is negative transfer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from learnforget.analysis.figures import _save

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("viridis")
    ns = sorted(points["N"].unique())
    sources = list(fits) or [""]
    grid = np.geomspace(points["D_F"].min(), points["D_F"].max(), 50) if len(points) else []
    for i, n in enumerate(ns):
        c = cmap(i / max(1, len(ns) - 1))
        for j, src in enumerate(sources):
            p = points[(points["N"] == n) & (points["source"] == src)] if src else \
                points[points["N"] == n]
            mk = MARKERS[j % len(MARKERS)]
            ok = p[np.isfinite(p["multiplier"])]
            label = f"N = {n:,}" + (f", {src}" if len(sources) > 1 else "")
            ax.plot(ok["D_F"], ok["multiplier"], mk, color=c, label=label)
            beyond = p[p["D_E_range"] == "beyond"]
            ax.plot(beyond["D_F"], beyond["D_max_scratch"] / beyond["D_F"], mk, color=c,
                    mfc="none")
            fit = fits.get(src)
            if fit is not None:
                ax.plot(grid, multiplier_curve(grid, n, fit["k"], fit["alpha"], fit["beta"]),
                        linestyle=FIT_STYLES[j % len(FIT_STYLES)], color=c, lw=1)
        ax.plot(grid, multiplier_curve(grid, n, **PAPER), ":", color=c, lw=1)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("D_F: finetuning data (characters)")
    ax.set_ylabel("effective-data multiplier (D_F + D_T) / D_F")
    ax.set_title("Transfer -> Python: points, fit per source (solid, dashed), paper (dotted)",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, "transfer_multiplier")


def _fmt_ci(value: float, ci: tuple[float, float] | None, fmt: str) -> str:
    if ci is None:
        return format(value, fmt)
    return f"{format(value, fmt)} [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _lr_section(every: pd.DataFrame) -> str:
    """transfer.md's learning-rate table: every early-stopped loss by (model, D) and (arm,
    source, lr); '' when every run used one learning rate."""
    if every["lr"].nunique() <= 1:
        return ""
    table = lr_table(every)
    cols = list(table.columns)
    several = every.loc[every["arm"] == "finetuned", "source"].nunique() > 1
    head = " | ".join(f"{arm}{f' ({src})' if src and several else ''} {lr:g}"
                      for arm, src, lr in cols)
    lines = [f"| {model} | {d:,.0f} | " + " | ".join(
        "-" if not math.isfinite(v) else f"{v:.4f}" for v in row) + " |"
        for (model, _n, d), row in zip(table.index, table.to_numpy(dtype=float), strict=True)]
    return ("\n\nEarly-stopped held-out loss per learning rate (lowest per arm and row picked):"
            f"\n\n| model | D | {head} |\n|---|---|" + "---|" * len(cols) + "\n"
            + "\n".join(lines))


def _fit_source(points: pd.DataFrame, cut: float, n_boot: int) -> dict[str, Any]:
    """One source's fit on its low-data points: {fit, ci95, n_points_used, why_no_fit}."""
    used = low_data(points, cut)
    try:
        fit = fit_transfer(used["D_F"], used["N"], used["D_T"])
        ci = bootstrap_fit(used["D_F"], used["N"], used["D_T"], n_boot=n_boot)
    except ConfigError as e:
        return {"fit": None, "ci95": None, "n_points_used": len(used), "why_no_fit": str(e)}
    return {"fit": fit, "ci95": ci, "n_points_used": len(used), "why_no_fit": None}


def write_transfer(root: Path, out: Path, *, max_df: float | None = None,
                   n_boot: int = N_BOOT, target: str | None = None) -> list[Path]:
    """transfer_runs.csv (every run; ``picked``: its model/arm/source/D cell's best learning
    rate), transfer_points.csv, transfer_fit.json (a fit per source), transfer.md and the
    multiplier figure into `out`; [] when `root` holds no finetuned run (not a transfer study)."""
    every = load_runs(root, target)
    if every.empty or not (every["arm"] == "finetuned").any():
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = tune_lr(every)
    every = every.assign(picked=every["run"].isin(";".join(runs["runs"]).split(";")))
    points = effective_data(runs)
    cut = max_df if max_df is not None else \
        LOW_DATA_FRACTION * float(points["D_max_scratch"].max())
    sources = list(dict.fromkeys(points["source"]))
    per = {src: _fit_source(points[points["source"] == src], cut, n_boot) for src in sources}
    paths = []
    for name, df in (("transfer_runs", every), ("transfer_points", points)):
        p = out / f"{name}.csv"
        with atomic_open(p, "w") as f:
            df.to_csv(f, index=False)
        paths.append(p)
    atomic_write_json(out / "transfer_fit.json", {
        "sources": per, "max_df": cut, "paper": PAPER, "paper_note": PAPER_NOTE})
    paths.append(out / "transfer_fit.json")
    paths += plot_multiplier(points, {s: r["fit"] for s, r in per.items()}, out)
    rows = []
    for key, fmt in (("k", ".3g"), ("alpha", ".3f"), ("beta", ".3f")):
        mine = [_fmt_ci(r["fit"][key], r["ci95"][key], fmt) if r["fit"] else "-"
                for r in per.values()]
        rows.append(f"| {key} | {' | '.join(mine)} | {format(PAPER[key], fmt)} |")
    rows.append(f"| points in the fit | {' | '.join(str(r['n_points_used']) for r in per.values())}"
                " | |")
    n_lrs = int(every["lr"].nunique())
    tuning = ("" if n_lrs <= 1 else
              f" Each model size, arm, source and D keeps its best learning rate (seeds averaged "
              f"first) over the rates tried ({n_lrs} in all: {', '.join(f'{v:g}' for v in sorted(every['lr'].unique()))}"
              "; per run in transfer_runs.csv, `picked`), as the paper tunes each run.")
    why = "".join(f"No fit for {s}: {r['why_no_fit']}\n\n" for s, r in per.items()
                  if r["why_no_fit"])
    cost = (f" Training cost, summed over the runs: {every['cpu_s'].sum() / 3600:.2f} CPU-hours, "
            f"{every['wall_s'].sum() / 3600:.2f} hours of run wall time (runs side by side "
            "overlap).")
    md = ("# Transfer: effective data transferred, -> Python\n\n"
          f"{len(every)} finished runs; {len(points)} finetuned points (D_F <= {cut:,.0f} "
          "characters and D_T > 0 go into the fit). D_E from each N's from-scratch curve "
          "(log D interpolated linearly in the early-stopped loss); intervals: 95% bootstrap "
          "over the fit's points." + tuning + cost
          + "\n\n| | " + " | ".join(f"source {s} [95% CI]" for s in per)
          + " | paper (text) |\n|---|" + "---|" * len(per) + "---|\n"
          + "\n".join(rows) + "\n\n" + why
          + "| model | N | source | D_F | loss finetuned (lr) | loss scratch (lr) | D_E | D_T | "
          "multiplier | D_E |\n|---|---|---|---|---|---|---|---|---|---|\n"
          + "\n".join(f"| {r.model} | {r.N:,} | {r.source} | {r.D_F:,.0f} | "
                      f"{r.loss_finetuned:.4f} ({r.lr_finetuned:g}) | {r.loss_scratch:.4f} "
                      f"({r.lr_scratch:g}) | {r.D_E:,.0f} | {r.D_T:,.0f} | {r.multiplier:.3g} | "
                      f"{r.D_E_range} |" for r in points.itertuples())
          + _lr_section(every) + f"\n\nPaper: {PAPER_NOTE}.\n")
    atomic_write_text(out / "transfer.md", md)
    paths.append(out / "transfer.md")
    return paths
