"""Preparation before any job (learnforget prepare, learnforget.assets.inputs): a study's
distinct inputs are prepared once, on the CPU, before its jobs; ranks of a multi-rank job never
prepare behind a collective (rank 0 prepares before the process group, the others poll the
cache); SLURM's derived profiles (a CPU preparation job, 1-GPU eval jobs); the dry run's
GPU-hours as held and its eval-batch estimate, checked against numbers worked out by hand."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, TORCHRUN, free_port

from learnforget.assets.inputs import failure_marker, is_ready, ready_before_ranks, run_inputs
from learnforget.cli import main
from learnforget.config import compose
from learnforget.data.shards import corpus_dir, read_manifest
from learnforget.errors import ConfigError
from learnforget.studies.cluster import load_cluster_profile, stage_profile
from learnforget.studies.held import print_held
from learnforget.studies.plan import estimate, expand, refresh_states
from learnforget.studies.slurm_jobs import with_stages
from learnforget.studies.study import find_study, load_study

SHARDS = ["model=tiny_llama", "data=stdlib_code", "data.format=shards", "data.max_docs=30",
          "data.heldout_docs=4", "data.shard_tokens=20000"]


def _cfg(tmp_path: Path, *extra: str):
    return compose([*SHARDS, f"paths.cache_dir={tmp_path / 'cache'}",
                    f"paths.runs_dir={tmp_path / 'runs'}", *extra])


def test_prepare_command_prepares_a_study_once_per_distinct_input(tmp_path, capsys):
    study = tmp_path / "two.yaml"
    study.write_text("description: two LoRA ranks on one model and corpus\nholds: [" + ", ".join(
        SHARDS) + "]\nsweep:\n  method: [lora]\n  method.r: [2, 4]\n")
    args = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.runs_dir={tmp_path / 'runs'}"]
    assert main(["prepare", str(study), *args]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 job(s) not done" in out
    assert out.count("model=tiny_llama (tiny): prepared") == 1  # two jobs, one model
    assert out.count("data=stdlib_code shards") == 2 and "shards (stdlib_code-" in out  # one line + the progress line
    cfg = _cfg(tmp_path)
    folder = corpus_dir(Path(cfg.paths.cache_dir), cfg.data, cfg.model)
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["n_train_tokens"] > 0
    assert all(is_ready(i) for i in run_inputs(cfg))
    assert not (tmp_path / "runs").exists()  # preparation trains nothing
    from learnforget.studies.prepare import prepare_configs

    assert prepare_configs([cfg, cfg]) == [  # again: nothing to do
        "model=tiny_llama (tiny): ready", f"data=stdlib_code shards ({folder.name}): ready"]


def test_prepare_one_run_and_memory_data_has_only_the_model(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "model=tiny_llama", "data=stdlib_code", f"paths.cache_dir={cache}"]) == 0
    out = capsys.readouterr().out
    assert "model=tiny_llama (tiny): prepared" in out and "shards" not in out
    assert not (cache / "shards").exists()
    assert main(["prepare", "model=tiny_llama", "--size", "toy"]) == 2  # --size needs a study
    assert "goes with a study" in capsys.readouterr().err


def test_a_hub_model_given_as_a_local_folder_is_ready_as_it_is(tmp_path, monkeypatch):
    """model.source=hub with model.hub_id a local folder (from_pretrained reads it): nothing to
    fetch, and the hub is never asked (offline: a lookup of that id would raise)."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    cfg = compose(["model=tiny_llama", "model.source=hub", f"model.hub_id={folder}",
                   f"paths.cache_dir={tmp_path / 'cache'}"])
    [item] = run_inputs(cfg)
    assert is_ready(item)
    missing = compose(["model=tiny_llama", "model.source=hub",
                       f"model.hub_id={tmp_path / 'absent'}", f"paths.cache_dir={tmp_path}"])
    assert not is_ready(run_inputs(missing)[0])


def _two_ranks(monkeypatch, rank: int, tag: str = "test-job") -> None:
    for k in ("SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", tag)


