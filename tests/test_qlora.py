"""QLoRA gradients equal those of an fp32 model holding the dequantised weights.

bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on the first eval-mode
no-grad forward, after which gradients through frozen 4-bit layers are silently wrong; the
harness turns that path off. The reference here is built independently of bitsandbytes'
matmul: dequantise every 4-bit weight into a plain fp32 Llama with the same LoRA weights.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from learnforget.assets.models import build_config
from learnforget.data.packing import collate


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" in n}


def _reference(s) -> torch.nn.Module:
    """fp32 Llama with W = dequantise(W_4bit) and the QLoRA model's own LoRA weights."""
    q = s.model
    ref = AutoModelForCausalLM.from_config(build_config(s.cfg.model))
    state = {}
    for name, module in q.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[name.replace(".base_layer", "") + ".weight"] = w.float()
            if module.bias is not None:
                state[name.replace(".base_layer", "") + ".bias"] = module.bias.detach().float()
    for name, p in q.get_base_model().named_parameters():
        if "lora_" not in name and ".base_layer." not in name:
            state.setdefault(name, p.detach().float())
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    cfg = q.peft_config["default"]
    ref = get_peft_model(ref, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                         target_modules=cfg.target_modules))
    lora = {n: p for n, p in q.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    return ref


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_gradients_match_dequantised_fp32_reference(make_cfg, quant_type):
    from learnforget.train.loop import setup

    s = setup(make_cfg("method=qlora", f"method.quant_type={quant_type}", "method.r=4",
                       "method.dropout=0.0"))
    assert any("AVX512-BF16" in n for n in s.notes) or not bnb.functional.has_avx512bf16()
    with torch.no_grad():  # make lora_B non-zero so every LoRA grad is informative
        for n, p in s.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = collate(s.data.train[:2], s.tokenizer.pad_token_id)
    s.model.eval()
    with torch.no_grad():  # the forward that triggers the repacking on affected CPUs
        s.model(**batch)
    got = _lora_grads(s.model, batch)
    want = _lora_grads(_reference(s), batch)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                    reason="the wrong-gradient path exists only on CPUs with AVX512-BF16")
def test_without_the_guard_gradients_are_wrong(make_cfg):
    """Shows that the guard is needed: re-enable the fast path and the gradients drift."""
    from learnforget.train.loop import setup

    s = setup(make_cfg("method=qlora", "method.r=4", "method.dropout=0.0",
                       "model.arch.attention_bias=false", "model.arch.mlp_bias=false"))
    with torch.no_grad():
        for n, p in s.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = collate(s.data.train[:2], s.tokenizer.pad_token_id)
    want = _lora_grads(_reference(s), batch)
    for module in s.model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    s.model.eval()
    with torch.no_grad():
        s.model(**batch)
    got = _lora_grads(s.model, batch)
    worst = max(float((got[n] - want[n]).norm() / want[n].norm()) for n in got)
    assert worst > 1e-2
