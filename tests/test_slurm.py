"""A real SLURM cluster on this machine: a 4-run sweep through Hydra's submitit launcher, one run
preempted mid-training the way a shared cluster does it, requeued, and resumed from its state.

    .venv/bin/python -m pytest -m slow tests/test_slurm.py

Needs root and either SLURM + munge installed or apt-get (scripts/slurm/start.sh installs
Debian's slurm-wlm and munge, ~15 s). The whole test takes ~2-4 minutes on 2 cores. Also
here: a sweep to a partition that does not exist fails with one error line before anything is
submitted (~5-15 s), and a full-finetuning run sharded with FSDP over 2 SLURM tasks (~30-50 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "scripts" / "slurm"
LAST_STEP = 600          # long enough (~20-40 s of training per run) to preempt mid-run
FIRST_CKPT = 2
SWEEP_TIMEOUT_S = 420    # the sweep itself; start-up (with install) comes on top


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM test needs Linux"
    if os.geteuid() != 0:
        return "SLURM test needs root (it starts munged, slurmctld and slurmd)"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM test needs slurm-wlm + munge installed, or apt-get to install them"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        p = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def logs(self, lines: int = 40) -> str:
        out = []
        for name in ("log/slurmctld.log", "log/slurmd.log", "log/jobcomp.log"):
            f = self.state / name
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)


def _cluster_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    env["LEARNFORGET_SLURM_STATE"] = str(state)
    env["PATH"] = f"{SLURM_DIR / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    env["WANDB_MODE"] = "disabled"
    return env


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node cluster from scripts/slurm/start.sh, always stopped (and removed) afterwards.
    With LEARNFORGET_SLURM_STATE set (`eval "$(scripts/slurm/start.sh)"` done beforehand) that
    cluster is used and left running."""
    given = os.environ.get("LEARNFORGET_SLURM_STATE")
    if given:
        state = Path(given)
        assert (state / "etc" / "slurm.conf").exists(), f"{state} is not a start.sh state folder"
        yield Cluster(state, _cluster_env(state))
        return
    state = Path(tempfile.mkdtemp(prefix="learnforget-slurm-", dir="/tmp"))
    try:
        t0 = time.monotonic()
        p = subprocess.run(["bash", str(SLURM_DIR / "start.sh"), str(state)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            pytest.fail(f"scripts/slurm/start.sh failed ({p.returncode}):\n{p.stderr}")
        print(f"start.sh took {time.monotonic() - t0:.1f}s: {p.stderr.strip()}")
        yield Cluster(state, _cluster_env(state))
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh"), str(state), "--rm"],
                       capture_output=True, text=True, timeout=180)


def test_cluster_runs_a_job_and_the_sacct_stand_in_reports_it(slurm_cluster, tmp_path):
    c = slurm_cluster
    out = c.run("sbatch", "--parsable", "-c", "1", "--mem=100M", "-o", str(tmp_path / "%j.out"),
                "--wrap", "echo hello from $SLURM_JOB_ID")
    job = out.strip().split(";")[0]
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        lines = c.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job).splitlines()
        assert lines[0] == "JobID|State|NodeList"
        state = lines[1].split("|")[1] if len(lines) > 1 else ""
        if state == "COMPLETED":
            break
        time.sleep(0.5)
    assert state == "COMPLETED", c.logs()
    assert (tmp_path / f"{job}.out").read_text().strip() == f"hello from {job}"


def _runs(runs_root: Path) -> dict[str, Path]:
    root = runs_root / "default"
    return {p.name: p for p in sorted(root.glob("tiny_llama-*"))} if root.exists() else {}


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _running_debug_jobs(c: Cluster) -> list[str]:
    out = c.run("squeue", "-h", "-p", "debug", "-t", "RUNNING", "-o", "%i", check=False)
    return [x for x in out.split() if x]


