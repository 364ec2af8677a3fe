"""Studies (sweeps/*.yaml): the paper's grids expand and cost out offline; bad studies and
cluster profiles fail before any job; a tiny study runs, reruns nothing, reruns what is gone."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.studies.cluster import load_cluster_profile
from learnforget.studies.command import sweep_cli, sweep_main
from learnforget.studies.plan import estimate, expand, refresh_states
from learnforget.studies.study import expand_overrides, find_study, load_study


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_code_ift_dry_run_lists_the_paper_grid(tmp_path, capsys, no_network):
    t0 = time.perf_counter()
    rc = sweep_cli(["code_ift", "--dry-run", f"paths.runs_dir={tmp_path / 'runs'}"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0
    assert elapsed < 45, elapsed  # seconds, even on a loaded 2-core machine (no downloads)
    assert "6 combinations -> 4 jobs (2 duplicate(s) merged" in out
    assert "states: 0 done, 0 running, 0 resume, 4 new" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    plan = expand(load_study(find_study("code_ift")), [f"paths.runs_dir={tmp_path / 'runs'}"])
    refresh_states(plan)
    total = estimate(plan)
    methods = [j.cfg.method.name for j in plan.jobs]
    assert sorted(methods) == ["full", "lora", "lora", "lora"]
    lora = {j.cfg.method.r: j.cfg.train.lr for j in plan.jobs if j.cfg.method.name == "lora"}
    assert lora == {16: 2e-4, 64: 2e-4, 256: 1e-4}
    full = [j for j in plan.jobs if j.cfg.method.name == "full"]
    full_lrs = [j.cfg.train.lr for j in full]
    assert len(full_lrs) == len(set(full_lrs)) == 1  # once per LR, not once per rank
    assert len(full[0].duplicates) == 2  # r=64 and r=256 map onto the same run
    for j in plan.jobs:
        c = j.cfg
        assert (c.model.name, c.data.name, c.eval.name) == ("llama2_7b", "magicoder_evol", "paper")
        assert (c.train.checkpoints.unit, list(c.train.checkpoints.at)) == ("epochs",
                                                                            [1, 2, 4, 8, 16])
        assert c.experiment_name == "code_ift" and j.run_dir.parent.name == "code_ift"
        assert j.state == "new"
    assert total == pytest.approx(313.8, abs=0.1)


def test_the_study_model_expands_without_composing_and_jobs_compose_as_compose(tmp_path):
    """The pure study model gives every job's override list; each job's config is exactly what
    learnforget.config.compose makes of that list (Hydra's public compose API)."""
    study = load_study(_write(tmp_path / "x.yaml", """
description: one full job, its rank ignored
experiment_name: x
stages: [train, eval]
holds: [model=llama2_7b, debug=fast, "train.betas=[0.9,0.95]", +extra=3]
sweep: {method: [full], method.r: [64]}
"""))
    ex = expand_overrides(study, [f"paths.runs_dir={tmp_path}"])
    assert (ex.combinations, ex.excluded, ex.hydra) == (1, 0, [])
    assert ex.jobs == [(["experiment_name=x", "stages=[train,eval]", "model=llama2_7b",
                         "debug=fast", "train.betas=[0.9,0.95]", "+extra=3", "method=full",
                         "method.r=64", f"paths.runs_dir={tmp_path}"],
                        ["method=full", "method.r=64"])]
    (job,) = expand(study, [f"paths.runs_dir={tmp_path}"]).jobs
    assert OmegaConf.to_container(job.cfg) == OmegaConf.to_container(compose(ex.jobs[0][0]))
    assert job.cfg.extra == 3 and list(job.cfg.stages) == ["train", "eval"]


def test_one_definition_of_a_small_run():
    """debug=fast, the tests' FAST and the start of every toy size are one small run."""
    from conftest import FAST

    from learnforget.studies.study import available_studies

    assert OmegaConf.to_container(compose(["debug=fast"])) == OmegaConf.to_container(compose(FAST))
    toys = 0
    for name in available_studies():
        toy = load_study(find_study(name)).sizes.get("toy")
        if toy:
            toys += 1
            assert toy["overrides"][0] == "debug=fast", name
    assert toys >= 10


def test_costs_are_data_and_a_formula_is_an_error(tmp_path):
    from learnforget.studies.cost import Cost, gpu_hours, parse_cost

    cost = parse_cost({"tokens_per_gpu_s": 1000, "eval_gpu_hours": 0.5,
                       "speed": [{"match": {"method": "lora"}, "factor": 0.5},
                                 {"match": {"train.precision": ["fp32", "bf16"]}, "factor": 0.5}]},
                      "study x: cost")
    full = compose(["method=full", "train.checkpoints.unit=tokens",
                    "train.checkpoints.at=[3600000,7200000]", "train.precision=fp32"])
    lora = compose(["method=lora", "train.checkpoints.unit=steps", "train.checkpoints.at=[10]",
                    "train.batch_size=4", "train.grad_accum=2", "train.seq_len=90",
                    "train.precision=bf16"])
    assert gpu_hours(cost, full) == pytest.approx(7_200_000 / 500 / 3600 + 2 * 0.5)
    assert gpu_hours(cost, lora) == pytest.approx(10 * 8 * 90 / 250 / 3600 + 0.5)
    assert gpu_hours(2.5, lora) == 2.5
    assert isinstance(cost, Cost) and "speed x0.5 where method=lora" in cost.describe()
    for bad, match in [({"eval_gpu_hours": 1}, "tokens_per_gpu_s is required"),
                       ({"tokens_per_gpu_s": 5, "speeds": 1}, r"unknown key\(s\) \['speeds'\]"),
                       ({"tokens_per_gpu_s": 5, "speed": [{"factor": "fast"}]}, "speed\\[0\\]"),
                       ({"tokens_per_gpu_s": -1}, "tokens_per_gpu_s must be a positive number")]:
        with pytest.raises(ConfigError, match=match):
            parse_cost(bad, "study x: cost")
    epochs = compose(["train.checkpoints.unit=epochs", "train.checkpoints.at=[1,2]"])
    with pytest.raises(ConfigError, match="epoch_tokens is needed"):
        gpu_hours(cost, epochs)
    per_data = parse_cost({"tokens_per_gpu_s": 1, "epoch_tokens": {"magicoder_evol": 3600}}, "c")
    with pytest.raises(ConfigError, match="no entry for data=stdlib_code"):
        gpu_hours(per_data, epochs)
    formula = _write(tmp_path / "f.yaml", 'description: x\ngpu_hours_per_job: "tokens / 5000"\n')
    with pytest.raises(ConfigError, match="gpu_hours_per_job must be a number.*`cost:` mapping"):
        load_study(formula)


def test_launcher_choices_and_hydra_overrides_are_checked_before_any_job(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="--launcher 'local_slurm' is unknown.*submitit_slurm"):
        sweep_main("demo_tiny", [f"paths.runs_dir={runs}"], launcher="local_slurm")
    with pytest.raises(ConfigError, match="'hydra.job.name=x': a study takes hydra.launcher"):
        sweep_main("demo_tiny", [f"paths.runs_dir={runs}", "hydra.job.name=x"])
    assert not runs.exists()


def test_a_preempted_study_job_is_resubmitted_with_its_overrides():
    """submitit requeues a preempted or timed-out SLURM job by asking its callable to
    checkpoint: a study job comes back as itself with the same overrides (and then resumes its
    run from train/resume.pt)."""
    import submitit

    from learnforget.studies.launch import StudyJob

    job = StudyJob()
    delayed = job.checkpoint(["method=lora", "seed=1"])
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == (["method=lora", "seed=1"],)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_config_or_key_in_a_study_fails_before_any_job(tmp_path):
    runs = tmp_path / "runs"
    bad_model = _write(tmp_path / "bad_model.yaml", f"""
description: a study naming a model that does not exist
holds: [model=llama3_70b, paths.runs_dir={runs}]
sweep: {{method: [full, lora]}}
""")
    with pytest.raises(ConfigError, match="llama3_70b") as e:
        sweep_main(str(bad_model), launcher="basic")
    assert "study bad_model" in str(e.value) and "unknown model" in str(e.value)
    bad_key = _write(tmp_path / "bad_key.yaml", f"""
description: a study setting a key that does not exist
holds: [paths.runs_dir={runs}]
sweep: {{train.lrr: [1.0e-4, 2.0e-4]}}
""")
    with pytest.raises(ConfigError, match="train.lrr"):
        sweep_main(str(bad_key), launcher="basic")
    bad_field = _write(tmp_path / "bad_field.yaml", "description: x\nsweeps: {seed: [0, 1]}\n")
    with pytest.raises(ConfigError, match="sweeps"):
        sweep_main(str(bad_field), dry_run=True)
    assert not runs.exists()


def test_cluster_profile_unknown_key_is_an_error(tmp_path):
    default = Path(__file__).resolve().parents[1] / "clusters" / "default.yaml"
    profile = load_cluster_profile(default)
    assert profile["gpus_per_node"] == 1 and profile["max_num_timeout"] >= 1
    bad = _write(tmp_path / "cluster.yaml", "partiton: gpu\ntimeout_min: 600\n")
    with pytest.raises(ConfigError, match="unknown key 'partiton'.*did you mean 'partition'"):
        load_cluster_profile(bad)
    with pytest.raises(ConfigError, match="partiton"):
        sweep_main("demo_tiny", launcher="submitit_slurm", cluster=str(bad), dry_run=True)
    wrong_type = _write(tmp_path / "types.yaml", "timeout_min: soon\n")
    with pytest.raises(ConfigError, match="timeout_min"):
        load_cluster_profile(wrong_type)


def test_tiny_study_runs_reruns_nothing_and_reruns_only_what_is_missing(tmp_path, cache_dir,
                                                                       capsys):
    runs = tmp_path / "runs"
    study = _write(tmp_path / "tiny.yaml", f"""
description: three debug-sized runs on the tiny Llama (full once, LoRA r=2 and r=4)
launcher: basic
stages: [train, eval, spectra]
holds:
  - model=tiny_llama
  - data=stdlib_code
  - data.max_docs=8
  - data.heldout_docs=2
  - logger=none
  - eval=smoke
  - eval.tasks=[]
  - train.batch_size=2
  - train.seq_len=32
  - train.checkpoints.unit=steps
  - train.checkpoints.at=[1,2]
  - train.heldout_batches=1
  - paths.runs_dir={runs}
  - paths.cache_dir={cache_dir}
sweep:
  method: [full, lora]
  method.r: [2, 4]
gpu_hours_per_job: 0
""")
    assert sweep_main(str(study)) == 0
    out = capsys.readouterr().out
    assert "launching 3 job(s)" in out
    folders = sorted((runs / "tiny").iterdir())
    assert len(folders) == 3 and sum(f.name.startswith("tiny_llama-full-") for f in folders) == 1
    for f in folders:
        assert json.loads((f / "run.json").read_text())["status"] == "finished"
        assert (f / "eval" / "summary-smoke.json").exists()
        assert sorted(p.name for p in (f / "spectra").glob("*.json")) == ["step-000001.json",
                                                                          "step-000002.json"]
        assert json.loads((f / "job.json").read_text())["stages"] == {
            "train": "done", "eval": "done", "spectra": "done"}
    stamps = {f.name: (f / "run.json").stat().st_mtime_ns for f in folders}

    assert sweep_main(str(study)) == 0  # finished: nothing is launched
    out = capsys.readouterr().out
    assert "nothing to launch: all 3 job(s)" in out and "launching" not in out
    assert "states: 3 done, 0 running, 0 resume, 0 new" in out
    assert {f.name: (f / "run.json").stat().st_mtime_ns for f in folders} == stamps

    gone = next(f for f in folders if "lora_r2" in f.name)
    shutil.rmtree(gone)
    assert sweep_main(str(study)) == 0  # only the deleted run is trained again
    out = capsys.readouterr().out
    assert "launching 1 job(s)" in out and "2 done, 0 running, 0 resume, 1 new" in out
    assert json.loads((gone / "run.json").read_text())["status"] == "finished"
    for f in folders:
        if f != gone:
            assert (f / "run.json").stat().st_mtime_ns == stamps[f.name]


def test_a_stop_signal_outside_slurm_stops_the_sweep(monkeypatch, capsys):
    """Without a scheduler to requeue it, a job whose training caught SIGTERM ends the process
    (as the signal would have) instead of letting a basic-launcher sweep run its next job."""
    import pytest

    from learnforget.studies.job import _hand_interrupt_to_submitit

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with pytest.raises(SystemExit) as e:
        _hand_interrupt_to_submitit()
    assert e.value.code == 143 and "rerun the same command to resume" in capsys.readouterr().out


def test_job_json_keeps_every_launch_with_its_wall_and_cpu(make_cfg):
    """A run's cost is reproducible from its folder: job.json lists each launch's stages,
    wall and process CPU seconds (a relaunch of a finished run adds one that skipped all);
    the training record and each eval record carry their own CPU seconds."""
    from learnforget.studies.job import run_job

    cfg = make_cfg("method=lora", "method.r=2", "train.checkpoints.at=[1]", "eval=smoke",
                   "eval.tasks=[]", "eval.diversity.prompts=[]", "eval.limit=4",
                   "stages=[train,eval]")
    first = run_job(cfg)
    assert first["stages"] == {"train": "done", "eval": "done"}
    run = Path(first["run_dir"])
    job = json.loads((run / "job.json").read_text())
    assert len(job["launches"]) == 1 and job["launches"][0]["stages"] == first["stages"]
    assert job["launches"][0]["cpu_time_s"] > 0 and job["launches"][0]["wall_time_s"] > 0
    assert json.loads((run / "run.json").read_text())["train"]["cpu_time_s"] > 0
    scored = json.loads((run / "eval/step-000001.json").read_text())
    assert scored["cpu_time_s"] > 0 and scored["wall_time_s"] > 0
    assert run_job(cfg)["stages"] == {"train": "skipped", "eval": "skipped"}
    job = json.loads((run / "job.json").read_text())
    assert [x["stages"] for x in job["launches"]] == [
        {"train": "done", "eval": "done"}, {"train": "skipped", "eval": "skipped"}]
    assert job["cpu_time_s"] == job["launches"][1]["cpu_time_s"]  # the last launch's


def test_a_trained_run_another_process_is_scoring_is_busy_not_scored_twice(make_cfg):
    """Two workers of one study (sweeps/README.md): worker 1 trains a run, releases training's
    lock and scores it; worker 2 reaching the run then saw it trained and unlocked and scored
    it a second time beside worker 1 (seen on the regularisers laptop study, 2026-12-07). The
    stages after training now hold the run's lock: while another process holds it they are
    "busy" and nothing is written; once it is free they run."""
    import subprocess
    import sys

    from learnforget.studies.job import job_state, run_job

    cfg = make_cfg("method=lora", "method.r=2", "train.checkpoints.at=[1]", "eval=smoke",
                   "eval.tasks=[]", "eval.diversity.prompts=[]", "eval.limit=4",
                   "stages=[train]")
    run = Path(run_job(cfg)["run_dir"])
    both = cfg.copy()
    both.stages = ["train", "eval"]
    holder = subprocess.Popen(  # another process holding the run's lock (flock: per process)
        [sys.executable, "-c", "import sys, time; from learnforget.runfolder import RunLock; "
         f"l = RunLock({str(run)!r}); print(l.acquire(), flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert job_state(both, run)[0] == "running"
        assert run_job(both)["stages"] == {"train": "skipped", "eval": "busy"}
        assert not (run / "eval" / "step-000001.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_job(both)["stages"] == {"train": "skipped", "eval": "done"}
    assert (run / "eval" / "step-000001.json").exists()


def test_a_sweep_leaves_the_analysis_to_the_process_still_running_jobs(tmp_path, monkeypatch,
                                                                        capsys):
    """Two shells running one study (two 1-thread workers on a laptop): the one that finishes
    first does not analyse half of the study while the other still trains; the last one does."""
    import learnforget.analysis.stage as stage
    import learnforget.studies.command as command

    runs = tmp_path / "runs"
    study = _write(tmp_path / "pair.yaml", f"""
description: two runs analysed together
launcher: basic
analyze: true
stages: [train]
holds: [model=tiny_llama, data=stdlib_code, logger=none, paths.runs_dir={runs}]
sweep:
  method: [full, lora]
gpu_hours_per_job: 0
""")
    states: list[str] = []
    analysed: list[Path] = []

    def refresh(plan):
        for job, state in zip(plan.jobs, states, strict=True):
            job.state = state

    monkeypatch.setattr(command, "refresh_states", refresh)
    monkeypatch.setattr(command, "launch", lambda plan, *a: plan.jobs[:1])
    monkeypatch.setattr(command, "report_failures", lambda launched: None)
    monkeypatch.setattr(stage, "analyze", lambda root, **kw: analysed.append(root))

    states[:] = ["done", "running"]  # this process finished job 1; another runs job 2
    assert sweep_main(str(study)) == 1
    out = capsys.readouterr().out
    assert not analysed
    assert "the analysis waits: 1 job(s) of study pair still run in another process" in out
    assert f"learnforget analyze {runs.resolve() / 'pair'}" in out

    states[:] = ["done", "done"]  # the other process, at its end: every job done
    assert sweep_main(str(study)) == 0
    assert analysed == [runs.resolve() / "pair"]
    assert "the analysis waits" not in capsys.readouterr().out
