"""A dead rank under a real SLURM cluster (scripts/slurm/start.sh, one node): a job of 2 srun
tasks (2 gloo ranks, their SLURM_* variables become torch's), one task SIGKILLed while rank 0
works alone in a checkpoint. srun runs with --kill-on-bad-exit=0 (SLURM's default, and what
submitit's jobs get), so nothing but the dead-rank watchdog ends the other task: the job must
end within train.distributed.dead_rank_s plus slack, its log naming the dead rank, and the job
submitted again resumes the run from its last resume state and finishes.

    .venv/bin/python -m pytest -m slurm tests/test_dead_rank_slurm.py    (~1-2 min, root)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_slurm import _skip_reason, slurm_cluster  # noqa: F401 (the cluster fixture)

from learnforget.runfolder import RunFolder

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "rank_worker.py"
DEAD_RANK_S = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def _job_script(tmp_path: Path, name: str) -> Path:
    args = ["train", "method=full", "debug=fast", "train.checkpoints.at=[2,4]",
            "train.num_threads=1", "data.max_docs=8", "data.heldout_docs=2",
            "train.heldout_batches=0", "train.precision=fp32", "train.resume_every_min=0.0001",
            f"train.distributed.dead_rank_s={DEAD_RANK_S}", "experiment_name=dead"]
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/bash\n"
                      f"srun --kill-on-bad-exit=0 {sys.executable} {WORKER} {' '.join(args)}\n")
    return script


def _submit(tmp_path: Path, name: str, env: dict[str, str]) -> str:
    """sbatch a 2-task job; its tasks inherit `env` (sbatch's default --export=ALL)."""
    p = subprocess.run(["sbatch", "--parsable", "-n", "2", "-c", "1", "--mem=1G", "-J", name,
                        "-o", str(tmp_path / f"{name}.out"), str(_job_script(tmp_path, name))],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _wait_gone(c, job: str, timeout: float) -> float:
    t0 = time.monotonic()
    while c.run("squeue", "-h", "-j", job, check=False).strip():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"job {job} still queued after {timeout}s\n{c.logs()}")
        time.sleep(0.2)
    return time.monotonic() - t0


def test_a_dead_rank_ends_the_slurm_job_and_the_next_job_resumes(slurm_cluster,  # noqa: F811
                                                                 tmp_path, cache_dir):
    c = slurm_cluster
    marks, runs = tmp_path / "marks", tmp_path / "runs"
    env = dict(c.env, LEARNFORGET_RUNS_DIR=str(runs), LEARNFORGET_CACHE_DIR=str(cache_dir),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
                   [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    job = _submit(tmp_path, "dead", dict(env, LF_TEST_SLOW_CKPT_S="120",
                                         LF_TEST_MARK_DIR=str(marks)))
    deadline = time.monotonic() + 240
    while not (marks / "slow").exists():
        assert time.monotonic() < deadline, (tmp_path / "dead.out").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(int((marks / "pid-1").read_text()), signal.SIGKILL)
    took = _wait_gone(c, job, timeout=90)
    log = (tmp_path / "dead.out").read_text(errors="replace")
    lines = [x for x in log.splitlines() if "is dead" in x]
    assert lines and all("rank 1 of 2 is dead" in x for x in lines), log[-3000:]
    assert took <= DEAD_RANK_S + 20, took  # not the 120 s checkpoint, not the PG timeout
    print(f"job {job} ended {took:.1f}s after rank 1 was killed (dead_rank_s={DEAD_RANK_S}): "
          f"{lines[0]}")
    run = next((runs / "dead").iterdir())
    assert RunFolder(run).read_record().status == "running"

    again = _submit(tmp_path, "again", env)
    _wait_gone(c, again, timeout=240)
    log = (tmp_path / "again.out").read_text(errors="replace")
    assert f"resuming {run.name} from step 1" in log, log[-3000:]
    info = RunFolder(run).read_record()
    assert info.status == "finished" and info.train.steps_done == 4 and info.train.ranks == 2
