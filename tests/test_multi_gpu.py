"""Two-GPU runs (NCCL, torchrun with 2 processes), the paths 3 of code_cpt's 4 jobs take:
FSDP2 full finetuning with the bf16 mixed-precision policy, activation checkpointing and LionW,
killed after step 3 and resumed; and LoRA over DDP. Marked gpu and skipped (with the reason)
unless 2 CUDA GPUs are visible. Modelled on tests/test_fsdp.py and tests/test_ddp.py (the same
runs over gloo on the CPU).

Tolerances: the killed-and-resumed FSDP run against an uninterrupted one of the same shape,
1e-4 relative per step (the same kernels and reduction order on the same GPUs; resume is exact
on the CPU); 2 ranks against one process with the same global batch, 2e-2 relative under bf16
(a batch of 4 and two of 2 round differently) and 1e-4 in fp32 (LoRA)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import MULTI_RANK, TORCHRUN, free_port, metrics_rows, multi_rank_env, step_losses
from crash_hook import crash_after

from learnforget.runfolder import RunFolder

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (found {GPUS})"),
              pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")]

FSDP_BF16 = ["method=full", "train.precision=bf16", "train.optimizer=lionw",
             "train.betas=[0.9,0.95]", "train.weight_decay=1e-6", "train.lr=1e-4",
             "train.activation_checkpointing=true", "train.distributed.strategy=fsdp"]
LORA_DDP = ["method=lora", "method.r=8", "train.precision=fp32", "train.lr=1e-3"]


def _overrides(*extra: str) -> list[str]:
    """MULTI_RANK with `extra` replacing its keys (Hydra refuses a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in MULTI_RANK if o.split("=", 1)[0] not in keys] + list(extra)


def _train(env: dict[str, str], overrides: list[str], experiment: str, ranks: int, port: int,
           crash_at: int | None = None) -> subprocess.CompletedProcess:
    cmd = ([str(TORCHRUN), f"--nproc_per_node={ranks}", f"--master_port={port}"] if ranks > 1
           else [str(Path(TORCHRUN).parent / "python")])
    batch = 4 // ranks  # the same global batch
    env, hook = crash_after(crash_at, env)
    if ranks == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return subprocess.run([*cmd, "-m", "learnforget.cli", "train", *overrides,
                           f"train.batch_size={batch}", f"experiment_name={experiment}", *hook],
                          env=env, capture_output=True, text=True, timeout=600)


def _run(tmp_path: Path, experiment: str) -> Path:
    return next((tmp_path / "runs" / experiment).iterdir())


def test_fsdp_bf16_checkpointing_lionw_killed_and_resumed_on_two_gpus(tmp_path, cache_dir):
    env = multi_rank_env(tmp_path, cache_dir)
    args = _overrides(*FSDP_BF16)
    assert _train(env, args, "single", 1, 0).returncode == 0
    whole = _train(env, args, "whole", 2, free_port())
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _train(env, args, "killed", 2, free_port(), crash_at=3)
    assert killed.returncode != 0  # both ranks died after step 3
    run = _run(tmp_path, "killed")
    assert RunFolder(run).read_record().status == "running"
    resumed = _train(env, args, "killed", 2, free_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in resumed.stdout, resumed.stdout[-2000:]

    info = RunFolder(run).read_record()
    assert info.status == "finished" and info.train.ranks == 2
    assert info.train.distributed == "fsdp" and info.train.activation_checkpointing is True
    assert info.train.device.startswith("cuda")
    assert info.train.precision_policy["compute"] == "bf16"
    assert info.train.precision_policy["master"] == "float32"
    assert [r["step"] for r in metrics_rows(run) if "loss" in r] == [1, 2, 3, 4]
    single, straight, again = (step_losses(_run(tmp_path, e)) for e in
                               ("single", "whole", "killed"))
    for x, y in zip(straight, again, strict=True):
        assert abs(x - y) <= 1e-4 * abs(x), (straight, again)
    for x, y in zip(single, straight, strict=True):
        assert abs(x - y) <= 2e-2 * abs(x), (single, straight)
    assert straight[-1] != straight[0]
    ckpt = run / "checkpoints" / "step-000004" / "model.safetensors"
    assert ckpt.exists()


def test_lora_over_ddp_on_two_gpus_matches_one(tmp_path, cache_dir):
    env = multi_rank_env(tmp_path, cache_dir)
    args = _overrides(*LORA_DDP)
    one = _train(env, args, "single", 1, 0)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(env, args, "ddp", 2, free_port())
    assert two.returncode == 0, two.stderr[-3000:]
    run = _run(tmp_path, "ddp")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["ranks"] == 2
    assert info["train"]["distributed"] == "ddp" and info["train"]["device"].startswith("cuda")
    a, b = step_losses(_run(tmp_path, "single")), step_losses(run)
    assert len(a) == len(b) == 4 and a[-1] != a[0]
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    adapter = run / "checkpoints" / "step-000004"
    assert (adapter / "adapter_model.safetensors").exists(), os.listdir(adapter)
