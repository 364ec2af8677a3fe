"""The intruder test's default (partial) route on a real SmolLM2-135M checkpoint: on every
module, the same counts as numpy's full SVDs and similarities within 1e-4, through both of its
solvers (the Gram matrix's top eigenpairs, used at this size, and Lanczos, used from 4M
elements). Slow: a short full finetune of the real model and 420 numpy SVDs, minutes on 2
cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from learnforget.analysis import svd as svd_module
from learnforget.analysis.deltas import extract_deltas
from learnforget.analysis.intruders import EPSILONS, KS, compute_intruders, count
from learnforget.config import compose
from learnforget.train.loop import fit, setup

pytestmark = pytest.mark.slow


def test_partial_route_equals_numpy_full_svd_on_every_smollm2_module(tmp_path, monkeypatch):
    cache = os.environ.get("LEARNFORGET_CACHE_DIR", str(Path.home() / ".cache/learnforget"))
    cfg = compose([f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache}", "logger=none",
                   "model=smollm2_135m", "method=full", "data=stdlib_code",
                   "data.max_docs=40", "data.heldout_docs=4", "train.seq_len=64",
                   "train.batch_size=2", "train.lr=1e-3", "train.checkpoints.unit=steps",
                   "train.checkpoints.at=[2]", "train.heldout_batches=1"])
    run = fit(setup(cfg))
    ref, shapes = {}, set()
    for md in extract_deltas(run, "step-000002", with_weights=True):
        ub = np.linalg.svd(md.base.double().numpy(), full_matrices=False)[0]
        uf = np.linalg.svd(md.ft.double().numpy(), full_matrices=False)[0][:, :20]
        ref[md.name] = np.abs(uf.T @ ub).max(axis=1)
        shapes.add(tuple(md.ft.shape))
    assert len(ref) == 210 and len(shapes) == 4  # q/o, k/v, gate/up, down
    svd_cache = tmp_path / "svd-cache"
    for solver, krylov_min in (("gram", svd_module.KRYLOV_MIN), ("krylov", 0)):
        monkeypatch.setattr(svd_module, "KRYLOV_MIN", krylov_min)
        path = compute_intruders(run, "step-000002", cache_dir=svd_cache, force=True,
                                 verbose=False)[0]
        rec = json.loads(path.read_text())
        assert rec["svd"]["routes"] == {f"partial ({solver})": 210}, rec["svd"]
        assert rec["svd"]["max_bound"] <= 1e-5
        assert {r["module"] for r in rec["rows"]} == set(ref)
        for r in rec["rows"]:
            np.testing.assert_allclose(r["sims"], ref[r["module"]], atol=1e-4)
            assert r["counts"] == {str(k): {f"{e:g}": count(ref[r["module"]], k, e)
                                            for e in EPSILONS} for k in KS}, r["module"]
