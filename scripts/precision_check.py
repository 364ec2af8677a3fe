"""bf16 against fp32 scoring on an eval suite, with real checkpoints (eval.precision):

    PYTHONPATH=src python scripts/precision_check.py runs/demo/<run A> runs/demo/<run B> \
        --checkpoint token-000008192 --suite demo --work /tmp/precision_check

Scores the base model and one checkpoint of each run under `model` (the as-loaded fp32 of
SmolLM2) and under `bf16`, each precision's base for its own checkpoints, and prints: per-item
|ll_bf16 - ll_fp32| over every choice (median, max), accuracy agreement, the paired Δmargin and
Δll_gold per task under both precisions next to fp32's 95% interval half-width, the drift KL and
cross-entropies, and the wall time of each scoring. Nothing is written to the run folders.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from learnforget.assets.models import load_tokenizer
from learnforget.config import compose
from learnforget.eval.paired import paired_change
from learnforget.eval.scoring import drift_eval_for, load_for_eval, score
from learnforget.eval.suite import checked_specs
from learnforget.eval.task_yaml import write_task_dir
from learnforget.runfolder import RunFolder


def _score_all(runs, checkpoint, suite, precision, work, with_base: bool = True):
    ev = compose([f"eval={suite}", f"eval.precision={precision}"]).eval
    first = RunFolder(Path(runs[0]).resolve())
    run_cfg = OmegaConf.load(first.config)
    cache = Path(run_cfg.paths.cache_dir).expanduser()
    specs = checked_specs(ev, cache)
    include = write_task_dir(specs, work / "tasks")
    tok = load_tokenizer(str(first.tokenizer))
    drift = drift_eval_for(ev, run_cfg, work.parent / "root", tok,
                           lambda: load_for_eval(run_cfg, None, cache, "cpu"))
    out = {"base": score(drift.base_model, tok, run_cfg, ev, specs, include, cache, drift)} \
        if with_base else {}
    for r in runs:
        folder = RunFolder(Path(r).resolve())
        cfg = OmegaConf.load(folder.config)
        model = load_for_eval(cfg, folder.checkpoint(checkpoint), cache, "cpu")
        c0 = time.process_time()
        res = score(model, tok, cfg, ev, specs, include, cache, drift)
        res["cpu_s"] = time.process_time() - c0
        out[folder.path.name] = res
        del model
    return out


def _lls(res):
    return {t: np.concatenate([np.asarray(x, float) for x in v["items"]["lls"]])
            for t, v in res["tasks"].items()}


def report(fp, bf) -> None:
    print("\n## per-item log-likelihoods, bf16 vs fp32 (every choice of every item)")
    print("| model | task | items | median |Δll| | max |Δll| | acc agree |")
    print("|---|---|---|---|---|---|")
    for name in fp:
        a, b = _lls(fp[name]), _lls(bf[name])
        for t in a:
            d = np.abs(a[t] - b[t])
            ca = np.asarray(fp[name]["tasks"][t]["items"]["correct"])
            cb = np.asarray(bf[name]["tasks"][t]["items"]["correct"])
            print(f"| {name[:34]} | {t} | {len(ca)} | {np.median(d):.4f} | {d.max():.4f} | "
                  f"{(ca == cb).mean():.3f} |")
    print("\n## paired change vs the base (each precision against its own base)")
    print("| checkpoint | task | Δmargin fp32 [±95%] | Δmargin bf16 | dev/half-width | "
          "Δll fp32 [±95%] | Δll bf16 | dev/half-width |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [n for n in fp if n != "base"]:
        for t in fp[name]["tasks"]:
            row = [name[:34], t]
            for m in ("margin", "ll_gold"):
                pf = paired_change(fp["base"]["tasks"][t]["items"], fp[name]["tasks"][t]["items"])
                pb = paired_change(bf["base"]["tasks"][t]["items"], bf[name]["tasks"][t]["items"])
                half = (pf[f"{m}_delta_hi"] - pf[f"{m}_delta_lo"]) / 2
                dev = abs(pb[f"{m}_delta"] - pf[f"{m}_delta"])
                row += [f"{pf[m + '_delta']:+.4f} [±{half:.4f}]", f"{pb[m + '_delta']:+.4f}",
                        f"{dev / half:.1%}"]
            print("| " + " | ".join(row) + " |")
    print("\n## cross-entropy, drift KL, wall time per scoring")
    print("| model | CE sets fp32 -> bf16 | drift KL fp32 -> bf16 | wall s fp32 | wall s bf16 |")
    print("|---|---|---|---|---|")
    for name in fp:
        ce = ", ".join(f"{k} {fp[name]['ppl'][k]['ce']:.4f}->{bf[name]['ppl'][k]['ce']:.4f}"
                       for k in fp[name]["ppl"])
        kl = [((r.get("drift") or {}).get("variants", {}).get("all") or {}).get("kl", {}).get(
            "mean") for r in (fp[name], bf[name])]
        kl_s = "n/a" if kl[0] is None else f"{kl[0]:.5f}->{kl[1]:.5f}"
        print(f"| {name[:34]} | {ce} | {kl_s} | {fp[name]['wall_time_s']:.1f} | "
              f"{bf[name]['wall_time_s']:.1f} |")


def timing(runs, checkpoint, suite, work, repeats: int) -> None:
    """Wall and process CPU time of one checkpoint's scoring, the precisions alternating (the
    task folder and drift references built; the drift base log-probs are in the time)."""
    print("\n## timing: one checkpoint scored, precisions alternating")
    print("| precision | wall s | CPU s |")
    print("|---|---|---|")
    for _ in range(repeats):
        for prec in ("model", "bf16"):
            res = _score_all(runs[:1], checkpoint, suite, prec, work / f"t-{prec}", False)
            r = res[Path(runs[0]).resolve().name]
            print(f"| {prec} | {r['wall_time_s']:.1f} | {r['cpu_s']:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--checkpoint", default="token-000008192")
    p.add_argument("--suite", default="demo")
    p.add_argument("--work", default="/tmp/precision_check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing", type=int, default=0, help="then time the first run's "
                   "checkpoint this many times per precision")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    results = {}
    for prec in ("model", "bf16"):
        path = work / f"scores-{prec}.json"
        if path.exists():
            results[prec] = json.loads(path.read_text())
            continue
        results[prec] = _score_all(a.runs, a.checkpoint, a.suite, prec, work / prec)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results[prec], default=str))
    report(results["model"], results["bf16"])
    if a.timing:
        timing(a.runs, a.checkpoint, a.suite, work, a.timing)


if __name__ == "__main__":
    main()
