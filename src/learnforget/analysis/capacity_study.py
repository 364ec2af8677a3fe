"""The capacity control's table (sweeps/capacity_control.yaml, docs/controls.md): every
data=facts run under a study folder scored at every checkpoint, the best LR per arm, recall with
95% intervals, bits learned per trainable parameter beside ~2 bits/param, and full finetuning
against each other arm paired over the same facts.

    write_capacity(root, out)   # -> [out/capacity.md, out/capacity.json] ([] without facts runs)

An arm is a method setting (learnforget.methods.registry.method_summary: 'full',
'lora_r1_a2_do0_all', ...); its runs differ by LR. Per run, recall (learnforget.analysis.
capacity.score_run) at each checkpoint, cached in the run folder (eval/recall-<label>.json, an
atomic write: a killed analysis recomputes only what is missing). The arm's pick is the LR with
the highest recall at the last checkpoint (ties: the lower LR). Convergence: the pick's recall
rose by at most PLATEAU (absolute) between its last two checkpoints; an arm that still rose
more is marked "still rising", and one whose recall interval reaches chance "at chance: not
learning" (flat at chance is no plateau at capacity), so a capacity reading is never claimed
for either.
A run that another run starts from (model.init_from=RUN/LABEL: the base pretrained on a
disjoint fact set, sweeps/capacity_control_pretrained.yaml) is not an arm: it is listed as the
base, with its recall on its own facts.
Recall intervals: percentile bootstrap over facts (the harness's resamples,
learnforget.eval.paired.bootstrap_indices); full minus each arm: paired_change over the same
facts (full's and the arm's answers resampled together).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, atomic_write_text, read_json

PLATEAU = 0.02   # recall gain over the last checkpoint interval below which an arm has converged
PLATEAU_BITS = 0.02  # likelihood bits gained over the last interval, as a share of the facts' bits
ANCHOR = 2.0     # bits per parameter (Allen-Zhu & Li, Physics of Language Models 3.3)


def facts_runs(root: Path) -> list[Path]:
    """Run folders under root trained on data=facts (config.yaml's data.generator)."""
    from omegaconf import OmegaConf

    from learnforget.runfolder import RunFolder, find_runs

    out = []
    for run in find_runs(Path(root)):
        folder = RunFolder(run)
        if folder.config.exists() and folder.checkpoint_dirs():
            if OmegaConf.load(folder.config).data.get("generator") == "facts":
                out.append(run)
    return out


def recall_curve(run: Path, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """score_run at every checkpoint of a run, oldest first, each cached in
    eval/recall-<label>.json."""
    from learnforget.analysis.capacity import score_run
    from learnforget.runfolder import RunFolder

    curve = []
    for ckpt in RunFolder(run).checkpoint_dirs():
        path = Path(run) / "eval" / f"recall-{ckpt.name}.json"
        got = read_json(path)
        if got is None or "ll_bits" not in got:  # none, or from before the likelihood bits
            got = score_run(Path(run), checkpoint=ckpt.name, cache_dir=cache_dir)
            atomic_write_json(path, got)
        curve.append(got)
    return curve


def recall_interval(correct: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 answers (resampled facts)."""
    from learnforget.eval.paired import bootstrap_indices

    boots = correct[bootstrap_indices(len(correct))].mean(axis=1)
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return float(lo), float(hi)


def _run_info(run: Path, curve: list[dict[str, Any]]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from learnforget.methods.registry import family, method_summary
    from learnforget.runfolder import RunFolder

    cfg = OmegaConf.load(RunFolder(run).config)
    last = curve[-1]
    return {"run": Path(run).name, "arm": method_summary(cfg.method),
            "reference": family(cfg.method.name).reference, "r": last["r"],
            "lr": float(cfg.train.lr), "curve": [(c["checkpoint"], c["recall"]) for c in curve],
            "bits_curve": [(c["checkpoint"], c.get("ll_bits")) for c in curve],
            "init_from": cfg.model.get("init_from"), "max_docs": cfg.data.get("max_docs"),
            "last": last}


def capacity_rows(root: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """{"arms": one row per arm (its best LR), "runs": every arm run's curve, "bases": the
    runs others start from}; module doc."""
    infos = [_run_info(r, recall_curve(r, cache_dir)) for r in facts_runs(root)]
    sources = {str(i["init_from"]).strip("/").split("/")[0] for i in infos if i["init_from"]}
    table = summarise([i for i in infos if i["run"] not in sources], str(root))
    table["bases"] = [{"run": i["run"], "checkpoint": i["last"]["checkpoint"],
                       "recall": i["last"]["recall"], "n_facts": i["last"]["n_facts"],
                       "facts_offset": i["last"].get("facts_offset", 0), "k": i["last"]["k"],
                       "facts_end": i["last"].get("facts_offset", 0) + int(i["max_docs"]),
                       "trainable_params": i["last"]["trainable_params"]}
                      for i in infos if i["run"] in sources]
    return table


def summarise(runs: list[dict[str, Any]], where: str = "") -> dict[str, Any]:
    """The table from per-run records {run, arm, reference, r, lr, curve: [(label, recall)],
    last: score_run's record at the last checkpoint}: module doc."""
    from learnforget.eval.paired import paired_change

    if not runs:
        return {"arms": [], "runs": []}
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    rows = []
    for arm, members in arms.items():
        best = max(members, key=lambda m: (m["last"]["recall"], -m["lr"]))
        s = best["last"]
        curve = [v for _, v in best["curve"]]
        rise = curve[-1] - curve[-2] if len(curve) > 1 else math.nan
        lo, hi = recall_interval(np.asarray(s["items"]["correct"], dtype=float))
        saving = np.asarray(s["items"].get("saving", []), dtype=float)
        b_lo, b_hi = (recall_interval(saving) if saving.size else (math.nan, math.nan))
        bcurve = [v for _, v in best.get("bits_curve", [])]
        b_rise = (bcurve[-1] - bcurve[-2] if len(bcurve) > 1 and None not in bcurve[-2:]
                  else math.nan)
        rows.append({
            "arm": arm, "reference": best["reference"], "r": best["r"], "run": best["run"],
            "lr": best["lr"], "lrs": {m["lr"]: m["last"]["recall"] for m in members},
            "checkpoint": s["checkpoint"], "curve": best["curve"], "last_rise": rise,
            "converged": bool(rise <= PLATEAU) if not math.isnan(rise) else None,
            "bits_curve": best.get("bits_curve", []), "ll_bits": s.get("ll_bits"),
            "ll_bits_lo": b_lo * saving.size, "ll_bits_hi": b_hi * saving.size,
            "ll_bits_last_rise": b_rise,
            "bits_converged": (bool(b_rise <= PLATEAU_BITS * s["info_bits"])
                               if not math.isnan(b_rise) else None),
            "heldout_ll_bits_per_fact": s.get("heldout_ll_bits_per_fact"),
            "at_chance": bool(lo <= s["chance"]),  # flat at chance: not learning, not capacity
            "recall": s["recall"], "recall_lo": lo, "recall_hi": hi, "chance": s["chance"],
            "heldout_recall": s["heldout_recall"], "n_facts": s["n_facts"], "k": s["k"],
            "facts_offset": s.get("facts_offset", 0), "max_docs": best.get("max_docs"),
            "info_bits": s["info_bits"], "bits": s["bits"], "fano_bits": s["fano_bits"],
            "trainable_params": s["trainable_params"], "bits_per_param": s["bits_per_param"],
            "fano_bits_per_param": (s["fano_bits"] / s["trainable_params"]
                                    if s["trainable_params"] else None),
            "capacity_bits": (ANCHOR * s["trainable_params"] if s["trainable_params"] else None),
            "items": s["items"]})
    rows.sort(key=lambda x: (not x["reference"], x["r"] or 0, x["arm"]))
    if len({(r["n_facts"], r["k"], r["facts_offset"]) for r in rows}) > 1:
        raise ConfigError(f"{where}: the facts runs do not share one fact set (N, K, "
                          "data.facts_offset): compare runs of one study")
    full = rows[0] if rows[0]["reference"] else None
    for r in rows:
        if full is not None and r is not full:
            ch = paired_change(r["items"], full["items"])  # full minus this arm
            r.update(gap=ch["acc_delta"], gap_lo=ch["acc_delta_lo"], gap_hi=ch["acc_delta_hi"])
    return {"arms": rows, "runs": [{k: v for k, v in r.items() if k != "last"} for r in runs]}


def _disjoint(arm: dict[str, Any], base: dict[str, Any]) -> bool:
    """The arms' facts [offset, offset + max_docs) and the base's share no fact."""
    end = arm["facts_offset"] + int(arm.get("max_docs") or arm["n_facts"])
    return end <= base["facts_offset"] or arm["facts_offset"] >= base["facts_end"]


def _ll_cells(r: dict[str, Any]) -> tuple[str, str, str]:
    """The likelihood-bits cells: total [CI] (per param), by checkpoint (flag), held-out."""
    if r.get("ll_bits") is None:
        return "-", "-", "-"
    per = (f" ({r['ll_bits'] / r['trainable_params']:.3f})" if r["trainable_params"] else "")
    total = f"{r['ll_bits']:,.0f} [{r['ll_bits_lo']:,.0f}, {r['ll_bits_hi']:,.0f}]{per}"
    curve = " → ".join("-" if v is None else f"{v:,.0f}" for _, v in r["bits_curve"])
    if r["bits_converged"] is not None:
        curve += " (converged)" if r["bits_converged"] else " (still rising)"
    held = r.get("heldout_ll_bits_per_fact")
    return total, curve, "-" if held is None else f"{held:+.3f}"


def capacity_markdown(table: dict[str, Any]) -> str:
    rows = table["arms"]
    r0 = rows[0]
    out = ["| arm | LR (grid: recall) | trainable params | info / (2 x params) | "
           f"recall [95% CI] (chance {r0['chance']:.3f}) | held-out recall | bits (Fano bound) "
           "| bits/param (Fano) | recall by checkpoint | likelihood bits [95% CI] (per param) "
           "| likelihood bits by checkpoint | held-out likelihood bits per fact "
           "| full - this [95% CI] |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grid = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(r["lrs"].items()))
        over = (f"{r['info_bits'] / r['capacity_bits']:.2f}" if r["capacity_bits"] else "-")
        bpp = ("-" if r["bits_per_param"] is None
               else f"{r['bits_per_param']:.4f} ({r['fano_bits_per_param']:.4f})")
        curve = " → ".join(f"{v:.3f}" for _, v in r["curve"])
        if r["converged"] is False:
            curve += " (still rising)"
        elif r["at_chance"]:
            curve += " (at chance: not learning)"
        gap = (f"{r['gap']:+.3f} [{r['gap_lo']:+.3f}, {r['gap_hi']:+.3f}]" if "gap" in r
               else "-")
        held = "-" if r["heldout_recall"] is None else f"{r['heldout_recall']:.3f}"
        llb, llc, llh = _ll_cells(r)
        params = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        out.append(f"| {r['arm']} | {r['lr']:g} ({grid}) | {params} | {over} | "
                   f"{r['recall']:.3f} [{r['recall_lo']:.3f}, {r['recall_hi']:.3f}] | {held} | "
                   f"{r['bits']:,.0f} ({r['fano_bits']:,.0f}) | {bpp} | {curve} | {llb} | "
                   f"{llc} | {llh} | {gap} |")
    out += ["", f"{r0['n_facts']:,} trained facts x log2 {r0['k']} = {r0['info_bits']:,.0f} "
            "bits. bits = N x max(0, (recall - 1/K) / (1 - 1/K)) x log2 K; Fano: "
            "N x max(0, log2 K - h2(p) - (1 - p) log2(K - 1)). Anchor: ~2 bits per parameter "
            "(Allen-Zhu & Li); likelihood bits: sum over facts of log2 K + log2 q, q the true "
            "value's probability among the K (what the model's likelihood saves over the uniform "
            f"code), converged: rose by <= {PLATEAU_BITS:.0%} of the facts' bits over the last "
            "interval; info / (2 x params) > 1: the facts exceed the arm's capacity at "
            f"the anchor. Each arm at its best LR (highest recall at its last checkpoint); "
            f"converged: recall rose by <= {PLATEAU} over its last checkpoint interval. "
            "Intervals: bootstrap over facts (paired for full - this)."]
    for b in table.get("bases", []):
        out += ["", f"Every arm starts from the base `{b['run']}` ({b['checkpoint']}, "
                f"model.init_from), trained on {b['n_facts']:,} other facts from fact "
                f"{b['facts_offset']:,} of the generator's stream (its recall of them: "
                f"{b['recall']:.3f}); the arms' facts start at fact {r0['facts_offset']:,} "
                "(data.facts_offset), " + ("disjoint from the base's." if _disjoint(r0, b)
                                           else "OVERLAPPING the base's: not new facts.")]
    return "\n".join(out) + "\n"


def write_capacity(root: Path, out: Path, cache_dir: Path | None = None) -> list[Path]:
    """out/capacity.md and out/capacity.json for the facts runs under root ([] if none)."""
    table = capacity_rows(root, cache_dir)
    if not table["arms"]:
        return []
    out = Path(out)
    md, js = out / "capacity.md", out / "capacity.json"
    atomic_write_text(md, capacity_markdown(table))
    atomic_write_json(js, {"arms": [{k: v for k, v in r.items() if k != "items"}
                                    for r in table["arms"]], "runs": table["runs"],
                           "bases": table.get("bases", []),
                           "plateau": PLATEAU, "anchor_bits_per_param": ANCHOR})
    return [md, js]
