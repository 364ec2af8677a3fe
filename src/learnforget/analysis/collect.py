"""Every run folder under a root -> one table (one row per run x checkpoint, the base model at
tokens 0 included), and the Pareto front of learning vs forgetting.

    df = collect(Path("runs"))          # df.attrs["warnings"]: runs that were skipped
    on_front = pareto_front(df, "target_score", "forgetting_score")
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learnforget.errors import ConfigError
from learnforget.files import atomic_open, read_result
from learnforget.methods.registry import family
from learnforget.runfolder import RunFolder, RunRecord, find_runs

META_COLUMNS = ["run", "experiment", "model", "method", "method_summary", "rank", "alpha",
                "targets", "data", "regime", "seed", "status", "suite", "checkpoint", "step",
                "tokens", "epoch"]
SCORE_COLUMNS = ["target_score", "forgetting_score", "target_score_chance_corrected",
                 "forgetting_score_chance_corrected", "target_ce", "forgetting_ce",
                 "delta/target_score", "delta/forgetting_score",
                 "delta/target_score_chance_corrected",
                 "delta/forgetting_score_chance_corrected", "delta/target_ce",
                 "delta/forgetting_ce"]
RESOURCE_COLUMNS = ["trainable_params", "total_params", "trainable_pct", "peak_mem_mb",
                    "wall_time_s", "tokens_seen", "run_dir"]
LOWER_IS_BETTER_HINTS = ("_ce", "ce/", "loss", "ppl", "drift_kl")


# ------------------------------------------------------------------ finding runs

def _settings(info: RunRecord | None) -> dict[str, Any]:
    """A run's settings and resources from its record (None: an empty row)."""
    if info is None:
        return {k: None for k in ("run", "experiment", "model", "method", "method_summary",
                                  "rank", "alpha", "targets", "data", "regime", "seed", "status",
                                  "trainable_params", "total_params", "trainable_pct",
                                  "peak_mem_mb", "wall_time_s", "tokens_seen")}
    run, train = info.run, info.train
    ms = run.method_settings or {}
    targets = ms.get("targets")
    if isinstance(targets, list):
        targets = "+".join(map(str, targets))
    return {
        "run": run.name, "experiment": run.experiment, "model": run.model,
        "method": run.method, "method_summary": run.method_summary,
        "rank": ms.get("r"), "alpha": ms.get("alpha"), "targets": targets,
        "data": run.data, "regime": run.regime, "seed": run.seed,
        "status": info.status,
        "trainable_params": train.trainable_params,
        "total_params": train.total_params, "trainable_pct": train.trainable_pct,
        "peak_mem_mb": train.peak_mem_mb, "wall_time_s": train.wall_time_s,
        "tokens_seen": train.tokens_seen,
    }


# Training regularisers that tell arms of one method apart (sweeps/regularisers.yaml): the
# config key, its value when off, and its label.
REGULARISERS = (("attention_dropout", None, "attn dropout"), ("weight_decay", 0.0, "wd"))


def run_regularisers(folder: RunFolder) -> dict[str, Any]:
    """train.attention_dropout and train.weight_decay from the run's config.yaml (None when
    the folder has none)."""
    import yaml

    try:
        train = (yaml.safe_load(folder.config.read_text()) or {}).get("train") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        train = {}
    return {key: train.get(key, off) for key, off, _ in REGULARISERS}


def regulariser_labels(regs: list[dict[str, Any]]) -> list[str]:
    """Per run, e.g. "attn dropout 0.05" ("" when the run has none that varies): only the
    regularisers whose value differs between the runs name an arm, so a study with one weight
    decay throughout keeps its labels."""
    parts: list[list[str]] = [[] for _ in regs]
    for key, off, label in REGULARISERS:
        values = [off if r.get(key) is None or pd.isna(r.get(key)) else float(r[key])
                  for r in regs]
        if len({repr(v) for v in values}) <= 1:
            continue
        for got, v in zip(parts, values, strict=True):
            if v is not None and v != off:
                got.append(f"{label} {v:g}")
    return [", ".join(p) for p in parts]


def arm_label(method: str, regulariser: str) -> str:
    return f"{method} + {regulariser}" if regulariser else str(method)


def _add_arms(df: pd.DataFrame) -> None:
    """`regulariser` (regulariser_labels) and `arm` (method_summary and regulariser)."""
    for key, _, _ in REGULARISERS:
        if key not in df.columns:
            df[key] = None
    regs = [{key: row[key] for key, _, _ in REGULARISERS} for _, row in df.iterrows()]
    df["regulariser"] = regulariser_labels(regs) if len(df) else []
    df["arm"] = [arm_label(m, r)
                 for m, r in zip(df["method_summary"], df["regulariser"], strict=True)]


