# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Scaling laws for transfer, text -> Python (sweeps/transfer.yaml)
#
# The runs of the transfer study (`LEARNFORGET_RUNS_DIR`, default `runs/transfer`): per model
# size N (non-embedding parameters) the early-stopped held-out code loss of each run from
# scratch and of each run finetuned from the Shakespeare-pretrained model, at the same data
# sizes D (characters). D_E inverts the from-scratch loss-vs-D curve of the same N; D_T = D_E -
# D_F; the fit D_T = k D_F^alpha N^beta on the low-data regime, beside Hernandez et al. 2021's
# text -> Python fit (k = 1.9e4, alpha = 0.18, beta = 0.38). docs/transfer.md.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt

from learnforget.analysis.transfer import effective_data, load_runs, tune_lr, write_transfer

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs/transfer"))
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))
runs = load_runs(ROOT)
if runs.empty or not (runs["arm"] == "finetuned").any():
    print(f"no transfer runs under {ROOT} (none finetuned from a source run; `learnforget sweep"
          " transfer --size toy` makes some)")
    raise SystemExit(0)
print(runs.to_string(index=False))
# several learning rates per cell (sweeps/transfer_lr.yaml): each model/arm/source/D keeps its best
runs = tune_lr(runs)

# %% [markdown]
# Early-stopped loss against D per N: from scratch (solid) and finetuned from each source
# (dashed, dotted). The gap read horizontally at a finetuned point's loss is D_E / D_F.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
styles = ["s--", "D:", "v-."]
for n, grp in runs[runs["arm"] != "source"].groupby("N"):
    part = grp[grp["arm"] == "scratch"].sort_values("D")
    line = ax.plot(part["D"], part["best_loss"], "o-", label=f"N = {n:,} scratch")[0]
    tuned = grp[grp["arm"] == "finetuned"]
    for i, (src, ft) in enumerate(tuned.groupby("source")):
        ft = ft.sort_values("D")
        ax.plot(ft["D"], ft["best_loss"], styles[i % len(styles)], color=line.get_color(),
                label=f"N = {n:,} from {src}")
ax.set_xscale("log")
ax.set_xlabel("D (characters)")
ax.set_ylabel("early-stopped held-out loss (nats/token)")
ax.legend(fontsize=7)
OUT.mkdir(parents=True, exist_ok=True)
for ext in ("png", "svg"):
    fig.savefig(OUT / f"transfer_loss_vs_data.{ext}", bbox_inches="tight")

# %% [markdown]
# D_E, D_T and the multiplier per finetuned run; the fit with 95% bootstrap intervals and the
# multiplier figure (`transfer_multiplier.png` in `LEARNFORGET_ANALYSIS_OUT`).

# %%
print(effective_data(runs).to_string(index=False))
paths = write_transfer(ROOT, OUT)
print(json.dumps(json.loads((OUT / "transfer_fit.json").read_text()), indent=1))
print("\n".join(map(str, paths)))
