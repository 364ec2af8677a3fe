"""The regulariser comparison (sweeps/regularisers.yaml, paper sec. 4.5) and the adapter
placement ablation (sweeps/adapter_placement.yaml): their jobs at paper scale and at the
laptop and toy sizes, GPU-hours and trainable counts against hand calculations, the arms of
the analysis (collect's regulariser/arm columns), and each toy study end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_ablation_studies import _plan

from learnforget.analysis.collect import _add_arms
from learnforget.analysis.figures import _group_label
from learnforget.studies.report import memory_table


def _arm(job) -> tuple:
    c = job.cfg
    return (c.method.name, c.method.r if c.method.name == "lora" else None,
            c.train.get("attention_dropout"), c.train.weight_decay, c.train.lr)


# ---------------------------------------------------------------------------- regularisers

def test_regularisers_paper_scale_jobs_and_gpu_hours(tmp_path):
    plan = _plan("regularisers", tmp_path)
    assert sorted(map(_arm, plan.jobs), key=str) == sorted([
        ("full", None, None, 0.0, 5e-5),
        ("full", None, 0.05, 0.0, 5e-5), ("full", None, 0.1, 0.0, 5e-5),
        ("full", None, None, 5e-5, 5e-5), ("full", None, None, 1e-4, 5e-5),
        ("lora", 16, None, 0.0, 2e-4), ("lora", 256, None, 0.0, 1e-4)], key=str)
    for j in plan.jobs:  # code_ift's settings: Llama-2-7B, Magicoder, LionW, epochs 1..16
        c = j.cfg
        assert (c.model.name, c.data.name, c.eval.name, c.train.optimizer) == (
            "llama2_7b", "magicoder_evol", "paper", "lionw")
        assert list(c.train.checkpoints.at) == [1, 2, 4, 8, 16]
    # hand: 16 epochs x 72,970,000 tokens / 5,000 tokens/s / 3,600 s (LoRA / 0.85) + 5 evals
    train_h = 16 * 72_970_000 / 5000 / 3600
    want = sorted([train_h + 5] * 5 + [train_h / 0.85 + 5] * 2)
    assert sorted(j.gpu_hours for j in plan.jobs) == pytest.approx(want)
    # the plain full and LoRA arms are code_ift's jobs: the same run names
    code_ift = {j.run_dir.name for j in _plan("code_ift", tmp_path).jobs}
    mine = {j.run_dir.name for j in plan.jobs}
    assert len(mine) == 7 and len(mine & code_ift) == 3


@pytest.mark.parametrize(("size", "model", "ranks"), [("laptop", "smollm2_135m", (2, 32)),
                                                      ("toy", "tiny_llama", (2, 32))])
def test_regularisers_smaller_sizes(tmp_path, size, model, ranks):
    plan = _plan("regularisers", tmp_path, size)
    arms = sorted(map(_arm, plan.jobs), key=str)
    assert len(arms) == 7 and {j.cfg.model.name for j in plan.jobs} == {model}
    assert [a for a in arms if a[0] == "lora"] == [("lora", ranks[0], None, 0.0, 2e-4),
                                                   ("lora", ranks[1], None, 0.0, 1e-4)]
    assert sorted(((a[2], a[3]) for a in arms if a[0] == "full"), key=str) == sorted(
        [(None, 0.0), (0.05, 0.0), (0.1, 0.0), (None, 5e-5), (None, 1e-4)], key=str)
    assert all(j.gpu_hours == 0 for j in plan.jobs)


def test_laptop_lora_ranks_keep_the_paper_trainable_shares(tmp_path):
    """r=2 and r=32 on SmolLM2-135M against r=16 and r=256 on Llama-2-7B: 305,280 and
    2,498,560 trainable per unit of rank (all seven linear layers), by hand."""
    from learnforget.train.params import cached_param_report

    jobs = {j.cfg.method.r: j for j in _plan("regularisers", tmp_path, "laptop").jobs
            if j.cfg.method.name == "lora"}
    reports = {r: cached_param_report(j.cfg, activations=False) for r, j in jobs.items()}
    per_rank = 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # q, o; k, v; mlp
    assert per_rank == 305_280
    assert reports[2].trainable == 2 * per_rank and reports[32].trainable == 32 * per_rank
    total = reports[2].base_total
    paper = {16: 16 * 2_498_560 / 6_738_415_616, 256: 256 * 2_498_560 / 6_738_415_616}
    assert 2 * 305_280 / total == pytest.approx(paper[16], rel=0.35)
    assert 32 * 305_280 / total == pytest.approx(paper[256], rel=0.35)


def test_arms_name_only_the_regularisers_that_vary():
    df = pd.DataFrame({"method": ["full", "full", "full", "lora"],
                       "method_summary": ["full", "full", "full", "lora_r16_a32_all"],
                       "rank": [None, None, None, 16],
                       "attention_dropout": [None, 0.1, float("nan"), None],
                       "weight_decay": [0.0, 0.0, 1e-4, 0.0]})
    _add_arms(df)
    assert df["arm"].tolist() == ["full", "full + attn dropout 0.1", "full + wd 0.0001",
                                  "lora_r16_a32_all"]
    assert [_group_label(r) for _, r in df.iterrows()] == [
        "full", "full + attn dropout 0.1", "full + wd 0.0001", "lora r16"]
    same = pd.DataFrame({"method": ["full", "lora"], "method_summary": ["full", "lora_r16_a32_all"],
                         "rank": [None, 16], "attention_dropout": [None, None],
                         "weight_decay": [1e-6, 1e-6]})  # code_cpt: one decay throughout
    _add_arms(same)
    assert same["arm"].tolist() == ["full", "lora_r16_a32_all"]
    assert same["regulariser"].tolist() == ["", ""]


# ---------------------------------------------------------------------------- adapter placement

def _adapter(hidden: int, b: int) -> int:
    return 2 * hidden * b + b + hidden  # down (weight + bias), up (weight + bias)


@pytest.mark.parametrize(("size", "hidden", "layers", "b_houlsby", "b_one", "lora"), [
    (None, 4096, 32, 32, 64, 7 * 2_498_560),
    ("laptop", 576, 30, 32, 64, 7 * 305_280),
    ("toy", 64, 2, 5, 11, 2 * (4 * (64 + 64) + 3 * (64 + 256))),
])
def test_adapter_placement_matched_counts(tmp_path, size, hidden, layers, b_houlsby, b_one, lora):
    plan = _plan("adapter_placement", tmp_path, size)
    got = {(j.cfg.method.name, j.cfg.method.get("placement") if j.cfg.method.name == "adapter"
            else None, j.cfg.method.adapter_scale if j.cfg.method.name == "adapter" else None):
           r["trainable"] for j, r in zip(plan.jobs, memory_table(plan), strict=True)}
    one = layers * _adapter(hidden, b_one)
    assert {k: v for k, v in got.items() if k[0] != "full"} == {
        ("adapter", "houlsby", 1.0): 2 * layers * _adapter(hidden, b_houlsby),
        ("adapter", "pfeiffer", 1.0): one,
        ("adapter", "parallel", 1.0): one, ("adapter", "parallel", 4.0): one,
        ("lora", None, None): lora}
    budget = [v for k, v in got.items() if k[0] != "full"]
    assert max(budget) / min(budget) < 1.06  # one trainable budget (within 6%)
    if size is None:
        assert one == 16_910_336 and 2 * layers * _adapter(hidden, b_houlsby) == 17_041_408
        hand = 2 * 103_000_000 / 5000 / 3600  # 2 epochs of MetaMathQA, 2 evals
        assert sorted(j.gpu_hours for j in plan.jobs) == pytest.approx(
            sorted([hand / 0.85 + 2] * 5 + [hand + 2]))


# ---------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_regularisers_toy_end_to_end(tmp_path, cache_dir):
    """The 7 toy jobs train, are scored, and land on one plot as 7 arms; the dropout arms record
    their dropout, and every full arm differs from plain full finetuning."""
    from learnforget.analysis.collect import collect
    from learnforget.studies.command import sweep_main

    runs = tmp_path / "runs"
    extra = [f"paths.runs_dir={runs}", f"paths.cache_dir={cache_dir}"]
    assert sweep_main("regularisers", extra, size="toy", launcher="basic") == 0
    root = runs / "regularisers_toy"
    df = collect(root, verbose=False)
    last = df[df["checkpoint"] == "epoch-2"].set_index("arm")
    assert sorted(last.index) == sorted([
        "full", "full + attn dropout 0.05", "full + attn dropout 0.1", "full + wd 5e-05",
        "full + wd 0.0001", "lora_r2_a4_all", "lora_r32_a64_all"])
    plain = last.loc["full", "target_ce"]
    for arm in ("full + attn dropout 0.05", "full + attn dropout 0.1", "full + wd 0.0001"):
        assert last.loc[arm, "target_ce"] != plain
    for run in last["run_dir"]:
        info = json.loads((Path(run) / "run.json").read_text())
        has = any(n.startswith("train.attention_dropout=") for n in info["train"]["notes"])
        assert has == ("attn dropout" in last.loc[last["run_dir"] == run].index[0])
    assert (root / "_analysis" / "learning_vs_forgetting.png").exists()
    md = (root / "_analysis" / "matched_learning.md").read_text()
    assert "full + attn dropout 0.1" in md and "full + wd 5e-05" in md
    # the per-unit answers pair plain full with each arm (not whichever full run came last)
    regime = (root / "_analysis" / "regime.md").read_text()
    for arm in sorted(set(last.index) - {"full"}):
        assert f"## full vs {arm}\n" in regime
    assert "1. does full + wd 0.0001 learn less?" in regime


@pytest.mark.slow
def test_adapter_placement_toy_end_to_end(tmp_path, cache_dir):
    from learnforget.analysis.collect import collect
    from learnforget.studies.command import sweep_main

    runs = tmp_path / "runs"
    extra = [f"paths.runs_dir={runs}", f"paths.cache_dir={cache_dir}"]
    assert sweep_main("adapter_placement", extra, size="toy", launcher="basic") == 0
    df = collect(runs / "adapter_placement_toy", verbose=False)
    last = df[df["checkpoint"] == "epoch-2"]
    assert len(last) == 6 and last["target_ce"].notna().all()
    base = df.loc[df["checkpoint"] == "base", "target_ce"].iloc[0]
    assert (last["target_ce"] < base).all()  # every arm learns at AdamW 1e-3
