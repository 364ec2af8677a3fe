"""Run a plan's jobs that are not done, each `learnforget.studies.job.run_job` on its composed
config: `basic` one after another in this process, `submitit_local` side by side as local
processes (both after preparing every input of the jobs in this process), and `submitit_slurm`
as a CPU preparation job, a training array and a 1-GPU eval/spectra array chained by SLURM
dependencies (learnforget.studies.slurm_jobs), all through submitit's public AutoExecutor. A SLURM job that is preempted or times out is requeued (StudyJob is
Checkpointable) and resumes its run. Logs go to runs/_sweeps/<date>/<time>-<study>/.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
import yaml

from learnforget.errors import ConfigError
from learnforget.studies.cluster import (
    STAGE_PROFILES,
    cluster_profile_path,
    load_cluster_profile,
    slurm_preflight,
    stage_profile,
)
from learnforget.studies.job import run_job
from learnforget.studies.plan import Job, Plan, shown_path
from learnforget.studies.slurm_jobs import (
    Outcome,
    StudyJob,
    launch_slurm,
    submit_array,
    with_threads,
)
from learnforget.studies.values import split_override

LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local jobs are killed after timeout_min


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _launcher_settings(hydra_overrides: Sequence[str]) -> tuple[dict[str, Any], Path | None]:
    """`hydra.launcher.KEY=VALUE` (launcher settings) and `hydra.sweep.dir=DIR` (the logs) from
    the command line; any other hydra.* override is an error."""
    settings: dict[str, Any] = {}
    logs = None
    for text in hydra_overrides:
        key, value = split_override(text)
        if key.startswith("hydra.launcher."):
            settings[key.removeprefix("hydra.launcher.")] = yaml.safe_load(value)
        elif key == "hydra.sweep.dir":
            logs = Path(value.strip("'\"")).expanduser()
        else:
            raise ConfigError(f"{text!r}: a study takes hydra.launcher.KEY=VALUE (launcher "
                              "settings) and hydra.sweep.dir=DIR (its logs), nothing else of "
                              "Hydra's")
    return settings, logs


def _logs_folder(plan: Plan, given: Path | None) -> Path:
    if given is not None:
        return given
    runs_root = Path(plan.jobs[0].cfg.paths.runs_dir).resolve()
    base = runs_root / "_sweeps" / f"{time.strftime('%Y-%m-%d/%H-%M-%S')}-{plan.study.name}"
    path, n = base, 1
    while path.exists():  # two launches within a second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _run_here(todo: list[Job]) -> list[Outcome]:
    """The basic launcher: one job after another in this process; a failed job is reported
    and the next one runs (Ctrl-C and a stop signal end the sweep)."""
    outcomes = []
    for job in todo:
        try:
            run_job(copy.deepcopy(job.cfg))
            outcomes.append(Outcome(job))
        except Exception as e:
            outcomes.append(Outcome(job, e))
    return outcomes


def _prepare_here(todo: list[Job]) -> None:
    """Every distinct input of the jobs (model, token shards), prepared before the first job."""
    from learnforget.studies.prepare import prepare_configs

    for line in prepare_configs([j.cfg for j in todo]):
        print(f"learnforget: preparation: {line}")


def _submit(executor: Any, todo: list[Job], overrides: list[list[str]], what: str) -> list[Outcome]:
    """Submit the jobs as one array and wait for them; a refused sbatch is one error line."""
    handles = submit_array(executor, StudyJob(), overrides, what)
    outcomes = []
    for job, handle in zip(todo, handles, strict=True):
        try:
            handle.results()
            outcomes.append(Outcome(job))
        except Exception as e:  # submitit's FailedJobError / UncompletedJobError
            outcomes.append(Outcome(job, e, Path(handle.paths.stderr)))
    return outcomes


def launch(plan: Plan, launcher: str, cluster: str | None = None) -> list[Outcome]:
    """Run the jobs that are not done; one Outcome per launched job."""
    todo = plan.todo()
    if not todo:
        return []
    settings, given_logs = _launcher_settings(plan.hydra_overrides)
    what = f"study {plan.study.name} ({len(todo)} job(s) with {launcher})"
    from learnforget.data.check import check_configs

    for line in check_configs([j.cfg for j in todo]):  # bad local data: one line, nothing started
        print(f"learnforget: data check: {line}")
    if launcher == "submitit_slurm":  # checked before anything is written
        path = cluster_profile_path(cluster)
        profile = {**load_cluster_profile(path), **settings}
        print(f"learnforget: SLURM profile {path}: "
              + ", ".join(f"{k}={v}" for k, v in profile.items()))
        answer = slurm_preflight(profile, path, len(todo))
        print(f"learnforget: sbatch --test-only accepts the job array: {answer}")
        for which in STAGE_PROFILES:  # the CPU preparation job and the 1-GPU eval array
            sub = stage_profile(path, which, settings)
            slurm_preflight(sub, path, 1 if which == "prepare" else len(todo))
    elif settings and launcher == "basic":
        raise ConfigError(f"hydra.launcher.* settings do nothing with the basic launcher (got "
                          f"{', '.join(settings)})")
    logs = _logs_folder(plan, given_logs)
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "jobs.yaml").write_text(yaml.safe_dump([list(j.overrides) for j in todo]))
    print(f"learnforget: launching {len(todo)} job(s) of study {plan.study.name} with "
          f"{launcher} (logs: {shown_path(logs)})")
    if launcher != "submitit_slurm":  # preparation first, in this process, on the CPU
        _prepare_here(todo)
    if launcher == "basic":
        return _run_here(todo)
    folder = logs / ".submitit" / "%j"
    if launcher == "submitit_local":
        threads = max(1, usable_cores() // len(todo))
        overrides = with_threads(todo, threads)
        kept = overrides[0] == todo[0].overrides
        print(f"learnforget: submitit_local runs all {len(todo)} job(s) side by side on "
              f"{usable_cores()} core(s): train.num_threads={threads} each"
              + (" (kept from the overrides)" if kept else ""))
        executor = submitit.AutoExecutor(cluster="local", folder=str(folder))
        executor.update_parameters(**{"timeout_min": LOCAL_TIMEOUT_MIN, "cpus_per_task": threads,
                                      "name": f"lf-{plan.study.name}", **settings})
        return _submit(executor, todo, overrides, what)
    return launch_slurm(plan.study.name, todo, profile, path, folder, settings)


def report_failures(outcomes: Sequence[Outcome]) -> None:
    """One line per failed job: its number in the listing, run folder and the error."""
    for o in outcomes:
        if o.error is None:
            continue
        lines = str(o.error).strip().splitlines() or [""]
        # submitit's errors quote the job's traceback: its last "...Error: ..." line says what
        raised = [x.strip() for x in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", x)]
        what = raised[-1] if o.log and raised else f"{type(o.error).__name__}: {lines[0]}"
        print(f"learnforget: job #{o.job.index} ({o.job.run_dir.name}) failed: {what}"
              + (f" (log: {o.log})" if o.log else ""), file=sys.stderr)