def _warn(msgs: list[str], msg: str, verbose: bool) -> None:
    msgs.append(msg)
    if verbose:
        print(f"learnforget: warning: {msg}", file=sys.stderr)


def collect(root: Path, *, suite: str | None = None, out: Path | None = None,
            verbose: bool = True) -> pd.DataFrame:
    """One row per (run, eval suite, checkpoint), the base model as checkpoint "base" at
    tokens 0. Runs without an eval summary (eval/summary-<suite>.json) are skipped and listed in
    `df.attrs["warnings"]` (also printed). With `out`, the table is saved there (CSV, and
    Parquet when pyarrow is importable). An empty or missing root is a ConfigError."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"runs root {root} does not exist (expected a folder such as runs/ "
                          "holding <experiment>/<run name>/ folders from `learnforget train`)")
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"no run folders under {root} (expected <experiment>/<run name>/run.json "
                          "written by `learnforget train`)")
    warnings: list[str] = []
    unscored: list[Path] = []
    rows: list[dict[str, Any]] = []
    for run_dir in runs:
        folder = RunFolder(run_dir)
        meta = _settings(folder.read_record())
        meta["run"] = meta["run"] or run_dir.name
        meta.update(run_regularisers(folder))
        summaries = folder.eval_summaries(suite)
        if not summaries:
            unscored.append(run_dir)
            continue
        manifests = folder.manifests()
        for path in summaries:
            try:
                summary = json.loads(path.read_text())
                summary_rows = summary["rows"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                _warn(warnings, f"{path} is not a readable eval summary ({e}): skipped", verbose)
                continue
            suite_name = summary.get("suite") or path.stem.removeprefix("summary-")
            for r in summary_rows:
                label = r.get("checkpoint")
                epoch = 0.0 if label == "base" else manifests.get(label, {}).get("epoch")
                branch = manifests.get(label, {}).get("cooldown") == "branch"
                rows.append({**meta, "suite": suite_name, "epoch": epoch, **r,
                             # the budget's point is the end of its own cooldown branch
                             **({"cooldown": "branch"} if branch else {}),
                             "run_dir": str(run_dir)})
    rel = f"eval/summary-{suite}.json" if suite else "eval summary (eval/summary-*.json)"
    if len(unscored) <= 3:
        for run_dir in unscored:
            _warn(warnings, f"run {run_dir} has no {rel}: skipped (score it with "
                            f"`learnforget eval {run_dir}`)", verbose)
    else:  # a train-only study (sweeps/transfer.yaml) has none: one line, not one per run
        _warn(warnings, f"{len(unscored)} runs have no {rel}: skipped (e.g. {unscored[0]}; "
                        "score one with `learnforget eval <run folder>`)", verbose)
    df = pd.DataFrame(rows)
    extra = sorted(c for c in df.columns
                   if c not in META_COLUMNS + SCORE_COLUMNS + RESOURCE_COLUMNS)
    for c in META_COLUMNS + SCORE_COLUMNS + RESOURCE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[META_COLUMNS + SCORE_COLUMNS + extra + RESOURCE_COLUMNS]
    numeric = [c for c in SCORE_COLUMNS + extra
               if c.startswith(("delta/", "task/", "ce/", "paired", "mde", "diversity/"))
               or c in SCORE_COLUMNS]
    for c in numeric + ["step", "tokens", "epoch", "alpha", "trainable_pct", "peak_mem_mb",
                        "wall_time_s"]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("rank", "seed", "trainable_params", "total_params", "tokens_seen"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    if len(df):
        df = df.sort_values(["experiment", "data", "method", "rank", "run", "suite", "tokens",
                             "step"], na_position="first", kind="stable").reset_index(drop=True)
    df = df.copy()  # one block per dtype: the per-task columns came one insert at a time
    _add_arms(df)
    df.attrs["warnings"] = warnings
    df.attrs["root"] = str(root)
    if out is not None:
        save_table(df, out)
    return df


def save_table(df: pd.DataFrame, out_dir: Path, stem: str = "runs") -> list[Path]:
    """<out_dir>/<stem>.csv, and <stem>.parquet when pyarrow is importable."""
    out_dir = Path(out_dir)
    csv = out_dir / f"{stem}.csv"
    with atomic_open(csv, "w") as f:
        df.to_csv(f, index=False)
    paths = [csv]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    pq = out_dir / f"{stem}.parquet"
    plain = df.copy()
    plain.attrs = {}
    with atomic_open(pq, "wb") as f:
        plain.to_parquet(f, index=False)
    paths.append(pq)
    return paths


# ------------------------------------------------------------------ Pareto front

def lower_is_better(column: str) -> bool:
    """Cross-entropy, loss and perplexity columns: lower is better; scores: higher."""
    return any(h in column for h in LOWER_IS_BETTER_HINTS)


def pareto_front(data: pd.DataFrame | Sequence[float] | np.ndarray, x: Any, y: Any = None, *,
                 y_better: str | None = None) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

        pareto_front(df, "target_score", "forgetting_score")   # column names
        pareto_front(xs, ys, y_better="lower")                  # two arrays

    x (learning) is better when higher; y (forgetting measure) is better when `y_better`
    ("higher" or "lower"; default: lower for *_ce / loss / ppl columns, higher otherwise, and
    higher for plain arrays). A point is dominated when another is at least as good in both and
    strictly better in one. Exact duplicates: only the first (lowest position) is on the front.
    Points with a NaN coordinate are never on it.
    """
    if isinstance(data, pd.DataFrame):
        if y is None:
            raise TypeError("pareto_front(df, x, y): give both column names")
        xs = data[x].to_numpy(dtype=float, na_value=np.nan)
        ys = data[y].to_numpy(dtype=float, na_value=np.nan)
        better = y_better or ("lower" if lower_is_better(str(y)) else "higher")
    else:
        if y is not None:
            raise TypeError("pareto_front(xs, ys): two arrays, no third argument")
        xs, ys = np.asarray(data, dtype=float), np.asarray(x, dtype=float)
        better = y_better or "higher"
    if better not in ("higher", "lower"):
        raise ConfigError(f"y_better must be 'higher' or 'lower', got {better!r}")
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {xs.shape} and {ys.shape}")
    yy = ys if better == "higher" else -ys
    mask = np.zeros(xs.size, dtype=bool)
    ok = np.flatnonzero(~(np.isnan(xs) | np.isnan(yy)))
    # best x first; among equal x, best y first; among exact ties, the lowest position first
    order = ok[np.lexsort((ok, -yy[ok], -xs[ok]))]
    best = -np.inf
    for i in order:
        if yy[i] > best:  # strictly better y than every point with x >= this x
            mask[i] = True
            best = yy[i]
    return mask


