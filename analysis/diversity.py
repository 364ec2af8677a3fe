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
# # Generation diversity (paper fig. 5)
#
# Unique completions among a sampled HumanEval task's samples per problem (the paper: 50 at
# temperature 0.2), among all samples, the passing and the failing ones, per method and
# checkpoint, from runs scored with a suite whose sampled HumanEval task sets `diversity`
# (`eval=humaneval_diversity`, `eval=paper`). The paper finds full finetuning collapses
# diversity the most, with LoRA between it and the base model.

# %%
import os
from pathlib import Path

from learnforget.analysis.diversity import (
    collect_diversity,
    diversity_table,
    markdown,
    plot_diversity,
)

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs"))
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))
df = collect_diversity(ROOT)
print(f"{len(df)} problem rows from {df['run'].nunique() if len(df) else 0} runs and bases")

# %% [markdown]
# Per setting x checkpoint: mean per problem with a 95% bootstrap interval over problems, and
# the paired change against the base model on the same problems.

# %%
table = diversity_table(df)
print(markdown(table) if len(table) else f"no diversity results under {ROOT}")

# %% [markdown]
# The distribution behind the means: per problem, unique completions of each setting (the
# base's first), at each setting's last checkpoint.

# %%
if len(df):
    last = df.groupby("setting")["tokens"].transform("max") == df["tokens"]
    wide = (df[last].groupby(["task_id", "setting"])["unique"].mean()
            .unstack("setting").sort_index())
    print(wide.to_string())

# %%
if len(table):
    for p in plot_diversity(table, OUT):
        print(f"wrote {p}")
