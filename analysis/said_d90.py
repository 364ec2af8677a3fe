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
# # Intrinsic dimension: d90 of SAID beside LoRA's matched count (sweeps/said_d90.yaml)
#
# The runs of the said_d90 study (`LEARNFORGET_RUNS_DIR`, default `runs/said_d90`): per
# projection seed, the grid bracket of d90, its log-linear estimate, the bisection's next d and
# the fewest LoRA parameters reaching the same score (docs/said.md). Anchors (SAID d90 on MRPC,
# Aghajanyan et al. 2020): RoBERTa-large 207, RoBERTa-base 896, BERT-base 1,608.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt

from learnforget.analysis.collect import collect
from learnforget.analysis.d90 import d90_from_runs, intrinsic_settings

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs/said_d90"))
SCORE = os.environ.get("LEARNFORGET_D90_SCORE", "target_ce")
table = d90_from_runs(ROOT, SCORE)
print(table.to_string(index=False))

# %% [markdown]
# Score against d per projection seed (log axis), with the 90% threshold (from full
# finetuning's score): the curve crossing the threshold is d90 (figure `said_d90.png`/`.svg` in
# `LEARNFORGET_ANALYSIS_OUT`, default `<runs>/_analysis`).

# %%
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))
OUT.mkdir(parents=True, exist_ok=True)
runs = intrinsic_settings(collect(ROOT, verbose=False))
trained = runs[runs["checkpoint"] != "base"].copy()
trained["_step"] = trained["step"].fillna(0)
last = trained.sort_values("_step").groupby("run", sort=False).tail(1)
fig, ax = plt.subplots(figsize=(6, 4))
intrinsic = last[last["d"].notna()]
for seed, grp in intrinsic.groupby("projection_seed"):
    grp = grp.sort_values("d")
    ax.plot(grp["d"], grp[SCORE], "o-", label=f"projection seed {int(seed)}")
if not table.empty and "threshold" in table:
    ax.axhline(float(table["threshold"].iloc[0]), color="k", ls="--", lw=1, label="90% threshold")
if intrinsic.empty:
    ax.text(0.5, 0.5, f"no SAID/DID runs under {ROOT}", ha="center", transform=ax.transAxes)
else:
    ax.set_xscale("log")
ax.set_xlabel("d (trained intrinsic parameters)")
ax.set_ylabel(SCORE)
ax.legend(fontsize=8)
for ext in ("png", "svg"):
    fig.savefig(OUT / f"said_d90.{ext}", bbox_inches="tight")
print(f"wrote {OUT / 'said_d90.png'}")
