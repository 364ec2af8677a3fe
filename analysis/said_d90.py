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

from learnforget.analysis.d90 import d90_from_runs

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs/said_d90"))
SCORE = os.environ.get("LEARNFORGET_D90_SCORE", "target_ce")
table = d90_from_runs(ROOT, SCORE)
print(table.to_string(index=False))
