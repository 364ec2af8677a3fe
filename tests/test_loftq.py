"""LoftQ for QLoRA on CPU (learnforget.methods.loftq): known answers for the algorithm (it
shrinks the quantisation error, more iterations never raise it, one iteration is numpy's
truncated SVD of W - deQ(Q)), and the qlora run: its base is the loader's own 4-bit weight, its
factors LoftQ's, its counts plain LoRA's; bad settings are one-line errors; resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.methods.loftq import dequantise_4bit, loftq_factors, place_4bit, quantise_4bit
from learnforget.methods.quantisation import is_quantised
from learnforget.train.loop import fit, setup
from learnforget.train.params import param_report

NF4 = OmegaConf.create({"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"})


def _weights() -> list[torch.Tensor]:
    """The linear weights of a small random Llama (2 layers, hidden 64, MLP 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2))
    return [m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def _errors(w: torch.Tensor, n_iter: int, scale: float = 2.0) -> tuple[float, float]:
    """(||W - deQ(Q)||, ||W - deQ(Q) - s B A||) of LoftQ with n_iter iterations, rank 4."""
    q, state, a, b = loftq_factors(w, 4, n_iter, scale, lambda x: quantise_4bit(x, NF4))
    deq = dequantise_4bit(q, state)
    return float(torch.linalg.norm(w - deq)), float(torch.linalg.norm(w - deq - scale * b @ a))


def test_loftq_error_is_below_qlora_and_non_increasing_in_iterations():
    for w in _weights():
        plain = float(torch.linalg.norm(w - dequantise_4bit(*quantise_4bit(w, NF4))))
        quant1, after = _errors(w, 1)
        assert quant1 == pytest.approx(plain, rel=0, abs=0)  # first Q = quant(W): the loader's
        assert after < 0.97 * plain
        errs = [after] + [_errors(w, n)[1] for n in (2, 3, 5)]
        assert all(e1 <= e0 * (1 + 1e-6) for e0, e1 in zip(errs, errs[1:], strict=False)), errs


def test_one_iteration_is_numpys_truncated_svd_of_the_residual():
    """The same deQ(Q); numpy's SVD of W - deQ(Q): s B A is its rank-r truncation, and
    B = U sqrt(S) / sqrt(s), A = sqrt(S) V^T / sqrt(s) up to each pair's sign."""
    w, r, scale = _weights()[0], 4, 0.5
    q, state, a, b = loftq_factors(w, r, 1, scale, lambda x: quantise_4bit(x, NF4))
    res = (w - dequantise_4bit(q, state)).double().numpy()
    u, s, vt = np.linalg.svd(res, full_matrices=False)
    trunc = (u[:, :r] * s[:r]) @ vt[:r]
    np.testing.assert_allclose(scale * (b.double() @ a.double()).numpy(), trunc, atol=1e-5 * s[0])
    b_np = u[:, :r] * np.sqrt(s[:r]) / np.sqrt(scale)
    a_np = (np.sqrt(s[:r])[:, None] * vt[:r]) / np.sqrt(scale)
    signs = np.sign(np.sum(b.double().numpy() * b_np, axis=0))
    np.testing.assert_allclose(b.double().numpy(), b_np * signs, atol=1e-4)
    np.testing.assert_allclose(a.double().numpy(), a_np * signs[:, None], atol=1e-4)


def tiny_lora_count(r: int) -> int:
    """tiny_llama: 1472 LoRA parameters per unit rank (tests/test_lora_variants.py)."""
    return 2 * r * (4 * 128 + 2 * 320 + 320)


def test_loftq_qlora_trains_two_steps_on_its_loaders_base(make_cfg):
    """The run's 4-bit base is bit-for-bit what the qlora loader built (loftq_iter=1), its
    initial factors are LoftQ's on the checkpoint's W, and it trains with plain LoRA's counts."""
    from safetensors.torch import load_file as load

    from learnforget.assets.models import load_model

    cfg = make_cfg("method=qlora", "method.init=loftq", "method.r=4", "train.lr=1e-2",
                   "method.dropout=0.0")
    s = setup(cfg)
    assert s.trainable == tiny_lora_count(4)
    note = next(n for n in s.notes if n.startswith("method.init=loftq"))
    before, after = (float(x.split()[0].rstrip(";")) for x in note.split("||/||W|| ")[1:3])
    assert after < before and "14 layers" in note
    loaded, _, path = load_model(cfg.model, cfg.method, Path(cfg.paths.cache_dir))
    fresh = {n: m for n, m in loaded.named_modules() if is_quantised(m)}
    w = load(f"{path}/model.safetensors")
    checked = 0
    for name, module in s.model.named_modules():
        if not is_quantised(module):
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(module.weight.data, fresh[plain].weight.data), plain
        lora = s.model.get_submodule(name.removesuffix(".base_layer"))
        _, _, a, b = loftq_factors(w[plain + ".weight"], 4, 1, 2.0,
                                   lambda x: quantise_4bit(x, cfg.method))
        torch.testing.assert_close(lora.lora_A["default"].weight, a, rtol=0, atol=0)
        torch.testing.assert_close(lora.lora_B["default"].weight, b, rtol=0, atol=0)
        checked += 1
    assert checked == 14
    run = fit(s)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["trainable_params"] == tiny_lora_count(4)
    assert any("method.init=loftq" in n for n in info["train"]["notes"])
    acfg = json.loads((run / "checkpoints/step-000002/adapter_config.json").read_text())
    assert acfg["r"] == 4 and acfg["init_lora_weights"] is True  # plain LoRA on the 4-bit base
    assert "_loftq_it1" in run.name
    # the spectra's ΔW: s B A on W_base = deQ(Q), the very base the run trained on, so that
    # W_ft - W_original = s B A - (W - deQ(Q))
    from learnforget.analysis.deltas import extract_deltas

    live = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m
            for n, m in s.model.named_modules() if is_quantised(m)}
    ds = extract_deltas(run, "step-000002", with_weights=True, cache_dir=Path(cfg.paths.cache_dir))
    assert ds.base == "dequantised nf4" and len(ds.names) == 14
    for md in ds:
        deq = dequantise_4bit(live[md.name].weight.data, live[md.name].weight.quant_state)
        assert torch.equal(md.base, deq), md.name
        B, A, scale = md.factors
        assert B.shape[1] == 4 and scale == 2.0
        orig = w[md.name + ".weight"].double()
        torch.testing.assert_close(md.ft.double() - orig, md.to_dense() - (orig - deq.double()),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [16, 64])