def test_rank_1_waits_for_rank_0_without_a_collective(tmp_path, monkeypatch, capsys):
    """Rank 1 polls the cache while 'rank 0' (a thread here) prepares; it returns once the
    model and the complete manifest are there, not before."""
    cfg = _cfg(tmp_path)
    items = run_inputs(cfg)
    assert not any(is_ready(i) for i in items)
    _two_ranks(monkeypatch, 1)
    finished = {}

    def rank0():
        time.sleep(1.0)
        from learnforget.assets.inputs import prepare_all

        prepare_all(items, log=lambda *_: None)
        finished["at"] = time.monotonic()

    t = threading.Thread(target=rank0)
    t0 = time.monotonic()
    t.start()
    ready_before_ranks(cfg, poll_s=0.05)
    waited = time.monotonic() - t0
    ready_at_return = [is_ready(i) for i in items]  # before rank 0 is joined
    t.join()
    assert "at" in finished and waited >= 1.0, waited
    assert ready_at_return == [True, True]
    assert "rank 1 of 2 waits for rank 0 to prepare" in capsys.readouterr().out


def test_rank_0_prepares_before_the_group_and_its_failure_ends_the_wait(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "data.source=nowhere_at_all")
    items = run_inputs(cfg)
    _two_ranks(monkeypatch, 0)
    with pytest.raises(Exception):  # noqa: B017 - whatever the bad source raises
        ready_before_ranks(cfg)
    assert is_ready(items[0])  # the model was prepared before the data failed
    marker = failure_marker(items)
    assert marker.exists()
    _two_ranks(monkeypatch, 1)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="rank 0 failed to prepare data=stdlib_code"):
        ready_before_ranks(cfg, poll_s=0.05)
    assert time.monotonic() - t0 < 5  # at once, not after prepare_wait_min
    _two_ranks(monkeypatch, 1, tag="a-later-launch")  # an old failure does not end a new wait
    cfg = _cfg(tmp_path, "data.source=nowhere_at_all", "train.distributed.prepare_wait_min=0.01")
    with pytest.raises(ConfigError, match=r"still not prepared after train.distributed."
                                          r"prepare_wait_min=0.01 min: run `learnforget prepare"):
        ready_before_ranks(cfg, poll_s=0.05)


def test_a_rank_of_several_never_tokenizes(tmp_path, cache_dir):
    """load_data on 2 ranks reads prepared shards only; missing ones are one line."""
    from learnforget.assets.models import load_tokenizer
    from learnforget.data.shards import ensure_corpus

    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="not prepared .* run `learnforget prepare"):
        ensure_corpus(cfg.data, cfg.model, load_tokenizer(_tiny(cfg)), Path(cfg.paths.cache_dir),
                      prepare=False)
    assert not corpus_dir(Path(cfg.paths.cache_dir), cfg.data, cfg.model).exists()


def _tiny(cfg) -> str:
    from learnforget.assets.models import base_model_dir

    return base_model_dir(cfg.model, Path(cfg.paths.cache_dir))


