"""Data-driven LoRA initialisations (method.init=eva, corda) calibrated on the run's own training
data: which batches they read, CorDA's initial factors against numpy (known answer), EVA's
A-only init, ΔW against the original base in a run's checkpoints, resume, and the errors
(loftq without qlora)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learnforget.analysis.deltas import extract_deltas
from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.methods.apply import apply_method
from learnforget.train.loop import fit, setup

R = 4


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2))


def _batch(i: int, offset: int = 0) -> dict[str, torch.Tensor]:
    """Micro-batch i of a made-up stream: 4 sequences of 24 tokens, one padded after 18."""
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(100 + i + offset))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _method(init: str, n: int = 3, *extra: str):
    return compose(["model=tiny_llama", "method=lora", f"method.r={R}", f"method.init={init}",
                    f"method.calibration_batches={n}", "method.dropout=0.0", *extra]).method


def _lora(model, name: str) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(B, A, scaling, base weight) of one LoRA layer, float64."""
    layer = model.get_submodule("base_model.model." + name)
    b = layer.lora_B["default"].weight.detach().double().numpy()
    a = layer.lora_A["default"].weight.detach().double().numpy()
    w = layer.get_base_layer().weight.detach().double().numpy()
    return b, a, float(layer.scaling["default"]), w


def _targets(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_calibration_reads_the_first_n_micro_batches(init):
    read: list[int] = []

    def stream(i: int) -> dict[str, torch.Tensor]:
        read.append(i)
        return _batch(i)

    _, notes = apply_method(_tiny(), _method(init, 3), model_name="tiny", calibration=stream)
    assert read == [0, 1, 2]
    assert any(n.startswith(f"method.init={init}: calibrated on the run's own training data, the "
                            "first 3 micro-batches") for n in notes)
    with pytest.raises(ConfigError, match=f"method.init={init} needs the run's training data"):
        apply_method(_tiny(), _method(init), model_name="tiny")


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_initial_factors_known_answer(mode):
    """CorDA: with C the mean over calibration sequences of X^T X (X one unpadded sequence's
    layer input, scaled by its max as peft does) damped by 1% of its mean diagonal,
    s B0 A0 = [W C]_r C^-1 ([.]_r the top-r SVD triplets for IPM, the bottom r for KPM, numpy in
    float64), the base holds W - s B0 A0, and the wrapped model computes what the original
    does."""
    n, original = 2, _tiny()
    inputs: dict[str, list[np.ndarray]] = {}
    for name in _targets(original):
        original.get_submodule(name).register_forward_hook(
            lambda m, x, y, name=name: inputs.setdefault(name, []).append(
                x[0][0].detach().double().numpy()))
    with torch.no_grad():
        for i in range(n):
            b = _batch(i)
            for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
                original(input_ids=ids[mask.bool()].unsqueeze(0))
    method = _method("corda", n, f"+method.peft.corda_config.corda_method={mode}")
    model, _ = apply_method(copy.deepcopy(_tiny()), method, model_name="tiny", calibration=_batch)
    assert len(inputs) == 7
    for name, xs in inputs.items():
        assert len(xs) == 8  # 2 batches x 4 sequences, one at a time
        c = sum((x / x.max()).T @ (x / x.max()) for x in xs) / len(xs)
        c = c + np.eye(len(c)) * np.mean(np.diag(c)) * 0.01
        w = original.get_submodule(name).weight.detach().double().numpy()
        u, s, vt = np.linalg.svd(w @ c, full_matrices=False)
        keep = slice(0, R) if mode == "ipm" else slice(len(s) - R, len(s))
        expected = (u[:, keep] * s[keep]) @ vt[keep] @ np.linalg.inv(c)
        b0, a0, scale, w_res = _lora(model, name)
        # peft: covariance, inverse and SVD in float32 (the bottom of the spectrum less exact)
        tol = (5e-4 if mode == "ipm" else 5e-3) * np.abs(expected).max()
        np.testing.assert_allclose(scale * b0 @ a0, expected, atol=tol)
        np.testing.assert_allclose(w_res, w - scale * b0 @ a0, atol=1e-5 * np.abs(w).max())
    ids = _batch(5)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)


