"""Intrinsic-dimension finetuning (method=said, method=did): the Walsh-Hadamard transform and the
Fastfood projection against dense matrices (scipy's Hadamard matrix), θ_d = 0 is the base model
exactly, gradients through the whole model against a dense-P reparametrisation (torch.func),
exact parameter counts, checkpoints (θ_d, λ, seed) that reload and resume, and ΔW for spectra."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from conftest import eval_logits as _logits
from conftest import load_base as _base
from conftest import logits_input

import learnforget.train.loop as train_mod
from learnforget.analysis.deltas import extract_deltas
from learnforget.config import run_name, validate
from learnforget.errors import ConfigError
from learnforget.eval.scoring import load_for_eval
from learnforget.methods.apply import apply_method, count_parameters
from learnforget.methods.said import fastfood
from learnforget.methods.said import model as said
from learnforget.methods.said.fastfood import Projection, mix_bits, stream_keys, walsh_hadamard
from learnforget.train.loop import fit, setup
from learnforget.train.params import param_report


@functools.lru_cache(maxsize=2)
def _hadamard(n: int) -> np.ndarray:
    return scipy.linalg.hadamard(n).astype(np.float64)


def _dense_projection(projection: Projection) -> np.ndarray:
    """The D x d matrix H G Π H B (first d columns, first D rows) / sqrt(D ΣG²), from the
    projection's factors in full, in numpy: scipy's Sylvester Hadamard matrix, an explicit
    permutation matrix."""
    B, Pi, G = projection.factors()
    L, d, numel = B.numel(), projection.d, projection.numel
    H = _hadamard(L)
    perm = np.zeros((L, L))
    perm[np.arange(L), Pi.numpy().astype(np.int64)] = 1.0  # (Π x)_i = x[Π_i]
    g = G.numpy().astype(np.float64)
    b = B.numpy().astype(np.float64)
    cols = H[:, :d] * b[:d]               # H B, restricted to the d columns θ_d reaches
    cols = H @ (g[:, None] * (perm @ cols))  # then Π, G, H
    return cols[:numel] / np.sqrt(numel * np.sum(g ** 2))


@pytest.mark.parametrize("n", [1, 2, 64, 2048])
def test_walsh_hadamard_and_its_gradient_match_the_dense_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    H = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64))
    y = walsh_hadamard(x)
    torch.testing.assert_close(y, x @ H.T, rtol=1e-12, atol=1e-12)
    w = torch.randn(3, n, dtype=torch.float64)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ H, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a power of two"):
        walsh_hadamard(torch.ones(12))


def _mix_numpy(i: np.ndarray, bits: int, keys) -> np.ndarray:
    """mix_bits in numpy's unsigned 64-bit arithmetic (no wrap-around): the reference."""
    x = i.astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for xor_key, mult in keys:
        x = ((x ^ np.uint64(xor_key)) * np.uint64(mult)) & mask
        x = x ^ (x >> np.uint64((bits + 1) // 2))
    return x


@pytest.mark.parametrize("bits", [0, 1, 7, 12, 31])
def test_index_hash_is_a_bijection_and_matches_unsigned_arithmetic(bits):
    keys = stream_keys(5, "layers.3.mlp.up_proj", "Pi", bits)
    n = min(1 << bits, 1 << 14)
    i = torch.arange(n, dtype=torch.int32)
    got = mix_bits(i.clone(), bits, keys)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy().astype(np.uint64), _mix_numpy(i.numpy(), bits, keys))
    if bits <= 14:  # the whole domain: a permutation
        assert sorted(got.tolist()) == list(range(n))
    assert torch.equal(mix_bits(got.clone(), bits, keys, inverse=True), i)
    # the largest indices too (int32 products wrap: the low bits must still be exact)
    top = torch.arange(max(0, (1 << bits) - 4096), 1 << bits, dtype=torch.int32)
    mixed = mix_bits(top.clone(), bits, keys)
    np.testing.assert_array_equal(mixed.numpy().astype(np.uint64),
                                  _mix_numpy(top.numpy(), bits, keys))
    assert torch.equal(mix_bits(mixed, bits, keys, inverse=True), top)


def test_factors_are_signs_a_permutation_and_normal_gains():
    p = Projection(150_000, 1000, seed=0, name="model.layers.0.self_attn.q_proj")
    B, Pi, G = p.factors()
    assert B.numel() == Pi.numel() == G.numel() == 2 ** 18
    assert set(B.unique().tolist()) == {-1, 1} and abs(B.float().mean()) < 0.01
    assert torch.equal(torch.sort(Pi).values, torch.arange(2 ** 18, dtype=torch.int32))
    g = G.double().numpy()
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    assert scipy.stats.kstest(g, "norm").pvalue > 1e-3
    # another tensor name or seed: other factors
    q = Projection(150_000, 1000, seed=0, name="model.layers.0.self_attn.k_proj")
    assert not torch.equal(q.factors()[1], Pi)
    assert not torch.equal(Projection(150_000, 1000, 1, p.name).factors()[2], G)


def test_shared_gains_prefix_does_not_depend_on_the_longest_tensor(monkeypatch):
    monkeypatch.setattr(fastfood, "_GAINS", {})
    short = fastfood.shared_gains(9, 70_000, "cpu").clone()
    long = fastfood.shared_gains(9, 200_000, "cpu").clone()
    monkeypatch.setattr(fastfood, "_GAINS", {})
    assert torch.equal(fastfood.shared_gains(9, 200_000, "cpu"), long)
    assert torch.equal(fastfood.shared_gains(9, 70_000, "cpu"), short)
    assert torch.equal(long[:70_000], short)
    assert not torch.equal(fastfood.shared_gains(10, 70_000, "cpu"), short)


@pytest.mark.parametrize(("numel", "d"), [(300, 20), (256, 256), (40, 100), (1000, 1), (700, 33)])
def test_fastfood_matches_the_dense_projection_and_its_transpose(numel, d):
    p = Projection(numel, d, seed=3, name="layers.0.q_proj")
    assert p.length == 2 ** int(np.ceil(np.log2(max(numel, d))))
    P = _dense_projection(p)
    theta = torch.randn(d, dtype=torch.float32, requires_grad=True)
    got = p(theta)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    np.testing.assert_allclose(got.detach().numpy(), P @ theta.detach().numpy().astype(np.float64),
                               rtol=1e-4, atol=1e-5)
    g = torch.randn(numel)
    (got * g).sum().backward()
    np.testing.assert_allclose(theta.grad.numpy(), P.T @ g.numpy().astype(np.float64),
                               rtol=1e-4, atol=1e-5)
    # with a scale λ: the gradient in λ is <g, Pθ> (numpy), in θ λ Pᵀg
    lam = torch.tensor(0.7, requires_grad=True)
    theta.grad = None
    (p(theta, lam) * g).sum().backward()
    Pt = P @ theta.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(float(lam.grad), Pt @ g.numpy().astype(np.float64), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(theta.grad.numpy(), 0.7 * (P.T @ g.numpy().astype(np.float64)),
                               rtol=1e-4, atol=1e-5)
    # every entry has variance |θ|²/D: the columns of P have unit norm / sqrt(...) on average
    assert abs(np.sum(P ** 2) / d - 1.0) < 0.25
    # the same tensor name and seed give the same projection
    again = Projection(numel, d, seed=3, name="layers.0.q_proj")
    torch.testing.assert_close(again(theta.detach()), got.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["said", "did"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_zero_theta_gives_the_base_logits_exactly(make_cfg, method, model):
    cfg = make_cfg(f"model={model}", f"method={method}", "method.d=50")
    base = _base(cfg)
    before = _logits(base)
    buffers = sum(b.numel() for b in base.buffers())
    adapted, notes = apply_method(base, cfg.method, model_name=model)
    assert torch.equal(_logits(adapted), before)
    assert sum(b.numel() for b in adapted.buffers()) == buffers  # no projection is stored
    assert any("θ_d of length 50" in n for n in notes)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == ({"intrinsic.theta", "intrinsic.lam"} if method == "said"
                         else {"intrinsic.theta"})


def test_gradients_match_a_dense_projection_through_the_model(make_cfg):
    """d(loss)/dθ_d and d(loss)/dλ through Fastfood against the same reparametrisation with
    explicit dense matrices P_i (numpy, from the same B, Π, G) applied by torch.func."""
    d = 24
    cfg = make_cfg("method=said", f"method.d={d}", "method.targets=attention")
    model, _ = apply_method(_base(cfg), cfg.method, model_name="tiny_llama")
    model.eval()
    vec = model.intrinsic
    with torch.no_grad():
        vec.theta.copy_(torch.randn(d) * 0.5)
        vec.lam.copy_(1 + 0.3 * torch.randn(vec.lam.numel()))
    labels = logits_input().clone()
    loss = model(input_ids=logits_input(), labels=labels).loss
    loss.backward()
    got_theta, got_lam = vec.theta.grad.clone(), vec.lam.grad.clone()

    ref = _base(cfg)
    ref.eval()
    theta = vec.theta.detach().double().clone().requires_grad_(True)
    lam = vec.lam.detach().double().clone().requires_grad_(True)
    weights = {}
    for i, (name, module, p) in enumerate(said.parametrizations(model)):
        w0 = module.parametrizations.weight.original.detach()
        P = torch.from_numpy(_dense_projection(p.projection))
        weights[name + ".weight"] = (w0.double() + lam[i] * (P @ theta).view(w0.shape)).float()
    assert len(weights) == 2 * 4  # 2 layers x q, k, v, o
    ref_loss = torch.func.functional_call(ref, weights, kwargs={"input_ids": logits_input(),
                                                                "labels": labels}).loss
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_theta.double(), theta.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got_lam.double(), lam.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["said", "did"])
@pytest.mark.parametrize("targets", ["all", "mlp"])
def test_params_counts_d_plus_one_scale_per_weight(make_cfg, method, targets):
    cfg = make_cfg(f"method={method}", "method.d=300", f"method.targets={targets}")
    rep = param_report(cfg)
    n_weights = 2 * (7 if targets == "all" else 3)  # 2 layers x (q,k,v,o,)gate,up,down
    expected = 300 + (n_weights if method == "said" else 0)
    assert rep.trainable == expected
    assert rep.total == rep.base_total + expected
    adapted, _ = apply_method(_base(cfg), cfg.method, model_name="tiny_llama")
    assert count_parameters(adapted) == (rep.trainable, rep.total)


def test_smollm2_count_by_hand(make_cfg):
    rep = param_report(make_cfg("model=smollm2_135m", "method=said", "method.d=1000"),
                       activations=False)
    assert rep.trainable == 1000 + 30 * 7
    # by hand, per layer: gate/up/down 576 x 1536 -> L = 2^20, q/o 576 x 576 -> 2^19,
    # k/v 576 x 192 -> 2^17; stored factors would take 9 bytes per entry; D holds the longest L
    stored = 30 * (3 * 2**20 + 2 * 2**19 + 2 * 2**17) * 9 / 2**20
    assert f"{stored:,.1f} MiB" == "1,147.5 MiB" and "would take 1,147.5 MiB" in rep.method_note
    assert "4.0 MiB shared" in rep.method_note
    full = param_report(make_cfg("model=smollm2_135m", "method=lora", "method.r=1"),
                        activations=False)
    frozen = 134_515_008 * 4  # the base's float32 weights
    assert rep.weights_bytes == frozen + (1000 + 210) * 4 + 4 * 2**20
    assert full.method_note == ""


def test_old_checkpoints_without_the_projection_kind_are_refused(tmp_path):
    (tmp_path / said.CONFIG_FILE).write_text(json.dumps({"method": "said", "d": 4,
                                                         "projection_seed": 0, "modules": []}))
    with pytest.raises(ConfigError, match="numpy-drawn stored factors.*train it again"):
        said.read_checkpoint(tmp_path)


def test_trains_saves_theta_lambda_seed_and_reloads_identically(make_cfg):
    cfg = make_cfg("method=said", "method.d=64", "method.projection_seed=7", "train.lr=5e-2",
                   "train.checkpoints.at=[1,4]", "train.precision=fp32")
    s = setup(cfg)
    out = fit(s)
    ckpt = out / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json", "said.safetensors", "said_config.json"]
    assert json.loads((ckpt / "manifest.json").read_text())["format"] == "said"
    spec = json.loads((ckpt / "said_config.json").read_text())
    assert spec["projection_seed"] == 7 and spec["d"] == 64 and len(spec["modules"]) == 14
    from safetensors.torch import load_file

    state = load_file(ckpt / "said.safetensors")
    assert state["theta"].shape == (64,) and state["lam"].shape == (14,)
    assert torch.any(state["theta"] != 0) and torch.any(state["lam"] != 1)
    rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert held[-1] < held[0], held

    reloaded = load_for_eval(cfg, ckpt, Path(cfg.paths.cache_dir), "cpu")
    assert not said.has_intrinsic(reloaded)  # merged: a plain model
    torch.testing.assert_close(_logits(reloaded), _logits(s.model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(reloaded), _logits(_base(cfg)), atol=1e-4)

    # ΔW for spectra: from the checkpoint alone, equal to the live model's W - W0
    deltas = extract_deltas(out, "step-000004")
    live = said.model_deltas(s.model)
    got = {md.name: md.to_dense() for md in deltas}
    assert set(got) == set(live)
    for name, delta in live.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-6, atol=1e-7)
        module = s.model.get_submodule(name)
        torch.testing.assert_close(module.weight - module.parametrizations.weight.original,
                                   delta, rtol=0, atol=1e-6)


def test_spectra_and_intruders_run_on_did_deltas(make_cfg):
    from learnforget.analysis.intruders import compute_intruders
    from learnforget.analysis.spectra import compute_spectra

    cfg = make_cfg("method=did", "method.d=32", "train.lr=5e-2", "train.checkpoints.at=[1]")
    run = fit(setup(cfg))
    rows = compute_spectra(run, cache_dir=Path(cfg.paths.cache_dir))
    assert rows, "no spectra for a DID run"
    assert (run / "spectra").exists()
    paths = compute_intruders(run, cache_dir=Path(cfg.paths.cache_dir), verbose=False)
    record = json.loads(paths[0].read_text())
    assert len(record["rows"]) == 14 and record["delta"].startswith("P_i(θ_d)")
    # the W_ft the intruder analysis compares is the base's weight plus ΔW
    ds = extract_deltas(run, "step-000001", with_weights=True, cache_dir=Path(cfg.paths.cache_dir))
    base = dict(_base(cfg).named_parameters())
    for md in ds:
        torch.testing.assert_close(md.base, base[md.name + ".weight"].detach(), rtol=0, atol=0)
        torch.testing.assert_close(md.ft - md.base, md.to_dense(), rtol=1e-6, atol=1e-7)


def test_resume_matches_an_uninterrupted_run(make_cfg, monkeypatch):
    common = ("method=said", "method.d=32", "train.lr=5e-2", "train.checkpoints.at=[2,3]",
              "train.num_threads=1")
    straight = fit(setup(make_cfg(*common, "experiment_name=straight")))
    cfg = make_cfg(*common, "experiment_name=stopped")
    real_save = train_mod.save_checkpoint

    def save_then_signal(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_signal)
    run = fit(setup(cfg))
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    fit(setup(cfg))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and "resumed from step 2" in info["train"]["notes"]
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints/step-000003/said.safetensors")
    b = load_file(run / "checkpoints/step-000003/said.safetensors")
    for k in ("theta", "lam"):
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("override", "message"), [
    ("method.d=0", "method.d must be a positive integer.*got 0"),
    ("method.d=2.5", "method.d must be a positive integer.*got 2.5"),
    ("method.projection_seed=-1", "method.projection_seed must be an integer >= 0.*got -1"),
])
def test_bad_settings_are_clear_errors(make_cfg, override, message):
    cfg = make_cfg("method=said", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_run_name_and_other_methods_unchanged(make_cfg):
    name = run_name(make_cfg("method=said", "method.d=500", "method.projection_seed=2"))
    assert name.startswith("tiny_llama-said_d500_ps2_all-stdlib_code")
    assert run_name(make_cfg("method=lora", "method.d=500")) == run_name(make_cfg("method=lora"))
