"""Run names across identity versions: what `learnforget runs migrate` does.

A run's name and hash come from learnforget.config.run_identity, whose version is
config.IDENTITY_VERSION and is recorded in run.json (run.identity_version; a run.json without it
is version 1). When a change to the identity bumps the version, MIGRATIONS gets an entry:

- a rename (`redo` is None): old runs computed what the new code computes, only the name
  changed; their folders are renamed to the new name and run.json/job.json get the new hash;
- a redo (`redo(cfg)` is True for a run's saved config): the change alters what such runs
  compute, so they are listed to be trained again (their folders are left as they are; a new
  run under the new name trains beside them).

`learnforget runs migrate RUNS_DIR` prints the plan; `--apply` renames. Runs that are running
(locked), derived runs (intruder mitigation: `learnforget mitigate` again after the source) and
folders whose new name already exists are reported and left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from learnforget.config import IDENTITY_VERSION, config_hash, run_name
from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, read_json
from learnforget.runfolder import LAYOUT, RunFolder, find_runs


@dataclass(frozen=True)
class Migration:
    """One identity version step: `to_version` and what changed in one line; `redo(cfg)` says
    whether a run with this saved config must be trained again (None: names change only)."""

    to_version: int
    what: str
    redo: Callable[[DictConfig], bool] | None = None


# Version 1 (2026-12): the inclusion list of learnforget.config.IDENTITY_KEYS reproduces every
# name of the exclusion list before it, so no migration exists yet.
MIGRATIONS: tuple[Migration, ...] = ()


@dataclass
class Step:
    folder: Path
    action: str          # current | rename | update | redo | conflict | skip
    new_name: str | None = None
    new_hash: str | None = None
    reason: str = ""


def _steps_between(version: int, target: int, migrations: Sequence[Migration]) -> list[Migration]:
    return [m for m in migrations if version < m.to_version <= target]


def plan(runs_dir: Path, *, migrations: Sequence[Migration] = MIGRATIONS,
         target: int = IDENTITY_VERSION) -> list[Step]:
    """What migrating every run folder under runs_dir to identity version `target` does."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ConfigError(f"runs folder {runs_dir} not found (expected a folder of run folders, "
                          "e.g. runs/)")
    steps = []
    for path in find_runs(runs_dir):
        folder = RunFolder(path)
        rec = folder.read_record()
        version = int(rec.run.identity_version or 1) if rec else target
        if rec is None or version >= target:
            steps.append(Step(path, "current"))
            continue
        if rec.run.derived_from:
            steps.append(Step(path, "skip", reason="derived run: run `learnforget mitigate` "
                              "again once its source is migrated"))
            continue
        if folder.locked():
            steps.append(Step(path, "skip", reason="running (locked): migrate when it stops"))
            continue
        cfg_path = path / LAYOUT["config"][0]
        if not cfg_path.exists():
            steps.append(Step(path, "skip", reason=f"no {cfg_path.name}: cannot recompute its name"))
            continue
        cfg = OmegaConf.load(cfg_path)
        redo = [m.what for m in _steps_between(version, target, migrations)
                if m.redo is not None and m.redo(cfg)]
        if redo:
            steps.append(Step(path, "redo", reason="; ".join(redo)))
            continue
        name, chash = run_name(cfg), config_hash(cfg)
        if name == path.name:
            steps.append(Step(path, "update", name, chash, "same name: run.json gets the version"))
        elif (path.parent / name).exists():
            steps.append(Step(path, "conflict", name, chash, f"{name} already exists"))
        else:
            steps.append(Step(path, "rename", name, chash))
    return steps


def _rewrite_records(path: Path, name: str, chash: str, old_hash: str | None,
                     target: int) -> None:
    folder = RunFolder(path)
    rec = folder.read_record()
    if rec is not None:
        rec.run = replace(rec.run, name=name, config_hash=chash, identity_version=target)
        folder.write_record(rec)
    for branch in sorted(path.glob("branches/*")):  # cooldown branches: same run, same hash
        b = RunFolder(branch)
        brec = b.read_record() if (branch / LAYOUT["record"][0]).exists() else None
        if brec is not None and brec.config_hash in (None, old_hash):
            brec.run = replace(brec.run, config_hash=chash, identity_version=target)
            b.write_record(brec)
    job = read_json(folder.job) if folder.job.exists() else None
    if job:
        job.update({"run": name, "config_hash": chash})
        atomic_write_json(folder.job, job)


def apply(steps: Sequence[Step], target: int = IDENTITY_VERSION) -> list[Step]:
    """Rename (os.rename: atomic on one file system) and rewrite run.json of every rename and
    update step; the steps done."""
    done = []
    for s in steps:
        if s.action not in ("rename", "update") or not s.new_name or not s.new_hash:
            continue
        old_hash = RunFolder(s.folder).read_record().config_hash  # type: ignore[union-attr]
        dest = s.folder.parent / s.new_name
        if s.action == "rename":
            os.rename(s.folder, dest)
        _rewrite_records(dest, s.new_name, s.new_hash, old_hash, target)
        done.append(s)
    return done


def migrate_cli(args: Sequence[str]) -> int:
    """`learnforget runs migrate [RUNS_DIR] [--apply]`."""
    import argparse

    p = argparse.ArgumentParser(prog="learnforget runs migrate", description=(
        f"Bring run folders to identity version {IDENTITY_VERSION}: rename those whose name "
        "changed, list those that must be redone. Prints the plan; --apply renames."))
    p.add_argument("runs_dir", nargs="?", default="runs")
    p.add_argument("--apply", action="store_true", help="rename and rewrite run.json")
    a = p.parse_args(list(args))
    steps = plan(Path(a.runs_dir))
    for s in steps:
        if s.action == "current":
            continue
        target = f" -> {s.new_name}" if s.action == "rename" else ""
        print(f"{s.action:<9} {s.folder}{target}{': ' + s.reason if s.reason else ''}")
    counts = {k: sum(s.action == k for s in steps) for k in
              ("current", "rename", "update", "redo", "conflict", "skip")}
    print(f"identity version {IDENTITY_VERSION}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if a.apply:
        print(f"applied: {len(apply(steps))} run folder(s)")
    elif counts["rename"] or counts["update"]:
        print("dry run: nothing changed (--apply renames)")
    return 0
