"""The Gaussian baseline beside the rank for 90%: Marchenko-Pastur against numpy SVDs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from learnforget.analysis.noise_baseline import add_gaussian_column, gaussian_rank_for_variance


def sampled_rank(m: int, n: int, threshold: float, seed: int) -> int:
    s = np.linalg.svd(np.random.default_rng(seed).standard_normal((m, n)), compute_uv=False)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.searchsorted(share, threshold - 1e-12) + 1)


@pytest.mark.parametrize(("m", "n"), [(256, 256), (64, 256), (256, 64), (300, 1000)])
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_marchenko_pastur_rank_matches_sampled_gaussians(m, n, threshold):
    sampled = [sampled_rank(m, n, threshold, seed) for seed in range(3)]
    got = gaussian_rank_for_variance((m, n), threshold)
    assert abs(got - np.mean(sampled)) <= max(1.0, 0.01 * min(m, n)), (got, sampled)


def test_gaussian_column_beside_rank():
    df = pd.DataFrame({"shape": ["64x256", "64x64"], "threshold": [0.9, 0.9],
                       "rank_for_variance": [10, 3], "matrix": ["delta", "delta"]})
    out = add_gaussian_column(df)
    assert list(out["gaussian_rank_for_variance"]) == [gaussian_rank_for_variance((64, 256)),
                                                       gaussian_rank_for_variance((64, 64))]
    # a square Gaussian needs about half its width for 90% (numpy: the mean of 5 samples)
    sampled = np.mean([sampled_rank(64, 64, 0.9, seed) for seed in range(5)])
    assert abs(out["gaussian_rank_for_variance"].iloc[1] - sampled) <= 1.0
    assert out["rank_over_gaussian"].iloc[1] == pytest.approx(3 / out[
        "gaussian_rank_for_variance"].iloc[1])