def test_sweep_on_slurm_survives_preemption(slurm_cluster, tmp_path):
    """4 LoRA runs as a SLURM job array; one is preempted by a job in the higher-priority
    partition after its first checkpoint: it gets USR2, saves its resume state, submitit
    requeues it, and the requeued job resumes from the saved step; every run ends finished."""
    c = slurm_cluster
    runs_root, cache, sweep = tmp_path / "runs", tmp_path / "cache", tmp_path / "sweep"
    env = dict(c.env, LEARNFORGET_RUNS_DIR=str(runs_root), LEARNFORGET_CACHE_DIR=str(cache))
    exe = Path(sys.executable).with_name("learnforget")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "learnforget.cli"]
    cmd += ["train", "-m", "hydra/launcher=local_slurm", "method=lora", "method.r=2,4,8,16",
            "debug=fast", "train.seq_len=64", "data.max_docs=40", "data.heldout_docs=4",
            "train.checkpoints.unit=steps",
            f"train.checkpoints.at=[{FIRST_CKPT},{LAST_STEP}]", "train.heldout_batches=1",
            f"hydra.sweep.dir={sweep}"]
    log = (tmp_path / "sweep.log").open("w")
    t0 = time.monotonic()
    sweep_proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        # -- wait until every running job's run has its first checkpoint, then preempt one job
        #    by submitting a 1-CPU job to the 'urgent' partition (PreemptMode=REQUEUE)
        preempted_at = None
        while time.monotonic() - t0 < SWEEP_TIMEOUT_S and sweep_proc.poll() is None:
            running = _running_debug_jobs(c)
            training = [r for r in _runs(runs_root).values() if _status(r) == "running"
                        and (r / "checkpoints" / f"step-{FIRST_CKPT:06d}").exists()]
            if running and len(training) >= len(running):
                c.run("sbatch", "-p", "urgent", "-c", "1", "--mem=100M", "-J", "urgent",
                      "-o", "/dev/null", "--wrap", "sleep 2")
                preempted_at = time.monotonic() - t0
                break
            time.sleep(0.2)
        assert preempted_at is not None, (
            f"never found a running job past its first checkpoint\n{_tail(tmp_path / 'sweep.log')}"
            f"\n{c.logs()}")
        rc = sweep_proc.wait(timeout=max(10, SWEEP_TIMEOUT_S - (time.monotonic() - t0)))
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
            sweep_proc.wait()
        log.close()
    elapsed = time.monotonic() - t0
    sweep_log = _tail(tmp_path / "sweep.log")
    job_logs = "\n".join(p.read_text(errors="replace")
                         for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert rc == 0, f"sweep failed ({rc}) after {elapsed:.0f}s\n{sweep_log}\n{c.logs()}"

    # -- all four runs are complete
    runs = _runs(runs_root)
    assert len(runs) == 4, f"{sorted(runs)}\n{sweep_log}"
    resumed = {}
    for name, run in runs.items():
        info = json.loads((run / "run.json").read_text())
        notes = info["train"]["notes"]
        assert info["status"] == "finished", (
            f"{name}: status {info['status']!r}, notes {notes}. A preempted run must not end "
            "'interrupted': train() has to hand the stop signal on to submitit's handler (which "
            f"checkpoints and requeues the job).\n{job_logs[-4000:]}")
        assert info["train"]["steps_done"] == LAST_STEP
        for step in (FIRST_CKPT, LAST_STEP):
            ckpt = run / "checkpoints" / f"step-{step:06d}"
            assert (ckpt / "manifest.json").exists() and (ckpt / "adapter_model.safetensors").exists()
        rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if "loss" in r]
        assert steps == list(range(1, LAST_STEP + 1)), f"{name}: one metrics row per step"
        resumed_from = [int(n.split()[-1]) for n in notes if n.startswith("resumed from step ")]
        if resumed_from:
            resumed[name] = resumed_from
    # -- the preempted run was requeued by SLURM and resumed from its saved state, not from 0
    assert len(resumed) == 1, f"expected exactly one resumed run, got {resumed}\n{job_logs[-4000:]}"
    (name, steps_from), = resumed.items()
    assert len(steps_from) == 1 and FIRST_CKPT <= steps_from[0] < LAST_STEP, steps_from
    assert "this job is preempted" in job_logs and "Requeued job" in job_logs, job_logs[-4000:]
    assert f"resuming {name} from step {steps_from[0]}" in job_logs
    # -- every job of the array ended COMPLETED (the sacct stand-in, as submitit saw it)
    #    (a job's result file can appear a moment before SLURM marks the job COMPLETED)
    array_id = next(m.group(1) for p in (sweep / ".submitit").iterdir()
                    if (m := re.fullmatch(r"(\d+)_\d+", p.name)))
    expected = [f"{array_id}_{i}|COMPLETED" for i in range(4)]
    deadline = time.monotonic() + 60
    while True:
        acct = sorted(c.run("sacct", "-o", "JobID,State", "--parsable2", "-j",
                            array_id).splitlines()[1:])
        if acct == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert acct == expected, f"{acct}\n{c.logs()}"
    print(f"sweep with one preemption: {elapsed:.0f}s (preempted at {preempted_at:.0f}s, "
          f"{name} resumed from step {steps_from[0]})")


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _learnforget(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("learnforget")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "learnforget.cli", *args]


