"""One job = one run through the stages train -> eval -> spectra: the task of every sweep.

    learnforget job model=tiny_llama method=lora data=stdlib_code      # all three stages
    learnforget job ... 'stages=[train,eval]'                           # a subset
    learnforget sweep demo_tiny                                           # many jobs (sweep.py)

Each stage is skipped when its outputs are already complete, so a job can be rerun at any
time: a finished run is not retrained, a scored run not rescored, and an interrupted one
resumes from `train/resume.pt`. What the job did is kept in `<run>/job.json`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from learnforget.config import config_hash, cooldown_mode, run_dir, run_name, validate
from learnforget.errors import ConfigError
from learnforget.files import read_result
from learnforget.runfolder import RunFolder, RunLock

STAGES = ("train", "eval", "spectra")


def job_stages(cfg: DictConfig) -> list[str]:
    """The stages the config asks for (key `stages`; all three when absent), in run order."""
    raw = cfg.get("stages", None)
    if raw is None:
        return list(STAGES)
    items = [raw] if isinstance(raw, str) else list(raw)
    unknown = [s for s in items if s not in STAGES]
    if unknown or not items:
        raise ConfigError(f"stages={items!r}: expected a non-empty list of {', '.join(STAGES)}")
    return [s for s in STAGES if s in items]


# ----------------------------------------------------------------------------- completeness

def train_complete(out: Path, chash: str | None = None) -> bool:
    return RunFolder(out).finished(chash)


def eval_complete(out: Path, suite: str, checkpoint: str | None = None) -> bool:
    """The suite's summary exists and has a row for every checkpoint of the run, or for the one
    checkpoint `checkpoint` names (eval.checkpoint: a study that scores its last budget only)."""
    folder = RunFolder(out)
    summary = read_result(folder.eval_summary(suite))
    if not summary:
        return False
    have = {r.get("checkpoint") for r in summary.get("rows", [])}
    ckpts = folder.checkpoint_labels()
    if checkpoint:
        return checkpoint in ckpts and checkpoint in have
    return bool(ckpts) and set(ckpts) <= have


def spectra_complete(out: Path) -> bool:
    """Every checkpoint has its spectra, or an earlier job found it has no ΔW to take."""
    folder = RunFolder(out)
    ckpts = folder.checkpoint_labels()
    if not ckpts:
        return False
    done = set(folder.read_job().get("spectra_checkpoints", []))
    return all(c in done or _parses(folder.spectra(c)) for c in ckpts)


def _parses(path: Path) -> bool:
    """The file exists and is whole JSON (a file cut short is recomputed by its stage)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def stage_complete(cfg: DictConfig, stage: str, out: Path | None = None) -> bool:
    out = run_dir(cfg) if out is None else out
    if stage == "train":
        from learnforget.train.cooldown import branches_complete

        return train_complete(out, config_hash(cfg)) and (
            cooldown_mode(cfg.train) != "branches" or branches_complete(out))
    if stage == "eval":
        return eval_complete(out, str(cfg.eval.name), cfg.eval.get("checkpoint") or None)
    if stage == "spectra":
        return spectra_complete(out)
    raise ConfigError(f"unknown stage {stage!r} (expected one of: {', '.join(STAGES)})")


def job_state(cfg: DictConfig, out: Path | None = None) -> tuple[str, str | None]:
    """(state, next stage): `done` (every requested stage complete), `running` (the run's lock
    is held), `resume` (a resume state or a finished earlier stage to build on), `new`."""
    out = run_dir(cfg) if out is None else out
    todo = [s for s in job_stages(cfg) if not stage_complete(cfg, s, out)]
    if not todo:
        return "done", None
    if RunFolder(out).locked():
        return "running", todo[0]
    if RunFolder(out).resume.exists() or todo[0] != "train" \
            or train_complete(out, config_hash(cfg)):
        return "resume", todo[0]
    return "new", todo[0]


# ----------------------------------------------------------------------------- the job

