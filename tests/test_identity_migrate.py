"""`learnforget runs migrate`: run folders of an older identity version are renamed to the name
the current code gives them (same computation) or listed to be redone, never half-moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST
from omegaconf import OmegaConf

from learnforget import identity
from learnforget.cli import main
from learnforget.config import IDENTITY_VERSION, compose, config_hash, run_dir, run_name
from learnforget.errors import ConfigError
from learnforget.runfolder import MetaInfo, RunFolder, RunInfo, RunLock, RunRecord, TrainInfo


def _old_run(runs: Path, method: str, *, name: str | None = None, version: int | None = None,
             derived_from: str | None = None) -> tuple[Path, object]:
    """A finished run folder as an older learnforget wrote it: config.yaml, run.json without
    identity_version (version 1), job.json, under a name of the old identity."""
    cfg = compose([*FAST, f"method={method}", f"paths.runs_dir={runs}"])
    path = run_dir(cfg).parent / (name or f"{run_name(cfg)[:-6]}old000")
    path.mkdir(parents=True)
    OmegaConf.save(cfg, path / "config.yaml")
    RunFolder(path).write_record(RunRecord(
        status="finished", run=RunInfo(name=path.name, config_hash="old-hash", seed=0,
                                       identity_version=version, derived_from=derived_from),
        train=TrainInfo(), meta=MetaInfo()))
    (path / "job.json").write_text(json.dumps({"run": path.name, "config_hash": "old-hash"}))
    return path, cfg


V2 = identity.Migration(2, "full finetuning's loss changed", redo=lambda c: c.method.name == "full")


def test_a_rename_moves_the_folder_and_rewrites_its_records(tmp_path):
    runs = tmp_path / "runs"
    old, cfg = _old_run(runs, "lora")
    steps = identity.plan(runs, migrations=[V2], target=2)
    assert [(s.action, s.new_name) for s in steps] == [("rename", run_name(cfg))]
    assert old.exists()  # planning changes nothing

    assert len(identity.apply(steps, target=2)) == 1
    new = run_dir(cfg)
    assert not old.exists() and new.is_dir() and (new / "config.yaml").exists()
    rec = RunFolder(new).read_record()
    assert (rec.run.name, rec.config_hash, rec.run.identity_version) == (
        new.name, config_hash(cfg), 2)
    assert json.loads((new / "job.json").read_text()) == {"run": new.name,
                                                          "config_hash": config_hash(cfg)}
    assert RunFolder(new).finished(config_hash(cfg))  # `train` now finds it done
    assert [s.action for s in identity.plan(runs, migrations=[V2], target=2)] == ["current"]


def test_runs_whose_computation_changed_are_listed_to_redo_and_left_alone(tmp_path):
    runs = tmp_path / "runs"
    full, _ = _old_run(runs, "full")
    lora, _ = _old_run(runs, "lora")
    steps = {s.folder: s for s in identity.plan(runs, migrations=[V2], target=2)}
    assert steps[full].action == "redo" and "loss changed" in steps[full].reason
    assert steps[lora].action == "rename"
    identity.apply(list(steps.values()), target=2)
    assert full.exists() and RunFolder(full).read_record().config_hash == "old-hash"
    assert not lora.exists()


def test_locked_derived_conflicting_and_current_runs_are_not_touched(tmp_path):
    runs = tmp_path / "runs"
    locked, _ = _old_run(runs, "lora")
    derived, _ = _old_run(runs, "full", derived_from="/x/source")
    clash, cfg = _old_run(runs, "ia3")
    run_dir(cfg).mkdir()
    current, _ = _old_run(runs, "bitfit", version=2)
    lock = RunLock(locked)
    assert lock.acquire()
    try:
        steps = {s.folder: s for s in identity.plan(runs, migrations=[V2], target=2)}
    finally:
        lock.release()
    assert steps[locked].action == "skip" and "running" in steps[locked].reason
    assert steps[derived].action == "skip" and "mitigate" in steps[derived].reason
    assert steps[clash].action == "conflict"
    assert steps[current].action == "current"
    assert identity.apply(list(steps.values()), target=2) == []


def test_the_command_prints_the_plan_of_todays_version(tmp_path, capsys):
    runs = tmp_path / "runs"
    _old_run(runs, "lora", name=None, version=IDENTITY_VERSION)
    assert main(["runs", "migrate", str(runs)]) == 0
    assert f"identity version {IDENTITY_VERSION}: 1 current, 0 rename" in capsys.readouterr().out
    assert main(["runs", "migrate", str(tmp_path / "nowhere")]) == 2
    assert "runs folder" in capsys.readouterr().err
    assert main(["runs", "rename"]) == 2
    with pytest.raises(ConfigError, match="not found"):
        identity.plan(tmp_path / "nowhere")
