"""Data-parallel training on the CPU (DDP over gloo, 2 processes via torchrun): the loss curve
matches a single process with the same global batch. Tolerance: 1e-5 relative per step (the
two differ only in the order of floating-point reductions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

COMMON = [*FAST, "method=full", "train.checkpoints.at=[2,4]", "train.num_threads=1",
          "data.max_docs=8", "data.heldout_docs=2", "train.lr=1e-3"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_two_process_ddp_matches_single_process(tmp_path, cache_dir):
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(tmp_path / "runs"),
           "LEARNFORGET_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "learnforget.cli", "train", *COMMON, "train.batch_size=4",
         "experiment_name=single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "learnforget.cli", "train",
         *COMMON, "train.batch_size=2", "experiment_name=ddp"],
        env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_1 = next((tmp_path / "runs/single").iterdir())
    run_2 = next((tmp_path / "runs/ddp").iterdir())
    info = json.loads((run_2 / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["ranks"] == 2
    a, b = _losses(run_1), _losses(run_2)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    assert a[-1] != a[0]  # the model trained
    tokens = [json.loads(x).get("tokens") for x in (run_2 / "train/metrics.jsonl").read_text()
              .splitlines()]
    assert tokens[-1] == 4 * 4 * 32  # 4 steps x global batch 4 x seq 32
