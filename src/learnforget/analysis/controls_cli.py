"""`learnforget controls ...`: the positive controls (docs/controls.md).

    learnforget controls scale RUN_DIR [--t 0.5,1,2,4,8] [--checkpoint LABEL]
        write RUN_DIR-scaled: checkpoints theta0 + t * dW of a full-finetuning run
        (score it: learnforget eval RUN_DIR-scaled eval=control500)
    learnforget controls forgetting SCALED_RUN [--suite control500] [--reference LABEL]
        the table: per t and task, paired delta acc and delta margin with 95% intervals,
        the paired minimum detectable change (MDE) at 50% / 80% power from each checkpoint's
        pairs, and per task where the interval first excludes 0 against where |delta| first
        exceeds the MDE (post hoc, and planned from the reference checkpoint's churn and sd)
    learnforget controls power SCALED_RUN [--suite control500] [--sims 200] [--reference LABEL]
        [--models paired,independent]
        detection rate of injected changes of known size on the real base items, with the
        reference checkpoint's real churn and margin changes, vs the stated power
    (--reference defaults to x01.00, the trained update itself, else the first scored label)
    learnforget controls mde --n 500 --churn 0.06 [--sd 0.02]
        the paired MDE planned before a run, at 50% and 80% power: accuracy from an assumed
        flip churn, a mean change (margin) from an assumed sd of per-item differences; take
        both from a comparable scored checkpoint (`controls forgetting` prints them)
    learnforget controls recall RUN_DIR ... [--json FILE]
        facts recall, bits and bits per trainable parameter of data=facts runs; every LoRA
        run paired against the full-finetuning one
    learnforget controls capacity STUDY_DIR [--out DIR]
        the capacity control's table (sweeps/capacity_control.yaml): every data=facts run
        under STUDY_DIR scored at each checkpoint, each arm at its best LR
        (-> STUDY_DIR/_analysis/capacity.md and .json, or DIR)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, read_json

USAGE = __doc__ or ""


def _opts(args: Sequence[str], flags: dict[str, type]) -> tuple[list[str], dict[str, Any]]:
    pos, kw, args = [], {}, list(args)
    while args:
        a = args.pop(0)
        if a.startswith("--"):
            if a not in flags or not args:
                raise ConfigError(f"controls: unknown or incomplete option {a!r} (expected one "
                                  f"of {', '.join(flags)})")
            v = args.pop(0)
            try:
                kw[a[2:]] = flags[a](v)
            except ValueError:
                raise ConfigError(f"controls: {a} {v!r} is not a {flags[a].__name__}") from None
        else:
            pos.append(a)
    return pos, kw


def _results(run: Path, suite: str) -> tuple[dict, dict[str, dict]]:
    """(base result, {checkpoint label: result}) of a scored run folder."""
    summary = read_json(run / "eval" / f"summary-{suite}.json")
    if summary is None:
        raise ConfigError(f"{run} has no eval/summary-{suite}.json (score it first: "
                          f"learnforget eval {run} eval={suite})")
    key = summary["eval_key"]
    base_root = Path(summary["base_scores"])
    base = None
    for f in sorted(base_root.glob(f"*/{suite}*-{key[:12]}.json")):
        base = read_json(f)
    if base is None:
        raise ConfigError(f"no base scores for suite {suite} under {base_root}")
    ckpts = {}
    for f in sorted((run / "eval").glob("*.json")):
        r = read_json(f)
        if r and r.get("eval_key") == key and "checkpoint" in r:
            ckpts[r["checkpoint"]] = r
    return base, ckpts


def _reference(ckpts: dict[str, dict], label: str | None, run: Path) -> str:
    if label is None:
        label = "x01.00" if "x01.00" in ckpts else min(ckpts, default=None)
    if label not in ckpts:
        raise ConfigError(f"--reference {label!r} is not a scored checkpoint of {run} "
                          f"(expected one of {sorted(ckpts)})")
    return label


def forgetting_rows(run: Path, suite: str = "control500", reference: str | None = None
                    ) -> list[dict[str, Any]]:
    """Per task and t: the paired change, the post-hoc paired MDE (learnforget.eval.paired),
    the MDE planned from the reference checkpoint (its churn and sd of margin changes at this
    n), the unpaired bound, and whether the interval excludes 0."""
    from learnforget.eval.paired import (
        POWERS,
        mde_flips,
        mde_shift,
        paired_change,
        paired_mde,
        unpaired_mde,
    )

    base, ckpts = _results(run, suite)
    ref = _reference(ckpts, reference, run) if ckpts else None
    rows = []
    for label, res in ckpts.items():
        manifest = read_json(run / "checkpoints" / label / "manifest.json") or {}
        for task, t in res["tasks"].items():
            b = base["tasks"].get(task, {})
            if "items" not in t or "items" not in b:
                continue
            ch = paired_change(b["items"], t["items"])
            pm, u = paired_mde(b["items"], t["items"]), unpaired_mde(b["items"])
            rp = paired_mde(b["items"], ckpts[ref]["tasks"][task]["items"])
            row = {"t": manifest.get("scale"), "checkpoint": label, "task": task, "reference": ref,
                   **{k: ch[k] for k in ch if not k.startswith("_")}, "churn": pm["churn"],
                   "mde_unpaired_acc": u.get("acc"), "mde_unpaired_margin": u.get("margin")}
            for p in POWERS:
                q = round(100 * p)
                row[f"mde{q}_acc"], row[f"mde{q}_margin"] = pm[f"acc_{q}"], pm.get(f"margin_{q}")
                row[f"planned{q}_acc"] = mde_flips(ch["n"], rp["churn"], p)
                if "sd_margin" in rp:
                    row[f"planned{q}_margin"] = mde_shift(ch["n"], rp["sd_margin"], p)
            for m in ("acc", "margin"):
                if f"{m}_delta" in ch:
                    row[f"{m}_excludes_0"] = ch[f"{m}_delta_lo"] > 0 or ch[f"{m}_delta_hi"] < 0
            rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["t"] if r["t"] is not None else math.inf))


def _fmt(x, d=4):
    return "-" if x is None else f"{x:+.{d}f}"


def _first(rows: list[dict[str, Any]], hit) -> str:
    ts = [r["t"] for r in rows if hit(r)]
    return "none" if not ts else f"t={ts[0]:g}"


def first_detection(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per task and measure (acc, margin): the first t (ascending) whose interval excludes 0,
    beside the first t whose |Δ| exceeds the post-hoc paired MDE at 50% power, the planned
    one and the unpaired bound."""
    out: dict[str, dict[str, str]] = {}
    for task in sorted({r["task"] for r in rows}):
        tr = [r for r in rows if r["task"] == task]
        for m in ("acc", "margin"):
            if not all(r.get(f"mde50_{m}") is not None for r in tr):
                continue
            out.setdefault(task, {}).update({
                f"{m}_interval": _first(tr, lambda r, m=m: r[f"{m}_excludes_0"]),
                f"{m}_mde50": _first(tr, lambda r, m=m: abs(r[f"{m}_delta"]) > r[f"mde50_{m}"]),
                f"{m}_planned50": _first(tr, lambda r, m=m: r.get(f"planned50_{m}") is not None
                                         and abs(r[f"{m}_delta"]) > r[f"planned50_{m}"]),
                f"{m}_unpaired": _first(tr, lambda r, m=m: abs(r[f"{m}_delta"])
                                        > r[f"mde_unpaired_{m}"])})
    return out


