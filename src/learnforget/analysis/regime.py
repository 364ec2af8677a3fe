"""The laptop study's three answers (sweeps/regime_cpt.yaml), each a number with a 95% interval.

Every measure of the eval suite `regime` is kept per unit: the held-out code cross-entropy and
the general-text (Shakespeare) cross-entropy per block (`per_block: true`), each benchmark's
accuracy and margin per item, drift (KL from the base) per prompt. The units are the same for
every run of a study (the held-out split and the benchmark subsets are fixed, not seeded by the
run), so full finetuning and LoRA are compared unit by unit:

1. Does LoRA learn less? learning = base CE - CE on the held-out code blocks; the answer is
   full's learning minus LoRA's (= CE_LoRA - CE_full), per block, averaged over the seeds both
   methods ran at that budget, with a percentile-bootstrap interval over blocks.
2. Does it forget less? forgetting, oriented so that more is worse: the rise of Shakespeare CE,
   the drift KL, the fall of benchmark accuracy and margin (all three tasks' items pooled);
   the answer is full's forgetting minus LoRA's, per unit, seeds averaged, bootstrap over
   units. Positive on both: the paper's "LoRA learns less and forgets less".
3. Which forgets less at matched learning? Each run's trajectory from the base through its
   budgets in the (code CE, forgetting) plane; full's forgetting minus LoRA's where both
   reach the same code CE (learnforget.analysis.matched.matched_difference), averaged over
   seed pairs, with a bootstrap that resamples the code blocks and the forgetting units
   jointly for every run (the trajectories are recomputed per resample).

The intervals are over the evaluation's units (blocks, items, prompts), not over training
seeds: each answer's table also lists every seed's own value (the seeds' spread).

    answers, paths = write_regime(Path("runs/regime_cpt"), Path("runs/regime_cpt/_analysis"))
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learnforget.analysis.collect import arm_label, regulariser_labels, run_regularisers
from learnforget.analysis.cost import eval_cost, train_cost
from learnforget.analysis.matched import matched_difference
from learnforget.analysis.regime_figures import plot_regime
from learnforget.data.budget import PAPER_REGIME
from learnforget.errors import ConfigError
from learnforget.eval.paired import item_scores
from learnforget.files import atomic_open, read_result
from learnforget.runfolder import RunFolder, find_runs

N_BOOT = 2000
# measure -> (label, sign): forgetting = sign x (value - base value); more is worse
FORGETTING = {"general_ce": ("general-text CE rise (nats)", 1.0),
              "drift_kl": ("drift KL from base (nats/token)", 1.0),
              "bench_acc": ("benchmark accuracy fall", -1.0),
              "bench_margin": ("benchmark margin fall", -1.0)}


# ------------------------------------------------------------------ per-unit measures

def _units(result: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray, tuple]]:
    """measure -> (values, weights, unit ids) of one eval result (a checkpoint's or the base's).
    Missing measures are left out."""
    out: dict[str, tuple[np.ndarray, np.ndarray, tuple]] = {}
    for name, p in sorted((result.get("ppl") or {}).items()):
        if "blocks" not in p:
            continue
        key = "code_ce" if p.get("role") == "target" else "general_ce"
        if key in out:
            continue  # the first set of each role
        out[key] = (np.asarray(p["blocks"], float), np.asarray(p["block_tokens"], float),
                    (name, len(p["blocks"])))
    acc, margin, ids = [], [], []
    for name, t in sorted((result.get("tasks") or {}).items()):
        if t.get("role") != "forgetting" or not t.get("items"):
            continue
        s = item_scores(t["items"])
        acc.append(s["correct"])
        if "margin" in s:
            margin.append(s["margin"])
        ids.append((name, tuple(int(i) for i in s["doc_id"])))
    if acc:
        a = np.concatenate(acc)
        out["bench_acc"] = (a, np.ones_like(a), tuple(ids))
        if len(margin) == len(acc):
            m = np.concatenate(margin)
            out["bench_margin"] = (m, np.ones_like(m), tuple(ids))
    drift = ((result.get("drift") or {}).get("variants") or {}).get("all")
    if drift and "per_prompt_kl" in drift:
        k = np.asarray(drift["per_prompt_kl"], float)
        out["drift_kl"] = (k, np.ones_like(k), tuple(drift["prompt_indices"]))
    return out


def _base_result(folder: RunFolder, suite: str, key: str) -> dict[str, Any] | None:
    hits = sorted(glob.glob(str(folder.base_root / "*" / f"{glob.escape(suite)}*-{key[:12]}.json")))
    return read_result(Path(hits[0])) if hits else None


def load_runs(root: Path, suite: str | None = None) -> list[dict[str, Any]]:
    """Every run under `root` with per-unit results: {run, method, seed, trainable, units:
    {tokens: measures}, base: measures}. Runs of another suite, or without per-unit data,
    are left out."""
    runs = []
    for run_dir in find_runs(Path(root)):
        folder = RunFolder(run_dir)
        record = folder.read_record()
        if record is None:
            continue
        for summary_path in folder.eval_summaries(suite):
            summary = read_result(summary_path) or {}
            s, key = summary.get("suite"), summary.get("eval_key")
            units: dict[int, dict] = {}
            for label in folder.checkpoint_labels():
                res = read_result(folder.eval_result(label))
                if res and res.get("eval_key") == key and res.get("suite") == s:
                    got = _units(res)
                    if "code_ce" in got:
                        units[int(res["tokens"])] = got
            base = _base_result(folder, str(s), str(key)) if units else None
            if not units or base is None or "code_ce" not in _units(base):
                continue
            base_units = _units(base)
            if "drift_kl" in next(iter(units.values())) and "drift_kl" not in base_units:
                n = len(next(iter(units.values()))["drift_kl"][0])
                base_units["drift_kl"] = (np.zeros(n), np.ones(n),
                                          next(iter(units.values()))["drift_kl"][2])
            runs.append({"run": record.run.name, "run_dir": run_dir, "method": record.run.method,
                         "summary": record.run.method_summary, "seed": record.run.seed,
                         "trainable": record.train.trainable_params, "suite": s,
                         "units": units, "base": base_units,
                         "regularisers": run_regularisers(folder)})
    # arms of one method told apart by the regularisers that vary (sweeps/regularisers.yaml:
    # "full", "full + wd 0.0001", ...), as learnforget.analysis.collect labels them
    labels = regulariser_labels([r["regularisers"] for r in runs])
    for r, label in zip(runs, labels, strict=True):
        r["summary"] = arm_label(r["summary"], label)
    return runs


# ------------------------------------------------------------------ statistics

def _wmean(v: np.ndarray, w: np.ndarray, idx: np.ndarray | None = None):
    """Weighted mean; with idx (n_boot, n) one mean per resample."""
    if idx is None:
        return float((v * w).sum() / w.sum())
    return (v[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)


def _check_same_units(arrays: Sequence[tuple], measure: str) -> None:
    ids = {a[2] for a in arrays}
    if len(ids) > 1:
        raise ConfigError(f"regime analysis: the runs were scored on different {measure} units "
                          "(score every run with one suite: the same blocks, items and prompts)")


def paired_answer(a: Sequence[tuple], b: Sequence[tuple], sign: float, *, n_boot: int = N_BOOT,
                  seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """sign x (mean of b - mean of a) per unit, averaged over the seed pairs (a[i], b[i]), with
    a percentile-bootstrap interval over units (the same resample for every pair)."""
    _check_same_units(list(a) + list(b), "paired")
    w = a[0][1]
    diff = np.mean([sign * (y[0] - x[0]) for x, y in zip(a, b, strict=True)], axis=0)
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(n_boot, diff.size))
    boots = _wmean(diff, w, idx)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    per_seed = [sign * (_wmean(y[0], w) - _wmean(x[0], w)) for x, y in zip(a, b, strict=True)]
    return {"value": _wmean(diff, w), "ci_low": float(lo), "ci_high": float(hi),
            "units": int(diff.size), "per_seed": per_seed}


def _pairs(runs: list[dict], method_a: str, method_b: str, tokens: int | None):
    """(run of a, run of b) with the same seed (both at `tokens` when given)."""
    def by_seed(m):
        got: dict[Any, dict] = {}
        for r in runs:
            if r["summary"] == m and (tokens is None or tokens in r["units"]):
                if r["seed"] in got:
                    raise ConfigError(
                        f"regime answers: runs {got[r['seed']]['run']!r} and {r['run']!r} are "
                        f"both {m!r} at seed {r['seed']}; expected one run per arm and seed "
                        "(analyse studies that differ in another setting apart)")
                got[r["seed"]] = r
        return got
    ra, rb = by_seed(method_a), by_seed(method_b)
    return [(ra[s], rb[s]) for s in sorted(set(ra) & set(rb), key=str)]


def _trajectory(run: dict, measure: str, sign: float, idx_x: np.ndarray | None,
                idx_y: np.ndarray | None):
    """(x: code CE, y: forgetting) per point from the base through the budgets; with idx, one
    row per resample."""
    pts = [run["base"]] + [run["units"][t] for t in sorted(run["units"])]
    base_y = _wmean(run["base"][measure][0], run["base"][measure][1], idx_y)
    xs = [_wmean(p["code_ce"][0], p["code_ce"][1], idx_x) for p in pts]
    ys = [sign * (_wmean(p[measure][0], p[measure][1], idx_y) - base_y) for p in pts]
    return np.asarray(xs), np.asarray(ys)


def matched_answer(pairs: list[tuple[dict, dict]], measure: str, sign: float, *,
                   n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Forgetting of a minus b at matched code CE (module doc), mean over the seed pairs, with
    a bootstrap over code blocks and forgetting units resampled jointly."""
    first = pairs[0][0]
    n_x, n_y = first["base"]["code_ce"][0].size, first["base"][measure][0].size
    rng = np.random.default_rng(seed)
    ix, iy = rng.integers(0, n_x, (n_boot, n_x)), rng.integers(0, n_y, (n_boot, n_y))
    per_seed, boots = [], np.full((n_boot, len(pairs)), np.nan)
    for j, (ra, rb) in enumerate(pairs):
        ta, tb = _trajectory(ra, measure, sign, None, None), _trajectory(rb, measure, sign, None, None)
        res = matched_difference(ta, tb)
        if res is None:
            continue
        per_seed.append(res["diff"])
        ba, bb = _trajectory(ra, measure, sign, ix, iy), _trajectory(rb, measure, sign, ix, iy)
        for i in range(n_boot):
            got = matched_difference((ba[0][:, i], ba[1][:, i]), (bb[0][:, i], bb[1][:, i]))
            boots[i, j] = np.nan if got is None else got["diff"]
    if not per_seed:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "pairs": 0,
                "per_seed": []}
    ok = ~np.isnan(boots).all(axis=1)
    means = np.nanmean(boots[ok], axis=1)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha]) if means.size else (math.nan, math.nan)
    return {"value": float(np.mean(per_seed)), "ci_low": float(lo), "ci_high": float(hi),
            "pairs": len(per_seed), "per_seed": per_seed}


