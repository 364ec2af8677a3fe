"""Parallel adapters (He et al. 2022), method=adapter method.placement=parallel: identity at
init, MLP(x) + s·up(act(down(x))) on the MLP's input checked against torch.nn.functional on the
adapter's weights, s = 1 and the scaled variant s = 4, exact counts by hand on Llama-2-7B,
checkpoints that reload, run names (older adapter runs keep theirs) and bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import eval_logits as _logits
from conftest import load_base as _base

from learnforget.config import compose, run_name, validate
from learnforget.errors import ConfigError
from learnforget.eval.scoring import load_for_eval
from learnforget.methods.apply import apply_method
from learnforget.methods.bottleneck import model as bottleneck
from learnforget.train.loop import fit, setup
from learnforget.train.params import param_report


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_fresh_parallel_adapter_is_the_base_model(make_cfg, model):
    cfg = make_cfg(f"model={model}", "method=adapter", "method.placement=parallel",
                   "method.adapter_scale=4")
    base = _base(cfg)
    before = _logits(base)
    adapted, _ = apply_method(base, cfg.method, model_name=model)
    names = [n for n, _ in bottleneck.adapters(adapted)]
    assert len(names) == adapted.config.num_hidden_layers
    assert all(n.endswith("mlp.bottleneck_adapter") for n in names)
    assert torch.equal(_logits(adapted), before)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_parallel_adapter_adds_its_output_on_the_mlp_input(make_cfg, scale):
    cfg = make_cfg("method=adapter", "method.placement=parallel", "method.bottleneck=8",
                   f"method.adapter_scale={scale}", "method.adapter_act=gelu")
    adapted, _ = apply_method(_base(cfg), cfg.method, model_name="tiny_llama")
    mlp = adapted.model.layers[1].mlp
    ad = mlp.bottleneck_adapter
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.3)
    seen = {}
    h = mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    _logits(adapted)
    h.remove()
    x = seen["x"]
    mlp_only = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # LlamaMLP by hand
    adapter = F.linear(F.gelu(F.linear(x, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)
    torch.testing.assert_close(seen["y"], mlp_only + scale * adapter, rtol=1e-5, atol=1e-6)
    assert adapter.abs().max() > 1e-2  # the adapter's term matters


def test_llama2_7b_parallel_count_by_hand():
    rep = param_report(compose(["model=llama2_7b", "method=adapter", "method.bottleneck=64",
                                "method.placement=parallel", "method.adapter_scale=4"]),
                       activations=False)
    # 32 layers x (down 4096x64 + 64 bias, up 64x4096 + 4096 bias) = 32 x 528,448
    assert rep.trainable == 16_910_336
    assert rep.total == rep.base_total + 16_910_336


def test_trains_and_reloads_with_its_scale(make_cfg):
    cfg = make_cfg("method=adapter", "method.placement=parallel", "method.bottleneck=8",
                   "method.adapter_scale=4", "train.lr=1e-2", "train.checkpoints.at=[2]",
                   "train.precision=fp32")
    s = setup(cfg)
    out = fit(s)
    ckpt = out / "checkpoints" / "step-000002"
    reloaded = load_for_eval(cfg, ckpt, Path(cfg.paths.cache_dir), "cpu")
    assert {a.scale for _, a in bottleneck.adapters(reloaded)} == {4.0}
    assert torch.equal(_logits(reloaded), _logits(s.model))
    assert not torch.equal(_logits(reloaded), _logits(_base(cfg)))


def test_run_names_and_bad_scale(make_cfg):
    assert "-adapter_b64_parallel_relu_s4-" in run_name(
        make_cfg("method=adapter", "method.placement=parallel", "method.adapter_scale=4"))
    # s = 1 (the default) leaves the name and hash of every earlier adapter run as they were
    assert run_name(make_cfg("method=adapter", "method.adapter_scale=1.0")) == run_name(
        make_cfg("method=adapter"))
    assert "-adapter_b64_houlsby_relu-" in run_name(make_cfg("method=adapter"))
    with pytest.raises(ConfigError, match="method.adapter_scale must be a number > 0.*got -1"):
        validate(make_cfg("method=adapter", "method.adapter_scale=-1"))
    with pytest.raises(ConfigError, match="method.placement 'beside' is unknown.*parallel"):
        validate(make_cfg("method=adapter", "method.placement=beside"))