def print_forgetting(rows: list[dict[str, Any]]) -> None:
    print("Paired per item against the base; 95% paired bootstrap intervals. MDE = minimum "
          "detectable change at 50% power (the interval just excludes 0) / 80% power, from "
          "each checkpoint's own pairs (flip churn; sd of per-item margin changes).")
    print("| task | t | n | acc base -> ckpt | Δacc [95% CI] | flips r→w/w→r | churn "
          "| MDE acc 50% / 80% | Δmargin [95% CI] | MDE margin 50% / 80% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mm = ("-" if r.get("mde50_margin") is None
              else f"{r['mde50_margin']:.4f} / {r['mde80_margin']:.4f}")
        print(f"| {r['task']} | {r['t']:g} | {r['n']} | {r['acc_base']:.3f} -> {r['acc']:.3f} | "
              f"{_fmt(r['acc_delta'], 3)} [{_fmt(r['acc_delta_lo'], 3)}, "
              f"{_fmt(r['acc_delta_hi'], 3)}] | {r['right_to_wrong']}/{r['wrong_to_right']} | "
              f"{r['churn']:.3f} | {r['mde50_acc']:.3f} / {r['mde80_acc']:.3f} | "
              f"{_fmt(r.get('margin_delta'))} [{_fmt(r.get('margin_delta_lo'))}, "
              f"{_fmt(r.get('margin_delta_hi'))}] | {mm} |")
    if not rows:
        return
    print(f"\nWhere the interval first excludes 0 (t ascending) against where |Δ| first "
          f"exceeds the MDE at 50% power: post hoc (each checkpoint's pairs), planned (before "
          f"the series, from the reference {rows[0]['reference']}'s churn and sd at this n), "
          "and the unpaired bound (independent items):")
    print("| task | measure | interval excludes 0 | > paired MDE50 | > planned MDE50 "
          "(planned 50% / 80%) | > unpaired bound |")
    print("|---|---|---|---|---|---|")
    for task, d in first_detection(rows).items():
        r0 = next(r for r in rows if r["task"] == task)
        for m in ("acc", "margin"):
            if f"{m}_interval" in d:
                print(f"| {task} | {m} | {d[m + '_interval']} | {d[m + '_mde50']} | "
                      f"{d[m + '_planned50']} ({r0.get('planned50_' + m, 0):.4f} / "
                      f"{r0.get('planned80_' + m, 0):.4f}) | {d[m + '_unpaired']} "
                      f"({r0['mde_unpaired_' + m]:.4f}) |")


