"""The latency benchmark on tiny_llama: every variant x shape timed, base ratio 1, no variant
is a no-op, merged LoRA computes what unmerged LoRA does."""

from __future__ import annotations

import torch

from learnforget.bench.latency import VARIANTS, build_variants, format_latency, run_latency


def test_every_variant_and_shape_is_timed(cache_dir):
    res = run_latency("tiny_llama", batch_sizes=(1, 2), seq_lens=(4, 8), repeats=2,
                      threads=1, cache_dir=cache_dir, warmup=1)
    assert res["variants"] == list(VARIANTS)
    shapes = {(1, 4), (1, 8), (2, 4), (2, 8)}
    rows = {(r["variant"], r["batch"], r["seq"]): r for r in res["rows"]}
    assert set(rows) == {(v, b, s) for v in VARIANTS for b, s in shapes}
    for r in rows.values():
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
        assert r["ratio"] > 0 and r["ratio_lo"] <= r["ratio_hi"]
        if r["variant"] == "base":
            assert r["ratio"] == r["ratio_lo"] == r["ratio_hi"] == 1.0
    assert res["info"]["lora_merged"]["extra_params"] == 0
    assert res["info"]["adapter_houlsby"]["adapter_params"] == 2 * res["info"][
        "adapter_pfeiffer"]["adapter_params"]
    table = format_latency(res)
    assert all(v in table for v in VARIANTS) and "b=2 s=8" in table


def test_variants_are_not_no_ops(cache_dir):
    models, _ = build_variants("tiny_llama", cache_dir)
    ids = torch.tensor([[5, 17, 300, 42, 1000, 7]])
    with torch.inference_mode():
        out = {v: m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
               for v, m in models.items()}
    for v in VARIANTS:
        if v != "base":
            assert not torch.allclose(out[v], out["base"], atol=1e-4), v
    torch.testing.assert_close(out["lora_merged"], out["lora"], atol=1e-5, rtol=1e-5)
