"""Generation diversity per method and checkpoint (Biderman et al. 2024, fig. 5), from the
per-problem counts each checkpoint's eval result stores (learnforget.eval.diversity: a sampled
humaneval task with `diversity` set).

    df = collect_diversity(Path("runs"))   # one row per run x checkpoint x task x problem
    table = diversity_table(df)             # per setting x checkpoint: means over problems
    write_diversity(Path("runs"), out)      # diversity.csv / .md / .png / .svg (learnforget analyze)

A setting is a method configuration (run.json's method_summary: `full`, `lora_r8_a16_all`);
the base model is the setting `base` at tokens 0. Per problem, a setting's value is the mean
over its runs (seeds) scored on that problem; the table gives the mean over problems with a 95%
percentile-bootstrap interval over problems, and the paired change against the base on the same
problems (mean of per-problem differences, bootstrap interval over problems).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learnforget.errors import ConfigError
from learnforget.eval.diversity import COUNTS
from learnforget.files import read_result
from learnforget.runfolder import RunFolder, find_runs

BASE = "base"
N_BOOT = 2000
CI = 0.95
KEYS = ("suite", "task", "mode", "samples")  # what makes two rows comparable


def _rows(result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, t in (result.get("tasks") or {}).items():
        d = t.get("diversity")
        if not d:
            continue
        for p in d["problems"]:
            rows.append({**meta, "task": task, "mode": d["mode"], "samples": p["n"],
                         "doc_id": int(p["doc_id"]), "task_id": p["task_id"],
                         "n_pass": p["n_pass"], **{k: p[k] for k in COUNTS}})
    return rows


def _base_result(folder: RunFolder, suite: str, key: str) -> tuple[Path | None, dict | None]:
    """The base model's cached result of this suite and eval key (learnforget.eval.scoring)."""
    for path in sorted(folder.base_root.glob(f"*/{suite}*-{key[:12]}.json")):
        result = read_result(path)
        if result and result.get("eval_key") == key:
            return path, result
    return None, None


def collect_diversity(root: Path, suite: str | None = None) -> pd.DataFrame:
    """Per-problem diversity counts of every scored checkpoint under `root` and of the base
    results they were compared with (each base result once). Empty when no run was scored with
    a diversity task."""
    rows: list[dict[str, Any]] = []
    bases: set[Path] = set()
    for run_dir in find_runs(Path(root)):
        folder = RunFolder(run_dir)
        record = folder.read_record()
        run = record.run if record is not None else None
        meta = {"run": run_dir.name,
                "setting": (run.method_summary or run.method) if run else run_dir.name,
                "method": run.method if run else None, "seed": run.seed if run else None}
        for path in folder.eval_summaries(suite):
            try:
                summary = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            name, key = summary.get("suite"), summary.get("eval_key")
            for r in summary.get("rows", []):
                label = r.get("checkpoint")
                if label == BASE:
                    bpath, result = _base_result(folder, str(name), str(key))
                    if result is None or bpath in bases:
                        continue
                    bases.add(bpath)
                    rows += _rows(result, {"run": BASE, "setting": BASE, "method": BASE,
                                           "seed": None, "suite": name, "checkpoint": BASE,
                                           "tokens": 0})
                    continue
                result = read_result(folder.eval_result(label))
                if result and result.get("eval_key") == key:
                    rows += _rows(result, {**meta, "suite": name, "checkpoint": label,
                                           "tokens": r.get("tokens")})
    return pd.DataFrame(rows)


