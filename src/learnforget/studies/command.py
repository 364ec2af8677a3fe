"""`learnforget sweep`: a study's dry run (jobs, states, GPU-hours, data, memory, fit) or its
launch (only the jobs not done), then its analysis.

    learnforget sweep code_ift --dry-run             # every job, its state and the GPU-hours
    learnforget sweep demo_tiny                      # run what is not done yet (the tiny CPU demo)
    learnforget sweep code_cpt --launcher submitit_slurm [--cluster FILE]
    learnforget sweep demo_tiny seed=0,1 train.lr=1e-3    # a,b adds a sweep axis; a value fixes one

The study file's format: learnforget.studies.study and sweeps/README.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.studies.cluster import cluster_profile_path, load_cluster_profile
from learnforget.studies.disk import print_disk
from learnforget.studies.held import print_held
from learnforget.studies.launch import launch, report_failures
from learnforget.studies.plan import estimate, expand, refresh_states, shown_path
from learnforget.studies.report import (
    fit_rows,
    memory_table,
    print_data_budget,
    print_fit,
    print_memory,
    print_plan,
    print_protocol_notes,
)
from learnforget.studies.study import (
    LAUNCHERS,
    apply_size,
    available_studies,
    find_study,
    load_study,
)

USAGE = """usage: learnforget sweep STUDY [--dry-run] [--launcher basic|submitit_local|submitit_slurm]
                         [--cluster FILE] [--size NAME] [--activations] [--no-analyze]
                         [key=value ...]
STUDY is a file name in sweeps/ (without .yaml) or a path; --size picks one of the study's
`sizes` (e.g. toy: the same grid on a tiny model on this CPU); --activations adds the traced
activation memory to the dry run's memory table. Studies: {studies}"""


def sweep_main(study: str, overrides: Sequence[str] = (), *, dry_run: bool = False,
               launcher: str | None = None, cluster: str | None = None,
               analyze: bool | None = None, size: str | None = None,
               activations: bool = False, analysis: dict[str, Any] | None = None) -> int:
    """Plan, launch and (study's `analyze`, or `analyze`) analyse a study; `analysis`: keyword
    arguments of learnforget.analysis.stage.analyze (the demo's intruder route)."""
    s, overrides = apply_size(load_study(find_study(study)), size, overrides)
    launcher = launcher or s.launcher
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r} is unknown (expected one of: "
                          f"{', '.join(LAUNCHERS)})")
    cluster = str(cluster_profile_path(cluster, s.cluster)) if launcher == "submitit_slurm" \
        else cluster
    if launcher == "submitit_slurm":
        load_cluster_profile(cluster)  # a bad profile fails before jobs
    t0 = time.perf_counter()
    plan = expand(s, overrides)
    refresh_states(plan)
    total = estimate(plan)
    print_plan(plan, total, launcher)
    print(f"(composed and checked {plan.combinations} combination(s) in "
          f"{time.perf_counter() - t0:.1f}s)")
    if dry_run:
        print_data_budget(plan)
        t0 = time.perf_counter()
        fit = fit_rows(plan, Path(cluster)) if launcher == "submitit_slurm" and plan.jobs \
            else None  # first: its traced reports serve the memory table where policies agree
        rows = memory_table(plan, activations=activations)
        print_memory(rows)
        if fit is not None:
            print_fit(plan, fit, [r["method"] for r in rows])
        print_held(plan, launcher, cluster)  # the jobs it submits, GPU-hours held, eval batch
        print_disk(plan)  # checkpoints, resume states, shards against the free space
        print_protocol_notes(plan)  # the fp32 scoring head, IFT runs renamed by loss_norm
        print(f"(parameter reports in {time.perf_counter() - t0:.1f}s)")
        return 0
    launched = launch(plan, launcher, cluster)
    report_failures(launched)
    if not launched:
        print(f"learnforget: nothing to launch: all {len(plan.jobs)} job(s) of study {s.name} "
              "are done" + (" or running" if any(j.state == "running" for j in plan.jobs) else ""))
    refresh_states(plan)
    if launched:
        print("\n" + "\n".join(f"{j.index:>3}  {j.state:<8} {shown_path(j.run_dir)}" for j in plan.jobs))
    done = sum(j.state == "done" for j in plan.jobs)
    print(f"learnforget: study {s.name}: {done}/{len(plan.jobs)} job(s) done, "
          f"{len(launched)} launched now")
    root = Path(plan.jobs[0].cfg.paths.runs_dir).resolve() / s.experiment_name if plan.jobs else None
    want_analysis = s.analyze if analyze is None else analyze
    running = sum(j.state == "running" for j in plan.jobs)
    if want_analysis and root is not None and done and running:
        # another process (a second shell, a worker) still runs jobs: its sweep analyses at its
        # end, on every run, instead of this one analysing a part of the study now
        print(f"learnforget: the analysis waits: {running} job(s) of study {s.name} still run "
              f"in another process; the sweep that runs them, or a rerun of this one, analyses "
              f"once they are done (now, on what is done: learnforget analyze {shown_path(root)})")
    elif want_analysis and root is not None and done \
            and (launched or not (root / "_analysis").exists()):
        from learnforget.analysis.stage import analyze as run_analysis

        run_analysis(root, cache_dir=Path(plan.jobs[0].cfg.paths.cache_dir).expanduser(),
                     **(analysis or {}))
    return 0 if done == len(plan.jobs) else 1


def sweep_cli(args: Sequence[str]) -> int:
    args = list(args)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE.format(studies=", ".join(available_studies()) or "(none)"))
        return 0 if args else 2
    opts: dict[str, Any] = {"dry_run": False, "launcher": None, "cluster": None, "analyze": None,
                            "size": None, "activations": False}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--dry-run", "-n"):
            opts["dry_run"] = True
        elif a == "--no-analyze":
            opts["analyze"] = False
        elif a == "--activations":
            opts["activations"] = True
        elif (a in ("--launcher", "--cluster", "--size")
              or a.startswith(("--launcher=", "--cluster=", "--size="))):
            name = a.split("=", 1)[0][2:]
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{a} needs a value")
            opts[name] = value
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}\n{USAGE.format(studies='...')}")
        else:
            rest.append(a)
        i += 1
    if not rest:
        raise ConfigError("which study? " + USAGE.format(studies=", ".join(available_studies())))
    return sweep_main(rest[0], rest[1:], **opts)
