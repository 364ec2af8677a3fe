"""A study's plan: every job composed (learnforget.config.compose, Hydra's public compose API)
and checked, jobs that compose to the same run folder merged, each job's state and cost.

Jobs that compose to the same run folder (e.g. `full` with every rank: it ignores method.r)
are one job. Each job's state: done (every stage complete), running (its lock is held),
resume (a resume state or finished earlier stages), new. Only resume and new jobs launch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from learnforget.config import compose, run_dir, validate
from learnforget.errors import ConfigError
from learnforget.studies.cost import gpu_hours
from learnforget.studies.job import job_state
from learnforget.studies.study import Study, expand_overrides


@dataclass
class Job:
    index: int
    overrides: list[str]               # everything, in order: what the job composes from
    params: list[str]                  # the part that varies between jobs (for the listing)
    cfg: DictConfig
    run_dir: Path
    state: str = "new"
    next_stage: str | None = None
    gpu_hours: float | None = None
    duplicates: list[list[str]] = field(default_factory=list)


@dataclass
class Plan:
    study: Study
    jobs: list[Job]
    combinations: int
    excluded: int
    extra_fixed: list[str]
    hydra_overrides: list[str]

    def todo(self) -> list[Job]:
        return [j for j in self.jobs if j.state in ("new", "resume")]


def expand(study: Study, extra: Sequence[str] = ()) -> Plan:
    """Every job of the study (composed and validated), deduplicated by run folder."""
    ex = expand_overrides(study, extra)
    jobs: list[Job] = []
    by_dir: dict[Path, Job] = {}
    composed: dict[tuple[str, ...], DictConfig] = {}
    for overrides, params in ex.jobs:
        where = f"study {study.name}: job {len(jobs) + 1} ({' '.join(params) or '(no sweep)'})"
        try:
            key = tuple(overrides)
            if key not in composed:
                composed[key] = compose(overrides)
            cfg = composed[key]
            validate(cfg)
            out = run_dir(cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        if out in by_dir:
            by_dir[out].duplicates.append(params)
            continue
        job = Job(len(jobs) + 1, overrides, params, cfg, out)
        by_dir[out] = job
        jobs.append(job)
    return Plan(study, jobs, ex.combinations, ex.excluded, ex.fixed, ex.hydra)


def refresh_states(plan: Plan) -> None:
    for job in plan.jobs:
        job.state, job.next_stage = job_state(job.cfg, job.run_dir)


def estimate(plan: Plan) -> float | None:
    """Each job's GPU-hours under the study's cost; the total (None: the study has no cost)."""
    cost = plan.study.cost
    if cost is None:
        return None
    for job in plan.jobs:
        try:
            job.gpu_hours = gpu_hours(cost, job.cfg)
        except ConfigError as e:
            raise ConfigError(f"study {plan.study.name}: cost of job {job.index}: {e}") from e
    return sum(j.gpu_hours or 0.0 for j in plan.jobs)


def shown_path(p: Path) -> str:
    """Relative to the working directory when inside it, else absolute."""
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(Path(p).resolve()) if rel.startswith("..") else rel
