"""The run-folder contract: docs/run-folder.md's layout block is the contract's own text, run.json
round-trips through its typed sections, and folders from the previous layout still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learnforget.errors import ConfigError
from learnforget.runfolder import (
    LAYOUT,
    SCHEMA_VERSION,
    MetaInfo,
    RunFolder,
    RunInfo,
    RunRecord,
    TrainInfo,
    base_dir,
    cpu_info,
    find_runs,
    meta_info,
    readme_section,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "run-folder.md"

# run.json as the train stage wrote it before schema_version (abridged from a real run)
V1 = {
    "status": "finished",
    "run": {"name": "tiny_llama-lora_r4_a8_all-stdlib_code-s0-abc123", "experiment": "default",
            "config_hash": "abc123def456", "model": "tiny_llama", "base_model": "/cache/base",
            "method": "lora", "method_summary": "lora_r4_a8_all",
            "method_settings": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "ignored_method_keys": [], "data": "stdlib_code", "regime": "cpt", "seed": 0},
    "config_hash": "abc123def456",
    "train": {"trainable_params": 100, "total_params": 1000, "trainable_pct": 10.0,
              "device": "cpu", "precision": "fp32",
              "precision_policy": {"compute": "fp32", "master": "fp32"},
              "activation_checkpointing": False, "ranks": 1, "distributed": None,
              "total_steps": 2, "checkpoint_steps": {"1": "step-000001", "2": "step-000002"},
              "data": {"name": "stdlib_code"}, "notes": ["resumed from step 1"],
              "steps_done": 2, "tokens_seen": 256, "data_position": 4, "wall_time_s": 1.5,
              "peak_mem_mb": 300.0, "checkpoints": ["step-000001", "step-000002"]},
    "meta": {"versions": {"torch": "2.5.0"}, "git": {"commit": None, "dirty": None},
             "python": "3.11", "platform": "linux", "host": "h", "cuda": False,
             "device_name": "x86_64", "torch_threads": 1, "slurm_job_id": None},
}


def test_docs_show_the_contract():
    assert readme_section() in DOC.read_text(), (
        "docs/run-folder.md's layout block differs from learnforget.runfolder.readme_section(): "
        "paste its output into docs/run-folder.md")


def test_every_layout_entry_resolves_inside_the_run_folder(tmp_path):
    folder = RunFolder(tmp_path / "runs" / "exp" / "run")
    paths = [folder.config, folder.record_path, folder.log, folder.job, folder.lock_path,
             folder.tokenizer, folder.metrics, folder.resume, folder.checkpoint("step-1"),
             folder.eval_result("step-1"), folder.eval_summary("smoke"), folder.eval_tasks,
             folder.spectra("step-1"), folder.intruders("step-1"), folder.branch("step-1").path,
             folder.wandb]
    assert len(paths) == len(LAYOUT)
    for p, (rel, _) in zip(paths, LAYOUT.values(), strict=True):
        assert p.is_relative_to(folder.path)
        assert str(p.relative_to(folder.path)) == rel.rstrip("/").replace("<label>", "step-1") \
            .replace("<suite>", "smoke")
    assert folder.runs_root == tmp_path / "runs"
    assert folder.base_root == base_dir(tmp_path / "runs", "m").parent


def test_a_record_round_trips_and_keeps_what_users_read(tmp_path):
    rec = RunRecord(status="running", run=RunInfo(name="r", config_hash="h" * 64, seed=1),
                    train=TrainInfo(precision_policy={"compute": "bf16"}, notes=["fell back"],
                                    tokens_seen=10),
                    meta=MetaInfo(versions={"torch": "2"}))
    folder = RunFolder(tmp_path / "e" / "r")
    folder.write_record(rec)
    raw = json.loads(folder.record_path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["config_hash"] == "h" * 64
    assert raw["train"]["precision_policy"] == {"compute": "bf16"}
    assert raw["train"]["notes"] == ["fell back"] and raw["train"]["tokens_seen"] == 10
    assert "quantisation" not in raw["train"] and "cooldown" not in raw  # absent when unused
    assert folder.read_record() == rec


def test_a_run_folder_from_the_previous_layout_reads(tmp_path):
    folder = RunFolder(tmp_path / "default" / V1["run"]["name"])
    folder.path.mkdir(parents=True)
    folder.record_path.write_text(json.dumps({**V1, "train": {**V1["train"], "custom": 1}}))
    rec = folder.read_record()
    assert rec.status == "finished" and rec.config_hash == "abc123def456"
    assert rec.run.method_settings["r"] == 4 and rec.train.notes == ["resumed from step 1"]
    assert rec.train.tokens_seen == 256 and rec.meta.versions["torch"] == "2.5.0"
    assert rec.train.extra == {"custom": 1}  # keys it does not know are kept, not dropped
    assert folder.finished("abc123def456") and not folder.finished("other")
    assert find_runs(tmp_path) == [folder.path]
    rewritten = rec.to_dict()
    assert {k: v for k, v in rewritten.items() if k != "schema_version"} == \
        {**V1, "train": {**V1["train"], "custom": 1}}


def test_a_newer_schema_is_a_one_line_error(tmp_path):
    folder = RunFolder(tmp_path / "e" / "r")
    folder.path.mkdir(parents=True)
    folder.record_path.write_text(json.dumps({**V1, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ConfigError, match=r"schema_version 3, newer than this learnforget "
                                          r"reads \(2\): update learnforget") as e:
        folder.read_record()
    assert "\n" not in str(e.value)


def test_a_folder_holding_another_run_is_refused(tmp_path):
    folder = RunFolder(tmp_path / "e" / "r")
    folder.path.mkdir(parents=True)
    folder.record_path.write_text(json.dumps(V1))
    folder.check_same_run("abc123def456")
    with pytest.raises(ConfigError, match="holds a different run"):
        folder.check_same_run("f" * 64)


# an abridged /proc/cpuinfo of this project's 2-core VM (two processors, the first wins)
CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu
"""


def test_cpu_info_names_the_model_and_its_bf16_instruction_sets():
    got = cpu_info(CPUINFO)
    assert got["model"] == "Intel(R) Xeon(R) Processor"
    assert got["bf16_flags"] == ["amx_bf16", "amx_tile", "avx512_bf16"]
    assert isinstance(got["torch_capability"], str) and got["torch_capability"]
    assert cpu_info("processor\t: 0\nflags\t: fpu sse2\n")["bf16_flags"] == []


def test_run_json_meta_records_the_cpu(tmp_path):
    meta = meta_info()
    assert meta.cpu is not None and set(meta.cpu) == {"model", "bf16_flags", "torch_capability"}
    folder = RunFolder(tmp_path / "e" / "r")
    folder.write_record(RunRecord(status="running", run=RunInfo(name="r", config_hash="h"),
                                  train=TrainInfo(), meta=meta))
    raw = json.loads(folder.record_path.read_text())["meta"]
    assert raw["cpu"] == meta.cpu and raw["device_name"] == meta.device_name
    assert "cpu" not in MetaInfo().to_dict()  # records without it stay as they were