def _boot(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over problems."""
    if values.size < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, values.size, size=(N_BOOT, values.size))
    lo, hi = np.quantile(values[idx].mean(axis=1), [(1 - CI) / 2, 1 - (1 - CI) / 2])
    return float(lo), float(hi)


def diversity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (suite, task, mode, samples, setting, tokens): runs, problems, pass@1 (mean n_pass/n),
    and for unique, unique_pass, unique_fail the mean per problem with its interval
    (`<count>_lo`, `<count>_hi`) and the paired change against the base (`d_<count>`,
    `d_<count>_lo`, `d_<count>_hi`; NaN without a base on the same problems)."""
    if df.empty:
        return pd.DataFrame()
    out = []
    for keys, part in df.groupby(list(KEYS), sort=True):
        per = (part.assign(pass1=part["n_pass"] / part["samples"])
               .groupby(["setting", "tokens", "doc_id"])[[*COUNTS, "pass1"]].mean())
        base = per.xs((BASE, 0), level=("setting", "tokens")) \
            if (BASE, 0) in per.index.droplevel("doc_id") else None
        settings = part.groupby(["setting", "tokens"])["run"].nunique()
        for (setting, tokens), n_runs in settings.items():
            cur = per.xs((setting, tokens), level=("setting", "tokens"))
            row = dict(zip(KEYS, keys, strict=True)) | {
                "setting": setting, "tokens": int(tokens), "runs": int(n_runs),
                "problems": len(cur), "pass@1": float(cur["pass1"].mean())}
            for c in COUNTS:
                v = cur[c].to_numpy(float)
                row[c] = float(v.mean())
                row[f"{c}_lo"], row[f"{c}_hi"] = _boot(v)
            for c in COUNTS:
                row[f"d_{c}"] = row[f"d_{c}_lo"] = row[f"d_{c}_hi"] = float("nan")
                if base is not None and setting != BASE:
                    common = cur.index.intersection(base.index)
                    if len(common):
                        diff = (cur.loc[common, c] - base.loc[common, c]).to_numpy(float)
                        row[f"d_{c}"] = float(diff.mean())
                        row[f"d_{c}_lo"], row[f"d_{c}_hi"] = _boot(diff)
            out.append(row)
    table = pd.DataFrame(out)
    order = table["setting"].ne(BASE)  # the base first, then settings by name and tokens
    return (table.assign(_o=order).sort_values([*KEYS, "_o", "setting", "tokens"])
            .drop(columns="_o").reset_index(drop=True))


def _cell(row: pd.Series, c: str, paired: bool = False) -> str:
    p = "d_" if paired else ""
    if np.isnan(row[f"{p}{c}"]):
        return "-"
    text = f"{row[f'{p}{c}']:+.2f}" if paired else f"{row[c]:.2f}"
    if not np.isnan(row[f"{p}{c}_lo"]):
        fmt = "{:+.2f}" if paired else "{:.2f}"
        text += f" [{fmt.format(row[f'{p}{c}_lo'])}, {fmt.format(row[f'{p}{c}_hi'])}]"
    return text


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, one section per (suite, task, mode, samples)."""
    parts = []
    for keys, part in table.groupby(list(KEYS), sort=True):
        suite, task, mode, samples = keys
        parts.append(f"## {task} (suite {suite}): unique completions among {samples} samples "
                     f"per problem, `{mode}` strings\n\nMean per problem [95% bootstrap interval "
                     "over problems]; Δ = paired change against the base on the same problems.\n")
        head = ["setting", "tokens", "runs", "problems", "pass@1", "unique", "unique passing",
                "unique failing", "Δ unique", "Δ passing", "Δ failing"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in part.iterrows():
            cells = [str(r["setting"]), f"{int(r['tokens']):,}", str(r["runs"]),
                     str(r["problems"]), f"{r['pass@1']:.3f}",
                     *(_cell(r, c) for c in COUNTS), *(_cell(r, c, True) for c in COUNTS)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_diversity(table: pd.DataFrame, out_dir: Path, stem: str = "diversity") -> list[Path]:
    """Unique, unique passing and unique failing completions per problem against training
    tokens, one line per setting (mean and 95% interval over problems), the base as a dashed
    line; one figure per (suite, task, mode, samples) after the first gets a numbered stem."""
    import matplotlib.pyplot as plt

    from learnforget.analysis.figures import _save

    paths: list[Path] = []
    for i, (keys, part) in enumerate(table.groupby(list(KEYS), sort=True)):
        suite, task, mode, samples = keys
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=False)
        base = part[part["setting"] == BASE]
        for ax, c, what in zip(axes, COUNTS, ("all", "passing", "failing"), strict=True):
            for setting, g in part[part["setting"] != BASE].groupby("setting"):
                g = g.sort_values("tokens")
                err = np.vstack([g[c] - g[f"{c}_lo"], g[f"{c}_hi"] - g[c]])
                ax.errorbar(g["tokens"], g[c], yerr=np.nan_to_num(err), marker="o",
                            capsize=3, label=str(setting))
            if len(base):
                b = base.iloc[0]
                ax.axhline(b[c], color="k", ls="--", lw=1, label="base")
                if not np.isnan(b[f"{c}_lo"]):
                    ax.axhspan(b[f"{c}_lo"], b[f"{c}_hi"], color="k", alpha=0.08)
            ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
            ax.set_title(f"unique among {what}")
            ax.set_xlabel("training tokens")
            ax.set_ylabel(f"per problem (of {samples} samples)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Generation diversity: {task} ({suite}), {mode} strings", y=1.03)
        paths += _save(fig, out_dir, stem if i == 0 else f"{stem}-{i + 1}")
    return paths


def write_diversity(root: Path, out: Path, suite: str | None = None) -> list[Path]:
    """diversity.csv, diversity.md and the figure into `out`; [] when no run under `root`
    was scored with a diversity task."""
    from learnforget.analysis.collect import save_table
    from learnforget.files import atomic_write_text

    df = collect_diversity(root, suite)
    if df.empty:
        return []
    table = diversity_table(df)
    if table.empty:
        raise ConfigError(f"diversity results under {root} give no table")
    paths = save_table(table, out, stem="diversity")[:1]
    md = Path(out) / "diversity.md"
    atomic_write_text(md, "# Generation diversity (paper fig. 5)\n\n" + markdown(table))
    return [*paths, md, *plot_diversity(table, out)]
