"""The rank for 90% of the variance of a Gaussian matrix of a module's shape: the number a
ΔW spectrum that is "as spread as noise" would give.

For an m x n matrix with i.i.d. entries (p = min(m, n), q = max(m, n), λ = p / q), the
squared singular values / q follow the Marchenko-Pastur law on [(1 - √λ)², (1 + √λ)²] with
density sqrt((b - x)(x - a)) / (2π λ x). Its quantiles at (i - 1/2) / p, i = 1..p, are the
typical eigenvalues; the rank for a variance share is taken from them exactly as
learnforget.analysis.svd.rank_for_variance does from a real spectrum. The entries' scale cancels.
test_noise_baseline.py checks it against numpy SVDs of sampled Gaussian matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

GRID = 20001


@lru_cache(maxsize=64)
def mp_singular_values(m: int, n: int) -> np.ndarray:
    """Typical singular values (descending, unit scale) of an m x n Gaussian matrix."""
    p, q = min(m, n), max(m, n)
    lam = p / q
    a, b = (1 - lam ** 0.5) ** 2, (1 + lam ** 0.5) ** 2
    x = np.linspace(a, b, GRID)
    dens = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * np.pi * lam * np.maximum(x, 1e-300))
    if lam == 1:  # the density has an integrable 1/sqrt(x) spike at 0: integrate in sqrt(x)
        dens[0] = 0.0
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    cdf /= cdf[-1]
    eig = np.interp((np.arange(p) + 0.5) / p, cdf, x)
    return np.sqrt(eig)[::-1]


def gaussian_rank_for_variance(shape: Sequence[int], threshold: float = 0.9) -> int:
    from learnforget.analysis.svd import rank_for_variance

    return rank_for_variance(mp_singular_values(int(shape[0]), int(shape[1])), threshold)


def add_gaussian_column(spectra: pd.DataFrame) -> pd.DataFrame:
    """spectra (collect_spectra's table) with gaussian_rank_for_variance beside
    rank_for_variance (at each row's threshold) and their ratio."""
    if not len(spectra) or "shape" not in spectra.columns:
        return spectra
    out = spectra.copy()

    def one(row) -> float:
        try:
            m, n = (int(v) for v in str(row["shape"]).split("x"))
        except ValueError:
            return float("nan")
        thr = row.get("threshold")
        return float(gaussian_rank_for_variance((m, n), float(thr) if thr == thr and thr
                                                else 0.9))

    out["gaussian_rank_for_variance"] = out.apply(one, axis=1)
    out["rank_over_gaussian"] = out["rank_for_variance"] / out["gaussian_rank_for_variance"]
    return out


def rank_context_table(spectra: pd.DataFrame) -> pd.DataFrame:
    """ΔW's rank for 90% per method setting, tokens and module type (mean over layers and
    runs) beside the Gaussian matrix's of that shape."""
    sdf = spectra[spectra["matrix"] == "delta"] if "matrix" in spectra.columns else spectra
    g = sdf.groupby(["method_summary", "tokens", "module_type", "shape"], sort=True,
                    dropna=False)
    return g.agg(rank_for_variance=("rank_for_variance", "mean"),
                 gaussian_rank_for_variance=("gaussian_rank_for_variance", "first"),
                 rank_over_gaussian=("rank_over_gaussian", "mean")).reset_index()
