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
# # Spectra of the weight update (paper section 4.6, fig. 6 and S7)
#
# For every run with checkpoints under `LEARNFORGET_RUNS_DIR` (default `runs`): the
# singular values of ΔW = W_ft - W_base per linear module (LoRA and QLoRA exactly from their
# factors, full finetuning, DoRA and IA3 dense), the rank needed for 90% of the variance per
# layer x module, and how it grows with training tokens. Set `LEARNFORGET_WITH_WEIGHTS=1` for
# the spectra of W_base and W_ft too (fig. S7; dense, slow on 7B models) and
# `LEARNFORGET_GRAM=1` for the faster Gram-matrix route.

# %%
import os
from pathlib import Path

from learnforget.analysis import figures
from learnforget.analysis.collect import collect_spectra, save_table
from learnforget.analysis.spectra import compare_subspaces, compute_spectra, load_spectra
from learnforget.runfolder import RunFolder, find_runs

ROOT = Path(os.environ.get("LEARNFORGET_RUNS_DIR", "runs"))
OUT = Path(os.environ.get("LEARNFORGET_ANALYSIS_OUT", str(ROOT / "_analysis")))
WITH_WEIGHTS = os.environ.get("LEARNFORGET_WITH_WEIGHTS", "0") == "1"
DENSE = "gram" if os.environ.get("LEARNFORGET_GRAM", "0") == "1" else "svd"
THRESHOLD = float(os.environ.get("LEARNFORGET_THRESHOLD", "0.9"))

# %% [markdown]
# ## Compute what is missing (stored in `<run>/spectra/`, skipped when already done)

# %%
runs = [r for r in find_runs(ROOT) if RunFolder(r).checkpoint_dirs()]
done = {}
for run in runs:
    paths = compute_spectra(run, threshold=THRESHOLD, with_weights=WITH_WEIGHTS,
                            dense_method=DENSE)
    if paths:
        done[run] = [load_spectra(run, p.stem) for p in paths]

# %% [markdown]
# ## Rank for 90% of the variance per layer and module (last checkpoint of each run)

# %%
for run, loaded in done.items():
    record = loaded[-1][0]
    print(f"{run.name} @ {record['checkpoint']}: ΔW from {record['delta']}; base: {record['base']}")
    for p in figures.plot_rank_heatmap(record, OUT / "spectra"):
        print(" ", p)

# %% [markdown]
# ## Singular values of ΔW at a middle layer, one curve per checkpoint

# %%
for loaded in done.values():
    for p in figures.plot_spectra_curves(loaded, OUT / "spectra"):
        print(p)

# %% [markdown]
# ## Rank against training tokens, and the table of every module

# %%
table = collect_spectra(ROOT)
print(*save_table(table, OUT, stem="spectra"))
summary = (table[table["matrix"] == "delta"]
           .groupby(["run", "checkpoint", "module_type"])["rank_for_variance"].mean().unstack())
print(summary.round(1).to_string())
for p in figures.plot_rank_vs_tokens(table, OUT / "spectra"):
    print(p)

# %% [markdown]
# ## Do LoRA and full finetuning update the same directions? (Hu et al. 2021, phi in [0, 1])

# %%
by_method = {}
for run in done:
    method = load_spectra(run, RunFolder(run).checkpoint_dirs()[-1].name)[0]["method"]
    by_method.setdefault(method, []).append(run)
for lora_run in by_method.get("lora", [])[:1]:
    for full_run in by_method.get("full", [])[:1]:
        rows = compare_subspaces(lora_run, full_run)
        for r in rows:
            print(f"{r['module']:<40} k={r['k']:<4} phi={r['phi']:.3f}")