def test_eva_initialises_a_only_from_the_calibration_data():
    """EVA: B0 = 0 and the base untouched (ΔW is plain LoRA); A's rows are orthonormal
    principal directions of the layer inputs; the same batches give the same A, others not."""
    original = _tiny()
    model, _ = apply_method(copy.deepcopy(original), _method("eva", 3), model_name="tiny",
                            calibration=_batch)
    again, _ = apply_method(copy.deepcopy(original), _method("eva", 3), model_name="tiny",
                            calibration=_batch)
    other, _ = apply_method(copy.deepcopy(original), _method("eva", 3), model_name="tiny",
                            calibration=lambda i: _batch(i, offset=50))
    for name in _targets(original):
        b0, a0, scale, w = _lora(model, name)
        assert a0.shape == (R, w.shape[1]) and scale == 2.0
        assert not b0.any()
        np.testing.assert_array_equal(w, original.get_submodule(name).weight.detach().double().numpy())
        np.testing.assert_allclose(a0 @ a0.T, np.eye(R), atol=1e-4)
        np.testing.assert_array_equal(_lora(again, name)[1], a0)
        assert np.abs(_lora(other, name)[1] - a0).max() > 1e-3


def test_runs_checkpoint_delta_against_the_original_base(make_cfg):
    """A CorDA run's checkpoint is a rank-2r LoRA on the original base whose second half is
    the run's initial factors (a fresh setup of the same config recomputes them: the init is
    deterministic), so ΔW = s (B A - B0 A0); an EVA run's is a plain rank-r LoRA, ΔW = s B A."""
    common = ("method=lora", f"method.r={R}", "train.lr=1e-2", "train.precision=fp32",
              "method.dropout=0.0")
    run = fit(setup(make_cfg(*common, "method.init=corda", "method.calibration_batches=2")))
    fresh = setup(make_cfg(*common, "method.init=corda", "method.calibration_batches=2",
                           "experiment_name=fresh"))
    init = fresh.model._learnforget_initial_lora
    info = json.loads((run / "run.json").read_text())
    assert any("calibrated on the run's own training data, the first 2 micro-batches" in n
               for n in info["train"]["notes"])
    deltas = {md.name: md for md in extract_deltas(run, "step-000002")}
    assert len(deltas) == 7 * 2
    for name, md in deltas.items():
        b, a, scale = (np.asarray(f, dtype=np.float64) if not isinstance(f, float) else f
                       for f in md.factors)
        assert b.shape[1] == 2 * R and scale == 2.0
        key = f"base_model.model.{name}"
        b0 = init[f"{key}.lora_B.default.weight"].double().numpy()
        a0 = init[f"{key}.lora_A.default.weight"].double().numpy()
        np.testing.assert_allclose(-b[:, R:], b0, atol=1e-6)
        np.testing.assert_allclose(a[R:], a0, atol=1e-6)
        dw = md.to_dense().numpy()
        np.testing.assert_allclose(dw, scale * (b[:, :R] @ a[:R] - b0 @ a0), atol=1e-5)
        assert np.abs(dw).max() > 1e-4
    _peft_merge_agrees(run)
    run = fit(setup(make_cfg(*common, "method.init=eva")))
    acfg = json.loads((run / "checkpoints/step-000002/adapter_config.json").read_text())
    assert acfg["r"] == R and acfg["init_lora_weights"] == "eva" and not acfg["rank_pattern"]
    for md in extract_deltas(run, "step-000002"):
        b, a, scale = md.factors
        assert b.shape[1] == R
        np.testing.assert_allclose(md.to_dense().numpy(), scale * (np.asarray(b, np.float64)
                                   @ np.asarray(a, np.float64)), atol=1e-6)
    _peft_merge_agrees(run)


