"""Per-budget cooldowns as short branches of one plateau run (``train.cooldown_mode=branches``).

The paper cools every CPT budget B down separately over its last ``cooldown_ratio`` x B. Rather
than one full run per budget, the main run trains on the schedule's plateau (inverse_sqrt or
constant, no cooldown) and, at step ``b = S - round(cooldown_ratio * S)`` of each budget
(S: the budget's optimizer steps), writes a resume state (trainable weights, optimizer,
schedule, RNG, data position) into ``<run>/branches/<label>/train/resume.pt``. Each branch is an
ordinary resumable run in that folder: the same config with ``train.cooldown_mode=single`` and
``train.checkpoints.at=[B]``, so it resumes at step b and anneals linearly to 0 at step S, with
the data order of the main run. Its budget checkpoint is then published as the main run's
checkpoint of budget B (``checkpoints/<label>``, the manifest marked ``cooldown: branch``), so
evaluation, spectra and the analysis use the branch ends as the budgets' points.

The inverse-sqrt plateau does not depend on the run's length, so a branch follows exactly
the schedule, data and RNG of a separate full-length run at budget B (the closing test
compares them).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from learnforget.config import cooldown_mode
from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, disk_full_guard, read_json
from learnforget.runfolder import MANIFEST, RunFolder


def branch_step(budget_steps: int, ratio: float) -> int:
    """Where budget S's branch starts: S minus its cooldown (as optim.lr_factor rounds it)."""
    return budget_steps - int(round(ratio * budget_steps))


def branch_plan(plan: Any, t: Any) -> Any:
    """The main run's plan in branches mode: train to the last branch point, save no budget
    checkpoint, save a branch state at each budget's branch point."""
    ratio = float(t.cooldown_ratio)
    points: dict[int, str] = {}
    for steps, label in sorted(plan.checkpoints.items()):
        b = branch_step(steps, ratio)
        if b < 1:
            raise ConfigError(f"train.cooldown_mode=branches: budget {label} is {steps} step(s), so "
                              f"its cooldown (train.cooldown_ratio={ratio}) starts at step {b}: "
                              "use larger budgets or a smaller train.cooldown_ratio")
        if b in points:
            raise ConfigError(f"train.cooldown_mode=branches: budgets {points[b]} and {label} would "
                              f"branch at the same step {b}: space the budgets further apart")
        points[b] = label
    return replace(plan, total_steps=max(points), checkpoints={}, branch_points=points,
                   budgets=dict(plan.checkpoints))


def plateau(t: DictConfig) -> DictConfig:
    """The train config the main run's schedule is made from: no cooldown."""
    if cooldown_mode(t) != "branches":
        return t
    out = copy.deepcopy(t)
    with open_dict(out):
        out.cooldown_ratio = 0.0
    return out


def branch_config(cfg: DictConfig, main: Path, label: str, budget: float) -> DictConfig:
    """Budget `label`'s branch: the same run at that one budget, cooled down, in a sub-folder."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.train.cooldown_mode = "single"
        out.train.checkpoints.at = [budget]
        out.paths.runs_dir = str(RunFolder(main).branch(label).path.parent)
        out.experiment_name = "."
        out.run_name = label
    return out


def _publish(src: Path, dst: Path, extra: dict[str, Any]) -> None:
    """Copy a branch's budget checkpoint into the main run (to a temporary folder, renamed)."""
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # a full disk: one line naming the copy, and no half copy left behind
        with disk_full_guard(dst, sum(f.stat().st_size for f in src.rglob("*") if f.is_file())):
            shutil.copytree(src, tmp)
            manifest = read_json(tmp / MANIFEST) or {}
            atomic_write_json(tmp / MANIFEST, {**manifest, **extra})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def run_branches(cfg: DictConfig, main: Path, train: Callable[[DictConfig], Path]
                 ) -> dict[str, Any]:
    """Train (with `train`, the train stage) every budget's branch that is not finished (each
    resumable), publish its budget checkpoint into the main run and record the branches in the
    main run's run.json."""
    from learnforget.train import distributed

    d = distributed.init(cfg.train.get("distributed"))
    # the barriers wait on the job's store, not in a collective: rank 0 may work alone for long
    distributed.barrier(d)  # rank 0 has written the main run's run.json: every rank reads it
    folder = RunFolder(main)
    info = folder.read_record()
    if info is None or not info.finished:
        return {}
    if (info.cooldown or {}).get("complete"):  # published: the branches' own copies may be gone
        return info.cooldown
    t = cfg.train
    budgets = {str(label): int(step) for step, label in (info.train.budgets or {}).items()}
    at = {str(label): a for label, a in zip(sorted(budgets, key=budgets.get),
                                            sorted(float(x) for x in t.checkpoints.at),
                                            strict=True)}
    record: dict[str, Any] = {"mode": "branches", "cooldown_ratio": float(t.cooldown_ratio),
                              "branches": {}, "complete": False}
    for label, steps in sorted(budgets.items(), key=lambda kv: kv[1]):
        budget = at[label]
        budget = int(budget) if float(budget).is_integer() else budget
        branch = folder.branch(label)
        train(branch_config(cfg, main, label, budget))
        distributed.barrier(d)  # rank 0 has written the branch's run.json
        if not branch.finished():
            return record  # interrupted: the rerun resumes this branch
        manifest = branch.manifest(label) or {}
        entry = {"branch": str(branch.path.relative_to(main)),
                 "from_step": branch_step(steps, float(t.cooldown_ratio)), "to_step": steps,
                 "final_loss": manifest.get("loss"), "heldout_loss": manifest.get("heldout_loss")}
        record["branches"][label] = entry
        if d.main:
            _publish(branch.checkpoint(label), folder.checkpoint(label),
                     {"cooldown": "branch", "branch": entry["branch"],
                      "branch_from_step": entry["from_step"]})
        distributed.barrier(d)  # rank 0's copy (27 GB at 7B) is done before the next branch
    record["complete"] = True
    if d.main:
        info = folder.read_record()
        info.cooldown = record
        info.train.checkpoints = folder.checkpoint_labels()
        folder.write_record(info)
    distributed.barrier(d)
    return record


def branches_complete(out: Path) -> bool:
    info = RunFolder(out).read_record()
    return bool(info and (info.cooldown or {}).get("complete"))
