"""The disk bill in the dry run (issue 29, item 2): each job's checkpoints, resume state, peak
and kept bytes, the token shards, the study's total against the free space under the runs
folder, and a warning when it does not fit. Numbers are checked against parameter counts made
independently (a plain transformers model; Llama-2-7B's published count)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learnforget.studies import disk
from learnforget.studies.command import sweep_main
from learnforget.studies.plan import expand, refresh_states
from learnforget.studies.study import find_study, load_study

LLAMA2_7B = 6_738_415_616  # parameters of Llama-2-7B (its model card / safetensors index)
Usage = namedtuple("Usage", "total used free")


def test_code_cpt_full_checkpoint_is_27_gb_and_its_resume_state_twice_that(tmp_path):
    plan = expand(load_study(find_study("code_cpt")),
                  [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'c'}"])
    refresh_states(plan)
    full = next(j for j in plan.jobs if j.cfg.method.name == "full")
    row = disk.job_disk(full.cfg, full.index)
    assert row.checkpoint == LLAMA2_7B * 4  # every weight as an fp32 master: 27.0 GB
    # LionW keeps one fp32 moment: weights + moment, plus the small schedule/RNG part
    assert row.resume == LLAMA2_7B * 8 + disk.STATE_EXTRA
    n = 8  # budgets, each a cooldown branch
    assert row.budgets == n and row.branches
    assert row.peak == n * row.resume + 2 * row.resume + 2 * n * row.checkpoint
    assert row.kept == 2 * n * row.checkpoint
    lora16 = next(j for j in plan.jobs if j.cfg.method.name == "lora" and j.cfg.method.r == 16)
    # all-linear LoRA on Llama-2-7B: 2,498,560 parameters per unit of rank, float32
    assert disk.job_disk(lora16.cfg).checkpoint == 2_498_560 * 16 * 4


def _tiny_counts() -> tuple[int, int]:
    """(all parameters, bytes) of the tiny Llama of conf/model/tiny_llama.yaml, built plainly."""
    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    return n, 4 * n


def test_dry_run_prints_the_disk_table_and_warns_on_a_nearly_full_folder(tmp_path, capsys,
                                                                        monkeypatch):
    runs = tmp_path / "runs"
    overrides = [f"paths.runs_dir={runs}", f"paths.cache_dir={tmp_path / 'c'}"]
    n, full_bytes = _tiny_counts()
    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(*real(p)[:2], 10**9))
    assert sweep_main("demo_tiny", overrides, dry_run=True) == 0
    out, err = capsys.readouterr()
    assert "disk per job (GB = 1e9 bytes" in out and "warning" not in err
    table = out.split("disk per job (GB = 1e9 bytes")[1].splitlines()
    full_line = next(x for x in table if x.split()[:2] == ["1", "full"])
    # demo_tiny: full, AdamW (2 fp32 moments), 2 budgets, single cooldown
    ckpt, resume = full_bytes, 3 * full_bytes + disk.STATE_EXTRA
    assert full_line.split()[2:10] == [f"{ckpt / 1e6:,.1f}", "MB", "2", f"{resume / 1e6:,.1f}",
                                       "MB", f"{(2 * ckpt + 2 * resume) / 1e6:,.1f}", "MB",
                                       f"{2 * ckpt / 1e6:,.1f}"]
    # nearly full: 1 MB free
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(*real(p)[:2], 10**6))
    assert sweep_main("demo_tiny", overrides, dry_run=True) == 0
    out, err = capsys.readouterr()
    warn = [x for x in err.splitlines() if x.startswith("learnforget: warning: the study does "
                                                        "not fit on disk")]
    assert len(warn) == 1 and "1.0 MB are free" in warn[0], err
    assert not runs.exists()  # a dry run writes nothing


def test_prepared_shards_need_nothing_more_and_unknown_sizes_say_so(tmp_path):
    from learnforget.config import compose

    cfg = compose(["data=stdlib_code", "data.format=shards", f"paths.cache_dir={tmp_path}"])
    key, need, note = disk.corpus_disk(cfg)
    assert need is None and "unknown until prepared" in note
    cfg = compose(["data=stdlib_code", "data.format=shards", "data.expected_tokens=1000",
                   f"paths.cache_dir={tmp_path}"])
    key, need, note = disk.corpus_disk(cfg)
    assert need == 2000 and "1,000 tokens x 2 B" in note  # vocabulary 2,048: uint16 tokens
    assert disk.corpus_disk(compose(["data=stdlib_code"]))[0] == ""


@pytest.mark.parametrize("free", [10**12, 10])
def test_the_study_total_counts_only_jobs_not_done(tmp_path, monkeypatch, free):
    plan = expand(load_study(find_study("demo_tiny")), [f"paths.runs_dir={tmp_path}"])
    refresh_states(plan)
    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(*real(p)[:2], free))
    bill = disk.disk_bill(plan)
    total = sum(r.peak for r in bill["rows"])
    assert sum(f["need"] for f in bill["fs"].values()) == total
    plan.jobs[0].state = "done"
    bill = disk.disk_bill(plan)
    assert sum(f["need"] for f in bill["fs"].values()) == total - bill["rows"][0].peak
