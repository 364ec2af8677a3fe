"""A SLURM submission that is refused fails with one clear error before any job starts, with no
cluster: fake `sbatch` and `srun` scripts first on PATH play the refusing cluster.

1. The pre-flight check (`sbatch --test-only` on the script submitit would submit) is refused:
   the error quotes sbatch (it names the partition), nothing is submitted, nothing is written.
2. The pre-flight check passes but the real submission is refused (e.g. a submit limit):
   submitit's error is caught and re-raised as the same kind of one-line error; no run folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from learnforget.cli import main
from learnforget.errors import ConfigError
from learnforget.studies.command import sweep_main

FAKE_SBATCH = """#!/bin/bash
# a fake sbatch: records each call (arguments, then the script it read) and answers like SLURM
log={log}
echo "ARGS $*" >> "$log"
if [ "$1" = "--test-only" ]; then
  cat >> "$log"
  if grep -q -- '--partition=nope' "$log"; then
    echo "sbatch: error: invalid partition specified: nope" >&2
    echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
    exit 1
  fi
  echo "sbatch: Job 7 to start at 2030-01-01T00:00:00 using 1 processors on nodes n1 in partition gpu" >&2
  exit 0
fi
cat "$2" >> "$log"
echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2
echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)" >&2
exit 1
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """bin/sbatch and bin/srun first on PATH; returns the sbatch call log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    _executable(bin_dir / "sbatch", FAKE_SBATCH.format(log=log))
    _executable(bin_dir / "srun", "#!/bin/bash\necho 'srun: never called here' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LEARNFORGET_CLUSTER", raising=False)
    return log


def _profile(tmp_path: Path, partition: str) -> Path:
    p = tmp_path / f"cluster-{partition}.yaml"
    p.write_text(f"partition: {partition}\naccount: lab\ntimeout_min: 600\nmem_gb: 32\n"
                 "gpus_per_node: 1\ncpus_per_task: 4\n")
    return p


def test_refused_partition_is_one_error_before_anything_is_written(tmp_path, fake_slurm, capsys):
    runs = tmp_path / "runs"
    rc = main(["sweep", "demo_tiny", "--launcher", "submitit_slurm", "--cluster",
               str(_profile(tmp_path, "nope")), f"paths.runs_dir={runs}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("learnforget: error: SLURM refuses"), err
    assert "invalid partition specified: nope" in err[0] and "partition=nope" in err[0]
    assert not runs.exists()  # no run folder, no sweep folder
    calls = [line for line in fake_slurm.read_text().splitlines() if line.startswith("ARGS")]
    assert calls == ["ARGS --test-only"]  # checked once, never submitted
    script = fake_slurm.read_text()
    # the script submitit would submit: the profile's settings and the job array
    for flag in ("--partition=nope", "--account=lab", "--time=600", "--mem=32GB",
                 "--gpus-per-node=1", "--cpus-per-task=4"):
        assert f"#SBATCH {flag}" in script, flag
    assert "#SBATCH --array=0-" in script  # all of the study's jobs as one array


def test_refused_submission_after_the_check_is_one_error_and_no_run_starts(tmp_path, fake_slurm,
                                                                          capsys):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="QOSMaxSubmitJobPerUserLimit") as e:
        sweep_main("demo_tiny", [f"paths.runs_dir={runs}"], launcher="submitit_slurm",
                   cluster=str(_profile(tmp_path, "gpu")))
    assert "SLURM refused the submission of study demo_tiny" in str(e.value)
    assert "\n" not in str(e.value)
    out = capsys.readouterr().out
    assert "sbatch --test-only accepts the job array: sbatch: Job 7 to start" in out
    calls = [line for line in fake_slurm.read_text().splitlines() if line.startswith("ARGS")]
    # the checks (training array, the CPU preparation job, the 1-GPU eval array), then the
    # first submission: the preparation job (the tiny model and the data are not prepared)
    assert calls[:3] == ["ARGS --test-only"] * 3 and len(calls) == 4, calls
    train, prepare, evals = fake_slurm.read_text().split("ARGS --test-only")[1:4]
    assert "#SBATCH --gpus-per-node=1" in train and "#SBATCH --array=0-5" in train
    assert "--gpus-per-node" not in prepare and "--array" not in prepare  # one CPU job
    assert "#SBATCH --gpus-per-node=1" in evals and "#SBATCH --ntasks-per-node=1" in evals
    assert not (runs / "demo_tiny").exists()  # no run folder (only Hydra's sweep logs)


def test_no_sbatch_on_path_is_one_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    rc = main(["sweep", "demo_tiny", "--launcher", "submitit_slurm", "--cluster",
               str(_profile(tmp_path, "gpu")), f"paths.runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sbatch, which is not on PATH" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_the_7b_fsdp_profile_asks_for_one_task_per_gpu(tmp_path, fake_slurm, capsys):
    from learnforget.studies.cluster import (
        cluster_profile_path,
        load_cluster_profile,
        slurm_preflight,
    )

    path = cluster_profile_path("llama7b_full_fsdp")  # by name: clusters/<name>.yaml
    profile = load_cluster_profile(path)
    assert (profile["tasks_per_node"], profile["gpus_per_node"]) == (8, 8)
    assert "Job 7 to start" in slurm_preflight(profile, path, 1)
    script = fake_slurm.read_text()
    for flag in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8"):
        assert f"#SBATCH {flag}" in script, flag
    overrides = ["method=full", "train.distributed.strategy=fsdp", "train.grad_accum=24",
                 f"paths.runs_dir={tmp_path / 'runs'}"]
    assert sweep_main("code_cpt", overrides, launcher="submitit_slurm",
                      cluster="llama7b_full_fsdp", dry_run=True) == 0
    out = capsys.readouterr().out
    assert "would launch 1 job(s)" in out and "train.distributed.strategy=fsdp" in out
