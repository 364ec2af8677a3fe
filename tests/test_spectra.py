"""ΔW spectra: exact low-rank route, summaries, subspaces, and extraction from real tiny runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from learnforget.analysis.deltas import dequantised_base, extract_deltas
from learnforget.analysis.spectra import compute_spectra, load_spectra, random_matrix_comparison
from learnforget.analysis.svd import (
    dense_svdvals,
    effective_rank,
    lowrank_svd,
    lowrank_svdvals,
    numerical_rank,
    rank_for_variance,
    spectrum_summary,
    stable_rank,
    subspace_similarity,
)
from learnforget.analysis.weights import module_types, parse_module
from learnforget.errors import ConfigError
from learnforget.train.loop import fit, setup


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))
    return q


# ------------------------------------------------------------------ synthetic matrices

def test_known_singular_values_give_known_ranks():
    s = np.array([10.0, 5.0, 3.0, 1.0, 0.5])  # squares 100, 25, 9, 1, 0.25: total 135.25
    U, V = orthonormal(40, 5, 0), orthonormal(30, 5, 1)
    M = U @ np.diag(s) @ V.T
    for method in ("svd", "gram"):
        got = dense_svdvals(M, method, dtype=torch.float64)
        assert got.shape == (30,)
        np.testing.assert_allclose(got[:5], s, rtol=1e-9)
        assert (got > 1e-6 * got[0]).sum() == 5
    # cumulative shares: .7394, .9242, .9908, .9982, 1
    assert rank_for_variance(s, 0.7) == 1
    assert rank_for_variance(s, 0.9) == 2
    assert rank_for_variance(s, 0.93) == 3
    assert rank_for_variance(s, 0.995) == 4
    assert rank_for_variance(s, 1.0) == 5
    assert rank_for_variance(np.array([3.0, 1.0]), 0.9) == 1  # exactly 9/10: no rounding miss
    assert rank_for_variance(np.zeros(4)) == 0
    # the same matrix as factors B = U diag(s), A = V^T: exactly 5 values
    fast = lowrank_svdvals(U * s, V.T)
    np.testing.assert_allclose(fast, s, rtol=1e-12)
    summ = spectrum_summary(dense_svdvals(M, dtype=torch.float64), 0.9, M.shape)
    assert summ["rank_for_variance"] == 2 and summ["numerical_rank"] == 5
    assert summ["top_sv"] == pytest.approx(10.0) and summ["fro_norm"] == pytest.approx(math.sqrt(135.25))


def test_random_rank_r_product_has_r_singular_values():
    rng = np.random.default_rng(3)
    d, k, r = 120, 90, 7
    M = rng.standard_normal((d, r)) @ rng.standard_normal((r, k))
    s = dense_svdvals(M)  # float32
    assert numerical_rank(s, M.shape) == r
    assert s[r - 1] > 1e-2 * s[0] and s[r] < 1e-5 * s[0]


@pytest.mark.parametrize(("d", "k", "r", "scale"), [(300, 200, 16, 2.0), (64, 256, 4, 0.5),
                                                    (10, 8, 20, -1.5)])
def test_lowrank_route_equals_numpy_svd_of_the_product(d, k, r, scale):
    rng = np.random.default_rng(d + k + r)
    B = rng.standard_normal((d, r)).astype(np.float32)
    A = rng.standard_normal((r, k)).astype(np.float32)
    dense = np.linalg.svd(scale * B.astype(np.float64) @ A.astype(np.float64), compute_uv=False)
    fast = lowrank_svdvals(torch.from_numpy(B), torch.from_numpy(A), scale)
    n = min(r, d, k)
    assert fast.shape == (n,)
    assert np.max(np.abs(fast - dense[:n])) / dense[0] < 1e-5
    assert np.all(dense[n:] < 1e-9 * dense[0])
    # the float32 dense route agrees too, and the left singular vectors span the same space
    np.testing.assert_allclose(dense_svdvals(scale * B @ A)[:n], fast, rtol=0, atol=1e-5 * fast[0])
    U, _ = lowrank_svd(B, A, scale, k=min(n, 3))
    Ud = np.linalg.svd(scale * B.astype(np.float64) @ A, full_matrices=False)[0][:, :min(n, 3)]
    assert subspace_similarity(U, Ud) == pytest.approx(1.0, abs=1e-6)


def test_effective_and_stable_rank_by_hand():
    assert effective_rank([1, 1, 1, 1]) == pytest.approx(4.0)
    assert effective_rank([2, 0, 0]) == pytest.approx(1.0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank([3, 1]) == pytest.approx(math.exp(h))  # 1.7548
    assert effective_rank([0, 0]) == 0.0
    assert stable_rank([3, 1]) == pytest.approx(10 / 9)
    assert stable_rank([2, 2, 2]) == pytest.approx(3.0)
    assert stable_rank([5]) == pytest.approx(1.0)
    assert stable_rank([0.0]) == 0.0


def test_subspace_similarity_identical_orthogonal_and_half():
    e = np.eye(6)
    assert subspace_similarity(e[:, :2], e[:, :2]) == pytest.approx(1.0)
    assert subspace_similarity(e[:, :2], e[:, 2:4]) == pytest.approx(0.0)
    assert subspace_similarity(e[:, [0, 1]], e[:, [0, 2]]) == pytest.approx(0.5)
    Q = orthonormal(50, 4, 7)
    R = orthonormal(4, 4, 8)  # a rotation inside the same span
    assert subspace_similarity(Q, Q @ R) == pytest.approx(1.0)
    assert subspace_similarity(Q, Q, k1=2, k2=4) == pytest.approx(1.0)  # a span inside another


def test_module_names():
    assert parse_module("model.layers.26.self_attn.q_proj") == (26, "q_proj")
    assert parse_module("transformer.h.3.mlp.c_fc") == (3, "c_fc")
    assert parse_module("lm_head") == (None, "lm_head")
    types = module_types(["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                          "transformer.h.0.mlp.c_fc"])
    assert types == {"transformer.h.0.attn.c_proj": "attn.c_proj",
                     "transformer.h.0.mlp.c_proj": "mlp.c_proj", "transformer.h.0.mlp.c_fc": "c_fc"}


def test_lora_scaling_follows_peft():
    from learnforget.analysis.deltas import _lora_scale

    cfg = {"lora_alpha": 32, "r": 16}
    assert _lora_scale(cfg, "model.layers.0.self_attn.q_proj", 16) == 2.0
    assert _lora_scale({**cfg, "use_rslora": True}, "x.q_proj", 16) == 8.0  # 32 / sqrt(16)
    pattern = {**cfg, "alpha_pattern": {"q_proj": 8}, "rank_pattern": {"q_proj": 4}}
    assert _lora_scale(pattern, "model.layers.3.self_attn.q_proj", 4) == 2.0
    assert _lora_scale(pattern, "model.layers.3.self_attn.k_proj", 16) == 2.0
    assert _lora_scale(pattern, "model.layers.3.self_attn.xq_proj", 16) == 2.0  # no match


def test_random_matrix_comparison():
    res = random_matrix_comparison(n=80, c=0.1, cs=[1e-3, 1e-2, 0.1, 1.0, 10.0], seed=1)
    assert res["s_A"].shape == (80,) and np.all(np.diff(res["s_A"]) <= 0)
    diffs = res["mean_abs_diff"]
    assert np.all(np.diff(diffs) > 0) and diffs[0] < 1e-2 * res["s_A"].mean()
    again = random_matrix_comparison(n=80, c=0.1, cs=[0.1], seed=1)
    np.testing.assert_array_equal(again["s_A_plus_cB"], res["s_A_plus_cB"])  # seeded
    assert diffs[2] == pytest.approx(again["mean_abs_diff"][0])
    # cB's spectrum is c times B's: far below A's at c = 0.1
    assert res["s_cB"][0] < 0.2 * res["s_A"][0]


# ------------------------------------------------------------------ real tiny runs

def train_tiny(make_cfg, method: str, *extra: str) -> Path:
    cfg = make_cfg(f"method={method}", "method.r=4", "train.lr=1e-2", "train.precision=fp32",
                   "method.dropout=0.0", *extra)
    return fit(setup(cfg))


def base_weights(run: Path) -> dict[str, torch.Tensor]:
    info = json.loads((run / "run.json").read_text())
    return load_file(str(Path(info["run"]["base_model"]) / "model.safetensors"))


def test_full_delta_is_checkpoint_minus_base_and_files_are_written(make_cfg):
    run = train_tiny(make_cfg, "full")
    base = base_weights(run)
    ft = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
    ds = extract_deltas(run, "step-000002", with_weights=True)
    seen = 0
    for md in ds:
        key = md.name + ".weight"
        assert torch.equal(md.dense, ft[key] - base[key])
        assert torch.equal(md.base, base[key]) and torch.equal(md.ft, ft[key])
        assert md.dense.norm() > 1e-3 * base[key].norm()  # lr 1e-2: clearly moved
        seen += 1
    assert seen == 14 and ds.base == "original"  # 2 layers x q,k,v,o,gate,up,down

    paths = compute_spectra(run, with_weights=True, verbose=False)
    assert [p.name for p in paths] == ["step-000001.json", "step-000002.json"]
    rec, arrays = load_spectra(run, "step-000002")
    assert rec["base"] == "original" and rec["tokens"] == 128 and rec["step"] == 2
    assert {r["matrix"] for r in rec["rows"]} == {"delta", "base", "ft"}
    assert len(rec["rows"]) == 42
    q = "model.layers.1.self_attn.q_proj"
    w = ft[q + ".weight"] - base[q + ".weight"]
    np.testing.assert_allclose(arrays[f"delta:{q}"], np.linalg.svd(w.double().numpy(),
                               compute_uv=False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(arrays[f"base:{q}"], torch.linalg.svdvals(base[q + ".weight"]),
                               rtol=1e-5)
    row = next(r for r in rec["rows"] if r["module"] == q and r["matrix"] == "delta")
    assert row["layer"] == 1 and row["module_type"] == "q_proj" and row["shape"] == [64, 64]
    assert row["rank_for_variance"] == rank_for_variance(arrays[f"delta:{q}"], 0.9)

    # done already: nothing is recomputed; a new threshold only re-summarises
    npz, js = run / "spectra" / "step-000002.npz", run / "spectra" / "step-000002.json"
    stamps = (npz.stat().st_mtime_ns, js.stat().st_mtime_ns)
    compute_spectra(run, with_weights=True, verbose=False)
    assert (npz.stat().st_mtime_ns, js.stat().st_mtime_ns) == stamps
    compute_spectra(run, "step-000002", with_weights=True, threshold=0.5, verbose=False)
    assert npz.stat().st_mtime_ns == stamps[0]
    rec5, _ = load_spectra(run, "step-000002")
    row5 = next(r for r in rec5["rows"] if r["module"] == q and r["matrix"] == "delta")
    assert rec5["threshold"] == 0.5
    assert row5["rank_for_variance"] == rank_for_variance(arrays[f"delta:{q}"], 0.5)
    assert row5["rank_for_variance"] < row["rank_for_variance"]
    with pytest.raises(ConfigError, match="step-000009"):
        compute_spectra(run, "step-000009")


def test_lora_factors_equal_merged_minus_base_and_rank_at_most_r(make_cfg):
    run = train_tiny(make_cfg, "lora")
    via_factors = {md.name: md for md in extract_deltas(run, "step-000002")}
    via_merge = {md.name: md for md in extract_deltas(run, "step-000002", lora_via="merge")}
    assert set(via_factors) == set(via_merge) and len(via_factors) == 14
    cfg = json.loads((run / "checkpoints/step-000002/adapter_config.json").read_text())
    for name, md in via_factors.items():
        B, A, scale = md.factors
        assert scale == cfg["lora_alpha"] / cfg["r"] == 2.0
        fd, md_dense = md.to_dense().float(), via_merge[name].dense
        assert md_dense.abs().max() > 1e-4  # clearly non-zero
        assert (fd - md_dense).abs().max() <= 1e-5 * md_dense.abs().max()
        s_fast = lowrank_svdvals(B, A, scale)
        s_dense = np.linalg.svd(md_dense.double().numpy(), compute_uv=False)
        assert s_fast.size == 4
        assert np.max(np.abs(s_fast - s_dense[:4])) <= 1e-5 * s_dense[0]
        assert numerical_rank(s_dense, md_dense.shape) <= 4
    compute_spectra(run, verbose=False)
    rec, arrays = load_spectra(run, "step-000002")
    assert all(r["route"].startswith("factors") and r["numerical_rank"] <= 4
               and r["rank_for_variance"] <= 4 for r in rec["rows"])
    assert "alpha / r" in rec["delta"] and rec["base"] == "original"
    assert all(a.size == 4 for a in arrays.values())


def test_dora_delta_is_merge_and_unload_minus_base(make_cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_tiny(make_cfg, "dora")
    base = base_weights(run)
    info = json.loads((run / "run.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(info["run"]["base_model"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, run / "checkpoints/step-000002").merge_and_unload()
    sd = merged.state_dict()
    ds = extract_deltas(run, "step-000002")
    assert "DoRA" in ds.source
    n = 0
    for md in ds:
        key = md.name + ".weight"
        ref = sd[key] - base[key]
        assert ref.abs().max() > 1e-4
        torch.testing.assert_close(md.dense, ref, atol=1e-6, rtol=0)
        n += 1
    assert n == 14


@pytest.mark.parametrize(("method", "max_rank"), [("vera", 4), ("loha", 16)])
def test_yaml_methods_delta_is_merged_minus_base(make_cfg, method, max_rank):
    """VeRA and LoHa (peft methods added by YAML alone): ΔW = merged - base, as peft's own
    merge_and_unload gives it, of rank at most r (VeRA) or r^2 (LoHa's Hadamard product)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_tiny(make_cfg, method)
    base = base_weights(run)
    info = json.loads((run / "run.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(info["run"]["base_model"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, run / "checkpoints/step-000002").merge_and_unload()
    sd = merged.state_dict()
    ds = extract_deltas(run, "step-000002")
    assert ds.source.startswith(method.upper()) and "merged into the base with peft" in ds.source
    n = 0
    for md in ds:
        ref = sd[md.name + ".weight"] - base[md.name + ".weight"]
        assert ref.abs().max() > 1e-6
        torch.testing.assert_close(md.dense, ref, atol=1e-6, rtol=0)
        n += 1
    assert n == 14  # 7 linear layers x 2 blocks (method.targets=all)
    compute_spectra(run, "step-000002", verbose=False)
    rec, _ = load_spectra(run, "step-000002")
    assert rec["method"] == method and len(rec["rows"]) == 14
    assert all(r["numerical_rank"] <= max_rank for r in rec["rows"])


def test_ia3_delta_is_the_rescaling(make_cfg):
    run = train_tiny(make_cfg, "ia3")
    base = base_weights(run)
    adapter = load_file(str(run / "checkpoints/step-000002/adapter_model.safetensors"))
    ds = extract_deltas(run, "step-000002")
    names = [md.name for md in ds]
    assert sorted(parse_module(n)[1] for n in names) == ["down_proj", "down_proj", "k_proj",
                                                        "k_proj", "v_proj", "v_proj"]
    for md in extract_deltas(run, "step-000002"):
        w = base[md.name + ".weight"]
        lvec = adapter[f"base_model.model.{md.name}.ia3_l"]
        # IA3 scales the output rows (attention) or the input columns (feed-forward)
        expected = (lvec - 1) * w if lvec.shape[1] == 1 else w * (lvec - 1)
        torch.testing.assert_close(md.dense, expected, atol=1e-6, rtol=1e-5)
        assert md.dense.abs().max() > 1e-5


def test_qlora_base_is_the_dequantised_nf4_it_trained_on(make_cfg, cache_dir):
    import bitsandbytes.functional as bnbf
    from omegaconf import OmegaConf

    from learnforget.assets.models import load_model

    run = train_tiny(make_cfg, "qlora")
    cfg = OmegaConf.load(run / "config.yaml")
    model, _, _ = load_model(cfg.model, cfg.method, cache_dir, "cpu")
    layer = model.model.layers[1].mlp.up_proj
    trained_on = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    ds = extract_deltas(run, "step-000002", with_weights=True)
    assert ds.base == "dequantised nf4"
    md = next(m for m in ds if m.name == "model.layers.1.mlp.up_proj")
    assert torch.equal(md.base, trained_on)
    orig = base_weights(run)["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(md.base, orig)
    assert torch.equal(dequantised_base(orig), trained_on)
    torch.testing.assert_close(md.ft.double(), md.base.double() + md.to_dense(), atol=1e-6, rtol=0)
    assert md.factors[0].shape == (256, 4)
    compute_spectra(run, "step-000002", verbose=False)
    rec, _ = load_spectra(run, "step-000002")
    assert rec["base"] == "dequantised nf4" and rec["method"] == "qlora"
    assert all(r["numerical_rank"] <= 4 for r in rec["rows"])


def test_prompt_tuning_has_no_weight_delta(make_cfg):
    run = train_tiny(make_cfg, "prompt", "method.num_virtual_tokens=4")
    assert extract_deltas(run, "step-000002") is None
    assert compute_spectra(run, verbose=False) == []


def test_lora_spectra_need_no_base_weights(make_cfg, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from learnforget.analysis.weights import base_model_folder

    run = train_tiny(make_cfg, "lora")
    moved = tmp_path / "elsewhere" / run.name
    shutil.copytree(run, moved)
    info = json.loads((moved / "run.json").read_text())
    real_base = Path(info["run"]["base_model"])
    info["run"]["base_model"] = str(tmp_path / "gone")
    (moved / "run.json").write_text(json.dumps(info))
    assert base_model_folder(moved) == real_base  # found again from the run's model config
    cfg = OmegaConf.load(moved / "config.yaml")
    cfg.model.source, cfg.model.hub_id = "hub", "nobody/no-such-model"
    OmegaConf.save(cfg, moved / "config.yaml")
    with pytest.raises(ConfigError, match="not available locally"):
        extract_deltas(moved, "step-000002", with_weights=True)
    ds = extract_deltas(moved, "step-000002")  # the factors alone are enough
    ref = {md.name: md.to_dense() for md in extract_deltas(run, "step-000002")}
    for md in ds:
        assert torch.equal(md.to_dense(), ref[md.name])


# ------------------------------------------------------------------ 16-bit checkpoints

@pytest.mark.parametrize("shape", [(512, 512), (256, 1024)])
def test_rounding_floor_matches_numpy_on_real_bf16_rounding(shape):
    """The predicted floor (uniform +-ulp/2 errors, Marchenko-Pastur edge) against the actual
    error of storing a matrix in bf16, measured by numpy's SVD."""
    from learnforget.analysis.weights import rounding_floor

    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.02 + 0.001
    err = (w.to(torch.bfloat16).float() - w).double().numpy()
    floor = rounding_floor(w, "BF16")
    assert floor["fro"] == pytest.approx(np.linalg.norm(err), rel=0.02)
    assert floor["top_sv"] == pytest.approx(np.linalg.svd(err, compute_uv=False)[0], rel=0.05)
    assert rounding_floor(w, "F32") is None


def test_bf16_checkpoint_reports_its_rounding_floor(make_cfg):
    """A run that trains bf16 weights directly (the opt-in) saves a bf16 checkpoint: its ΔW
    rows carry the rounding-noise floor; an fp32-master checkpoint's rows do not."""
    pure = fit(setup(make_cfg("method=full", "model.dtype=bfloat16", "train.precision=bf16",
                              "train.master_weights=model_dtype", "train.lr=1e-2")))
    masters = fit(setup(make_cfg("method=full", "model.dtype=bfloat16", "train.precision=bf16",
                                 "train.lr=1e-2")))
    rows = json.loads(compute_spectra(pure, verbose=False)[-1].read_text())["rows"]
    assert rows and all(r["rounding_floor_dtype"] == "BF16" for r in rows)
    assert all(0 <= r["rank_above_rounding_floor"] <= min(r["shape"]) for r in rows)
    assert all(r["rounding_floor_top_sv"] > 0 for r in rows)
    rows32 = json.loads(compute_spectra(masters, verbose=False)[-1].read_text())["rows"]
    assert rows32 and not any("rounding_floor_top_sv" in r for r in rows32)
