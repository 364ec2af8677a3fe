"""Intruder dimensions: a planted intruder is found exactly; peft's detection agrees."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from learnforget.analysis.intruders import (
    chance_level,
    collect_intruders,
    compute_intruders,
    count,
    energy_share,
    left_singular,
    module_row,
    similarities,
    summary,
)
from learnforget.errors import ConfigError
from learnforget.train.loop import fit, setup


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))
    return q


def planted(theta_deg: float):
    """W_base = U diag(s) V^T (64 x 16); W_ft rotates u_1 by theta towards x, a direction
    orthogonal to every base left singular vector. Returns (W_base, W_ft, U, x)."""
    rng = np.random.default_rng(0)
    u = orthonormal(64, 16, 1)
    v = orthonormal(16, 16, 2)
    s = np.linspace(10.0, 1.0, 16)
    x = rng.standard_normal(64)
    x -= u @ (u.T @ x)
    x /= np.linalg.norm(x)
    th = math.radians(theta_deg)
    u_ft = u.copy()
    u_ft[:, 0] = math.cos(th) * u[:, 0] + math.sin(th) * x
    w_base = torch.from_numpy(u @ np.diag(s) @ v.T)
    w_ft = torch.from_numpy(u_ft @ np.diag(s) @ v.T)
    return w_base, w_ft, u, x


@pytest.mark.parametrize("theta", [80.0, 30.0])
def test_planted_intruder_is_found_exactly(theta):
    w_base, w_ft, _, _ = planted(theta)
    u_base, _ = left_singular(w_base)
    row = module_row("m", "q_proj", 0, u_base, w_ft, w_ft - w_base, ks=(10,),
                     epsilons=(0.1, 0.2, 0.5, 0.9))
    c = math.cos(math.radians(theta))
    # the top direction of W_ft is the rotated u_1: its best match is u_1, |cos| = cos(theta)
    assert row["sims"][0] == pytest.approx(c, abs=1e-9)
    assert row["sims"][1:] == pytest.approx([1.0] * 9, abs=1e-9)  # the others are base vectors
    expected = {e: int(c < e) for e in (0.1, 0.2, 0.5, 0.9)}
    assert row["counts"]["10"] == {f"{e:g}": n for e, n in expected.items()}
    # energy: ΔW = s_1 (u_1' - u_1) v_1^T; the share along u_1' is (1 - cos) / 2 (ε = 0.5)
    assert row["energy"] == pytest.approx((1 - c) / 2 if c < 0.5 else 0.0, abs=1e-9)


def test_energy_share_of_a_rank_one_update_along_the_intruder():
    u = torch.eye(4, dtype=torch.float64)[:, :2]
    delta = torch.zeros(4, 3, dtype=torch.float64)
    delta[0, 0], delta[1, 1] = 3.0, 4.0
    assert energy_share(u, [0.0, 0.9], delta, 10, 0.5) == pytest.approx(9 / 25)
    assert energy_share(u, [0.0, 0.1], delta, 10, 0.5) == pytest.approx(1.0)
    assert count([0.05, 0.3, 0.7], 2, 0.5) == 2 and count([0.05, 0.3, 0.7], 1, 0.5) == 1


def test_chance_level_matches_the_distribution_of_a_random_coordinate():
    # d = 2, m = 1: a random unit vector's |first coordinate| = |cos(phi)|, phi uniform;
    # P(|cos phi| < e) = 1 - 2 acos(e) / pi, E|cos phi| = 2 / pi
    lvl = chance_level((2, 2), epsilons=(0.5,))
    lvl1 = chance_level((2, 1), epsilons=(0.5,))
    assert lvl["chance_rate"]["0.5"] == 0.0  # two orthonormal vectors: max >= 1/sqrt(2)
    assert lvl1["chance_mean"] == pytest.approx(2 / math.pi, abs=0.02)
    assert lvl1["chance_rate"]["0.5"] == pytest.approx(1 - 2 * math.acos(0.5) / math.pi,
                                                       abs=0.02)
    # a wide module: random directions are intruders at ε = 0.5 almost surely
    assert chance_level((4096, 4096), epsilons=(0.5,))["chance_rate"]["0.5"] == 1.0


def test_similarities_are_one_for_the_base_itself():
    w, _, _, _ = planted(0.0)
    u, _ = left_singular(w)
    np.testing.assert_allclose(similarities(u, u), np.ones(16), atol=1e-12)


# ------------------------------------------------------------------ a real tiny LoRA run

def test_harness_and_peft_find_the_same_intruders(make_cfg, cache_dir, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    cfg = make_cfg("method=lora", "method.r=4", "train.lr=5e-2", "train.precision=fp32",
                   "method.dropout=0.0")
    run = fit(setup(cfg))
    svd_cache = tmp_path / "svd-cache"  # a fresh base-SVD cache (the session cache may hold it)
    paths = compute_intruders(run, "step-000002", verbose=False, cache_dir=svd_cache)
    import json

    rec = json.loads(paths[0].read_text())
    assert len(rec["rows"]) == 14 and rec["base_svd_cache_hits"] == 0
    ours = {r["module"]: r for r in rec["rows"]}
    info = json.loads((run / "run.json").read_text())
    counted = {}
    for eps in (0.5, 0.9):
        model = AutoModelForCausalLM.from_pretrained(info["run"]["base_model"],
                                                     dtype=torch.float32)
        model = PeftModel.from_pretrained(model, run / "checkpoints" / "step-000002")
        lines: list[str] = []
        reduce_intruder_dimension(model, top_k=10, threshold_epsilon=eps,
                                  logging_sink=lines.append)
        peft_counts = {}
        for line in lines:
            m = re.match(r"base_model\.model\.(.+): (?:Intruders: (\d+)|No intruders)", line)
            if m:
                peft_counts[m.group(1)] = int(m.group(2) or 0)
        assert set(peft_counts) == set(ours)
        for name, n in peft_counts.items():
            assert ours[name]["counts"]["10"][f"{eps:g}"] == n, (name, eps)
        counted[eps] = sum(peft_counts.values())
    assert counted[0.9] > 0  # the comparison is not only of zeros
    # a second run on the same base reads every base SVD from the cache
    rec2 = json.loads(compute_intruders(run, "step-000002", force=True, verbose=False,
                                        cache_dir=svd_cache)[0].read_text())
    assert rec2["base_svd_cache_hits"] == 14  # stored in float32: similarities to ~1e-6
    for a, b in zip(rec2["rows"], rec["rows"], strict=True):
        np.testing.assert_allclose(a["sims"], b["sims"], atol=1e-5)
    df = collect_intruders(cfg.paths.runs_dir)
    assert len(df) == 14 and set(df["k"]) == {10}
    s = summary(df)
    assert set(s["module_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"}
    with pytest.raises(ConfigError, match="thresholds"):
        compute_intruders(run, epsilons=(1.5,))


def test_mitigated_run_has_peft_mitigation_known_answer(make_cfg):
    """The derived run's ΔW = the rank-r truncation of (W_merged + (λ - 1) Σ_intruders
    s_i u_i v_i^T) - W_base, computed here with numpy from the original checkpoint."""
    import json

    from learnforget.analysis.deltas import extract_deltas
    from learnforget.analysis.intruder_mitigation import mitigate_run

    cfg = make_cfg("method=lora", "method.r=4", "train.lr=5e-2", "train.precision=fp32",
                   "method.dropout=0.0")
    run = fit(setup(cfg))
    derived = mitigate_run(run, threshold_epsilon=0.9, mitigation_lambda=0.5)
    info = json.loads((derived / "run.json").read_text())
    assert info["run"]["method_summary"].endswith("+intr0.5")
    assert (derived / "checkpoints/step-000002/adapter_model.safetensors").exists()
    orig = {md.name: md for md in extract_deltas(run, "step-000002", with_weights=True)}
    new = {md.name: md for md in extract_deltas(derived, "step-000002")}
    n_intruders = 0
    for name, md in orig.items():
        w = md.base.double().numpy()
        wm = w + md.to_dense().numpy()
        ub = np.linalg.svd(w, full_matrices=False)[0]
        u, s, vt = np.linalg.svd(wm, full_matrices=False)
        sims = np.abs(u[:, :10].T @ ub).max(axis=1)
        idx = np.flatnonzero(sims < 0.9)
        n_intruders += idx.size
        wmit = wm + (0.5 - 1) * (u[:, idx] * s[idx]) @ vt[idx]
        du, ds, dvt = np.linalg.svd(wmit - w, full_matrices=False)
        expect = (du[:, :4] * ds[:4]) @ dvt[:4]
        got = new[name].to_dense().numpy()
        np.testing.assert_allclose(got, expect, atol=1e-4 * np.abs(expect).max() + 1e-7)
        assert info["intruder_mitigation"]["intruders"]["step-000002"][name] == idx.size
    assert n_intruders > 0
    with pytest.raises(ConfigError, match="mitigation_lambda"):
        mitigate_run(run, mitigation_lambda=2.0)

    # the same through the command line: a sibling run per λ, the same intruders found
    from learnforget.cli import main

    assert main(["mitigate", str(run), "--lambda", "0.25", "--eps", "0.9"]) == 0
    info2 = json.loads((run.parent / f"{run.name}-intr0.25" / "run.json").read_text())
    assert info2["intruder_mitigation"]["mitigation_lambda"] == 0.25
    assert info2["intruder_mitigation"]["intruders"] == info["intruder_mitigation"]["intruders"]
    assert main(["mitigate", str(run), "--lambda", "big"]) == 2
    assert main(["mitigate", str(run), "--sigma", "1"]) == 2
    assert main(["mitigate", str(run), "--lambda", "3"]) != 0  # out of [0, 1]: one line


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (30, 30)])
def test_top_left_singular_matches_numpy_svd(shape):
    """The Gram-matrix route gives numpy's leading left singular vectors (up to sign)."""
    from learnforget.analysis.intruders import top_left_singular

    rng = np.random.default_rng(1)
    m, n = shape
    q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.linspace(10.0, 1.0, min(m, n))  # distinct singular values
    w = q1[:, : len(s)] @ np.diag(s) @ q2[:, : len(s)].T
    u_ref = np.linalg.svd(w, full_matrices=False)[0][:, :8]
    u = top_left_singular(torch.from_numpy(w), 8).numpy()
    assert u.shape == (m, 8)
    np.testing.assert_allclose(np.abs((u * u_ref).sum(axis=0)), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, atol=1e-9)


