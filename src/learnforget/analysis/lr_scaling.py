"""LR scaling from learning-rate searches ("LoRA Without Regret", 2025: the best LoRA LR is
about 10x full finetuning's, nearly independent of rank).

Every run under a root is read from its own folder (LR searches often run the train stage
only): the setting (method summary: method, rank, variant, with everything but the LR), the
LR (config.yaml train.lr), the held-out target loss the train stage measured at the last
checkpoint (train/metrics.jsonl), and, where the run was scored, the forgetting measures at
that checkpoint. Per setting (mean over seeds per LR):

    best_lr         the grid LR with the lowest held-out loss
    lr_low/lr_high  the uncertainty the grid leaves: the geometric midpoints to the
                    neighbouring grid LRs (the best LR is nearer to the chosen point than to
                    its neighbours); at the grid's edge the interval is open (edge = low/high)
    ratio_to_full   best_lr / full finetuning's best_lr (same model and data), with
                    ratio_low = lr_low / full lr_high and ratio_high = lr_high / full lr_low
    forgetting      the forgetting measures of the best-LR run(s) at the last checkpoint

    t = lr_table(Path("runs/demo_lr_search"));  print(format_lr_table(t))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learnforget.errors import ConfigError
from learnforget.files import atomic_open, read_json
from learnforget.methods.registry import family
from learnforget.runfolder import RunFolder, find_runs

FORGETTING = ("forgetting_score", "forgetting_ce", "drift_kl")


def _last_heldout(run_dir: Path) -> tuple[int | None, float | None]:
    path = RunFolder(run_dir).metrics
    if not path.exists():
        return None, None
    best: tuple[int | None, float | None] = (None, None)
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("heldout_loss") is not None and (best[0] is None or row["step"] >= best[0]):
            best = (int(row["step"]), float(row["heldout_loss"]))
    return best


def collect_lr_runs(root: Path) -> pd.DataFrame:
    """One row per run: setting, lr, seed, last held-out loss and (if scored) forgetting."""
    import yaml

    from learnforget.analysis.collect import _settings

    rows = []
    for run_dir in find_runs(Path(root)):
        folder = RunFolder(run_dir)
        meta = _settings(folder.read_record())
        cfg_path = folder.config
        cfg = (yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else None) or {}
        lr = (cfg.get("train") or {}).get("lr")
        step, loss = _last_heldout(run_dir)
        if lr is None or loss is None:
            continue
        row = {"run": meta["run"] or run_dir.name, "method": meta["method"],
               "setting": meta["method_summary"], "rank": meta["rank"], "model": meta["model"],
               "data": meta["data"], "seed": meta["seed"], "lr": float(lr), "step": step,
               "heldout_loss": loss, "run_dir": str(run_dir)}
        for s in folder.eval_summaries():
            summary = read_json(s) or {}
            last = [r for r in summary.get("rows", []) if r.get("checkpoint") != "base"]
            if last:
                final = max(last, key=lambda r: (r.get("step") or 0))
                row.update({c: final.get(c) for c in FORGETTING if final.get(c) is not None})
            break
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(lrs: list[float], i: int) -> tuple[float, float, str]:
    lo = math.sqrt(lrs[i - 1] * lrs[i]) if i > 0 else lrs[i]
    hi = math.sqrt(lrs[i] * lrs[i + 1]) if i < len(lrs) - 1 else lrs[i]
    edge = "low" if i == 0 else "high" if i == len(lrs) - 1 else ""
    return lo, hi, edge


def lr_table(runs: pd.DataFrame | Path) -> pd.DataFrame:
    """The best LR per (model, data, setting), its grid interval, the ratio to full
    finetuning's and the forgetting at the best LR (see the module docstring)."""
    df = collect_lr_runs(runs) if isinstance(runs, Path | str) else runs
    if not len(df):
        raise ConfigError("no run with a learning rate and a held-out loss (expected runs of "
                          "an LR search, each with train/metrics.jsonl)")
    out = []
    for (model, data, setting), g in df.groupby(["model", "data", "setting"], sort=True,
                                                dropna=False):
        per_lr = g.groupby("lr").agg(loss=("heldout_loss", "mean"),
                                     seeds=("heldout_loss", "size")).sort_index()
        lrs = [float(x) for x in per_lr.index]
        i = int(np.argmin(per_lr["loss"].to_numpy()))
        lo, hi, edge = _interval(lrs, i)
        best = g[g["lr"] == lrs[i]]
        row: dict[str, Any] = {"model": model, "data": data, "setting": setting,
                               "method": g["method"].iloc[0], "rank": g["rank"].iloc[0],
                               "grid": " ".join(f"{x:g}" for x in lrs), "best_lr": lrs[i],
                               "lr_low": lo, "lr_high": hi, "edge": edge,
                               "heldout_loss": float(per_lr["loss"].iloc[i]),
                               "seeds": int(per_lr["seeds"].iloc[i])}
        for c in FORGETTING:
            if c in best.columns and best[c].notna().any():
                row[c] = float(best[c].astype(float).mean())
        out.append(row)
    t = pd.DataFrame(out)
    t["ratio_to_full"] = t["ratio_low"] = t["ratio_high"] = np.nan
    for _, g in t.groupby(["model", "data"], dropna=False):
        full = g[g["method"].map(lambda m: family(str(m)).reference)]  # full finetuning
        if len(full) != 1:
            continue
        f = full.iloc[0]
        idx = g.index
        t.loc[idx, "ratio_to_full"] = t.loc[idx, "best_lr"] / f["best_lr"]
        t.loc[idx, "ratio_low"] = t.loc[idx, "lr_low"] / f["lr_high"]
        t.loc[idx, "ratio_high"] = t.loc[idx, "lr_high"] / f["lr_low"]
    return t


def format_lr_table(t: pd.DataFrame) -> str:
    cols = [c for c in FORGETTING if c in t.columns]
    head = ["setting", "LR grid", "best LR [grid interval]", "held-out loss",
            "x full's LR [interval]", *[f"{c} at best LR" for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in t.iterrows():
        edge = f" (grid edge: {r['edge']})" if r["edge"] else ""
        ratio = ("-" if pd.isna(r["ratio_to_full"]) else
                 f"{r['ratio_to_full']:.3g} [{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]")
        cells = [str(r["setting"]), str(r["grid"]),
                 f"{r['best_lr']:g} [{r['lr_low']:.3g}, {r['lr_high']:.3g}]{edge}",
                 f"{r['heldout_loss']:.4f}", ratio,
                 *["-" if pd.isna(r.get(c)) else f"{r[c]:.4f}" for c in cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_lr_table(root: Path, out_dir: Path) -> tuple[pd.DataFrame, list[Path]] | None:
    """lr_scaling.csv and .md when some setting was run at more than one LR; else None."""
    from learnforget.analysis.collect import save_table

    runs = collect_lr_runs(root)
    if not len(runs) or not (runs.groupby("setting")["lr"].nunique() > 1).any():
        return None
    t = lr_table(runs)
    paths = save_table(t, out_dir, stem="lr_scaling")[:1]
    md = Path(out_dir) / "lr_scaling.md"
    with atomic_open(md, "w") as f:
        f.write("# LR scaling: best LR per setting (lowest held-out target loss at the last "
                "checkpoint, mean over seeds), its grid interval, the ratio to full "
                "finetuning's, forgetting at the best LR\n\n" + format_lr_table(t) + "\n")
    return t, paths + [md]
