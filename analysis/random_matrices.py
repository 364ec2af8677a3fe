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
# # Random-matrix comparison (paper fig. S8)
#
# i.i.d. N(0, 1) matrices A and B (n x n, `LEARNFORGET_RANDOM_N`, default 1000, seeded): the
# spectra of A, A + cB and cB at c = 0.1, and the mean absolute difference between the
# spectra of A + cB and A as c grows. A small random perturbation barely moves the spectrum
# of A, which is why W_ft and W_base can have near-identical spectra while ΔW is high-rank.
# Figures go to `LEARNFORGET_ANALYSIS_OUT` (default `<LEARNFORGET_RUNS_DIR>/_analysis`).

# %%
import os
from pathlib import Path

from learnforget.analysis import figures
from learnforget.analysis.spectra import dump_json, random_matrix_comparison

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs"))
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))
N = int(os.environ.get("LEARNFORGET_RANDOM_N", "1000"))

# %%
result = random_matrix_comparison(n=N, c=0.1, seed=0)
print("rank for 90% of the variance:", result["rank_for_variance"])
for c, d in zip(result["cs"], result["mean_abs_diff"], strict=True):
    print(f"c = {c:8.4f}   mean |s(A + cB) - s(A)| = {d:.4f}")

# %%
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "random_matrices.json").write_text(dump_json(result) + "\n")
for p in figures.plot_random_matrices(result, OUT):
    print(p)
