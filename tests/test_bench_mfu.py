"""`learnforget bench train`'s MFU figures (learnforget.bench.mfu) on tiny_llama: parameter
counts and FLOPs per token against a hand count of the architecture, MFU arithmetic against the
measured rates and peaks, and the plain loop's loss curve against the harness's."""

from __future__ import annotations

import pytest
from conftest import OFFLINE_DATA

from learnforget.bench import mfu
from learnforget.bench.mfu import format_train
from learnforget.bench.runner import bench_train

# tiny_llama (conf/model/tiny_llama.yaml): vocab 2048, width 64, MLP 256, 2 layers, biases on
# q/k/v/o and gate/up/down, untied LM head. Per layer: 4 x (64*64 + 64) attention + 2 x
# (64*256 + 256) + (256*64 + 64) MLP + 2 x 64 norms = 66,496; embedding and head 2 x 2048*64;
# final norm 64.
TINY_N = 2 * 66_496 + 2 * 2048 * 64 + 64
# LoRA r=8 on the 7 linear layers: r x (in + out) each: 4 x 8*128 + 3 x 8*320 per layer
TINY_LORA = 2 * (4 * 8 * 128 + 3 * 8 * 320)


def test_flops_per_token_by_hand():
    assert TINY_N == 395_200 and TINY_LORA == 23_552
    assert mfu.flops_per_token(TINY_N, TINY_N, True) == {"6N": 2_371_200, "adapter": 2_371_200}
    lora = mfu.flops_per_token(TINY_N + TINY_LORA, TINY_LORA, False)
    assert lora == {"6N": 6 * 418_752, "adapter": 4 * 395_200 + 6 * 23_552}
    f = mfu.mfu_figures(1000.0, TINY_N, TINY_N, True, {"bf16": 50.0, "fp32": 10.0})
    assert f["model_gflops"]["6N"] == pytest.approx(2.3712)  # 1000 tok/s x 2,371,200 FLOP
    assert f["mfu"]["6N"] == pytest.approx({"bf16": 2.3712 / 50, "fp32": 2.3712 / 10})
    assert mfu.gemm_flops(2048) == 2 * 2048**3


def test_gemm_peak_is_a_rate_of_real_matmuls():
    import torch

    r = mfu.gemm_peak(torch.float32, n=256, repeats=2)
    assert len(r["seconds"]) == 2 and r["gflops"] == pytest.approx(
        2 * 256**3 / min(r["seconds"]) / 1e9)


def test_bench_train_reports_mfu_beside_plain_and_old_loops(tmp_path, cache_dir):
    extra = [f"paths.cache_dir={cache_dir}", *OFFLINE_DATA["stdlib_code"],
             "train.precision=fp32", "train.num_threads=1"]
    r = bench_train("tiny_llama", repeats=1, steps=3, batch_size=2, seq_len=32,
                    runs_dir=tmp_path, extra=extra, old=True, bare=False, gemm_n=128)
    assert set(r["gemm_peak"]) == {"bf16", "fp32"} and r["cpu_model"]
    peaks = {k: v["gflops"] for k, v in r["gemm_peak"].items()}
    full, lora = r["methods"]["full"], r["methods"]["lora"]
    assert (full["total_params"], full["trainable_params"]) == (TINY_N, TINY_N)
    assert (lora["total_params"], lora["trainable_params"]) == (TINY_N + TINY_LORA, TINY_LORA)
    for method, v in r["methods"].items():
        assert "bare_tokens_per_s" not in v
        for loop in ("harness", "old", "plain"):
            tps = v[f"{loop}_tokens_per_s"]["median"]
            assert tps > 0
            # 2 x 32 tokens per step over the median of 2 timed steps
            assert tps == pytest.approx(64 / v[f"{loop}_step_s"]["median"])
            per_token = v["flops_per_token"]["adapter"]
            g = v[f"{loop}_mfu"]["model_gflops"]["adapter"]
            assert g == pytest.approx(tps * per_token / 1e9)
            assert v[f"{loop}_mfu"]["mfu"]["adapter"]["bf16"] == pytest.approx(g / peaks["bf16"])
            # per process CPU second: the median step's CPU seconds against the peak's
            per_cpu = 64 / v[f"{loop}_step_cpu_s"]["median"] * per_token / 1e9
            fp32_cpu = r["gemm_peak"]["fp32"]["gflops_per_cpu_s"]
            assert v[f"{loop}_mfu_cpu"]["mfu"]["adapter"]["fp32"] == pytest.approx(
                per_cpu / fp32_cpu)
        assert v["ratio_harness_over_plain"]["median"] == pytest.approx(
            v["harness_tokens_per_s"]["median"] / v["plain_tokens_per_s"]["median"])
        # the same batches: the first step starts from the same weights (LoRA: B = 0)
        assert len(v["loss_harness"]) == len(v["loss_plain"]) == len(v["loss_old"]) == 3
        assert v["loss_plain"][0] == pytest.approx(v["loss_harness"][0], rel=1e-5), method
        assert v["max_rel_loss_diff_old"] < 2e-3
    assert full["max_rel_loss_diff_plain"] < 2e-3
    assert "MFU/CPU s" in format_train(r)
    assert r["lora_over_full_tokens_per_s"]["median"] == pytest.approx(
        lora["harness_tokens_per_s"]["median"] / full["harness_tokens_per_s"]["median"])
