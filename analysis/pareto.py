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
# # Learning vs forgetting (paper fig. 1 and 4)
#
# Every run under the runs root (`LEARNFORGET_RUNS_DIR`, default `runs`) with an eval
# summary becomes rows of one table (one row per run x checkpoint, the base model at 0
# tokens). Learning is the target-domain score; forgetting is the general-task score when the
# suite has one, else the general-text cross-entropy. Figures go to
# `LEARNFORGET_ANALYSIS_OUT` (default `<root>/_analysis`).

# %%
import os
from pathlib import Path

from learnforget.analysis import figures
from learnforget.analysis.collect import collect, pareto_front, save_table

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs"))
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))

# %% [markdown]
# ## The table
# Runs without an eval summary are listed as warnings and left out.

# %%
df = collect(ROOT)
for w in df.attrs["warnings"]:
    print("skipped:", w)
print("table:", *save_table(df, OUT))
cols = ["run", "method", "rank", "checkpoint", "tokens", "target_score", "forgetting_score",
        "target_ce", "forgetting_ce"]
print(df[cols].to_string())

# %% [markdown]
# ## The Pareto front
# A checkpoint is on the front when no other checkpoint learns at least as much and forgets
# at most as much (and is strictly better in one of the two).

# %%
y = figures.forgetting_column(df)
df["on_front"] = pareto_front(df, "target_score", y)
print(f"forgetting measure: {y}")
print(df.loc[df["on_front"], ["run", "checkpoint", "tokens", "target_score", y]].to_string())

# %% [markdown]
# ## Figures

# %%
for p in figures.plot_learning_forgetting(df, OUT, y=y):
    print(p)
for p in figures.plot_vs_tokens(df, OUT, y=y):
    print(p)
