"""Saved adapters reload to identical logits; merged weights equal base + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from learnforget.assets.models import load_model
from learnforget.train.loop import fit, setup

INPUT = torch.tensor([[5, 17, 300, 42, 1000, 7, 99, 12]])


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=torch.ones_like(INPUT)).logits


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt", "qlora", "vera",
                                    "loha"])
def test_adapter_save_reload_gives_identical_logits(make_cfg, method):
    cfg = make_cfg(f"method={method}", "method.r=4", "method.num_virtual_tokens=4",
                   "train.precision=fp32")  # fp32 compute on every CPU: the reload is fp32
    s = setup(cfg)
    out = fit(s)
    trained = _logits(s.model)
    base, _, _ = load_model(cfg.model, cfg.method, Path(cfg.paths.cache_dir), "cpu")
    reloaded = PeftModel.from_pretrained(base, out / "checkpoints" / "step-000002")
    assert torch.equal(_logits(reloaded), trained)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera", "loha"])
def test_merged_weights_match_base_plus_adapter(make_cfg, method):
    s = setup(make_cfg(f"method={method}", "method.r=4", "train.lr=1e-2", "train.precision=fp32"))
    fit(s)
    unmerged = _logits(s.model)
    base_only = AutoModelForCausalLM.from_pretrained(s.base_path)
    assert not torch.allclose(_logits(base_only), unmerged, atol=1e-4)  # the adapter matters
    merged = s.model.merge_and_unload()
    adapter_names = ("lora", "ia3", "vera", "hada")
    assert not any(a in n for a in adapter_names for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), unmerged, atol=1e-5, rtol=1e-5)


def test_full_checkpoint_reloads_identically(make_cfg):
    s = setup(make_cfg("method=full"))
    out = fit(s)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000002")
    assert torch.equal(_logits(reloaded), _logits(s.model))
