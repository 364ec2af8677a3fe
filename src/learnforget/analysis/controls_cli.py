"""`learnforget controls ...`: the positive controls (docs/controls.md).

    learnforget controls scale RUN_DIR [--t 0.5,1,2,4,8] [--checkpoint LABEL]
        write RUN_DIR-scaled: checkpoints theta0 + t * dW of a full-finetuning run
        (score it: learnforget eval RUN_DIR-scaled eval=control500)
    learnforget controls forgetting SCALED_RUN [--suite control500]
        the table: per t and task, paired delta acc and delta margin with 95% intervals,
        the stated minimum detectable change, and where the interval first excludes 0
    learnforget controls power SCALED_RUN [--suite control500] [--sims 200] [--noise LABEL]
        detection rate of injected changes on the real base items vs the stated power
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


def forgetting_rows(run: Path, suite: str = "control500") -> list[dict[str, Any]]:
    from learnforget.eval.paired import mde, paired_change

    base, ckpts = _results(run, suite)
    rows = []
    for label, res in ckpts.items():
        manifest = read_json(run / "checkpoints" / label / "manifest.json") or {}
        for task, t in res["tasks"].items():
            b = base["tasks"].get(task, {})
            if "items" not in t or "items" not in b:
                continue
            ch = paired_change(b["items"], t["items"])
            m = mde(b["items"])
            rows.append({"t": manifest.get("scale"), "checkpoint": label, "task": task,
                         **{k: ch[k] for k in ch if not k.startswith("_")},
                         "mde_acc": m.get("acc"), "mde_margin": m.get("margin")})
    return sorted(rows, key=lambda r: (r["task"], r["t"] if r["t"] is not None else math.inf))


def _fmt(x, d=4):
    return "-" if x is None else f"{x:+.{d}f}"


def print_forgetting(rows: list[dict[str, Any]]) -> None:
    print("| task | t | n | acc base -> ckpt | Δacc [95% CI] | Δmargin [95% CI] | flips r→w/w→r "
          "| MDE acc / margin |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['t']:g} | {r['n']} | {r['acc_base']:.3f} -> {r['acc']:.3f} | "
              f"{_fmt(r['acc_delta'])} [{_fmt(r['acc_delta_lo'])}, {_fmt(r['acc_delta_hi'])}] | "
              f"{_fmt(r.get('margin_delta'))} [{_fmt(r.get('margin_delta_lo'))}, "
              f"{_fmt(r.get('margin_delta_hi'))}] | {r['right_to_wrong']}/{r['wrong_to_right']} "
              f"| {r['mde_acc']:.4f} / {r['mde_margin']:.4f} |")


def power_rows(run: Path, suite: str = "control500", sims: int = 200,
               noise: str | None = None) -> list[dict[str, Any]]:
    from learnforget.analysis.power import margin_noise, power_table

    base, ckpts = _results(run, suite)
    rows = []
    for task, b in base["tasks"].items():
        if "items" not in b or "lls" not in b["items"]:
            continue
        models, nz = ["independent", "flip"], None
        if noise is not None:
            if noise not in ckpts:
                raise ConfigError(f"--noise {noise!r} is not a scored checkpoint of {run} "
                                  f"(expected one of {sorted(ckpts)})")
            nz = margin_noise(b["items"], ckpts[noise]["tasks"][task]["items"])
            models.append("churn")
        for row in power_table(b["items"], models=models, n_sims=sims, noise=nz):
            rows.append({"task": task, **row})
    return rows


def print_power(rows: list[dict[str, Any]]) -> None:
    print("| task | model | measure | δ / MDE | δ | stated power | detected [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['model']} | {r['measure']} | {r['multiple']:g} | "
              f"{r['delta']:+.4f} | {r['stated_power']:.2f} | {r['detected']:.2f} "
              f"[{r['detected_lo']:.2f}, {r['detected_hi']:.2f}] |")


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


def main(args: Sequence[str]) -> int:
    if not args or args[0] not in ("scale", "forgetting", "power", "recall", "capacity"):
        print(USAGE.strip())
        return 2
    sub, rest = args[0], args[1:]
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
        flags = {"--suite": str, "--json": str}
        if sub == "power":
            flags.update({"--sims": int, "--noise": str})
        pos, kw = _opts(rest, flags)
        if len(pos) != 1:
            raise ConfigError(f"usage: learnforget controls {sub} SCALED_RUN [options]")
        suite = kw.get("suite", "control500")
        if sub == "forgetting":
            rows = forgetting_rows(Path(pos[0]), suite)
            print_forgetting(rows)
        else:
            rows = power_rows(Path(pos[0]), suite, kw.get("sims", 200), kw.get("noise"))
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