# ------------------------------------------------------------------ truncated vs full SVD

def spectrum_matrix(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    return orthonormal(m, len(s), seed) @ np.diag(s) @ orthonormal(n, len(s), seed + 1).T


@pytest.mark.parametrize("svd,route", [("partial", "partial (gram)"),
                                       ("partial", "partial (krylov)"),
                                       ("truncated", "truncated")])
@pytest.mark.parametrize("shape", [(200, 300), (300, 200)])
def test_checked_top_vectors_match_numpy_svd_within_their_bound(shape, svd, route,
                                                                monkeypatch):
    """A slowly decaying spectrum (s_i = i^-0.35, like a pretrained weight's): the checked
    route is taken (the partial one through the Gram matrix, or through Lanczos as on large
    matrices), its vectors are numpy's (up to sign) and each one's true angle to numpy's
    vector is below the bound it reports, which is below the tolerance."""
    from learnforget.analysis import svd as svd_module
    from learnforget.analysis.intruders import top_left
    from learnforget.analysis.svd import TOP_TOL

    if route == "partial (krylov)":
        monkeypatch.setattr(svd_module, "KRYLOV_MIN", 0)
    m, n = shape
    s = np.arange(1, min(m, n) + 1) ** -0.35
    w = spectrum_matrix(m, n, s, 3)
    top = top_left(torch.from_numpy(w).float(), 20, svd)
    assert top["route"] == route and top["bound"] <= TOP_TOL
    u_ref = np.linalg.svd(w.astype(np.float32).astype(np.float64), full_matrices=False)[0][:, :20]
    u = top["u"].numpy()
    # the chord |u - ±u_ref| = 2 sin(angle / 2) >= sin(angle), without cos's rounding
    chord = np.linalg.norm(u - np.sign((u * u_ref).sum(axis=0)) * u_ref, axis=0)
    assert chord.max() <= top["bound"] + 1e-10
    np.testing.assert_allclose(top["s"].numpy(), np.linalg.svd(
        w.astype(np.float32).astype(np.float64), compute_uv=False)[:20], rtol=1e-9)


@pytest.mark.parametrize("svd", ["partial", "krylov", "truncated"])
def test_tied_singular_values_fail_the_check_and_take_the_full_route(svd, monkeypatch):
    """s_5 = s_6 (to rounding): the 5th and 6th vectors are not determined, no bound holds
    (residuals count at least their rounding error), and the result is the full route's,
    exactly."""
    from learnforget.analysis import svd as svd_module
    from learnforget.analysis.intruders import top_left, top_left_singular

    if svd == "krylov":
        monkeypatch.setattr(svd_module, "KRYLOV_MIN", 0)
        svd = "partial"
    s = np.arange(1, 101) ** -0.35
    s[5] = s[4]
    w = torch.from_numpy(spectrum_matrix(100, 120, s, 4))
    top = top_left(w, 20, svd)
    assert top["route"] == "full (check failed)" and top["attempts"] == 1
    assert torch.equal(top["u"], top_left_singular(w, 20))
    # nothing to save: k + 8 = 28 (partial) or q = 48 (truncated) >= the columns
    small = top_left(w[:, :28 if svd == "partial" else 48], 20, svd)
    assert small["route"] == "full (small)"
    assert top_left(w[:, :29], 20, "partial")["route"].startswith("partial (")
    with pytest.raises(ConfigError, match="unknown"):
        top_left(w, 20, "sketchy")


def test_checked_routes_equal_numpy_full_svd_on_a_real_full_finetune(make_cfg, tmp_path):
    """A real tiny full finetune: the default (partial) route's and the truncated route's
    similarities and counts equal those from numpy's full SVDs of W_base and W_ft (the
    independent reference: sims within 1e-4, every count of the grid the same), and so do the
    full route's. A record of the full route serves a later truncated request; a truncated
    one does not serve a full request."""
    import json

    from learnforget.analysis.deltas import extract_deltas
    from learnforget.analysis.intruders import EPSILONS, KS

    cfg = make_cfg("method=full", "train.lr=3e-3", "train.precision=fp32")
    run = fit(setup(cfg))
    cache = tmp_path / "svd-cache"
    path = compute_intruders(run, "step-000002", cache_dir=cache, verbose=False)[0]
    part = json.loads(path.read_text())
    assert part["settings"]["svd"] == "partial" and part["svd"]["method"] == "partial"
    assert part["svd"]["routes"].get("partial (gram)", 0) >= 10, part["svd"]  # of 14
    assert part["svd"]["max_bound"] <= 1e-5
    path = compute_intruders(run, "step-000002", cache_dir=cache, svd="truncated",
                             verbose=False)[0]
    trunc = json.loads(path.read_text())
    assert trunc["settings"]["svd"] == "truncated" and trunc["svd"]["method"] == "truncated"
    assert trunc["svd"]["routes"].get("truncated", 0) >= 10, trunc["svd"]  # of 14 modules
    ref = {}
    for md in extract_deltas(run, "step-000002", with_weights=True):
        ub = np.linalg.svd(md.base.double().numpy(), full_matrices=False)[0]
        uf = np.linalg.svd(md.ft.double().numpy(), full_matrices=False)[0][:, :20]
        ref[md.name] = np.abs(uf.T @ ub).max(axis=1)
    assert sum(count(s, 10, 0.9) for s in ref.values()) > 0  # not only non-intruders
    assert sum(count(s, 20, 0.9) < 20 for s in ref.values()) > 0  # nor only intruders
    full_path = compute_intruders(run, "step-000002", cache_dir=cache, svd="full",
                                  verbose=False)[0]
    full = json.loads(full_path.read_text())
    assert full["svd"]["routes"] == {"full": 14}
    for rec in (part, trunc, full):
        assert {r["module"] for r in rec["rows"]} == set(ref)
        for r in rec["rows"]:
            np.testing.assert_allclose(r["sims"], ref[r["module"]], atol=1e-4)
            assert r["counts"] == {str(k): {f"{e:g}": count(ref[r["module"]], k, e)
                                            for e in EPSILONS} for k in KS}, r["module"]
    before = full_path.stat().st_mtime_ns  # the full record serves a truncated request
    compute_intruders(run, "step-000002", cache_dir=cache, svd="truncated", verbose=False)
    assert full_path.stat().st_mtime_ns == before
    assert json.loads(full_path.read_text())["settings"]["svd"] == "full"
    with pytest.raises(ConfigError, match="intruder svd 'lanczos'"):
        compute_intruders(run, svd="lanczos")


def test_bench_intruders_small_shapes_agree():
    """The bench's two parts on small shapes: the checked routes give the full route's
    counts and similarities; the 7B-style scaling adds up (the mean over matrices per shape
    times the module count)."""
    from learnforget.bench.intruders import (
        bench_7b_shapes,
        format_intruders,
        planted_spectrum_matrix,
        synthetic_update,
        time_modules,
    )

    g = torch.Generator().manual_seed(0)
    mods = []
    for i, (m, n) in enumerate([(96, 96), (160, 96), (96, 160)]):
        w = planted_spectrum_matrix(m, n, g, alpha=0.5)
        mods.append((f"layers.0.m{i}", f"m{i}", 0, w, (w.double() + synthetic_update(
            w, True, g)).float()))
    res = time_modules(mods)
    assert res["modules"] == 3 and res["full_s"] > 0 and res["partial_s"] > 0
    for c in ("partial", "truncated"):
        assert res[f"{c}_counts_equal"] and res[f"{c}_max_sim_diff"] <= 1e-4
        assert sum(res[f"{c}_routes"].values()) == 3
    assert res["partial_routes"] == {"partial (gram)": 3}
    some = time_modules(mods, routes=["partial"])  # the full route always runs
    assert {k for k in some if k.endswith("_s")} == {"base_svd_s", "full_s", "partial_s"}
    assert some["partial_counts_equal"] and "truncated_routes" not in some
    assert " - " in format_intruders({"torch_threads": 1, "k": 20, "model": "m",
                                      "checkpoints": {"synthetic": some}})
    with pytest.raises(ConfigError, match="'lanczos'"):
        time_modules(mods, routes=["lanczos"])
    s7 = bench_7b_shapes((("q", 96, 96), ("up", 160, 96), ("k", 96, 96)), layers=2,
                         per_shape=2)
    assert s7["n_modules"] == 6 and set(s7["shapes"]) == {"96x96", "160x96"}
    sh = s7["shapes"]
    assert sh["96x96"]["routes"] == {"partial (gram)": 2} and sh["96x96"]["matrices"] == 2
    assert s7["per_checkpoint_full_s"] == pytest.approx(
        4 * sh["96x96"]["full_s"] + 2 * sh["160x96"]["full_s"])
    assert s7["per_checkpoint_partial_s"] == pytest.approx(
        4 * sh["96x96"]["partial_s"] + 2 * sh["160x96"]["partial_s"])
    assert s7["max_vector_diff"] < 1e-4
    text = format_intruders({"torch_threads": 1, "k": 20, "model": "m",
                             "checkpoints": {"synthetic": res}, "shapes_7b": s7})
    assert "partial against full" in text and "per checkpoint: full" in text
    with pytest.raises(ConfigError, match="per shape"):
        bench_7b_shapes((("q", 96, 96),), per_shape=0)
