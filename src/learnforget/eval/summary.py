"""A checkpoint's scores as one summary row (against the base: deltas, paired changes,
minimum detectable changes), the summary CSV, and the console table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from learnforget.eval.suite import ROLES

# ------------------------------------------------------------------ summary rows

def summarize(scores: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """One row: target and forgetting scores (means of each task's primary metric), their
    change against base, chance-corrected forgetting, and each cross-entropy set."""
    row: dict[str, Any] = {}
    for role in ROLES:
        vals = [t["primary"] for t in scores["tasks"].values() if t["role"] == role]
        row[f"{role}_score"] = sum(vals) / len(vals) if vals else None
        corrected = [(t["primary"] - t["chance"]) / (1 - t["chance"])
                     for t in scores["tasks"].values()
                     if t["role"] == role and t.get("chance") not in (None, 1)]
        row[f"{role}_score_chance_corrected"] = (sum(corrected) / len(corrected)
                                                 if corrected else None)
        ces = [p["ce"] for p in scores["ppl"].values() if p["role"] == role]
        row[f"{role}_ce"] = sum(ces) / len(ces) if ces else None
    for name, t in scores["tasks"].items():
        row[f"task/{name}"] = t["primary"]
    for name, p in scores["ppl"].items():
        row[f"ce/{name}"] = p["ce"]
    if scores.get("diversity"):
        row["diversity_mean_unique"] = scores["diversity"]["mean_unique"]
    for name, t in scores["tasks"].items():  # sampled HumanEval's (learnforget.eval.diversity)
        for key in ("unique", "unique_pass", "unique_fail"):
            if (t.get("diversity") or {}).get(f"mean_{key}") is not None:
                row[f"diversity/{name}/{key}"] = t["diversity"][f"mean_{key}"]
    if base is not None:
        b = summarize(base, None)
        for key, value in list(row.items()):
            if value is not None and b.get(key) is not None:
                row[f"delta/{key}"] = value - b[key]
    if base is not None:
        row.update(paired_columns(scores, base))
    if scores.get("drift"):  # already a change against base: no delta/ columns
        from learnforget.eval.drift import summary_row

        row.update(summary_row(scores["drift"]))
    return row


PAIRED_MEASURES = ("acc", "ll_gold", "margin")


def paired_columns(scores: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Paired changes against the base on the same items (learnforget.eval.paired) for every task
    both have per-item results of: `paired/<task>/<measure>_delta` (+ `_lo`, `_hi`: 95%
    paired bootstrap interval) for acc, ll_gold and margin, `paired/<task>/right_to_wrong`,
    `wrong_to_right`, `mcnemar_p`, `n`, `churn`; the paired minimum detectable change from this
    checkpoint's pairs (learnforget.eval.paired.paired_mde): `mde/<task>/<measure>` at 80%
    power, `mde50/<task>/<measure>` at 50% (where the interval just excludes 0); the
    conservative bound before any pairs exist, `mde_unpaired/<task>/<measure>` (independent
    items, 50% power: what `mde/` meant until 2026-12-07); and the forgetting tasks pooled:
    `paired_forgetting_<measure>_delta` (+ `_lo`, `_hi`), `paired_forgetting_right_to_wrong`,
    `paired_forgetting_wrong_to_right`."""
    from learnforget.eval.paired import paired_change, paired_mde, pooled_change, unpaired_mde

    row: dict[str, Any] = {}
    forgetting = []
    for name, t in scores["tasks"].items():
        b = base["tasks"].get(name) or {}
        if not t.get("items") or not b.get("items") or not t["items"]["doc_id"]:
            continue
        ch = paired_change(b["items"], t["items"], keep_boots=True)
        for key, value in ch.items():
            if key != "_boots":
                row[f"paired/{name}/{key}"] = value
        pm = paired_mde(b["items"], t["items"])
        row[f"paired/{name}/churn"] = pm["churn"]
        for key, value in pm.items():
            measure, _, power = key.rpartition("_")
            if power in ("50", "80") and measure in PAIRED_MEASURES:
                row[f"{'mde' if power == '80' else 'mde50'}/{name}/{measure}"] = value
        for key, value in unpaired_mde(b["items"]).items():
            if key != "n":
                row[f"mde_unpaired/{name}/{key}"] = value
        if t.get("role") == "forgetting":
            forgetting.append(ch)
    if forgetting:
        pooled = pooled_change(forgetting)
        for key, value in pooled.items():
            row[f"paired_forgetting_{key}"] = value
    return row


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    from learnforget.files import atomic_write_text

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def print_rows(rows: list[dict[str, Any]]) -> None:
    def f(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    cols = ["checkpoint", "tokens", "target_score", "forgetting_score", "target_ce",
            "forgetting_ce", "drift_kl"]
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{f(r.get(c)):>16}" for c in cols))
    for line in paired_lines(rows) + diversity_lines(rows):
        print(line)


def diversity_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per sampled task with diversity counts: each row's mean unique completions per problem,
    among all, passing and failing samples (learnforget.eval.diversity)."""
    tasks = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("diversity/")})
    out = []
    for task in tasks:
        out.append(f"{task}: unique completions per problem (all / passing / failing)")
        for r in rows:
            vals = [r.get(f"diversity/{task}/{k}") for k in ("unique", "unique_pass",
                                                             "unique_fail")]
            if None not in vals:
                out.append(f"  {r['checkpoint']:>16}  " + " / ".join(f"{v:.2f}" for v in vals))
    return out


def paired_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per task: the conservative unpaired bound, then each checkpoint's paired change (acc,
    margin with 95% intervals; flips and McNemar's p) and its paired minimum detectable change
    at 50% / 80% power (learnforget.eval.paired)."""
    tasks = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("paired/")})
    out = []
    if tasks:
        out.append("Paired per item against the base. MDE = minimum detectable change at 50% "
                   "power (the interval just excludes 0) / 80% power, from each checkpoint's "
                   "own pairs (flip churn, sd of per-item differences); the unpaired bound "
                   "assumes independent items (50% power).")
    for task in tasks:
        base = rows[0]
        n = base.get(f"paired/{task}/n")
        u_acc, u_m = base.get(f"mde_unpaired/{task}/acc"), base.get(f"mde_unpaired/{task}/margin")
        head = f"{task}: n={n}"
        if u_acc is not None:
            head += f", unpaired bound: acc {u_acc:.4f}"
            if u_m is not None:
                head += f", margin {u_m:.4f}"
        out.append(head)
        for r in rows[1:]:
            p = f"paired/{task}/"
            if r.get(p + "acc_delta") is None:
                continue
            line = (f"  {r['checkpoint']:>12}  d_acc {r[p + 'acc_delta']:+.4f} "
                    f"[{r[p + 'acc_delta_lo']:+.4f}, {r[p + 'acc_delta_hi']:+.4f}]  "
                    f"right->wrong {r[p + 'right_to_wrong']}  wrong->right "
                    f"{r[p + 'wrong_to_right']}  McNemar p {r[p + 'mcnemar_p']:.3f}")
            if r.get(p + "margin_delta") is not None:
                line += (f"  d_margin {r[p + 'margin_delta']:+.4f} "
                         f"[{r[p + 'margin_delta_lo']:+.4f}, {r[p + 'margin_delta_hi']:+.4f}]")
            out.append(line)
            m50, m80 = r.get(f"mde50/{task}/acc"), r.get(f"mde/{task}/acc")
            if m50 is not None and m80 is not None:
                mde = f"{'':>16}paired MDE 50%/80%: acc {m50:.4f}/{m80:.4f}"
                if r.get(p + "churn") is not None:
                    mde += f" (churn {r[p + 'churn']:.3f})"
                g50, g80 = r.get(f"mde50/{task}/margin"), r.get(f"mde/{task}/margin")
                if g50 is not None and g80 is not None:
                    mde += f", margin {g50:.4f}/{g80:.4f}"
                out.append(mde)
    return out
