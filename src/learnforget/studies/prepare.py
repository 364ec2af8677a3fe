"""`learnforget prepare`: every distinct input (base model, token shards) of a study's jobs that
are not done, or of one run, prepared into the cache on this machine's CPU.

    learnforget prepare code_cpt                  # the study's not-done jobs
    learnforget prepare code_cpt --size toy
    learnforget prepare model=smollm2_135m data=stdlib_code data.format=shards   # one run

`learnforget sweep` runs it first: in its own process with the basic and submitit_local
launchers, and on SLURM as a CPU job (the cluster profile's `prepare:` settings) on which the
GPU job array depends (afterok), so no GPU job starts before its inputs are in the cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import submitit

from learnforget.errors import ConfigError

USAGE = ("usage: learnforget prepare STUDY [--size NAME] [key=value ...]   (a study's jobs that "
         "are not done)\n       learnforget prepare key=value ...                     (one run)")


def distinct_inputs(cfgs: Sequence[Any]) -> list:
    """The inputs of these composed configs, each once (models first)."""
    from learnforget.assets.inputs import run_inputs

    seen: dict[str, Any] = {}
    for cfg in cfgs:
        for item in run_inputs(cfg):
            seen.setdefault(item.key, item)
    return sorted(seen.values(), key=lambda i: i.kind != "model")


def missing_inputs(cfgs: Sequence[Any]) -> list:
    from learnforget.assets.inputs import is_ready

    return [i for i in distinct_inputs(cfgs) if not is_ready(i)]


def prepare_configs(cfgs: Sequence[Any]) -> list[str]:
    """Prepare what is missing; one line per distinct input."""
    from learnforget.assets.inputs import prepare_all

    return prepare_all(distinct_inputs(cfgs))


class PrepareJob(submitit.helpers.Checkpointable):
    """The preparation as a submitit job (a CPU job on SLURM): compose each override list and
    prepare their inputs. Requeued on a time limit, it resumes (shards keep finished shards)."""

    def __call__(self, override_lists: list[list[str]]) -> list[str]:
        from learnforget.config import compose

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        lines = prepare_configs([compose(list(o)) for o in override_lists])
        for line in lines:
            print(f"learnforget: {line}", flush=True)
        return lines


def prepare_cli(args: Sequence[str]) -> int:
    from learnforget.config import compose, validate

    args = list(args)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    size = None
    if "--size" in args:
        i = args.index("--size")
        if i + 1 >= len(args):
            raise ConfigError("--size needs a value (one of the study's sizes)")
        size = args[i + 1]
        del args[i:i + 2]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise ConfigError(f"prepare: unknown option {unknown[0]!r}\n{USAGE}")
    if args and "=" not in args[0]:
        from learnforget.studies.plan import expand, refresh_states
        from learnforget.studies.study import apply_size, find_study, load_study

        study, overrides = apply_size(load_study(find_study(args[0])), size, args[1:])
        plan = expand(study, overrides)
        refresh_states(plan)
        todo = plan.todo()
        print(f"learnforget: study {study.name}: {len(todo)} of {len(plan.jobs)} job(s) not "
              "done; preparing their inputs")
        cfgs = [j.cfg for j in todo]
    else:
        if size is not None:
            raise ConfigError("--size goes with a study: learnforget prepare STUDY --size NAME")
        cfg = compose(args)
        validate(cfg)
        cfgs = [cfg]
    from learnforget.data.check import check_configs

    for line in check_configs(cfgs) + prepare_configs(cfgs):
        print(f"learnforget: {line}")
    return 0
