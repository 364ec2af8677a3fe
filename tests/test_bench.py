"""`learnforget bench` on the tiny model: every figure is produced and the memory estimate of
`learnforget params` matches the peak measured on real tensors."""

from __future__ import annotations

import json

import pytest
from conftest import OFFLINE_DATA

from learnforget.bench.runner import bench_memory, bench_train
from learnforget.cli import main
from learnforget.train.params import param_report


@pytest.fixture
def extra(cache_dir):
    return [f"paths.cache_dir={cache_dir}", *OFFLINE_DATA["stdlib_code"]]


def test_train_bench_times_harness_and_bare_loop(tmp_path, extra):
    r = bench_train("tiny_llama", repeats=2, steps=3, batch_size=2, seq_len=32,
                    runs_dir=tmp_path, extra=extra, plain=False, gemm_n=128)
    for method in ("lora", "full"):
        v = r["methods"][method]
        assert v["harness_tokens_per_s"]["n"] == v["bare_tokens_per_s"]["n"] == 2
        # 2 timed steps of 2 x 32 tokens each: the rates come from real token counts
        harness, bare = v["harness_tokens_per_s"]["values"], v["bare_tokens_per_s"]["values"]
        assert all(t > 0 for t in harness + bare)
        ratios = v["ratio_harness_over_bare"]["values"]
        assert ratios == pytest.approx([h / b for h, b in zip(harness, bare, strict=True)])
        # both loops ran on the same setup, each for 2 timed steps per repeat
        for which in ("harness", "bare"):
            assert len(v["steps"][which]["wall"]) == len(v["steps"][which]["cpu"]) == 4
            assert all(c > 0 for c in v["steps"][which]["cpu"])
        extras = v["harness_extras_ms"]
        assert extras["total"] == pytest.approx(sum(x for k, x in extras.items() if k != "total"))
        assert extras["clip_grad_norm"] > 0 and 0 < v["harness_extras_share_of_bare_step"] < 1
        cpu = v["cpu_ratio_bare_over_harness"]["values"]
        assert cpu == pytest.approx([b / h for h, b in zip(
            v["harness_step_cpu_s"]["values"], v["bare_step_cpu_s"]["values"], strict=True)])
    assert r["lora_over_full_step_time"]["median"] > 0


@pytest.mark.parametrize("policy", [["train.precision=fp32"], ["train.precision=bf16"],
                                    ["train.precision=bf16", "train.activation_checkpointing=true"]])
def test_memory_estimate_matches_measured_peak(tmp_path, extra, policy):
    """Within 10% under fp32 compute, bf16 compute with fp32 masters, and with activation
    checkpointing (measured here: 0.998-1.026)."""
    r = bench_memory("tiny_llama", repeats=1, batch_size=4, seq_len=64, runs_dir=tmp_path,
                     extra=[*extra, *policy])
    for method in ("lora", "full"):
        v = r["methods"][method]
        measured = v["measured_parts"]
        assert measured["activation"] > 0 and measured["parameter"] > 0
        assert v["estimate_over_measured"]["median"] == pytest.approx(1.0, abs=0.10)
    # full finetuning holds optimizer state for every weight, LoRA only for its factors
    assert (r["methods"]["full"]["measured_parts"]["optstate"]
            > 10 * r["methods"]["lora"]["measured_parts"]["optstate"])


def test_params_reports_activations_that_grow_with_the_batch(make_cfg):
    # fp32 compute: everything autograd keeps scales with the batch (under bf16 the 16-bit
    # copies of the fp32 master weights that autocast keeps are a constant on top)
    small = param_report(make_cfg("model=tiny_llama", "train.batch_size=2", "train.precision=fp32"))
    big = param_report(make_cfg("model=tiny_llama", "train.batch_size=8", "train.precision=fp32"))
    assert small.activations_bytes and big.activations_bytes
    assert big.activations_bytes == pytest.approx(4 * small.activations_bytes, rel=0.01)
    assert big.peak_bytes > big.total_bytes


def test_bench_cli_writes_json_and_rejects_unknown_sections(tmp_path, extra, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "memory", "--model", "tiny_llama", "--memory-repeats", "1",
                 "--batch-size", "2", "--seq-len", "32", "--json", str(out), *extra]) == 0
    data = json.loads(out.read_text())
    assert set(data["memory"]["methods"]) == {"lora", "full"}
    assert data["memory"]["methods"]["full"]["measured_peak_bytes"]["n"] == 1
    assert "peak memory of a training step" in capsys.readouterr().out
    assert main(["bench", "trian"]) == 2
    assert "unknown bench section 'trian'" in capsys.readouterr().err
    assert main(["bench", "memory", "--memory-repeats", "0"]) == 2
    assert "--memory-repeats must be at least 1, got 0" in capsys.readouterr().err


def test_precision_part_compares_bf16_and_fp32_on_the_same_batches(tmp_path, extra):
    from learnforget.bench.precision import bench_precision, format_precision

    r = bench_precision("tiny_llama", repeats=2, steps=3, batch_size=2, seq_len=32,
                        runs_dir=tmp_path, methods=("full",), extra=extra)
    v = r["methods"]["full"]
    assert len(v["loss_bf16"]) == len(v["loss_fp32"]) == 3
    assert v["loss_bf16"] != v["loss_fp32"]  # bf16 compute rounds differently...
    assert v["max_rel_loss_diff"] < 0.02     # ...but follows the fp32 curve
    ratios = v["bf16_over_fp32_step_time"]["values"]
    assert ratios == pytest.approx([a / b for a, b in zip(
        v["bf16_step_s"]["values"], v["fp32_step_s"]["values"], strict=True)])
    assert "bf16/fp32 time" in format_precision(r)


def test_loss_section_times_both_paths_on_instruction_data(tmp_path, cache_dir, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "loss", "--model", "tiny_llama", "--steps", "3", "--loss-batch-size",
                 "4", "--methods", "lora,full", "--json", str(out),
                 f"paths.cache_dir={cache_dir}", *OFFLINE_DATA["arith_ift"]]) == 0
    r = json.loads(out.read_text())["loss"]["methods"]
    assert set(r) == {"lora", "full"}
    for v in r.values():
        assert 0 < v["labelled_share"] < 0.6  # prompts and padding: no label
        assert v["chunked_cpu_s"]["n"] == v["transformers_cpu_s"]["n"] == 2  # the first untimed
        assert v["ratio_chunked_over_transformers_cpu"]["values"] == pytest.approx(
            [a / b for a, b in zip(v["chunked_cpu_s"]["values"],
                                   v["transformers_cpu_s"]["values"], strict=True)])
        assert v["max_rel_loss_diff"] < 1e-5  # the same loss: summation order only
    assert "chunked/transformers" in capsys.readouterr().out
