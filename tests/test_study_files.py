"""Every study file under sweeps/ and each of its sizes parses and expands, and its first and
last jobs compose and validate: a typo in a study (a key, a value, a size's override) fails
here, not on the cluster or hours into a laptop study. The slow tier composes every job."""
from __future__ import annotations

from pathlib import Path

import pytest

from learnforget.config import compose, run_dir, validate
from learnforget.studies.plan import expand
from learnforget.studies.study import apply_size, expand_overrides, load_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "sweeps").glob("*.yaml"))
CASES = [(p, size) for p in STUDIES for size in [None, *load_study(p).sizes]]
IDS = [f"{p.stem}-{s or 'default'}" for p, s in CASES]


def test_there_are_studies_and_sizes():
    names = {p.stem for p in STUDIES}
    assert {"demo", "regime_cpt", "regime_ift", "regime_ift_lr_search", "said_d90_laptop"} <= names
    assert sum(size is not None for _, size in CASES) >= 10


@pytest.mark.parametrize("path,size", CASES, ids=IDS)
def test_study_file_first_and_last_jobs_compose(path, size):
    study, extra = apply_size(load_study(path), size)
    jobs = expand_overrides(study, extra).jobs
    assert jobs, f"{path.name} (size {size}) expands to no job"
    cfgs = [compose(overrides) for overrides, _ in {0: jobs[0], 1: jobs[-1]}.values()]
    for cfg in cfgs:
        validate(cfg)
        assert cfg.model.name and cfg.method.name
    if len(jobs) > 1 and jobs[0][0] != jobs[-1][0]:
        assert run_dir(cfgs[0]) != run_dir(cfgs[-1])


@pytest.mark.slow
@pytest.mark.parametrize("path,size", CASES, ids=IDS)
def test_study_file_composes_every_job(path, size):
    study, extra = apply_size(load_study(path), size)
    plan = expand(study, extra)  # composes and validates every job
    assert plan.jobs and len({j.run_dir for j in plan.jobs}) == len(plan.jobs)
