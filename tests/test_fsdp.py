"""Sharded data-parallel training (FSDP2 `fully_shard` per decoder layer) on the CPU: gloo, 2
processes via torchrun, `train.distributed.strategy=fsdp`, full finetuning.

The 2-rank run is killed after step 3 (its last resume state is from the checkpoint at step 2:
a sharded torch.distributed.checkpoint folder beside train/resume.pt) and rerun; it resumes
and must match one process with the same global batch. Tolerances: loss per step 1e-5
relative (the runs differ only in the order of floating-point reductions; measured ~1e-7);
the final checkpoint (gathered on rank 0 into model.safetensors) loads with transformers and
its logits equal the single-process checkpoint's to 1e-4 absolute (measured 3e-5 on logits of
size ~0.75: Adam's normalised updates carry the reduction-order noise into the weights)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    MULTI_RANK,
    TORCHRUN,
    free_port,
    metrics_rows,
    multi_rank_env,
    step_losses,
    train_single_process,
)
from crash_hook import crash_after

from learnforget.config import compose, config_hash, validate
from learnforget.errors import ConfigError
from learnforget.runfolder import RunFolder
from learnforget.train import distributed


def _logits(ckpt: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_process_fsdp_matches_single_process_and_resumes(tmp_path, cache_dir):
    env = multi_rank_env(tmp_path, cache_dir)
    train_single_process(env)
    fsdp = [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "learnforget.cli",
            "train", *MULTI_RANK, "train.batch_size=2", "experiment_name=fsdp",
            "train.distributed.strategy=fsdp"]
    crash_env, crash = crash_after(3, env)
    killed = subprocess.run([*fsdp, *crash], env=crash_env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode != 0  # both ranks died after step 3, like a killed job
    run_1 = next((tmp_path / "runs/single").iterdir())
    run_2 = next((tmp_path / "runs/fsdp").iterdir())
    assert RunFolder(run_2).read_record().status == "running"
    shards = [p.name for p in (run_2 / "train").iterdir() if "resume-shards" in p.name]
    assert len(shards) == 1 and (run_2 / "train" / shards[0] / ".metadata").exists(), shards
    assert torch.load(run_2 / "train/resume.pt", weights_only=False)["sharded"] == shards[0]

    resumed = subprocess.run(fsdp, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "from step 2" in resumed.stdout, resumed.stdout
    info = RunFolder(run_2).read_record()
    assert info.status == "finished" and info.train.ranks == 2
    assert info.train.distributed == "fsdp"
    assert "resumed from step 2" in info.train.notes

    a, b = step_losses(run_1), step_losses(run_2)
    steps = [r["step"] for r in metrics_rows(run_2) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the killed step 3 was logged again after the resume, once
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    assert a[-1] != a[0]  # the model trained
    assert [r["tokens"] for r in metrics_rows(run_2) if "loss" in r][-1] == 4 * 4 * 32

    for label in ("step-000002", "step-000004"):
        ckpt = run_2 / "checkpoints" / label
        assert (ckpt / "model.safetensors").exists()
        assert json.loads((ckpt / "config.json").read_text())["architectures"] == [
            "LlamaForCausalLM"]
    la = _logits(run_1 / "checkpoints/step-000004")
    lb = _logits(run_2 / "checkpoints/step-000004")
    assert (la - lb).abs().max().item() <= 1e-4, (la - lb).abs().max().item()
    assert (la - _logits(run_2 / "checkpoints/step-000002")).abs().max().item() > 1e-3


def test_strategy_is_checked_and_not_part_of_the_run_identity():
    base = ["model=tiny_llama", "method=full"]
    cfg = compose([*base, "train.distributed.strategy=fsdp"])
    validate(cfg)
    assert config_hash(cfg) == config_hash(compose(base))  # same run, however it is sharded
    with pytest.raises(ConfigError, match="train.distributed.strategy 'zero3'"):
        validate(compose([*base, "train.distributed.strategy=zero3"]))


def test_fsdp_applies_to_full_weight_methods_only():
    from learnforget.train.loop import parallel_strategy

    two = distributed.Dist(rank=0, world=2)
    notes: list[str] = []
    for method in ("full", "bitfit", "topk"):
        cfg = compose([f"method={method}", "train.distributed.strategy=fsdp"])
        assert parallel_strategy(cfg, two, notes) == "fsdp"
    assert parallel_strategy(compose(["method=full", "train.distributed.strategy=fsdp"]),
                             distributed.Dist(), notes) is None  # one process: nothing to shard
    assert notes == []
    lora = compose(["method=lora", "train.distributed.strategy=fsdp"])
    assert parallel_strategy(lora, two, notes) == "ddp"
    assert notes and "method=lora trains with ddp" in notes[0]
    bnb = compose(["method=full", "train.distributed.strategy=fsdp", "train.optimizer=adamw8bit"])
    with pytest.raises(ConfigError, match="adamw8bit"):
        parallel_strategy(bnb, two, [])


def test_slurm_tasks_become_torch_ranks():
    """srun with several tasks (or submitit with tasks_per_node > 1) sets SLURM_* only."""
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    assert distributed.env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 123456 % 40000)
    assert not distributed.env_from_slurm({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"}
    assert not distributed.env_from_slurm(torchrun) and torchrun["RANK"] == "1"
