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
# # LoRA against dropout and weight decay (paper sec. 4.5; sweeps/regularisers.yaml)
#
# The runs of the regularisers study (`LEARNFORGET_RUNS_DIR`, default `runs/regularisers`;
# `runs/regularisers_laptop` or `runs/regularisers_toy` for the smaller sizes): full finetuning
# plain, with attention dropout 0.05 / 0.1 and with weight decay 5e-5 / 1e-4, and LoRA at two
# ranks, all on one learning-forgetting plot. An arm is the method and the regularisers that
# differ between the runs (`collect`'s `arm` column, read from each run's config.yaml).
# The paper: dropout and weight decay learn and forget about as much as plain full finetuning;
# LoRA r=16 learns less and forgets less; r=256 learns as much and forgets less.
# Figures and tables go to `LEARNFORGET_ANALYSIS_OUT` (default `<root>/_analysis`), beside
# what `learnforget analyze` writes there.

# %%
import os
from pathlib import Path

from learnforget.analysis import figures
from learnforget.analysis.collect import collect, save_table
from learnforget.analysis.matched import format_table, write_matched
from learnforget.analysis.regime import load_runs, seed_spread

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs/regularisers"))
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))
df = collect(ROOT, verbose=False)
learning, forgetting = figures.learning_column(df), figures.forgetting_column(df)
print(f"{df['run'].nunique()} runs, {df['arm'].nunique()} arms; learning = {learning}, "
      f"forgetting = {forgetting}")

# %% [markdown]
# ## Each arm at each checkpoint (the base model at 0 tokens)

# %%
cols = ["arm", "checkpoint", "epoch", "tokens", learning, forgetting]
cols += [c for c in ("drift_kl", "paired_forgetting_acc_delta") if c in df.columns]
table = df[cols].sort_values(["arm", "tokens"], kind="stable")
print(table.to_string(index=False))
print("table:", *save_table(table, OUT, stem="regularisers_table"))

# %% [markdown]
# ## All arms on one learning-forgetting plot
# One colour per arm; each run is a line from the base model through its checkpoints; the
# Pareto front over every point is ringed. With drift when the suite measured it.

# %%
paths = figures.plot_learning_forgetting(df, OUT, stem="regularisers_learning_vs_forgetting")
if "drift_kl" in df.columns and df["drift_kl"].notna().any():
    paths += figures.plot_learning_forgetting(df, OUT, y="drift_kl",
                                              stem="regularisers_learning_vs_drift")
print("figures:", *paths)

# %% [markdown]
# ## Forgetting at matched learning, per pair of arms
# Each arm's trajectory interpolated at common learning levels (`learnforget.analysis.matched`);
# one seed per arm, so no interval unless the study is rerun with `seed=0,1,...`.

# %%
t, _ = write_matched(df, OUT, learning, forgetting, stem="regularisers_matched", group="arm")
print(format_table(t))

# %% [markdown]
# ## Each arm against plain full finetuning, and two seeds of one arm
# `regime.md` (written by `learnforget analyze` for a per-unit suite: the laptop and toy sizes)
# pairs plain full finetuning with every other arm unit by unit. Its intervals are over the
# units (blocks, items, prompts), not over training seeds; where an arm ran at two seeds the
# table below gives how far the two land apart: a difference between arms within it is not a
# regulariser's effect.

# %%
spread = seed_spread(load_runs(ROOT))
if len(spread):
    print(spread.to_string(index=False, float_format=lambda v: f"{v:+.4g}"))
    print("seed spread:", *save_table(spread, OUT, stem="regularisers_seed_spread"))
else:
    print("every arm ran at one seed: rerun an arm with seed=1 to measure the seed spread")