# ------------------------------------------------------------------ the study's answers

def answers(runs: list[dict], full: str, lora: str, *, n_boot: int = N_BOOT) -> pd.DataFrame:
    """One row per question x measure x budget (the matched question: over whole
    trajectories): value, 95% interval, seeds, units, per-seed values. Positive = the paper's
    direction (LoRA learns less / forgets less / forgets less at matched learning). `lora` may
    be any other arm (a regularised full finetuning: "full + wd 0.0001"); the questions then
    name it."""
    name = "LoRA" if lora.startswith("lora") else lora
    rows: list[dict[str, Any]] = []
    budgets = sorted({t for r in runs if r["summary"] == full for t in r["units"]}
                     & {t for r in runs if r["summary"] == lora for t in r["units"]})
    for tokens in budgets:
        pairs = _pairs(runs, full, lora, tokens)
        if not pairs:
            continue
        q = {"tokens": tokens, "seeds": ",".join(str(a["seed"]) for a, _ in pairs)}
        res = paired_answer([a["units"][tokens]["code_ce"] for a, _ in pairs],
                            [b["units"][tokens]["code_ce"] for _, b in pairs], 1.0,
                            n_boot=n_boot)
        rows.append({"question": f"1. does {name} learn less?",
                     "measure": f"held-out target CE (code, or answers for IFT): {name} - full (nats)", **q, **res})
        for m, (label, sign) in FORGETTING.items():
            if not all(m in a["units"][tokens] and m in b["units"][tokens] for a, b in pairs):
                continue
            res = paired_answer([b["units"][tokens][m] for _, b in pairs],
                                [a["units"][tokens][m] for a, _ in pairs], sign, n_boot=n_boot)
            rows.append({"question": f"2. does {name} forget less?",
                         "measure": f"{label}: full - {name}", **q, **res})
    pairs = _pairs(runs, full, lora, None)
    for m, (label, sign) in FORGETTING.items():
        if pairs and all(m in a["base"] and m in b["base"] for a, b in pairs):
            res = matched_answer(pairs, m, sign, n_boot=max(200, n_boot // 2))
            rows.append({"question": "3. which forgets less at matched learning?",
                         "measure": f"{label}: full - {name} at matched target CE",
                         "tokens": None, "seeds": ",".join(str(a["seed"]) for a, _ in pairs),
                         "units": None, **res})
    return pd.DataFrame(rows)


def seed_spread(runs: list[dict], *, n_boot: int = N_BOOT) -> pd.DataFrame:
    """How far two trainings of one arm land: for every arm with two or more seeds at a
    common budget (the last), each later seed minus the first, per measure, unit by unit
    (paired_answer, sign +1: the raw difference of the measure). The answers' intervals are
    over the units only; a difference between arms within this spread is not resolved."""
    rows = []
    for arm in sorted({r["summary"] for r in runs}):
        mine = sorted((r for r in runs if r["summary"] == arm), key=lambda r: str(r["seed"]))
        common = set.intersection(*(set(r["units"]) for r in mine)) if len(mine) > 1 else set()
        if not common:
            continue
        tokens = max(common)
        first = mine[0]
        for other in mine[1:]:
            for m in ["code_ce", *FORGETTING]:
                a, b = first["units"][tokens].get(m), other["units"][tokens].get(m)
                if a is None or b is None:
                    continue
                res = paired_answer([a], [b], 1.0, n_boot=n_boot)
                rows.append({"arm": arm, "tokens": tokens,
                             "seeds": f"{other['seed']} - {first['seed']}", "measure": m,
                             "value": res["value"], "ci_low": res["ci_low"],
                             "ci_high": res["ci_high"], "units": res["units"]})
    return pd.DataFrame(rows)


def regime_table(runs: list[dict]) -> pd.DataFrame:
    """Per run and budget: tokens per trainable parameter, and each measure's mean with the
    change from the base."""
    rows = []
    for r in runs:
        for tokens in sorted(r["units"]):
            u = r["units"][tokens]
            row = {"method": r["summary"], "seed": r["seed"], "tokens": tokens,
                   "trainable": r["trainable"],
                   "tokens_per_param": tokens / r["trainable"] if r["trainable"] else None}
            for m in ["code_ce"] + list(FORGETTING):
                if m in u and m in r["base"]:
                    row[m] = _wmean(u[m][0], u[m][1])
                    row[f"{m}_vs_base"] = row[m] - _wmean(r["base"][m][0], r["base"][m][1])
            rows.append(row)
    return pd.DataFrame(rows)


def cost_table(runs: list[dict]) -> pd.DataFrame:
    """Per run: training steps (trunk + cooldown branches), wall and process CPU hours of
    training and of the suite's scorings (learnforget.analysis.cost), and a total row."""
    rows = []
    for r in runs:
        tr, ev = train_cost(Path(r["run_dir"])), eval_cost(Path(r["run_dir"]), r["suite"])
        hours = {k: None if v is None else v / 3600 for k, v in
                 [("train_wall_h", tr["wall_s"]), ("train_cpu_h", tr["cpu_s"]),
                  ("eval_wall_h", ev["wall_s"]), ("eval_cpu_h", ev["cpu_s"])]}
        rows.append({"method": r["summary"], "seed": r["seed"], "train_steps": tr["steps"],
                     **hours, "scorings": ev["scorings"], "note": tr["note"] or (
                         "" if ev["cpu_s"] is not None else "eval CPU not recorded")})
    df = pd.DataFrame(rows)
    if len(df):
        total = {c: (df[c].sum(min_count=len(df)) if df[c].notna().all() else None)
                 for c in ["train_steps", "train_wall_h", "train_cpu_h", "eval_wall_h",
                           "eval_cpu_h", "scorings"]}
        df = pd.concat([df, pd.DataFrame([{"method": "all", "seed": None, **total,
                                           "note": "sum (-: a part not recorded)"}])],
                       ignore_index=True)
    return df


def _fmt_answer(r: pd.Series) -> str:
    seeds = ", ".join(f"{v:+.3g}" for v in r["per_seed"])
    verdict = ("yes" if r["ci_low"] > 0 else "no: the reverse" if r["ci_high"] < 0
               else "not resolved (the interval contains 0)")
    budget = "trajectories" if r["tokens"] is None or pd.isna(r["tokens"]) else f"{int(r['tokens']):,}"
    return (f"| {r['question']} | {r['measure']} | {budget} | {r['value']:+.3g} "
            f"[{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] | {verdict} | {r['seeds']} ({seeds}) |")


def write_regime(root: Path, out: Path, *, suite: str | None = None, full: str = "full",
                 lora: str | None = None, n_boot: int = N_BOOT) -> list[Path]:
    """regime.md, regime_answers.csv, regime_runs.csv and the figures into `out`; [] when no
    run under `root` has per-unit results (an eval suite without `per_block`) or there is no
    full/LoRA pair. `full` is compared with every LoRA arm, then with every other arm (the
    regularised full finetunings of sweeps/regularisers.yaml), unless `lora` names one."""
    runs = load_runs(root, suite)
    methods = sorted({r["summary"] for r in runs})
    loras = [m for m in methods if m.startswith("lora")] if lora is None else [lora]
    if lora is None and loras:
        loras += [m for m in methods if m != full and m not in loras]
    if full not in methods or not loras:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = regime_table(runs)
    parts = []
    paths: list[Path] = []
    all_answers = []
    for lm in loras:
        ans = answers(runs, full, lm, n_boot=n_boot)
        ans.insert(0, "lora", lm)
        all_answers.append(ans)
        final = ans[(ans["tokens"] == ans["tokens"].max()) | ans["tokens"].isna()]
        parts.append(f"## {full} vs {lm}\n\nPositive = the paper's direction. Intervals: 95% "
                     "percentile bootstrap over the evaluation's units (blocks, items, prompts), "
                     "seeds averaged per unit; the last column lists each seed's own value.\n\n"
                     "| question | measure | budget (tokens) | value [95% CI] | paper's direction? "
                     "| seeds (each seed) |\n|---|---|---|---|---|---|\n"
                     + "\n".join(_fmt_answer(r) for _, r in final.iterrows()))
    ans_all = pd.concat(all_answers, ignore_index=True)
    csv = out / "regime_answers.csv"
    with atomic_open(csv, "w") as f:
        ans_all.assign(per_seed=ans_all["per_seed"].map(lambda v: " ".join(f"{x:.6g}" for x in v))
                       ).to_csv(f, index=False)
    runs_csv = out / "regime_runs.csv"
    with atomic_open(runs_csv, "w") as f:
        table.to_csv(f, index=False)
    cost = cost_table(runs)
    md = out / "regime.md"
    with atomic_open(md, "w") as f:
        f.write(f"# The regime study: {root.name}\n\nRegime = tokens per trainable parameter "
                f"at each budget ({PAPER_REGIME}).\n\n"
                + table.to_markdown(index=False, floatfmt=".4g") + "\n\n"
                + "\n\n".join(parts) + "\n\nEvery budget's answer: regime_answers.csv.\n\n"
                "## Cost\n\nFrom each run folder (learnforget.analysis.cost): training (trunk "
                "and cooldown branches) and the suite's scorings of the checkpoints, wall and "
                "process CPU hours; the base's scoring is cached outside the runs and not "
                "counted. Wall time includes any pause.\n\n"
                + cost.astype(object).where(cost.notna(), None).to_markdown(
                    index=False, floatfmt=".3g", missingval="-") + "\n")
    paths += [md, csv, runs_csv]
    paths += plot_regime(runs, out, FORGETTING)
    return paths
