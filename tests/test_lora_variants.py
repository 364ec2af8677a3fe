"""LoRA variants: rsLoRA and peft's initialisations as method settings; PiSSA/OLoRA ΔW against
the original base (a known answer from numpy's SVD, and peft's own conversion as reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from learnforget.analysis.deltas import extract_deltas
from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.methods.registry import method_summary
from learnforget.train.loop import fit, setup
from learnforget.train.params import param_report

VARIANTS = [("lora", ()), ("lora", ("method.rslora=true",)), ("lora", ("method.init=gaussian",)),
            ("lora", ("method.init=orthogonal",)), ("lora", ("method.init=pissa",)),
            ("lora", ("method.init=pissa_niter_2",)), ("lora", ("method.init=olora",)),
            ("lora", ("method.init=eva",)), ("lora", ("method.init=corda",)),
            ("qlora", ("method.init=eva",)), ("dora", ("method.init=corda",)), ("dora", ())]


def tiny_lora_count(r: int) -> int:
    """tiny_llama (2 layers, hidden 64, MLP 256): r (in + out) per module, by hand:
    q, k, v, o 4 x (64 + 64) + gate, up 2 x (64 + 256) + down (256 + 64) = 1472 per unit rank."""
    return 2 * r * (4 * 128 + 2 * 320 + 320)


@pytest.mark.parametrize(("method", "extra"), VARIANTS,
                         ids=[m + "-" + "-".join(e).replace("method.", "") for m, e in VARIANTS])
def test_each_variant_trains_two_steps_with_exact_counts(make_cfg, method, extra):
    cfg = make_cfg(f"method={method}", "method.r=4", "train.lr=1e-2", "train.precision=fp32",
                   "method.dropout=0.0", *extra)
    run = fit(setup(cfg))
    info = json.loads((run / "run.json").read_text())
    dora_magnitudes = 2 * (4 * 64 + 2 * 256 + 64) if method == "dora" else 0
    assert info["train"]["trainable_params"] == tiny_lora_count(4) + dora_magnitudes
    assert info["status"] == "finished"
    acfg = json.loads((run / "checkpoints/step-000002/adapter_config.json").read_text())
    init = next((e.split("=")[1] for e in extra if "init" in e), "default")
    if init.startswith(("pissa", "olora", "corda")):  # converted: rank-2r LoRA on the original base
        assert acfg["r"] == 8 and acfg["lora_alpha"] == 16
        assert acfg["init_lora_weights"] is True and acfg["learnforget_converted_from"] == init
        suffix = f"{init}_cb8" if init == "corda" else init  # calibration batches: 8
        assert init in run.name and method_summary(cfg.method).endswith(suffix)
    else:
        assert acfg["r"] == 4
    assert acfg["use_rslora"] is ("method.rslora=true" in extra)
    if "method.rslora=true" in extra:
        assert "_rs_" in run.name or run.name.split("-")[1].endswith("_rs")


def test_plain_lora_keeps_its_name_and_hash(make_cfg):
    """The new keys at their defaults leave existing runs' names (and hashes) unchanged."""
    a = make_cfg("method=lora")
    b = make_cfg("method=lora", "method.init=default", "method.rslora=false")
    from learnforget.config import run_name

    assert run_name(a) == run_name(b) and "init" not in run_name(a)


def test_bad_variant_settings_are_one_line_errors(make_cfg):
    with pytest.raises(ConfigError, match="method.init 'svd' is unknown"):
        setup(make_cfg("method=lora", "method.init=svd"))
    with pytest.raises(ConfigError, match="method.init=mica is not supported yet"):
        setup(make_cfg("method=lora", "method.init=mica"))
    with pytest.raises(ConfigError, match="even rank, got method.r=3"):
        setup(make_cfg("method=lora", "method.init=orthogonal", "method.r=3"))
    with pytest.raises(ConfigError, match="qlora is not supported"):
        setup(make_cfg("method=qlora", "method.init=pissa"))


def test_pissa_delta_is_against_the_original_base_known_answer(make_cfg):
    """PiSSA: W_res = W - s B0 A0 with s B0 A0 the rank-r truncated SVD of W. After training,
    the checkpoint's ΔW must be s (B A - B0 A0) = W_ft - W_original."""
    cfg = make_cfg("method=lora", "method.r=4", "method.init=pissa", "train.lr=1e-2",
                   "train.precision=fp32", "method.dropout=0.0")
    run = fit(setup(cfg))
    base_dir = json.loads((run / "run.json").read_text())["run"]["base_model"]
    base = load_file(f"{base_dir}/model.safetensors")
    ad = load_file(str(run / "checkpoints/step-000002/adapter_model.safetensors"))
    ds = {md.name: md for md in extract_deltas(run, "step-000002")}
    assert len(ds) == 14
    for name, md in ds.items():
        w = base[name + ".weight"].double().numpy()
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        trunc = (u[:, :4] * s[:4]) @ vt[:4]                  # numpy: the PiSSA init, s B0 A0
        B, A, scale = md.factors
        assert B.shape[1] == 8 and scale == 2.0               # alpha 16 / r 8 = 8 / 4
        key = f"base_model.model.{name}"
        b0 = -ad[key + ".lora_B.weight"][:, 4:].double()
        a0 = ad[key + ".lora_A.weight"][4:].double()
        # peft takes the SVD in float32: agreement to float32 accuracy of the top singular value
        np.testing.assert_allclose(scale * (b0 @ a0).numpy(), trunc, atol=1e-5 * s[0])
        b1 = ad[key + ".lora_B.weight"][:, :4].double()
        a1 = ad[key + ".lora_A.weight"][:4].double()
        dw = md.to_dense().numpy()
        np.testing.assert_allclose(dw, scale * (b1 @ a1).numpy() - trunc, atol=1e-5 * s[0])
        assert np.abs(dw).max() > 1e-4  # it trained: not the zero update