def _hand_interrupt_to_submitit() -> None:
    """Training caught the scheduler's stop signal (saving its state) and returned: pass the
    signal on to submitit's handler, which train restored, so that a SLURM job is requeued
    (and resumes) instead of ending as if it had finished."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        # no scheduler to requeue the job: stop here, as the signal's default action would,
        # rather than go on to the sweep's next job (a rerun resumes from the saved state)
        print("learnforget: stopped by a signal; the state is saved, rerun the same command "
              "to resume", flush=True)
        raise SystemExit(143)
    from learnforget.private_api import requeue_signal
    from learnforget.train.signals import received_stop_signals

    usr = signal.Signals(requeue_signal()).name
    if set(received_stop_signals()) == {"SIGTERM"}:
        # SLURM itself ends the job (scontrol requeue, scancel, a pre-emption that sends only
        # SIGTERM, a drained node) and requeues it when it means to: submitit's own
        # `scontrol requeue` then fails, and the failure would be the job's result while SLURM
        # runs it again. Exit as SIGTERM's default action would, leaving no result: submitit
        # waits for the requeued job (or reports a cancelled one).
        print(f"learnforget: SIGTERM from SLURM (not submitit's {usr}): the state is saved; "
              "SLURM requeues the job or it stays cancelled", flush=True)
        sys.stderr.flush()
        os._exit(143)
    os.kill(os.getpid(), requeue_signal())


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Run the config's stages on its run folder; returns {"run", "run_dir", "stages"} with
    one status per stage: done | skipped (already complete) | interrupted | failed | blocked
    (an earlier stage is not finished) | busy (another process trains or scores the run).

    Training takes the run's lock itself (train.loop.claim); the stages after it (eval,
    spectra) run under the same lock, so two processes of one study (two workers, a rerun
    beside a running sweep) never score one run twice at once."""
    validate(cfg)
    stages = job_stages(cfg)
    out, name, chash = run_dir(cfg), run_name(cfg), config_hash(cfg)
    folder = RunFolder(out)
    if cfg.train.get("num_threads"):
        import torch

        torch.set_num_threads(int(cfg.train.num_threads))  # for every stage, not only train
    from learnforget.train.distributed import env_from_slurm

    env_from_slurm()  # several SLURM tasks (tasks_per_node > 1): RANK etc. for this check
    main_rank = int(os.environ.get("RANK", "0")) == 0
    status: dict[str, str] = {}
    record = folder.read_job()
    trained = train_complete(out, chash)
    t0, c0 = time.time(), time.process_time()
    current = None
    held: RunLock | None = None  # the run's lock for the stages after training
    try:
        for i, stage in enumerate(stages):
            current = stage
            if stage != "train" and not trained:
                status[stage] = "blocked"
                continue
            if stage != "train" and not main_rank:
                continue  # data-parallel ranks > 0 only train
            if stage_complete(cfg, stage, out):
                status[stage] = "skipped"
                continue
            if stage != "train" and held is None:
                held = RunLock(folder)
                if not held.acquire():
                    held = None
                    print(f"learnforget: {name} is held by another process (training or "
                          f"scoring it: {out}); skipping {', '.join(stages[i:])}")
                    status.update({rest: "busy" for rest in stages[i:]})
                    break
                if stage_complete(cfg, stage, out):  # the other process finished it meanwhile
                    status[stage] = "skipped"
                    continue
            status[stage] = "failed"  # until it returns
            if stage == "train":
                from learnforget.train.loop import train

                train(cfg)
                info = folder.read_record()
                trained = folder.finished(chash)
                status[stage] = "done" if trained else (
                    "busy" if folder.locked() else info.status if info else "failed")
            elif stage == "eval":
                from learnforget.eval.stage import eval_main

                eval_main(cfg, out)
                status[stage] = "done"
            else:
                from learnforget.analysis.spectra import compute_spectra

                ckpts = folder.checkpoint_labels()
                compute_spectra(out, cache_dir=Path(cfg.paths.cache_dir).expanduser())
                record["spectra_checkpoints"] = ckpts
                status[stage] = "done"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or submitit requeueing the job
        if current is not None:
            status[current] = "interrupted"
        raise
    finally:
        if held is not None:
            held.release()
        if main_rank and out.exists():
            wall, cpu = round(time.time() - t0, 3), round(time.process_time() - c0, 3)
            launches = list(record.get("launches") or []) + [{
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": dict(status),
                "wall_time_s": wall, "cpu_time_s": cpu}]
            record.update({"run": name, "config_hash": chash, "stages": dict(status),
                           "requested": stages, "finished_at": launches[-1]["finished_at"],
                           "wall_time_s": wall, "cpu_time_s": cpu, "launches": launches})
            folder.write_job(record)
    print(f"learnforget: job {name}: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    if status.get("train") == "interrupted":
        _hand_interrupt_to_submitit()
    return {"run": name, "run_dir": str(out), "stages": status}