def test_stage_profiles_for_preparation_and_eval(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("nodes: 2\ntasks_per_node: 8\ngpus_per_node: 8\ngres: gpu:8\nmem_gb: 512\n"
                 "cpus_per_task: 8\ngpu_mem_gb: 80\npartition: gpu\neval: {partition: short}\n")
    ev, pr = stage_profile(p, "eval"), stage_profile(p, "prepare")
    assert (ev["nodes"], ev["tasks_per_node"], ev["gpus_per_node"]) == (1, 1, 1)
    assert "gres" not in ev and ev["mem_gb"] == 64 and ev["partition"] == "short"  # 512 / 8
    assert ev["gpu_mem_gb"] == 80 and ev["cpus_per_task"] == 8
    assert (pr["nodes"], pr["tasks_per_node"], pr["partition"]) == (1, 1, "gpu")
    assert not {"gpus_per_node", "gres", "gpu_mem_gb"} & set(pr)  # no GPU requested
    assert "eval" not in load_cluster_profile(p) and "prepare" not in load_cluster_profile(p)
    p.write_text("gpus_per_node: 1\nmem_gb: 20\neval: {gpus: 1}\n")
    with pytest.raises(ConfigError, match="eval: unknown key 'gpus'"):
        load_cluster_profile(p)
    p.write_text("gpus_per_node: null\nmem_gb: 2\n")  # a CPU stand-in: no GPU for eval either
    assert "gpus_per_node" not in stage_profile(p, "eval") and stage_profile(p, "eval")["mem_gb"] == 2


def test_training_and_eval_jobs_get_their_own_stages():
    over = ["model=tiny_llama", "stages=[train,eval,spectra]", "seed=1"]
    assert with_stages(over, ["train"]) == ["model=tiny_llama", "seed=1", "stages=[train]"]
    assert compose(with_stages(over, ["eval", "spectra"])).stages == ["eval", "spectra"]


def test_code_cpt_dry_run_counts_gpu_hours_as_held(tmp_path, capsys):
    """Worked out by hand: every job trains 0.8 x 20B + 0.2 x (0.25+0.5+1+2+4+8+16+20)B = 26.35B
    tokens; full at 5000 tokens/s per GPU, LoRA at 0.85 x 5000; 8 checkpoints x 1 h of eval on
    one GPU. Eval batch 8 of Llama-2-7B in bf16 at L=4096: 6,738,415,616 x 2 bytes + 8 x 4096 x
    (32000 x 8 + 32 x 2 x 4096 x 2 + (4 x 4096 + 2 x 11008) x 2) bytes."""
    study = load_study(find_study("code_cpt"))
    plan = expand(study, [f"paths.runs_dir={tmp_path / 'runs'}"])
    refresh_states(plan)
    estimate(plan)
    cluster = str(Path(__file__).parents[1] / "clusters/llama7b_full_fsdp.yaml")
    print_held(plan, "submitit_slurm", cluster)
    out = capsys.readouterr().out
    tokens = 0.8 * 20e9 + 0.2 * 51.75e9
    train = tokens / 5000 / 3600 + 3 * tokens / (5000 * 0.85) / 3600
    evals = 4 * 8 * 1.0
    assert (f"training {train:,.1f} (the jobs' {train / 8:,.1f} wall-hours x 8 GPU(s) each) + "
            f"eval/spectra {evals:,.1f} (x 1 GPU) = {train + evals:,.1f}") in out
    assert f"would hold 8 x {evals:,.1f} = {8 * evals:,.1f} GPU-hours" in out
    assert "3. eval/spectra: an array of 4 task(s), each 1 node x 1 GPU (mem_gb=128)" in out
    assert "--dependency=aftercorr:<training array>" in out and "afterok:<preparation>" in out
    need = 6_738_415_616 * 2 + 8 * 4096 * (32000 * 8 + 32 * 2 * 4096 * 2 + (4 * 4096 + 2 * 11008) * 2)
    most = int((0.9 * 80 * 2**30 - 6_738_415_616 * 2) // (4096 * (32000 * 8 + 32 * 2 * 4096 * 2
                                                                   + (4 * 4096 + 2 * 11008) * 2)))
    assert (f"eval.batch_size=8 (precision model, L=4096): ~{need / 2**30:.1f} GiB on one GPU -> "
            f"fits below 90% of 80 GB (largest batch that fits: {most})") in out


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_gloo_ranks_on_an_empty_cache_prepare_before_the_process_group(tmp_path):
    """torchrun, 2 ranks, nothing in the cache: rank 0 builds the model and tokenizes the shards
    before init_process_group, rank 1 waits on the files; the run trains to its end (~30-60 s)."""
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(tmp_path / "runs"),
           "LEARNFORGET_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "learnforget.cli",
         "train", *FAST, *SHARDS, "method=lora", "train.seq_len=64", "train.batch_size=2",
         "train.checkpoints.unit=steps", "train.checkpoints.at=[2]", "train.num_threads=1",
         "train.heldout_batches=1", "experiment_name=prep2"],
        env=env, capture_output=True, text=True, timeout=300)
    both = p.stdout + p.stderr
    (run,) = (tmp_path / "runs/prep2").iterdir()
    both += (run / "run.log").read_text(errors="replace") if (run / "run.log").exists() else ""
    assert p.returncode == 0, both[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["ranks"] == 2
    assert "rank 0 prepares model=tiny_llama (tiny), data=stdlib_code shards" in both, both[-3000:]
    assert "rank 1 of 2 waits for rank 0 to prepare" in both, both[-3000:]


class _FakeHandle:
    def __init__(self, job_id: str, fail: bool = False):
        self.job_id, self.fail, self.cancelled = job_id, fail, False
        self.paths = type("P", (), {"stderr": f"/nowhere/{job_id}.err"})()

    def results(self):
        if self.fail:
            raise RuntimeError("training failed")
        return [None]

    def cancel(self, check=True):
        self.cancelled = True


def test_slurm_chain_dependencies_and_cancellation(tmp_path, monkeypatch):
    """launch_slurm with SLURM replaced by a recorder: which arrays it submits with which
    --dependency, and that a failed training task cancels its own eval task only."""
    from learnforget.studies import slurm_jobs

    submitted = []

    def executor(profile, folder, name, dependency=None):
        return {"name": name, "dependency": dependency, "gpus": profile.get("gpus_per_node")}

    def submit(ex, fn, args, what):
        first = 100 + len(submitted)
        submitted.append({**ex, "args": args})
        return [_FakeHandle(f"{first}_{k}", fail=(ex["name"] == "lf-s" and k == 1))
                for k in range(len(args))]

    monkeypatch.setattr(slurm_jobs, "slurm_executor", executor)
    monkeypatch.setattr(slurm_jobs, "submit_array", submit)
    monkeypatch.setattr("learnforget.studies.prepare.missing_inputs", lambda cfgs: [])
    profile = tmp_path / "p.yaml"
    profile.write_text("gpus_per_node: 8\ntasks_per_node: 8\nmem_gb: 256\n")
    study = tmp_path / "s.yaml"
    study.write_text("description: d\nholds: [model=tiny_llama, 'stages=[train,eval,spectra]']\n"
                     "sweep:\n  seed: [0, 1, 2]\n")
    plan = expand(load_study(study), [f"paths.runs_dir={tmp_path / 'runs'}"])
    refresh_states(plan)
    plan.jobs[2].next_stage = "eval"  # trained already: no training task for it
    out = slurm_jobs.launch_slurm("s", plan.jobs, {"gpus_per_node": 8}, profile,
                                  tmp_path / "f", {})
    train, evals, trained = submitted
    assert (train["name"], train["dependency"], len(train["args"])) == ("lf-s", None, 2)
    assert all(a[-1] == "stages=[train]" for a in train["args"])
    assert (evals["dependency"], evals["gpus"], len(evals["args"])) == ("aftercorr:100", 1, 2)
    assert all(a[-1] == "stages=[eval,spectra]" for a in evals["args"])
    assert (trained["dependency"], len(trained["args"])) == (None, 1)
    assert [o.error is None for o in out] == [True, False, True]
    assert "training failed" in str(out[1].error)


def test_dry_run_notes_the_fp32_head_where_it_changes_scores_and_nowhere_else(tmp_path):
    """code_cpt scores Llama-2-7B with its bf16 body (eval.precision=model): every job is told
    that its log-likelihoods now come from an fp32 head; demo_tiny scores in fp32, where the head
    changes nothing, and gets no note."""
    from learnforget.studies.report import protocol_notes

    runs = [f"paths.runs_dir={tmp_path / 'runs'}"]
    paper = protocol_notes(expand(load_study(find_study("code_cpt")), runs))
    [(note, jobs)] = paper.items()
    assert note.startswith("eval.head=fp32") and "bfloat16 body" in note and jobs == [1, 2, 3, 4]
    assert protocol_notes(expand(load_study(find_study("demo_tiny")), runs)) == {}