def power_rows(run: Path, suite: str = "control500", sims: int = 200,
               reference: str | None = None, models: Sequence[str] = ("paired",)
               ) -> list[dict[str, Any]]:
    from learnforget.analysis.power import population, power_table

    base, ckpts = _results(run, suite)
    ref = _reference(ckpts, reference, run)
    rows = []
    for task, b in base["tasks"].items():
        if "items" not in b or "lls" not in b["items"]:
            continue
        pop = population(b["items"], ckpts[ref]["tasks"][task]["items"])
        for row in power_table(pop, models=models, n_sims=sims):
            rows.append({"task": task, "reference": ref, **row})
    return rows


def print_power(rows: list[dict[str, Any]]) -> None:
    print("Injected forgetting of known size on the real base items (fresh n-item draw per "
          "simulation); detected = share of simulations whose paired 95% interval excludes 0; "
          "expected = stated power ± its binomial 95% sampling band.")
    print("| task | model | measure | reference churn | δ | flips r→w/w→r | stated power "
          "| expected band | detected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fl = f"{r['right_to_wrong']}/{r['wrong_to_right']}" if "right_to_wrong" in r else "-"
        ch = "-" if r["churn"] is None or r["model"] != "paired" else f"{r['churn']:.3f}"
        if r["detected"] is None:
            print(f"| {r['task']} | {r['model']} | {r['measure']} | {ch} | - | {fl} | "
                  f"{r['target']:.2f} | - | {r['note']} |")
            continue
        print(f"| {r['task']} | {r['model']} | {r['measure']} | {ch} | {r['delta']:+.4f} | "
              f"{fl} | {r['stated_power']:.2f} | [{r['expected_lo']:.2f}, "
              f"{r['expected_hi']:.2f}] | {r['detected']:.2f} |")


def recall_rows(runs: Sequence[Path]) -> list[dict[str, Any]]:
    from learnforget.analysis.capacity import score_run
    from learnforget.eval.paired import paired_change
    from learnforget.methods.registry import family

    scored = [score_run(Path(r)) for r in runs]
    full = [s for s in scored if family(s["method"]).reference]  # full finetuning
    for s in scored:
        if full and s is not full[0]:
            ch = paired_change(s["items"], full[0]["items"])  # full minus this run
            s.update(gap=ch["acc_delta"], gap_lo=ch["acc_delta_lo"], gap_hi=ch["acc_delta_hi"])
    return scored


def print_recall(rows: list[dict[str, Any]]) -> None:
    print("| run | params | recall (chance) | held-out recall | bits (Fano bound) | "
          "bits/param | full − this [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gap = (f"{r['gap']:+.3f} [{r['gap_lo']:+.3f}, {r['gap_hi']:+.3f}]" if "gap" in r
               else "-")
        bpp = "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.4f}"
        print(f"| {r['method']}{'' if r['r'] is None else ' r=' + str(r['r'])} | "
              f"{r['trainable_params']:,} | {r['recall']:.3f} ({r['chance']:.3f}) | "
              f"{r['heldout_recall']:.3f} | {r['bits']:,.0f} ({r['fano_bits']:,.0f}) | {bpp} "
              f"| {gap} |")
    if rows:
        r = rows[0]
        print(f"\n{r['n_facts']:,} trained facts x log2 {r['k']} = {r['info_bits']:,.0f} bits; "
              "bits = N * max(0, (recall - 1/K) / (1 - 1/K)) * log2 K; anchor ~2 bits/param "
              "(Allen-Zhu & Li 2025)")


def _planned(args: Sequence[str]) -> int:
    from learnforget.eval.paired import POWERS, mde_flips, mde_shift

    pos, kw = _opts(args, {"--n": int, "--churn": float, "--sd": float})
    if pos or "n" not in kw or not ({"churn", "sd"} & set(kw)):
        raise ConfigError("usage: learnforget controls mde --n ITEMS [--churn RATE] [--sd SD]")
    for p in POWERS:
        parts = [f"accuracy {mde_flips(kw['n'], kw['churn'], p):.4f} (churn {kw['churn']:g})"
                 if "churn" in kw else "", f"mean change {mde_shift(kw['n'], kw['sd'], p):.4f} "
                 f"(sd of differences {kw['sd']:g})" if "sd" in kw else ""]
        print(f"paired MDE at {round(100 * p)}% power, n={kw['n']}: "
              + ", ".join(x for x in parts if x))
    return 0


def main(args: Sequence[str]) -> int:
    if not args or args[0] not in ("scale", "forgetting", "power", "recall", "mde", "capacity"):
        print(USAGE.strip())
        return 2
    sub, rest = args[0], args[1:]
    if sub == "mde":
        return _planned(rest)
    if sub == "scale":
        pos, kw = _opts(rest, {"--t": str, "--checkpoint": str})
        if len(pos) != 1:
            raise ConfigError("usage: learnforget controls scale RUN_DIR [--t 0.5,1,2,4,8]")
        from learnforget.analysis.controls import DEFAULT_SCALES, scaled_run

        ts = kw["t"].split(",") if "t" in kw else DEFAULT_SCALES
        out = scaled_run(Path(pos[0]), ts, checkpoint=kw.get("checkpoint"))
        print(f"learnforget: scaled checkpoints -> {out} (score them: learnforget eval {out} "
              "eval=control500)")
        return 0
    if sub == "capacity":
        pos, kw = _opts(rest, {"--out": str})
        if len(pos) != 1:
            raise ConfigError("usage: learnforget controls capacity STUDY_DIR [--out DIR]")
        from learnforget.analysis.capacity_study import write_capacity

        root = Path(pos[0])
        got = write_capacity(root, Path(kw.get("out", root / "_analysis")))
        if not got:
            raise ConfigError(f"{root} holds no data=facts run with a checkpoint")
        print(got[0].read_text(), end="")
        print(f"learnforget: capacity table -> {got[0]}")
        return 0
    if sub in ("forgetting", "power"):
        flags = {"--suite": str, "--json": str, "--reference": str}
        if sub == "power":
            flags.update({"--sims": int, "--models": str})
        pos, kw = _opts(rest, flags)
        if len(pos) != 1:
            raise ConfigError(f"usage: learnforget controls {sub} SCALED_RUN [options]")
        suite = kw.get("suite", "control500")
        if sub == "forgetting":
            rows = forgetting_rows(Path(pos[0]), suite, kw.get("reference"))
            print_forgetting(rows)
        else:
            models = kw.get("models", "paired").split(",")
            rows = power_rows(Path(pos[0]), suite, kw.get("sims", 200), kw.get("reference"),
                              models)
            print_power(rows)
    else:
        pos, kw = _opts(rest, {"--json": str})
        if not pos:
            raise ConfigError("usage: learnforget controls recall RUN_DIR ... [--json FILE]")
        rows = recall_rows([Path(p) for p in pos])
        print_recall(rows)
        for r in rows:
            r.pop("items", None)
    if "json" in kw:
        atomic_write_json(Path(kw["json"]), json.loads(json.dumps(rows, default=str)))
    return 0
