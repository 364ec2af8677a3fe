"""A study's jobs as submitit jobs, and on SLURM as up to three submissions chained by SLURM
dependencies, so that no GPU sits idle or waits on work a CPU does:

1. preparation (only when an input is missing): one CPU job, `learnforget prepare` of every
   distinct model and token-shard corpus of the jobs (the profile's `prepare:` settings, no
   GPU requested);
2. training: the job array with the study's profile (e.g. 8 GPUs), `stages=[train]`, each task
   `--dependency=afterok:<preparation>`: no training task starts before preparation ended
   successfully;
3. eval and spectra: a second array with the profile's 1-GPU variant (`eval:` settings),
   `stages=[eval,spectra]`, `--dependency=aftercorr:<training array>`: task i starts when
   training task i completed successfully (SLURM's array-to-array dependency). Jobs whose
   training is already complete get no training task; their eval tasks form their own array,
   after the preparation only.

A failed preparation cancels both arrays; a failed training task cancels its eval task (its
dependency could never be satisfied and it would stay pending).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.studies.cluster import slurm_executor, stage_profile, submission_refusal
from learnforget.studies.job import run_job
from learnforget.studies.plan import Job
from learnforget.studies.values import split_override

EVAL_STAGES = ("eval", "spectra")


class StudyJob(submitit.helpers.Checkpointable):
    """One job in a submitit worker: compose its overrides, run its stages. On preemption or a
    time limit submitit resubmits it with the same overrides (Checkpointable.checkpoint)."""

    def __call__(self, overrides: list[str]) -> dict[str, Any]:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return run_job(compose(overrides))


@dataclass
class Outcome:
    job: Job
    error: BaseException | None = None
    log: Path | None = None


def with_threads(todo: list[Job], threads: int | None) -> list[list[str]]:
    """Each job's overrides, with train.num_threads=threads unless the jobs set it."""
    lists = [list(j.overrides) for j in todo]
    if threads and not any(split_override(o)[0] == "train.num_threads" for o in lists[0]):
        lists = [o + [f"train.num_threads={threads}"] for o in lists]
    return lists


def with_stages(overrides: list[str], stages: list[str]) -> list[str]:
    """The overrides with `stages` replaced."""
    return [o for o in overrides if split_override(o)[0] != "stages"] + \
        [f"stages=[{','.join(stages)}]"]


def submit_array(executor: Any, fn: Any, args: list, what: str) -> list:
    """Submit one job array; a refused sbatch is one error line."""
    try:
        return executor.map_array(fn, args)
    except Exception as e:
        refused = submission_refusal(e)
        if refused is None:
            raise
        raise ConfigError(f"SLURM refused the submission of {what}; no job started. sbatch "
                          f"said: {refused}") from e


def _cancel(handles: list) -> None:
    for h in handles:
        h.cancel(check=False)


def launch_slurm(name: str, todo: list[Job], profile: dict[str, Any], path: Path, folder: Path,
                 settings: dict[str, Any]) -> list[Outcome]:
    """Submit preparation, training and eval as described above; wait for them; one Outcome per
    job (its training or eval error)."""
    from learnforget.studies.job import job_stages
    from learnforget.studies.prepare import PrepareJob, missing_inputs

    what = f"study {name} ({len(todo)} job(s))"
    missing = missing_inputs([j.cfg for j in todo])
    prep = None
    if missing:
        executor = slurm_executor(stage_profile(path, "prepare", settings), folder,
                                  f"lf-{name}-prepare")
        prep = submit_array(executor, PrepareJob(), [[list(j.overrides) for j in todo]],
                            f"{what}: its preparation job")[0]
        print(f"learnforget: preparation of {', '.join(i.label for i in missing)}: CPU job "
              f"{prep.job_id}; the training jobs wait for it (afterok)")
    stages = [job_stages(j.cfg) for j in todo]
    # training only where it is not complete (a job resumed at its eval holds no training GPUs)
    train_idx = [i for i, j in enumerate(todo) if "train" in stages[i] and j.next_stage == "train"]
    eval_idx = [i for i, st in enumerate(stages) if set(st) & set(EVAL_STAGES)]
    train_h: dict[int, Any] = {}
    eval_h: dict[int, Any] = {}
    after_prep = f"afterok:{prep.job_id}" if prep is not None else None
    if train_idx:
        args = with_threads(todo, profile.get("cpus_per_task"))
        executor = slurm_executor(profile, folder, f"lf-{name}", dependency=after_prep)
        handles = submit_array(executor, StudyJob(),
                               [with_stages(args[i], ["train"]) for i in train_idx],
                               f"{what}: its training array")
        train_h = dict(zip(train_idx, handles, strict=True))
    array = train_h[train_idx[0]].job_id.split("_")[0] if train_idx else None
    corresponding = bool(train_idx) and set(train_idx) <= set(eval_idx)
    eprof = stage_profile(path, "eval", settings)
    eargs = with_threads(todo, eprof.get("cpus_per_task"))
    groups = [  # (jobs, dependency): after their own training task; trained already
        ([i for i in train_idx if i in eval_idx],
         f"aftercorr:{array}" if corresponding else f"afterok:{array}"),
        ([i for i in eval_idx if i not in train_idx], after_prep)]
    for idx, dep in groups:
        if not idx:
            continue
        executor = slurm_executor(eprof, folder, f"lf-{name}-eval", dependency=dep)
        handles = submit_array(executor, StudyJob(),
                               [with_stages(eargs[i], [s for s in stages[i] if s in EVAL_STAGES])
                                for i in idx], f"{what}: its eval/spectra array")
        eval_h.update(zip(idx, handles, strict=True))
        print(f"learnforget: jobs: training array {array or '-'} ({len(train_h)} task(s), the "
              f"profile's resources), eval/spectra array {handles[0].job_id.split('_')[0]} "
              f"({len(idx)} task(s), 1 task{' + 1 GPU' if eprof.get('gpus_per_node') else ''} "
              f"each, {dep or 'no dependency'})")
    errors: dict[int, tuple[BaseException, Path | None]] = {}
    if prep is not None:
        try:
            prep.results()
        except Exception as e:  # submitit's FailedJobError / UncompletedJobError
            _cancel(list(train_h.values()) + list(eval_h.values()))
            err = ConfigError(f"the preparation job {prep.job_id} failed, so no training job "
                              f"ran: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
            return [Outcome(j, err, Path(prep.paths.stderr)) for j in todo]
    for i, h in train_h.items():
        try:
            h.results()  # every task (rank) of the job: result() asserts a single task
        except Exception as e:
            errors[i] = (e, Path(h.paths.stderr))
            if i in eval_h and corresponding:
                eval_h.pop(i).cancel(check=False)  # aftercorr: it would stay pending
    if errors and not corresponding:  # afterok on the whole training array: never satisfied
        _cancel([eval_h.pop(i) for i in train_idx if i in eval_h])
    for i, h in eval_h.items():
        try:
            h.results()  # every task (rank) of the job: result() asserts a single task
        except Exception as e:
            errors.setdefault(i, (e, Path(h.paths.stderr)))
    return [Outcome(j, *errors.get(i, (None, None))) for i, j in enumerate(todo)]