def test_conversion_matches_peft_and_the_live_model(tmp_path):
    """Our checkpoint conversion writes what peft's save_pretrained(path_initial_model_for_
    weight_conversion=...) writes, and the original base + converted adapter computes what the
    training model (residual base + PiSSA adapter) computes."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnforget.methods.lora_variants import capture_initial, convert_saved_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)
    for init in ("pissa", "olora"):
        base = LlamaForCausalLM(cfg)
        base.save_pretrained(tmp_path / "base")
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                               init_lora_weights=init, lora_dropout=0.0)
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), lcfg)
        capture_initial(model)
        model.save_pretrained(tmp_path / f"{init}_init")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn_like(p))
        ours = tmp_path / f"{init}_ours"
        model.save_pretrained(ours)
        convert_saved_adapter(ours, model._learnforget_initial_lora)
        init_cfg = json.loads((tmp_path / f"{init}_init/adapter_config.json").read_text())
        assert init_cfg["init_lora_weights"] == init
        theirs = tmp_path / f"{init}_peft"
        model.save_pretrained(theirs, path_initial_model_for_weight_conversion=str(
            tmp_path / f"{init}_init"))
        a, b = load_file(ours / "adapter_model.safetensors"), \
            load_file(theirs / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        ca = json.loads((ours / "adapter_config.json").read_text())
        cb = json.loads((theirs / "adapter_config.json").read_text())
        assert (ca["r"], ca["lora_alpha"], ca["init_lora_weights"]) == \
            (cb["r"], cb["lora_alpha"], cb["init_lora_weights"]) == (8, 16, True)
        ids = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            live = model(ids).logits
            loaded = peft.PeftModel.from_pretrained(
                LlamaForCausalLM.from_pretrained(tmp_path / "base"), ours)(ids).logits
        torch.testing.assert_close(loaded, live, atol=1e-5, rtol=1e-5)


# the Llama-2-7B counts, by hand: per layer q, k, v, o 4 x r (4096 + 4096) = 32,768 r; gate, up
# 2 x r (4096 + 11008) = 30,208 r; down r (11008 + 4096) = 15,104 r: 78,080 r; x 32 layers =
# 2,498,560 r. DoRA adds one magnitude per output row: 32 x (4 x 4096 + 2 x 11008 + 4096) =
# 1,359,872. The initialisation and rsLoRA change no count.
LLAMA2_7B = {16: 39_976_960, 64: 159_907_840}


@pytest.mark.parametrize("extra", [(), ("method.rslora=true",), ("method.init=pissa",),
                                   ("method.init=olora",), ("method.init=eva",),
                                   ("method.init=corda",), ("method=dora",)])
@pytest.mark.parametrize("r", [16, 64])
def test_llama2_7b_counts_are_exact(r, extra):
    method = next((e.split("=")[1] for e in extra if e.startswith("method=")), "lora")
    rest = [e for e in extra if not e.startswith("method=")]
    cfg = compose(["model=llama2_7b", f"method={method}", f"method.r={r}", *rest])
    rep = param_report(cfg, activations=False)
    assert rep.trainable == LLAMA2_7B[r] + (1_359_872 if method == "dora" else 0)
    assert rep.base_total == 6_738_415_616


def test_pissa_run_killed_and_resumed_matches_uninterrupted(tmp_path, cache_dir):
    """Resume re-runs the deterministic PiSSA init on the original base and restores B, A:
    the final converted checkpoint equals the uninterrupted run's."""
    from test_resume import killed_and_straight

    runs = tmp_path / "runs"
    pissa = ("method=lora", "method.init=pissa", "train.precision=fp32")
    wa, wb = killed_and_straight(runs, cache_dir, *pissa)
    assert wa.keys() == wb.keys() and all(v.shape[0] == 8 or v.shape[1] == 8 for v in wa.values())
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_lora_variants_study_grid(tmp_path):
    """The study: full (3 LRs) + 5 LoRA variants x 2 ranks x 4 LRs at paper scale (43 jobs);
    toy: full (3) + 5 x 2 ranks x 3 LRs (33), on the tiny Llama."""
    from test_ablation_studies import _plan

    full, toy = _plan("lora_variants", tmp_path), _plan("lora_variants", tmp_path, size="toy")
    assert len(full.jobs) == 3 + 5 * 2 * 4 and len(toy.jobs) == 3 + 5 * 2 * 3
    settings = {(j.cfg.method.name, j.cfg.method.r if j.cfg.method.name != "full" else None,
                 str(j.cfg.method.init), bool(j.cfg.method.rslora)) for j in toy.jobs}
    assert {(m, i, rs) for m, _, i, rs in settings} == {
        ("full", "default", False), ("lora", "default", False), ("lora", "default", True),
        ("lora", "pissa", False), ("lora", "olora", False), ("dora", "default", False)}
    assert {float(j.cfg.train.lr) for j in toy.jobs} == {3e-4, 1e-3, 3e-3}
    assert {j.cfg.model.name for j in full.jobs} == {"llama2_7b"}
    assert {j.cfg.model.name for j in toy.jobs} == {"tiny_llama"}
    lrs = {float(j.cfg.train.lr) for j in full.jobs if j.cfg.method.name == "full"}
    assert lrs == {5e-6, 1e-5, 2e-5}