def test_sweep_to_a_partition_that_does_not_exist_fails_before_any_job(slurm_cluster, tmp_path):
    """The real sbatch refuses the profile's partition: one error line quoting it (from the
    `sbatch --test-only` pre-flight check), nothing submitted, no run folder."""
    c = slurm_cluster
    profile = tmp_path / "cluster.yaml"
    profile.write_text("partition: nope\ntimeout_min: 60\nmax_num_timeout: 3\ncpus_per_task: 1\n"
                       "mem_gb: 1\ngpus_per_node: null\n")
    runs = tmp_path / "runs"
    before = c.run("squeue", "-h", "-o", "%i").split()
    t0 = time.monotonic()
    p = subprocess.run(_learnforget("sweep", "demo_tiny", "--launcher", "submitit_slurm",
                                    "--cluster", str(profile), f"paths.runs_dir={runs}"),
                       env=c.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("learnforget: error:")]
    assert len(errors) == 1 and "nope" in errors[0] and "invalid partition" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not runs.exists()
    assert c.run("squeue", "-h", "-o", "%i").split() == before
    print(f"refused in {time.monotonic() - t0:.1f}s: {errors[0]}")


def test_fsdp_run_over_two_slurm_tasks(slurm_cluster, tmp_path):
    """tasks_per_node=2: submitit starts two tasks (srun), their SLURM_* variables become torch
    ranks, and the full finetuning run is sharded (FSDP2 over gloo) across them."""
    c = slurm_cluster
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    env = dict(c.env, LEARNFORGET_RUNS_DIR=str(runs), LEARNFORGET_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run(_learnforget("train", "-m", "hydra/launcher=local_slurm",
                                    "hydra.launcher.tasks_per_node=2", "method=full",
                                    "train.distributed.strategy=fsdp", "debug=fast",
                                    "train.seq_len=64", "train.checkpoints.at=[2,4]",
                                    "train.heldout_batches=2", "data.max_docs=40",
                                    "data.heldout_docs=4",
                                    f"hydra.sweep.dir={sweep}"),
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    logs = "\n".join(f.read_text(errors="replace")[-2000:]
                     for f in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}\n{logs}\n{c.logs()}"
    (run,) = _runs(runs).values()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished", logs
    assert info["train"]["ranks"] == 2 and info["train"]["distributed"] == "fsdp"
    assert (run / "checkpoints" / "step-000004" / "model.safetensors").exists()
    assert len(list(sweep.glob(".submitit/*/*_1_log.out"))) == 1  # the second task ran


TOY_STUDY = """\
description: toy study for the SLURM dependency test
launcher: submitit_slurm
stages: [train, eval, spectra]
holds:
  - debug=fast
  - model=tiny_llama
  - data=stdlib_code
  - data.format=shards
  - data.shard_tokens=20000
  - data.max_docs=40
  - data.heldout_docs=8
  - eval=smoke
  - eval.tasks=[]
  - train.seq_len=64
  - train.checkpoints.unit=steps
  - train.checkpoints.at=[2,4]
  - train.heldout_batches=1
sweep:
  method: [lora]
  method.r: [2, 4]
"""

# the CPU stand-in of a multi-GPU profile: 2 tasks (ranks) per training job, no GPU keys
STAND_IN_PROFILE = """\
timeout_min: 60
max_num_timeout: 3
tasks_per_node: 2
cpus_per_task: 1
mem_gb: 2
gpus_per_node: null
eval: {mem_gb: 1}
prepare: {mem_gb: 1}
"""


def _slurm_times(c: Cluster, job: str) -> dict[str, tuple[float, float, str]]:
    """SLURM's own record of a job or array: task id -> (start, end, state), from `scontrol show
    job -o` (the controller keeps finished jobs for MinJobAge=3600 s on this cluster)."""
    out = {}
    for line in c.run("scontrol", "show", "job", "-o", job).splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        task = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId") else f["JobId"]
        stamp = [time.mktime(time.strptime(f[k], "%Y-%m-%dT%H:%M:%S"))
                 for k in ("StartTime", "EndTime")]
        out[task] = (stamp[0], stamp[1], f["JobState"])
    return out


def _slurm_times_final(c: Cluster, job: str, wait_s: float = 90.0) -> dict[str, tuple[float, float, str]]:
    """`_slurm_times` once no task is still RUNNING or COMPLETING. submitit returns as soon as a
    task has written its result, which can be a moment before slurmd reports the task ended (CI
    once saw an eval task RUNNING right after the sweep returned)."""
    deadline = time.monotonic() + wait_s
    while True:
        times = _slurm_times(c, job)
        if all(state not in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING")
               for _s, _e, state in times.values()) or time.monotonic() > deadline:
            return times
        time.sleep(0.5)


def test_preparation_runs_first_and_eval_jobs_after_their_training(slurm_cluster, tmp_path):
    """`learnforget sweep` on SLURM: a CPU preparation job (tiny model + token shards), the
    training array (2 ranks per job, the CPU stand-in of a GPU profile) with afterok on it, and
    a 1-task eval/spectra array with aftercorr on the training array. SLURM's own start and end
    times show that no training task started before the preparation ended, and every eval task
    started after its own training task ended."""
    c = slurm_cluster
    study, profile = tmp_path / "toy_prep.yaml", tmp_path / "stand_in.yaml"
    study.write_text(TOY_STUDY)
    profile.write_text(STAND_IN_PROFILE)
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    env = dict(c.env, LEARNFORGET_RUNS_DIR=str(runs), LEARNFORGET_CACHE_DIR=str(cache))
    log = (tmp_path / "sweep.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(_learnforget("sweep", str(study), "--cluster", str(profile),
                                         "--no-analyze", f"hydra.sweep.dir={tmp_path / 'sw'}"),
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    pending_on_dependency: set[str] = set()
    try:  # while it runs: squeue's view of the training tasks waiting on their dependency
        while proc.poll() is None and time.monotonic() - t0 < 300:
            for line in c.run("squeue", "-h", "-o", "%i|%T|%r|%j", check=False).splitlines():
                jid, state, reason, name = (line.split("|") + ["", "", "", ""])[:4]
                if state == "PENDING" and reason == "Dependency" and name == "lf-toy_prep":
                    pending_on_dependency.add(jid)
            time.sleep(0.3)
        rc = proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = _tail(tmp_path / "sweep.log", 80)
    elapsed = time.monotonic() - t0
    jobs = "\n".join(p.read_text(errors="replace")[-1500:]
                     for p in sorted((tmp_path / "sw").glob(".submitit/*/*_log.*")))
    assert rc == 0, f"sweep failed ({rc}) after {elapsed:.0f}s\n{out}\n{jobs}\n{c.logs()}"
    prep = re.search(r"CPU job (\d+);", out).group(1)
    train, evals, corresponds = re.search(
        r"training array (\d+) \(2 task\(s\).*eval/spectra array (\d+) \(2 task\(s\), 1 task "
        r"each, aftercorr:(\d+)\)", out).group(1, 2, 3)
    assert corresponds == train, out
    # the scripts submitit gave sbatch carry the dependencies
    scripts = {p.parent.name: p.read_text() for p in (tmp_path / "sw").glob(".submitit/*/*_submission.sh")}
    assert any(f"--dependency=afterok:{prep}" in s and "--ntasks-per-node=2" in s
               for s in scripts.values()), scripts.keys()
    assert any(f"--dependency=aftercorr:{train}" in s and "--ntasks-per-node=1" in s
               for s in scripts.values()), scripts.keys()
    # SLURM's own records
    p_start, p_end, p_state = _slurm_times_final(c, prep)[prep]
    t_times, e_times = _slurm_times_final(c, train), _slurm_times_final(c, evals)
    assert p_state == "COMPLETED" and len(t_times) == 2 and len(e_times) == 2, (t_times, e_times)
    for task, (start, _end, state) in t_times.items():
        assert state == "COMPLETED" and start >= p_end, (task, start, p_end)
    for i in range(2):
        t_end = t_times[f"{train}_{i}"][1]
        e_start, _, e_state = e_times[f"{evals}_{i}"]
        assert e_state == "COMPLETED" and e_start >= t_end, (i, e_start, t_end)
    assert pending_on_dependency, "squeue never showed a training task pending on Dependency"
    # what the jobs did: training tasks trained only; eval tasks scored and took spectra
    folders = [r for r in sorted((runs / "toy_prep").iterdir()) if not r.name.startswith("_")]
    assert len(folders) == 2, folders
    for run in folders:
        rec = json.loads((run / "job.json").read_text())
        assert rec["requested"] == ["eval", "spectra"], rec
        assert rec["stages"] == {"eval": "done", "spectra": "done"}, rec
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
    print(f"toy study on SLURM in {elapsed:.0f}s: preparation {prep} ended at {p_end:.0f}, "
          f"training tasks started at {sorted(s for s, _, _ in t_times.values())}, eval tasks "
          f"started at {sorted(s for s, _, _ in e_times.values())}")