def _peft_merge_agrees(run) -> None:
    """peft loads the checkpoint as it is saved: its merge minus the original base is the
    factors' ΔW."""
    factors = {md.name: md.to_dense() for md in extract_deltas(run, "step-000002")}
    merged = {md.name: md.to_dense() for md in extract_deltas(run, "step-000002",
                                                              lora_via="merge")}
    assert factors.keys() == merged.keys()
    for name, dw in factors.items():
        torch.testing.assert_close(merged[name].double(), dw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", [pytest.param("eva", marks=pytest.mark.slow), "corda"])
def test_run_killed_and_resumed_matches_uninterrupted(tmp_path, cache_dir, init):
    """Resume re-runs the deterministic calibrated init on the original base (same data, same
    batches) and restores B, A: the final checkpoint equals the uninterrupted run's."""
    from test_resume import killed_and_straight

    runs = tmp_path / "runs"
    args = ("method=lora", f"method.init={init}", "method.calibration_batches=2",
            "train.precision=fp32")
    wa, wb = killed_and_straight(runs, cache_dir, *args)
    rank = 2 * R if init == "corda" else R  # converted (corda) or plain (eva), method.r=4
    assert wa.keys() == wb.keys() and all(rank in v.shape for v in wa.values())
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_bad_calibrated_settings_are_one_line_errors(make_cfg):
    cases = [
        (("method=lora", "method.init=loftq"), "method.init=loftq needs method=qlora"),
        (("method=qlora", "method.init=loftq", "method.loftq_iter=0"),
         "method.loftq_iter must be a positive integer"),  # loftq runs now: tests/test_loftq.py
        (("method=lora", "method.init=eva", "method.calibration_batches=0"),
         "method.calibration_batches must be a positive integer"),
        (("method=qlora", "method.init=corda"), "method.init=corda with method=qlora is not"),
        (("method=lora", "method.init=eva", "+method.peft.eva_config.rho=2.0"),
         "method.init=eva pins rho=1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            setup(make_cfg(*overrides))
        assert "\n" not in str(e.value)


def test_calibration_batches_name_only_calibrated_runs(make_cfg):
    """method.calibration_batches defines eva/corda runs (name 'cbN', hash) and no other (it is
    an ignored key there)."""
    from learnforget.config import run_name
    from learnforget.methods.registry import ignored_keys

    assert "calibration_batches" in ignored_keys(make_cfg("method=lora").method)
    assert "calibration_batches" not in ignored_keys(make_cfg("method=dora",
                                                              "method.init=corda").method)
    assert run_name(make_cfg("method=lora")) == run_name(
        make_cfg("method=lora", "method.calibration_batches=3"))
    assert "_eva_cb8" in run_name(make_cfg("method=lora", "method.init=eva"))
    assert run_name(make_cfg("method=lora", "method.init=eva")) != run_name(
        make_cfg("method=lora", "method.init=eva", "method.calibration_batches=3"))


@pytest.mark.slow  # ~20 s: two torchrun ranks; test_ddp covers the multi-rank path by default
def test_two_ranks_calibrate_on_the_same_sequences_as_one_process(tmp_path, cache_dir):
    """CorDA on 2 DDP ranks (batch 2 each, 2 calibration batches) reads the stream's first 4
    sequences, as one process with batch 4 and 1 calibration batch does: the same initial
    factors on every rank (the losses match the single process's) and in the checkpoint."""
    import subprocess
    import sys

    from conftest import MULTI_RANK, TORCHRUN, free_port, multi_rank_env, step_losses
    from safetensors.torch import load_file

    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    env = multi_rank_env(tmp_path, cache_dir)
    corda = ["method=lora", f"method.r={R}", "method.init=corda", "method.dropout=0.0"]
    single = subprocess.run(
        [sys.executable, "-m", "learnforget.cli", "train", *MULTI_RANK, *corda,
         "train.batch_size=4", "method.calibration_batches=1", "experiment_name=single"],
        env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "learnforget.cli",
         "train", *MULTI_RANK, *corda, "train.batch_size=2", "method.calibration_batches=2",
         "experiment_name=ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_1 = next((tmp_path / "runs/single").iterdir())
    run_2 = next((tmp_path / "runs/ddp").iterdir())
    a, b = step_losses(run_1), step_losses(run_2)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    wa = load_file(run_1 / "checkpoints/step-000002/adapter_model.safetensors")
    wb = load_file(run_2 / "checkpoints/step-000002/adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k, v in wa.items():  # the initial factors: A0 below A, -B0 beside B
        half = v[R:] if ".lora_A." in k else v[:, R:]
        other = wb[k][R:] if ".lora_A." in k else wb[k][:, R:]
        torch.testing.assert_close(half, other, atol=1e-5, rtol=1e-4)
