"""Data-parallel training on the CPU (DDP over gloo, 2 processes via torchrun): the loss curve
matches a single process with the same global batch. Tolerance: 1e-5 relative per step (the
two differ only in the order of floating-point reductions)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import (
    MULTI_RANK,
    TORCHRUN,
    free_port,
    multi_rank_env,
    step_losses,
    train_single_process,
)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_process_ddp_matches_single_process(tmp_path, cache_dir):
    env = multi_rank_env(tmp_path, cache_dir)
    train_single_process(env)
    ddp = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "learnforget.cli",
         "train", *MULTI_RANK, "train.batch_size=2", "experiment_name=ddp"],
        env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_1 = next((tmp_path / "runs/single").iterdir())
    run_2 = next((tmp_path / "runs/ddp").iterdir())
    info = json.loads((run_2 / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["ranks"] == 2
    a, b = step_losses(run_1), step_losses(run_2)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    assert a[-1] != a[0]  # the model trained
    tokens = [json.loads(x).get("tokens") for x in (run_2 / "train/metrics.jsonl").read_text()
              .splitlines()]
    assert tokens[-1] == 4 * 4 * 32  # 4 steps x global batch 4 x seq 32