def test_llama2_7b_counts_are_qloras(r):
    rep = param_report(compose(["model=llama2_7b", "method=qlora", f"method.r={r}",
                                "method.init=loftq"]), activations=False)
    assert rep.trainable == {16: 39_976_960, 64: 159_907_840}[r]  # test_lora_variants.LLAMA2_7B


@pytest.mark.parametrize(("overrides", "match"), [
    (("method=lora",), "method.init=loftq needs method=qlora"),
    (("method=dora",), "method.init=loftq needs method=qlora"),
    (("method=qlora", "method.loftq_iter=0"), "method.loftq_iter must be a positive integer"),
    (("method=qlora", "method.loftq_iter=two"), "method.loftq_iter must be a positive integer"),
    (("method=qlora", "method.loftq_iter=3"), r"method.loftq_iter=3 is not supported .*expected 1"),
    (("method=qlora", "method.quant_type=int8"), "needs a 4-bit base"),
])
def test_bad_loftq_settings_are_one_line_errors(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        setup(make_cfg("method.init=loftq", *overrides))
    assert "\n" not in str(e.value)


def test_plain_qlora_keeps_its_name():
    from learnforget.config import run_name

    a, b = compose(["method=qlora"]), compose(["method=qlora", "method.loftq_iter=1"])
    assert run_name(a) == run_name(b) and "loftq" not in run_name(a) and "it1" not in run_name(a)


@pytest.mark.slow  # ~22 s; the default suite resumes PiSSA and CorDA through the same path
def test_loftq_run_killed_and_resumed_matches_uninterrupted(tmp_path, cache_dir):
    """Resume re-runs the deterministic LoftQ init and restores B, A: same losses, same
    final adapter as the uninterrupted run."""
    from test_resume import killed_and_straight

    runs = tmp_path / "runs"
    loftq = ("method=qlora", "method.init=loftq", "method.r=4")
    wa, wb = killed_and_straight(runs, cache_dir, *loftq)
    assert wa.keys() == wb.keys() and len(wa) == 28
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert all("lora_A" in k or "lora_B" in k for k in wa)  # the adapter file, not the base


def _state_tensors(state, prefix: str = "quant_state") -> dict[str, torch.Tensor]:
    """Every tensor a bitsandbytes QuantState holds, nested states included (walked from its
    attributes, not from bitsandbytes' own list of what QuantState.to moves)."""
    out = {}
    for k, v in vars(state).items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}.{k}"] = v
        elif type(v).__name__ == "QuantState":
            out |= _state_tensors(v, f"{prefix}.{k}")
    return out


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_packed_weight_and_its_quant_state_move_together(quant_type, double_quant):
    """place_4bit puts LoftQ's packed weight AND its quant_state (absmax, code, the nested
    state) on the layer weight's device: here the meta device standing in for CUDA."""
    cfg = OmegaConf.create({"quant_type": quant_type, "double_quant": double_quant,
                            "compute_dtype": "float32"})
    q, state = quantise_4bit(_weights()[0], cfg)
    tensors = _state_tensors(state)
    assert {"quant_state.absmax", "quant_state.code"} <= tensors.keys()
    assert double_quant == ("quant_state.state2.absmax" in tensors)
    assert all(t.device.type == "cpu" for t in tensors.values())
    weight = torch.nn.Parameter(torch.empty(0, dtype=torch.uint8, device="meta"),
                                requires_grad=False)
    place_4bit(weight, q, state)
    assert weight.device.type == "meta" and weight.shape == q.shape
    assert weight.quant_state is state
    moved = _state_tensors(weight.quant_state)
    assert moved.keys() == tensors.keys()
    assert {n: t.device.type for n, t in moved.items()} == dict.fromkeys(moved, "meta")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loftq_on_cuda_keeps_quant_state_beside_the_weight(make_cfg):
    """On CUDA every 4-bit layer's packed weight and quant_state sit on the GPU and a training
    step runs (a quant_state left on the CPU fails in the 4-bit matmul)."""
    import bitsandbytes as bnb

    from learnforget.train.plan import micro_batch

    s = setup(make_cfg("method=qlora", "method.init=loftq", "method.r=4"))
    s.model.train()
    layers = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for m in layers:
        assert m.weight.device.type == "cuda"
        assert {t.device.type for t in _state_tensors(m.weight.quant_state).values()} == {"cuda"}
    b = {k: v.cuda() for k, v in micro_batch(s.data, s.plan, s.cfg.train, 0, 0,
                                              s.tokenizer.pad_token_id).items()}
    with s.policy.autocast(s.device):
        loss = s.model(**b).loss
    loss.backward()
    assert torch.isfinite(loss)
