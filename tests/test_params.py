"""`learnforget params`: exact counts for Llama-2-7B-shaped configs, on the meta device."""

from __future__ import annotations

import subprocess
import sys

import pytest

from learnforget.config import compose
from learnforget.train.params import param_report, quantised_bytes_per_param

# Llama-2-7B by hand: d=4096, ffn=11008, 32 layers, vocab 32000, untied head, no biases.
D, F, L, V = 4096, 11008, 32, 32000
PER_LAYER = 4 * D * D + 3 * D * F + 2 * D          # q,k,v,o + gate,up,down + 2 RMSNorms
LLAMA2_7B = L * PER_LAYER + 2 * V * D + D          # + embeddings, LM head, final norm


def lora_params(r: int, modules: str = "all") -> int:
    attn = 4 * r * (D + D)
    mlp = 2 * r * (D + F) + r * (F + D)
    return L * {"all": attn + mlp, "attention": attn, "mlp": mlp}[modules]


def test_hand_count_is_the_published_size():
    assert LLAMA2_7B == 6_738_415_616


@pytest.mark.parametrize("r", [16, 64, 256])
@pytest.mark.parametrize("targets", ["all", "attention", "mlp"])
def test_lora_counts_are_exact(r, targets):
    rep = param_report(compose(["model=llama2_7b", "method=lora", f"method.r={r}",
                                f"method.targets={targets}"]))
    assert rep.base_total == LLAMA2_7B
    assert rep.trainable == lora_params(r, targets)
    assert rep.total == LLAMA2_7B + lora_params(r, targets)


def test_full_and_other_methods():
    full = param_report(compose(["model=llama2_7b", "method=full"]))
    assert full.trainable == full.total == LLAMA2_7B
    # fp32 master weights, fp32 gradients, fp32 Adam moments: 4 + 4 + 8 = 16 bytes/param (the
    # paper's 112 GB), whatever model.dtype (bf16) is
    assert full.total_bytes == pytest.approx(16 * LLAMA2_7B)
    assert full.master == "float32"
    # training the bf16 weights directly (the lossy opt-in): 2 + 2 + 4 = 8 bytes/param
    pure = param_report(compose(["model=llama2_7b", "method=full",
                                 "train.master_weights=model_dtype", "train.precision=bf16"]))
    assert pure.total_bytes == pytest.approx(8 * LLAMA2_7B)
    # LionW keeps one moment: 4 + 4 + 4 = 12 bytes/param
    lion = param_report(compose(["model=llama2_7b", "method=full", "train.optimizer=lionw"]))
    assert lion.total_bytes == pytest.approx(12 * LLAMA2_7B)
    dora = param_report(compose(["model=llama2_7b", "method=dora", "method.r=16"]))
    magnitudes = L * (4 * D + 2 * F + D)             # one per output feature of each target
    assert dora.trainable == lora_params(16) + magnitudes
    ia3 = param_report(compose(["model=llama2_7b", "method=ia3"]))
    assert ia3.trainable == L * (D + D + F)           # k, v outputs; down_proj input
    topk = param_report(compose(["model=llama2_7b", "method=topk", "method.top_k=2"]))
    assert topk.trainable == 2 * PER_LAYER + D        # two blocks + final norm
    prompt = param_report(compose(["model=llama2_7b", "method=prompt",
                                   "method.num_virtual_tokens=20"]))
    assert prompt.trainable == 20 * D
    prefix = param_report(compose(["model=llama2_7b", "method=prefix",
                                   "method.num_virtual_tokens=20"]))
    assert prefix.trainable == 20 * L * 2 * D


def test_methods_added_by_yaml_count_exactly():
    # VeRA: per adapted layer a scaling vector b (out_features) and d (r); the random
    # projections A, B are shared buffers, not parameters. All 7 linear layers per block.
    # train.precision=bf16 as on a GPU: `auto` (the default) resolves to fp32 on a CPU without
    # bf16 arithmetic (AMD EPYC VMs), and the frozen base is then counted in fp32
    vera = param_report(compose(["model=llama2_7b", "method=vera", "train.precision=bf16"]))
    assert vera.frozen == "bfloat16"
    outs = 4 * D + 2 * F + D                          # q,k,v,o: D; gate,up: F; down: D
    assert vera.trainable == L * (outs + 7 * 256) == 1_417_216
    assert vera.total == LLAMA2_7B + vera.trainable
    # memory: bf16 frozen base, fp32 vectors, and the shared fp32 projections A (r x F), B (F x r)
    assert vera.weights_bytes == 2 * LLAMA2_7B + 4 * vera.trainable + 4 * 2 * 256 * F
    # LoHa: two rank-r factor pairs per layer, 2 r (in + out) values; r = 8
    loha = param_report(compose(["model=llama2_7b", "method=loha"]))
    in_plus_out = 4 * (D + D) + 2 * (D + F) + (F + D)
    assert loha.trainable == L * 2 * 8 * in_plus_out == 39_976_960
    assert param_report(compose(["model=llama2_7b", "method=loha", "method.r=4",
                                 "method.targets=attention"])).trainable == L * 2 * 4 * 8 * D


def test_qlora_memory_uses_4bit_weights():
    q = param_report(compose(["model=llama2_7b", "method=qlora", "method.r=16"]))
    assert q.trainable == lora_params(16)
    quantised = L * (4 * D * D + 3 * D * F)
    rest = LLAMA2_7B - quantised
    expected = quantised * quantised_bytes_per_param(64, True) + rest * 4 + q.trainable * 4
    assert q.weights_bytes == pytest.approx(expected)
    assert quantised_bytes_per_param(64, True) * 8 - 4 == pytest.approx(0.127, abs=1e-3)


def test_cli_prints_counts_without_network():
    out = subprocess.run([sys.executable, "-m", "learnforget.cli", "params", "model=llama2_7b",
                          "method=lora", "method.r=16"], capture_output=True, text=True,
                         timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "39,976,960" in out.stdout and "6,738,415,616" in out.stdout