# ------------------------------------------------------------------ spectra table

def collect_spectra(root: Path, *, matrix: str | None = None) -> pd.DataFrame:
    """Every spectra/<checkpoint>.json under root as one long table (one row per run x
    checkpoint x module x matrix), with the run's settings."""
    rows = []
    for run_dir in find_runs(Path(root)):
        folder = RunFolder(run_dir)
        meta = _settings(folder.read_record())
        meta["run"] = meta["run"] or run_dir.name
        for js in sorted(folder.spectra_dir.glob(folder.spectra("*").name)):
            rec = read_result(js) or {}  # a file cut short: left out (spectra redo it)
            for r in rec.get("rows", []):
                if matrix and r.get("matrix") != matrix:
                    continue
                rows.append({**{k: meta[k] for k in ("run", "experiment", "model", "method",
                                                     "method_summary", "rank", "data")},
                             "checkpoint": rec.get("checkpoint"), "step": rec.get("step"),
                             "tokens": rec.get("tokens"), "base": rec.get("base"),
                             "threshold": rec.get("threshold"), **r,
                             "shape": "x".join(map(str, r.get("shape", []))),
                             "run_dir": str(run_dir)})
    return pd.DataFrame(rows)


def collect_wandb(group: str, *, project: str = "learnforget", entity: str | None = None,
                  api: Any = None) -> pd.DataFrame:
    """The same table from W&B (online): every `eval` job of a group (= experiment), one row per
    logged checkpoint, with the method settings from the matching `train` job's config.

    The run folders stay the source of truth; this is for dashboards shared across machines.
    `api` is a `wandb.Api()` (injected in tests)."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    runs = list(api.runs(path, filters={"group": group}))
    if not runs:
        raise ConfigError(f"no W&B runs in group {group!r} of project {path!r}")
    configs = {r.name: r.config for r in runs if getattr(r, "job_type", None) == "train"}
    rows: list[dict[str, Any]] = []
    for r in runs:
        if getattr(r, "job_type", None) != "eval":
            continue
        cfg = configs.get(r.name, {})
        method = cfg.get("method", {}) or {}
        lora = family(str(method.get("name"))).lora_adapter
        meta = {"run": r.name, "experiment": group, "model": (cfg.get("model") or {}).get("name"),
                "method": method.get("name"), "rank": method.get("r") if lora else None,
                "data": (cfg.get("data") or {}).get("name"), "seed": cfg.get("seed")}
        for h in r.scan_history():
            rows.append({**meta, **{k: v for k, v in h.items() if not k.startswith("_")}})
    return pd.DataFrame(rows)
